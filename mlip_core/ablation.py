"""The ablation study: named configs trained on the same data with the same budget and seeds, then measured
the same way (held-out retrieval and linear probes on a transfer world), as tidy result rows.

    runs = train_grid(["convirt", "mlip", "mlip_no_itm"], seeds=[0, 1, 2], params=flat, data_dir=world)
    rows = retrieval_rows(runs)                                   # method, task, fraction, seed, metric, value
    rows += probe_rows(runs, task, masks)                         # linear probe, macro AUROC per fraction

Chapter ``06_ablations`` calls these; ``mlip_core.results`` writes and summarises the rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlip_core.config import pretrain_config

log = logging.getLogger(__name__)


def train_grid(names: Sequence[str], seeds: Iterable[int], params: dict[str, Any], data_dir: str | os.PathLike,
               root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Train every (config, seed) with the flat ``params`` (see :data:`mlip_core.config.PRETRAIN_PARAMETERS`;
    ``seed`` is set per run) and return one row per run: ``config, seed, run_dir, export, steps, train_s``
    (seconds of optimizer steps, summed from the metrics log), the final validation retrieval (``i2t_R@K``,
    ``t2i_R@K``) and embedding geometry (``val_pair_cos``, ``val_image_mean_cos``, ``val_text_mean_cos``, see
    :func:`mlip_core.metrics.embedding_geometry`). A run folder is named by the hash of its config and data, so
    finished runs are read back, not retrained."""
    from mlip_core.train import run_folder, train

    rows = []
    for name in names:
        for seed in seeds:
            cfg = pretrain_config(name, **{**params, "seed": int(seed)})
            # A grid run validates once, at its end, and is read through its last checkpoint and export: a
            # best.pt would be a second copy of the same weights (33 of them in the ci grid).
            cfg.train.best_metric = ""
            # Its table reads retrieval only: the loss terms' full forward on the validation split cost as much
            # as the 40 training steps of an MLIP row.
            cfg.train.validation_losses = False
            t0 = time.perf_counter()
            res = train(cfg, data_dir=data_dir, run_dir=run_folder(cfg, root, data_dir=data_dir),
                        resume="auto")
            val = res.val_history[-1] if res.val_history else {}
            rows.append({"config": name, "seed": int(seed), "run_dir": str(res.run_dir),
                         "export": str(res.export_path) if res.export_path else "", "steps": res.steps,
                         "train_s": float(sum(r.get("time_s", 0.0) for r in res.history)),
                         "wall_s": time.perf_counter() - t0,
                         **{k: float(v) for k, v in val.items() if "R@" in k or k.endswith("_cos")}})
    return pd.DataFrame(rows)


def retrieval_rows(runs: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)) -> list[dict[str, Any]]:
    """Long-format result rows of the runs' final validation retrieval (task ``retrieval_i2t`` /
    ``retrieval_t2i``, metric ``R@K`` in percent, fraction NaN: no labels are involved)."""
    rows = []
    for rec in runs.to_dict("records"):  # not itertuples: "i2t_R@10" is no identifier
        for direction in ("i2t", "t2i"):
            for k in ks:
                key = f"{direction}_R@{k}"
                if key in rec and not pd.isna(rec[key]):
                    rows.append({"method": rec["config"], "task": f"retrieval_{direction}", "fraction": np.nan,
                                 "seed": int(rec["seed"]), "metric": f"R@{k}", "value": float(rec[key])})
    return rows


GEOMETRY_METRICS = ("pair_cos", "image_mean_cos", "text_mean_cos")


def geometry_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Long-format result rows of the runs' final validation embedding geometry (task ``embedding_geometry``,
    metrics :data:`GEOMETRY_METRICS`, fraction NaN); runs validated before the engine recorded it have none."""
    rows = []
    for rec in runs.to_dict("records"):
        for metric in GEOMETRY_METRICS:
            value = rec.get(f"val_{metric}")
            if value is not None and not pd.isna(value):
                rows.append({"method": rec["config"], "task": "embedding_geometry", "fraction": np.nan,
                             "seed": int(rec["seed"]), "metric": metric, "value": float(value)})
    return rows


RUN_TABLE = "06_ablations_runs.csv"  # in workspace("results"): the grid's runs, read by the transfer chapters


def grid_runs(methods: Sequence[str], results_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The rows of the ablation grid's run table (:func:`write_run_table`, chapter 06) for ``methods``, each
    pretraining seed a row; a clear error when the grid has not run or trained none of a method."""
    from mlip_core.paths import workspace

    path = Path(results_dir if results_dir is not None else workspace("results")) / RUN_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the chapter 06_ablations first (it trains the towers)")
    runs = pd.read_csv(path)
    runs = runs[runs["config"].isin(list(methods))].reset_index(drop=True)
    missing = sorted(set(methods) - set(runs["config"]))
    if missing:
        raise ValueError(f"{path}: the grid trained no run of {missing}; add them to chapter 06's `configs` or "
                         "leave them out of `methods`")
    return runs


