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
# # Interpretability: where the encoders look, measured against the lesions
#
# **What you will learn.** What the encoders trained in chapter `06_ablations` learnt, seen three ways: UMAP
# maps of image and report embeddings coloured by the finding drawn on the image; Grad-CAM heat maps of the
# image tower, for a zero-shot prompt ("pleural effusion") and for a linear probe; and the token→patch
# attention of the local alignment term for the words of a report that name a finding. The offline world
# holds something no public chest X-ray pretraining set has: a ground-truth mask for every drawn finding. So
# the maps are not only shown but *scored*: the pointing game (is the map's maximum on the lesion?) and the
# IoU of the map's top pixels with the lesion, for every method and map kind, against a random-map baseline.
#
# **What it needs.** The runs of chapter `06_ablations` (its run table `results/06_ablations_runs.csv`, run
# folders with `config.yaml`, checkpoints and exported towers) and the offline world of chapter
# `01_offline_world`. Nothing is trained here except one logistic regression per finding (the probe).
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.
# Most of it is Grad-CAM on a few hundred (image, finding) pairs per model and UMAP's one-off compilation
# of its code. The last cell prints the time it took.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("10_interpretability"))

# %% tags=["parameters"]
configs = "convirt,gloria,mgca,mlip"  # rows of chapter 06's grid to explain (those present in its run table)
seeds = "0"  # pretraining seeds explained for every row (CPU budget: one)
spread_config = "mlip"  # whose token-patch attention is compared with random maps across seeds ...
spread_seeds = "0,1,2"  # ... over these seeds (random maps get as many seeds)
eval_splits = "validate,test"  # held-out studies of the pretraining world
max_images = 200  # images with a scored finding (a seeded draw)
min_mask_fraction = 0.005  # findings smaller than this share of the image are not scored
score_size = 64  # maps and masks are compared at this size (px)
top_fraction = 0.1  # IoU of the top 10% of a map's pixels with the mask
probe_images = 300  # training images the linear probe (Grad-CAM target b) is fitted on
probe_C = 1.0
umap_images = 300  # held-out images (normal ones too) in the UMAP panels
n_figure = 4  # (image, finding) pairs in the overlay figure
n_attention = 3  # reports in the attention figure
batch_size = 64
seed = 0

# %%
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from myst_nb import glue

from mlip_core.data.images import load_uint8, pydicom_data_path, read_dicom
from mlip_core.interpret import (FigureData, all_images, attention_maps, evaluation_set, figure_pairs,
                                 grid_methods, knowledge_words, load_images, load_run_model, localization_summary,
                                 localize, neighbour_agreement, overlay, read_run_table, result_rows,
                                 umap_embedding, versus)
from mlip_core.notebook import setup
from mlip_core.paths import workspace
from mlip_core.results import write_results

t_start = time.perf_counter()
device = setup(seed)
names = [n.strip() for n in configs.split(",") if n.strip()]
seed_list = [int(s) for s in seeds.split(",") if s.strip()]
spread_list = [int(s) for s in spread_seeds.split(",") if s.strip()]
splits = tuple(s.strip() for s in eval_splits.split(",") if s.strip())
world = workspace("offline_world", create=False)
runs = read_run_table(workspace("results") / "06_ablations_runs.csv")
methods = grid_methods(runs, names, seed_list)
extra_seeds = [s for s in spread_list if s not in seed_list and s in set(runs.loc[runs["config"] == spread_config, "seed"])]
if extra_seeds:  # more seeds of one row, attention maps only: the spread of the claim below
    methods += [replace(m, kinds=("attention",))
                for m in grid_methods(runs, [spread_config], extra_seeds, baselines=False)]
print(f"device: {device}; methods: " + ", ".join(f"{m.name} (seed {m.seed})" for m in methods))

# %% [markdown]
# ## The evaluation set
#
# Held-out studies of the pretraining world, each with at least one drawn finding large enough to be seen at
# the towers' input size. A *pair* is an (image, finding) with the union of that finding's masks in the image.
# Reports are the studies' own reports; the masks come from the renderer (`synth/`), which pretraining never
# reads.

