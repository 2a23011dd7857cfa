"""What the encoders learnt, measured on the offline world's ground-truth masks: UMAP of embeddings, Grad-CAM on the
image tower, MLIP's token→patch attention, and localization scores (pointing game, IoU of the top saliency).

    methods = grid_methods(read_run_table(workspace("results") / "06_ablations_runs.csv"), ["convirt", "mlip"])
    ev = evaluation_set(world, splits=("validate", "test"), max_images=200, score_size=64)
    model, tok = load_run_model(methods[2].run_dir)                # the whole MLIP of a run (text side included)
    maps = gradcam_maps(model.image_tower, PromptHead(model.image_proj, prompts), images, targets)
    pointing_game(maps[0], mask), topk_iou(maps[0], mask, 0.1)

Chapter ``10_interpretability`` calls these. Maps are (N, H, W) float arrays; a mask is a bool (H, W) array of
the same size. Everything here is evaluation: it reads ``synth/`` (the renderer's truth), which pretraining never
does.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "EvalSet", "FigureData", "Loaded", "Method", "PromptHead", "ScoreModel", "all_images", "attention_maps",
    "evaluation_set", "figure_pairs", "finding_entity", "finding_prompt", "gradcam_layer", "gradcam_maps",
    "grid_methods", "load_images", "load_run_model", "localization_summary", "localize", "neighbour_agreement",
    "overlay", "pointing_game", "probe_head", "random_maps", "read_run_table", "resize_maps", "result_rows",
    "score_maps", "topk_iou", "umap_embedding", "versus",
]

# World finding names (synth/findings.csv) whose knowledge-graph entity the lookup by name does not find.
FINDING_ENTITY: dict[str, str] = {
    "opacity": "lung_opacity", "effusion": "pleural_effusion", "device": "support_device",
    "interstitial": "interstitial_markings",
}


# ---------------------------------------------------------------------------------------------
# Localization scores


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Is the map's maximum inside the mask? 1.0 / 0.0 for a unique maximum. Ties: the fraction of the tied
    maxima inside the mask (a flat map scores the mask's area fraction, the expected hit of a random point)."""
    saliency, mask = np.asarray(saliency, dtype=np.float64), np.asarray(mask, dtype=bool)
    if saliency.shape != mask.shape:
        raise ValueError(f"map {saliency.shape} and mask {mask.shape} differ in size; resize the map first")
    if not mask.any():
        raise ValueError("empty mask: the pointing game needs at least one pixel of the finding")
    peak = saliency >= saliency.max()
    return float((peak & mask).sum() / peak.sum())


def topk_iou(saliency: np.ndarray, mask: np.ndarray, fraction: float = 0.1) -> float:
    """IoU of the map's top ``fraction`` of pixels with the mask.

    The top set is every pixel at or above the k-th largest value (k = fraction * pixels). When that value is
    the map's minimum (a map that is zero almost everywhere, as Grad-CAM after its ReLU), only the pixels above
    the minimum are taken: the map marks fewer pixels than k, and counting its flat background would be
    arbitrary. A flat map marks every pixel."""
    saliency, mask = np.asarray(saliency, dtype=np.float64), np.asarray(mask, dtype=bool)
    if saliency.shape != mask.shape:
        raise ValueError(f"map {saliency.shape} and mask {mask.shape} differ in size; resize the map first")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = saliency.ravel()
    k = max(1, int(round(fraction * flat.size)))
    kth = np.partition(flat, flat.size - k)[flat.size - k]
    lo = flat.min()
    top = saliency >= kth
    if kth <= lo and flat.max() > lo:
        top = saliency > lo
    union = (top | mask).sum()
    return float((top & mask).sum() / union) if union else 0.0


