"""MLIP: towers, projection heads, divergence encoder, knowledge prototypes, fusion head — one model
class whose config decides which terms are trained (ConVIRT, GLoRIA, MGCA and the ablations included).

    cfg = named_config("mlip")
    tokenizer = build_tokenizer(cfg.model.text)
    ent = embed_entities(TextTower(cfg.model.text), tokenizer, graph.entity_texts())   # (E, D_text), cached
    model = MLIP(cfg, ent, prototype_entities=[graph.entity_ids.index(i) for i in graph.finding_ids])
    out = model(batch); out["loss"].backward(); opt.step(); model.momentum_update()

Batch keys (see mlip_core/data/collate.py): ``image`` (B,1,H,W), ``input_ids``/``attention_mask``/
``token_entity`` (B,L), ``labels`` (B,14) CheXpert convention (positives are ==1), and for text swap
``swap_input_ids``/``swap_attention_mask`` (B,L') and ``swap_label`` (B,).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlip_core.config import Config, LossConfig
from mlip_core.losses import (
    CategoryLoss,
    GloriaLocalLoss,
    GlobalContrastiveLoss,
    LocalAlignmentLoss,
    itm_loss,
    local_token_weights,
    mine_hard_negatives,
    same_finding_set,
    swap_loss,
)
from mlip_core.model.encoders import ImageTower, TextTower
from mlip_core.paths import workspace


class ProjectionHead(nn.Sequential):
    """Two-layer MLP (ConVIRT's projection): (..., in) -> (..., out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class FusionHead(nn.Module):
    """Report tokens attend to image patches (self- then cross-attention, as ALBEF's fusion encoder,
    much smaller): tokens (B,L,Dt), mask (B,L), patches (B,P,Dp) -> fused first token (B,F)."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, attention_mask: Tensor, patches: Tensor, projected: bool = False) -> Tensor:
        """See class docstring; with ``projected`` the inputs already went through text_in / image_in
        (project B samples once, then index them into the 3B ITM pairs)."""
        x = tokens if projected else self.text_in(tokens)
        memory = patches if projected else self.image_in(patches)
        pad = ~attention_mask.bool()
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=pad)
        return self.norm(x[:, 0])


def local_token_mask(attention_mask: Tensor) -> Tensor:
    """(B,L) attention mask -> (B,L) bool mask of word tokens: [CLS] (first) and [SEP] (last valid) off."""
    mask = attention_mask.bool().clone()
    lengths = mask.sum(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[:, 0] = False
    mask[rows, (lengths - 1).clamp_min(0)] = False
    return mask


class MLIP(nn.Module):
    """Image-report pretraining with every MLIP part switchable; see module docstring.

    ``entity_embeddings`` (E, D_e): the text tower's embedding of each knowledge-graph entity (row i =
    entity index i, as ``token_entity`` uses); needed when ``loss.knowledge_fusion`` or
    ``loss.knowledge_prototypes`` is on. ``prototype_entities``: indices of the entities (findings) that
    initialise prototypes; default all.
    """

    def __init__(
        self,
        config: Config,
        entity_embeddings: Tensor | None = None,
        prototype_entities: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        mc, lc = config.model, config.loss
        self._check(lc, entity_embeddings)
        self.image_tower = ImageTower(mc.image)
        self.text_tower = TextTower(mc.text)
        d = mc.embed_dim
        self.image_proj = ProjectionHead(self.image_tower.global_dim, mc.proj_hidden_dim, d)
        self.text_proj = ProjectionHead(self.text_tower.hidden_dim, mc.proj_hidden_dim, d)
        init_scale = torch.tensor(math.log(1.0 / mc.init_temperature))
        if mc.learn_temperature:
            self.logit_scale = nn.Parameter(init_scale)
        else:
            self.register_buffer("logit_scale", init_scale)

        if entity_embeddings is not None:
            self.register_buffer("entity_embeddings", entity_embeddings.detach().float().clone(), persistent=True)
        else:
            self.entity_embeddings = None

        self.global_loss = GlobalContrastiveLoss(lc.soft_alpha if lc.divergence else 0.0, lc.knowledge_negatives)

        if lc.local != "none":
            self.image_local_proj = ProjectionHead(self.image_tower.patch_dim, mc.local_proj_hidden_dim, d)
            self.text_local_proj = ProjectionHead(self.text_tower.hidden_dim, mc.local_proj_hidden_dim, d)
            if lc.local == "gloria":
                self.local_loss = GloriaLocalLoss(lc.gloria_temp1, lc.gloria_temp2, lc.gloria_temp3)
            else:
                self.local_loss = LocalAlignmentLoss(lc.local_temperature)
        if lc.local == "mlip" and lc.knowledge_fusion:
            self.knowledge_proj = nn.Linear(self.entity_embeddings.shape[1], self.text_tower.hidden_dim)

        if lc.category:
            self.prototypes = nn.Parameter(self._init_prototypes(lc, mc.num_free_prototypes, d, prototype_entities))
            self.category_loss = CategoryLoss(
                lc.proto_temperature, lc.sinkhorn_epsilon, lc.sinkhorn_iterations, lc.supcon, lc.supcon_temperature
            )

        if lc.itm or lc.swap:
            self.fusion = FusionHead(
                self.text_tower.hidden_dim, self.image_tower.patch_dim, mc.fusion_dim, mc.fusion_layers, mc.fusion_heads
            )
            if lc.itm:
                self.itm_head = nn.Linear(mc.fusion_dim, 2)
            if lc.swap:
                self.swap_head = nn.Linear(mc.fusion_dim, 1)

        # The divergence encoder: an EMA copy of both towers and global heads, never trained by gradient.
        if lc.divergence:
            self.image_tower_m = copy.deepcopy(self.image_tower)
            self.text_tower_m = copy.deepcopy(self.text_tower)
            self.image_proj_m = copy.deepcopy(self.image_proj)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for module in self._momentum_modules():
                module.requires_grad_(False)
                module.eval()

    # -----------------------------------------------------------------------------------------
    @staticmethod
    def _check(lc: LossConfig, entity_embeddings: Tensor | None) -> None:
        if lc.local not in ("none", "mlip", "mgca", "gloria"):
            raise ValueError(f"loss.local={lc.local!r}; choose none, mlip, mgca or gloria")
        needs = []
        if lc.local == "mlip" and lc.knowledge_fusion:
            needs.append("loss.knowledge_fusion")
        if lc.category and lc.knowledge_prototypes:
            needs.append("loss.knowledge_prototypes")
        if needs and entity_embeddings is None:
            raise ValueError(
                f"{' and '.join(needs)} need entity_embeddings (E, D): pass "
                "embed_entities(text_tower, tokenizer, KnowledgeGraph.load_default().entity_texts()), "
                "or switch those options off"
            )

    @torch.no_grad()
    def _init_prototypes(self, lc: LossConfig, num_free: int, d: int, entities: Sequence[int] | None) -> Tensor:
        """(K,d): the knowledge entities' embeddings through the (initial) text head — the space report
        embeddings start in — followed by ``num_free`` random prototypes."""
        parts = []
        if lc.knowledge_prototypes:
            ent = self.entity_embeddings
            if entities is not None:
                ent = ent[torch.as_tensor(list(entities), dtype=torch.long)]
            if ent.shape[1] != self.text_tower.hidden_dim:
                raise ValueError(
                    f"entity_embeddings have dim {ent.shape[1]} but the text tower's is {self.text_tower.hidden_dim}; "
                    "compute them with the same text tower (embed_entities)"
                )
            parts.append(F.normalize(self.text_proj(ent), dim=-1))
        if num_free:
            parts.append(F.normalize(torch.randn(num_free, d), dim=-1))
        if not parts:
            raise ValueError("loss.category needs prototypes: knowledge_prototypes or num_free_prototypes > 0")
        return torch.cat(parts)

    def train(self, mode: bool = True) -> MLIP:
        """Online parts follow ``mode``; the divergence encoder always runs in eval mode: no dropout, and
        BatchNorm with the running statistics copied from the online towers, so its targets are a
        deterministic function of the EMA weights (and the forward costs ~30% less on CPU)."""
        super().train(mode)
        if self.config.loss.divergence:
            for module in self._momentum_modules():
                module.eval()
        return self

    def _momentum_modules(self) -> list[nn.Module]:
        return [self.image_tower_m, self.text_tower_m, self.image_proj_m, self.text_proj_m]

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(
            zip([self.image_tower, self.text_tower, self.image_proj, self.text_proj], self._momentum_modules())
        )

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """EMA step of the divergence encoder, after each optimizer step: p_m <- m*p_m + (1-m)*p
        (buffers such as BatchNorm statistics are copied). No-op without a divergence encoder."""
        if not self.config.loss.divergence:
            return
        m = self.config.model.momentum if momentum is None else momentum
        online, mom = [], []
        for a, b in self._momentum_pairs():
            online += [p.detach() for p in a.parameters()]
            mom += list(b.parameters())
            for buf, buf_m in zip(a.buffers(), b.buffers()):
                buf_m.copy_(buf)
        # p_m + (1-m)(p - p_m) = m p_m + (1-m) p, one multi-tensor kernel (as timm's ModelEmaV3)
        torch._foreach_lerp_(mom, online, 1.0 - m)

    # -----------------------------------------------------------------------------------------
    def temperature(self) -> Tensor:
        """The current global temperature 1/logit_scale (scalar)."""
        return 1.0 / self._scale()

    def _scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.config.model.max_logit_scale)

    def encode_image(self, x: Tensor, normalize: bool = True) -> Tensor:
        """(B,1,H,W) -> (B,d) global image embedding."""
        z = self.image_proj(self.image_tower(x).global_)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
        """(B,L) ids and mask -> (B,d) global report embedding."""
        z = self.text_proj(self.text_tower(input_ids, attention_mask).sentence)
        return F.normalize(z, dim=-1) if normalize else z

    def fuse_knowledge(self, tokens: Tensor, token_entity: Tensor) -> Tensor:
        """(B,L,Dt) token features + (B,L) entity index (-1 none) -> tokens with their entity's projected
        knowledge embedding added (tokens without an entity unchanged)."""
        has = token_entity >= 0
        table = self.knowledge_proj(self.entity_embeddings)  # (E, Dt): project E rows, not B*L tokens
        know = table[token_entity.clamp_min(0)]  # (B, L, Dt)
        return tokens + know * has.unsqueeze(-1).to(tokens.dtype)

    def local_features(self, tokens: Tensor, token_entity: Tensor | None, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Token (B,L,Dt) and patch (B,P,Dp) features -> normalised local embeddings (B,L,d), (B,P,d)."""
        lc = self.config.loss
        if lc.local == "mlip" and lc.knowledge_fusion:
            if token_entity is None:
                raise KeyError("the mlip local loss with knowledge fusion needs batch['token_entity'] (B,L)")
            tokens = self.fuse_knowledge(tokens, token_entity)
        return F.normalize(self.text_local_proj(tokens), dim=-1), F.normalize(self.image_local_proj(patches), dim=-1)

    def encode_swap_tokens(self, batch: dict[str, Tensor], ids: Tensor, mask: Tensor, tokens: Tensor) -> Tensor:
        """Token features (B,L',Dt) of the swap reports. Rows whose swap text is the original report
        (same ids) reuse the online tower's features instead of a second forward pass; only altered
        reports are encoded (without gradient unless ``loss.swap_text_grad``)."""
        s_ids, s_mask = batch["swap_input_ids"], batch["swap_attention_mask"]
        B, Ls = s_ids.shape
        n = min(Ls, ids.shape[1])
        same = (s_mask[:, n:].sum(1) == 0) & (mask[:, n:].sum(1) == 0) & (s_mask[:, :n] == mask[:, :n]).all(1)
        same &= ((s_ids[:, :n] == ids[:, :n]) | (s_mask[:, :n] == 0)).all(1)
        out = tokens.new_zeros(B, Ls, tokens.shape[-1])
        reuse = tokens[:, :n] if self.config.loss.swap_text_grad else tokens[:, :n].detach()
        out[:, :n] = torch.where(same[:, None, None], reuse, out[:, :n])
        todo = (~same).nonzero().squeeze(1)
        if todo.numel():
            grad = torch.enable_grad() if self.config.loss.swap_text_grad else torch.no_grad()
            with grad:
                enc = self.text_tower(s_ids[todo], s_mask[todo]).tokens
            out = out.index_copy(0, todo, enc.to(out.dtype))
        return out

    @torch.no_grad()
    def local_attention(self, batch: dict[str, Tensor]) -> Tensor:
        """(B,L,P) token-to-patch attention of the local loss (for figures); padding rows are zero."""
        img = self.image_tower(batch["image"])
        txt = self.text_tower(batch["input_ids"], batch["attention_mask"])
        t, v = self.local_features(txt.tokens, batch.get("token_entity"), img.patches)
        attn = torch.softmax(t @ v.transpose(1, 2) / self.config.loss.local_temperature, dim=-1)
        return attn * local_token_mask(batch["attention_mask"]).unsqueeze(-1)

    # -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch -> {"loss": weighted total, "loss_<term>" per enabled term, diagnostics}."""
        lc = self.config.loss
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        labels = batch.get("labels")
        token_entity = batch.get("token_entity")
        B = image.shape[0]

        img = self.image_tower(image)
        txt = self.text_tower(ids, mask)
        img_g = F.normalize(self.image_proj(img.global_), dim=-1)
        txt_g = F.normalize(self.text_proj(txt.sentence), dim=-1)
        scale = self._scale()
        out: dict[str, Tensor] = {"temperature": (1.0 / scale).detach()}
        terms: dict[str, tuple[float, Tensor]] = {}

        img_m = txt_m = None
        if lc.divergence:
            with torch.no_grad():
                img_m = F.normalize(self.image_proj_m(self.image_tower_m(image).global_), dim=-1)
                txt_m = F.normalize(self.text_proj_m(self.text_tower_m(ids, mask).sentence), dim=-1)
        g = self.global_loss(img_g, txt_g, scale, img_m, txt_m, labels)
        terms["global"] = (lc.weight_global, g.pop("loss"))
        out.update({f"global_{k}": v.detach() for k, v in g.items()})

        if lc.local != "none":
            t_loc, v_loc = self.local_features(txt.tokens, token_entity, img.patches)
            words = local_token_mask(mask)
            if lc.local == "gloria":
                loc = self.local_loss(t_loc, v_loc, words)
            else:
                kw = lc.knowledge_token_weight if lc.local == "mlip" else 1.0
                weights = local_token_weights(words, token_entity, kw)
                loc = self.local_loss(t_loc, v_loc, words, weights)
                loc.pop("attention")
            terms["local"] = (lc.weight_local, loc.pop("loss"))
            out.update({f"local_{k}": v.detach() for k, v in loc.items()})

        if lc.category:
            protos = F.normalize(self.prototypes, dim=-1)
            cat = self.category_loss(img_g, txt_g, protos, labels)
            terms["category"] = (lc.weight_category, cat.pop("loss"))
            out.update({f"category_{k}": v.detach() for k, v in cat.items()})

        if lc.itm and B > 1:
            with torch.no_grad():
                sim = img_g @ txt_g.T
                exclude = same_finding_set(labels) if (lc.knowledge_negatives and labels is not None) else None
            neg_text, neg_image = mine_hard_negatives(sim, exclude)
            t_in, v_in = self.fusion.text_in(txt.tokens), self.fusion.image_in(img.patches)
            tokens = torch.cat([t_in, t_in[neg_text], t_in])
            tmask = torch.cat([mask, mask[neg_text], mask])
            patches = torch.cat([v_in, v_in, v_in[neg_image]])
            logits = self.itm_head(self.fusion(tokens, tmask, patches, projected=True))
            target = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
            itm = itm_loss(logits, target)
            terms["itm"] = (lc.weight_itm, itm.pop("loss"))
            out["itm_acc"] = itm["acc"]

        if lc.swap:
            if "swap_input_ids" not in batch:
                raise KeyError("config has loss.swap on but the batch has no swap_input_ids; use PretrainCollator")
            swap_tokens = self.encode_swap_tokens(batch, ids, mask, txt.tokens)
            logit = self.swap_head(self.fusion(swap_tokens, batch["swap_attention_mask"], img.patches)).squeeze(-1)
            sw = swap_loss(logit, batch["swap_label"])
            terms["swap"] = (lc.weight_swap, sw.pop("loss"))
            out["swap_acc"] = sw["acc"]

        total = sum(w * v for w, v in terms.values())
        out["loss"] = total
        for name, (_, v) in terms.items():
            out[f"loss_{name}"] = v
        return out


# ---------------------------------------------------------------------------------------------
# Knowledge entity embeddings


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:60] or "encoder"


@torch.no_grad()
def embed_entities(
    text_tower: TextTower,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    cache: bool = True,
) -> Tensor:
    """The text tower's sentence vector of each entity text -> (E, D_text).

    Cached in ``workspace("cache")`` per encoder name and text list (a hash of texts, length and
    pooling); randomly initialised towers are never cached, their vectors depend on the seed.
    """
    texts = list(texts)
    use_cache = cache and getattr(text_tower, "pretrained", False)
    path: Path | None = None
    if use_cache:
        key = hashlib.sha1(
            ("\n".join(texts) + f"|{max_length}|{text_tower.cfg.pooling}").encode("utf-8")
        ).hexdigest()[:16]
        path = workspace("cache") / f"entities_{_slug(text_tower.name)}_{key}.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
    was_training = text_tower.training
    text_tower.eval()
    device = next(text_tower.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        feats = text_tower(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        chunks.append(feats.sentence.float().cpu())
    text_tower.train(was_training)
    out = torch.cat(chunks) if chunks else torch.zeros(0, text_tower.hidden_dim)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    return out
