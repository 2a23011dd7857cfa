"""The losses of MLIP and of the baselines, as small ``nn.Module``s that return named outputs.

Each module returns a dict with ``loss`` plus diagnostics (accuracies, KL, entropies). The global loss
knows ``rank``/``world_size`` and gathers features itself, as open_clip's ``ClipLoss`` does
(github.com/mlfoundations/open_clip, src/open_clip/loss.py), so the training loop stays simple:
features of the local shard keep their gradient, the other ranks' arrive as constants, and the rows of
the local shard are contrasted against the *global* batch. Everything is vectorised over the batch.

Terms (../shared/DESIGN.md, "The method as we implement it"):
- :class:`GlobalContrastiveLoss` — InfoNCE both ways, learnable temperature, soft targets from the
  divergence (momentum) encoder as in ALBEF (arXiv 2107.07651), knowledge-guarded negatives.
- :class:`LocalAlignmentLoss` — token-level InfoNCE between tokens and their attended patches, both
  directions, as MGCA (arXiv 2210.06044); with knowledge-fused tokens and token weights it is MLIP's
  token-knowledge-patch alignment.
- :class:`GloriaLocalLoss` — GLoRIA's word-region attention loss (arXiv ICCV 2021), all pairs at once.
- :class:`CategoryLoss` — Sinkhorn-Knopp swapped prediction over prototypes (SwAV / MGCA) and a
  supervised contrastive term (Khosla et al. 2020) on report labels.
- :func:`itm_loss`, :func:`swap_loss` — the proxy tasks' cross-entropies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

NEG = -1.0e4  # a finite "minus infinity" for masked logits: exp underflows to 0, no NaN from 0 * -inf


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor, world_size: int, with_grad: bool = True) -> Tensor:
    """All ranks' (n,...) tensors concatenated in rank order -> (world_size*n, ...).

    With ``with_grad`` the gather is ``torch.distributed.nn.all_gather``, whose backward sums the
    gradients every rank computed for each shard and hands each rank its own (open_clip's
    ``gather_with_grad``); without, the other shards are constants.
    """
    if world_size == 1:
        return x
    if with_grad:
        import torch.distributed.nn as dist_nn

        return torch.cat(dist_nn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x  # keep the local shard's autograd history
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------
# Global


def same_finding_set(labels: Tensor, other: Tensor | None = None) -> Tensor:
    """(n,14),(N,14) CheXpert labels -> (n,N) bool: both rows have the same *non-empty* set of
    positive (==1) findings. NaN/0/-1 are not positive."""
    other = labels if other is None else other
    a = (labels == 1).to(torch.float32)
    b = (other == 1).to(torch.float32)
    shared = a @ b.T
    ca, cb = a.sum(1), b.sum(1)
    return (shared == ca[:, None]) & (shared == cb[None, :]) & (ca[:, None] > 0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij * log_softmax(logits)_ij; (n,N),(n,N) -> ()."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class GlobalContrastiveLoss(nn.Module):
    """Image-report InfoNCE both ways with soft targets from a momentum encoder and knowledge guards.

    ``forward(image (n,d), text (n,d), logit_scale (), image_m (n,d)|None, text_m (n,d)|None,
    labels (n,14)|None)``, features L2-normalised. Rows of the local shard are contrasted against the
    gathered global batch. Targets: ``(1-a)*onehot + a*softmax(logit_scale * sim_m)`` (ALBEF) when
    momentum features are given and ``a>0``; with knowledge guards, columns whose report carries the
    same non-empty positive finding set as the row's are removed from the row's negatives.
    Cross-entropy with soft targets = (1-a)*InfoNCE + a*(KL(p_m || p) + H(p_m)); the KL is reported.
    """

    def __init__(
        self,
        soft_alpha: float = 0.4,
        knowledge_negatives: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.soft_alpha = soft_alpha
        self.knowledge_negatives = knowledge_negatives
        self.rank, self.world_size = rank, world_size

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        image_m: Tensor | None = None,
        text_m: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        rank, world = dist_info(self.rank, self.world_size)
        n = image.shape[0]
        all_image = gather_features(image, world, with_grad=True)
        all_text = gather_features(text, world, with_grad=True)
        logits_i2t = logit_scale * image @ all_text.T  # (n, N)
        logits_t2i = logit_scale * text @ all_image.T
        target_idx = torch.arange(n, device=image.device) + rank * n
        onehot = F.one_hot(target_idx, all_image.shape[0]).to(image.dtype)

        out: dict[str, Tensor] = {}
        guard = None
        if self.knowledge_negatives and labels is not None:
            all_labels = gather_features(labels.detach(), world, with_grad=False)
            guard = same_finding_set(labels, all_labels) & ~onehot.bool()
            logits_i2t = logits_i2t.masked_fill(guard, NEG)
            logits_t2i = logits_t2i.masked_fill(guard, NEG)
            out["guarded_fraction"] = guard.float().mean().detach()

        use_soft = self.soft_alpha > 0 and image_m is not None and text_m is not None
        if use_soft:
            with torch.no_grad():
                all_image_m = gather_features(image_m, world, with_grad=False)
                all_text_m = gather_features(text_m, world, with_grad=False)
                scale = logit_scale.detach()
                sim_i2t_m = scale * image_m @ all_text_m.T
                sim_t2i_m = scale * text_m @ all_image_m.T
                if guard is not None:
                    sim_i2t_m = sim_i2t_m.masked_fill(guard, NEG)
                    sim_t2i_m = sim_t2i_m.masked_fill(guard, NEG)
                p_i2t_m = sim_i2t_m.softmax(1)
                p_t2i_m = sim_t2i_m.softmax(1)
                a = self.soft_alpha
                t_i2t = (1 - a) * onehot + a * p_i2t_m
                t_t2i = (1 - a) * onehot + a * p_t2i_m
            loss = 0.5 * (soft_cross_entropy(logits_i2t, t_i2t) + soft_cross_entropy(logits_t2i, t_t2i))
            with torch.no_grad():
                kl = 0.5 * (
                    F.kl_div(F.log_softmax(logits_i2t, 1), p_i2t_m, reduction="batchmean")
                    + F.kl_div(F.log_softmax(logits_t2i, 1), p_t2i_m, reduction="batchmean")
                )
            out["kl_online_momentum"] = kl
        else:
            loss = 0.5 * (F.cross_entropy(logits_i2t, target_idx) + F.cross_entropy(logits_t2i, target_idx))
        out["loss"] = loss
        with torch.no_grad():
            out["acc_i2t"] = (logits_i2t.argmax(1) == target_idx).float().mean()
            out["acc_t2i"] = (logits_t2i.argmax(1) == target_idx).float().mean()
        return out


# ---------------------------------------------------------------------------------------------
# Local: token-level (MGCA / MLIP)


def local_token_weights(token_mask: Tensor, token_entity: Tensor | None, knowledge_weight: float) -> Tensor:
    """(B,L) valid-token mask and entity indices -> (B,L) weights: 0 on padding, ``knowledge_weight``
    on tokens mapped to an entity, 1 elsewhere; each row sums to 1 (all-zero rows stay zero)."""
    w = token_mask.to(torch.float32)
    if token_entity is not None and knowledge_weight != 1.0:
        w = w * torch.where(token_entity >= 0, knowledge_weight, 1.0)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


class LocalAlignmentLoss(nn.Module):
    """Token-level InfoNCE between each token and the visual context it attends to (MGCA's word loss).

    ``forward(tokens (B,L,d), patches (B,P,d), token_mask (B,L) bool, weights (B,L))``, features
    L2-normalised. Token l of report b attends over the patches of image b with
    ``softmax(t_l . v_p / tau)``; its context ``c_l`` is normalised, and ``s_lk = t_l . c_k / tau``
    is contrasted both ways within the report (token l vs the contexts of the report's other tokens,
    context l vs the other tokens), padding masked out of rows and columns. Rows are weighted by
    ``weights`` (padding 0); the loss is sum(weights * CE) / B, as MGCA.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, tokens: Tensor, patches: Tensor, token_mask: Tensor, weights: Tensor) -> dict[str, Tensor]:
        B, L = token_mask.shape
        q = tokens * (1.0 / self.temperature)  # fold 1/tau into the smallest tensor
        attn = torch.softmax(q @ patches.transpose(1, 2), dim=-1)  # (B, L, P)
        context = F.normalize(attn @ patches, dim=-1)  # (B, L, d)
        sim = q @ context.transpose(1, 2)  # (B, L_token, L_context), already / tau
        mask = token_mask.bool()
        pad = (~mask).to(sim.dtype) * NEG  # (B, L): masks padded columns
        target = torch.arange(L, device=tokens.device).repeat(B)
        # rows = tokens over the report's contexts; rows = contexts over the report's tokens
        t2c = (sim + pad[:, None, :]).reshape(B * L, L)
        c2t = (sim.transpose(1, 2) + pad[:, None, :]).reshape(B * L, L)
        ce = F.cross_entropy(t2c, target, reduction="none") + F.cross_entropy(c2t, target, reduction="none")
        w = (weights * mask).reshape(-1)
        loss = (w * ce).sum() * (0.5 / B)
        with torch.no_grad():
            hit = (t2c.argmax(-1) == target) & mask.reshape(-1)
            acc = hit.sum() / mask.sum().clamp_min(1)
        return {"loss": loss, "token_acc": acc.float(), "attention": attn.detach()}