# %%
ev = evaluation_set(world, splits=splits, max_images=max_images, min_mask_fraction=min_mask_fraction,
                    score_size=score_size, seed=seed)
counts = ev.pairs.groupby("finding").agg(pairs=("image", "size"), median_area=("area_fraction", "median"))
counts["median_area"] = (100 * counts["median_area"]).round(2).astype(str) + "%"
print(f"{len(ev.images)} images, {len(ev.pairs)} (image, finding) pairs from splits {', '.join(splits)}; "
      f"left out: " + ", ".join(f"{k}: {v}" for k, v in ev.skipped.items()))
glue("int_images", len(ev.images), display=False)
glue("int_pairs", len(ev.pairs), display=False)
counts.sort_values("pairs", ascending=False)

# %% [markdown]
# ## Scoring every map
#
# For every method, three kinds of map for every pair:
#
# - **Grad-CAM, prompt** (runs only): the target is the cosine similarity of the image embedding with the
#   embedding of the finding's name from the knowledge graph ("pleural effusion", "cardiomegaly").
# - **Grad-CAM, probe**: the target is the logit of a logistic regression fitted on the tower's features of
#   training images, one per finding (its weights become a `torch.nn.Linear` on the tower).
# - **Attention** (runs with a local term: GLoRIA, MGCA, MLIP): the token→patch attention of the local term
#   (`MLIP.local_attention`), averaged over the report's tokens that name the finding in a positive mention.
#   Pairs whose report does not name the finding get no attention map.
#
# Grad-CAM reads the layer whose feature map the local terms read (ResNet `layer3`, EfficientNet's stride-16
# stage), so both kinds have one resolution; every map is upsampled to the mask. Random maps (uniform noise,
# seeded) are the floor: their pointing game is the mask's share of the image.

# %%
umap_df = all_images(world, splits, umap_images, seed=seed)
real = read_dicom(pydicom_data_path("RG1_UNCR.dcm"))  # uint8, display polarity
init_name = "ImageNet init" if any(m.name == "ImageNet init" for m in methods) else "random init"
shown_runs = [n for n in ("convirt", "mlip") if n in names]
umap_keys = {(init_name, 0)} | {(n, seed_list[0]) for n in shown_runs}
real_findings = [f for f in ("cardiomegaly", "effusion", "opacity") if f in ev.findings][:2] or ev.findings[:2]
figs = FigureData(umap_df, umap_keys, real, umap_keys, real_findings)
fig_pairs = figure_pairs(ev, n_figure)
scores, info = localize(methods, ev, world, top_fraction=top_fraction, probe_images=probe_images,
                        probe_C=probe_C, random_seeds=spread_list or [0], batch_size=batch_size, device=str(device),
                        keep_maps=fig_pairs, on_model=figs)
rows = result_rows(scores, top_fraction)
path = write_results(rows, "10_interpretability")
print(f"{len(scores)} scored maps, {len(rows)} result rows -> {path}")
print("seconds per method: " + ", ".join(f"{k} {v:.1f}" for k, v in info["timing"].items()))
print(f"probe: {info['probe_images']} training images; positives per finding: {info['probe_positives']}")
print("prompts: " + ", ".join(f"{k}: '{v}'" for k, v in info["prompts"].items()))

# %% [markdown]
# ## The localization table
#
# Mean ± standard deviation over the scored pairs (all seeds of a row pooled). Pointing game: 1 when the
# map's maximum lies inside the finding's mask (ties share the credit); IoU: the overlap of the map's top
# pixels with the mask. Chance for the pointing game is the mask's share of the image, which the random-map
# row estimates.

