"""Image transforms for single-channel radiographs: uint8 (H, W) array in, FloatTensor (1, size, size) out.

No horizontal flip: laterality is part of what reports describe ("left lower lobe"). Intensities are mapped
to [-1, 1] (mean 0.5, std 0.5 on the [0, 1] scale) as in MGCA.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = ["ImageTransform", "eval_transform", "to_tensor_uint8", "train_transform"]

MEAN, STD = 0.5, 0.5


def to_tensor_uint8(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W) or (1, H, W) to a uint8 tensor (1, H, W) without copying when possible."""
    t = torch.as_tensor(np.asarray(arr)) if not isinstance(arr, torch.Tensor) else arr
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(f"expected a single-channel image (H, W) or (1, H, W), got shape {tuple(t.shape)}")
    return t


class ImageTransform:
    """A picklable callable (DataLoader workers may spawn): uint8 (H, W) -> FloatTensor (1, size, size)."""

    def __init__(self, pipeline: v2.Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, arr: np.ndarray | torch.Tensor) -> torch.Tensor:
        out = self.pipeline(v2.functional.to_image(to_tensor_uint8(arr)))
        return out.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        """The pipeline with its parameters (what a cache of transformed images is keyed by), no address."""
        return f"ImageTransform({self.pipeline!r})"


def train_transform(size: int) -> ImageTransform:
    """Augmenting transform: random resized crop, small affine, brightness/contrast; -> (1, size, size)."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.85, 1.18), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
            v2.ColorJitter(brightness=0.4, contrast=0.4),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([MEAN], [STD]),
        ]
    )
    return ImageTransform(pipeline)


def eval_transform(size: int) -> ImageTransform:
    """Deterministic transform: resize shorter side, centre crop, normalise; -> (1, size, size)."""
    pipeline = v2.Compose(
        [
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([MEAN], [STD]),
        ]
    )
    return ImageTransform(pipeline)
