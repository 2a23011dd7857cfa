"""Object-detection transfer (the RSNA pneumonia protocol of MGCA / MLIP; Object-CXR alike): a detector on the
pretrained image tower, trained with 1% / 10% / 100% of the training images, mAP on the test split.

What MGCA's code runs (HKU-MedAI/MGCA at commit 4075a69; file:line):

- Detector: YOLOv3 on the ResNet-50's layer2/3/4 maps (``mgca/models/backbones/detector_backbone.py:20-31``) with
  the three YOLOv3 heads and anchors scaled from 416 to 224 px (``mgca/models/ssl_detector.py:149-158``).
- Frozen backbone: every backbone parameter ``requires_grad = False`` (``mgca/models/mgca/mgca_detector.py:69-71``);
  the heads learn.
- Optimiser: AdamW, betas (0.9, 0.999), weight decay 1e-6 (``ssl_detector.py:126-132``, ``mgca_detector.py:38``),
  lr 5e-4 (2e-4 with batch 8 at 1% of RSNA; ``run_det_finetune.sh:4-6``), batch 16, 50 epochs
  (``mgca_detector.py:35,44``) with early stopping on validation mAP (patience 10) and the best checkpoint tested.
- Metric: torchmetrics ``MeanAveragePrecision(iou_thresholds=[0.4, 0.45, ..., 0.75])`` and its ``map``
  (``ssl_detector.py:21-22,33-36,120-121``): the mean AP over IoU 0.40:0.05:0.75, the RSNA challenge's
  thresholds. Predictions pass NMS with confidence >= 0.5 and NMS IoU 0.5 first (``ssl_detector.py:20,23,59-61``).
- Data: images stretched to 224x224 (``mgca/datasets/detection_dataset.py:70-71``), no augmentation
  (``mgca/datasets/transforms.py``, ``DetectionDataTransforms``); fractions drawn per image at random
  (``detection_dataset.py:54-57``); the split is MGCA's own (``mgca/preprocess/rsna.py``).

What we keep: a frozen-backbone mode (MGCA's) and the pretrained tower's last three feature levels (strides 8, 16,
32, as YOLOv3's layer2/3/4), AdamW, the metric (mean AP over IoU 0.40:0.05:0.75, plus AP at IoU 0.5).

What differs, and why:

- The detector is torchvision's RetinaNet (one-stage, like YOLOv3, but maintained and tested) on a
  ``torchvision.ops.FeaturePyramidNetwork`` over those three levels (no P6/P7: images are 64-96 px), with
  ``fpn_channels`` (default 64; torchvision uses 256) shared by the FPN and the heads to keep CPU cost small.
  Anchors: sizes ``2 * stride * (1, 2^(1/3), 2^(2/3))`` at aspect ratios 0.5, 1, 2 per level (16-102 px), scaled
  for small images as MGCA scales YOLOv3's. The heads use GroupNorm (as torchvision's RetinaNet v2; YOLOv3's
  heads have BatchNorm): a frozen backbone's features come at whatever scale it has, and without a norm the heads
  barely learned on them (``head_norm=False`` gives torchvision's v1 heads). One foreground class (label 0;
  RetinaNet's sigmoid heads have no background slot). The detector's ``GeneralizedRCNNTransform`` is set to one
  channel with mean 0 / std 1 (our images are already normalised as everywhere in the book) and
  ``min_size = max_size = image_size`` so it never resizes (it still pads a batch to a multiple of 32 px).
- ``mode="frozen"`` also keeps BatchNorm statistics fixed (MGCA's Lightning model is in train mode, so its
  frozen backbone still updates them); the backbone's features are then computed once per (encoder, images) as
  float16 and only FPN and heads train. ``mode="finetune"`` trains everything (not in MGCA).
- Scoring keeps every detection above RetinaNet's score threshold 0.05 (up to ``detections_per_img``), not only
  confidence >= 0.5, and scores *every* test image: images without boxes count their detections as false
  positives. MGCA's loop drops test images without a box and images for which NMS kept nothing
  (``ssl_detector.py:76-96``), which only raises its numbers.
- Images are padded to a square (``resize_uint8(..., "pad")`` and :func:`~mlip_core.data.downstream.pad_geometry`)
  rather than stretched; boxes are clipped to the image.
- A fixed number of seeded steps, no validation split or early stopping; nested fractions
  (:func:`mlip_core.transfer.segment.fraction_subsets`).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mlip_core.data.downstream import pad_geometry
from mlip_core.data.images import ImageReadError, read_image, resize_uint8
from mlip_core.data.skips import SkipReport
from mlip_core.transfer.classify import Encoder, build_tower
from mlip_core.transfer.segment import (
    MODES,
    cached_feature_maps,
    decode_cache_path,
    fraction_subsets,
    freeze,
    images_key,
    load_tower_weights,
    progress_bar,
    run_decode,
    save_npz,
    seeded_batches,
    split_positions,
    to_input,
    tower_name,
)

__all__ = [
    "DetectionData",
    "IOU_THRESHOLDS",
    "TimmFPNBackbone",
    "backbone_features",
    "build_detector",
    "detection_data",
    "detection_map",
    "detection_sweep",
    "train_detection",
]

# The RSNA challenge's IoU thresholds, as MGCA passes them to MeanAveragePrecision (ssl_detector.py:21-22).
IOU_THRESHOLDS = [round(0.40 + 0.05 * i, 2) for i in range(8)]
METRICS = ("mAP@0.5", "mAP@0.4:0.75")


# ------------------------------------------------------------------------------------------------------------
# Metric
def _as_tensor(x, dtype: torch.dtype = torch.float32, shape: tuple = (-1,)) -> Tensor:
    """A tensor of ``dtype`` and ``shape`` from a tensor, array or (possibly empty) list."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x, dtype=np.float64 if dtype.is_floating_point else np.int64))
    return x.to(dtype).reshape(*shape)