# %%
order = [m.name for m in methods]
summary = localization_summary(scores, list(dict.fromkeys(order)))
iou_col = f"IoU top {top_fraction:.0%}"
table = pd.DataFrame({
    "method": summary["method"], "map": summary["kind"],
    "pairs × seeds": [f"{p} × {s}" for p, s in zip(summary["pairs"], summary["seeds"])],
    "pointing game": [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["pointing"], summary["pointing_sd"])],
    iou_col: [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["iou"], summary["iou_sd"])],
})
table

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(summary) + 1.5), sharey=True)
labels = [f"{m} · {k}" for m, k in zip(summary["method"], summary["kind"])]
for ax, (col, title) in zip(axes, [("pointing", "pointing game"), ("iou", iou_col)]):
    ax.barh(labels, summary[col], xerr=(summary[f"{col}_sd"] / np.sqrt(summary["pairs"] * summary["seeds"])).fillna(0),
            color=["#bbbbbb" if k == "random" else "#9ecae1" for k in summary["kind"]])
    ax.axvline(float(summary.loc[summary["kind"] == "random", col].mean()), color="black", ls="--", lw=1)
    ax.set_title(title)
axes[0].invert_yaxis()  # shared y: once for both, in the table's order
fig.suptitle("bar: mean over pairs; line: ± standard error; dashed: random maps", fontsize=10)
plt.show()

# %% [markdown]
# Per finding, the pointing game of each method and map (seed 0 rows; pairs in brackets). Large findings
# (cardiomegaly, effusion) are easy to point at by chance; small ones (nodules, devices) are where a map must
# actually find the lesion.

# %%
first = scores[scores["seed"] == scores.groupby("method")["seed"].transform("min")]
per_finding = first.pivot_table(index="finding", columns=["method", "kind"], values="pointing", aggfunc="mean")
per_finding = per_finding[[c for c in summary[["method", "kind"]].itertuples(index=False, name=None)
                           if c in per_finding.columns]]
per_finding.columns = [f"{m} · {k}" for m, k in per_finding.columns]
per_finding.index = [f"{f} ({int(counts.loc[f, 'pairs'])})" for f in per_finding.index]
per_finding.round(2)

# %%
learnt = summary[summary["kind"] != "random"]
best = learnt.loc[learnt["pointing"].idxmax()]
rand = summary[summary["kind"] == "random"].iloc[0]
glue("int_best", f"{best['method']} ({best['kind'].replace('_', ' ')})", display=False)
glue("int_best_pg", f"{best['pointing']:.3f}", display=False)
glue("int_best_iou", f"{best['iou']:.3f}", display=False)
glue("int_random_pg", f"{rand['pointing']:.3f}", display=False)
glue("int_random_iou", f"{rand['iou']:.3f}", display=False)
best_iou = learnt.loc[learnt["iou"].idxmax()]
glue("int_best_iou_row", f"{best_iou['method']} ({best_iou['kind'].replace('_', ' ')}, {best_iou['iou']:.3f})",
     display=False)
sentences = [f"Best pointing game: {best['method']} {best['kind']} at {best['pointing']:.3f} "
             f"(random maps {rand['pointing']:.3f}); best IoU: {best_iou['method']} {best_iou['kind']} at "
             f"{best_iou['iou']:.3f} (random maps {rand['iou']:.3f})."]
has_attention = ((scores["method"] == spread_config) & (scores["kind"] == "attention")).any()
if has_attention:
    for metric, word in (("pointing", "pointing game"), ("iou", "IoU")):
        v = versus(scores, (spread_config, "attention"), ("random map", "random"), metric)
        verdict = ("beats the random maps beyond the spread" if v["exceeds"] and v["diff"] > 0 else
                   "is below the random maps beyond the spread" if v["exceeds"] else
                   "is within the spread of the random maps" if not np.isnan(v["spread"]) else
                   "cannot be compared with the spread (one seed)")
        sentences.append(f"{spread_config}'s token–patch attention {word}: {v['mean_a']:.3f} ± {v['sd_a']:.3f} "
                         f"over {v['seeds_a']} seeds vs random maps {v['mean_b']:.3f} ± {v['sd_b']:.3f} "
                         f"({v['diff']:+.3f}, spread {v['spread']:.3f}): {verdict}.")
        glue(f"int_attn_{metric}", f"{v['mean_a']:.3f} ± {v['sd_a']:.3f}", display=False)
        glue(f"int_attn_{metric}_verdict", verdict, display=False)
        glue(f"int_attn_{metric}_diff", f"{v['diff']:+.3f} (spread {v['spread']:.3f})", display=False)
    glue("int_attn_seeds", v["seeds_a"], display=False)  # the same for both metrics: glued once
