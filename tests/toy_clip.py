"""A tiny image-text model and dataset with the trainer's interfaces, for fast engine tests.

It has what makes exact resume hard in the real MLIP: BatchNorm buffers, dropout (global RNG), a
momentum encoder updated after each step, a learnable temperature, prototypes, a cross-rank feature
gather, augmentation drawn from the torch RNG and a collator that draws from python's ``random``.
"""

from __future__ import annotations

import copy
import math
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB = 40


def _gather(x: torch.Tensor) -> torch.Tensor:
    """(B,D) -> (world*B,D) with gradients flowing back to every rank (open_clip's gather_features)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn as dnn

    return torch.cat(dnn.all_gather(x), dim=0)


class ToyCLIP(nn.Module):
    """Conv+BN image tower, bag-of-words text tower with dropout, momentum copies, InfoNCE + soft targets."""

    def __init__(self, dim: int = 16, momentum: float = 0.9, norm: str = "batch", dropout: float = 0.2) -> None:
        super().__init__()
        # norm="group" has no batch coupling: one process and DDP shards then compute the same function.
        norm_layer = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
        self.image_tower = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), norm_layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.image_proj = nn.Linear(8, dim)
        self.text_embed = nn.EmbeddingBag(VOCAB, 16, mode="sum")
        self.text_drop = nn.Dropout(dropout)
        self.text_proj = nn.Linear(16, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.prototypes = nn.Parameter(torch.randn(4, dim))
        self.m_image = copy.deepcopy(nn.Sequential(self.image_tower, self.image_proj))
        for p in self.m_image.parameters():
            p.requires_grad_(False)
        self.momentum = momentum

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B,1,H,W) -> (B,D)."""
        z = self.image_proj(self.image_tower(x))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B,L) ids and mask -> (B,D)."""
        z = self.text_proj(self.text_drop(self.text_embed(ids, per_sample_weights=mask.float())))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img = _gather(self.encode_image(batch["image"]))
        txt = _gather(self.encode_text(batch["input_ids"], batch["attention_mask"]))
        with torch.no_grad():
            m_img = _gather(F.normalize(self.m_image(batch["image"]), dim=-1))
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T
        target = torch.arange(len(img), device=img.device)
        loss_global = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        soft = 0.6 * F.one_hot(target, len(img)).float() + 0.4 * (scale * m_img @ txt.T).softmax(-1).detach()
        loss_soft = -(soft * logits.log_softmax(-1)).sum(-1).mean()
        loss_proto = -(img @ F.normalize(self.prototypes, dim=-1).T).softmax(-1).max(-1).values.mean()
        loss = loss_global + loss_soft + 0.1 * loss_proto
        return {"loss": loss, "loss_global": loss_global, "loss_soft": loss_soft, "loss_proto": loss_proto,
                "logit_scale": scale.detach()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        online = nn.Sequential(self.image_tower, self.image_proj)
        for p_m, p in zip(self.m_image.parameters(), online.parameters()):
            p_m.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)


class ToyPairs(torch.utils.data.Dataset):
    """N studies: a blob image whose position encodes the 'finding', and a matching token sequence."""

    def __init__(self, n: int = 48, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cls = torch.randint(0, 6, (n,), generator=g)
        self.size = size

    def __len__(self) -> int:
        return len(self.cls)

    def __getitem__(self, i: int) -> dict:
        c = int(self.cls[i])
        img = torch.zeros(1, self.size, self.size)
        r, col = 2 + 2 * (c // 3), 2 + 4 * (c % 3)
        img[:, r:r + 4, col:col + 4] = 1.0
        img = img + 0.3 * torch.rand_like(img)  # augmentation from the global torch RNG
        text = " ".join(f"w{(c * 5 + k) % VOCAB}" for k in range(4))
        return {"image": img, "text": text, "labels": torch.zeros(14), "study_id": 1000 + i, "index": i}


def toy_collate(items: list[dict], swap_prob: float = 0.3) -> dict[str, torch.Tensor]:
    """Stack images; words -> ids; with ``swap_prob`` one word is replaced at random (python RNG)."""
    ids = []
    for it in items:
        words = [int(w[1:]) for w in it["text"].split()]
        if random.random() < swap_prob:
            words[random.randrange(len(words))] = random.randrange(VOCAB)
        ids.append(words)
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {"image": torch.stack([it["image"] for it in items]), "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids), "labels": torch.stack([it["labels"] for it in items])}
