"""Linear-probe classification transfer: frozen features from an image tower, logistic regression per label,
AUROC on a held-out test split, at 1% / 10% / 100% of the training labels.

The protocol follows the linear-classification setting of ConVIRT / GLoRIA / MGCA / MLIP: the encoder is
frozen, only a linear layer is trained on its global feature vector, with a fraction of the labelled training
images. Our concrete choices: scikit-learn ``LogisticRegression`` (L2, lbfgs) per label on standardised
features, C picked from a small grid by mean AUROC on the validation split, label fractions sampled *by
patient* with :func:`mlip_core.data.downstream.label_fraction_splits` (one seeded permutation, so the 1% set
is inside the 10% set, inside 100%).

Encoders are described by :class:`Encoder`: raw 32x32 pixels (the floor every learned encoder must beat), a
randomly initialised tower, ImageNet EfficientNet-lite0, or a tower exported by pretraining
(``image_tower.pt`` + ``.json``, :func:`mlip_core.checkpoint.load_image_tower_export`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from mlip_core.checkpoint import atomic_write, load_image_tower_export
from mlip_core.config import ImageTowerConfig
from mlip_core.data.cache import ImageCache
from mlip_core.data.downstream import CHEXPERT_5, ImageLabelDataset, holdout_split, label_fraction_splits, load_chexpert
from mlip_core.data.mimic import CHEXPERT_14, load_mimic_pairs
from mlip_core.data.skips import SkipReport
from mlip_core.model.encoders import ImageTower, input_statistics, memory_format

__all__ = [
    "ClassificationTask",
    "Encoder",
    "ProbeResult",
    "auroc_per_label",
    "build_tower",
    "chexpert_task",
    "encoder_from_export",
    "extract_features",
    "find_exports",
    "fraction_masks",
    "image_cache",
    "label_rows",
    "linear_probe",
    "offline_world_task",
    "probe_sweep",
    "raw_pixel_features",
    "summarise",
]



# ------------------------------------------------------------------------------------------------------------
# Tasks: one table of images with a patient, a split and 0/1 labels
@dataclass
class ClassificationTask:
    """``df``: image_path, group (patient), split in train/validate/test, one float column per label
    (1/0, NaN = not scored for that image); ``labels`` the columns scored; ``skips`` what was left out."""

    name: str
    df: pd.DataFrame
    labels: list[str]
    skips: SkipReport
    unused_labels: dict[str, str] = field(default_factory=dict)  # label -> why it is not scored

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (index kept: positions into ``df``)."""
        return self.df[self.df["split"] == name]

    def keep_splits(self, splits: Sequence[str]) -> ClassificationTask:
        """The task with only these splits' rows (the others counted as filtered)."""
        keep = self.df["split"].isin(list(splits)).to_numpy()
        self.skips.filter(f"split not in {tuple(splits)}", int((~keep).sum()))
        return ClassificationTask(self.name, self.df[keep].reset_index(drop=True), self.labels, self.skips,
                                  self.unused_labels)

    def limit_train_patients(self, n: int, seed: int = 0) -> ClassificationTask:
        """The task with at most ``n`` training patients (a seeded draw; their images all kept, the other
        training images counted as filtered). ``n <= 0`` keeps every patient."""
        train_groups = np.array(sorted(self.split("train")["group"].astype(str).unique()))
        if n <= 0 or n >= len(train_groups):
            return self
        chosen = set(train_groups[np.random.default_rng(seed).permutation(len(train_groups))[:n]])
        drop = (self.df["split"] == "train").to_numpy() & ~self.df["group"].astype(str).isin(chosen).to_numpy()
        self.skips.filter(f"training images of patients beyond the first {n} drawn", int(drop.sum()))
        return ClassificationTask(self.name, self.df[~drop].reset_index(drop=True), self.labels, self.skips,
                                  self.unused_labels)


