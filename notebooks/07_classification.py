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
# # Transfer: classification with few labels
#
# **What you will learn.** How the image encoders left behind by pretraining transfer to classification with
# 1%, 10% and 100% of the labels, in the three settings the papers report: a **linear probe** on frozen
# features, **fine-tuning** of the whole encoder, and **zero-shot** classification from text prompts built from
# the knowledge graph, with no labels at all. And a multi-class task in COVIDx's layout, scored by accuracy.
#
# **What it needs.** The ablation grid of chapter `06_ablations`: its runs' towers (ConVIRT, GLoRIA, MGCA and
# MLIP, three pretraining seeds each) and its CheXpert-layout transfer world. The COVIDx-layout world is
# rendered here. With `chexpert_root` / `covidx_root` set, the real datasets replace the offline worlds.
#
# Every row is compared with the same images, splits and protocol:
#
# - **raw pixels, 32×32** — the image shrunk to a thumbnail and flattened, no learning at all: the *floor*;
# - **random init** — the towers' architecture with random weights: the floor for the architecture;
# - **ImageNet init** — the weights pretraining started from, so that we can tell what image–report
#   pretraining added on top of natural-image features;
# - **ConVIRT, GLoRIA, MGCA, MLIP** — the grid's towers, one per pretraining seed: the spread over seeds is the
#   spread every difference is read against.
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.
# Fine-tuning is most of it; the probes reuse the features chapter 06 cached.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("07_classification"))

# %% tags=["parameters"]
methods = "convirt,gloria,mgca,mlip"  # the grid's configurations compared here
label_fractions = "0.01,0.1,1.0"  # fractions of the training patients whose labels the probe sees
fraction_seeds = 3  # draws of each fraction < 1 (the probe's score is averaged over them)
probe_C = 0.01  # the probe's inverse L2 strength (chapter 06's)
raw_size = 32  # the raw-pixel floor's thumbnail size
finetune_fractions = "0.01,0.1"  # fractions fine-tuned (each encoder, first draw); CPU time grows with each
finetune_steps = 10  # two CPU cores: a taste of fine-tuning; the gpu profile runs 300
finetune_batch_size = 16
finetune_lr = 0.0003
zero_shot = True
covidx_images = 800  # the COVIDx-layout world (normal / pneumonia / COVID-19 stand-in)
covidx_seed = 2
covidx_image_size = 64
covidx_min_test_positives = 50
chexpert_root = ""  # folder of CheXpert-v1.0(-small); empty for the offline transfer world of chapter 06
covidx_root = ""  # folder of COVIDx ({train,val,test}.txt); empty for the offline COVIDx-layout world
batch_size = 64
seed = 0

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from myst_nb import glue

from mlip_core.ablation import (by_pretraining_seed, differences_vs, grid_runs, init_encoders, probe_rows,
                                run_encoders)
from mlip_core.data.downstream import CHEXPERT_5
from mlip_core.data.transfer_worlds import ensure_transfer_world, transfer_world_parameters
from mlip_core.notebook import setup
from mlip_core.paths import workspace
from mlip_core.results import mean_std, mean_std_table, write_results
from mlip_core.transfer.classify import Encoder, chexpert_task, encoder_features, fraction_masks
from mlip_core.transfer.finetune import covidx_task, finetune_sweep, multiclass_probe_sweep, sweep_results
from mlip_core.transfer.zeroshot import zeroshot_eval

device = setup(seed)
method_list = [m.strip() for m in methods.split(",") if m.strip()]
fractions = [float(f) for f in label_fractions.split(",") if f.strip()]
ft_fractions = [float(f) for f in finetune_fractions.split(",") if f.strip()]
cache_root, feature_dir = workspace("cache", "images"), workspace("features", "transfer")
print(f"device: {device}; methods {method_list}; label fractions {fractions}; fine-tuned at {ft_fractions}")

