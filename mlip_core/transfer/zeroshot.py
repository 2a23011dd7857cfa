"""Zero-shot classification with a pretrained run's two towers and prompts built from the knowledge graph.

    prompts = zeroshot_prompts(KnowledgeGraph.load_default(), CHEXPERT_5)      # {finding: {"positive", "negative"}}
    rows = zeroshot_eval(run_dir, offline_world_task(world))                    # method, task, fraction 0, seed, ...
    model, tok = load_run_model(run_dir); zeroshot_scores(model, tok, images, prompts)   # (N, F) probabilities

Protocol
--------
No label is used for training: the whole pretrained model of a run (image tower, text tower, both projection
heads and the temperature; :func:`mlip_core.interpret.load_run_model`) scores each test image against text.

* **Prompts from the knowledge graph.** A finding (a task label such as "Pleural Effusion") is resolved to its
  graph entity (:func:`mlip_core.interpret.finding_entity`). Its *positive* prompt set is the entity's name and
  its synonyms (lower case; plurals of a kept term and one-word adjectival forms such as "atelectatic" are
  dropped), optionally with attributes: laterality from the graph's laterality entities ("left pleural
  effusion") for findings located in a paired structure (lung, pleura, ribs, ...), and caller-given severity
  modifiers ("small left pleural effusion"). Its *negative* set negates every positive term with
  :data:`NEGATIVE_TEMPLATES` ("no pleural effusion", "no evidence of pleural effusion"). A label without an entity
  falls back to its own name ("No Finding": :data:`NO_FINDING_PROMPTS`).
* **Prompt ensembling** (CLIP, Radford et al. 2021, Sec. 3.1.4): each prompt's normalised text embedding, their
  mean, re-normalised.
* **Scores.** ``mode="pos_neg"`` (CheXzero, Tiu et al. 2022): for image i and finding f the softmax over the two
  similarities (cos(i, pos_f), cos(i, neg_f)) / tau, the positive entry, i.e. sigmoid((cos_pos - cos_neg) / tau).
  tau is the run's temperature (``model.temperature()``). AUROC depends only on the ranking of cos_pos - cos_neg,
  so it does not depend on tau (CheXzero's code uses tau = 1). ``mode="positive"``: cos(i, pos_f) alone (the plain
  CLIP-style score without a negative prompt). AUROC per finding and their macro mean on the task's test split.
* **Multi-class** (COVIDx-style): one prompt set per class (a dict), the softmax over the classes' ensemble
  similarities / tau, argmax for accuracy, one-vs-rest AUROC per class.

Images come from the uint8 :func:`~mlip_core.transfer.classify.image_cache` at the run's image size with the
evaluation transform; everything runs in eval mode under ``torch.inference_mode``.

Differences from the papers: MLIP and MGCA report no zero-shot classification on CheXpert (MGCA has none; MLIP's
tables are linear-probe classification, detection, segmentation); CheXzero's prompts are hand-written
("{label}" / "no {label}"), ours are the knowledge graph's names and synonyms; the towers are the book's small ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mlip_core.knowledge.graph import normalize_term, plural_forms
from mlip_core.transfer.classify import ClassificationTask, auroc_per_label, image_cache
from mlip_core.transfer.finetune import MulticlassTask, multiclass_metrics, sweep_results

__all__ = [
    "NEGATIVE_TEMPLATES",
    "NO_FINDING_PROMPTS",
    "PAIRED_ANATOMY",
    "covidx_class_prompts",
    "ensemble_embedding",
    "finding_terms",
    "pos_neg_probability",
    "prompt_embeddings",
    "zeroshot_eval",
    "zeroshot_multiclass",
    "zeroshot_prompts",
    "zeroshot_scores",
]

NEGATIVE_TEMPLATES: tuple[str, ...] = ("no {}", "no evidence of {}")
# Anatomy that comes in a left and a right: findings located in it (directly, or via located_in / is_a) get
# laterality attributes.
PAIRED_ANATOMY: tuple[str, ...] = ("lung", "pleura", "ribs", "clavicle", "shoulder", "diaphragm")
_ADJECTIVE_ENDINGS = ("ic", "ed", "ous", "ive")
# CheXpert's "No Finding" has no entity (it is the absence of every finding): its prompts are written here.
NO_FINDING_PROMPTS: dict[str, list[str]] = {
    "positive": ["no finding", "no acute cardiopulmonary process", "normal chest radiograph"],
    "negative": ["acute cardiopulmonary process", "abnormal chest radiograph"],
}


# ------------------------------------------------------------------------------------------------------------
# Prompts
def _default_graph(graph: Any) -> Any:
    if graph is not None:
        return graph
    from mlip_core.knowledge.graph import KnowledgeGraph

    return KnowledgeGraph.load_default()


def finding_terms(graph: Any, finding: str, max_terms: int | None = None) -> tuple[str | None, list[str]]:
    """(entity id or None, the finding's terms): the entity's name first, then its synonyms, lower case, without
    duplicates, plurals of a kept term (regular, and -is/-es, -ax/-aces) and one-word adjectives ("atelectatic",
    "consolidated"). A finding with no entity gives ``[finding]`` (lower case)."""
    from mlip_core.interpret import finding_entity

    eid = finding_entity(graph, finding)
    if eid is None:
        return None, [finding.replace("_", " ").lower()]
    ent = graph.entity(eid)
    terms: list[str] = []
    seen: set[str] = set()
    for raw in [ent.name, *ent.synonyms]:
        t = normalize_term(raw)
        if not t or t in seen:
            continue
        if " " not in t and t.endswith(_ADJECTIVE_ENDINGS) and terms:
            continue
        if t.endswith("es") and (t[:-2] + "is" in seen or t[:-4] + "ax" in seen):  # atelectases, pneumothoraces
            continue
        seen.update(plural_forms(t))
        terms.append(t)
    return eid, terms[:max_terms] if max_terms else terms


def _lateralisable(graph: Any, eid: str) -> bool:
    """Is the entity located (through located_in / is_a) in a paired structure?"""
    frontier, seen = [eid], {eid}
    while frontier:
        node = frontier.pop()
        if node in PAIRED_ANATOMY:
            return True
        for nxt in graph.neighbors(node, "located_in") + graph.neighbors(node, "is_a"):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return False


def zeroshot_prompts(graph: Any, findings: Sequence[str], attributes: bool = False, modifiers: Sequence[str] = (),
                     max_terms: int | None = None, negative_templates: Sequence[str] = NEGATIVE_TEMPLATES
                     ) -> dict[str, dict[str, Any]]:
    """{finding: {"positive": [...], "negative": [...], "entity": id or None}} from the knowledge graph (None:
    the default graph). Positive: :func:`finding_terms`; with ``attributes`` also "<side> <name>" for every
    laterality entity of the graph when the finding lies in paired anatomy, and "<modifier> [<side>] <name>" for
    each of ``modifiers`` (e.g. ("small", "large")). Negative: each template of ``negative_templates`` applied to
    each term (attributes are not negated: "no left effusion" still allows a right one)."""
    graph = _default_graph(graph)
    out: dict[str, dict[str, Any]] = {}
    for f in findings:
        eid, terms = finding_terms(graph, f, max_terms)
        if eid is None and normalize_term(f) == "no finding":
            out[f] = {**{k: list(v) for k, v in NO_FINDING_PROMPTS.items()}, "entity": None}
            continue
        positive = list(terms)
        if eid is not None and (attributes or modifiers):
            name = terms[0]
            sides = ([graph.entity(s).name.lower() for s in graph.ids_by_category("laterality")]
                     if attributes and _lateralisable(graph, eid) else [])
            positive += [f"{s} {name}" for s in sides]
            positive += [f"{m} {name}" for m in modifiers] + [f"{m} {s} {name}" for m in modifiers for s in sides]
        negative = [tpl.format(t) for t in terms for tpl in negative_templates]
        out[f] = {"positive": list(dict.fromkeys(positive)), "negative": list(dict.fromkeys(negative)), "entity": eid}
    return out


def covidx_class_prompts(graph: Any = None) -> dict[str, list[str]]:
    """Default class prompts for COVIDx's three classes. "pneumonia" is the graph's pneumonia terms; "COVID-19"
    and "normal" have no graph entity and are written here (COVID-19 pneumonia's typical radiograph: bilateral,
    peripheral, lower-zone ground-glass opacity and consolidation)."""
    graph = _default_graph(graph)
    _, pneumonia = finding_terms(graph, "pneumonia")
    return {
        "normal": ["no acute cardiopulmonary process", "normal chest radiograph", "the lungs are clear",
                   "no focal consolidation, effusion or pneumothorax"],
        "pneumonia": pneumonia,
        "COVID-19": ["covid-19 pneumonia", "bilateral peripheral ground glass opacities",
                     "multifocal bilateral airspace opacities consistent with viral pneumonia",
                     "bilateral lower lobe peripheral consolidation"],
    }


# ------------------------------------------------------------------------------------------------------------
# Embeddings and scores
def ensemble_embedding(embeddings: Tensor) -> Tensor:
    """(P, d) prompt embeddings -> (d,): the mean of the normalised embeddings, re-normalised (CLIP)."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"expected (P, d) embeddings with P >= 1, got shape {tuple(embeddings.shape)}")
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(0), dim=-1)