def offline_world_task(world_dir: Path | str, labels: Sequence[str] | None = None) -> ClassificationTask:
    """The offline world's frontal images with what was *drawn* (``synth/labels.csv``) as labels.

    Images, patients and splits come from the MIMIC reader (its skips are kept); labels are scored when the
    world drew at least one positive (``labels=None``: every CheXpert column that was drawn).
    """
    world_dir = Path(world_dir)
    truth_path = world_dir / "synth" / "labels.csv"
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: the offline world's drawn labels are missing; write the world with "
                                "`python -m mlip_core.data.synth --out DIR` (or run chapter 01_offline_world)")
    pairs, skips = load_mimic_pairs(world_dir, split=None)
    truth = pd.read_csv(truth_path)
    missing_cols = [c for c in CHEXPERT_14 if c not in truth.columns]
    if missing_cols:
        raise ValueError(f"{truth_path}: columns {missing_cols} missing; rewrite the world with this version of synth")
    df = pairs[["image_path", "subject_id", "study_id", "split"]].merge(
        truth.drop(columns="subject_id"), on="study_id", how="left", indicator=True)
    no_truth = df["_merge"] == "left_only"
    for s in df.loc[no_truth, "study_id"]:
        skips.add("study has no row in synth/labels.csv", f"study {s}", truth_path)
    df = df[~no_truth].drop(columns="_merge").rename(columns={"subject_id": "group"})
    df["group"] = df["group"].astype(str)
    for c in CHEXPERT_14:
        df[c] = df[c].astype(np.float32)
    df = df.reset_index(drop=True)
    candidates = list(labels) if labels is not None else list(CHEXPERT_14)
    unknown = [c for c in candidates if c not in CHEXPERT_14]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; choose from {CHEXPERT_14}")
    used = [c for c in candidates if df[c].sum() > 0]
    unused = {c: "never drawn in this world" for c in CHEXPERT_14 if c not in used}
    return ClassificationTask("offline world", df, used, skips, unused)


def chexpert_task(root: Path | str, labels: Sequence[str] = CHEXPERT_5, policy: str = "ones", val_frac: float = 0.05,
                  seed: int = 0) -> ClassificationTask:
    """CheXpert: ``train.csv`` split by patient into train/validate, the official ``valid.csv`` as test."""
    train, skips = load_chexpert(root, "train", policy=policy, labels=labels)
    test, test_skips = load_chexpert(root, "valid", policy=policy, labels=labels)
    skips.extend(test_skips)
    split = holdout_split(train, "patient", val_frac=val_frac, test_frac=0.0, seed=seed)
    train = train.assign(split=split.replace({"valid": "validate"}).to_numpy())
    test = test.assign(split="test")
    df = pd.concat([train, test], ignore_index=True).rename(columns={"patient": "group"})
    return ClassificationTask("CheXpert", df, list(labels), skips, {})


# ------------------------------------------------------------------------------------------------------------
# Encoders
@dataclass
class Encoder:
    """What produces features: ``kind`` "raw" (pixels at ``image_size``) or "tower" (an :class:`ImageTower`
    built from ``tower`` (ImageTowerConfig fields), with weights from ``state_path`` when given)."""

    name: str
    kind: str
    image_size: int
    tower: dict | None = None
    state_path: str | None = None
    seed: int = 0  # initialisation of a tower without weights

    def identity(self) -> str:
        """A short hash of everything that changes the features (for the feature cache)."""
        ident = asdict(self)
        ident.pop("name")
        if self.state_path:
            st = Path(self.state_path).stat()
            ident["state"] = [st.st_size, st.st_mtime_ns]
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def find_exports(root: Path | str) -> dict[str, Path]:
    """``{NAME: ROOT/NAME/image_tower.pt}`` for every exported tower under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(root.glob("*/image_tower.pt")) if p.with_suffix(".json").is_file()}


def encoder_from_export(name: str, path: Path | str) -> Encoder:
    """An :class:`Encoder` for an exported tower; architecture and image size from its ``.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "image_tower.pt"
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: export metadata missing; re-export with "
                                "mlip_core.checkpoint.write_image_tower_export")
    image = dict(json.loads(meta_path.read_text()).get("image") or {})
    if "name" not in image:
        raise ValueError(f"{meta_path}: no 'image' tower config in the metadata; re-export it with this version")
    # The exported weights replace any initialisation, but keep the input statistics the run trained with
    # (ImageNet's for a tower that started from ImageNet weights): resolved before `pretrained` is cleared.
    known = ImageTowerConfig.__dataclass_fields__
    image["input_mean"], image["input_std"] = input_statistics(
        ImageTowerConfig(**{k: v for k, v in image.items() if k in known}))
    image["pretrained"] = ""
    return Encoder(name, "tower", int(image.get("image_size", 224)), tower=image, state_path=str(path))