def random_maps(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) uniform random maps from a seeded generator: the baseline every map kind must beat."""
    return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)


def resize_maps(maps: np.ndarray | Tensor, size: int) -> np.ndarray:
    """(N, h, w) maps to (N, size, size) by nearest neighbour: a cell of a patch grid becomes a block.

    Not bilinear on purpose: upsampling a 2x2 or 4x4 grid bilinearly (with the border clamped) puts the plateau
    of a corner cell's value in the image's outer corner, so the pointing game would score where interpolation
    puts the peak, not which cell the map chose."""
    t = torch.as_tensor(np.array(maps, dtype=np.float32))[:, None]
    if t.shape[-2:] == (size, size):
        return t[:, 0].numpy()
    return F.interpolate(t, size=(size, size), mode="nearest-exact")[:, 0].numpy()


def score_maps(maps: np.ndarray, masks: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Pointing game and top-``fraction`` IoU of each map (N, S, S) against its mask (N, S, S)."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps for {len(masks)} masks")
    maps = resize_maps(maps, masks.shape[-1]) if len(maps) else maps
    pg = np.array([pointing_game(m, k) for m, k in zip(maps, masks)], dtype=np.float64)
    iou = np.array([topk_iou(m, k, fraction) for m, k in zip(maps, masks)], dtype=np.float64)
    return pg, iou


# ---------------------------------------------------------------------------------------------
# The evaluation set: held-out studies of the pretraining world with masked findings


def finding_entity(graph: Any, finding: str) -> str | None:
    """The knowledge-graph entity id of a world finding name (``effusion`` -> ``pleural_effusion``), or None."""
    if finding in FINDING_ENTITY and FINDING_ENTITY[finding] in graph:
        return FINDING_ENTITY[finding]
    for text in (finding, finding.replace("_", " ")):
        ent = graph.lookup(text)
        if ent is not None:
            return ent.id
    return None


def finding_prompt(graph: Any, finding: str) -> str:
    """The zero-shot prompt of a finding: its knowledge-graph name in lower case ("pleural effusion")."""
    eid = finding_entity(graph, finding)
    return graph.entity(eid).name.lower() if eid else finding.replace("_", " ")


@dataclass
class EvalSet:
    """``images``: one row per image (dicom_id, study_id, split, image_path, text, primary finding);
    ``pairs``: one row per (image, finding) with ``image`` (row of ``images``), ``finding``, ``entity``,
    ``area_fraction``; ``masks``: bool (len(pairs), S, S), the union of that finding's masks in the image at the
    scoring size S."""

    images: pd.DataFrame
    pairs: pd.DataFrame
    masks: np.ndarray
    world_size: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def findings(self) -> list[str]:
        return sorted(self.pairs["finding"].unique())


@functools.lru_cache(maxsize=2)
def _world_pairs_cached(world: str, mtime: int) -> pd.DataFrame:
    from mlip_core.data.mimic import load_mimic_pairs

    return load_mimic_pairs(world, split=None)[0]


def world_pairs(world: str | os.PathLike) -> pd.DataFrame:
    """Every frontal image of a world with its report and split (:func:`load_mimic_pairs`, read once per process:
    reading thousands of reports takes seconds, and the evaluation set, the UMAP images and the probe all need
    them)."""
    world = Path(world).resolve()
    split_csv = world / "mimic-cxr-2.0.0-split.csv"
    mtime = split_csv.stat().st_mtime_ns if split_csv.is_file() else 0
    return _world_pairs_cached(str(world), mtime).copy()


def _read_mask(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img) >= 128


def evaluation_set(world: str | os.PathLike, splits: Sequence[str] = ("validate", "test"), max_images: int = 200,
                   min_mask_fraction: float = 0.005, score_size: int = 64, seed: int = 0,
                   graph: Any = None) -> EvalSet:
    """The studies of ``splits`` with at least one drawn finding whose mask covers ``min_mask_fraction`` of the
    image (smaller findings, a granuloma of a few pixels, vanish at the towers' input size), at most
    ``max_images`` of them (a seeded draw), with their reports and each finding's mask at ``score_size``."""
    from mlip_core.knowledge.graph import KnowledgeGraph

    world = Path(world)
    graph = graph or KnowledgeGraph.load_default()
    findings = pd.read_csv(world / "synth" / "findings.csv", dtype={"dicom_id": str})
    pairs_all = world_pairs(world)
    pairs_all = pairs_all[pairs_all["split"].isin(list(splits))]
    size = _image_side(pairs_all)  # the world's images and masks share one square size
    f = findings[findings["dicom_id"].isin(set(pairs_all["dicom_id"]))].copy()
    f["entity"] = [finding_entity(graph, x) for x in f["finding"]]
    skipped = {"findings without a knowledge-graph entity": int(f["entity"].isna().sum())}
    f = f[f["entity"].notna()]
    grouped = f.groupby(["dicom_id", "finding", "entity"], sort=True).agg(area=("area", "sum"),
                                                                          masks=("mask", list)).reset_index()
    grouped["area_fraction"] = grouped["area"] / float(size * size)
    small = grouped["area_fraction"] < min_mask_fraction
    skipped[f"findings under {min_mask_fraction:.2%} of the image"] = int(small.sum())
    grouped = grouped[~small]
    ids = np.array(sorted(grouped["dicom_id"].unique()))
    if max_images and len(ids) > max_images:
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_images, replace=False))
        skipped["images beyond max_images"] = int(len(grouped["dicom_id"].unique()) - max_images)
    images = pairs_all.set_index("dicom_id").loc[ids].reset_index()
    # primary finding (largest drawn area, masks of any size) for colouring embeddings
    primary = findings.sort_values("area", ascending=False).drop_duplicates("dicom_id").set_index("dicom_id")
    images["primary"] = [primary["finding"].get(d, "no finding") for d in images["dicom_id"]]
    images = images[["dicom_id", "study_id", "split", "image_path", "text", "primary"]]
    row_of = {d: i for i, d in enumerate(images["dicom_id"])}
    pairs = grouped[grouped["dicom_id"].isin(row_of)].copy()
    pairs.insert(0, "image", [row_of[d] for d in pairs["dicom_id"]])
    pairs = pairs.sort_values(["image", "finding"]).reset_index(drop=True)
    masks = np.zeros((len(pairs), score_size, score_size), dtype=bool)
    for i, rels in enumerate(pairs["masks"]):
        for rel in rels:
            masks[i] |= _read_mask(world / rel, score_size)
    empty = ~masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, dtype=bool)
    if empty.any():
        skipped[f"masks empty at {score_size} px"] = int(empty.sum())
        pairs, masks = pairs[~empty].reset_index(drop=True), masks[~empty]
    return EvalSet(images, pairs.drop(columns=["masks", "area"]), masks, size, skipped)