def by_pretraining_seed(rows: pd.DataFrame, encoders: Sequence[tuple[str, int, Any]]) -> pd.DataFrame:
    """Result rows whose ``method`` is a :func:`run_encoders` name (``<config>_seed<seed>``) with the config as
    method and the pretraining seed as seed; other rows (init baselines) keep their method and seed."""
    which = {enc.name: (config, seed) for config, seed, enc in encoders}
    out = rows.copy()
    out["seed"] = [which[m][1] if m in which else s for m, s in zip(rows["method"], rows["seed"])]
    out["method"] = [which.get(m, (m, 0))[0] for m in rows["method"]]
    return out


def run_encoders(runs: pd.DataFrame) -> list[tuple[str, int, Any]]:
    """(config, seed, :class:`~mlip_core.transfer.classify.Encoder`) of every run's exported image tower, named
    ``<config>_seed<seed>`` (the name keys the feature cache, so every chapter that probes them shares it)."""
    from mlip_core.transfer.classify import encoder_from_export

    return [(r.config, int(r.seed), encoder_from_export(f"{r.config}_seed{r.seed}", r.export))
            for r in runs.itertuples(index=False)]


def init_encoders(runs: pd.DataFrame) -> list[Any]:
    """The two rows every transfer table reads the pretrained towers against: the runs' architecture at their
    image size with random weights (seed 0), and with the weights pretraining started from (ImageNet)."""
    from mlip_core.config import load_config
    from mlip_core.transfer.classify import Encoder

    image = load_config(Path(runs["run_dir"].iloc[0]) / "config.yaml").model.image
    size = image.image_size
    return [Encoder(f"random init {image.name}", "tower", size, tower={"name": image.name, "pretrained": ""}),
            Encoder("ImageNet init", "tower", size, tower={"name": image.name, "pretrained": image.pretrained})]


