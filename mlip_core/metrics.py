"""Evaluation metrics of the pretrained embeddings."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, group: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@K for paired rows of (N,D) embeddings.

    A hit is any candidate in the query's ``group`` (N,) (e.g. the study: several images share one report);
    without groups only the paired row counts. Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., "recall_mean": ...}``
    in percent.
    """
    n = image_emb.shape[0]
    if group is None:
        group = torch.arange(n)
    sim = image_emb.float() @ text_emb.float().T  # (N, N)
    same = group.view(-1, 1) == group.view(1, -1)  # (N, N) hit mask
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        order = s.argsort(dim=1, descending=True)  # (N, N) candidates by rank
        hits = torch.gather(same, 1, order)  # (N, N) is the r-th candidate a hit
        first = hits.float().argmax(dim=1)  # rank of the first hit (every row has one: itself)
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (first < k).float().mean().item()
    out["recall_mean"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
    return out
