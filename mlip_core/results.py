"""Results as data: every number a notebook reports is a row in ``workspace("results")/<notebook>.csv``.

One row per (method, task, fraction, seed, metric) with its value:

    rows = [{"method": "mlip", "task": "chexpert", "fraction": 0.01, "seed": 0, "metric": "auroc", "value": 0.81}, ...]
    write_results(rows, "07_classification")
    summary = mean_std(read_results("07_classification"))      # mean, std (ddof=1), n seeds
    compare(summary, "mlip", "convirt", "chexpert", 0.01, "auroc")      # {"diff", "spread", "exceeds"}

Tables and claims in the prose are then computed from these files, never typed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mlip_core.checkpoint import atomic_write
from mlip_core.paths import workspace

__all__ = ["RESULT_COLUMNS", "write_results", "read_results", "results_path", "mean_std", "compare", "q_values"]

RESULT_COLUMNS: list[str] = ["method", "task", "fraction", "seed", "metric", "value"]
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def results_path(notebook: str) -> Path:
    """``workspace("results")/<notebook>.csv``; ``notebook`` is a plain name such as ``05_pretraining``."""
    if not isinstance(notebook, str) or not _NAME.match(notebook) or notebook in (".", ".."):
        raise ValueError(f"notebook must be a plain name (letters, digits, _ . -), got {notebook!r}")
    return workspace("results") / f"{notebook}.csv"


def _as_frame(rows_or_df: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    if isinstance(rows_or_df, pd.DataFrame):
        return rows_or_df.copy()
    return pd.DataFrame(list(rows_or_df))


def write_results(rows_or_df: pd.DataFrame | Iterable[Mapping], notebook: str, extra_columns_ok: bool = True) -> Path:
    """Write a notebook's results to ``workspace("results")/<notebook>.csv`` atomically and return the path.

    The table must have every column of ``RESULT_COLUMNS`` (a ValueError names the missing ones) and a numeric
    ``value``; further columns are kept after them unless ``extra_columns_ok`` is False. The file is replaced
    whole (:func:`mlip_core.checkpoint.atomic_write`), so a reader never sees half a table.
    """
    df = _as_frame(rows_or_df)
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results for {notebook!r} lack the columns {missing}; every row needs {RESULT_COLUMNS}")
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    if extra and not extra_columns_ok:
        raise ValueError(f"results for {notebook!r} have columns {extra} beyond {RESULT_COLUMNS} "
                         "(pass extra_columns_ok=True to keep them)")
    values = pd.to_numeric(df["value"], errors="coerce")
    bad = df["value"].notna() & values.isna()
    if bad.any():
        raise ValueError(f"results for {notebook!r}: column 'value' must be numeric; "
                         f"{int(bad.sum())} rows are not, e.g. {df.loc[bad, 'value'].iloc[0]!r}")
    df["value"] = values
    df = df[RESULT_COLUMNS + extra]
    return atomic_write(results_path(notebook), lambda fh: df.to_csv(fh, index=False, lineterminator="\n"), "w")


def read_results(notebook: str) -> pd.DataFrame:
    """The table :func:`write_results` wrote for ``notebook``."""
    path = results_path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results for {notebook!r} yet; run that notebook first "
                                f"(it writes them with mlip_core.results.write_results)")
    return pd.read_csv(path)


def mean_std(df: pd.DataFrame, by: Sequence[str] = ("method", "task", "fraction", "metric")) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one seed) and ``n`` (number of seeds) of ``value`` per group of ``by``.

    A group with the same seed twice is an error (a result was written twice), not something to average.
    Rows with an empty ``fraction`` (a task without label fractions) form their own group.
    """
    by = list(by)
    missing = [c for c in by + ["seed", "value"] if c not in df.columns]
    if missing:
        raise ValueError(f"mean_std: columns {missing} missing; the table has {list(df.columns)}")
    dup = df.duplicated(by + ["seed"], keep=False)
    if dup.any():
        raise ValueError(f"mean_std: {int(dup.sum())} rows repeat a seed within a group, e.g.\n"
                         f"{df.loc[dup, by + ['seed', 'value']].head(4).to_string(index=False)}")
    grouped = df.groupby(by, dropna=False, sort=True)["value"]
    out = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count()})
    return out.reset_index()


