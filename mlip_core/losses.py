"""The losses of MLIP and of the baselines, as small ``nn.Module``s that return named outputs.

Each module returns a dict with ``loss`` plus diagnostics (accuracies, KL, entropies). The global loss
knows ``rank``/``world_size`` and gathers features itself, as open_clip's ``ClipLoss`` does
(github.com/mlfoundations/open_clip, src/open_clip/loss.py), so the training loop stays simple:
features of the local shard keep their gradient, the other ranks' arrive as constants, and the rows of
the local shard are contrasted against the *global* batch. Everything is vectorised over the batch.

Terms (assembled per config in :mod:`mlip_core.objective`):
- :class:`GlobalContrastiveLoss` — InfoNCE both ways, learnable temperature, soft targets from the
  divergence (momentum) encoder as in ALBEF (arXiv 2107.07651), knowledge-guarded negatives; per-call
  ``alpha`` (ALBEF's warm-up) and direction weights (ConVIRT's lambda, arXiv 2010.00747).
- :class:`LocalAlignmentLoss` — token-level InfoNCE between tokens and their attended patches, both
  CE directions, as MGCA's word loss (arXiv 2210.06044); with knowledge-fused tokens and token weights
  it is MLIP's token-knowledge-patch alignment.
- :class:`MGCALocalLoss` — MGCA's bidirectional token-level loss (word->patch and patch->word), with
  :func:`clipped_attention_weights` for its attention-derived weights.
- :class:`GloriaLocalLoss` — GLoRIA's word-region attention loss (Huang et al., ICCV 2021) on
  unnormalised features, all pairs at once, chunked; :func:`gloria_local_loop` is GLoRIA's loop,
  :func:`gloria_attention` its attention, :func:`aggregate_wordpieces` its sub-word aggregation.
- :class:`CategoryLoss` — Sinkhorn-Knopp swapped prediction over prototypes (SwAV / MGCA) and a
  supervised contrastive term (Khosla et al. 2020) on report labels (off by default).
- :func:`mine_hard_negatives`, :func:`itm_loss`, :func:`swap_loss` — ALBEF's hard negatives drawn with a
  temperature, and the proxy tasks' cross-entropies.

Line numbers cited for the original code: marshuang80/gloria at 9f0cfcf (gloria/loss/gloria_loss.py,
gloria/models/text_model.py), 8ae01f8 (gloria/models/gloria_model.py), e023ea6
(configs/pretrain/chexpert_gloria_pretrain_config.yaml); HKU-MedAI/MGCA at 0fe1c3b
(mgca/models/mgca/mgca_module.py); salesforce/ALBEF at 90541c9 (models/model_pretrain.py, Pretrain.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mlip_core.knowledge.graph import CHEXPERT_14

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


NO_FINDING = CHEXPERT_14.index("No Finding")


def positive_findings(labels: Tensor) -> Tensor:
    """(n,14) CheXpert labels (columns in :data:`~mlip_core.knowledge.graph.CHEXPERT_14` order) -> (n,14) float,
    1 where a finding is positive (==1; NaN/0/-1 are not). The "No Finding" column is always 0: it says the
    set of findings is empty, so it is not a finding two studies can share. Counted as one, the knowledge guard
    took every normal-normal pair out of the negatives and SupCon pulled every normal image to one point (64 %
    of the offline world's training studies, about a third of MIMIC-CXR's, are labelled No Finding); telling
    near-identical normal reports apart is the divergence encoder's soft targets' job, not the guard's."""
    if labels.shape[-1] != len(CHEXPERT_14):
        raise ValueError(f"labels have {labels.shape[-1]} columns; expected the {len(CHEXPERT_14)} CheXpert "
                         "observations in mlip_core.knowledge.graph.CHEXPERT_14 order")
    positive = (labels == 1).to(torch.float32)
    positive[..., NO_FINDING] = 0.0
    return positive