# %% [markdown]
# ## The towers and the task
#
# The towers are the exports of chapter 06's runs (`results/06_ablations_runs.csv` lists them). The task is
# CheXpert's: the five competition findings on the fixed test split (`valid.csv`), which in the offline world
# holds at least fifty positives of each, so that an AUROC moves by less than a hundredth when one image
# changes rank.

# %%
runs = grid_runs(method_list)
pretrained = run_encoders(runs)
floor = Encoder(f"raw pixels {raw_size}x{raw_size}", "raw", raw_size)
baselines = [floor] + init_encoders(runs)
print(f"{len(pretrained)} pretrained towers ({pretrained[0][2].tower['name']} @ {pretrained[0][2].image_size} px): "
      + ", ".join(f"{m} x{int((runs['config'] == m).sum())}" for m in method_list))

if chexpert_root:
    task = chexpert_task(chexpert_root, labels=CHEXPERT_5, seed=seed)
else:
    chexpert_dir = workspace("transfer_worlds", "chexpert", create=False)
    world_params = transfer_world_parameters(chexpert_dir)
    if world_params is None:
        raise FileNotFoundError(f"{chexpert_dir} holds no transfer world: run the chapter 06_ablations first")
    # The validation holdout is drawn with the world's seed, as chapter 06 did: the same training rows.
    task = chexpert_task(chexpert_dir, labels=CHEXPERT_5, seed=int(world_params["seed"]))
task = task.keep_splits(["train", "test"])
print(task.skips.summary())
positives = task.df.groupby("split")[task.labels].sum().T.astype(int)
glue("cls_test_images", int((task.df["split"] == "test").sum()), display=False)
glue("cls_min_test_pos", int(positives["test"].min()), display=False)
positives.rename(columns=lambda c: f"{c} positives")

# %% [markdown]
# ## Linear probe at 1%, 10% and 100% of the labels
#
# Freeze the encoder, compute one feature vector per image, and fit a logistic regression per finding on the
# labelled patients (the same patients for every encoder; the 1% patients are inside the 10%, inside 100%).
# This is the protocol of the papers' classification tables: MGCA's and MLIP's "fine-tuning" code trains a
# linear layer on a frozen backbone (`mlip_core.transfer.finetune`'s docstring cites the lines). A label with
# a single class among few training images cannot be learnt: its probe scores 0.5, chance, and stays in the
# mean. The features are those chapter 06 cached for the same towers and images.

# %%
t0 = time.perf_counter()
masks = fraction_masks(task.split("train"), workspace("splits", "classify"), "chexpert",
                       fractions=fractions, seeds=tuple(range(fraction_seeds)))
probe, probe_per_label = probe_rows(runs, task, masks, cache_root, feature_dir, Cs=(probe_C,),
                                    batch_size=batch_size, device=str(device), extra_encoders=baselines)
print(f"probes of {len(baselines) + len(pretrained)} encoders in {time.perf_counter() - t0:.0f} s; training images "
      "per fraction: " + ", ".join(f"{f:.0%}: {int(masks[(f, 0)].sum())}" for f in fractions))
order = [e.name for e in baselines] + method_list
probe_summary = mean_std(pd.DataFrame(probe))
mean_std_table(probe_summary, order)

# %% [markdown]
# Mean ± standard deviation over the three pretraining seeds (each seed's value is itself averaged over the
# label draws); the three reference rows are not pretrained and have one value.

# %%
fig, ax = plt.subplots(figsize=(7, 4.2))
per_seed = pd.DataFrame(probe)
sns.lineplot(data=per_seed, x="fraction", y="value", hue="method", hue_order=order, marker="o", errorbar="sd", ax=ax)
ax.set_xscale("log")
ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
ax.minorticks_off()
ax.axhline(0.5, color="grey", lw=0.8, ls=":")
ax.set_xlabel("fraction of training labels (patients)")
ax.set_ylabel(f"macro AUROC over {len(task.labels)} findings (test)")
ax.set_title(f"Linear probe on frozen features: {task.name}")
ax.legend(fontsize=8, loc="best")
plt.show()

