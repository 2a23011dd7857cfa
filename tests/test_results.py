"""Results as data: validation, atomic round trip, mean/std over seeds, comparison beyond the spread."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mlip_core.paths import WORKSPACE_ENV
from mlip_core.results import (RESULT_COLUMNS, compare, mean_std, read_results, results_path, spread_rule_chance,
                               write_results)


@pytest.fixture(autouse=True)
def _workspace(tmp_path, monkeypatch):
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "ws"))


def _rows(method, values, task="chexpert", fraction=0.1, metric="auroc"):
    return [{"method": method, "task": task, "fraction": fraction, "seed": s, "metric": metric, "value": v}
            for s, v in enumerate(values)]


def test_missing_columns_are_named():
    rows = [{"method": "mlip", "task": "t", "value": 1.0}]
    with pytest.raises(ValueError, match=r"\['fraction', 'seed', 'metric'\]"):
        write_results(rows, "nb")
    assert not results_path("nb").exists()


def test_extra_columns_refused_when_asked_and_bad_names_refused():
    rows = [dict(r, note="x") for r in _rows("a", [1.0])]
    with pytest.raises(ValueError, match="note"):
        write_results(rows, "nb", extra_columns_ok=False)
    with pytest.raises(ValueError, match="numeric"):
        write_results([dict(r, value="high") for r in _rows("a", [1.0])], "nb")
    with pytest.raises(ValueError, match="plain name"):
        write_results(_rows("a", [1.0]), "../escape")


def test_round_trip_is_in_the_workspace_and_replaces_whole(tmp_path):
    rows = [dict(r, note="first") for r in _rows("mlip", [0.8, 0.82]) + _rows("convirt", [0.7, 0.71])]
    path = write_results(rows, "06_transfer")
    assert path == tmp_path / "ws" / "results" / "06_transfer.csv"
    back = read_results("06_transfer")
    assert list(back.columns) == RESULT_COLUMNS + ["note"]
    pd.testing.assert_frame_equal(back, pd.DataFrame(rows)[RESULT_COLUMNS + ["note"]])
    write_results(pd.DataFrame(_rows("mlip", [0.5])), "06_transfer")
    assert len(read_results("06_transfer")) == 1
    assert [p.name for p in path.parent.iterdir()] == ["06_transfer.csv"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="run that notebook"):
        read_results("never_written")


def test_mean_std_on_known_numbers():
    df = pd.DataFrame(_rows("a", [1.0, 2.0, 3.0]) + _rows("b", [10.0]) + _rows("a", [4.0, 6.0], metric="f1"))
    s = mean_std(df).set_index(["method", "metric"])
    assert s.loc[("a", "auroc"), "mean"] == pytest.approx(2.0)
    assert s.loc[("a", "auroc"), "std"] == pytest.approx(1.0)  # ddof=1
    assert s.loc[("a", "auroc"), "n"] == 3
    assert s.loc[("a", "f1"), "std"] == pytest.approx(math.sqrt(2.0))
    assert s.loc[("b", "auroc"), "n"] == 1 and math.isnan(s.loc[("b", "auroc"), "std"])
    with pytest.raises(ValueError, match="repeat a seed"):
        mean_std(pd.DataFrame(_rows("a", [1.0, 2.0]) + _rows("a", [3.0])))


def test_spread_rule_passes_by_chance_about_one_time_in_twelve_with_three_seeds():
    """Planted: rows drawn from one distribution. With three seeds each the rule passes ~8.4 % of the time
    (a closed form does not exist; 10^6 draws give 0.0836), less with more seeds; one seed gives no rate."""
    three = spread_rule_chance(3, 3)
    assert 0.078 < three < 0.090 and three == spread_rule_chance(3, 3)  # seeded
    assert spread_rule_chance(10, 10) < three
    assert math.isnan(spread_rule_chance(1, 3))
    rng = np.random.default_rng(1)  # the rule itself, applied by compare() to such rows, passes at that rate
    passes = []
    for _ in range(400):
        df = pd.DataFrame(_rows("a", list(rng.normal(size=3))) + _rows("b", list(rng.normal(size=3))))
        passes.append(compare(mean_std(df), "a", "b", "chexpert", 0.1, "auroc")["exceeds"])
    assert abs(np.mean(passes) - three) < 0.04


def test_compare_p_value_is_welchs_t_test_on_the_seeds():
    """From the summary's mean, std and n, the p-value equals Welch's test run on the seeds themselves; a
    difference that passes the spread rule can still be one that three seeds cannot tell from chance."""
    from scipy.stats import ttest_ind

    a, b = [0.80, 0.83, 0.85], [0.76, 0.80, 0.77]
    s = mean_std(pd.DataFrame(_rows("mlip", a) + _rows("convirt", b)))
    c = compare(s, "mlip", "convirt", "chexpert", 0.1, "auroc")
    assert c["p_value"] == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert c["exceeds"] is True and c["p_value"] > 0.05  # beyond the spread (0.050 > 0.046), yet p ≈ 0.06
    same = compare(mean_std(pd.DataFrame(_rows("mlip", [0.5] * 3) + _rows("convirt", [0.5] * 3))),
                   "mlip", "convirt", "chexpert", 0.1, "auroc")
    assert same["p_value"] == 1.0 and same["exceeds"] is False


def test_compare_beyond_the_spread_on_a_planted_case():
    df = pd.DataFrame(_rows("mlip", [0.80, 0.82, 0.84]) + _rows("convirt", [0.70, 0.72, 0.74])  # std 0.02 each
                      + _rows("gloria", [0.77, 0.79, 0.81]) + _rows("single", [0.5]))
    s = mean_std(df)
    far = compare(s, "mlip", "convirt", "chexpert", 0.1, "auroc")
    assert far["diff"] == pytest.approx(0.10) and far["spread"] == pytest.approx(0.04) and far["exceeds"] is True
    near = compare(s, "mlip", "gloria", "chexpert", 0.1, "auroc")  # 0.03 < 0.04
    assert near["diff"] == pytest.approx(0.03) and near["exceeds"] is False
    lone = compare(s, "mlip", "single", "chexpert", 0.1, "auroc")
    assert math.isnan(lone["spread"]) and lone["exceeds"] is False and math.isnan(lone["p_value"])
    with pytest.raises(KeyError, match="nope"):
        compare(s, "mlip", "nope", "chexpert", 0.1, "auroc")
    with pytest.raises(KeyError):
        compare(s, "mlip", "convirt", "chexpert", 0.01, "auroc")


def test_round_trip_then_summary_matches_in_memory_summary():
    rows = _rows("mlip", [0.1, 0.2, 0.4], fraction=0.01) + _rows("mlip", [0.3, 0.5], fraction=1.0)
    write_results(rows, "nb")
    pd.testing.assert_frame_equal(mean_std(read_results("nb")), mean_std(pd.DataFrame(rows)))


def test_q_values_are_benjamini_hochberg_over_the_tested_rows_only():
    from mlip_core.results import q_values

    p = pd.Series([0.01, np.nan, 0.04, 0.03, 0.5], index=list("abcde"))
    q = q_values(p)
    # BH by hand over the four tested p-values: sorted 0.01, 0.03, 0.04, 0.5 -> p * m / rank, then the running
    # minimum from the largest rank down
    assert q.index.tolist() == list("abcde") and np.isnan(q["b"])
    assert np.allclose(q[["a", "d", "c", "e"]].to_numpy(), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert q_values(pd.Series([np.nan, np.nan])).isna().all()