else:
    sentences.append(f"{spread_config} has no attention maps in this grid (no local term or not trained).")
    for metric in ("pointing", "iou"):
        glue(f"int_attn_{metric}", "n/a", display=False)
        glue(f"int_attn_{metric}_verdict", "cannot be measured here", display=False)
        glue(f"int_attn_{metric}_diff", "n/a", display=False)
    glue("int_attn_seeds", 0, display=False)
glue("int_spread_config", spread_config, display=False)
grid = next((v.shape[1:] for (_, _, k), v in info["maps"].items() if k != "random"), (0, 0))
glue("int_image_size", methods[0].encoder.image_size, display=False)
glue("int_grid", f"{grid[0]}×{grid[1]}", display=False)
glue("int_cell_share", f"{100 / max(1, grid[0] * grid[1]):.1f}%", display=False)
glue("int_nodule_area", f"{100 * ev.pairs.loc[ev.pairs['finding'] == 'nodule', 'area_fraction'].median():.2f}%"
     if (ev.pairs["finding"] == "nodule").any() else "n/a", display=False)
print("\n".join(sentences))

# %% [markdown]
# The map that points at the lesion most often is {glue:text}`int_best`'s, with a pointing game of
# {glue:text}`int_best_pg` (random maps: {glue:text}`int_random_pg`); the best IoU of the top pixels is
# {glue:text}`int_best_iou_row` (random maps: {glue:text}`int_random_iou`). The token–patch attention of
# {glue:text}`int_spread_config` scores {glue:text}`int_attn_pointing` in the pointing game over
# {glue:text}`int_attn_seeds` pretraining seeds, a difference of {glue:text}`int_attn_pointing_diff` from random
# maps: it {glue:text}`int_attn_pointing_verdict`. In IoU it scores {glue:text}`int_attn_iou`
# ({glue:text}`int_attn_iou_diff`): it {glue:text}`int_attn_iou_verdict`. As in chapter 06, "beyond the spread"
# means the difference of the seed means exceeds the sum of the two rows' standard deviations over seeds.
#
# Read the table with the image size in mind: the towers of this grid see {glue:text}`int_image_size`-pixel
# images, their stride-16 feature map is a {glue:text}`int_grid` grid, and one cell covers
# {glue:text}`int_cell_share` of the image (a scored nodule's median area: {glue:text}`int_nodule_area`). The
# maps can only say *which region*; the pointing game rewards that, the IoU hardly can.

# %% [markdown]
# ## Heat maps on rendered radiographs
#
# The largest finding of a few kinds; the white outline is the ground-truth mask. Columns: Grad-CAM for the
# finding's prompt (ConVIRT, MLIP), Grad-CAM for the probe (the initial tower, MLIP), and MLIP's attention for
# the report's words naming the finding ("not scored": the report does not name it).

# %%
from PIL import Image  # noqa: E402

panels = [(m, s, k) for (m, s, k) in info["maps"] if m in (shown_runs + [init_name]) and s == seed_list[0]]
panels = sorted(panels, key=lambda t: (["gradcam_prompt", "gradcam_probe", "attention"].index(t[2]),
                                       [init_name, *shown_runs].index(t[0])))
fig, axes = plt.subplots(len(fig_pairs), 1 + len(panels), figsize=(2.3 * (1 + len(panels)), 2.4 * len(fig_pairs)),
                         squeeze=False)
for r, p in enumerate(fig_pairs):
    pair = ev.pairs.loc[p]
    img = np.asarray(Image.open(ev.images.loc[pair["image"], "image_path"]).convert("L"))
    overlay(axes[r, 0], img, None, ev.masks[p], f"{pair['finding']} ({100 * pair['area_fraction']:.1f}% of image)")
    for c, key in enumerate(panels, start=1):
        overlay(axes[r, c], img, info["maps"][key][fig_pairs.index(p)], ev.masks[p],
                f"{key[0]}\n{key[2].replace('_', ' ')}")
plt.suptitle("Grad-CAM and attention on held-out rendered images (white: the finding's mask)")
plt.show()