# %% [markdown]
# ## Fine-tuning
#
# The whole tower and a new linear layer train together (ConVIRT's "fine-tuning" and GLoRIA's "end to end"
# setting), with augmentation, on the same label fractions (1% and 10%, the first draw of each). On two CPU
# cores this is the expensive setting: the `ci` profile fine-tunes for only `finetune_steps` steps, a taste of
# the protocol rather than a converged model; the `gpu` profile runs it for longer. Each pretrained tower is
# fine-tuned once per pretraining seed.

# %%
t0 = time.perf_counter()
ft_masks = {(f, 0): masks[(f, 0)] for f in ft_fractions}
ft_encoders = [e for e in baselines if e.kind == "tower"] + [enc for _, _, enc in pretrained]
ft = finetune_sweep(ft_encoders, task, ft_masks, cache_root, steps=finetune_steps, batch_size=finetune_batch_size,
                    lr=finetune_lr, device=device)
ft_rows = sweep_results(ft, "finetune")
ft_rows = by_pretraining_seed(ft_rows, pretrained)
ft_minutes = (time.perf_counter() - t0) / 60
print(f"{len(ft_encoders) * len(ft_masks)} fine-tuning runs of {finetune_steps} steps in {ft_minutes:.1f} min "
      f"({ft['s/step'].mean():.2f} s per step)")
ft_summary = mean_std(ft_rows[ft_rows["metric"] == "macro_AUROC"])
mean_std_table(ft_summary, order)

# %% [markdown]
# ## Zero-shot from knowledge-graph prompts
#
# No labels at all: each finding gets a set of positive prompts (its name and synonyms in the knowledge graph)
# and negative ones ("no pleural effusion", "no evidence of pleural effusion"); each set's text embeddings are
# averaged (CLIP's prompt ensembling), and an image's score for the finding is the softmax of its similarity
# to the two sets. This needs the whole pretrained model, text tower included, so it reads each run folder.

# %%
zs_rows = pd.DataFrame()
if zero_shot:
    t0 = time.perf_counter()
    zs_rows = pd.concat([zeroshot_eval(r.run_dir, task, "test", cache_root=cache_root, device=device)
                         for r in runs.itertuples(index=False)], ignore_index=True).assign(task="zeroshot")
    print(f"zero-shot of {len(runs)} runs in {time.perf_counter() - t0:.0f} s")
    zs_table = zs_rows.pivot_table(index="method", columns="metric", values="value", aggfunc=["mean", "std"])
    display_cols = ["macro_AUROC"] + [f"AUROC {lab}" for lab in task.labels]
    display(zs_table["mean"].reindex(columns=display_cols).loc[method_list].round(3))

# %% [markdown]
# ## A multi-class task: COVIDx
#
# COVIDx sorts images into mutually exclusive classes (normal, pneumonia, COVID-19) and is scored by accuracy.
# The offline world written in its layout draws the COVID-19 class as the closest pattern the renderer has:
# hazy opacities in both lungs' middle and lower zones; pneumonia is one unilateral consolidation. The probe is
# a multinomial logistic regression on the same frozen features.

# %%
if covidx_root:
    covidx = covidx_task(covidx_root, seed=seed)
else:
    covidx_dir = workspace("transfer_worlds", "covidx")
    ensure_transfer_world("covidx", covidx_dir, covidx_images, covidx_seed, image_size=covidx_image_size, workers=2,
                          min_test_positives=covidx_min_test_positives)
    covidx = covidx_task(covidx_dir, seed=seed)
cov_masks = fraction_masks(covidx.split("train"), workspace("splits", "classify"), "covidx", fractions=fractions,
                           seeds=tuple(range(fraction_seeds)))
cov_paths = covidx.df["image_path"].tolist()
cov_rows = []
for method, s, enc in [(e.name, 0, e) for e in baselines] + pretrained:
    feats, valid, _ = encoder_features(enc, cov_paths, cache_root, feature_dir, batch_size=batch_size, device=device)
    if not valid.all():
        raise RuntimeError(f"{(~valid).sum()} COVIDx images could not be decoded; see the image cache skips")
    sweep = multiclass_probe_sweep(feats, covidx, cov_masks, Cs=(probe_C,), encoder=enc.name)
    rows = sweep_results(sweep, "covidx_probe")
    rows = rows.groupby(["task", "fraction", "metric"], as_index=False)["value"].mean()  # over label draws
    cov_rows.append(rows.assign(method=method, seed=s))