def probe_rows(runs: pd.DataFrame, task: Any, masks: dict[tuple[float, int], np.ndarray],
               cache_root: str | os.PathLike, feature_dir: str | os.PathLike, Cs: Sequence[float] = (0.01,),
               batch_size: int = 64, device: str = "cpu", extra_encoders: Sequence[Any] = ()
               ) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Linear probes of every run's exported image tower on ``task`` (a transfer
    :class:`mlip_core.transfer.classify.ClassificationTask`) at each label fraction of ``masks``.

    Each pretraining seed's probe AUROC is averaged over the same label draws (the masks' seeds), so the spread
    over rows of one config is the spread over *pretraining* seeds. ``extra_encoders`` (e.g. random and ImageNet
    init, seed 0) are probed alike. Returns (rows: task ``linear_probe``, metric ``macro_AUROC``; the per-label
    probe table of every encoder)."""
    from mlip_core.transfer.classify import encoder_features, probe_sweep

    paths = task.df["image_path"].tolist()
    encoders = [(e.name, 0, e) for e in extra_encoders] + run_encoders(runs)
    rows, tables = [], []
    for method, seed, enc in encoders:
        feats, valid, _ = encoder_features(enc, paths, cache_root, feature_dir, batch_size=batch_size, device=device)
        if not valid.all():
            raise RuntimeError(f"{(~valid).sum()} transfer images could not be decoded; see the image cache skips")
        per_label = probe_sweep(feats, task, masks, Cs=Cs, encoder=enc.name)
        per_label.insert(0, "method", method)
        per_label["pretrain_seed"] = seed
        tables.append(per_label)
        scored = per_label.dropna(subset=["auroc"])
        by_fraction = scored.groupby(["fraction", "seed"])["auroc"].mean().groupby("fraction").mean()
        for fraction, value in by_fraction.items():
            rows.append({"method": method, "task": "linear_probe", "fraction": float(fraction), "seed": seed,
                         "metric": "macro_AUROC", "value": float(value)})
    return rows, pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def zeroshot_rows(runs: pd.DataFrame, task: Any, cache_root: str | os.PathLike, device: str = "cpu"
                  ) -> list[dict[str, Any]]:
    """Zero-shot scores of every run on ``task``'s test split, from the knowledge-graph prompts of
    :func:`mlip_core.transfer.zeroshot.zeroshot_prompts` (no label is used): rows of task ``zeroshot``, fraction
    0, the run's config as method and its pretraining seed as seed, metric ``macro_AUROC`` and ``AUROC <label>``.
    Needs each run's whole model (text tower and heads), not only the exported image tower, so the init rows
    have none."""
    from mlip_core.transfer.zeroshot import zeroshot_eval

    rows: list[dict[str, Any]] = []
    for r in runs.itertuples(index=False):
        scored = zeroshot_eval(r.run_dir, task, "test", cache_root=cache_root, device=device)
        rows += scored.assign(method=r.config, seed=int(r.seed), task="zeroshot").to_dict("records")
    return rows


def ceiling_rows(world_dir: str | os.PathLike, task: Any, params: dict[str, Any], encoders: Sequence[Any],
                 cache_root: str | os.PathLike, feature_dir: str | os.PathLike, C: float = 0.01,
                 batch_size: int = 64, device: str = "cpu") -> list[dict[str, Any]]:
    """What the offline worlds let each side learn, to read the grid's differences against (task
    ``label_ceiling``, fraction 1.0, seed 0, metric ``macro_AUROC``):

    - ``report text``: a logistic regression on the frozen text tower's report vectors (the very features every
      run trains on, from the text-feature cache), fitted on the pretraining world's training split and scored on
      its validation split against the *drawn* findings (``synth/labels.csv``; evaluation-side only). Near 1:
      the reports name the findings and the frozen tower keeps them apart.
    - each of ``encoders`` (e.g. random and ImageNet init): a linear probe with *all* of the transfer world's
      training labels. With every label the probe is bounded by what the frozen features see in the image.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from mlip_core.data.mimic import load_mimic_pairs
    from mlip_core.model.encoders import TextTower, build_tokenizer
    from mlip_core.train import frozen_text_features
    from mlip_core.transfer.classify import encoder_features, probe_sweep

    world_dir = Path(world_dir)
    cfg = pretrain_config("convirt", **{k: v for k, v in params.items() if k in
                                        ("text_tower", "text_allow_download", "max_length", "freeze_text_layers")})
    tower, tokenizer = TextTower(cfg.model.text), build_tokenizer(cfg.model.text)
    truth = pd.read_csv(world_dir / "synth" / "labels.csv")
    labels = [c for c in truth.columns if c not in ("subject_id", "study_id")]
    xy = {}
    for split in ("train", "validate"):
        pairs, _ = load_mimic_pairs(world_dir, split=split, views=tuple(cfg.train.views.split(",")))
        # the precision build_run encodes each split at, so that the runs' cached features are read, not recomputed
        feats = frozen_text_features(tower, tokenizer, pairs["text"].tolist(), cfg.model.text.max_length,
                                     precision=cfg.train.frozen_precision if split == "train" else "fp32")
        y = pairs[["study_id"]].merge(truth, on="study_id", how="left")[labels].fillna(0).to_numpy() > 0
        xy[split] = (feats["text_sentence"].numpy(), y)
    (x_tr, y_tr), (x_va, y_va) = xy["train"], xy["validate"]
    aucs = []
    for j in range(len(labels)):
        if 0 < y_tr[:, j].sum() < len(y_tr) and 0 < y_va[:, j].sum() < len(y_va):
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr, y_tr[:, j])
            aucs.append(roc_auc_score(y_va[:, j], clf.decision_function(x_va)))
    rows = [{"method": f"report text ({cfg.model.text.name}, frozen)", "task": "label_ceiling", "fraction": 1.0,
             "seed": 0, "metric": "macro_AUROC", "value": float(np.mean(aucs)) if aucs else float("nan")}]
    paths = task.df["image_path"].tolist()
    everything = {(1.0, 0): np.ones(int((task.df["split"] == "train").sum()), dtype=bool)}
    for enc in encoders:
        feats, valid, _ = encoder_features(enc, paths, cache_root, feature_dir, batch_size=batch_size, device=device)
        if not valid.all():
            raise RuntimeError(f"{(~valid).sum()} transfer images could not be decoded; see the image cache skips")
        scored = probe_sweep(feats, task, everything, Cs=(C,), encoder=enc.name).dropna(subset=["auroc"])
        rows.append({"method": enc.name, "task": "label_ceiling", "fraction": 1.0, "seed": 0,
                     "metric": "macro_AUROC", "value": float(scored["auroc"].mean())})
    return rows


def differences_vs(summary: pd.DataFrame, reference: str, task: str, metric: str,
                   fraction: float | None = None) -> pd.DataFrame:
    """Each method's mean minus ``reference``'s on one (task, metric, fraction) of a
    :func:`mlip_core.results.mean_std` table, with the spread (std_a + std_b) and whether the difference
    exceeds it."""
    from mlip_core.results import compare

    sel = summary[(summary["task"] == task) & (summary["metric"] == metric)]
    if fraction is not None:
        sel = sel[np.isclose(sel["fraction"].astype(float), fraction)]
    out = []
    for method in sel["method"].unique():
        if method == reference:
            continue
        c = compare(summary, method, reference, task, fraction if fraction is not None else np.nan, metric)
        out.append({"method": method, "vs": reference, **c})
    return pd.DataFrame(out)


def write_run_table(runs: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The runs table as CSV (run folders and exports, for the chapters that read the towers)."""
    from mlip_core.checkpoint import atomic_write

    return atomic_write(path, lambda fh: runs.to_csv(fh, index=False), "w")