def same_finding_set(labels: Tensor, other: Tensor | None = None) -> Tensor:
    """(n,14),(N,14) CheXpert labels -> (n,N) bool: both rows have the same *non-empty* set of
    :func:`positive_findings` (so two normal studies are not "the same set")."""
    other = labels if other is None else other
    a = positive_findings(labels)
    b = positive_findings(other)
    shared = a @ b.T
    ca, cb = a.sum(1), b.sum(1)
    return (shared == ca[:, None]) & (shared == cb[None, :]) & (ca[:, None] > 0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij * log_softmax(logits)_ij; (n,N),(n,N) -> ()."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class GlobalContrastiveLoss(nn.Module):
    """Image-report InfoNCE both ways with soft targets from a momentum encoder and knowledge guards.

    ``forward(image (n,d), text (n,d), logit_scale (), image_m (n,d)|None, text_m (n,d)|None,
    labels (n,14)|None, alpha=None)``, features L2-normalised. Rows of the local shard are contrasted
    against the gathered global batch. Targets: ``(1-a)*onehot + a*softmax(logit_scale * sim_m)`` (ALBEF
    salesforce/ALBEF models/model_pretrain.py L113-120) when momentum features are given and ``a>0``;
    ``alpha`` overrides ``soft_alpha`` for one call (ALBEF's warm-up, Pretrain.py L61-64:
    ``alpha * min(1, i / len(loader))`` in epoch 0). With knowledge guards, columns whose report carries
    the same non-empty positive finding set as the row's are removed from the row's negatives.

    ``loss = i2t_weight * L(image->text) + t2i_weight * L(text->image)``; ``t2i_weight=None`` means
    ``1 - i2t_weight``. Default 0.5/0.5 (symmetric mean). ConVIRT (arXiv 2010.00747, Sec. 2.2: the
    lambda-weighted sum of l(v->u) and l(u->v)) puts lambda=0.75 on image->text: ``i2t_weight=0.75``.
    GLoRIA (gloria/models/gloria_model.py L80) and MGCA (mgca_module.py L104-109) *sum* both
    directions: ``i2t_weight=1.0, t2i_weight=1.0``.
    Cross-entropy with soft targets = (1-a)*InfoNCE + a*(KL(p_m || p) + H(p_m)); the KL is reported.
    """

    def __init__(
        self,
        soft_alpha: float = 0.4,
        knowledge_negatives: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        i2t_weight: float = 0.5,
        t2i_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.soft_alpha = soft_alpha
        self.knowledge_negatives = knowledge_negatives
        self.rank, self.world_size = rank, world_size
        self.i2t_weight = i2t_weight
        self.t2i_weight = 1.0 - i2t_weight if t2i_weight is None else t2i_weight

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        image_m: Tensor | None = None,
        text_m: Tensor | None = None,
        labels: Tensor | None = None,
        alpha: float | None = None,
    ) -> dict[str, Tensor]:
        rank, world = dist_info(self.rank, self.world_size)
        a = self.soft_alpha if alpha is None else float(alpha)
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

        use_soft = a > 0 and image_m is not None and text_m is not None
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
                t_i2t = (1 - a) * onehot + a * p_i2t_m
                t_t2i = (1 - a) * onehot + a * p_t2i_m
            loss_i2t = soft_cross_entropy(logits_i2t, t_i2t)
            loss_t2i = soft_cross_entropy(logits_t2i, t_t2i)
            with torch.no_grad():
                kl = 0.5 * (
                    F.kl_div(F.log_softmax(logits_i2t, 1), p_i2t_m, reduction="batchmean")
                    + F.kl_div(F.log_softmax(logits_t2i, 1), p_t2i_m, reduction="batchmean")
                )
            out["kl_online_momentum"] = kl
        else:
            loss_i2t = F.cross_entropy(logits_i2t, target_idx)
            loss_t2i = F.cross_entropy(logits_t2i, target_idx)
        out["loss"] = self.i2t_weight * loss_i2t + self.t2i_weight * loss_t2i
        out["loss_i2t"], out["loss_t2i"] = loss_i2t.detach(), loss_t2i.detach()
        out["alpha"] = torch.tensor(a if use_soft else 0.0, device=image.device)
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


def masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """(B,N) values, (B,N) bool -> (B,) the q-quantile of each row's valid entries, with
    ``torch.quantile``'s default linear interpolation (index ``q*(n-1)``); rows with no valid entry -> 0."""
    n = mask.sum(1)
    srt = x.masked_fill(~mask, float("inf")).sort(dim=1).values
    pos = q * (n - 1).clamp_min(0).to(x.dtype)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo = srt.gather(1, lo[:, None]).squeeze(1)
    v_hi = srt.gather(1, hi[:, None]).squeeze(1)
    out = v_lo + (pos - lo.to(x.dtype)) * (v_hi - v_lo)
    return torch.where(n > 0, out, torch.zeros_like(out))


@torch.no_grad()
def clipped_attention_weights(attn: Tensor, mask: Tensor | None = None, low: float = 0.1, high: float = 0.9) -> Tensor:
    """MGCA's token/patch weights: (B,N) [CLS]->token attention, (B,N) valid mask (None = all valid)
    -> (B,N) weights. Each row's valid entries are clipped to their ``low``/``high`` quantiles, the rest
    set to 0, and the row renormalised to sum 1 (a row with no valid entry stays 0). Vectorised version of
    HKU-MedAI/MGCA mgca/models/mgca/mgca_module.py L140-152 (words: quantiles over the non-zero, i.e.
    non-padding, entries) and L193-204 (ViT patches: over all patches)."""
    attn = attn.float()
    mask = torch.ones_like(attn, dtype=torch.bool) if mask is None else mask.bool()
    lo = masked_quantile(attn, mask, low)[:, None]
    hi = masked_quantile(attn, mask, high)[:, None]
    w = torch.minimum(torch.maximum(attn, lo), hi) * mask
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


class _AttendContrast(torch.autograd.Function):
    """``sum_n w_n (log p_row + log p_col)_nn`` of :func:`attend_and_contrast` with a hand-written backward:
    ``forward(queries, keys, query_mask, key_mask, w, 1/tau, normalize)`` -> (total (), row hits (B,N) bool,
    attention (B,N,M)).

    Autograd's version of the same formula spent as long in element-wise passes over its (B,N,N) and (B,N,d)
    intermediates as in its products. Here each intermediate is formed once: ``|c_k|^2 = a_k^T G a_k`` with
    each sample's key Gram matrix G = K K^T (never the (N,d) context; GLoRIA's loss below uses the same
    identity), the two softmaxes of the (N,N) logits are kept for the backward (their log at the diagonal is
    the loss), and the backward is six batched products and a few fused passes."""

    @staticmethod
    def forward(ctx, queries, keys, query_mask, key_mask, w, inv_tau, normalize):
        att = torch.bmm(queries, keys.transpose(1, 2)).mul_(inv_tau)  # (B, N, M) = q . k / tau
        if key_mask is not None:  # masked keys get attention exactly 0 (exp underflows)
            att.masked_fill_(~key_mask[:, None, :], NEG)
        attn = torch.softmax(att, dim=-1)
        # s_nk = (q_n / tau) . c_k = sum_m att_nm attn_km: an (N,M,N) product instead of forming q / tau
        raw = torch.bmm(att, attn.transpose(1, 2))  # (B, N_query, N_context)
        ag = cn2 = r = None
        sim = raw
        if normalize:  # q . c/|c|: scale the (N,N) columns
            ag = torch.bmm(attn, torch.bmm(keys, keys.transpose(1, 2)))  # G a_k, (B, N, M)
            cn2 = torch.linalg.vecdot(attn, ag)  # (B, N)
            r = cn2.clamp_min(1e-24).rsqrt_()
            sim = raw * r[:, None, :]
        if query_mask is not None:  # invalid queries leave every row's and every column's softmax
            pad = (~query_mask).to(sim.dtype).mul_(NEG)
            sim = sim.add_(pad[:, None, :]) if normalize else sim + pad[:, None, :]  # raw is kept when normalised
            sim.add_(pad[:, :, None])
        p_row, p_col = torch.softmax(sim, 2), torch.softmax(sim, 1)
        d_row, d_col = p_row.diagonal(dim1=1, dim2=2), p_col.diagonal(dim1=1, dim2=2)
        tiny = torch.finfo(sim.dtype).tiny * 2**20  # below, log(p) loses digits: take the log-softmax itself
        # (one host sync; a loss of > 70 nats per token is rare enough that the log-softmaxes are not worth it)
        if bool(((d_row < tiny) | (d_col < tiny)).any()):
            lp = torch.log_softmax(sim, 2).diagonal(dim1=1, dim2=2) + torch.log_softmax(sim, 1).diagonal(dim1=1, dim2=2)
        else:
            lp = torch.log(d_row) + torch.log(d_col)
        hit = sim.diagonal(dim1=1, dim2=2) >= sim.amax(2)  # the row's argmax is its own context
        ctx.save_for_backward(queries, keys, w, att, attn, raw, ag, cn2, r, p_row, p_col, lp)
        ctx.inv_tau, ctx.normalize = inv_tau, normalize
        ctx.mark_non_differentiable(hit, attn)
        return torch.linalg.vecdot(w.reshape(-1), lp.reshape(-1)), hit, attn

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _d_hit, _d_attn):
        queries, keys, w, att, attn, raw, ag, cn2, r, p_row, p_col, lp = ctx.saved_tensors
        # d total / d sim_nk = 2 w_n [n=k] - w_n p_row_nk - w_k p_col_nk
        d_sim = p_row * (-g * w)[:, :, None]
        d_sim.addcmul_(p_col, (-g * w)[:, None, :]).diagonal(dim1=1, dim2=2).add_(2 * g * w)
        d_raw = d_sim
        if ctx.normalize:
            d_raw = d_sim * r[:, None, :]
            d_r = torch.linalg.vecdot(d_sim, raw, dim=1)  # (B, N)
            d_cn2 = d_r.mul_(r.pow(3)).mul_(-0.5).masked_fill_(cn2 < 1e-24, 0.0)
        d_attn = torch.bmm(d_raw.transpose(1, 2), att)  # raw = att attn^T
        d_att = torch.bmm(d_raw, attn)
        if ctx.normalize:
            d_attn.addcmul_(ag, d_cn2[:, :, None], value=2.0)  # |c|^2 = a^T G a
            d_gram = torch.bmm(attn.transpose(1, 2), attn * d_cn2[:, :, None])  # (B, M, M), symmetric
        d_att += torch._softmax_backward_data(d_attn, attn, 2, attn.dtype)  # masked keys: attn 0, gradient 0
        d_att.mul_(ctx.inv_tau)
        d_q = torch.bmm(d_att, keys) if ctx.needs_input_grad[0] else None
        d_k = None
        if ctx.needs_input_grad[1]:
            d_k = torch.bmm(d_att.transpose(1, 2), queries)
            if ctx.normalize:
                d_k.baddbmm_(d_gram, keys, alpha=2.0)  # G = K K^T
        d_w = lp * g if ctx.needs_input_grad[4] else None
        return d_q, d_k, None, None, d_w, None, None