cov_rows = pd.concat(cov_rows, ignore_index=True)
cov_summary = mean_std(cov_rows[cov_rows["metric"] == "accuracy"])
print(covidx.df.groupby(["split", "label"]).size().unstack().to_string())
mean_std_table(cov_summary, order)

# %% [markdown]
# ## The results, and which differences the seeds can tell apart
#
# Every number above in the book's long format (`workspace/results/07_classification.csv`), and each method
# against ConVIRT, the plain global-contrastive baseline: the difference of means and whether it exceeds the
# sum of the two standard deviations over pretraining seeds.

# %%
results = pd.concat([pd.DataFrame(probe).assign(task="linear_probe"), ft_rows, zs_rows, cov_rows], ignore_index=True)
results = results[["method", "task", "fraction", "seed", "metric", "value"]]
print(f"{len(results)} rows ->", write_results(results, "07_classification"))
summary = mean_std(results)
checks = []
for task_name, metric, fracs in (("linear_probe", "macro_AUROC", fractions), ("finetune", "macro_AUROC", ft_fractions),
                                 ("zeroshot", "macro_AUROC", [0.0] if zero_shot else []),
                                 ("covidx_probe", "accuracy", fractions)):
    for f in fracs:
        d = differences_vs(summary[summary["method"].isin(method_list)], "convirt", task_name, metric, f)
        if len(d):
            checks.append(d.assign(task=task_name, fraction=f, metric=metric))
checks = pd.concat(checks, ignore_index=True)
checks["verdict"] = np.where(checks["exceeds"], np.where(checks["diff"] > 0, "higher", "lower"), "within spread")
checks[["task", "metric", "fraction", "method", "diff", "spread", "verdict"]].round(4)

# %%
beyond = checks[checks["exceeds"]]
glue("cls_n_checks", len(checks), display=False)
glue("cls_n_beyond", len(beyond), display=False)
glue("cls_beyond_list", "; ".join(f"{r.method} {r.verdict} on {r.task.replace('_', ' ')} at {r.fraction:.0%}"
                                  for r in beyond.itertuples()) or "none", display=False)
mean_at = probe_summary.set_index(["method", "fraction"])["mean"]
best_method = max(method_list, key=lambda m: mean_at.get((m, fractions[0]), -1))
glue("cls_best_1pct", f"{best_method} ({mean_at[(best_method, fractions[0])]:.3f})", display=False)
glue("cls_imagenet_1pct", f"{mean_at[('ImageNet init', fractions[0])]:.3f}", display=False)
glue("cls_floor_1pct", f"{mean_at[(floor.name, fractions[0])]:.3f}", display=False)
glue("cls_ft_minutes", f"{ft_minutes:.1f}", display=False)
print(f"{len(beyond)} of {len(checks)} differences from ConVIRT exceed the seeds' spread")

# %% [markdown]
# ## What was asked of MLIP, and what this run shows
#
# Two claims a reader will look for: that MLIP's tower beats the ImageNet weights it started from at 1% of the
# labels, and that its zero-shot macro AUROC reaches {glue:text}`cls_zs_target` (the target this book set itself). Each is checked
# here, and where it fails, the cell prints the measurement that explains why.

# %%
from mlip_core.train import read_metrics  # noqa: E402

zero_shot_target = 0.85  # the book's own target for MLIP's zero-shot macro AUROC, not a measurement
glue("cls_zs_target", zero_shot_target, display=False)

mlip_1, imagenet_1 = mean_at[("mlip", fractions[0])], mean_at[("ImageNet init", fractions[0])]
claim_probe = (f"MLIP's probe at {fractions[0]:.0%} of the labels: {mlip_1:.3f} macro AUROC against {imagenet_1:.3f} "
               f"for ImageNet init, so it {'beats' if mlip_1 > imagenet_1 else 'does not beat'} the weights it started "
               "from")
