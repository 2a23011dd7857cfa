"""MLIP: towers, global projection heads, the divergence encoder — the model returns named features; the
loss terms live in :mod:`mlip_core.objective` (built from the config), so ConVIRT, GLoRIA, MGCA and the
ablations are configurations of the same code.

    cfg = named_config("mlip")
    tokenizer = build_tokenizer(cfg.model.text)
    ent = embed_entities(TextTower(cfg.model.text), tokenizer, graph.entity_texts())   # (E, D_text), cached
    model = MLIP(cfg, ent, prototype_entities=[graph.entity_ids.index(i) for i in graph.finding_ids])
    out = model(batch); out["loss"].backward(); opt.step(); model.momentum_update()

``model.features(batch)`` gives the named features; ``model(batch)`` = ``model.objective(features, batch)``.
Batch keys (see mlip_core/data/collate.py): ``image`` (B,1,H,W), ``input_ids``/``attention_mask``/
``token_entity``/``token_status`` (B,L), ``labels`` (B,14) CheXpert convention (positives are ==1), for text
swap ``swap_input_ids``/``swap_attention_mask`` (B,L') and ``swap_label`` (B,), and, with a wholly frozen text
tower, the precomputed ``text_tokens`` (B,L,Dt), ``text_sentence`` (B,Dt), ``text_cls_attention`` (B,L).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlip_core.checkpoint import cache_key, cached_tensors
from mlip_core.config import Config, LossConfig
from mlip_core.model.encoders import ImageTower, TextTower
from mlip_core.objective import Dims, Progress, ProjectionHead, build_objective, local_token_mask
from mlip_core.paths import workspace


__all__ = ["MLIP", "ProjectionHead", "embed_entities", "local_token_mask"]


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
        # Optimizer steps taken (saved with the model, so warm-ups resume exactly); the trainer sets the epoch length.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.steps_per_epoch = 0

        dims = Dims(text=self.text_tower.hidden_dim, patch=self.image_tower.patch_dim, embed=d,
                    local_hidden=mc.local_proj_hidden_dim, fusion=mc.fusion_dim, fusion_layers=mc.fusion_layers,
                    fusion_heads=mc.fusion_heads)
        self.objective = build_objective(
            config, dims, entity_embeddings,
            prototype_init=lambda: self._init_prototypes(lc, mc.num_free_prototypes, d, prototype_entities))

        # The divergence encoder: an EMA copy of both towers and global heads, never trained by gradient.
        self._ema_tensors: tuple[list, list, list] | None = None  # momentum_update's pairs, listed once
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

    def _apply(self, fn, recurse=True):  # .to(), .float(), ... replace buffers: list them again
        self._ema_tensors = None
        return super()._apply(fn, recurse)

    def reconstructible_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes a checkpoint may leave out because the config rebuilds them bit for bit: a wholly
        frozen text tower loaded from pretrained weights (and its momentum copy, which the EMA never moves
        because frozen weights are skipped). MiniLM is 90 MB of a ConVIRT checkpoint, 180 MB of an MLIP one."""
        if not (self.text_tower.frozen and getattr(self.text_tower, "pretrained", False)):
            return ()
        return ("text_tower.", "text_tower_m.") if self.config.loss.divergence else ("text_tower.",)

    def _momentum_modules(self) -> list[nn.Module]:
        return [self.image_tower_m, self.text_tower_m, self.image_proj_m, self.text_proj_m]

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(
            zip([self.image_tower, self.text_tower, self.image_proj, self.text_proj], self._momentum_modules())
        )

    def momentum_rate(self, step: int | None = None) -> float:
        """The EMA rate at optimizer step ``step`` (default: steps done): ``m``, or with ``momentum_warmup``
        ``min(m, (1 + t) / (10 + t))``."""
        m = self.config.model.momentum
        t = int(self.num_updates) if step is None else step
        return min(m, (1.0 + t) / (10.0 + t)) if self.config.model.momentum_warmup else m

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """After each optimizer step: count it, and take the EMA step of the divergence encoder,
        p_m <- m*p_m + (1-m)*p (buffers such as BatchNorm statistics are copied)."""
        m = self.momentum_rate() if momentum is None else momentum
        self.num_updates += 1
        if not self.config.loss.divergence:
            return
        if self._ema_tensors is None:  # walk the module tree once, not every step (5.1 -> 1.8 ms, CPU)
            pairs = [(p, p_m) for a, b in self._momentum_pairs() for p, p_m in zip(a.parameters(), b.parameters())]
            buffers = [(x, x_m) for a, b in self._momentum_pairs() for x, x_m in zip(a.buffers(), b.buffers())]
            self._ema_tensors = (pairs, [x for x, _ in buffers], [x_m for _, x_m in buffers])
        pairs, bufs, bufs_m = self._ema_tensors
        # frozen weights are equal in both copies and stay so
        online = [p.detach() for p, _ in pairs if p.requires_grad]
        mom = [p_m for p, p_m in pairs if p.requires_grad]
        # p_m + (1-m)(p - p_m) = m p_m + (1-m) p, one multi-tensor kernel (as timm's ModelEmaV3); buffers copied
        if mom:
            torch._foreach_lerp_(mom, online, 1.0 - m)
        if bufs:
            torch._foreach_copy_(bufs_m, bufs)

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

    def encode_batch_image(self, batch: dict[str, Tensor], normalize: bool = True) -> Tensor:
        """The batch's image embeddings, from its cached frozen-stage outputs (``trunk``, ``trunk_fmap``; see
        :class:`mlip_core.train.TrunkFeatureDataset`) when it carries them, else from its images."""
        trunk = self._cached_trunk(batch)
        if trunk is None:
            return self.encode_image(batch["image"], normalize)
        z = self.image_proj(self.image_tower.forward_from_trunk(*trunk).global_)
        return F.normalize(z, dim=-1) if normalize else z

    @staticmethod
    def _cached_trunk(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None] | None:
        """The batch's cached frozen-stage outputs (``trunk``, ``trunk_fmap`` or None) in float32, or None."""
        if "trunk" not in batch:
            return None
        fmap = batch.get("trunk_fmap")
        return batch["trunk"].float(), None if fmap is None else fmap.float()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True,
                    sentence: Tensor | None = None) -> Tensor:
        """(B,L) ids and mask -> (B,d) global report embedding (``sentence``: precomputed tower output)."""
        if sentence is None:
            sentence = self.text_tower(input_ids, attention_mask).sentence
        z = self.text_proj(sentence)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_batch_text(self, batch: dict[str, Tensor], normalize: bool = True) -> Tensor:
        """The batch's report embeddings, from precomputed tower features when the batch carries them."""
        return self.encode_text(batch["input_ids"], batch["attention_mask"], normalize, batch.get("text_sentence"))

    def _text_features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(sentence (B,Dt), tokens (B,L,Dt), cls_attention (B,L) or None) of the batch's reports."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "text_tokens" in batch:
            if not self.text_tower.frozen:
                raise ValueError("the batch carries precomputed text features but the text tower trains; "
                                 "precompute only for a wholly frozen tower")
            L = ids.shape[1]
            cls = batch.get("text_cls_attention")
            return batch["text_sentence"], batch["text_tokens"][:, :L], None if cls is None else cls[:, :L]
        want_cls = self.config.loss.local_word_weights == "cls_attention" and self.config.loss.local != "none"
        txt = self.text_tower(ids, mask, cls_attention=want_cls)
        return txt.sentence, txt.tokens, txt.cls_attention

    def features(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Named features of a batch: ``image_global``/``text_global`` (B,d) normalised, their momentum
        versions ``*_m`` (or None), ``logit_scale`` (), ``image_patches`` (B,P,Dp), ``patch_grid``,
        ``text_tokens`` (B,L,Dt), ``text_cls_attention`` (B,L) or None, ``attention_mask`` (B,L)."""
        # The stem and frozen stages of the tower and of its momentum copy hold the same weights (the EMA skips
        # frozen ones, buffers are copied): compute them once for both (more than half a CNN's forward), or read
        # them from the batch (train.trunk_views: computed once per augmented view before training).
        trunk = self._cached_trunk(batch)
        if trunk is None and self.config.loss.divergence and not self.image_tower.is_vit \
                and self.image_tower.frozen_trunk_stages > 0:
            trunk = self.image_tower.frozen_trunk(batch["image"])
        img = self.image_tower(batch["image"]) if trunk is None else self.image_tower.forward_from_trunk(*trunk)
        sentence, tokens, cls = self._text_features(batch)
        f: dict[str, Any] = {
            "image_global": F.normalize(self.image_proj(img.global_), dim=-1),
            "text_global": F.normalize(self.text_proj(sentence), dim=-1),
            "logit_scale": self._scale(),
            "image_patches": img.patches, "patch_grid": img.grid,
            "text_tokens": tokens, "text_cls_attention": cls, "attention_mask": batch["attention_mask"],
            "image_global_m": None, "text_global_m": None,
        }
        if self.config.loss.divergence:
            with torch.no_grad():
                if trunk is not None:  # oneDNN runs this no-grad tail ~20% faster channels-last on a CPU (EfficientNet, 96 px)
                    fmt = torch.channels_last if trunk[0].device.type == "cpu" else torch.contiguous_format
                    img_m = self.image_tower_m.forward_from_trunk(
                        *(None if t is None else t.contiguous(memory_format=fmt) for t in trunk))
                else:
                    img_m = self.image_tower_m(batch["image"])
                f["image_global_m"] = F.normalize(self.image_proj_m(img_m.global_), dim=-1)
                # A wholly frozen text tower equals its momentum copy: reuse its output.
                s_m = sentence if self.text_tower.frozen else \
                    self.text_tower_m(batch["input_ids"], batch["attention_mask"]).sentence
                f["text_global_m"] = F.normalize(self.text_proj_m(s_m), dim=-1)
        return f

    def encode_swap_tokens(self, batch: dict[str, Tensor], tokens: Tensor, with_grad: bool = False) -> Tensor:
        """Token features (B,L',Dt) of the swap reports. Rows whose swap text is the original report
        (same ids) reuse the batch's token features instead of a second forward pass; only altered
        reports are encoded (without gradient unless ``with_grad``). A batch that carries them already encoded
        by the frozen tower (``swap_text_tokens``, see :class:`mlip_core.train.TextFeatureDataset`) is read."""
        if "swap_text_tokens" in batch:
            if not self.text_tower.frozen:
                raise ValueError("the batch carries precomputed swap features but the text tower trains; "
                                 "precompute them only for a wholly frozen tower")
            return batch["swap_text_tokens"].to(tokens.dtype)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        s_ids, s_mask = batch["swap_input_ids"], batch["swap_attention_mask"]
        B, Ls = s_ids.shape
        n = min(Ls, ids.shape[1])
        same = (s_mask[:, n:].sum(1) == 0) & (mask[:, n:].sum(1) == 0) & (s_mask[:, :n] == mask[:, :n]).all(1)
        same &= ((s_ids[:, :n] == ids[:, :n]) | (s_mask[:, :n] == 0)).all(1)
        out = tokens.new_zeros(B, Ls, tokens.shape[-1])
        reuse = tokens[:, :n] if with_grad else tokens[:, :n].detach()
        out[:, :n] = torch.where(same[:, None, None], reuse, out[:, :n])
        todo = (~same).nonzero().squeeze(1)
        if todo.numel():
            grad = torch.enable_grad() if with_grad and not self.text_tower.frozen else torch.no_grad()
            with grad:
                enc = self.text_tower(s_ids[todo], s_mask[todo]).tokens
            out = out.index_copy(0, todo, enc.to(out.dtype))
        return out

    @torch.no_grad()
    def local_attention(self, batch: dict[str, Tensor]) -> Tensor:
        """(B,L,P) token-to-patch attention of the local term (for figures); padding rows are zero."""
        local = self.objective.terms["local"]
        f = self.features(batch)
        t, v = local.embed(f, batch, self)
        attn = torch.softmax(t @ v.transpose(1, 2) / self.config.loss.local_temperature, dim=-1)
        return attn * local_token_mask(batch["attention_mask"]).unsqueeze(-1)

    # -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch -> {"loss": weighted total, "loss_<term>" per enabled term, diagnostics, "temperature",
        ``image_embedding``/``text_embedding`` (B,d): the normalised global embeddings, detached, which validation
        reads instead of running the towers a second time}."""
        f = self.features(batch)
        out = self.objective(f, batch, self, Progress(int(self.num_updates), self.steps_per_epoch))
        out["temperature"] = (1.0 / f["logit_scale"]).detach()
        out["image_embedding"], out["text_embedding"] = f["image_global"].detach(), f["text_global"].detach()
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

    def build() -> Tensor:
        was_training = text_tower.training
        text_tower.eval()
        device = next(text_tower.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            feats = text_tower(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            chunks.append(feats.sentence.float().cpu())
        text_tower.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, text_tower.hidden_dim)

    key = cache_key("\n".join(texts) + f"|{max_length}|{text_tower.cfg.pooling}")
    return cached_tensors(workspace("cache") / f"entities_{_slug(text_tower.name)}_{key}.pt", build,
                          enabled=cache and getattr(text_tower, "pretrained", False), what="entity embedding cache")