def build_tower(encoder: Encoder) -> ImageTower:
    """The encoder's :class:`ImageTower` in eval mode: exported weights loaded strictly, or seeded init."""
    if encoder.kind != "tower" or encoder.tower is None:
        raise ValueError(f"encoder {encoder.name!r} is not a tower")
    known = ImageTowerConfig.__dataclass_fields__
    cfg = ImageTowerConfig(**{k: v for k, v in encoder.tower.items() if k in known})
    cfg.image_size = encoder.image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder.seed)
        tower = ImageTower(cfg)
    if encoder.state_path:
        state, _ = load_image_tower_export(encoder.state_path)
        try:
            tower.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(f"{encoder.state_path}: the weights do not fit a {cfg.name} tower ({exc}); "
                               "is the .json beside it from the same export? Re-export both from one "
                               "checkpoint with mlip_core.checkpoint.export_from_checkpoint") from exc
    return tower.eval()


# ------------------------------------------------------------------------------------------------------------
# Features
def image_cache(paths: Sequence[str], size: int, cache_root: Path | str, num_workers: int = 0,
                progress: bool = False) -> ImageCache:
    """A uint8 cache (N, size, size) of ``paths`` under ``cache_root`` (folder named by size and a hash of the paths)."""
    tag = hashlib.sha1("\n".join(map(str, paths)).encode()).hexdigest()[:10]
    return ImageCache(Path(cache_root) / f"transfer_{tag}_{size}", list(paths), size, num_workers=num_workers,
                      progress=progress)


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H*W) in [0, 1]: the raw-pixel floor's features."""
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0


@torch.inference_mode()
def extract_features(tower: torch.nn.Module, dataset: ImageLabelDataset, batch_size: int = 64,
                     device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = False,
                     channels_last: bool | None = None) -> np.ndarray:
    """Global feature vectors of a frozen tower over a dataset (eval transform): float32 (N, D).

    ``channels_last`` (default: on a CPU) runs the tower in that memory format, as the pretraining engine does
    (oneDNN, EfficientNet-lite0, benchmarks/bench_probe.py: 1.29x faster at 64 px, 1.81x at 128 px; features
    within ~1e-6 relative of NCHW's); the tower's weights are given back contiguous."""
    tower = tower.to(device).eval()
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="features", leave=False)
    with memory_format(tower, channels_last) as fmt:
        out = [tower(batch["image"].to(device).contiguous(memory_format=fmt)).global_.float().cpu()
               for batch in loader]
    if not out:
        return np.zeros((0, getattr(tower, "global_dim", 0)), dtype=np.float32)
    return torch.cat(out).numpy()


def cached_features(encoder: Encoder, cache: ImageCache, feature_dir: Path | str, compute: Callable[[], np.ndarray]
                    ) -> tuple[np.ndarray, float, bool]:
    """Features from ``feature_dir`` when the same encoder already ran on the same images, else ``compute()``
    (saved atomically). Returns (features (N, D), seconds, computed)."""
    feature_dir = Path(feature_dir)
    key = hashlib.sha1(f"{encoder.identity()}|{cache.key}".encode()).hexdigest()[:16]
    path = feature_dir / f"{encoder.name}_{key}.npy"
    if path.is_file():
        return np.load(path), 0.0, False
    t0 = time.perf_counter()
    feats = np.asarray(compute(), dtype=np.float32)
    seconds = time.perf_counter() - t0
    atomic_write(path, lambda fh: np.save(fh, feats))
    return feats, seconds, True