def _image_side(pairs: pd.DataFrame) -> int:
    from PIL import Image

    with Image.open(pairs["image_path"].iloc[0]) as img:
        return int(max(img.size))


def all_images(world: str | os.PathLike, splits: Sequence[str], max_images: int, seed: int = 0) -> pd.DataFrame:
    """Every frontal image of ``splits`` (normal ones too) with report and primary finding, at most
    ``max_images`` (seeded): what the UMAP panels embed."""
    world = Path(world)
    pairs = world_pairs(world)
    pairs = pairs[pairs["split"].isin(list(splits))].sort_values("dicom_id").reset_index(drop=True)
    if max_images and len(pairs) > max_images:
        pairs = pairs.iloc[np.sort(np.random.default_rng(seed).choice(len(pairs), max_images, replace=False))]
    findings = pd.read_csv(world / "synth" / "findings.csv", dtype={"dicom_id": str})
    primary = findings.sort_values("area", ascending=False).drop_duplicates("dicom_id").set_index("dicom_id")
    out = pairs[["dicom_id", "study_id", "split", "image_path", "text"]].reset_index(drop=True)
    out["primary"] = [primary["finding"].get(d, "no finding") for d in out["dicom_id"]]
    return out


def load_images(paths: Sequence[str], size: int) -> Tensor:
    """(N, 1, size, size) float tensors as the towers see them (pad-resize, then the evaluation transform)."""
    from mlip_core.data.images import load_uint8
    from mlip_core.data.transforms import eval_transform

    tf = eval_transform(size)
    if not len(paths):
        return torch.zeros(0, 1, size, size)
    return torch.stack([tf(load_uint8(p, size)) for p in paths])


# ---------------------------------------------------------------------------------------------
# The models of chapter 06's grid


@dataclass
class Method:
    """One encoder to explain: ``name`` (config or baseline), ``seed``, its :class:`Encoder` (image tower), and,
    for a pretraining run, ``run_dir`` (the whole model, text side included)."""

    name: str
    seed: int
    encoder: Any
    run_dir: str | None = None
    local: str = "none"  # the run's local term (none, gloria, mgca, mlip): attention maps exist when not none
    kinds: tuple[str, ...] | None = None  # map kinds to compute (None: every kind the method has)

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


def read_run_table(path: str | os.PathLike) -> pd.DataFrame:
    """Chapter 06's run table (config, seed, run_dir, export, ...); a clear error when 06 has not run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run table; run the chapter 06_ablations first (it trains the grid and "
                                "writes this table)")
    runs = pd.read_csv(path)
    missing = [c for c in ("config", "seed", "run_dir", "export") if c not in runs.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; re-run 06_ablations with this version")
    return runs


def grid_methods(runs: pd.DataFrame, configs: Sequence[str], seeds: Sequence[int] | None = None,
                 baselines: bool = True) -> list[Method]:
    """Baselines (random init, and ImageNet init when the grid's towers start from ImageNet weights), then every
    run of ``configs`` (those present in the table) with ``seeds`` (None: all)."""
    from mlip_core.config import load_config
    from mlip_core.transfer.classify import Encoder, encoder_from_export

    out: list[Method] = []
    sel = runs[runs["config"].isin(list(configs))]
    if seeds is not None:
        sel = sel[sel["seed"].isin([int(s) for s in seeds])]
    if not len(sel):
        raise ValueError(f"the run table holds none of {list(configs)} (it has {sorted(runs['config'].unique())})")
    first = load_config(Path(sel["run_dir"].iloc[0]) / "config.yaml").model.image
    if baselines:
        tower = {"name": first.name, "pretrained": "", "patch_level": first.patch_level}
        out.append(Method("random init", 0, Encoder("random init", "tower", first.image_size, tower=tower)))
        if first.pretrained:
            out.append(Method("ImageNet init", 0, Encoder("ImageNet init", "tower", first.image_size,
                                                          tower={**tower, "pretrained": first.pretrained})))
    order = {c: i for i, c in enumerate(configs)}
    for r in sorted(sel.itertuples(index=False), key=lambda r: (order[r.config], int(r.seed))):
        cfg = load_config(Path(r.run_dir) / "config.yaml")
        out.append(Method(r.config, int(r.seed), encoder_from_export(f"{r.config}_seed{r.seed}", r.export),
                          str(r.run_dir), cfg.loss.local))
    return out


def load_run_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The whole model of a training run (``config.yaml`` + its newest step checkpoint), in eval mode, and its
    tokenizer. The image tower is built without its initial weights (the checkpoint holds them); a frozen
    pretrained text tower that the checkpoint left out is rebuilt from the config and checked by
    :func:`mlip_core.checkpoint.load_model_checkpoint_state`; the knowledge-entity embeddings come from the checkpoint,
    so nothing is downloaded or re-encoded."""
    from mlip_core.checkpoint import find_resumable, load_model_checkpoint_state
    from mlip_core.config import load_config
    from mlip_core.knowledge.graph import KnowledgeGraph
    from mlip_core.model.encoders import build_tokenizer
    from mlip_core.model.mlip import MLIP

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    found = find_resumable(run_dir / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no step checkpoint; the run did not finish a step")
    path, ckpt = found
    cfg.model.image.pretrained = ""  # every image-tower weight comes from the checkpoint
    entities = ckpt["model"].get("entity_embeddings")
    graph = KnowledgeGraph.load_default()
    protos = [graph.entity_ids.index(i) for i in graph.finding_ids]
    with torch.random.fork_rng(devices=[]):
        model = MLIP(cfg, torch.zeros_like(entities) if entities is not None else None, prototype_entities=protos)
    try:
        load_model_checkpoint_state(model, ckpt)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} does not fit the model of {run_dir / 'config.yaml'} ({str(exc)[:300]})") from exc
    return model.to(device).eval(), build_tokenizer(cfg.model.text)


@torch.no_grad()
def encode_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """(K, d) normalised report-space embeddings of the prompt texts."""
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=model.config.model.text.max_length,
                    return_tensors="pt")
    return model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float()


