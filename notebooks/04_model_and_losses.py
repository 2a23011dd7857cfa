# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The model and its losses
#
# This chapter opens up the model that the pretraining chapter trains: what each tower returns, which
# heads sit on top, and what each loss term rewards. Everything here lives in the library —
# `mlip_core.model` (towers, heads, the divergence encoder, the fusion head) and `mlip_core.losses`
# (one small `nn.Module` per term) — and the baselines are *configurations of the same code*:
# `named_config("convirt" | "gloria" | "mgca" | "mlip" | "mlip_no_<part>")`.
#
# **What is the paper's and what is ours.** The MLIP abstract names a *divergence encoder*,
# *knowledge-guided* contrastive learning at the token–knowledge–patch and category levels, and
# (per secondary summaries) two proxy tasks, image–text matching and text swapping. The concrete
# formulas below — ALBEF-style soft targets from a momentum encoder, the knowledge guard on negatives,
# MGCA's token-level loss with knowledge-fused tokens, SwAV/MGCA prototypes initialised from knowledge
# embeddings (a supervised contrastive term on labels is available, off by default), ALBEF's hard-negative ITM — are *our* reading of
# those parts, chosen to be faithful and checkable; the tests in `tests/test_losses.py` pin each one.
#
# **What you will learn.** What each tower returns, which heads sit on top, what each loss term rewards and
# how its value moves, and how the baselines are configurations of the same code.
#
# **What it needs.** Nothing from earlier chapters: the batch shown here is made up on the spot, so the
# shapes and losses can be read without any data.
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("04_model_and_losses"))

# %% tags=["parameters"]
image_tower = "resnet18"  # timm name; single-channel input
image_size = 128
text_tower = "minilm"  # minilm (MiniLM-L6 shipped offline), tiny (small random BERT) or a Hub name
text_allow_download = False  # only the full profile lets a Hub text tower download
batch_size = 8
landscape_batch = 48  # samples in the aligned-vs-shuffled sweep
landscape_steps = 6  # shuffled fractions between 0 and 1
seed = 0

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from myst_nb import glue

from mlip_core.config import ImageTowerConfig, TextTowerConfig, all_config_names, named_config
from mlip_core.data.collate import PretrainCollator
from mlip_core.knowledge.extract import KnowledgeExtractor
from mlip_core.knowledge.graph import CHEXPERT_14
from mlip_core.losses import (
    CategoryLoss,
    GloriaLocalLoss,
    GlobalContrastiveLoss,
    LocalAlignmentLoss,
    local_token_weights,
    same_finding_set,
)
from mlip_core.model.encoders import TextTower, build_tokenizer
from mlip_core.model.mlip import MLIP, embed_entities
from mlip_core.notebook import setup

device = setup(seed)

# %% [markdown]
# ## Baselines and ablations are switches
#
# Each named configuration turns parts of one loss on or off. A row per configuration, a column per
# part (the ablation notebook trains each row).

# %%
rows = []
for name in all_config_names():
    lc = named_config(name).loss
    rows.append({
        "config": name,
        "divergence": lc.divergence,
        "knowledge negatives": lc.knowledge_negatives,
        "local": lc.local,
        "knowledge fusion": lc.knowledge_fusion and lc.local == "mlip",
        "category": lc.category,
        "knowledge prototypes": lc.category and lc.knowledge_prototypes,
        "supcon": lc.category and lc.supcon,
        "ITM": lc.itm,
        "swap": lc.swap,
    })
pd.DataFrame(rows).set_index("config")

# %% [markdown]
# ## One batch through the full model
#
# We build `mlip` with the towers named in the parameters, embed every knowledge-graph entity with the
# text tower (the "knowledge embeddings" that are fused into report tokens and that initialise the
# prototypes), and collate a batch of invented reports with the knowledge extractor marking entity
# tokens and the text-swap pairs.

# %%
cfg = named_config("mlip")
cfg.model.image = ImageTowerConfig(name=image_tower, image_size=image_size)
cfg.model.text = TextTowerConfig(name=text_tower, max_length=64, allow_download=text_allow_download)
tokenizer = build_tokenizer(cfg.model.text)
extractor = KnowledgeExtractor()
graph = extractor.graph
entity_embeddings = embed_entities(TextTower(cfg.model.text), tokenizer, graph.entity_texts())
finding_index = [graph.index(i) for i in graph.finding_ids]
model = MLIP(cfg, entity_embeddings, prototype_entities=finding_index).to(device)
print(f"{len(graph.entity_ids)} entities embedded -> {tuple(entity_embeddings.shape)}; "
      f"{len(finding_index)} finding prototypes + {cfg.model.num_free_prototypes} free")