def local_alignment_loop(
    tokens: Tensor, patches: Tensor, token_mask: Tensor, weights: Tensor, temperature: float = 0.1
) -> Tensor:
    """The same formula as :class:`LocalAlignmentLoss` written per sample (reference and benchmark)."""
    total = tokens.new_zeros(())
    for b in range(tokens.shape[0]):
        valid = token_mask[b].bool()
        t, w = tokens[b][valid], weights[b][valid]
        attn = torch.softmax(t @ patches[b].T / temperature, dim=-1)
        c = F.normalize(attn @ patches[b], dim=-1)
        s = t @ c.T / temperature
        target = torch.arange(t.shape[0], device=t.device)
        total = total + 0.5 * ((w * F.cross_entropy(s, target, reduction="none")).sum()
                               + (w * F.cross_entropy(s.T, target, reduction="none")).sum())
    return total / tokens.shape[0]


# ---------------------------------------------------------------------------------------------
# Local: GLoRIA word-region attention


class GloriaLocalLoss(nn.Module):
    """GLoRIA's local loss (Huang et al., ICCV 2021) for every report-image pair at once.

    ``forward(words (B,L,d), regions (B,P,d), word_mask (B,L))``. For report t and image i, each word
    attends over the image's regions (GLoRIA's attention: softmax over words, then over regions
    sharpened by ``temp1``), the cosine of word and attended context is aggregated over valid words
    with ``log sum exp(temp2 * cos)``, and the (B,B) matrix of those scores times ``temp3`` is an
    InfoNCE both ways. GLoRIA loops over reports; this is one einsum over all pairs.
    """

    def __init__(self, temp1: float = 4.0, temp2: float = 5.0, temp3: float = 10.0) -> None:
        super().__init__()
        self.temp1, self.temp2, self.temp3 = temp1, temp2, temp3

    def forward(self, words: Tensor, regions: Tensor, word_mask: Tensor) -> dict[str, Tensor]:
        mask = word_mask.bool()  # (T, L)
        raw = torch.einsum("tld,ipd->tilp", words, regions)  # (T, I, L, P)
        # softmax over words (padding excluded), then sharpened softmax over regions
        a = raw.masked_fill(~mask[:, None, :, None], NEG).softmax(dim=2)
        a = (a * self.temp1).softmax(dim=3)
        context = torch.einsum("tilp,ipd->tild", a, regions)  # (T, I, L, d)
        cos = F.cosine_similarity(words[:, None], context, dim=-1)  # (T, I, L)
        score = (cos * self.temp2).masked_fill(~mask[:, None, :], NEG).logsumexp(dim=2)  # (T, I)
        logits_t2i = score * self.temp3
        target = torch.arange(words.shape[0], device=words.device)
        loss = 0.5 * (F.cross_entropy(logits_t2i, target) + F.cross_entropy(logits_t2i.T, target))
        with torch.no_grad():
            acc = (logits_t2i.argmax(1) == target).float().mean()
        return {"loss": loss, "acc_t2i": acc}


