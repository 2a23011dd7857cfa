"""Evaluation metrics of the pretrained embeddings."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def embedding_geometry(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """How the paired (N,D) L2-normalised embeddings sit on the sphere (Wang & Isola, ICML 2020, measure the same
    two properties as alignment and uniformity): ``pair_cos`` the mean cosine of each image with its own report;
    ``image_mean_cos`` / ``text_mean_cos`` the mean cosine between two different images / reports. A mean close
    to 1 means that modality's embeddings crowd into a narrow cone: the differences between them, which retrieval
    ranks by, are a small part of each vector."""

    def mean_off_diagonal(e: torch.Tensor) -> float:
        n = e.shape[0]
        if n < 2:
            return float("nan")
        total = e.sum(0)
        return float(((total @ total) - (e * e).sum()) / (n * (n - 1)))  # sum over i != j of <e_i, e_j>

    img, txt = image_emb.float(), text_emb.float()
    return {"pair_cos": float((img * txt).sum(1).mean()), "image_mean_cos": mean_off_diagonal(img),
            "text_mean_cos": mean_off_diagonal(txt)}


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