# %% [markdown]
# ## On a real radiograph
#
# The same towers on the real PA radiograph that ships with `pydicom-data` (`RG1_UNCR.dcm`, read with its VOI
# window and MONOCHROME1 inverted, as in chapter `01_offline_world`). There is no mask here: this is the
# sanity check of whether the maps land on anatomy that could hold the finding (the heart for cardiomegaly,
# the costophrenic angles for an effusion) on an image the towers have never seen the like of.

# %%
real_img = load_uint8(pydicom_data_path("RG1_UNCR.dcm"), 256)
real_rows = [m for m in [init_name, *shown_runs] if any(k[0] == m for k in figs.extra_maps)]
real_cols = [(kind, f) for f in real_findings for kind in ("gradcam_prompt", "gradcam_probe")]
fig, axes = plt.subplots(len(real_rows), 1 + len(real_cols), figsize=(2.4 * (1 + len(real_cols)), 2.6 * len(real_rows)),
                         squeeze=False)
for r, name in enumerate(real_rows):
    overlay(axes[r, 0], real_img, None, None, f"RG1_UNCR.dcm\n{name}")
    for c, (kind, finding) in enumerate(real_cols, start=1):
        mp = figs.extra_maps.get((name, kind, finding))
        if mp is None:  # an initial tower has no prompt target
            axes[r, c].axis("off")
            continue
        overlay(axes[r, c], real_img, mp, None, f"{kind.replace('_', ' ')}\n'{info['prompts'][finding]}'")
plt.suptitle("Grad-CAM on the real radiograph from pydicom-data")
plt.show()

# %% [markdown]
# ## What the report's words attend to
#
# MLIP's local term matches each word of a report with the image's patches. For the knowledge-bearing words
# (the mentions of a knowledge-graph finding; "no pneumothorax" is a negated mention and is listed, but its
# attention is not a claim that a pneumothorax is there) the panels show the token→patch attention upsampled
# to the image, with the finding's mask where that finding was drawn.

# %%
att_run = next((m for m in methods if m.name == "mlip" and m.local != "none"), None) or \
    next((m for m in methods if m.local != "none"), None)
if att_run is None:
    print("no run with a local term in this grid: no attention maps")
else:
    from mlip_core.knowledge.graph import KnowledgeGraph
    from mlip_core.knowledge.extract import NO_STATUS

    graph = KnowledgeGraph.load_default()
    model, tok = load_run_model(att_run.run_dir, str(device))
    examples = ev.pairs.drop_duplicates("image").sort_values("area_fraction", ascending=False)["image"].tolist()
    shown = []
    for i in examples:
        words = knowledge_words(ev.images.loc[i, "text"])
        if any(w[2] == "positive" for w in words):
            shown.append((i, words[:4]))
        if len(shown) == n_attention:
            break
    ncol = 1 + max((len(w) for _, w in shown), default=0)
    fig, axes = plt.subplots(max(1, len(shown)), ncol, figsize=(2.5 * ncol, 2.6 * max(1, len(shown))), squeeze=False)
    x_all = load_images(ev.images["image_path"].tolist(), att_run.encoder.image_size)
    for r, (i, words) in enumerate(shown):
        img = np.asarray(Image.open(ev.images.loc[i, "image_path"]).convert("L"))
        drawn = ev.pairs[ev.pairs["image"] == i]
        overlay(axes[r, 0], img, None, ev.masks[drawn.index].any(0), "drawn: " + ", ".join(drawn["finding"]))
        ents = [graph.index(e) for e, _, _ in words]
        maps, found = attention_maps(model, tok, x_all[[i]], [ev.images.loc[i, "text"]], [0] * len(ents), ents)
        for c, ((eid, text, status), mp, ok) in enumerate(zip(words, maps, found), start=1):
            hit = drawn[drawn["entity"] == eid]
            mask = ev.masks[hit.index[0]] if len(hit) else None
            overlay(axes[r, c], img, mp if ok else np.full_like(mp, np.nan), mask, f"'{text}' ({status})")
        for c in range(1 + len(words), ncol):
            axes[r, c].axis("off")
        print(f"image {i}: report words " + "; ".join(f"'{t}' → {e} ({s})" for e, t, s in words))
    plt.suptitle(f"{att_run.name} (seed {att_run.seed}): token→patch attention of knowledge-bearing words")
    plt.show()
    del model