def attend_and_contrast(
    queries: Tensor,
    keys: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    weights: Tensor,
    temperature: float,
    normalize_context: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of MGCA's token-level loss, vectorised over the batch.

    queries (B,N,d), keys (B,M,d) L2-normalised; masks (B,N)/(B,M) bool or None (all valid);
    weights (B,N). Query n of sample b attends over the sample's valid keys with
    ``softmax(q_n . k_m / tau)``; its context ``c_n`` (normalised unless ``normalize_context=False``)
    and ``s_nk = q_n . c_k / tau`` are contrasted both ways within the sample (query n vs the contexts
    of the sample's other queries, context n vs the other queries), invalid queries masked out of rows
    and columns. Returns (loss = sum(weights * (CE_row + CE_col) / 2) / B, accuracy of the row
    direction over valid queries, attention (B,N,M) detached). Both cross-entropies come from one
    masked (B,N,N) matrix: the diagonals of its softmax along each axis. Computed in float32 (or float64)
    with a hand-written backward (:class:`_AttendContrast`); :func:`local_alignment_loop` is the reference.
    """
    qm = None if query_mask is None else query_mask.bool()
    km = None if key_mask is None else key_mask.bool()
    dtype = torch.promote_types(queries.dtype, torch.float32)  # half precision computes in float32
    w = weights.to(dtype) if qm is None else weights.to(dtype) * qm
    with torch.autocast(queries.device.type, enabled=False):
        total, hit, attn = _AttendContrast.apply(queries.to(dtype), keys.to(dtype), qm, km, w, 1.0 / temperature,
                                                 normalize_context)
    loss = total * (-0.5 / queries.shape[0])
    with torch.no_grad():
        acc = hit.float().mean() if qm is None else (hit & qm).sum() / qm.sum().clamp_min(1)
    return loss.to(queries.dtype), acc.float(), attn.to(queries.dtype)


class LocalAlignmentLoss(nn.Module):
    """Token-level InfoNCE between each token and the visual context it attends to (MGCA's word loss,
    HKU-MedAI/MGCA mgca/models/mgca/mgca_module.py L124-168; MGCA's default ``use_local_atten=False``
    (L48) is this dot-product attention, not its MultiheadAttention layer).

    ``forward(tokens (B,L,d), patches (B,P,d), token_mask (B,L) bool, weights (B,L))``, features
    L2-normalised. Token l of report b attends over the patches of image b with
    ``softmax(t_l . v_p / tau)``; its context ``c_l`` is normalised, and ``s_lk = t_l . c_k / tau``
    is contrasted both ways within the report, padding masked out of rows and columns. Rows are weighted
    by ``weights`` (padding 0); the loss is sum(weights * CE) / B averaged over the two CE directions,
    as MGCA. With knowledge-fused tokens and knowledge-heavy weights this is MLIP's
    token-knowledge-patch alignment. See :func:`attend_and_contrast`.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, tokens: Tensor, patches: Tensor, token_mask: Tensor, weights: Tensor) -> dict[str, Tensor]:
        loss, acc, attn = attend_and_contrast(tokens, patches, token_mask, None, weights, self.temperature)
        return {"loss": loss, "token_acc": acc, "attention": attn}


class MGCALocalLoss(nn.Module):
    """MGCA's bidirectional token-level loss: word->patch plus patch->word (HKU-MedAI/MGCA
    mgca/models/mgca/mgca_module.py L119-223; ``loss = loss_word + loss_patch``, L223).

    ``forward(words (B,L,d), patches (B,P,d), word_mask (B,L), word_weights (B,L),
    patch_weights (B,P)|None)``, features L2-normalised (MGCA L89, L97), temperature 0.1 (L44).
    - word direction: each word attends over its image's patches, contrasted within the report
      (as :class:`LocalAlignmentLoss`), weighted by ``word_weights`` — MGCA's are the text tower's
      last-layer [CLS]->token attention clipped to its 10%/90% quantiles and renormalised
      (:func:`clipped_attention_weights`).
    - patch direction (``patch_direction=True``): each patch attends over its report's words (padding
      masked, L176-181), contrasted within the image, weighted by ``patch_weights`` — MGCA's are the
      ViT's last-block [CLS]->patch attention (mean over heads) clipped likewise (L191-204). A CNN has
      no [CLS] attention: pass ``patch_weights=None`` for uniform 1/P, as MGCA does (L185-189).
    ``normalize_patch_context``: MGCA normalises the patch->word context only for CNN towers
    (L185-186); for a ViT it leaves it unnormalised. Default True (normalised).
    Returns ``loss``, ``loss_word``, ``loss_patch`` (0 when off), ``word_acc``, ``patch_acc``,
    ``attention`` (B,L,P) word->patch.
    """

    def __init__(
        self, temperature: float = 0.1, patch_direction: bool = True, normalize_patch_context: bool = True
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.patch_direction = patch_direction
        self.normalize_patch_context = normalize_patch_context

    def forward(
        self,
        words: Tensor,
        patches: Tensor,
        word_mask: Tensor,
        word_weights: Tensor,
        patch_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        mask = word_mask.bool()
        loss_word, word_acc, attn = attend_and_contrast(words, patches, mask, None, word_weights, self.temperature)
        out = {"loss_word": loss_word.detach(), "word_acc": word_acc, "attention": attn}
        loss = loss_word
        if self.patch_direction:
            B, P = patches.shape[:2]
            pw = patches.new_full((B, P), 1.0 / P) if patch_weights is None else patch_weights.to(patches.dtype)
            loss_patch, patch_acc, _ = attend_and_contrast(
                patches, words, None, mask, pw, self.temperature, self.normalize_patch_context
            )
            loss = loss + loss_patch
            out["loss_patch"], out["patch_acc"] = loss_patch.detach(), patch_acc
        else:
            out["loss_patch"] = loss_word.new_zeros(()).detach()
        out["loss"] = loss
        return out


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


def aggregate_wordpieces(tokens: Tensor, word_index: Tensor) -> tuple[Tensor, Tensor]:
    """GLoRIA's sub-word aggregation, vectorised: tokens (B,L,D), word_index (B,L) long (the word each
    token belongs to, 0..W-1 per report; -1 for tokens to drop: padding, or specials the caller does
    not count as words) -> (words (B,W,D), word_mask (B,W) bool), W = max index + 1 over the batch.

    The pieces of a word are *summed*, as marshuang80/gloria gloria/models/text_model.py
    ``aggregate_tokens`` does (L54-56 and L68-70: ``torch.stack(token_bank).sum(axis=0)``); padding
    words are zero vectors (L82-87). GLoRIA keeps [CLS] as word 0 and [SEP] as the last word, and its
    local loss then uses the first ``n_words + 1`` words, i.e. [CLS] + words without [SEP]
    (gloria_model.py L53-55, gloria_loss.py L98-101): to match, give [CLS] index 0 and [SEP] -1.
    MGCA sums the pieces' [CLS] attention the same way (encoder.py ``aggregate_tokens``): pass the
    attention as a (B,L,1) tensor.
    """
    B, L, D = tokens.shape
    idx = word_index.long()
    W = int(idx.max().item()) + 1 if idx.numel() else 0
    W = max(W, 1)
    valid = idx >= 0
    flat = (torch.arange(B, device=tokens.device)[:, None] * W + idx.clamp_min(0)).reshape(-1)
    src = (tokens * valid[..., None].to(tokens.dtype)).reshape(B * L, D)
    words = tokens.new_zeros(B * W, D).index_add(0, flat, src).view(B, W, D)
    count = torch.zeros(B * W, device=tokens.device, dtype=torch.long).index_add(0, flat, valid.reshape(-1).long())
    return words, count.view(B, W) > 0


def gloria_attention(words: Tensor, regions: Tensor, temp1: float = 4.0, word_mask: Tensor | None = None) -> Tensor:
    """GLoRIA's word->region attention for every report-image pair (marshuang80/gloria
    gloria/loss/gloria_loss.py ``attention_fn`` L20-58): words (T,L,D), regions (I,P,D), both
    *unnormalised*, word_mask (T,L) -> (T,I,L,P). ``raw = word . region`` (L37), softmax over the
    report's words for each region (L39-40), times ``temp1`` (L48), softmax over regions (L49).
    Memory T*I*L*P: meant for tests and figures; the loss never materialises it."""
    raw = torch.einsum("tld,ipd->tipl", words, regions)  # (T, I, P, L)
    if word_mask is not None:
        raw = raw.masked_fill(~word_mask.bool()[:, None, None, :], float("-inf"))
    a1 = raw.softmax(-1).transpose(2, 3)  # (T, I, L, P)
    return (a1 * temp1).softmax(-1)


def _gloria_plan(lengths: list[int], chunk_words: int) -> list[list[int]]:
    """Reports sorted by length and cut into chunks of at most ``chunk_words`` padded words
    (count x longest), so that each chunk pads only to its own longest report."""
    order = sorted(range(len(lengths)), key=lambda t: lengths[t])
    chunks: list[list[int]] = []
    cur: list[int] = []
    for t in order:  # lengths ascending: the newcomer is the chunk's longest
        if cur and lengths[t] * (len(cur) + 1) > chunk_words:
            chunks.append(cur)
            cur = []
        cur.append(t)
    if cur:
        chunks.append(cur)
    return chunks


def _gloria_chunk(words: Tensor, pos: Tensor, lengths: Tensor, chunk: list[int], R2: Tensor, G: Tensor,
                  temp1: float, temp2: float, kept: tuple | None = None) -> dict:
    """Forward of one chunk of c reports (padded to its longest, Lk words) against all I images.

    Layout (I, P, M), M = c*Lk. ``raw`` is one GEMM of all images' regions with the chunk's words. The
    context ``c = sum_p a_p r_p`` is never formed: ``w.c = sum_p a_p raw_p`` and ``|c|^2 = a^T G a``
    with the images' Gram matrices G = R R^T (I,P,P). Padding words are zero vectors whose ``raw`` is
    set (in place) far below every real word's, so the softmax over words gives them exactly 0 while
    ``raw`` stays finite. ``kept`` = the forward's (raw, q, small) to skip recomputing them."""
    dev = words.device
    ids = torch.tensor(chunk, device=dev)
    c, Lk = len(chunk), int(lengths[ids].max())
    I, P = G.shape[:2]
    M = c * Lk
    pk = pos[ids, :Lk]  # each report's word positions, valid first
    mk = torch.arange(Lk, device=dev)[None, :] < lengths[ids][:, None]  # (c, Lk)
    Wf = (words[ids[:, None], pk] * mk[..., None]).reshape(M, -1)  # padding words zeroed
    out = {"ids": ids, "c": c, "Lk": Lk, "pk": pk, "mk": mk, "Wf": Wf}
    raw, q, small = kept if kept is not None else (None, None, None)
    if raw is None:
        raw = R2 @ Wf.T  # (I*P, M)
        if not bool(mk.all()):
            low = -(R2.norm(dim=1).max() * Wf.norm(dim=1).max() + 1.0e4)  # < every real raw by >= 1e4
            raw.view(I, P, c, Lk).masked_fill_(~mk, low)
    rawf = raw.view(I, P, M)
    a1 = torch.softmax(raw.view(I, P, c, Lk), dim=-1)  # over the report's words, per region (gloria_loss.py L40)
    a2 = torch.softmax(a1 * temp1, dim=1)  # over regions (L48-49)
    a2f = a2.view(I, P, M)
    if q is None:
        q = torch.bmm(G, a2f)  # G a (I, P, M)
    if small is None:
        num = (a2f * rawf).sum(1)  # w . c  (I, M)
        cn2 = (a2f * q).sum(1).clamp_min_(0)  # |c|^2
        wn = Wf.norm(dim=1)  # (M,)
        prod = wn * cn2.sqrt()
        cos = num / prod.clamp_min(1e-8)  # gloria_loss.py L17: w.c / (|w||c|).clamp(min=eps)
        e = (cos * temp2).view(I, c, Lk).masked_fill(~mk, float("-inf"))
        small = (cn2, wn, prod, cos, e)
    out.update(raw=raw, rawf=rawf, a1=a1, a2f=a2f, q=q, small=small)
    return out


class _GloriaScores(torch.autograd.Function):
    """(T,I) matrix ``log sum_l exp(temp2 * cos(w_l, c_l))`` of GLoRIA's local loss, chunked over
    reports with a hand-written backward. ``cache``: what the forward keeps per chunk for the backward
    ("none": recompute everything, memory = one chunk; "raw": the (I*P, M) scores; "raw+q": also G a);
    the softmaxes are always recomputed."""

    @staticmethod
    def forward(ctx, words, regions, pos, lengths, temp1, temp2, mean_agg, chunk_words, want_attn, cache):
        T, L, D = words.shape
        I, P, _ = regions.shape
        R2 = regions.reshape(I * P, D)
        G = torch.bmm(regions, regions.transpose(1, 2))  # (I, P, P)
        scores = words.new_zeros(T, I)
        attn = words.new_zeros(T, L, P) if want_attn else words.new_zeros(0)
        plan = _gloria_plan(lengths.tolist(), chunk_words)
        kept = []
        for chunk in plan:
            ch = _gloria_chunk(words, pos, lengths, chunk, R2, G, temp1, temp2)
            ids, c, Lk = ch["ids"], ch["c"], ch["Lk"]
            s = ch["small"][-1].logsumexp(-1)  # (I, c)
            if mean_agg:
                s = s - lengths[ids].to(s.dtype).log()[None, :]
            scores[ids] = s.T
            if want_attn:  # the matched pairs' attention, GLoRIA's att_maps
                diag = ch["a2f"].view(I, P, c, Lk)[ids, :, torch.arange(c, device=words.device)]  # (c, P, Lk)
                attn[ids[:, None], ch["pk"]] = diag.transpose(1, 2) * ch["mk"][..., None]
            kept.append((ch["raw"] if cache != "none" else None, ch["q"] if cache == "raw+q" else None, ch["small"]))
            del ch
        ctx.save_for_backward(words, regions, pos, lengths, G)
        ctx.plan, ctx.kept, ctx.args = plan, kept, (temp1, temp2)
        ctx.mark_non_differentiable(attn)
        return scores, attn

    @staticmethod
    def backward(ctx, d_scores, _d_attn):
        words, regions, pos, lengths, G = ctx.saved_tensors
        temp1, temp2 = ctx.args
        I, P, D = regions.shape
        R2 = regions.reshape(I * P, D)
        d_words = torch.zeros_like(words)
        d_R2 = torch.zeros_like(R2)
        d_G = torch.zeros_like(G)
        for k, chunk in enumerate(ctx.plan):
            kept, ctx.kept[k] = ctx.kept[k], None
            ch = _gloria_chunk(words, pos, lengths, chunk, R2, G, temp1, temp2, kept)
            del kept
            ids, c, Lk, mk, pk, Wf = ch["ids"], ch["c"], ch["Lk"], ch["mk"], ch["pk"], ch["Wf"]
            M = c * Lk
            cn2, wn, prod, cos, e = ch["small"]
            d_cos = (torch.softmax(e, -1) * (d_scores[ids].T[..., None] * temp2)).view(I, M)  # 0 on padding
            d_num = d_cos / prod.clamp_min(1e-8)
            g = torch.where(prod > 1e-8, -d_cos * cos, torch.zeros_like(cos))  # cos = num / (|w||c|)
            d_cn2 = g / (2 * cn2).clamp_min(1e-30)  # d|c|^2 = d|c| / (2|c|), d|c| = g / |c|
            d_wn = (g / wn.clamp_min(1e-30)).sum(0)  # (M,)
            a1, a2f = ch["a1"], ch["a2f"]
            d_G.baddbmm_(a2f * d_cn2[:, None, :], a2f.transpose(1, 2))
            # d a2 = d_num * raw + 2 d|c|^2 * (G a); temp1 of the softmax over regions folded in
            d_a2 = ch["q"].mul_((2 * temp1) * d_cn2[:, None, :]).addcmul_(ch["rawf"], (temp1 * d_num)[:, None, :])
            del ch
            d_a1 = torch._softmax_backward_data(d_a2, a2f, 1, a2f.dtype).view(I, P, c, Lk)  # over regions
            del d_a2
            d_raw = torch._softmax_backward_data(d_a1, a1, 3, a1.dtype).view(I, P, M)  # over words
            del d_a1, a1
            d_raw2 = d_raw.addcmul_(a2f, d_num[:, None, :]).view(I * P, M)  # + the direct w.c term
            del a2f
            d_Wf = torch.addmm((d_wn / wn.clamp_min(1e-30))[:, None] * Wf, d_raw2.T, R2)
            d_R2.addmm_(d_raw2, Wf)
            del d_raw, d_raw2
            d_words[ids[:, None], pk] = (d_Wf.view(c, Lk, D) * mk[..., None]).to(d_words.dtype)
        d_regions = d_R2.view(I, P, D).baddbmm_(d_G, regions, alpha=2.0)  # G = R R^T, dG symmetric
        return d_words, d_regions, None, None, None, None, None, None, None, None


def gloria_local_scores(
    words: Tensor,
    regions: Tensor,
    word_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    agg: str = "sum",
    chunk_words: int = 512,
    return_attention: bool = False,
    cache: str = "raw+q",
) -> tuple[Tensor, Tensor | None]:
    """(T,I) GLoRIA word-level similarity of every report t with every image i (before ``temp3``),
    and optionally the matched pairs' attention (T,L,P). See :class:`GloriaLocalLoss`."""
    if words.shape[0] != regions.shape[0]:
        raise ValueError(f"GLoRIA pairs report t with image t: got {words.shape[0]} reports, {regions.shape[0]} images")
    mask = word_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every report needs at least one word for GLoRIA's local loss (GLoRIA keeps [CLS])")
    pos = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # each report's word positions first
    dtype = words.dtype
    if not (torch.is_grad_enabled() and (words.requires_grad or regions.requires_grad)):
        cache = "none"  # no backward will come: keep nothing
    scores, attn = _GloriaScores.apply(
        words.float(), regions.float(), pos, lengths, float(temp1), float(temp2), agg == "mean",
        int(chunk_words), return_attention, cache,
    )
    return scores.to(dtype), (attn if return_attention else None)


class GloriaLocalLoss(nn.Module):
    """GLoRIA's local loss (Huang et al., ICCV 2021), faithful to marshuang80/gloria
    gloria/loss/gloria_loss.py ``local_loss`` L87-135 and ``attention_fn`` L20-58.

    ``forward(words (T,L,D), regions (I,P,D), word_mask (T,L))`` with T == I (report t pairs image t).
    Inputs must NOT be L2-normalised: GLoRIA feeds raw word features (BERT, last 4 layers summed, no
    projection, ``norm: false``) and 1x1-conv region features of dimension 768 to the attention; on unit
    vectors the softmax over words is ~1/L and the attention ~uniform. For report t and image i:
    ``a = softmax_p(temp1 * softmax_l(w_l . r_p))`` over the report's valid words only (GLoRIA slices
    each report to its word count, L98-101), context ``c_l = sum_p a_lp r_p``, score
    ``log sum_l exp(temp2 * cos(w_l, c_l))`` (``agg='sum'``, L117-122; ``'mean'`` = log of the mean),
    logits ``temp3 * score``. ``loss = i2t_weight * CE(images over reports) + t2i_weight * CE(reports
    over images)``; GLoRIA sums both (gloria_model.py L79): ``i2t_weight = t2i_weight = 1``. Default
    0.5/0.5 (mean). Defaults temp1/2/3 = 4/5/10 (configs/pretrain/chexpert_gloria_pretrain_config.yaml L33-35).

    GLoRIA loops over reports; this computes all pairs in chunks of reports bucketed by length (sorted,
    each chunk padded to its own longest, at most ``chunk_words`` padded words), never forms the (D-dim)
    context (``|c|^2`` via each image's Gram matrix), and has a hand-written backward. ``cache``: what
    the forward keeps for it — "raw+q" (default; per chunk the (I*P, M) scores and G a: 2*I*P*sum(L)
    floats, ~430 MB at GLoRIA's B=48, 19x19, 97 words), "raw", or "none" (recompute all: memory of one
    chunk, ~1.5x the time). Without grad nothing is kept. Measured by benchmarks/bench_losses.py against
    :func:`gloria_local_loop` at GLoRIA's shapes on CPU: ~0.4x the time, ~0.3x the peak memory.
    Returns ``loss``, ``loss_i2t``, ``loss_t2i``, ``acc_i2t``, ``acc_t2i``, ``attention`` (T,L,P) of the
    matched pairs (GLoRIA's ``att_maps``), mean ``word_norm`` / ``region_norm`` (≈1 means normalised
    inputs: a caller bug).
    """

    def __init__(
        self,
        temp1: float = 4.0,
        temp2: float = 5.0,
        temp3: float = 10.0,
        agg: str = "sum",
        i2t_weight: float = 0.5,
        t2i_weight: float | None = None,
        chunk_words: int = 512,
        cache: str = "raw+q",
    ) -> None:
        super().__init__()
        if cache not in ("none", "raw", "raw+q"):
            raise ValueError(f"cache must be 'none', 'raw' or 'raw+q', got {cache!r}")
        self.cache = cache
        if agg not in ("sum", "mean"):
            raise ValueError(f"agg must be 'sum' or 'mean', got {agg!r}")
        self.temp1, self.temp2, self.temp3, self.agg = temp1, temp2, temp3, agg
        self.i2t_weight = i2t_weight
        self.t2i_weight = 1.0 - i2t_weight if t2i_weight is None else t2i_weight
        self.chunk_words = chunk_words

    def forward(self, words: Tensor, regions: Tensor, word_mask: Tensor) -> dict[str, Tensor]:
        scores, attn = gloria_local_scores(
            words, regions, word_mask, self.temp1, self.temp2, self.agg, self.chunk_words, True, self.cache
        )
        logits_t2i = scores * self.temp3  # (T, I): rows are reports
        target = torch.arange(words.shape[0], device=words.device)
        loss_t2i = F.cross_entropy(logits_t2i, target)
        loss_i2t = F.cross_entropy(logits_t2i.T, target)
        out = {"loss": self.i2t_weight * loss_i2t + self.t2i_weight * loss_t2i,
               "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(), "attention": attn.detach()}
        with torch.no_grad():
            out["acc_t2i"] = (logits_t2i.argmax(1) == target).float().mean()
            out["acc_i2t"] = (logits_t2i.argmax(0) == target).float().mean()
            out["word_norm"] = words.detach().norm(dim=-1)[word_mask.bool()].mean()
            out["region_norm"] = regions.detach().norm(dim=-1).mean()
        return out


def _gloria_cosine(x1: Tensor, x2: Tensor, eps: float = 1e-8) -> Tensor:
    """gloria/loss/gloria_loss.py ``cosine_similarity`` L11-17 along dim 1."""
    return (x1 * x2).sum(1) / (x1.norm(dim=1) * x2.norm(dim=1)).clamp(min=eps)


def gloria_local_loop(
    words: Tensor,
    regions: Tensor,
    word_mask: Tensor,
    temp1: float = 4.0,
    temp2: float = 5.0,
    temp3: float = 10.0,
    agg: str = "sum",
    i2t_weight: float = 0.5,
    t2i_weight: float | None = None,
) -> Tensor:
    """GLoRIA's ``local_loss`` transcribed (gloria/loss/gloria_loss.py L87-135, per report, each report
    repeated over the batch and ``attention_fn`` on (B, D, L) / (B, D, P) tensors): the reference that
    :class:`GloriaLocalLoss` equals and the benchmark's baseline. words (B,L,D), regions (B,P,D)."""
    B = words.shape[0]
    context = regions.transpose(1, 2)  # (B, D, P): GLoRIA's img_features with ih*iw flattened
    P = context.shape[2]
    sims = []
    for t in range(B):
        word = words[t][word_mask[t].bool()].T.unsqueeze(0).contiguous()  # (1, D, n)
        n = word.shape[2]
        word = word.repeat(B, 1, 1)  # (B, D, n)
        attn = torch.bmm(context.transpose(1, 2).contiguous(), word)  # (B, P, n)
        attn = torch.softmax(attn.reshape(B * P, n), dim=-1).view(B, P, n)
        attn = attn.transpose(1, 2).contiguous().view(B * n, P)
        attn = torch.softmax(attn * temp1, dim=-1).view(B, n, P)
        wei_context = torch.bmm(context, attn.transpose(1, 2).contiguous())  # (B, D, n)
        w = word.transpose(1, 2).reshape(B * n, -1)
        c = wei_context.transpose(1, 2).reshape(B * n, -1)
        row = _gloria_cosine(w, c).view(B, n)
        row = (row * temp2).exp()
        row = row.sum(1, keepdim=True) if agg == "sum" else row.mean(1, keepdim=True)
        sims.append(row.log())
    similarities = torch.cat(sims, 1) * temp3  # (images, reports)
    labels = torch.arange(B, device=words.device)
    loss0 = F.cross_entropy(similarities, labels)  # image -> report
    loss1 = F.cross_entropy(similarities.T, labels)
    t2i = 1.0 - i2t_weight if t2i_weight is None else t2i_weight
    return i2t_weight * loss0 + t2i * loss1


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
    """SupCon (Khosla et al. 2020) with positives = pairs sharing at least one of the
    :func:`positive_findings` ("No Finding" is not one).

    (B,d) normalised features, (B,14) CheXpert labels -> (); anchors without a positive are skipped.
    """
    pos_labels = positive_findings(labels).to(features.dtype)
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
    """Swapped prediction over prototypes (MGCA's prototype loss), + supervised contrastive with ``supcon``.

    ``forward(image (B,d), text (B,d), prototypes (K,d), labels (B,14)|None)``, all normalised.
    Codes come from Sinkhorn on each modality's scores and are predicted from the other modality's
    ``softmax(scores / tau)``.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        epsilon: float = 0.05,
        iterations: int = 3,
        supcon: bool = False,
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
def mine_hard_negatives(
    sim: Tensor,
    exclude: Tensor | None = None,
    temperature: float = 0.07,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """ALBEF's hard-negative sampling for image-text matching (salesforce/ALBEF
    models/model_pretrain.py L122-123 and L141-162): (B,B) *cosine* image-text similarity -> for each
    image a text, for each text an image, drawn with probability ``softmax(sim / temperature)`` over the
    allowed negatives (diagonal and ``exclude`` removed; a row with none left falls back to any other
    sample). ALBEF's ``sim_i2t`` is already divided by its learnable temperature (init 0.07,
    configs/Pretrain.yaml ``temp``): pass that temperature, e.g. ``1 / logit_scale``. ``generator`` goes
    to ``torch.multinomial``. -> (neg_text_idx (B,), neg_image_idx (B,))."""
    B = sim.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    banned = eye if exclude is None else (eye | exclude.bool())
    # rows where everything is banned fall back to "anything but itself"
    banned_i2t = torch.where(banned.all(1, keepdim=True), eye, banned)
    banned_t2i = torch.where(banned.T.all(1, keepdim=True), eye, banned.T)
    logits = sim.float() / float(temperature)
    w_i2t = logits.masked_fill(banned_i2t, float("-inf")).softmax(1)
    w_t2i = logits.T.masked_fill(banned_t2i, float("-inf")).softmax(1)
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
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