val = [read_metrics(r.run_dir, "val")[-1] for r in runs.itertuples(index=False) if r.config == "mlip"]
r10 = np.mean([(v["i2t_R@10"] + v["t2i_R@10"]) / 2 for v in val])
chance = min(100.0, 100 * 10 / np.mean([v["val_n"] for v in val]))  # R@10 of a random ranking
claim_why = (f"its image and report embeddings are barely aligned: held-out retrieval R@10 is {r10:.1f}% against "
             f"{chance:.1f}% by chance, after {int(runs['steps'].iloc[0])} steps")
if zero_shot:
    zs_mlip = zs_rows[(zs_rows["method"] == "mlip") & (zs_rows["metric"] == "macro_AUROC")]["value"].mean()
    claim_zs = (f"MLIP's zero-shot macro AUROC is {zs_mlip:.3f}, "
                + (f"at or above {zero_shot_target}" if zs_mlip >= zero_shot_target else f"well below {zero_shot_target}"))
else:
    claim_zs = "zero-shot was not run (zero_shot=False)"
glue("cls_claim_probe", claim_probe, display=False)
glue("cls_claim_zs", claim_zs, display=False)
glue("cls_claim_why", claim_why, display=False)
print(claim_probe + ".\n" + claim_zs + ": " + claim_why + ".")

# %% [markdown]
# ## Reading the results
#
# - {glue:text}`cls_claim_probe`.
# - {glue:text}`cls_claim_zs`: {glue:text}`cls_claim_why`. A prompt can only pick out a finding when the words
#   of the report moved the image embedding during pretraining; with retrieval this close to chance, zero-shot
#   scores are close to chance too. The claims are the paper's at paper scale; at this scale the book states
#   what it measures instead.
#
# At 1% of the labels the best pretrained probe is {glue:text}`cls_best_1pct` macro AUROC, against
# {glue:text}`cls_imagenet_1pct` for the ImageNet weights pretraining started from and
# {glue:text}`cls_floor_1pct` for raw pixels. Of the {glue:text}`cls_n_checks` comparisons with ConVIRT above,
# {glue:text}`cls_n_beyond` exceed the spread of the pretraining seeds: {glue:text}`cls_beyond_list`.
#
# - **What the rows can and cannot say.** The towers were pretrained for a few dozen steps on two CPU cores
#   (chapter 06), so they are close to their ImageNet start; differences between methods are small next to
#   the differences between seeds, and the verdict table says which survive. Chapter 06's "What the world lets
#   each side learn" section measures how much room there is above these numbers.
# - **Probe vs fine-tuning.** The probe asks what the frozen features already separate; fine-tuning lets the
#   labels move the encoder. With few labels and steps fine-tuning mostly adapts the top of the network, and
#   its spread is larger: one run of {glue:text}`cls_ft_minutes` minutes in all is no replacement for the
#   papers' 50 epochs.
# - **Zero-shot** depends on the text side as much as on the image side: a prompt can only score a finding
#   whose words moved the image embedding during pretraining.
#
# ## Where the offline world differs from CheXpert and COVIDx
#
# - **Exact labels.** Here the labels are what was drawn. CheXpert's training labels come from a rule-based
#   labeler run on the reports (uncertain mentions mapped by a policy: U-Ones in the papers; the world writes
#   −1 for findings drawn as uncertain, and the reader applies U-Ones), its validation labels from
#   radiologists. Real labels are noisy, which caps AUROC well below 1.
# - **Size.** Hundreds of images at 64 px against CheXpert's 224k and COVIDx's 30k at full resolution.
# - **COVID-19** has no rendered pattern of its own; the stand-in is bilateral hazy opacity.
# - **Protocol.** The papers train their linear layer with SGD or AdamW for up to 50 epochs with early stopping;
#   we fit an L2 logistic regression to convergence. Both are linear in frozen features.