def mean_std_table(summary: pd.DataFrame, order: Sequence[str] | None = None, columns: str = "fraction",
                   digits: int = 3) -> pd.DataFrame:
    """A :func:`mean_std` table as text cells "mean ± std" (std "–" for a single seed), one row per method in
    ``order`` (those present), one column per value of ``columns`` (fractions shown as percentages)."""
    cell = summary.assign(cell=summary["mean"].map(f"{{:.{digits}f}}".format) + " ± "
                          + summary["std"].map(lambda v: "–" if pd.isna(v) else f"{v:.{digits}f}"))
    table = cell.pivot(index="method", columns=columns, values="cell")
    if order is not None:
        table = table.loc[[m for m in order if m in table.index]]
    if columns == "fraction":
        table = table.rename(columns=lambda f: f"{f:.0%}" if pd.notna(f) else "–")
    return table


def _same(column: pd.Series, value) -> pd.Series:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return column.isna()
    return column == value


def spread_rule_chance(n_a: int, n_b: int, draws: int = 200_000, seed: int = 0) -> float:
    """How often :func:`compare`'s rule (|mean_a − mean_b| > std_a + std_b) passes when both rows' seeds come
    from one and the same normal distribution: the rule's false-positive rate for rows of ``n_a`` and ``n_b``
    seeds (it does not depend on the distribution's mean or scale). Monte Carlo over ``draws`` pairs of rows,
    seeded; NaN when a row has fewer than two seeds (no spread). Times the number of comparisons, the number of
    passes that chance alone gives."""
    if min(n_a, n_b) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((draws, n_a)), rng.standard_normal((draws, n_b))
    diff = np.abs(a.mean(1) - b.mean(1))
    return float(np.mean(diff > a.std(1, ddof=1) + b.std(1, ddof=1)))


def compare(summary: pd.DataFrame, method_a: str, method_b: str, task: str, fraction, metric: str) -> dict:
    """Is ``method_a`` different from ``method_b`` beyond the seed spread, in a :func:`mean_std` table?

    Returns ``diff`` = mean_a − mean_b, ``spread`` = std_a + std_b, ``exceeds`` and ``p_value``. "Beyond the
    spread" means |mean_a − mean_b| > std_a + std_b. ``p_value`` is Welch's two-sided t-test on the two rows'
    seeds (from their mean, std and n): the rule alone says nothing about how often it passes by chance, which
    matters once a table makes dozens of comparisons (correct the family's p-values, e.g. with
    ``scipy.stats.false_discovery_control``). With a single seed on either side the std is unknown (NaN): spread
    and p-value are NaN and ``exceeds`` is False, since no claim can be made.
    """
    from scipy.stats import ttest_ind_from_stats

    picked = {}
    for m in (method_a, method_b):
        row = summary[(summary["method"] == m) & (summary["task"] == task) & _same(summary["fraction"], fraction)
                      & (summary["metric"] == metric)]
        if len(row) != 1:
            raise KeyError(f"compare: {len(row)} rows for method={m!r} task={task!r} fraction={fraction!r} "
                           f"metric={metric!r} in the summary (expected 1)")
        picked[m] = row.iloc[0]
    a, b = picked[method_a], picked[method_b]
    diff = float(a["mean"] - b["mean"])
    spread = float(a["std"] + b["std"])
    exceeds = bool(not math.isnan(spread) and abs(diff) > spread)
    p_value = float("nan")
    if not math.isnan(spread):
        if spread > 0:
            p_value = float(ttest_ind_from_stats(a["mean"], a["std"], a["n"], b["mean"], b["std"], b["n"],
                                                 equal_var=False).pvalue)
        else:  # both rows constant over their seeds
            p_value = 1.0 if diff == 0 else 0.0
    return {"diff": diff, "spread": spread, "exceeds": exceeds, "p_value": p_value}


def q_values(p_values: pd.Series) -> pd.Series:
    """Benjamini–Hochberg q-values of a family of :func:`compare` p-values (``scipy.stats.false_discovery_control``)
    over the tested ones; NaN where the p-value is NaN (a row with a single seed tests nothing)."""
    from scipy.stats import false_discovery_control

    q = pd.Series(np.nan, index=p_values.index, dtype=float)
    tested = p_values.notna()
    if tested.any():
        q[tested] = false_discovery_control(p_values[tested].to_numpy(dtype=float), method="bh")
    return q
