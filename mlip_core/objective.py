"""The pretraining objective: one module per loss term, built from the config, summed in one place.

The shape follows open_clip (``src/open_clip/task/clip_task.py`` and ``factory.create_loss``): the model
returns named features (:meth:`mlip_core.model.mlip.MLIP.features`), each term turns features and batch into
``{"loss": scalar, <diagnostics>}``, and :class:`Objective` sums ``weight * loss`` over the enabled terms.
A term owns the parameters only it uses (local projection heads, knowledge projection, prototypes, the ITM and
swap classifiers); the cross-attention fusion encoder that ITM and text swapping share lives here too.

Adding a term touches this module and the config only: a :class:`Term` subclass, its switch in
:func:`enabled_terms` and its builder in :func:`build_objective`; ``weight_<name>`` and its options in
:class:`mlip_core.config.LossConfig`.

    objective = build_objective(config, dims, entity_embeddings, prototype_init)
    out = objective(features, batch, model)     # {"loss", "loss_global", "global_acc_i2t", ...}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlip_core.config import Config, LossConfig
from mlip_core.knowledge.extract import STATUS_CODE
from mlip_core.losses import (
    CategoryLoss,
    GloriaLocalLoss,
    GlobalContrastiveLoss,
    LocalAlignmentLoss,
    MGCALocalLoss,
    aggregate_wordpieces,
    clipped_attention_weights,
    itm_loss,
    local_token_weights,
    mine_hard_negatives,
    same_finding_set,
    swap_loss,
)

# token_status codes, as KnowledgeExtractor.encode writes them (one table, in the extractor)
POSITIVE, NEGATIVE, UNCERTAIN = (STATUS_CODE[s] for s in ("positive", "negative", "uncertain"))


@dataclass
class Dims:
    """Feature widths the heads need: text hidden, patch, embedding, fusion."""

    text: int
    patch: int
    embed: int
    local_hidden: int
    fusion: int
    fusion_layers: int
    fusion_heads: int


class ProjectionHead(nn.Sequential):
    """Two-layer MLP (ConVIRT's projection): (..., in) -> (..., out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def attend(mha: nn.MultiheadAttention, x: Tensor, keys: Tensor, key_padding_mask: Tensor | None = None,
           index: Tensor | None = None) -> Tensor:
    """``mha(x, keys, keys, key_padding_mask)[0]`` of a batch-first ``nn.MultiheadAttention`` (its weights,
    ``F.scaled_dot_product_attention`` as its own forward uses): x (N,Lq,E), keys (B,Lk,E), mask (B,Lk) True =
    ignore. With ``index`` (N,) query row i reads keys row ``index[i]``: keys and values are projected once per
    key row (an image's patches), not once per query row that reads them."""
    E, H = mha.embed_dim, mha.num_heads
    weights = mha.in_proj_weight.chunk(3)  # one backward (a cat) for the three, not three zero-filled slices
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    q, k, v = (F.linear(t, w, b) for t, w, b in zip((x, keys, keys), weights, biases))
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
        mask = None if mask is None else mask.index_select(0, index)

    def heads(t: Tensor) -> Tensor:
        return t.unflatten(-1, (H, E // H)).transpose(1, 2)  # (N, H, L, E/H)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                         dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.transpose(1, 2).flatten(2))


class FusionHead(nn.Module):
    """Report tokens attend to image patches (self- then cross-attention, as ALBEF's fusion encoder,
    much smaller): tokens (B,L,Dt), mask (B,L), patches (B,P,Dp) -> fused first token (B,F).

    The layers are ``nn.TransformerDecoderLayer`` (pre-norm) and their forward is written out so that it does
    only what the output needs, with the same arithmetic per position (:func:`attend` is their attention):
    only the first token is read, so the last layer computes that position alone (its self-attention still
    reads every token's keys and values)."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, attention_mask: Tensor, patches: Tensor, projected: bool = False,
                pairs: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """See class docstring; with ``projected`` the inputs already went through text_in / image_in. ``pairs``
        = (text_index (N,), image_index (N,)): fuse those N (text, image) pairs of the B texts and B images
        -> (N,F) (ITM's positives and hard negatives) at the cost of B texts and B images wherever a step reads
        one of them alone: the first layer's self-attention (once per text) and every layer's keys and values
        of the patches (once per image)."""
        x = tokens if projected else self.text_in(tokens)
        memory = patches if projected else self.image_in(patches)
        pad = ~attention_mask.bool()
        images = None if pairs is None else pairs[1]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # pre-norm: x + SA(norm1 x); + CA(norm2 x, memory); + FF(norm3 x), as nn.TransformerDecoderLayer
            y = layer.norm1(x)
            q, x = (y[:, :1], x[:, :1]) if i == last else (y, x)
            x = x + layer.dropout1(attend(layer.self_attn, q, y, pad))
            if i == 0 and pairs is not None:
                x, pad = x[pairs[0]], pad[pairs[0]]
            x = x + layer.dropout2(attend(layer.multihead_attn, layer.norm2(x), memory, index=images))
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
        return self.norm(x[:, 0])


def local_token_mask(attention_mask: Tensor) -> Tensor:
    """(B,L) attention mask -> (B,L) bool mask of word tokens: [CLS] (first) and [SEP] (last valid) off."""
    mask = attention_mask.bool().clone()
    lengths = mask.sum(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[:, 0] = False
    mask[rows, (lengths - 1).clamp_min(0)] = False
    return mask


@dataclass
class Progress:
    """Where training is: optimizer steps done and steps per epoch (0 = unknown, e.g. outside the trainer)."""

    step: int = 0
    steps_per_epoch: int = 0

    @property
    def epoch_fraction(self) -> float:
        """Epochs done, as a float; 1.0 when the epoch length is unknown (no warm-up then)."""
        return self.step / self.steps_per_epoch if self.steps_per_epoch > 0 else float("inf")


class Term(nn.Module):
    """One loss term: ``forward(features, batch, ctx) -> {"loss": (), <diagnostics>}``."""

    name = ""
    uses_fusion = False

    def forward(self, f: dict[str, Any], batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
        raise NotImplementedError


@dataclass
class Context:
    """What a term may use besides features and batch: the model (towers, for re-encoding swapped texts), the
    shared fusion encoder, and the training progress."""

    model: nn.Module
    fusion: FusionHead | None
    progress: Progress


# ---------------------------------------------------------------------------------------------
# The terms


class GlobalTerm(Term):
    """Image-report InfoNCE; soft targets from the divergence encoder with ALBEF's alpha warm-up; knowledge
    guard on negatives (see :class:`mlip_core.losses.GlobalContrastiveLoss`)."""

    name = "global"

    def __init__(self, lc: LossConfig) -> None:
        super().__init__()
        self.lc = lc
        self.loss = GlobalContrastiveLoss(lc.soft_alpha if lc.divergence else 0.0, lc.knowledge_negatives,
                                          i2t_weight=lc.global_i2t_weight, t2i_weight=lc.global_t2i_weight)

    def alpha(self, progress: Progress) -> float:
        """ALBEF (Pretrain.py): ``alpha * min(1, i / len(loader))`` in the first epoch."""
        a = self.lc.soft_alpha if self.lc.divergence else 0.0
        return a * min(1.0, progress.epoch_fraction) if self.lc.alpha_warmup else a

    def forward(self, f, batch, ctx):
        out = self.loss(f["image_global"], f["text_global"], f["logit_scale"], f.get("image_global_m"),
                        f.get("text_global_m"), batch.get("labels"), alpha=self.alpha(ctx.progress))
        return out


class LocalTerm(Term):
    """Token-patch alignment: MLIP's token-knowledge-patch loss, MGCA's two-way token loss, or GLoRIA's
    word-region attention, on local projections of the tower features.

    Knowledge fusion respects the extractor's status: a token of a *positive* mention gets its entity's
    projected knowledge embedding (and ``knowledge_token_weight``); a token of a negated or uncertain mention
    gets a learned status embedding instead (one vector for "negated", one for "uncertain"), so "no pleural
    effusion" is not pulled toward the image evidence of an effusion, and keeps weight 1.
    """

    name = "local"

    def __init__(self, lc: LossConfig, dims: Dims, entity_embeddings: Tensor | None) -> None:
        super().__init__()
        self.lc = lc
        if lc.local not in ("mlip", "mgca", "gloria"):
            raise ValueError(f"loss.local={lc.local!r}; choose none, mlip, mgca or gloria")
        if lc.local_word_weights not in ("knowledge", "uniform", "cls_attention"):
            raise ValueError(f"loss.local_word_weights={lc.local_word_weights!r}; choose knowledge, uniform or "
                             "cls_attention")
        if lc.local == "gloria":  # GLoRIA: raw word features; regions linearly projected to their width
            self.image_proj: nn.Module = nn.Linear(dims.patch, dims.text, bias=False)
            self.text_proj: nn.Module = nn.Identity()
        else:
            self.image_proj = ProjectionHead(dims.patch, dims.local_hidden, dims.embed)
            self.text_proj = ProjectionHead(dims.text, dims.local_hidden, dims.embed)
        self.fuse = lc.local == "mlip" and lc.knowledge_fusion
        if self.fuse:
            if entity_embeddings is None:
                raise ValueError("loss.knowledge_fusion needs entity_embeddings")
            self.knowledge_proj = nn.Linear(entity_embeddings.shape[1], dims.text)
            self.status_embedding = nn.Embedding(2, dims.text)  # 0 negated, 1 uncertain
            nn.init.normal_(self.status_embedding.weight, std=0.02)
        if lc.local == "gloria":
            # GLoRIA sums the two directions of both its losses (gloria_model.py L79-80): the global weights
            self.loss = GloriaLocalLoss(lc.gloria_temp1, lc.gloria_temp2, lc.gloria_temp3,
                                        i2t_weight=lc.global_i2t_weight, t2i_weight=lc.global_t2i_weight)
        elif lc.local_patch_direction:  # MGCA's two directions; a CNN tower weights patches uniformly
            self.loss = MGCALocalLoss(lc.local_temperature, patch_direction=True)
        else:
            self.loss = LocalAlignmentLoss(lc.local_temperature)

    def knowledge_offsets(self, token_entity: Tensor, token_status: Tensor | None, entity_embeddings: Tensor,
                          weight: Tensor | None = None) -> Tensor:
        """(B,L) entity (-1 none) and status -> (B,L,Dt) what knowledge fusion adds to each token (see class doc);
        with ``weight`` (H,Dt) the offsets times ``weight^T`` -> (B,L,H): a linear layer after the fusion then
        projects the (E,Dt) table and two status vectors instead of B*L tokens."""
        table = self.knowledge_proj(entity_embeddings)  # (E, Dt): project E rows, not B*L tokens
        rows = [table]
        if token_status is not None:
            rows.append(self.status_embedding.weight)  # (2, Dt): negated, uncertain
        rows.append(table.new_zeros(1, table.shape[1]))  # no knowledge
        table = torch.cat(rows)
        if weight is not None:
            table = F.linear(table, weight)
        # each token's row: its entity if a positive mention, the status vector if negated or uncertain, else zero
        E = entity_embeddings.shape[0]
        mentioned = token_entity >= 0
        if token_status is None:
            index = torch.where(mentioned, token_entity, E)
        else:
            index = torch.full_like(token_entity, E + 2)
            index = torch.where(mentioned & (token_status == POSITIVE), token_entity, index)
            index = torch.where(mentioned & (token_status == NEGATIVE), E, index)
            index = torch.where(mentioned & (token_status == UNCERTAIN), E + 1, index)
        return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])

    def fuse_knowledge(self, tokens: Tensor, token_entity: Tensor, token_status: Tensor | None,
                       entity_embeddings: Tensor) -> Tensor:
        """(B,L,Dt) tokens + (B,L) entity (-1 none) and status -> tokens with knowledge added (see class doc)."""
        return tokens + self.knowledge_offsets(token_entity, token_status, entity_embeddings).to(tokens.dtype)

    def positive_entities(self, batch: dict[str, Tensor]) -> Tensor | None:
        """(B,L) entity index of tokens in *positive* mentions, -1 elsewhere."""
        ent = batch.get("token_entity")
        if ent is None:
            return None
        status = batch.get("token_status")
        return ent if status is None else torch.where(status == POSITIVE, ent, torch.full_like(ent, -1))

    def embed(self, f: dict[str, Any], batch: dict[str, Tensor], model: nn.Module) -> tuple[Tensor, Tensor]:
        """Local embeddings: tokens (B,L,d), patches (B,P,d); L2-normalised except for GLoRIA (its attention
        reads raw dot products)."""
        tokens = f["text_tokens"]
        if self.fuse:
            if "token_entity" not in batch:
                raise KeyError("the mlip local loss with knowledge fusion needs batch['token_entity'] (B,L)")
            first, *rest = self.text_proj  # W(t + k) + b = (W t + b) + W k: the tokens need no gradient
            know = self.knowledge_offsets(batch["token_entity"], batch.get("token_status"), model.entity_embeddings,
                                          first.weight)
            t = first(tokens) + know.to(tokens.dtype)
            for layer in rest:
                t = layer(t)
        else:
            t = self.text_proj(tokens)
        v = self.image_proj(f["image_patches"])
        if self.lc.local == "gloria":
            return t, v
        return F.normalize(t, dim=-1), F.normalize(v, dim=-1)

    def word_weights(self, f: dict[str, Any], batch: dict[str, Tensor], words: Tensor) -> Tensor:
        mode = self.lc.local_word_weights
        if mode == "cls_attention":
            attn = f.get("text_cls_attention")
            if attn is None:
                raise KeyError("local_word_weights='cls_attention' needs the text tower's [CLS] attention")
            return clipped_attention_weights(attn.float(), words)
        kw = self.lc.knowledge_token_weight if mode == "knowledge" else 1.0
        return local_token_weights(words, self.positive_entities(batch) if mode == "knowledge" else None, kw)

    def forward(self, f, batch, ctx):
        t, v = self.embed(f, batch, ctx.model)
        words = local_token_mask(f["attention_mask"])
        if self.lc.local == "gloria":
            if "word_index" not in batch:
                raise KeyError("the gloria local loss needs batch['word_index'] (PretrainCollator(word_index=True))")
            w, wmask = aggregate_wordpieces(t, batch["word_index"])
            out = self.loss(w, v, wmask)
        else:
            out = self.loss(t, v, words, self.word_weights(f, batch, words))
        out.pop("attention", None)
        return out


class CategoryTerm(Term):
    """Prototype swapped prediction (+ SupCon on report labels); prototypes from knowledge and/or free ones,
    frozen during the first ``freeze_prototypes_epochs`` epochs (MGCA)."""

    name = "category"

    def __init__(self, lc: LossConfig, prototypes: Tensor) -> None:
        super().__init__()
        self.lc = lc
        self.prototypes = nn.Parameter(prototypes)
        self.loss = CategoryLoss(lc.proto_temperature, lc.sinkhorn_epsilon, lc.sinkhorn_iterations, lc.supcon,
                                 lc.supcon_temperature)

    def forward(self, f, batch, ctx):
        protos = F.normalize(self.prototypes, dim=-1)
        if ctx.progress.epoch_fraction < self.lc.freeze_prototypes_epochs:
            protos = protos.detach()
        return self.loss(f["image_global"], f["text_global"], protos, batch.get("labels"))


class ITMTerm(Term):
    """Image-text matching on the fusion encoder with hard negatives drawn from ``softmax(sim / tau)`` (ALBEF,
    with the global temperature), excluding reports with the same positive finding set (knowledge guard)."""

    name = "itm"
    uses_fusion = True
    negatives_per_positive = 2  # each image's report is scored beside a hard-negative report and a hard-negative image

    def __init__(self, lc: LossConfig, dims: Dims) -> None:
        super().__init__()
        self.lc = lc
        self.head = nn.Linear(dims.fusion, 2)

    def forward(self, f, batch, ctx):
        img, txt = f["image_global"], f["text_global"]
        B = img.shape[0]
        if B < 2:
            return {"loss": img.sum() * 0.0}
        labels = batch.get("labels")
        with torch.no_grad():
            sim = img @ txt.T
            exclude = same_finding_set(labels) if (self.lc.knowledge_negatives and labels is not None) else None
            tau = float(1.0 / f["logit_scale"].detach())
        neg_text, neg_image = mine_hard_negatives(sim, exclude, temperature=tau)
        rows = torch.arange(B, device=img.device)
        pairs = (torch.cat([rows, neg_text, rows]), torch.cat([rows, rows, neg_image]))  # (text, image) per pair
        logits = self.head(ctx.fusion(f["text_tokens"], f["attention_mask"], f["image_patches"], pairs=pairs))
        target = torch.cat([torch.ones(B), torch.zeros(self.negatives_per_positive * B)]).long().to(logits.device)
        return itm_loss(logits, target)


class SwapTerm(Term):
    """Text swapping: was a finding sentence of the report replaced by one from another report?"""

    name = "swap"
    uses_fusion = True

    def __init__(self, lc: LossConfig, dims: Dims) -> None:
        super().__init__()
        self.lc = lc
        self.head = nn.Linear(dims.fusion, 1)

    def forward(self, f, batch, ctx):
        if "swap_input_ids" not in batch and "swap_text_tokens" not in batch:
            raise KeyError("config has loss.swap on but the batch has no swap_input_ids (nor precomputed "
                           "swap_text_tokens); use PretrainCollator")
        tokens = ctx.model.encode_swap_tokens(batch, f["text_tokens"], self.lc.swap_text_grad)
        logit = self.head(ctx.fusion(tokens, batch["swap_attention_mask"], f["image_patches"])).squeeze(-1)
        return swap_loss(logit, batch["swap_label"])


def enabled_terms(lc: LossConfig) -> list[str]:
    """Names of the terms a loss config switches on, in summation order."""
    on = {"global": True, "local": lc.local != "none", "category": lc.category, "itm": lc.itm, "swap": lc.swap}
    return [name for name, flag in on.items() if flag]


class Objective(nn.Module):
    """The enabled terms and their weights; ``forward`` returns ``loss`` (the weighted sum), ``loss_<term>``
    per term and each term's diagnostics as ``<term>_<key>``."""

    def __init__(self, terms: dict[str, Term], weights: dict[str, float], fusion: FusionHead | None) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)
        self.fusion = fusion

    def forward(self, f: dict[str, Any], batch: dict[str, Tensor], model: nn.Module,
                progress: Progress | None = None) -> dict[str, Tensor]:
        ctx = Context(model=model, fusion=self.fusion, progress=progress or Progress())
        out: dict[str, Tensor] = {}
        total = None
        for name, term in self.terms.items():
            res = term(f, batch, ctx)
            loss = res.pop("loss")
            out[f"loss_{name}"] = loss
            out.update({f"{name}_{k}": v.detach() for k, v in res.items() if torch.is_tensor(v)})
            weighted = self.weights[name] * loss
            total = weighted if total is None else total + weighted
        out["loss"] = total
        return out


def build_objective(config: Config, dims: Dims, entity_embeddings: Tensor | None,
                    prototype_init: Callable[[], Tensor] | None = None) -> Objective:
    """The :class:`Objective` of ``config.loss`` (open_clip's ``create_loss``). ``prototype_init`` returns the
    (K,d) initial prototypes when the category term is on."""
    lc = config.loss
    names = enabled_terms(lc)
    builders: dict[str, Callable[[], Term]] = {
        "global": lambda: GlobalTerm(lc),
        "local": lambda: LocalTerm(lc, dims, entity_embeddings),
        "category": lambda: CategoryTerm(lc, prototype_init()),
        "itm": lambda: ITMTerm(lc, dims),
        "swap": lambda: SwapTerm(lc, dims),
    }
    terms = {name: builders[name]() for name in names}
    weights = {name: float(getattr(lc, f"weight_{name}")) for name in names}
    fusion = None
    if any(t.uses_fusion for t in terms.values()):
        fusion = FusionHead(dims.text, dims.patch, dims.fusion, dims.fusion_layers, dims.fusion_heads)
    return Objective(terms, weights, fusion)