# ---------------------------------------------------------------------------------------------
# Category level


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, world_size: int = 1) -> Tensor:
    """SwAV's Sinkhorn-Knopp: (B,K) prototype scores -> (B,K) soft assignments whose rows sum to 1 and
    whose columns each receive about B/K of the mass (equipartition over the global batch)."""
    top = scores.float().max()
    if world_size > 1:  # one shift for all ranks, else their shards would be scaled differently
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = (scores.float() - top) / epsilon
    q = torch.exp(q).T  # (K, B)
    total = q.sum()
    if world_size > 1:
        dist.all_reduce(total)
    q /= total
    K, B = q.shape
    B_global = B * world_size
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if world_size > 1:
            dist.all_reduce(rows)
        q /= rows
        q /= K
        q /= q.sum(dim=0, keepdim=True)
        q /= B_global
    q *= B_global
    return q.T


def supervised_contrastive(features: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon (Khosla et al. 2020) with positives = pairs sharing at least one positive finding.

    (B,d) normalised features, (B,14) CheXpert labels -> (); anchors without a positive are skipped.
    """
    pos_labels = (labels == 1).to(features.dtype)
    B = features.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=features.device)
    positive = ((pos_labels @ pos_labels.T) > 0) & ~eye
    logits = (features @ features.T / temperature).masked_fill(eye, NEG)
    log_prob = F.log_softmax(logits, dim=1)
    n_pos = positive.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return features.sum() * 0.0
    mean_log_prob_pos = (log_prob * positive).sum(1)[has] / n_pos[has]
    return -mean_log_prob_pos.mean()


class CategoryLoss(nn.Module):
    """Swapped prediction over prototypes (MGCA's prototype loss) + supervised contrastive.

    ``forward(image (B,d), text (B,d), prototypes (K,d), labels (B,14)|None)``, all normalised.
    Codes come from Sinkhorn on each modality's scores and are predicted from the other modality's
    ``softmax(scores / tau)``.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        epsilon: float = 0.05,
        iterations: int = 3,
        supcon: bool = True,
        supcon_temperature: float = 0.1,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, iterations
        self.supcon, self.supcon_temperature = supcon, supcon_temperature
        self.world_size = world_size

    def forward(self, image: Tensor, text: Tensor, prototypes: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        world = dist_info()[1] if self.world_size is None else self.world_size
        s_img = image @ prototypes.T  # (B, K)
        s_txt = text @ prototypes.T
        q_img = sinkhorn(s_img.detach(), self.epsilon, self.iterations, world)
        q_txt = sinkhorn(s_txt.detach(), self.epsilon, self.iterations, world)
        swapped = 0.5 * (
            soft_cross_entropy(s_img / self.temperature, q_txt) + soft_cross_entropy(s_txt / self.temperature, q_img)
        )
        out = {"swapped": swapped.detach()}
        loss = swapped
        if self.supcon and labels is not None:
            sc = supervised_contrastive(image, labels, self.supcon_temperature)
            out["supcon"] = sc.detach()
            loss = loss + sc
        out["loss"] = loss
        with torch.no_grad():
            out["code_agreement"] = (q_img.argmax(1) == q_txt.argmax(1)).float().mean()
        return out


# ---------------------------------------------------------------------------------------------
# Proxy tasks


@torch.no_grad()
def mine_hard_negatives(sim: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ALBEF's hard-negative sampling from a (B,B) image-text similarity: for each image a text, for
    each text an image, drawn with probability softmax(sim) over the non-positives (diagonal and
    ``exclude`` removed; a row with none left falls back to any other sample). -> (neg_text_idx (B,),
    neg_image_idx (B,))."""
    B = sim.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    banned = eye if exclude is None else (eye | exclude)
    # rows where everything is banned fall back to "anything but itself"
    empty = banned.all(1, keepdim=True)
    banned_i2t = torch.where(empty, eye, banned)
    banned_t2i_src = banned.T
    banned_t2i = torch.where(banned_t2i_src.all(1, keepdim=True), eye, banned_t2i_src)
    w_i2t = sim.float().softmax(1).masked_fill(banned_i2t, 0) + (~banned_i2t) * 1e-8
    w_t2i = sim.float().T.softmax(1).masked_fill(banned_t2i, 0) + (~banned_t2i) * 1e-8
    neg_text = torch.multinomial(w_i2t, 1).squeeze(1)
    neg_image = torch.multinomial(w_t2i, 1).squeeze(1)
    return neg_text, neg_image


def itm_loss(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Image-text matching: (N,2) logits, (N,) 1 = matched -> cross-entropy and accuracy."""
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():
        acc = (logits.argmax(1) == targets).float().mean()
    return {"loss": loss, "acc": acc}


def swap_loss(logits: Tensor, swapped: Tensor) -> dict[str, Tensor]:
    """Text swap: (B,) logits, (B,) 1 = report altered -> BCE and accuracy."""
    target = swapped.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    with torch.no_grad():
        acc = ((logits > 0).to(target.dtype) == target).float().mean()
    return {"loss": loss, "acc": acc}
