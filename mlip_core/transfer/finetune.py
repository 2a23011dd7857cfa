"""Full fine-tuning classification transfer (tower + linear head, everything trained), and multi-class tasks
(COVIDx) for both fine-tuning and the linear probe.

    task = offline_world_task(world)                                    # or chexpert_task(root), covidx_task(root)
    masks = fraction_masks(task.split("train"), splits_dir, "world")    # the probe's very same label fractions
    res = finetune_sweep([encoder_from_export("mlip", path)], task, masks, cache_root, steps=200, batch_size=32)
    summarise(res)                                                      # classify.summarise works on it
    sweep_results(res, task.name)                                       # method, task, fraction, seed, metric, value

Protocol here
-------------
The image tower of an :class:`~mlip_core.transfer.classify.Encoder` (exported pretraining weights, ImageNet or
random init; a pretraining-time ``frozen_stages`` is undone, every weight trains) gets a fresh linear layer on its
global feature vector. Tower and head train together with AdamW (decay on weight matrices only, as the
pretraining trainer's :func:`~mlip_core.optim.param_groups`) and a linear warm-up + cosine schedule, for a fixed
number of steps on the labelled training subset of one (fraction, seed) of :func:`fraction_masks`, with the
augmenting :func:`~mlip_core.data.transforms.train_transform` (random resized crop, small affine,
brightness/contrast; no flip). Multi-label tasks use binary cross-entropy with logits, masked where a label is NaN
(unlabelled for that image, e.g. CheXpert U-Ignore); scores are AUROC per label and their macro mean, and a label
with a single class in the training subset scores a constant (chance, 0.5), exactly as the linear probe
(:func:`~mlip_core.transfer.classify.probe_sweep`). Multi-class tasks (:class:`MulticlassTask`, COVIDx) use
cross-entropy; scores are accuracy and one-vs-rest AUROC per class with their macro mean. Images are decoded once
into the uint8 :func:`~mlip_core.transfer.classify.image_cache` at the tower's input size. One seed fixes the
head's initialisation, the batch order, the augmentation draws and dropout: on CPU the same seed twice gives the
same scores.

What the papers do
------------------
* **ConVIRT** (Zhang et al., arXiv 2010.00747) reports two classification settings on RSNA, CheXpert, COVIDx and
  MURA at 1% / 10% / 100% of the labels: *linear* (frozen encoder, linear layer) and *fine-tuning* (the whole
  ResNet-50 and the linear layer trained). It has no official code; its optimiser settings could not be checked
  offline and are not restated here.
* **GLoRIA** (Huang et al., ICCV 2021; marshuang80/gloria) fine-tunes end to end ("end_to_end" configs):
  ``configs/chexpert_classification/end_to_end/chexpert_gloria_pretrain_config.yaml`` (commit dfd61a8) sets
  ``freeze_cnn: false`` (l. 32), Adam (l. 52) with ``lr: 1e-4`` (l. 10) and ``weight_decay: 1e-6`` (l. 53),
  ``batch_size: 64`` (l. 47), ``max_epochs: 50`` (l. 7), gradient clipping 0.25 (l. 9), fp16 (l. 11), a
  reduce-on-plateau schedule (l. 55), early stopping on validation loss with patience 5 (l. 21), images resized
  to 256 and randomly cropped to 224 (ll. 39-44), BCE loss (l. 50).
* **MGCA** (Wang et al., NeurIPS 2022; HKU-MedAI/MGCA) calls its classifier a "finetuner", but it trains a
  *linear layer on a frozen backbone* (its README names the setting "Linear classification"):
  ``mgca/models/ssl_finetuner.py`` (commit 4075a69) sets ``requires_grad = False`` on every backbone parameter
  (ll. 43-45), computes the features under ``torch.no_grad()`` (ll. 99-100), and optimises only the linear layer
  with AdamW, ``learning_rate = 5e-4`` and ``weight_decay = 1e-6`` (ll. 18-19, 114-120), BCE for CheXpert / RSNA
  and cross-entropy for COVIDx (ll. 105-110); ``mgca/models/mgca/mgca_finetuner.py`` (commit 01e2630) sets batch
  size 48 (l. 33), 50 epochs (l. 41), ``Moco2Transform`` for CheXpert and ``DataTransforms`` (random crop 224) for
  RSNA / COVIDx (ll. 45-64; ``num_classes = 3``, ``multilabel = False`` for COVIDx) and early stopping on
  validation loss with patience 10 (ll. 93-94). ``mgca/models/convirt/convirt_finetuner.py`` runs ConVIRT's
  evaluation through the same linear ``SSLFineTuner``.
* **MLIP** (Li et al., CVPR 2024) reports classification on CheXpert, RSNA and COVIDx at 1% / 10% / 100% labels
  following MGCA's protocol, i.e. (per MGCA's code above) a linear layer on the frozen image encoder, which is
  :mod:`mlip_core.transfer.classify`'s probe. MLIP's own training code could not be checked offline.

So the comparison with the papers' *classification tables* is the linear probe; this module adds the end-to-end
setting (ConVIRT's "fine-tuning", GLoRIA's "end_to_end").

Differences from the papers (CPU budget)
----------------------------------------
A fixed number of steps (tens to hundreds, not 50 epochs), no early stopping or best-checkpoint selection on the
validation split, no plateau schedule (warm-up + cosine instead), AdamW with one learning rate for tower and head,
no gradient clipping, fp32, the book's small towers (ResNet-18, EfficientNet-lite0) at the pretraining image size
(32-64 px in the offline profiles, not 224 crops of 256), single-channel input, and our augmentation (no
horizontal flip: laterality is part of the labels' meaning). Labels with one class in the training subset are
scored at chance (MGCA's torchmetrics AUROC would fail or warn on them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from mlip_core.data.cache import ImageCache
from mlip_core.data.downstream import COVIDX_2, COVIDX_3, holdout_split, load_covidx
from mlip_core.data.skips import SkipReport
from mlip_core.data.transforms import eval_transform, train_transform
from mlip_core.optim import cosine_lr_factor, param_groups
from mlip_core.transfer.classify import (
    ClassificationTask,
    Encoder,
    ProbeResult,
    _mean_with_chance,
    auroc_per_label,
    build_tower,
    image_cache,
    label_rows,
)

__all__ = [
    "FinetuneModel",
    "FinetuneResult",
    "MulticlassTask",
    "covidx_task",
    "finetune",
    "finetune_sweep",
    "linear_probe_multiclass",
    "masked_bce_with_logits",
    "multiclass_metrics",
    "multiclass_probe_sweep",
    "sweep_results",
]


# ------------------------------------------------------------------------------------------------------------
# Multi-class tasks
@dataclass
class MulticlassTask:
    """One class per image. ``df``: image_path, group (patient), split in train/validate/test, label (class
    name), label_index (int into ``classes``); ``skips`` what was left out."""

    name: str
    df: pd.DataFrame
    classes: list[str]
    skips: SkipReport

    @property
    def labels(self) -> list[str]:
        """The classes (what the result tables list per row, as a :class:`ClassificationTask`'s labels)."""
        return list(self.classes)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (index kept: positions into ``df``)."""
        return self.df[self.df["split"] == name]

    def one_hot(self) -> np.ndarray:
        """(N, K) float 0/1 targets of every row."""
        return np.eye(len(self.classes), dtype=np.float64)[self.df["label_index"].to_numpy(dtype=int)]


def covidx_task(root: Path | str, val_frac: float = 0.1, seed: int = 0, check_files: bool = True) -> MulticlassTask:
    """COVIDx: ``train.txt`` / ``val.txt`` / ``test.txt`` (:func:`load_covidx`). Releases without ``val.txt``
    (COVIDx CXR-2) get a validation split drawn by patient from train (``val_frac``, seeded). The classes are
    the release's set (normal / pneumonia / COVID-19, or negative / positive)."""
    root = Path(root)
    train, skips = load_covidx(root, "train", check_files=check_files)
    test, test_skips = load_covidx(root, "test", check_files=check_files)
    skips.extend(test_skips)
    if (root / "val.txt").is_file():
        val, val_skips = load_covidx(root, "val", check_files=check_files)
        skips.extend(val_skips)
        train = train.assign(split="train")
        val = val.assign(split="validate")
    else:
        split = holdout_split(train, "patient_id", val_frac=val_frac, test_frac=0.0, seed=seed)
        train = train.assign(split=split.replace({"valid": "validate"}).to_numpy())
        val = train.iloc[:0]
    df = pd.concat([train, val, test.assign(split="test")], ignore_index=True).rename(columns={"patient_id": "group"})
    df["group"] = df["group"].astype(str)
    sets = [set(d["label"]) for d in (train, test) if len(d)]
    classes = COVIDX_2 if all(s <= set(COVIDX_2) for s in sets) and sets else COVIDX_3
    if not set(df["label"]) <= set(classes):
        raise ValueError(f"{root}: train and test use different COVIDx label sets ({sorted(set(df['label']))}); "
                         "use the split files of one release")
    df["label_index"] = [classes.index(c) for c in df["label"]]
    return MulticlassTask("COVIDx", df, list(classes), skips)


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
                       ) -> tuple[dict[str, float], dict[str, str]]:
    """Accuracy (argmax), one-vs-rest AUROC per class ``"AUROC <class>"`` and their mean ``"macro_AUROC"`` from
    integer targets (N,) and class scores (N, K). A class absent from (or alone in) the test rows has no AUROC:
    it is returned in ``skipped`` with the reason (the macro is over the scored classes)."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    out = {"accuracy": float((probs.argmax(1) == y_true).mean()) if len(y_true) else np.nan}
    aurocs, skipped = auroc_per_label(np.eye(len(classes))[y_true], probs, classes)
    out.update({f"AUROC {c}": v for c, v in aurocs.items()})
    out["macro_AUROC"] = float(np.mean(list(aurocs.values()))) if aurocs else np.nan
    return out, skipped


# ------------------------------------------------------------------------------------------------------------
# Linear probe for multi-class tasks (features from classify.encoder_features)
def linear_probe_multiclass(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                            C: float = 0.1, seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """A standardised multinomial L2 logistic regression (lbfgs) on (N, D) features and integer targets (N,);
    test class probabilities (N_test, K). Classes absent from the training rows get probability 0 and are listed
    in ``constant`` (their one-vs-rest AUROC is scored at chance); a single training class predicts itself."""
    y_train = np.asarray(y_train, dtype=int)
    seen = np.unique(y_train)
    constant = {int(k): f"absent from the training subset ({len(y_train)} images)" for k in range(n_classes)
                if k not in seen}
    scores = np.zeros((len(x_test), n_classes), dtype=np.float64)
    if len(seen) == 1:
        scores[:, seen[0]] = 1.0
        constant[int(seen[0])] = f"the training subset has only this class ({len(y_train)} images)"
        return ProbeResult(scores, constant)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(x_train, y_train)
    scores[:, clf.classes_] = clf.predict_proba(x_test)
    return ProbeResult(scores, constant)


def _named_constant(constant: Mapping, classes: Sequence[str]) -> dict[str, str]:
    return {classes[k] if isinstance(k, (int, np.integer)) else k: v for k, v in constant.items()}


def _class_rows(encoder: str, fraction: float, seed: int, C: float, classes: Sequence[str], y_train: np.ndarray,
                y_test: np.ndarray, scores: np.ndarray, constant: Mapping[str, str]) -> list[dict]:
    """probe_sweep-shaped rows (one per class, one-vs-rest AUROC) plus an ``accuracy`` column."""
    metrics, skipped = multiclass_metrics(y_test, scores, classes)
    rows = []
    for k, name in enumerate(classes):
        if name in skipped:
            status, auc = f"skipped: {skipped[name]}", np.nan
        elif name in constant:
            status, auc = f"chance: {constant[name]}", 0.5
        else:
            status, auc = "scored", metrics[f"AUROC {name}"]
        rows.append({"encoder": encoder, "fraction": fraction, "seed": seed, "C": C, "label": name, "auroc": auc,
                     "status": status, "train images": len(y_train), "train positives": int((y_train == k).sum()),
                     "test positives": int((y_test == k).sum()), "accuracy": metrics["accuracy"]})
    return rows


def multiclass_probe_sweep(features: np.ndarray, task: MulticlassTask, masks: dict[tuple[float, int], np.ndarray],
                           Cs: Sequence[float] = (0.1,), encoder: str = "", max_iter: int = 1000) -> pd.DataFrame:
    """:func:`~mlip_core.transfer.classify.probe_sweep` for a multi-class task: one row per class (one-vs-rest
    AUROC, same columns, so :func:`summarise` gives the macro AUROC) plus an ``accuracy`` column. With several
    ``Cs`` the one with the best validation accuracy is used on test."""
    df, classes = task.df, task.classes
    split = df["split"].to_numpy()
    train_idx, val_idx, test_idx = (np.flatnonzero(split == s) for s in ("train", "validate", "test"))
    y_all = df["label_index"].to_numpy(dtype=int)
    rows: list[dict] = []
    for (fraction, seed), mask in sorted(masks.items()):
        tr = train_idx[mask]
        best_c = float(Cs[0])
        if len(Cs) > 1 and len(val_idx):
            accs = [(linear_probe_multiclass(features[tr], y_all[tr], features[val_idx], len(classes), C=c, seed=seed,
                                             max_iter=max_iter).scores.argmax(1) == y_all[val_idx]).mean() for c in Cs]
            best_c = float(Cs[int(np.argmax(accs))])
        res = linear_probe_multiclass(features[tr], y_all[tr], features[test_idx], len(classes), C=best_c, seed=seed,
                                      max_iter=max_iter)
        rows += _class_rows(encoder, fraction, seed, best_c, classes, y_all[tr], y_all[test_idx], res.scores,
                            _named_constant(res.constant, classes))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------
# Fine-tuning
class FinetuneModel(nn.Module):
    """An image tower with a linear layer on its global feature: (B, 1, S, S) -> (B, C) logits."""

    def __init__(self, tower: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.image_tower = tower
        self.head = nn.Linear(tower.global_dim, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.image_tower(x).global_)


@dataclass
class FinetuneResult:
    """Scores of a fine-tuned model on one split: ``scores`` (N_eval, C) probabilities (sigmoid per label, or
    softmax over classes) for the rows ``index`` (positions into ``task.df``; undecodable images left out),
    ``targets`` (N_eval, C) 0/1 with NaN (multi-label) or (N_eval,) class indices (multi-class), ``constant`` the
    labels / classes scored at chance (single class in, or absent from, the training subset), the training loss
    per step, and timing. ``model`` is the fine-tuned model (eval mode, on CPU)."""

    scores: np.ndarray
    index: np.ndarray
    targets: np.ndarray
    constant: dict[str, str]
    kind: str
    losses: list[float]
    steps: int
    train_images: int
    seconds: float
    seconds_per_step: float
    model: nn.Module | None = field(default=None, repr=False)

    def metrics(self, labels: Sequence[str]) -> dict[str, float]:
        """``"AUROC <label>"`` per scored label, ``"macro_AUROC"`` (chance labels at 0.5, as the probe's
        validation mean) and, for multi-class, ``"accuracy"``."""
        if self.kind == "multiclass":
            out, _ = multiclass_metrics(self.targets, self.scores, labels)
            for name in self.constant:
                if f"AUROC {name}" in out:
                    out[f"AUROC {name}"] = 0.5
            per = [v for k, v in out.items() if k.startswith("AUROC ")]
            out["macro_AUROC"] = float(np.mean(per)) if per else np.nan
            return out
        aurocs, _ = auroc_per_label(self.targets, self.scores, labels)
        out = {f"AUROC {k}": (0.5 if k in self.constant else v) for k, v in aurocs.items()}
        out["macro_AUROC"] = _mean_with_chance(self, self.targets, labels)
        return out


def masked_bce_with_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over the entries whose target is not NaN (NaN = unlabelled: no loss, no
    gradient). The NaN targets are replaced before the loss (0 * NaN would still be NaN), then masked out."""
    known = ~torch.isnan(targets)
    safe = torch.where(known, targets, torch.zeros_like(targets))
    per = F.binary_cross_entropy_with_logits(logits, safe, reduction="none")
    per = torch.where(known, per, torch.zeros_like(per))
    return per.sum() / known.sum().clamp(min=1)