# %% [markdown]
# Negated and uncertain mentions have no positive tokens, so their panels read "not scored": the attention is
# averaged over the tokens of *positive* mentions only, as the scores above are.
#
# ## Embeddings coloured by finding
#
# UMAP (cosine, seeded) of the held-out images' embeddings — the initial tower's features, and the joint
# image space of ConVIRT and MLIP — and of the reports' embeddings for the two pretrained runs. Colour: the
# largest finding drawn on the image (`no finding` for normal studies). Next to each panel, the share of an
# embedding's 10 nearest neighbours (in the full space, not the 2-D map) with the same colour.

# %%
labels_all = umap_df["primary"].to_numpy()
top = pd.Series(labels_all).value_counts().index[:8].tolist()
colour_of = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(top)}
colours = [colour_of.get(x, (0.7, 0.7, 0.7, 1.0)) for x in labels_all]
panels = [(f"{m}: images", figs.image_embeddings[m]) for m in [init_name, *shown_runs] if m in figs.image_embeddings]
panels += [(f"{m}: reports", figs.report_embeddings[m]) for m in shown_runs if m in figs.report_embeddings]
agreement = {title: neighbour_agreement(x, labels_all) for title, x in panels}
fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
for ax, (title, x) in zip(axes[0], panels):
    xy = umap_embedding(x, seed=seed)
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=10, linewidths=0)
    ax.set_title(f"{title}\nneighbours agreeing: {agreement[title]:.2f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=n) for n, c in colour_of.items()]
handles.append(plt.Line2D([], [], marker="o", ls="", color=(0.7, 0.7, 0.7), label="other"))
fig.legend(handles=handles, loc="lower center", ncol=min(9, len(handles)), fontsize=8, frameon=False)
plt.subplots_adjust(bottom=0.2)
plt.show()
chance = float((pd.Series(labels_all).value_counts(normalize=True) ** 2).sum())
print("share of 10 nearest neighbours with the same largest finding: "
      + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()) + f" (chance ≈ {chance:.2f})")
image_rows = {k: v for k, v in agreement.items() if k.endswith("images")}
best_space = max(agreement, key=agreement.get) if agreement else "n/a"
glue("int_umap_best", best_space, display=False)
glue("int_umap_best_value", f"{agreement.get(best_space, np.nan):.2f}", display=False)
glue("int_umap_chance", f"{chance:.2f}", display=False)
glue("int_umap_images", len(umap_df), display=False)

# %% [markdown]
# Over {glue:text}`int_umap_images` held-out images, the embedding whose neighbours most often share the
# image's largest finding is "{glue:text}`int_umap_best`" ({glue:text}`int_umap_best_value` of the 10 nearest
# neighbours, chance {glue:text}`int_umap_chance`). Reports name their findings, so report embeddings usually
# cluster more than image embeddings; an image space that clusters by finding is what the pretraining is for.
#
# ## What this chapter can and cannot say
#
# - **Scores, not impressions.** A heat map that "looks right" on a chosen image is an anecdote; the table
#   scores {glue:text}`int_pairs` (image, finding) pairs from {glue:text}`int_images` held-out images.
# - **Two Grad-CAM targets.** The prompt target explains the zero-shot score, which exists only for models with
#   a text side; the probe target explains what a linear classifier reads, and exists for every tower,
#   including the initial ones. A pretrained tower that localizes better under the probe than the initial tower
#   has learnt *where* findings are, not only *that* they are.
# - **Attention is not an explanation of the global score.** The local term's attention says which patches a
#   word matches; the retrieval and zero-shot scores come from the global embeddings. The two can disagree.
# - **Resolution.** At the `ci` scale the maps are coarse grids on small images; the `full` profile explains
#   towers trained at full resolution, whose finer maps make small findings measurable.

# %%
print(f"chapter time: {time.perf_counter() - t_start:.0f} s")
