"""The ablation study's bookkeeping: result rows from runs, differences against the seed spread, the transfer
world's prior, and the one mapping from flat chapter parameters to the nested config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlip_core.ablation import differences_vs, retrieval_rows
from mlip_core.config import PRETRAIN_PARAMETERS, pretrain_config
from mlip_core.data.reportgen import PRIOR
from mlip_core.data.transfer_worlds import TRANSFER_PRIOR
from mlip_core.results import RESULT_COLUMNS, mean_std


def test_retrieval_rows_are_long_format_with_one_row_per_direction_and_k():
    runs = pd.DataFrame([{"config": "mlip", "seed": s, "i2t_R@1": 1.0 + s, "i2t_R@5": 5.0, "i2t_R@10": 10.0 + s,
                          "t2i_R@1": 2.0, "t2i_R@5": 6.0, "t2i_R@10": 11.0} for s in (0, 1)])
    rows = pd.DataFrame(retrieval_rows(runs))
    assert set(RESULT_COLUMNS) <= set(rows.columns)
    assert len(rows) == 2 * 2 * 3
    r10 = rows[(rows["task"] == "retrieval_i2t") & (rows["metric"] == "R@10")].sort_values("seed")
    assert r10["value"].tolist() == [10.0, 11.0] and r10["fraction"].isna().all()


def test_differences_vs_flags_only_gaps_larger_than_the_summed_spread():
    rows = []
    for seed, (a, b, c) in enumerate([(0.80, 0.70, 0.79), (0.82, 0.71, 0.70), (0.81, 0.72, 0.88)]):
        rows += [{"method": m, "task": "linear_probe", "fraction": 0.01, "seed": seed, "metric": "macro_AUROC",
                  "value": v} for m, v in (("mlip", a), ("convirt", b), ("noisy", c))]
    summary = mean_std(pd.DataFrame(rows))
    d = differences_vs(summary, "mlip", "linear_probe", "macro_AUROC", 0.01).set_index("method")
    assert d.loc["convirt", "exceeds"] and d.loc["convirt", "diff"] == pytest.approx(0.71 - 0.81)
    assert not d.loc["noisy", "exceeds"]  # a similar mean with a wide spread says nothing


def test_transfer_prior_names_only_findings_the_renderer_draws_and_makes_rare_ones_common():
    assert set(TRANSFER_PRIOR) == set(PRIOR)
    for name in ("pneumothorax", "consolidation", "enlarged_cardiomediastinum", "edema"):
        assert TRANSFER_PRIOR[name] > PRIOR[name]


def test_pretrain_config_maps_every_flat_parameter_and_rejects_unknown_ones():
    cfg = pretrain_config("mgca", image_size=64, frozen_stages=2, freeze_text_layers=6, lr=3e-4, seed=7)
    assert (cfg.model.image.image_size, cfg.model.image.frozen_stages, cfg.model.text.freeze_layers) == (64, 2, 6)
    assert (cfg.train.lr, cfg.train.seed, cfg.name) == (3e-4, 7, "mgca")
    assert cfg.model.num_free_prototypes == 500  # the named config's own settings survive
    for key, path in PRETRAIN_PARAMETERS.items():
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)  # every mapped path exists
    with pytest.raises(ValueError, match="image_sise"):
        pretrain_config("mlip", image_sise=64)


def test_ceiling_rows_score_report_text_against_the_drawn_findings_and_each_encoder_with_all_labels(tmp_path,
                                                                                                   monkeypatch):
    import pandas as pd

    from mlip_core.ablation import ceiling_rows
    from mlip_core.data.synth import write_world
    from mlip_core.transfer.classify import Encoder, offline_world_task

    monkeypatch.setenv("MLIP_WORKSPACE", str(tmp_path / "ws"))
    write_world(tmp_path / "pre", num_studies=40, seed=0, image_size=32, report_source="template",
                split_fractions=(0.5, 0.5, 0.0))
    write_world(tmp_path / "tr", num_studies=30, seed=1, image_size=32, report_source="template",
                split_fractions=(0.6, 0.0, 0.4))
    task = offline_world_task(tmp_path / "tr").keep_splits(["train", "test"])
    params = {"text_tower": "tiny", "max_length": 32, "freeze_text_layers": 2}
    enc = Encoder("random init", "tower", 32, tower={"name": "resnet18", "pretrained": ""})
    rows = ceiling_rows(tmp_path / "pre", task, params, [enc], tmp_path / "cache", tmp_path / "feats")
    assert [r["method"] for r in rows] == ["report text (tiny, frozen)", "random init"]
    assert all(r["task"] == "label_ceiling" and r["fraction"] == 1.0 and 0.0 <= r["value"] <= 1.0 for r in rows)
    # The text ceiling is scored on what was drawn (synth/labels.csv), not on the labeler's CSV: with no
    # finding drawn there is nothing to score.
    labels = pd.read_csv(tmp_path / "pre" / "synth" / "labels.csv")
    labels.iloc[:, 2:] = 0
    labels.to_csv(tmp_path / "pre" / "synth" / "labels.csv", index=False)
    rows = ceiling_rows(tmp_path / "pre", task, params, [], tmp_path / "cache", tmp_path / "feats")
    assert len(rows) == 1 and np.isnan(rows[0]["value"])


def test_grid_runs_names_the_missing_table_and_methods(tmp_path):
    from mlip_core.ablation import RUN_TABLE, grid_runs

    with pytest.raises(FileNotFoundError, match="06_ablations first"):
        grid_runs(["mlip"], results_dir=tmp_path)
    pd.DataFrame({"config": ["mlip", "convirt", "mlip"], "seed": [0, 0, 1], "run_dir": ["a", "b", "c"],
                  "export": ["", "", ""]}).to_csv(tmp_path / RUN_TABLE, index=False)
    assert grid_runs(["mlip"], results_dir=tmp_path)["seed"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"no run of \['gloria'\]"):
        grid_runs(["mlip", "gloria"], results_dir=tmp_path)


def test_by_pretraining_seed_maps_tower_names_back_to_config_and_seed():
    from types import SimpleNamespace

    from mlip_core.ablation import by_pretraining_seed

    encoders = [("mlip", 2, SimpleNamespace(name="mlip_seed2")), ("convirt", 1, SimpleNamespace(name="convirt_seed1"))]
    rows = pd.DataFrame({"method": ["mlip_seed2", "convirt_seed1", "ImageNet init"], "seed": [0, 0, 0],
                         "value": [0.1, 0.2, 0.3]})
    out = by_pretraining_seed(rows, encoders)
    assert out[["method", "seed"]].values.tolist() == [["mlip", 2], ["convirt", 1], ["ImageNet init", 0]]
    assert rows["method"].tolist()[0] == "mlip_seed2"  # the input is left as it was
