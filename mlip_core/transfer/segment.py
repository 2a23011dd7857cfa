"""Semantic-segmentation transfer (the SIIM-ACR pneumothorax protocol of MGCA / MLIP): a U-Net on the pretrained
image tower, trained with 1% / 10% / 100% of the training images, Dice on the test split.

Protocol as MGCA's code runs it (HKU-MedAI/MGCA at commit 4075a69; file:line):

- Model: ``smp.Unet("resnet50", encoder_weights=None, activation=None)`` with the pretrained image encoder's
  weights loaded into ``seg_model.encoder`` (``mgca/models/mgca/mgca_segmenter.py:77-92``), smp's default
  decoder channels (256, 128, 64, 32, 16).
- Frozen encoder: ``param.requires_grad = False`` for every encoder parameter (``mgca_segmenter.py:93-95``);
  only decoder and head learn.
- Loss: ``MixedLoss(alpha=10)`` (``mgca/models/ssl_segmenter.py:26``) = ``10 * focal(gamma=2) - log(soft
  Dice)`` (``mgca/utils/segmentation_loss.py:79-90``); the focal term is per-pixel sigmoid focal loss without
  alpha weighting, averaged (``segmentation_loss.py:55-76``); the soft Dice pools every pixel of the batch,
  smooth 1 (``segmentation_loss.py:7-24``).
- Dice metric: threshold sigmoid at 0.5; per image, ``2|P∩T| / (|P|+|T|)`` when the mask has foreground,
  and 1 if the prediction is empty else 0 when it has none; mean over the images of a batch
  (``ssl_segmenter.py:99-121``), then mean of the batch means over the test loader (``ssl_segmenter.py:81-88``).
- Optimiser: AdamW, betas (0.9, 0.999) (``ssl_segmenter.py:123-129``), lr 5e-4 (``run_seg_finetune.sh:1-3``),
  weight decay 0.05 (the CLI default, ``mgca_segmenter.py:38``, passed on at ``:97``), batch size 8
  (``mgca_segmenter.py:35``), 50 epochs (``:44``) with early stopping on validation loss, patience 10, and the
  best checkpoint tested.
- Data: images and masks resized to 224; the training split keeps every positive image plus as many negatives
  drawn at random (``mgca/datasets/segmentation_dataset.py:41-53``), then a fraction of those images
  (``:55-61``); training augmentation ``ShiftScaleRotate(scale 0.1, rotate 10, p=0.5)`` (``:136-149``).

What we do differently, and why:

- The U-Net is ``smp.Unet("tu-<timm name>", in_channels=1)``: smp's timm-universal encoder builds the very timm
  model of our :class:`~mlip_core.model.encoders.ImageTower` with ``features_only=True``, so the tower's
  one-channel weights load into it tensor for tensor (:func:`load_tower_weights` checks names and shapes and
  fails if any encoder tensor is left at its initial value); no adapter is needed.
- ``mode="frozen"`` (MGCA) additionally keeps the encoder's BatchNorm statistics fixed (MGCA's Lightning module
  is in train mode, so its "frozen" encoder still updates BatchNorm running statistics). Fixed statistics make
  the encoder a function of the image, so its multi-scale features are computed once per (encoder, images),
  stored as float16 (:func:`unet_encoder_features`, in memory or under ``feature_cache_dir``), and only the
  decoder trains on them: every fraction and seed then costs decoder time only. ``mode="finetune"`` trains
  everything (not in MGCA's segmentation code).
- Decoder channels default to (64, 32, 16, 16, 8): a light decoder for 64-96 px on CPU; pass
  ``decoder_channels=(256, 128, 64, 32, 16)`` for MGCA's.
- A fixed number of optimiser steps on seeded batches, no validation split, no early stopping; no augmentation
  (in frozen mode the cached features are of the unaugmented images; horizontal flips would also swap the
  laterality that reports describe, see :mod:`mlip_core.data.transforms`).
- The Dice is the mean over all test images (MGCA's mean of batch means equals it when every batch is full).
- Fractions are nested (1% inside 10% inside 100%, :func:`fraction_subsets` reuses
  :func:`mlip_core.transfer.classify.fraction_masks`); MGCA draws each fraction independently. Balancing
  negatives to positives as MGCA does is optional (``balance=True`` in :func:`segmentation_sweep`).
- Images are padded to a square (``resize_uint8(..., "pad")``, as every reader here) at ``image_size``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mlip_core.checkpoint import atomic_write
from mlip_core.data.cache import cache_key
from mlip_core.data.downstream import siim_mask
from mlip_core.data.images import ImageReadError, read_image, resize_uint8
from mlip_core.data.skips import SkipReport
from mlip_core.data.transforms import MEAN, STD
from mlip_core.model.encoders import ImageTower, to_weight_statistics
from mlip_core.transfer.classify import Encoder, build_tower, fraction_masks

__all__ = [
    "DEFAULT_DECODER_CHANNELS",
    "MODES",
    "SegmentationData",
    "balanced_train",
    "build_unet",
    "cached_feature_maps",
    "dice_per_image",
    "dice_score",
    "fraction_subsets",
    "load_tower_weights",
    "mixed_loss",
    "segmentation_data",
    "segmentation_sweep",
    "to_input",
    "train_segmentation",
    "unet_encoder_features",
    # shared with mlip_core.transfer.detect
    "decode_cache_path",
    "freeze",
    "images_key",
    "progress_bar",
    "run_decode",
    "save_npz",
    "seeded_batches",
    "split_positions",
    "tower_name",
]

MODES = ("frozen", "finetune")
DEFAULT_DECODER_CHANNELS = (64, 32, 16, 16, 8)


# ------------------------------------------------------------------------------------------------------------
# Metric and loss
def dice_per_image(pred: np.ndarray | Tensor, true: np.ndarray | Tensor) -> np.ndarray:
    """Dice of each binary mask pair, (N, H, W) or (H, W) -> float64 (N,), as MGCA scores SIIM.

    A mask with foreground scores ``2|P∩T| / (|P|+|T|)``; an empty true mask scores 1 when the prediction is
    empty too, else 0 (MGCA ``ssl_segmenter.py:99-121``). Inputs are booleans or 0/1 values."""
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, Tensor) else pred) > 0.5
    t = torch.as_tensor(np.asarray(true) if not isinstance(true, Tensor) else true) > 0.5
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    if p.ndim == 2:
        p, t = p[None], t[None]
    p, t = p.reshape(len(p), -1).double(), t.reshape(len(t), -1).double()
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    positive = t.sum(1) > 0
    dice = torch.where(positive, 2 * inter / total.clamp_min(1), (p.sum(1) == 0).double())
    return dice.numpy()


def dice_score(pred: np.ndarray | Tensor, true: np.ndarray | Tensor) -> float:
    """Mean of :func:`dice_per_image` over the images (both masks empty count as 1)."""
    return float(dice_per_image(pred, true).mean())


def mixed_loss(logits: Tensor, target: Tensor, alpha: float = 10.0, gamma: float = 2.0) -> Tensor:
    """MGCA's ``MixedLoss``: ``alpha * focal(gamma) - log(soft Dice)``; logits and 0/1 targets (B, 1, H, W).

    The focal term is torchvision's sigmoid focal loss with no alpha weighting, which is MGCA's FocalLoss
    written another way; the soft Dice pools the whole batch with smooth 1 (``segmentation_loss.py:7-24``)."""
    from torchvision.ops import sigmoid_focal_loss

    focal = sigmoid_focal_loss(logits, target, alpha=-1, gamma=gamma, reduction="mean")
    p = torch.sigmoid(logits).reshape(-1)
    t = target.reshape(-1)
    soft_dice = (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return alpha * focal - torch.log(soft_dice)


# ------------------------------------------------------------------------------------------------------------
# Data: decode every image once, masks in the same geometry
@dataclass
class SegmentationData:
    """Decoded SIIM images: ``images`` uint8 (N, S, S), ``masks`` uint8 (N, S, S) in {0, 1}, ``df`` the rows kept
    (aligned with the arrays), ``skips`` the rows whose image could not be decoded."""

    images: np.ndarray
    masks: np.ndarray
    df: pd.DataFrame
    skips: SkipReport

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def _decode_siim(job: tuple[str, list[str], int]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Worker: (path, rles, size) -> (image, mask, error); the geometry of :class:`SegmentationDataset`."""
    path, rles, size = job
    try:
        full = read_image(path)
    except ImageReadError as exc:
        return None, None, str(exc)
    mask = siim_mask(rles, *full.shape) * 255
    return resize_uint8(full, size), (resize_uint8(mask, size) >= 128).astype(np.uint8), ""