def encoder_features(encoder: Encoder, paths: Sequence[str], cache_root: Path | str, feature_dir: Path | str,
                     batch_size: int = 64, device: torch.device | str = "cpu", progress: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features of ``paths`` under ``encoder``: (features (N_valid, D), valid mask (N,), timing record).

    Images that could not be decoded are left out (mask False) and counted in the record."""
    t0 = time.perf_counter()
    cache = image_cache(paths, encoder.image_size, cache_root, progress=progress)
    cache_s = time.perf_counter() - t0
    valid = np.asarray(cache.valid, dtype=bool)
    if encoder.kind == "raw":
        compute = lambda: raw_pixel_features(cache.array[valid])  # noqa: E731
    else:
        def compute() -> np.ndarray:
            df = pd.DataFrame({"image_path": list(map(str, paths)), "_": 0.0})
            dataset = ImageLabelDataset(df, ["_"], image_size=encoder.image_size, cache=cache)
            return extract_features(build_tower(encoder), dataset, batch_size=batch_size, device=device,
                                    progress=progress)
    feats, seconds, computed = cached_features(encoder, cache, feature_dir, compute)
    record = {"encoder": encoder.name, "image size": encoder.image_size, "feature dim": feats.shape[1],
              "images": int(valid.sum()), "undecodable": int((~valid).sum()), "image cache s": round(cache_s, 1),
              "feature s": round(seconds, 1), "from cache": not computed,
              "images/s": round(valid.sum() / seconds, 1) if computed and seconds > 0 and encoder.kind != "raw" else np.nan}
    return feats, valid, record


# ------------------------------------------------------------------------------------------------------------
# Label fractions
def fraction_masks(train: pd.DataFrame, out_dir: Path | str, dataset: str, fractions: Sequence[float] = (0.01, 0.1, 1.0),
                   seeds: Sequence[int] = (0,), group_col: str = "group") -> dict[tuple[float, int], np.ndarray]:
    """{(fraction, seed): bool mask over ``train``'s rows} of nested patient-level label fractions.

    The fractions are of *patients*: :func:`label_fraction_splits` writes one split file of patient ids per
    fraction and seed into ``out_dir`` (so another method can use the very same images); a fraction keeps
    every image of the patients it draws. Fraction 1.0 is the same for every seed and listed once (seed 0).
    """
    groups = pd.DataFrame({group_col: sorted(train[group_col].astype(str).unique())})
    member = train[group_col].astype(str).to_numpy()
    masks: dict[tuple[float, int], np.ndarray] = {}
    for seed in seeds:
        files = label_fraction_splits(groups, out_dir, dataset, fractions=fractions, seed=seed, id_col=group_col)
        for f, path in files.items():
            if f >= 1.0 and seed != seeds[0]:
                continue
            chosen = set(pd.read_csv(path, dtype=str)[group_col])
            masks[(float(f), int(seed) if f < 1.0 else int(seeds[0]))] = np.isin(member, list(chosen))
    return masks


# ------------------------------------------------------------------------------------------------------------
# Probe and metric
def auroc_per_label(y_true: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """AUROC per label from (N, C) 0/1 targets (NaN = not scored) and (N, C) scores.

    A label whose scored test rows hold a single class has no AUROC: it is returned in ``skipped`` with the
    reason, never dropped silently."""
    aurocs, skipped = {}, {}
    for j, name in enumerate(labels):
        keep = ~np.isnan(y_true[:, j])
        y = y_true[keep, j]
        pos = int(y.sum())
        if pos == 0 or pos == len(y):
            skipped[name] = f"test split has only {'negatives' if pos == 0 else 'positives'} ({len(y)} images)"
            continue
        aurocs[name] = float(roc_auc_score(y, scores[keep, j]))
    return aurocs, skipped


@dataclass
class ProbeResult:
    """Test scores (N_test, C) of a probe, plus which labels had a single class in the training subset
    (those score a constant, i.e. chance, on test)."""

    scores: np.ndarray
    constant: dict[str, str]


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, labels: Sequence[str], C: float = 0.1,
                 seed: int = 0, max_iter: int = 500) -> ProbeResult:
    """One standardised L2 logistic regression per label on (N, D) features and (N, C) 0/1 targets (NaN =
    unlabelled for that label); returns test scores (N_test, C). A label with one class in the training
    rows gets a constant score (its training prevalence): no ranking, AUROC 0.5 by construction."""
    scores = np.zeros((len(x_test), len(labels)), dtype=np.float64)
    constant: dict[str, str] = {}
    for j, name in enumerate(labels):
        keep = ~np.isnan(y_train[:, j])
        y = y_train[keep, j].astype(int)
        if len(np.unique(y)) < 2:
            constant[name] = f"training subset has only {'negatives' if y.sum() == 0 else 'positives'} ({len(y)} images)"
            scores[:, j] = float(y.mean()) if len(y) else 0.0
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="liblinear", max_iter=max_iter, random_state=seed))
        clf.fit(x_train[keep], y)
        scores[:, j] = clf.predict_proba(x_test)[:, 1]
    return ProbeResult(scores, constant)


def probe_sweep(features: np.ndarray, task: ClassificationTask, masks: dict[tuple[float, int], np.ndarray],
                Cs: Sequence[float] = (0.1,), encoder: str = "", max_iter: int = 500) -> pd.DataFrame:
    """Linear probes for every (fraction, seed) training subset of ``task``; one row per label.

    ``features`` (N, D) are aligned with ``task.df``'s rows. With several ``Cs`` the one with the best mean
    AUROC on the validation split is used for the test split. Columns: encoder, fraction, seed, C, label,
    auroc (NaN when skipped), status ("scored", "chance: ..." or "skipped: ..."), train/test positives."""
    df, labels = task.df, task.labels
    train_idx = np.flatnonzero(df["split"].to_numpy() == "train")
    val_idx = np.flatnonzero(df["split"].to_numpy() == "validate")
    test_idx = np.flatnonzero(df["split"].to_numpy() == "test")
    y_all = df[labels].to_numpy(dtype=np.float64)
    rows = []
    for (fraction, seed), mask in sorted(masks.items()):
        tr = train_idx[mask]
        best_c = float(Cs[0])
        if len(Cs) > 1 and len(val_idx):
            val_means = []
            for c in Cs:
                res = linear_probe(features[tr], y_all[tr], features[val_idx], labels, C=c, seed=seed, max_iter=max_iter)
                val_means.append(_mean_with_chance(res, y_all[val_idx], labels))
            best_c = float(Cs[int(np.nanargmax(val_means))]) if not np.all(np.isnan(val_means)) else best_c
        res = linear_probe(features[tr], y_all[tr], features[test_idx], labels, C=best_c, seed=seed, max_iter=max_iter)
        rows += label_rows(encoder, fraction, seed, best_c, labels, y_all[tr], y_all[test_idx], res.scores,
                           res.constant, train_images=len(tr))
    return pd.DataFrame(rows)


def label_rows(encoder: str, fraction: float, seed: int, C: float, labels: Sequence[str], y_train: np.ndarray,
               y_test: np.ndarray, scores: np.ndarray, constant: dict[str, str], train_images: int) -> list[dict]:
    """One row per label of a fitted model (probe or fine-tuned): its test AUROC ("scored"); 0.5 where the model
    could only predict a constant (``constant``: one class among the training labels, "chance"); NaN with the
    reason where the test split holds one class ("skipped")."""
    aurocs, skipped = auroc_per_label(y_test, scores, labels)
    rows = []
    for j, name in enumerate(labels):
        if name in skipped:
            status, auc = f"skipped: {skipped[name]}", np.nan
        elif name in constant:
            status, auc = f"chance: {constant[name]}", 0.5
        else:
            status, auc = "scored", aurocs[name]
        rows.append({"encoder": encoder, "fraction": fraction, "seed": seed, "C": C, "label": name, "auroc": auc,
                     "status": status, "train images": train_images, "train positives": int(np.nansum(y_train[:, j])),
                     "test positives": int(np.nansum(y_test[:, j]))})
    return rows


def _mean_with_chance(res: ProbeResult, y_true: np.ndarray, labels: Sequence[str]) -> float:
    """Mean AUROC over the labels scorable on ``y_true`` (constant-score labels count as 0.5)."""
    aurocs, _ = auroc_per_label(y_true, res.scores, labels)
    for name in res.constant:
        if name in aurocs:
            aurocs[name] = 0.5
    return float(np.mean(list(aurocs.values()))) if aurocs else np.nan


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean AUROC over labels per (encoder, fraction, seed), then mean and s.d. over seeds: one row per
    (encoder, fraction) with ``mean AUROC``, ``sd over seeds``, ``seeds``, ``labels scored``, ``labels at chance``."""
    scored = results.dropna(subset=["auroc"])
    per_seed = scored.groupby(["encoder", "fraction", "seed"], sort=False).agg(
        mean_auroc=("auroc", "mean"), labels=("label", "count"),
        chance=("status", lambda s: int(s.str.startswith("chance").sum()))).reset_index()
    out = per_seed.groupby(["encoder", "fraction"], sort=False).agg(
        **{"mean AUROC": ("mean_auroc", "mean"), "sd over seeds": ("mean_auroc", "std"), "seeds": ("seed", "count"),
           "labels scored": ("labels", "first"), "labels at chance (mean)": ("chance", "mean")}).reset_index()
    return out