reports = [  # invented, in the usual style
    "The heart is enlarged. Small left pleural effusion. No pneumothorax.",
    "No acute cardiopulmonary abnormality.",
    "Lungs are clear. No acute cardiopulmonary process.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Mild pulmonary edema. Bilateral pleural effusions.",
    "No acute cardiopulmonary abnormality. Heart size is normal.",
    "Left apical pneumothorax. Heart size is normal.",
    "Stable cardiomegaly. No focal consolidation.",
]
reports = (reports * (batch_size // len(reports) + 1))[:batch_size]
items = []
for i, text in enumerate(reports):
    labels = extractor.report_labels(text)
    items.append({
        "image": torch.rand(1, image_size, image_size),
        "text": text,
        "labels": torch.tensor([labels[c] for c in CHEXPERT_14], dtype=torch.float32),
        "study_id": i,
        "index": i,
    })
collate = PretrainCollator(tokenizer, extractor, max_length=64, swap_prob=0.5, generator=torch.Generator().manual_seed(seed))
batch = {k: v.to(device) for k, v in collate(items).items()}
with torch.no_grad():
    img = model.image_tower(batch["image"])
    txt = model.text_tower(batch["input_ids"], batch["attention_mask"])
pd.DataFrame([
    ("image global vector", tuple(img.global_.shape)),
    (f"image patch grid ({img.grid[0]}x{img.grid[1]})", tuple(img.patches.shape)),
    ("report sentence vector", tuple(txt.sentence.shape)),
    ("report token features", tuple(txt.tokens.shape)),
    ("token_entity (entity index, -1 none)", tuple(batch["token_entity"].shape)),
    ("shared embedding d", (cfg.model.embed_dim,)),
    ("prototypes (category term)", tuple(model.objective.terms["category"].prototypes.shape)),
], columns=["tensor", "shape"])

# %% [markdown]
# The model only computes features; the loss terms live in `mlip_core.objective`, built from the config —
# one module per term, each owning the heads only it uses — and summed there with their weights:

# %%
pd.DataFrame([{"term": name, "weight": model.objective.weights[name],
               "own parameters": sum(p.numel() for p in term.parameters())}
              for name, term in model.objective.terms.items()])

# %% [markdown]
# One forward pass returns the weighted total, every term and the diagnostics the trainer logs (and the
# batch's two global embeddings, which validation reads instead of running the towers again):

# %%
model.train()
out = model(batch)
out["loss"].backward()
pd.Series({k: float(v.detach()) for k, v in out.items() if v.numel() == 1}, name="value").to_frame()

# %% [markdown]
# ## Aligned pairs versus shuffled pairs
#
# A loss is only useful if it is lower when images and reports belong together. Here the "towers" are
# replaced by synthetic embeddings where report $i$ is a noisy copy of image $i$ (globally, and token
# by token: each token sits near one patch of its own image). We then mis-pair a growing fraction of
# the batch and measure every term: each should be lowest when every pair is aligned.

# %%
def synthetic(B: int, L: int = 16, P: int = 16, d: int = 32, noise: float = 0.4, gen_seed: int = 0):
    g = torch.Generator().manual_seed(gen_seed)
    img = F.normalize(torch.randn(B, d, generator=g), dim=-1)
    txt = F.normalize(img + noise * torch.randn(B, d, generator=g), dim=-1)
    patches = F.normalize(torch.randn(B, P, d, generator=g), dim=-1)
    pick = torch.randint(0, P, (B, L), generator=g)
    tokens = F.normalize(patches[torch.arange(B)[:, None], pick] + noise * torch.randn(B, L, d, generator=g), dim=-1)
    mask = torch.ones(B, L, dtype=torch.bool)
    labels = torch.zeros(B, 14)
    labels[torch.arange(B), torch.arange(B) % 5] = 1
    return img, txt, patches, tokens, mask, labels


img_s, txt_s, patches_s, tokens_s, mask_s, labels_s = synthetic(landscape_batch)
weights_s = local_token_weights(mask_s, None, 1.0)
protos_s = F.normalize(torch.randn(10, img_s.shape[1], generator=torch.Generator().manual_seed(1)), dim=-1)
scale = torch.tensor(1 / 0.07)
records = []
for frac in np.linspace(0, 1, landscape_steps):
    k = int(round(frac * landscape_batch))
    perm = torch.arange(landscape_batch)
    perm[:k] = torch.roll(perm[:k], 1)  # mis-pair the first k samples
    with torch.no_grad():
        records += [
            {"shuffled": frac, "term": "global InfoNCE", "loss": float(GlobalContrastiveLoss(0.0, False)(img_s, txt_s[perm], scale)["loss"])},
            {"shuffled": frac, "term": "local token-patch", "loss": float(LocalAlignmentLoss(0.1)(tokens_s, patches_s[perm], mask_s, weights_s)["loss"])},
            {"shuffled": frac, "term": "GLoRIA word-region", "loss": float(GloriaLocalLoss()(tokens_s, patches_s[perm], mask_s)["loss"])},
            {"shuffled": frac, "term": "category (swapped)", "loss": float(CategoryLoss(supcon=False)(img_s, txt_s[perm], protos_s)["loss"])},
        ]
landscape = pd.DataFrame(records)
g = sns.relplot(data=landscape, x="shuffled", y="loss", col="term", kind="line", marker="o",
                facet_kws={"sharey": False}, height=2.8, aspect=1.0)
g.set_axis_labels("fraction of mis-paired samples", "loss")
g.figure.suptitle("Every term is lowest for aligned pairs", y=1.04)
plt.show()

# %%
landscape.pivot(index="shuffled", columns="term", values="loss").round(3)

# %% [markdown]
# All four terms are lowest when every pair is aligned and rise as pairs are mis-paired. The
# token-patch loss moves over a narrow range: it is a within-pair loss — each token against the
# contexts of its own report's other tokens — so it measures *how* a report is grounded in its image,
# while the global and GLoRIA terms, which contrast across the batch, decide *which* image.
#
# ## Soft targets and the knowledge guard
#
# The divergence encoder gives every image–report pair a second opinion. With $a$ = {glue:text}`ml_soft_alpha`
# (the config's `soft_alpha`) the target of
# row $i$ is $(1-a)\,\mathbb{1}[j=i] + a\,\mathrm{softmax}_j(s^m_{ij}/\tau)$: near-duplicate reports
# share some of the target mass instead of being pushed away as hard negatives. As an illustration we
# stand in for a well-trained momentum model with the text tower's own sentence vectors (image = its
# report), so $s^m$ is report–report similarity. The knowledge guard, on the right, removes pairs whose
# reports state the same non-empty set of positive findings (here the extractor's labels) from each other's
# negatives. "No Finding" is not a finding two reports can share: it says the set is empty. Counted as one, it
# would take every normal–normal pair out of the negatives (most pairs in a batch of mostly normal studies) and,
# in the category term's SupCon (when switched on), pull every normal image to one point; near-identical normal reports are what
# the soft targets on the left are for.

# %%
with torch.no_grad():
    z = F.normalize(model.text_tower_m(batch["input_ids"], batch["attention_mask"]).sentence, dim=-1)
a, tau = cfg.loss.soft_alpha, cfg.model.init_temperature
glue("ml_soft_alpha", a, display=False)
glue("ml_tau", tau, display=False)
n = len(reports)
eye = torch.eye(n, dtype=torch.bool)
targets = (1 - a) * eye.float() + a * (z @ z.T / tau).softmax(1).cpu()
guard = same_finding_set(batch["labels"].cpu()) & ~eye
short = [f"{i}: {r[:28]}…" if len(r) > 28 else f"{i}: {r}" for i, r in enumerate(reports)]
fig, axes = plt.subplots(1, 2, figsize=(15, 6))
sns.heatmap(targets.masked_fill(eye, float("nan")).numpy(), ax=axes[0], cmap="viridis", annot=True, fmt=".2f",
            xticklabels=[str(i) for i in range(n)], yticklabels=short, cbar_kws={"label": "target probability"})
axes[0].set_title(f"off-diagonal soft-target mass (a = {a}; diagonal = {1 - a} + a·self)\nmomentum text encoder: {text_tower}")
axes[0].set_xlabel("report j")
axes[0].set_ylabel("image i (stand-in: its own report)")
sns.heatmap(guard.float().numpy(), ax=axes[1], cmap="Reds", xticklabels=[str(i) for i in range(n)], yticklabels=short,
            vmin=0, vmax=1, cbar=False, linewidths=0.5, linecolor="white")
axes[1].set_title("knowledge guard: same positive finding set -> not a negative")
axes[1].set_xlabel("report j")
plt.show()
print(f"{int(guard.sum())} of {guard.numel() - len(reports)} off-diagonal pairs guarded")

# %% [markdown]
# Read the left panel with care. Because the stand-in image *is* its report, every row's own report
# wins by far at $\tau$ = {glue:text}`ml_tau` and the off-diagonal mass is small (with the random `tiny` tower of
# the smoke profile it is also spread at random). With the pretrained MiniLM (ci profile) it lands on
# reports that *read* alike: the two "No acute cardiopulmonary abnormality" reports — but also the
# cardiomegaly-with-"no pneumothorax" report and the pneumothorax report, which share words while
# stating opposite findings. Text similarity alone cannot tell these apart; the knowledge guard on
# the right, built from extracted findings, pairs exactly the reports that state the same findings.
# That is why MLIP uses both: the divergence encoder softens targets by learned similarity, the
# knowledge guard removes negatives by what the reports actually say.
#
# ## What the terms cost
#
# `python benchmarks/bench_losses.py` times each term and a whole training step of `convirt` against
# `mlip` with identical towers and batch (and counts the arithmetic of each). The divergence encoder
# adds one forward pass of both towers, without gradient and in eval mode; the swap task re-encodes
# only the reports that were altered (an unaltered swap text *is* the report, whose features the
# online tower already computed); the small fusion head attends over 3B image–report pairs for ITM
# (positives, a hard-negative report per image, a hard-negative image per report) and B for swap.
# The token-level local loss is a handful of batched matrix products, checked against a per-sample
# loop of the same formula.