def run_decode(jobs: list, worker: Callable, num_workers: int = 0, progress: bool = False, desc: str = "decoding"):
    """``worker`` over ``jobs`` in order, in ``num_workers`` processes (0: here), with an optional progress bar."""
    if num_workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            results = pool.map(worker, jobs, chunksize=max(1, min(32, len(jobs) // (4 * num_workers) or 1)))
            return list(progress_bar(results, progress, len(jobs), desc))
    return list(progress_bar(map(worker, jobs), progress, len(jobs), desc))


def progress_bar(it, on: bool, total: int, desc: str):
    """``it`` wrapped in a tqdm.auto bar when ``on``, else ``it`` itself."""
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


def decode_cache_path(cache_dir: Path | str, task: str, paths: Sequence[str], size: int, annotations: object) -> Path:
    """Where a decoded array set lives: keyed on every file's path/size/mtime, the size and the annotations."""
    key = cache_key(paths, size, "pad")
    ann = hashlib.sha1(json.dumps(annotations, default=str).encode()).hexdigest()
    return Path(cache_dir) / f"{task}_{size}px_{hashlib.sha1((key + ann).encode()).hexdigest()[:16]}.npz"


def segmentation_data(df: pd.DataFrame, image_size: int, cache_dir: Path | str | None = None, num_workers: int = 0,
                      progress: bool = False) -> SegmentationData:
    """Decode a :func:`~mlip_core.data.downstream.load_siim` table (image_path, rles) once into memory.

    Images go through ``read_image`` then ``resize_uint8(..., pad)``; masks are the union of the RLEs at the
    original size resized the same way and thresholded at half, exactly as
    :class:`~mlip_core.data.downstream.SegmentationDataset` does. With ``cache_dir`` the arrays are also saved
    (``.npz``, keyed on the files and the RLEs) and reused by the next call. Undecodable images are skipped and
    counted."""
    df = df.reset_index(drop=True)
    paths = [str(p) for p in df["image_path"]]
    rles = [list(r) for r in df["rles"]]
    path = decode_cache_path(cache_dir, "siim", paths, image_size, rles) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            images, masks, valid, errors = z["images"], z["masks"], z["valid"], list(z["errors"])
    else:
        results = run_decode([(p, r, int(image_size)) for p, r in zip(paths, rles)], _decode_siim, num_workers,
                             progress, "decoding SIIM")
        valid = np.array([img is not None for img, _, _ in results], dtype=bool)
        empty = np.zeros((image_size, image_size), dtype=np.uint8)
        images = np.stack([img for img, _, _ in results if img is not None] or [empty])[: int(valid.sum())]
        masks = np.stack([m for _, m, _ in results if m is not None] or [empty])[: int(valid.sum())]
        errors = [e for _, _, e in results]
        if path is not None:
            save_npz(path, images=images, masks=masks, valid=valid, errors=np.array(errors, dtype=str))
    skips = SkipReport("siim-segmentation")
    for p, ok, err in zip(paths, valid, errors):
        if not ok:
            skips.add("undecodable image", Path(p).name, err)
    return SegmentationData(images, masks, df[valid].reset_index(drop=True), skips)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` through :func:`mlip_core.checkpoint.atomic_write` (a reader never sees half a file)."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) normalised as :func:`~mlip_core.data.transforms.eval_transform`."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images).float()
    return ((x / 255.0 - MEAN) / STD).unsqueeze(1)


# ------------------------------------------------------------------------------------------------------------
# Model
def load_tower_weights(target: nn.Module, tower: ImageTower) -> list[str]:
    """Copy the tower's timm backbone tensors into ``target`` (a ``features_only`` timm model of the same
    architecture, e.g. smp's ``unet.encoder.model``) by name; returns the keys loaded.

    Every tensor of ``target`` (parameters and BatchNorm buffers) must have a same-named, same-shaped tensor in
    the tower; otherwise a ValueError lists the ones that would stay at their initial value."""
    source = tower.backbone.state_dict()
    own = target.state_dict()
    missing = [k for k in own if k not in source]
    wrong = [k for k in own if k in source and source[k].shape != own[k].shape]
    if missing or wrong:
        raise ValueError(f"{len(missing)} encoder tensors have no counterpart in the {tower.cfg.name} tower "
                         f"(e.g. {missing[:3]}) and {len(wrong)} differ in shape (e.g. {wrong[:3]}); build the "
                         "U-Net / detector with the tower's architecture")
    target.load_state_dict({k: source[k] for k in own}, strict=True)
    return list(own)


def tower_name(encoder: Encoder) -> str:
    """The timm architecture of a tower encoder; ValueError for raw pixels."""
    if encoder.kind != "tower" or not encoder.tower or "name" not in encoder.tower:
        raise ValueError(f"encoder {encoder.name!r} is not an image tower (kind {encoder.kind!r}); segmentation and "
                         "detection need a CNN tower")
    return str(encoder.tower["name"])


def build_unet(encoder: Encoder, decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS, seed: int = 0):
    """``smp.Unet("tu-<timm name>", in_channels=1, classes=1)`` with the tower's weights in its encoder and a
    seeded decoder initialisation. Returns the U-Net (train mode)."""
    import segmentation_models_pytorch as smp

    name = tower_name(encoder)
    tower = build_tower(encoder)
    if tower.is_vit:
        raise ValueError(f"{name}: a ViT tower has no multi-scale feature maps for the U-Net; use a CNN tower")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = smp.Unet(encoder_name=f"tu-{name}", encoder_weights=None, in_channels=1, classes=1,
                        encoder_depth=len(decoder_channels), decoder_channels=tuple(decoder_channels))
    load_tower_weights(unet.encoder.model, tower)
    if (tower.input_mean, tower.input_std) != (MEAN, STD):  # re-map [-1, 1] inputs to what the weights expect
        mean, std = tower.input_mean, tower.input_std
        unet.encoder.register_forward_pre_hook(lambda _, args: (to_weight_statistics(args[0], mean, std),
                                                                *args[1:]))
    return unet


def freeze(module: nn.Module) -> None:
    """No gradients and BatchNorm in eval mode (call again after ``model.train()``)."""
    module.requires_grad_(False)
    module.eval()


# ------------------------------------------------------------------------------------------------------------
# Frozen-encoder features, computed once
def images_key(images: np.ndarray) -> str:
    """SHA-1 of an image array's shape and bytes (16 hex)."""
    h = hashlib.sha1(json.dumps(list(images.shape)).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def cached_feature_maps(forward: Callable[[Tensor], Sequence[Tensor]], images: np.ndarray, key: str,
                        cache_dir: Path | str | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
                        progress: bool = False) -> list[np.ndarray]:
    """``forward`` (normalised (B, 1, S, S) -> list of (B, C, h, w)) over every image, as float16 arrays (N, C, h, w)
    per level. With ``cache_dir`` they are stored there as ``<key>/level<i>.npy`` and memory-mapped on the next
    call with the same key."""
    folder = Path(cache_dir) / key if cache_dir is not None else None
    if folder is not None and (folder / "done.json").is_file():
        n_levels = json.loads((folder / "done.json").read_text())["levels"]
        return [np.load(folder / f"level{i}.npy", mmap_mode="r") for i in range(n_levels)]
    out: list[list[np.ndarray]] = []
    starts = range(0, len(images), batch_size)
    for s in progress_bar(starts, progress, len(starts), "features"):
        feats = forward(to_input(images[s : s + batch_size]).to(device))
        if not out:
            out = [[] for _ in feats]
        for level, f in zip(out, feats):
            level.append(f.float().cpu().numpy().astype(np.float16))
    levels = [np.concatenate(level) for level in out]
    if folder is not None:  # written into a temporary folder beside it, then renamed: never half a cache
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        for i, arr in enumerate(levels):
            np.save(tmp / f"level{i}.npy", arr)
        (tmp / "done.json").write_text(json.dumps({"levels": len(levels)}))
        try:
            tmp.replace(folder)
        except OSError:  # another process finished the same cache first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return levels


def unet_encoder_features(encoder: Encoder, images: np.ndarray, depth: int = 5, cache_dir: Path | str | None = None,
                          batch_size: int = 64, device: str | torch.device = "cpu",
                          progress: bool = False) -> list[np.ndarray]:
    """The frozen U-Net encoder's feature maps of every image (strides 2 .. 2**depth), float16 (N, C, h, w) each;
    ``depth`` = the U-Net's encoder depth (= ``len(decoder_channels)``)."""
    if not 1 <= depth <= 5:
        raise ValueError(f"U-Net depth must be 1..5, got {depth}")
    enc = build_unet(encoder, decoder_channels=DEFAULT_DECODER_CHANNELS[:depth]).encoder.to(device).eval()
    key = f"unet_{tower_name(encoder)}_d{depth}_{encoder.identity()}_{images_key(images)}"
    return cached_feature_maps(lambda x: enc(x)[1:], images, key, cache_dir, batch_size, device, progress)


# ------------------------------------------------------------------------------------------------------------
# Training
def seeded_batches(indices: np.ndarray, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of ``min(batch_size, len(indices))`` indices: consecutive slices of back-to-back seeded
    permutations (a batch may straddle two passes)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    need = steps * min(batch_size, len(indices))
    while len(order) < need:
        order.extend(indices[rng.permutation(len(indices))].tolist())
    b = min(batch_size, len(indices))
    return [np.array(order[i * b : (i + 1) * b]) for i in range(steps)]


def train_segmentation(encoder: Encoder, images: np.ndarray, masks: np.ndarray, train_idx: Sequence[int],
                       test_idx: Sequence[int], mode: str = "frozen", steps: int = 200, batch_size: int = 8,
                       lr: float = 5e-4, seed: int = 0, image_size: int | None = None,
                       feature_cache_dir: Path | str | None = None, device: str | torch.device = "cpu",
                       decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS, weight_decay: float = 0.05,
                       features: list[np.ndarray] | None = None, eval_batch_size: int = 64,
                       progress: bool = False) -> dict:
    """Train a U-Net on ``images[train_idx]`` (uint8 (N, S, S)) and their 0/1 ``masks``; score Dice on ``test_idx``.

    ``mode`` "frozen": the encoder is fixed and only the decoder trains, on float16 encoder features computed once
    (pass ``features`` from :func:`unet_encoder_features` to share them across calls, else they are computed here,
    stored under ``feature_cache_dir`` when given). "finetune": everything trains on the images. Loss
    :func:`mixed_loss`, AdamW; seeded (same seed, same Dice). Returns ``dice`` (mean per test image),
    ``dice_positive`` (mean over test images with foreground; NaN if none), ``loss_curve`` (per step),
    ``train_images``, ``test_images``, ``step_s`` (seconds per step), ``feature_s``, ``model`` (the U-Net, eval) and
    ``predictions`` (bool (len(test_idx), S, S), the thresholded masks scored)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images, masks = np.asarray(images), np.asarray(masks)
    if image_size is not None and images.shape[-1] != image_size:
        raise ValueError(f"images are {images.shape[-1]} px but image_size={image_size}; decode them at that size")
    if images.shape != masks.shape:
        raise ValueError(f"images {images.shape} and masks {masks.shape} differ in shape")
    train_idx, test_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(test_idx, dtype=np.int64)
    if len(train_idx) == 0:
        raise ValueError("no training images")
    unet = build_unet(encoder, decoder_channels, seed=seed).to(device)
    feature_s = 0.0
    if mode == "frozen":
        freeze(unet.encoder)
        if features is None:
            t0 = time.perf_counter()
            features = unet_encoder_features(encoder, images, len(decoder_channels), feature_cache_dir,
                                             device=device, progress=progress)
            feature_s = time.perf_counter() - t0
        if len(features[0]) != len(images):
            raise ValueError(f"features hold {len(features[0])} images, not {len(images)}")
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    size = images.shape[-1]

    def logits_of(idx: np.ndarray) -> Tensor:
        if mode == "frozen":
            feats = [torch.from_numpy(np.asarray(f[idx], dtype=np.float32)).to(device) for f in features]
            placeholder = torch.empty(len(idx), 0, size, size, device=device)
            return unet.segmentation_head(unet.decoder([placeholder, *feats]))
        return unet(to_input(images[idx]).to(device))

    unet.train()
    if mode == "frozen":
        unet.encoder.eval()
    curve = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for idx in progress_bar(seeded_batches(train_idx, batch_size, steps, seed), progress, steps, "segmentation"):
            target = torch.from_numpy(masks[idx].astype(np.float32)).unsqueeze(1).to(device)
            loss = mixed_loss(logits_of(idx), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    unet.eval()
    preds = []
    with torch.inference_mode():
        for s in range(0, len(test_idx), eval_batch_size):
            preds.append((torch.sigmoid(logits_of(test_idx[s : s + eval_batch_size])) > 0.5).squeeze(1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros((0, size, size), dtype=bool)
    per_image = dice_per_image(pred, masks[test_idx]) if len(test_idx) else np.zeros(0)
    positive = masks[test_idx].reshape(len(test_idx), -1).any(1)
    return {"dice": float(per_image.mean()) if len(per_image) else float("nan"),
            "dice_positive": float(per_image[positive].mean()) if positive.any() else float("nan"),
            "loss_curve": curve, "train_images": int(len(train_idx)), "test_images": int(len(test_idx)),
            "step_s": step_s, "feature_s": feature_s, "mode": mode, "model": unet, "predictions": pred}


# ------------------------------------------------------------------------------------------------------------
# Fractions and the sweep
def fraction_subsets(ids: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
                     split_dir: Path | str | None = None,
                     dataset: str = "transfer") -> dict[tuple[float, int], np.ndarray]:
    """{(fraction, seed): positions into ``ids``} of nested seeded draws (1% inside 10% inside 100%).

    The draw is :func:`mlip_core.transfer.classify.fraction_masks` over ids (one split file per fraction and seed
    is written to ``split_dir``, a temporary folder when None). Fraction 1.0 is the same set for every seed."""
    table = pd.DataFrame({"group": [str(i) for i in ids]})
    if table["group"].duplicated().any():
        raise ValueError("training ids are not unique; fractions are drawn over unique image ids")
    with tempfile.TemporaryDirectory() as tmp:
        masks = fraction_masks(table, split_dir if split_dir is not None else tmp, dataset, fractions=fractions,
                               seeds=seeds, group_col="group")
    out = {}
    for f in fractions:
        for s in seeds:
            mask = masks.get((float(f), int(s)), masks.get((float(f), int(seeds[0]))))
            out[(float(f), int(s))] = np.flatnonzero(mask)
    return out


def split_positions(splits: Sequence[str] | pd.Series | Mapping[str, Sequence[int]],
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, test positions) from per-row split names or {"train": idx, "test": idx}."""
    if isinstance(splits, Mapping):
        return np.asarray(splits["train"], dtype=np.int64), np.asarray(splits["test"], dtype=np.int64)
    names = np.asarray(pd.Series(splits).astype(str))
    if len(names) != n:
        raise ValueError(f"{len(names)} split names for {n} images")
    return np.flatnonzero(names == "train"), np.flatnonzero(names == "test")


def balanced_train(train_idx: np.ndarray, positive: np.ndarray, seed: int = 42) -> np.ndarray:
    """Every positive training image plus as many negatives drawn at random (MGCA's SIIM training set)."""
    pos, neg = train_idx[positive[train_idx]], train_idx[~positive[train_idx]]
    rng = np.random.default_rng(seed)
    neg = neg[rng.permutation(len(neg))[: len(pos)]]
    return np.sort(np.concatenate([pos, neg]))


def segmentation_sweep(encoders: Sequence[Encoder], data: SegmentationData,
                       splits: Sequence[str] | pd.Series | Mapping[str, Sequence[int]],
                       fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0,), mode: str = "frozen",
                       steps: int = 200, batch_size: int = 8, lr: float = 5e-4, balance: bool = False,
                       feature_cache_dir: Path | str | None = None, split_dir: Path | str | None = None,
                       device: str | torch.device = "cpu", task: str = "siim_segmentation",
                       id_col: str = "image_id", progress: bool = False, keep_predictions: bool = False, **train_kwargs) -> pd.DataFrame:
    """Train and score every encoder at every (fraction, seed): long rows ``method, task, fraction, seed, metric,
    value`` (metric "dice") plus ``mode``, ``train images``, ``steps``, ``step s``.

    ``splits``: a split name per row of ``data`` ("train" rows are drawn from, "test" rows scored, others unused)
    or ``{"train": positions, "test": positions}``. ``keep_predictions``: ``.attrs["predictions"]`` of the
    result maps (method, fraction, seed) to the test predictions, in test order. In frozen mode each encoder's features are computed once."""
    train_idx, test_idx = split_positions(splits, len(data.images))
    if balance:
        train_idx = balanced_train(train_idx, data.masks.reshape(len(data.masks), -1).any(1))
    ids = data.df[id_col].astype(str).to_numpy()[train_idx] if id_col in data.df else train_idx.astype(str)
    subsets = fraction_subsets(ids, fractions, seeds, split_dir, dataset=task)
    rows, predictions = [], {}
    for enc in encoders:
        feats = None
        if mode == "frozen":
            feats = unet_encoder_features(enc, data.images, len(train_kwargs.get("decoder_channels",
                                                                                DEFAULT_DECODER_CHANNELS)),
                                          feature_cache_dir, device=device, progress=progress)
        for (fraction, seed), pos in sorted(subsets.items()):
            res = train_segmentation(enc, data.images, data.masks, train_idx[pos], test_idx, mode=mode, steps=steps,
                                     batch_size=batch_size, lr=lr, seed=seed, device=device, features=feats,
                                     **train_kwargs)
            if keep_predictions:
                predictions[(enc.name, fraction, seed)] = res["predictions"]
            rows.append({"method": enc.name, "task": task, "fraction": fraction, "seed": seed, "metric": "dice",
                         "value": res["dice"], "mode": mode, "train images": res["train_images"], "steps": steps,
                         "step s": round(res["step_s"], 4)})
    out = pd.DataFrame(rows)
    if keep_predictions:  # {(method, fraction, seed): the test predictions}, for figures without retraining
        out.attrs["predictions"] = predictions
    return out