def _image_array(images: ImageCache | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, S, S), valid (N,)) from an image cache or a plain array (every image valid)."""
    if isinstance(images, ImageCache):
        return images.array, np.asarray(images.valid, dtype=bool)
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 (N, S, S) array or an ImageCache, got {arr.dtype} {arr.shape}")
    return arr, np.ones(len(arr), dtype=bool)


def _batch(arr: np.ndarray, idx: np.ndarray, transform) -> Tensor:
    return torch.stack([transform(np.array(arr[i])) for i in idx])


@torch.inference_mode()
def _predict(model: nn.Module, arr: np.ndarray, idx: np.ndarray, size: int, batch_size: int,
             device: torch.device | str) -> np.ndarray:
    """Logits (len(idx), C) under the evaluation transform."""
    model.eval()
    tf = eval_transform(size)
    out = [model(_batch(arr, idx[s:s + batch_size], tf).to(device)).float().cpu()
           for s in range(0, len(idx), batch_size)]
    n_out = model.head.out_features
    return torch.cat(out).numpy() if out else np.zeros((0, n_out), dtype=np.float32)


def _steps_for(n_train: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs=")
    if steps is not None:
        return int(steps)
    return max(1, int(np.ceil(float(epochs) * n_train / batch_size)))


def finetune(encoder: Encoder, images: ImageCache | np.ndarray, task: ClassificationTask | MulticlassTask,
             train_mask: np.ndarray | None = None, *, steps: int | None = None, epochs: float | None = None,
             batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 1e-6, warmup_ratio: float = 0.1,
             seed: int = 0, device: torch.device | str = "cpu", augment: bool = True, eval_split: str = "test",
             eval_batch_size: int = 64, keep_model: bool = True, progress: bool = False) -> FinetuneResult:
    """Fine-tune ``encoder``'s tower and a new linear head on ``task``'s training rows, score ``eval_split``.

    ``images``: the uint8 images of every row of ``task.df`` at ``encoder.image_size`` (an
    :func:`image_cache` of ``task.df["image_path"]`` or an (N, S, S) array). ``train_mask``: bool over the
    training split's rows (a :func:`fraction_masks` entry; None = all). Train for ``steps`` optimiser steps or
    ``epochs`` passes over the training subset; every batch holds ``min(batch_size, train images)`` images (the
    order runs on across epoch boundaries, so no batch is ragged). See the module docstring for the protocol."""
    if encoder.kind != "tower":
        raise ValueError(f"encoder {encoder.name!r} is {encoder.kind!r}: only a tower can be fine-tuned")
    multiclass = isinstance(task, MulticlassTask)
    arr, valid = _image_array(images)
    if len(arr) != len(task.df):
        raise ValueError(f"{len(arr)} images for {len(task.df)} task rows; build the cache from task.df['image_path']")
    size = int(arr.shape[-1])
    if size != encoder.image_size:
        raise ValueError(f"images are {size} px but {encoder.name!r} takes {encoder.image_size} px")
    split = task.df["split"].to_numpy()
    train_idx = np.flatnonzero(split == "train")
    if train_mask is not None:
        train_mask = np.asarray(train_mask, dtype=bool)
        if len(train_mask) != len(train_idx):
            raise ValueError(f"train_mask has {len(train_mask)} entries for {len(train_idx)} training rows")
        train_idx = train_idx[train_mask]
    train_idx = train_idx[valid[train_idx]]
    eval_idx = np.flatnonzero((split == eval_split) & valid)
    if len(train_idx) < 2:
        raise ValueError(f"{len(train_idx)} decodable training images: fine-tuning (BatchNorm) needs at least 2")
    labels = task.labels
    if multiclass:
        y_all = task.df["label_index"].to_numpy(dtype=np.int64)
        y_train_np = y_all[train_idx]
        seen = set(np.unique(y_train_np).tolist())
        constant = {c: f"absent from the training subset ({len(train_idx)} images)"
                    for k, c in enumerate(labels) if k not in seen}
    else:
        y_all = task.df[labels].to_numpy(dtype=np.float32)
        y_train_np = y_all[train_idx]
        constant = {}
        for j, name in enumerate(labels):
            y = y_train_np[~np.isnan(y_train_np[:, j]), j]
            if len(y) == 0:
                constant[name] = "no labelled image in the training subset"
            elif len(np.unique(y)) < 2:
                constant[name] = (f"training subset has only {'negatives' if y.sum() == 0 else 'positives'} "
                                  f"({len(y)} images)")
    total = _steps_for(len(train_idx), batch_size, steps, epochs)
    bs = min(batch_size, len(train_idx))
    device = torch.device(device)
    # Every weight trains: a pretraining-time frozen_stages does not carry over to fine-tuning.
    tower_cfg = {**(encoder.tower or {}), "frozen_stages": 0}
    tower = build_tower(dataclasses.replace(encoder, tower=tower_cfg))

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = FinetuneModel(tower, len(labels)).to(device)
        opt = torch.optim.AdamW(param_groups(model, weight_decay, lr), lr=lr)
        warmup = int(round(warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(cosine_lr_factor, total_steps=total, warmup_steps=warmup, min_ratio=0.0))
        tf = train_transform(size) if augment else eval_transform(size)
        rng = np.random.default_rng(seed)
        order = np.zeros(0, dtype=np.int64)
        losses: list[float] = []
        model.train()
        it = range(total)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"fine-tune {encoder.name}", leave=False)
        for _ in it:
            while len(order) < bs:
                order = np.concatenate([order, rng.permutation(len(train_idx))])
            pick, order = order[:bs], order[bs:]
            rows = train_idx[pick]
            x = _batch(arr, rows, tf).to(device)
            logits = model(x)
            if multiclass:
                loss = F.cross_entropy(logits, torch.as_tensor(y_all[rows], device=device))
            else:
                loss = masked_bce_with_logits(logits, torch.as_tensor(y_all[rows], device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        train_s = time.perf_counter() - t0
        logits = _predict(model, arr, eval_idx, size, eval_batch_size, device)
    z = torch.from_numpy(logits).double()
    if multiclass:
        scores = torch.softmax(z, dim=1).numpy()
        targets = y_all[eval_idx]
    else:
        scores = torch.sigmoid(z).numpy()
        targets = y_all[eval_idx].astype(np.float64)
        for j, name in enumerate(labels):  # a label with one training class: constant score, as the probe
            if name in constant:
                y = y_train_np[~np.isnan(y_train_np[:, j]), j]
                scores[:, j] = float(y.mean()) if len(y) else 0.0
    return FinetuneResult(scores=np.asarray(scores, dtype=np.float64), index=eval_idx, targets=targets,
                          constant=constant, kind="multiclass" if multiclass else "multilabel", losses=losses,
                          steps=total, train_images=len(train_idx), seconds=time.perf_counter() - t0,
                          seconds_per_step=train_s / total, model=model.cpu().eval() if keep_model else None)


def _caches(images: Path | str | os.PathLike | Mapping[int, ImageCache | np.ndarray], sizes: set[int],
            paths: list[str], progress: bool) -> dict[int, ImageCache | np.ndarray]:
    if isinstance(images, Mapping):
        missing = sorted(sizes - set(images))
        if missing:
            raise ValueError(f"no images at size(s) {missing}; pass a cache per encoder image size or a cache root")
        return dict(images)
    return {s: image_cache(paths, s, images, progress=progress) for s in sorted(sizes)}


def finetune_sweep(encoders: Sequence[Encoder], task: ClassificationTask | MulticlassTask,
                   masks: dict[tuple[float, int], np.ndarray],
                   images: Path | str | os.PathLike | Mapping[int, ImageCache | np.ndarray], *,
                   steps: int | None = None, epochs: float | None = None, batch_size: int = 32, lr: float = 1e-4,
                   weight_decay: float = 1e-6, warmup_ratio: float = 0.1, augment: bool = True,
                   device: torch.device | str = "cpu", progress: bool = False) -> pd.DataFrame:
    """Fine-tune every encoder on every (fraction, seed) training subset of ``masks``; one row per label (per
    class for a multi-class task), with :func:`probe_sweep`'s columns (encoder, fraction, seed, C (NaN: no C
    here), label, auroc, status, train images, train/test positives) plus steps, lr, seconds per step and, for
    a multi-class task, accuracy. The mask's seed also seeds the fine-tuning. ``images``: a cache root (caches
    built at each encoder's size) or {image size: cache or uint8 array}."""
    paths = task.df["image_path"].astype(str).tolist()
    caches = _caches(images, {e.image_size for e in encoders}, paths, progress)
    multiclass = isinstance(task, MulticlassTask)
    labels = task.labels
    split = task.df["split"].to_numpy()
    rows: list[dict] = []
    for enc in encoders:
        for (fraction, seed), mask in sorted(masks.items()):
            res = finetune(enc, caches[enc.image_size], task, mask, steps=steps, epochs=epochs,
                           batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                           seed=seed, device=device, augment=augment, keep_model=False, progress=progress)
            extra = {"steps": res.steps, "lr": lr, "s/step": round(res.seconds_per_step, 4)}
            tr = np.flatnonzero(split == "train")[mask]
            if multiclass:
                y = task.df["label_index"].to_numpy(dtype=int)
                part = _class_rows(enc.name, fraction, seed, np.nan, labels, y[tr], res.targets, res.scores,
                                   res.constant)
                rows += [{**r, "train images": res.train_images, **extra} for r in part]
                continue
            y_tr = task.df[labels].to_numpy(dtype=np.float64)[tr]
            rows += [{**r, **extra} for r in label_rows(enc.name, fraction, seed, np.nan, labels, y_tr, res.targets,
                                                        res.scores, res.constant, train_images=res.train_images)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------
# Long results format
def sweep_results(sweep: pd.DataFrame, task: str, method_col: str = "encoder") -> pd.DataFrame:
    """A probe / fine-tune sweep as result rows (``mlip_core.results``): method, task, fraction, seed, metric,
    value. Metrics: ``"AUROC <label>"`` for every label with an AUROC (chance labels at 0.5; skipped labels have
    no row), ``"macro_AUROC"`` (their mean, what :func:`summarise` averages) and ``"accuracy"`` when the sweep
    has that column (multi-class tasks)."""
    out: list[dict] = []
    for (method, fraction, seed), g in sweep.groupby([method_col, "fraction", "seed"], sort=False):
        base = {"method": method, "task": task, "fraction": float(fraction), "seed": int(seed)}
        scored = g.dropna(subset=["auroc"])
        out += [{**base, "metric": f"AUROC {r.label}", "value": float(r.auroc)} for r in scored.itertuples()]
        out.append({**base, "metric": "macro_AUROC", "value": float(scored["auroc"].mean()) if len(scored) else np.nan})
        if "accuracy" in g.columns:
            out.append({**base, "metric": "accuracy", "value": float(g["accuracy"].iloc[0])})
    return pd.DataFrame(out, columns=["method", "task", "fraction", "seed", "metric", "value"])