def _labels(item: Mapping, n: int) -> Tensor:
    """The item's labels, or class 0 for all ``n`` boxes (class-agnostic)."""
    return _as_tensor(item["labels"], torch.int64) if "labels" in item else torch.zeros(n, dtype=torch.int64)


def detection_map(preds: Sequence[Mapping], targets: Sequence[Mapping]) -> dict[str, float]:
    """``{"mAP@0.5", "mAP@0.4:0.75"}`` of per-image predictions (``boxes`` (K, 4) xyxy, ``scores`` (K,), optional
    ``labels``) against targets (``boxes`` (M, 4), optional ``labels``); class-agnostic when labels are absent.

    torchmetrics ``MeanAveragePrecision`` (COCO evaluation by pycocotools: 101-point interpolated AP, up to 100
    detections per image) at IoU 0.40:0.05:0.75; "mAP@0.4:0.75" is the mean over those eight thresholds (MGCA's
    number), "mAP@0.5" the AP at 0.5. Images without target boxes take part: their detections are false
    positives. NaN when no test image has a box."""
    from torchmetrics.detection import MeanAveragePrecision

    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} images")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=IOU_THRESHOLDS,
                                  backend="pycocotools")
    p_list, t_list = [], []
    for p, t in zip(preds, targets):
        pb = _as_tensor(p["boxes"], shape=(-1, 4))
        tb = _as_tensor(t["boxes"], shape=(-1, 4))
        p_list.append({"boxes": pb, "scores": _as_tensor(p["scores"]), "labels": _labels(p, len(pb))})
        t_list.append({"boxes": tb, "labels": _labels(t, len(tb))})
    metric.update(p_list, t_list)
    out = metric.compute()

    def clean(v: Tensor) -> float:
        v = float(v)
        return float("nan") if v < 0 else v  # torchmetrics' -1: nothing to score

    return {"mAP@0.5": clean(out["map_50"]), "mAP@0.4:0.75": clean(out["map"])}