@torch.inference_mode()
def _encode_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    from mlip_core.interpret import encode_prompts

    return torch.cat([encode_prompts(model, tokenizer, list(texts[s:s + batch_size]))
                      for s in range(0, len(texts), batch_size)])


def prompt_embeddings(model: Any, tokenizer: Any, prompts: Mapping[str, Mapping[str, Sequence[str]]]
                      ) -> tuple[Tensor, Tensor]:
    """(positive (F, d), negative (F, d)) ensemble embeddings of each finding's prompt sets, in ``prompts``'
    order. Every prompt text is encoded once."""
    texts = list(dict.fromkeys(t for p in prompts.values() for key in ("positive", "negative") for t in p[key]))
    emb = _encode_texts(model, tokenizer, texts)
    row = {t: i for i, t in enumerate(texts)}

    def ens(key: str) -> Tensor:
        return torch.stack([ensemble_embedding(emb[[row[t] for t in p[key]]]) for p in prompts.values()])

    return ens("positive"), ens("negative")


def pos_neg_probability(image_emb: Tensor, pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """(N, F) softmax over (cos(i, pos_f), cos(i, neg_f)) / temperature, the positive entry. ``image_emb`` (N, d)
    and the prompt embeddings (F, d) are normalised here."""
    img = F.normalize(image_emb.float(), dim=-1)
    pair = torch.stack([img @ F.normalize(pos.float(), dim=-1).T, img @ F.normalize(neg.float(), dim=-1).T], dim=-1)
    return torch.softmax(pair / temperature, dim=-1)[..., 0]


def _temperature(model: Any, temperature: float | None) -> float:
    if temperature is not None:
        return float(temperature)
    return float(model.temperature()) if hasattr(model, "temperature") else 1.0


@torch.inference_mode()
def _image_embeddings(model: Any, images: Tensor | np.ndarray, batch_size: int, progress: bool = False) -> Tensor:
    """(N, d) normalised image embeddings of float (N, 1, S, S) tensors (already transformed) or uint8 (N, S, S)
    images (the evaluation transform applied per batch)."""
    from mlip_core.data.transforms import eval_transform

    model.eval()
    device = next(model.parameters()).device
    raw = isinstance(images, np.ndarray)
    tf = eval_transform(int(images.shape[-1])) if raw else None
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="zero-shot images", leave=False)
    out = []
    for s in starts:
        chunk = images[s:s + batch_size]
        x = torch.stack([tf(np.array(a)) for a in chunk]) if raw else chunk
        out.append(model.encode_image(x.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.inference_mode()
def zeroshot_scores(model: Any, tokenizer: Any, images: Tensor | np.ndarray,
                    prompts: Mapping[str, Mapping[str, Sequence[str]]], mode: str = "pos_neg",
                    temperature: float | None = None, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(N, F) zero-shot scores of each image for each finding of ``prompts`` (:func:`zeroshot_prompts`):
    ``"pos_neg"`` the positive probability of the pos/neg softmax, ``"positive"`` the cosine with the positive
    ensemble. ``images``: float (N, 1, S, S) as the tower takes them, or uint8 (N, S, S)."""
    if mode not in ("pos_neg", "positive"):
        raise ValueError(f"mode={mode!r}; use 'pos_neg' or 'positive'")
    model.eval()
    pos, neg = prompt_embeddings(model, tokenizer, prompts)
    img = _image_embeddings(model, images, batch_size, progress)
    if len(img) == 0:
        return np.zeros((0, len(prompts)), dtype=np.float64)
    if mode == "positive":
        return (F.normalize(img, dim=-1) @ F.normalize(pos, dim=-1).T).double().numpy()
    return pos_neg_probability(img, pos, neg, _temperature(model, temperature)).double().numpy()


@torch.inference_mode()
def zeroshot_multiclass(model: Any, tokenizer: Any, images: Tensor | np.ndarray,
                        class_prompts: Mapping[str, Sequence[str]], temperature: float | None = None,
                        batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(N, K) class probabilities: the softmax over the classes of cos(image, class ensemble) / tau, classes in
    ``class_prompts``' order (argmax = the predicted class)."""
    model.eval()
    texts = list(dict.fromkeys(t for ps in class_prompts.values() for t in ps))
    emb = _encode_texts(model, tokenizer, texts)
    row = {t: i for i, t in enumerate(texts)}
    cls = torch.stack([ensemble_embedding(emb[[row[t] for t in ps]]) for ps in class_prompts.values()])
    img = _image_embeddings(model, images, batch_size, progress)
    if len(img) == 0:
        return np.zeros((0, len(class_prompts)), dtype=np.float64)
    logits = F.normalize(img, dim=-1) @ cls.T / _temperature(model, temperature)
    return torch.softmax(logits, dim=-1).double().numpy()


# ------------------------------------------------------------------------------------------------------------
# The evaluation of a run
def zeroshot_eval(run_dir: str | os.PathLike, task: ClassificationTask | MulticlassTask, split: str = "test",
                  image_size: int | None = None, cache_root: str | os.PathLike | None = None,
                  prompts: Mapping | None = None, mode: str = "pos_neg", graph: Any = None,
                  temperature: float | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
                  progress: bool = False) -> pd.DataFrame:
    """Zero-shot scores of a pretraining run on ``task``'s ``split`` as result rows: method (the run's config
    name), task (``task.name``), fraction 0, seed (the run's training seed), metric ``"AUROC <label>"`` for each
    label with both classes in the split, ``"macro_AUROC"``, and for a multi-class task ``"accuracy"``.

    ``prompts``: a multi-label task's {label: {"positive", "negative"}} (default :func:`zeroshot_prompts` of the
    default graph) or a multi-class task's {class: [texts]} (default :func:`covidx_class_prompts`, which must
    name every class). Images: the run's image size unless ``image_size``; undecodable images are left out."""
    from mlip_core.config import load_config
    from mlip_core.interpret import load_run_model
    from mlip_core.paths import workspace

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    size = int(image_size or cfg.model.image.image_size)
    rows_df = task.split(split)
    if not len(rows_df):
        raise ValueError(f"task {task.name!r} has no {split!r} rows")
    cache = image_cache(rows_df["image_path"].astype(str).tolist(), size, cache_root or workspace("cache", "images"),
                        progress=progress)
    valid = np.asarray(cache.valid, dtype=bool)
    images = np.asarray(cache.array)[valid]
    model, tokenizer = load_run_model(run_dir, device)
    base = {"encoder": cfg.name, "fraction": 0.0, "seed": int(cfg.train.seed), "C": np.nan}
    sweep: list[dict] = []
    if isinstance(task, MulticlassTask):
        class_prompts = dict(prompts) if prompts is not None else covidx_class_prompts(graph)
        missing = [c for c in task.classes if c not in class_prompts]
        if missing:
            raise ValueError(f"no prompts for class(es) {missing}; pass prompts={{class: [texts]}}")
        probs = zeroshot_multiclass(model, tokenizer, images, {c: class_prompts[c] for c in task.classes},
                                    temperature, batch_size, progress)
        y = rows_df["label_index"].to_numpy(dtype=int)[valid]
        metrics, skipped = multiclass_metrics(y, probs, task.classes)
        for k, c in enumerate(task.classes):
            sweep.append({**base, "label": c, "auroc": metrics.get(f"AUROC {c}", np.nan),
                          "status": f"skipped: {skipped[c]}" if c in skipped else "scored",
                          "test positives": int((y == k).sum()), "accuracy": metrics["accuracy"]})
    else:
        prompts = prompts if prompts is not None else zeroshot_prompts(_default_graph(graph), task.labels)
        missing = [lab for lab in task.labels if lab not in prompts]
        if missing:
            raise ValueError(f"no prompts for label(s) {missing}")
        scores = zeroshot_scores(model, tokenizer, images, {lab: prompts[lab] for lab in task.labels}, mode,
                                 temperature, batch_size, progress)
        y = rows_df[task.labels].to_numpy(dtype=np.float64)[valid]
        aurocs, skipped = auroc_per_label(y, scores, task.labels)
        for j, lab in enumerate(task.labels):
            sweep.append({**base, "label": lab, "auroc": aurocs.get(lab, np.nan),
                          "status": f"skipped: {skipped[lab]}" if lab in skipped else "scored",
                          "test positives": int(np.nansum(y[:, j]))})
    return sweep_results(pd.DataFrame(sweep), task.name)