@torch.no_grad()
def encode_reports(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """(N, d) normalised report embeddings."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True,
                        max_length=model.config.model.text.max_length, return_tensors="pt")
        out.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.model.embed_dim), dtype=np.float32)


@torch.no_grad()
def encode_images(tower: nn.Module, images: Tensor, proj: nn.Module | None = None, batch_size: int = 64) -> np.ndarray:
    """(N, D) global features of the tower (through ``proj`` and normalised when given: the joint space)."""
    device = next(tower.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        g = tower(images[s:s + batch_size].to(device)).global_
        if proj is not None:
            g = F.normalize(proj(g), dim=-1)
        out.append(g.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Grad-CAM


class PromptHead(nn.Module):
    """Global tower feature -> cosine similarity with each of K prompt embeddings (B, K): the zero-shot score."""

    def __init__(self, image_proj: nn.Module, prompts: Tensor) -> None:
        super().__init__()
        self.image_proj = image_proj
        self.register_buffer("prompts", F.normalize(prompts.detach().float(), dim=-1))

    def forward(self, g: Tensor) -> Tensor:
        return F.normalize(self.image_proj(g), dim=-1) @ self.prompts.t()


class ScoreModel(nn.Module):
    """An image tower with a head on its global feature: (B, 1, H, W) -> (B, K) scores, what Grad-CAM explains."""

    def __init__(self, tower: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.tower(x).global_)


def probe_head(features: np.ndarray, labels: np.ndarray, C: float = 1.0, seed: int = 0) -> tuple[nn.Linear, np.ndarray]:
    """One logistic regression per column of ``labels`` (N, K) 0/1 on standardised ``features`` (N, D), folded
    into a ``Linear(D, K)`` on the raw features (so Grad-CAM explains the probe's logit). Columns with a single
    class get a zero row; the second return value says which columns were fitted."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = features.mean(0), features.std(0) + 1e-6
    z = (features - mu) / sd
    k, d = labels.shape[1], features.shape[1]
    w, b, fitted = np.zeros((k, d)), np.zeros(k), np.zeros(k, dtype=bool)
    for j in range(k):
        y = labels[:, j].astype(int)
        if 0 < y.sum() < len(y):
            clf = LogisticRegression(C=C, solver="liblinear", max_iter=1000, random_state=seed).fit(z, y)
            w[j], b[j], fitted[j] = clf.coef_[0] / sd, clf.intercept_[0] - (clf.coef_[0] * mu / sd).sum(), True
    head = nn.Linear(d, k)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head, fitted


def gradcam_layer(tower: nn.Module) -> tuple[nn.Module, Callable[[Tensor], Tensor] | None]:
    """The layer Grad-CAM reads and how to turn its output into (B, C, h, w).

    CNN towers: the feature level whose map the local terms read (``patch_level``, e.g. ResNet layer3 at stride
    16), so that Grad-CAM and the attention maps share one resolution. ViT towers: the last block's first norm,
    with the prefix (class) tokens dropped and the patch tokens laid out on their grid."""
    b = tower.backbone
    if getattr(tower, "is_vit", False):
        prefix = int(b.num_prefix_tokens)
        h, w = (int(v) for v in b.patch_embed.grid_size)

        def reshape(x: Tensor) -> Tensor:
            x = x[:, prefix:]
            return x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)

        return b.blocks[-1].norm1, reshape
    name = b.feature_info[tower._level]["module"]
    return b.get_submodule(name), None


class _Target:
    """Score ``k`` of the model output (one per image), as pytorch-grad-cam's ClassifierOutputTarget."""

    def __init__(self, k: int) -> None:
        self.k = int(k)

    def __call__(self, output: Tensor) -> Tensor:
        return output[..., self.k]


def _layer_resolution_gradcam():
    """pytorch-grad-cam's GradCAM keeping the map at the target layer's resolution (it would resize it to the
    input bilinearly with OpenCV; :func:`resize_maps` upsamples by blocks instead)."""
    from pytorch_grad_cam import GradCAM

    class LayerResolutionGradCAM(GradCAM):
        def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
            act = self.activations_and_grads.activations[0]  # (B, C, h, w), after the reshape transform
            return int(act.shape[-1]), int(act.shape[-2])

    return LayerResolutionGradCAM


def gradcam_maps(tower: nn.Module, head: nn.Module, images: Tensor, targets: Sequence[int], batch_size: int = 64,
                 device: str | torch.device = "cpu", native: bool = False) -> np.ndarray:
    """Grad-CAM (pytorch-grad-cam) of head(tower(image))[target] for each image, in [0, 1]: (N, H, W) at the
    input's size (each cell of the layer's map a block), or with ``native`` (N, h, w) at the layer's resolution.

    Only the activations' gradients are needed: the weights are switched to no-grad for the call and the target
    layer's output is made to require a gradient (a forward hook), so the backward pass stops at that layer and
    frozen early stages cannot stop it."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    model = ScoreModel(tower, head).to(device).eval()
    layer, reshape = gradcam_layer(tower)
    wanted = [p for p in model.parameters() if p.requires_grad]
    for p in wanted:
        p.requires_grad_(False)

    def needs_grad(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output if output.requires_grad else output.detach().requires_grad_(True)

    hook = layer.register_forward_hook(needs_grad)  # before GradCAM's hooks: they see a tensor with a gradient
    out = []
    try:
        with _layer_resolution_gradcam()(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            for s in range(0, len(images), batch_size):
                x = images[s:s + batch_size].to(device)
                out.append(cam(input_tensor=x, targets=[_Target(k) for k in targets[s:s + batch_size]]))
    finally:
        hook.remove()
        for p in wanted:
            p.requires_grad_(True)
    if not out:
        return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    maps = np.concatenate(out).astype(np.float32)
    if native:
        return maps
    if images.shape[-1] != images.shape[-2]:
        t = F.interpolate(torch.as_tensor(maps)[:, None], size=tuple(images.shape[-2:]), mode="nearest-exact")
        return t[:, 0].numpy()
    return resize_maps(maps, int(images.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Token -> patch attention


def report_batch(model: nn.Module, tokenizer: Any, texts: Sequence[str], images: Tensor) -> dict[str, Tensor]:
    """Images and reports as the local term reads them: ids, mask and each token's entity and status."""
    from mlip_core.knowledge.extract import default_extractor

    enc = default_extractor().encode(list(texts), tokenizer, model.config.model.text.max_length, padding="longest")
    return {"image": images, **enc}


@torch.no_grad()
def attention_maps(model: nn.Module, tokenizer: Any, images: Tensor, texts: Sequence[str], pair_image: Sequence[int],
                   pair_entity: Sequence[int], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Token→patch attention of the model's local term for each (image, entity) pair: the mean over the
    report's tokens of *positive* mentions of that entity of ``MLIP.local_attention`` (B, L, P), as (N, h, w).

    Returns (maps, found): ``found`` is False where the report names the entity in no positive mention (that
    pair's map is zero and is not scored)."""
    from mlip_core.objective import POSITIVE

    device = next(model.parameters()).device
    pair_image, pair_entity = np.asarray(pair_image, dtype=int), np.asarray(pair_entity, dtype=int)
    maps: np.ndarray | None = None
    found = np.zeros(len(pair_image), dtype=bool)
    for s in range(0, len(images), batch_size):
        idx = np.arange(s, min(s + batch_size, len(images)))
        batch = report_batch(model, tokenizer, [texts[i] for i in idx], images[idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        attn = model.local_attention(batch).float().cpu()  # (b, L, P)
        grid = model.image_tower(batch["image"][:1]).grid
        if maps is None:
            maps = np.zeros((len(pair_image), *grid), dtype=np.float32)
        ent, st = batch["token_entity"].cpu(), batch["token_status"].cpu()
        for p in np.flatnonzero(np.isin(pair_image, idx)):
            b = int(pair_image[p] - s)
            words = (ent[b] == int(pair_entity[p])) & (st[b] == POSITIVE)
            if words.any():
                maps[p] = attn[b, words].mean(0).reshape(grid).numpy()
                found[p] = True
    if maps is None:
        maps = np.zeros((len(pair_image), 1, 1), dtype=np.float32)
    return maps, found


def knowledge_words(text: str, max_length_chars: int | None = None) -> list[tuple[str, str, str]]:
    """(entity id, the words, status) of each finding mention in a report, in order (what the figures list)."""
    from mlip_core.knowledge.extract import default_extractor

    ex = default_extractor()
    finding = set(ex.graph.finding_ids)
    return [(m.entity_id, m.text, m.status) for m in ex.mentions(text[:max_length_chars] if max_length_chars else text)
            if m.entity_id in finding]


# ---------------------------------------------------------------------------------------------
# UMAP


def umap_embedding(x: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(N, D) -> (N, 2) UMAP (umap-learn, cosine metric, seeded, one thread so the layout is reproducible)."""
    import umap

    n = len(x)
    if n < 4:
        return np.zeros((n, 2), dtype=np.float32)
    reducer = umap.UMAP(n_neighbors=max(2, min(n_neighbors, n - 1)), min_dist=0.3, metric="cosine",
                        random_state=seed, n_jobs=1, init="spectral" if n > 30 else "random")
    return reducer.fit_transform(np.asarray(x, dtype=np.float32)).astype(np.float32)


def neighbour_agreement(x: np.ndarray, labels: Sequence[str], k: int = 10) -> float:
    """Fraction of each point's k nearest neighbours (cosine, in the full space) that share its label."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if len(x) < 2:
        return float("nan")
    z = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(x) - 1)
    nn_idx = np.argsort(-sim, axis=1)[:, :k]
    return float((labels[nn_idx] == labels[:, None]).mean())


# ---------------------------------------------------------------------------------------------
# The whole measurement


def _probe_data(world: Path, n_images: int, seed: int, findings: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Training-split images (a seeded draw of ``n_images``) and their drawn findings (N, K) 0/1."""
    pairs = world_pairs(world)
    pairs = pairs[pairs["split"] == "train"].sort_values("dicom_id").reset_index(drop=True)
    if n_images and len(pairs) > n_images:
        pairs = pairs.iloc[np.sort(np.random.default_rng(seed).choice(len(pairs), n_images, replace=False))]
    drawn = pd.read_csv(world / "synth" / "findings.csv", dtype={"dicom_id": str})
    have = drawn.groupby("dicom_id")["finding"].apply(set)
    y = np.array([[f in have.get(d, set()) for f in findings] for d in pairs["dicom_id"]], dtype=np.float32)
    return pairs["image_path"].tolist(), y


@dataclass
class Loaded:
    """What :func:`localize` holds for one method while it scores it, handed to its ``on_model`` callback:
    the image tower, the probe head (over ``findings``), and for a run the whole model, its tokenizer and the
    prompt embeddings (K, d)."""

    method: Method
    tower: nn.Module
    probe: nn.Module | None
    findings: list[str]
    model: nn.Module | None = None
    tokenizer: Any = None
    prompts: Tensor | None = None


def localize(methods: Sequence[Method], ev: EvalSet, world: str | os.PathLike, top_fraction: float = 0.1,
             probe_images: int = 500, probe_C: float = 1.0, random_seeds: Sequence[int] = (0,),
             batch_size: int = 64, device: str = "cpu", feature_dir: str | os.PathLike | None = None,
             cache_root: str | os.PathLike | None = None, keep_maps: Sequence[int] = (),
             on_model: Callable[[Loaded], None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Score every method's maps on ``ev``: one row per (method, seed, kind, pair) with ``pointing`` and ``iou``.

    Kinds: ``gradcam_prompt`` (the similarity with the finding's prompt; runs only), ``gradcam_probe`` (the
    logit of a linear probe fitted on ``probe_images`` training images' drawn findings), ``attention`` (the
    local term's token→patch attention, runs with a local term, pairs whose report names the finding), and
    ``random`` (uniform random maps, one seed per ``random_seeds``). ``keep_maps``: pair indices whose maps are
    returned for figures, as ``info["maps"][(method, seed, kind)]`` (len(keep_maps), h, w), NaN where not
    scored. ``on_model(loaded)`` sees each method's towers and model once (figures without loading twice)."""
    from mlip_core.knowledge.graph import KnowledgeGraph
    from mlip_core.paths import workspace
    from mlip_core.transfer.classify import build_tower, encoder_features

    world = Path(world)
    graph = KnowledgeGraph.load_default()
    findings = ev.findings
    fidx = {f: i for i, f in enumerate(findings)}
    targets = np.array([fidx[f] for f in ev.pairs["finding"]], dtype=int)
    pair_image = ev.pairs["image"].to_numpy()
    pair_entity = np.array([graph.index(e) for e in ev.pairs["entity"]], dtype=int)
    prompts = [finding_prompt(graph, f) for f in findings]
    probe_paths, probe_y = _probe_data(world, probe_images, 0, findings)
    feature_dir = feature_dir or workspace("features", "interpret")
    cache_root = cache_root or workspace("cache", "images")
    keep = np.asarray(keep_maps, dtype=int)
    rows: list[pd.DataFrame] = []
    kept: dict[tuple[str, int, str], np.ndarray] = {}
    timing: dict[str, float] = {}
    images_by_size: dict[int, Tensor] = {}

    def record(method: str, seed: int, kind: str, maps: np.ndarray, valid: np.ndarray | None = None) -> None:
        valid = np.ones(len(maps), dtype=bool) if valid is None else valid
        pg, iou = score_maps(maps[valid], ev.masks[valid], top_fraction)
        df = ev.pairs.loc[valid, ["image", "finding"]].copy()
        df.insert(0, "pair", np.flatnonzero(valid))
        df.insert(0, "kind", kind)
        df.insert(0, "seed", seed)
        df.insert(0, "method", method)
        df["pointing"], df["iou"] = pg, iou
        rows.append(df)
        if len(keep):
            kept[(method, seed, kind)] = np.where(valid[keep, None, None], maps[keep], np.nan)

    for m in methods:
        t0 = time.perf_counter()
        size = m.encoder.image_size
        if size not in images_by_size:
            images_by_size[size] = load_images(ev.images["image_path"].tolist(), size)
        images = images_by_size[size][torch.tensor(pair_image, dtype=torch.long)]
        loaded = Loaded(m, build_tower(m.encoder).to(device), None, findings)
        if m.wants("gradcam_probe"):
            feats, valid, _ = encoder_features(m.encoder, probe_paths, cache_root, feature_dir,
                                               batch_size=batch_size, device=device)
            loaded.probe, fitted = probe_head(feats, probe_y[valid], C=probe_C)
            record(m.name, m.seed, "gradcam_probe",
                   gradcam_maps(loaded.tower, loaded.probe, images, targets, batch_size, device, native=True),
                   fitted[targets])
        if m.run_dir:
            model, tok = load_run_model(m.run_dir, device)
            loaded.model, loaded.tokenizer, loaded.tower = model, tok, model.image_tower
            loaded.prompts = encode_prompts(model, tok, prompts)
            if m.wants("gradcam_prompt"):
                record(m.name, m.seed, "gradcam_prompt",
                       gradcam_maps(model.image_tower, PromptHead(model.image_proj, loaded.prompts), images, targets,
                                    batch_size, device, native=True))
            if m.local != "none" and m.wants("attention"):
                amaps, found = attention_maps(model, tok, images_by_size[size], ev.images["text"].tolist(),
                                              pair_image, pair_entity)
                record(m.name, m.seed, "attention", amaps, found)
        if on_model is not None:
            on_model(loaded)
        del loaded
        timing[f"{m.name} seed {m.seed}"] = time.perf_counter() - t0
    size = ev.masks.shape[-1]
    for s in random_seeds:
        record("random map", int(s), "random", random_maps(len(ev.pairs), size, int(s)))
    scores = pd.concat(rows, ignore_index=True)
    return scores, {"maps": kept, "timing": timing, "prompts": dict(zip(findings, prompts)),
                    "probe_positives": dict(zip(findings, probe_y.sum(0).astype(int).tolist())),
                    "probe_images": len(probe_paths)}


class FigureData:
    """An ``on_model`` callback for :func:`localize` that keeps what the figures need while each model is loaded:
    UMAP inputs (image embeddings, and report embeddings for runs) of ``umap_images`` for the methods in
    ``umap_methods`` ({(name, seed)}), and Grad-CAM maps of ``extra_image`` (e.g. the real radiograph) for the
    findings ``extra_findings``: the prompt target for runs, the probe target for every method in
    ``extra_methods``."""

    def __init__(self, umap_images: pd.DataFrame, umap_methods: set[tuple[str, int]],
                 extra_image: np.ndarray | None = None, extra_methods: set[tuple[str, int]] = frozenset(),
                 extra_findings: Sequence[str] = ()) -> None:
        self.umap_images, self.umap_methods = umap_images, set(umap_methods)
        self.extra_image, self.extra_methods, self.extra_findings = extra_image, set(extra_methods), list(extra_findings)
        self.image_embeddings: dict[str, np.ndarray] = {}
        self.report_embeddings: dict[str, np.ndarray] = {}
        self.extra_maps: dict[tuple[str, str, str], np.ndarray] = {}  # (method, kind, finding) -> (H, W)
        self._images: dict[int, Tensor] = {}

    def __call__(self, loaded: Loaded) -> None:
        from mlip_core.data.images import resize_uint8
        from mlip_core.data.transforms import eval_transform

        m = loaded.method
        size = m.encoder.image_size
        key = (m.name, m.seed)
        if key in self.umap_methods:
            if size not in self._images:
                self._images[size] = load_images(self.umap_images["image_path"].tolist(), size)
            proj = loaded.model.image_proj if loaded.model is not None else None
            self.image_embeddings[m.name] = encode_images(loaded.tower, self._images[size], proj)
            if loaded.model is not None:
                self.report_embeddings[m.name] = encode_reports(loaded.model, loaded.tokenizer,
                                                                self.umap_images["text"].tolist())
        if key in self.extra_methods and self.extra_image is not None:
            x = eval_transform(size)(resize_uint8(self.extra_image, size))[None]
            ks = [loaded.findings.index(f) for f in self.extra_findings if f in loaded.findings]
            names = [loaded.findings[k] for k in ks]
            if loaded.probe is not None and ks:
                maps = gradcam_maps(loaded.tower, loaded.probe, x.expand(len(ks), -1, -1, -1), ks, native=True)
                self.extra_maps.update({(m.name, "gradcam_probe", f): mp for f, mp in zip(names, maps)})
            if loaded.model is not None and ks:
                head = PromptHead(loaded.model.image_proj, loaded.prompts)
                maps = gradcam_maps(loaded.model.image_tower, head, x.expand(len(ks), -1, -1, -1), ks, native=True)
                self.extra_maps.update({(m.name, "gradcam_prompt", f): mp for f, mp in zip(names, maps)})


def figure_pairs(ev: EvalSet, n: int) -> list[int]:
    """Pair indices for the overlay figures: the largest finding of each kind (one per finding, largest first)."""
    best = ev.pairs.sort_values("area_fraction", ascending=False).drop_duplicates("finding")
    return best.index[:n].tolist()


def versus(scores: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], metric: str = "pointing") -> dict[str, Any]:
    """Method/kind ``a`` against ``b`` on one metric, the book's way (:func:`mlip_core.results.compare`): the
    per-seed means over pairs, their mean and s.d. over seeds, the difference and whether it exceeds the spread
    (s.d. a + s.d. b; NaN and no claim with a single seed on either side)."""
    out: dict[str, Any] = {}
    for tag, (method, kind) in (("a", a), ("b", b)):
        sel = scores[(scores["method"] == method) & (scores["kind"] == kind)]
        per_seed = sel.groupby("seed")[metric].mean()
        out[f"mean_{tag}"], out[f"sd_{tag}"] = float(per_seed.mean()), float(per_seed.std(ddof=1))
        out[f"seeds_{tag}"], out[f"pairs_{tag}"] = int(len(per_seed)), int(len(sel) // max(1, len(per_seed)))
    out["diff"] = out["mean_a"] - out["mean_b"]
    out["spread"] = out["sd_a"] + out["sd_b"]
    out["exceeds"] = bool(not np.isnan(out["spread"]) and abs(out["diff"]) > out["spread"])
    return out


def overlay(ax: Any, image: np.ndarray, saliency: np.ndarray | None = None, mask: np.ndarray | None = None,
            title: str = "", alpha: float = 0.45) -> None:
    """Draw a grey radiograph, a saliency map upsampled to it by blocks (jet, transparent: what was scored) and a
    mask's outline (white)."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    if saliency is not None and np.isfinite(saliency).all():
        lo, hi = float(saliency.min()), float(saliency.max())  # each map on its own range (attention is ~1/P)
        ax.imshow(resize_maps(saliency[None], image.shape[0])[0], cmap="jet", alpha=alpha, vmin=lo,
                  vmax=hi if hi > lo else lo + 1e-6)
    elif saliency is not None:
        ax.text(0.5, 0.5, "not scored", color="white", ha="center", va="center", transform=ax.transAxes)
    if mask is not None:
        m = resize_maps(np.asarray(mask, dtype=np.float32)[None], image.shape[0])[0]
        ax.contour(m, levels=[0.5], colors="white", linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


KIND_ORDER = ["gradcam_prompt", "gradcam_probe", "attention", "random"]


def result_rows(scores: pd.DataFrame, top_fraction: float) -> pd.DataFrame:
    """Rows for ``write_results``: per (method, seed, kind, finding) and per (method, seed, kind) over all
    findings (``task`` = ``kind/finding`` or ``kind/all``), ``metric`` pointing_game / iou_topN, ``value`` the
    mean over pairs, with the number of pairs ``n`` and the s.d. over pairs ``sd_pairs`` as extra columns."""
    iou_name = f"iou_top{round(top_fraction * 100)}"
    long = scores.melt(id_vars=["method", "seed", "kind", "finding"], value_vars=["pointing", "iou"],
                       var_name="metric", value_name="v")
    long["metric"] = long["metric"].map({"pointing": "pointing_game", "iou": iou_name})
    per = long.assign(task=long["kind"] + "/" + long["finding"])
    alls = long.assign(task=long["kind"] + "/all")
    out = []
    for part in (alls, per):
        g = part.groupby(["method", "task", "seed", "metric"], sort=False)["v"]
        out.append(pd.DataFrame({"value": g.mean(), "n": g.count(), "sd_pairs": g.std(ddof=1)}).reset_index())
    res = pd.concat(out, ignore_index=True)
    res.insert(2, "fraction", np.nan)
    return res[["method", "task", "fraction", "seed", "metric", "value", "n", "sd_pairs"]]


def localization_summary(scores: pd.DataFrame, method_order: Sequence[str]) -> pd.DataFrame:
    """Mean ± s.d. over the scored (image, finding) pairs (all seeds of a method pooled), per method and map
    kind, for both metrics; plus the s.d. over seeds of the per-seed means (``sd_seeds``)."""
    out = []
    for (method, kind), g in scores.groupby(["method", "kind"], sort=False):
        per_seed = g.groupby("seed")[["pointing", "iou"]].mean()
        out.append({"method": method, "kind": kind, "pairs": len(g) // max(1, g["seed"].nunique()),
                    "seeds": g["seed"].nunique(),
                    "pointing": g["pointing"].mean(), "pointing_sd": g["pointing"].std(ddof=1),
                    "pointing_sd_seeds": per_seed["pointing"].std(ddof=1),
                    "iou": g["iou"].mean(), "iou_sd": g["iou"].std(ddof=1),
                    "iou_sd_seeds": per_seed["iou"].std(ddof=1)})
    df = pd.DataFrame(out)
    order = {m: i for i, m in enumerate(list(method_order) + ["random map"])}
    df["_m"], df["_k"] = df["method"].map(order).fillna(99), df["kind"].map({k: i for i, k in enumerate(KIND_ORDER)})
    return df.sort_values(["_m", "_k"]).drop(columns=["_m", "_k"]).reset_index(drop=True)