# ------------------------------------------------------------------------------------------------------------
# Data
@dataclass
class DetectionData:
    """Decoded detection images: ``images`` uint8 (N, S, S), ``boxes`` N float32 arrays (K, 4) x0y0x1y1 in
    resized pixels, ``df`` the rows kept (aligned), ``skips`` undecodable images and dropped degenerate boxes."""

    images: np.ndarray
    boxes: list[np.ndarray]
    df: pd.DataFrame
    skips: SkipReport

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def _decode_boxes(job: tuple[str, list, int]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Worker: (path, boxes in original pixels, size) -> (image, boxes in resized pixels, error)."""
    path, boxes, size = job
    try:
        full = read_image(path)
    except ImageReadError as exc:
        return None, None, str(exc)
    scale, top, left = pad_geometry(*full.shape, size)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale + np.array([left, top, left, top])
    return resize_uint8(full, size), b.astype(np.float32), ""


def detection_data(df: pd.DataFrame, image_size: int, cache_dir: Path | str | None = None, num_workers: int = 0,
                   progress: bool = False, task: str = "detection") -> DetectionData:
    """Decode a :func:`~mlip_core.data.downstream.load_rsna` / :func:`load_object_cxr` table (image_path, boxes in
    original pixels) once into memory at ``image_size``, boxes mapped as
    :class:`~mlip_core.data.downstream.DetectionDataset` maps them (``pad_geometry``), then clipped to the
    image; a box with no area left is dropped and counted. With ``cache_dir`` the arrays are saved (``.npz``)
    and reused by the next call on the same files and boxes."""
    df = df.reset_index(drop=True)
    paths = [str(p) for p in df["image_path"]]
    raw = [np.asarray(b, dtype=np.float64).reshape(-1, 4).tolist() for b in df["boxes"]]
    path = decode_cache_path(cache_dir, task, paths, image_size, raw) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            images, valid, errors = z["images"], z["valid"], list(z["errors"])
            flat, counts = z["boxes"], z["counts"]
        mapped = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
    else:
        results = run_decode([(p, b, int(image_size)) for p, b in zip(paths, raw)], _decode_boxes, num_workers,
                             progress, f"decoding {task}")
        valid = np.array([img is not None for img, _, _ in results], dtype=bool)
        empty = np.zeros((image_size, image_size), dtype=np.uint8)
        images = np.stack([img for img, _, _ in results if img is not None] or [empty])[: int(valid.sum())]
        mapped = [b for _, b, _ in results if b is not None]
        errors = [e for _, _, e in results]
        if path is not None:
            counts = np.array([len(b) for b in mapped], dtype=np.int64)
            flat = np.concatenate(mapped) if mapped else np.zeros((0, 4), np.float32)
            save_npz(path, images=images, valid=valid, errors=np.array(errors, dtype=str), boxes=flat, counts=counts)
    skips = SkipReport(task)
    for p, ok, err in zip(paths, valid, errors):
        if not ok:
            skips.add("undecodable image", Path(p).name, err)
    boxes = []
    for b in mapped:
        b = np.clip(np.asarray(b, dtype=np.float32).reshape(-1, 4), 0, image_size)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        skips.filter("box with no area inside the image", int((~keep).sum()))
        boxes.append(b[keep])
    return DetectionData(images, boxes, df[valid].reset_index(drop=True), skips)


# ------------------------------------------------------------------------------------------------------------
# Model
class TimmFPNBackbone(nn.Module):
    """The tower's timm CNN (``features_only``, its last three levels) + a FeaturePyramidNetwork:
    (B, 1, H, W) -> OrderedDict of ``out_channels``-channel maps at strides 8, 16, 32.

    While :meth:`use_features` is active the CNN is skipped and the given (cached) level maps are used."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), out_channels)
        self.out_channels = out_channels
        self.strides = list(body.feature_info.reduction())
        self._cached: list[Tensor] | None = None

    @contextlib.contextmanager
    def use_features(self, feats: list[Tensor]):
        """Within the block the backbone returns the FPN of ``feats`` (the body's outputs) and ignores images."""
        self._cached = feats
        try:
            yield
        finally:
            self._cached = None

    def forward(self, x: Tensor) -> OrderedDict:
        feats = self._cached if self._cached is not None else self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_detector(encoder: Encoder, image_size: int, fpn_channels: int = 64,
                   anchor_sizes: Sequence[Sequence[float]] | None = None, score_thresh: float = 0.05,
                   nms_thresh: float = 0.5, detections_per_img: int = 20, head_norm: bool = True, seed: int = 0):
    """A torchvision RetinaNet (one foreground class) on the tower's last three timm levels + FPN; weights of the
    tower loaded (checked tensor for tensor), FPN and heads initialised from ``seed``. Train mode."""
    import timm
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead

    name = tower_name(encoder)
    tower = build_tower(encoder)
    if tower.is_vit:
        raise ValueError(f"{name}: a ViT tower has no multi-scale feature maps for an FPN; use a CNN tower")
    n_levels = len(tower.backbone.feature_info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = timm.create_model(name, features_only=True, in_chans=1, pretrained=False,
                                 out_indices=tuple(range(n_levels - 3, n_levels)))
        load_tower_weights(body, tower)
        backbone = TimmFPNBackbone(body, fpn_channels)
        if anchor_sizes is None:
            anchor_sizes = [tuple(2 * s * 2 ** (k / 3) for k in range(3)) for s in backbone.strides]
        anchors = AnchorGenerator(sizes=tuple(tuple(a) for a in anchor_sizes),
                                  aspect_ratios=((0.5, 1.0, 2.0),) * len(anchor_sizes))
        norm = partial(nn.GroupNorm, min(32, fpn_channels // 4)) if head_norm else None
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes=1, norm_layer=norm)
        # RetinaNet's transform normalises (x - mean) / std; on inputs mapped to [-1, 1] these give the statistics
        # the tower's weights expect (the identity, mean 0 and std 1, for the transforms' own 0.5 / 0.5).
        mean, std = tower.input_mean, tower.input_std
        model = RetinaNet(backbone, num_classes=1, min_size=image_size, max_size=image_size,
                          image_mean=[2 * mean - 1], image_std=[2 * std], anchor_generator=anchors, head=head, score_thresh=score_thresh,
                          nms_thresh=nms_thresh, detections_per_img=detections_per_img)
    return model


@torch.inference_mode()
def backbone_features(encoder: Encoder, images: np.ndarray, cache_dir: Path | str | None = None,
                      batch_size: int = 64, device: str | torch.device = "cpu",
                      progress: bool = False) -> list[np.ndarray]:
    """The frozen detector body's three level maps of every image (after the detector's own padding), float16."""
    size = int(images.shape[-1])
    model = build_detector(encoder, size).to(device).eval()

    def forward(x: Tensor) -> list[Tensor]:
        batch, _ = model.transform(list(x))
        return model.backbone.body(batch.tensors)

    key = f"det_{tower_name(encoder)}_{encoder.identity()}_{images_key(images)}"
    return cached_feature_maps(forward, images, key, cache_dir, batch_size, device, progress)


# ------------------------------------------------------------------------------------------------------------
# Training
def _targets(boxes: Sequence[np.ndarray], idx: np.ndarray, device) -> list[dict]:
    out = []
    for i in idx:
        b = torch.as_tensor(np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4), device=device)
        out.append({"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64, device=device)})
    return out


def train_detection(encoder: Encoder, images: np.ndarray, boxes: Sequence[np.ndarray], train_idx: Sequence[int],
                    test_idx: Sequence[int], mode: str = "frozen", steps: int = 200, batch_size: int = 16,
                    lr: float = 5e-4, seed: int = 0, image_size: int | None = None,
                    device: str | torch.device = "cpu", feature_cache_dir: Path | str | None = None,
                    features: list[np.ndarray] | None = None, weight_decay: float = 1e-6, fpn_channels: int = 64,
                    eval_batch_size: int = 64, progress: bool = False, **detector_kwargs) -> dict:
    """Train a RetinaNet on ``images[train_idx]`` (uint8 (N, S, S)) and their ``boxes`` ((K, 4) xyxy resized px);
    score :func:`detection_map` on ``test_idx``.

    ``mode`` "frozen": backbone fixed (BatchNorm too), FPN and heads train, on float16 backbone features computed
    once (``features`` from :func:`backbone_features`, else computed here and stored under ``feature_cache_dir``
    when given); "finetune": everything trains. AdamW; seeded. Returns ``mAP@0.5``, ``mAP@0.4:0.75``,
    ``loss_curve``, ``predictions`` (per test image: boxes, scores), ``train_images``, ``test_images``,
    ``step_s``, ``feature_s`` and ``model`` (eval)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images = np.asarray(images)
    size = int(images.shape[-1])
    if image_size is not None and size != image_size:
        raise ValueError(f"images are {size} px but image_size={image_size}; decode them at that size")
    if len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} box arrays for {len(images)} images")
    train_idx, test_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(test_idx, dtype=np.int64)
    if len(train_idx) == 0:
        raise ValueError("no training images")
    model = build_detector(encoder, size, fpn_channels=fpn_channels, seed=seed, **detector_kwargs).to(device)
    body = model.backbone.body
    feature_s = 0.0
    if mode == "frozen":
        freeze(body)
        if features is None:
            t0 = time.perf_counter()
            features = backbone_features(encoder, images, feature_cache_dir, device=device, progress=progress)
            feature_s = time.perf_counter() - t0
        if len(features[0]) != len(images):
            raise ValueError(f"features hold {len(features[0])} images, not {len(images)}")

    def run(idx: np.ndarray, targets: list[dict] | None = None):
        x = list(to_input(images[idx]).to(device))
        if mode == "frozen":
            feats = [torch.from_numpy(np.asarray(f[idx], dtype=np.float32)).to(device) for f in features]
            with model.backbone.use_features(feats):
                return model(x, targets)
        return model(x, targets)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                            weight_decay=weight_decay)
    model.train()
    if mode == "frozen":
        body.eval()
    curve = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for idx in progress_bar(seeded_batches(train_idx, batch_size, steps, seed), progress, steps, "detection"):
            losses = run(idx, _targets(boxes, idx, device))
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    model.eval()
    preds: list[dict] = []
    with torch.inference_mode():
        for s in range(0, len(test_idx), eval_batch_size):
            for out in run(test_idx[s : s + eval_batch_size]):
                preds.append({"boxes": out["boxes"].cpu(), "scores": out["scores"].cpu()})
    truth = [{"boxes": torch.as_tensor(np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4))} for i in test_idx]
    scores = detection_map(preds, truth) if len(test_idx) else {m: float("nan") for m in METRICS}
    return {**scores, "loss_curve": curve, "predictions": preds, "train_images": int(len(train_idx)),
            "test_images": int(len(test_idx)), "step_s": step_s, "feature_s": feature_s, "mode": mode,
            "model": model}


def detection_sweep(encoders: Sequence[Encoder], data: DetectionData,
                    splits: Sequence[str] | pd.Series | Mapping[str, Sequence[int]],
                    fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0,), mode: str = "frozen",
                    steps: int = 200, batch_size: int = 16, lr: float = 5e-4, task: str = "rsna_detection",
                    id_col: str = "image_path", feature_cache_dir: Path | str | None = None,
                    split_dir: Path | str | None = None, device: str | torch.device = "cpu", progress: bool = False,
                    keep_predictions: bool = False, **train_kwargs) -> pd.DataFrame:
    """Train and score every encoder at every (fraction, seed): long rows ``method, task, fraction, seed, metric,
    value`` (metrics "mAP@0.5" and "mAP@0.4:0.75"; ``task`` "rsna_detection" or "object_cxr_detection") plus
    ``mode``, ``train images``, ``steps``, ``step s``.

    ``splits``: a split name per row of ``data`` ("train" drawn from, "test" scored) or ``{"train": positions,
    "test": positions}``. ``keep_predictions``: ``.attrs["predictions"]`` of the
    result maps (method, fraction, seed) to the test predictions, in test order. In frozen mode each encoder's backbone features are computed once."""
    train_idx, test_idx = split_positions(splits, len(data.images))
    ids = data.df[id_col].astype(str).to_numpy()[train_idx] if id_col in data.df else train_idx.astype(str)
    subsets = fraction_subsets(ids, fractions, seeds, split_dir, dataset=task)
    rows, predictions = [], {}
    for enc in encoders:
        feats = backbone_features(enc, data.images, feature_cache_dir, device=device, progress=progress) \
            if mode == "frozen" else None
        for (fraction, seed), pos in sorted(subsets.items()):
            res = train_detection(enc, data.images, data.boxes, train_idx[pos], test_idx, mode=mode, steps=steps,
                                  batch_size=batch_size, lr=lr, seed=seed, device=device, features=feats,
                                  **train_kwargs)
            if keep_predictions:
                predictions[(enc.name, fraction, seed)] = res["predictions"]
            for metric in METRICS:
                rows.append({"method": enc.name, "task": task, "fraction": fraction, "seed": seed, "metric": metric,
                             "value": res[metric], "mode": mode, "train images": res["train_images"],
                             "steps": steps, "step s": round(res["step_s"], 4)})
    out = pd.DataFrame(rows)
    if keep_predictions:  # {(method, fraction, seed): the test predictions}, for figures without retraining
        out.attrs["predictions"] = predictions
    return out
