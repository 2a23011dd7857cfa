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
# # Transfer: linear probing for classification
#
# Pretraining on image–report pairs is only worth its cost if the image encoder it leaves behind is a
# better starting point for the tasks we care about. The cheapest honest test of that is a **linear
# probe**: freeze the encoder, compute one feature vector per image, and train nothing but a logistic
# regression on top — one per finding — with 1%, 10% or 100% of the training labels. Because the
# encoder cannot change, the probe measures what the representation *already* separates linearly; it
# says nothing about how well the encoder could be fine-tuned. ConVIRT, GLoRIA, MGCA and MLIP all report
# this protocol (CheXpert, RSNA, COVIDx at 1 / 10 / 100% labels); the metric for the multi-label chest
# X-ray tasks is the area under the ROC curve (AUROC) per finding, averaged over findings.
#
# What this chapter compares, on the same images, splits and probe:
#
# - **raw pixels, 32×32** — the image shrunk to a thumbnail and flattened. No learning at all. This is
#   the *floor*: an encoder that does not beat it has learnt nothing useful about the findings (or the
#   dataset leaks labels through fixed pixels);
# - a **randomly initialised** tower of the pretrained architecture — the floor for the architecture:
#   random convolutions already compute local statistics a probe can use;
# - **ImageNet EfficientNet-lite0** (when the pretrained towers are EfficientNet-lite0: their starting
#   point), so that we can tell what image–report pretraining added on top of natural-image pretraining;
# - every **pretrained tower** exported by the pretraining chapter (`convirt`, `mlip`, ...).
#
# Our concrete choices (the papers' code uses a trained linear layer with SGD; the idea is the same):
# scikit-learn's `LogisticRegression` per label on standardised features; the label fractions are of
# **patients** and nested (the 1% patients are inside the 10%, inside 100%); small fractions are drawn
# with several seeds and we report the mean and spread; AUROC on the test split.

# %% tags=["parameters"]
label_fractions = "0.01,0.1,1.0"  # fractions of the training patients whose labels the probe sees
fraction_seeds = 3  # draws of each fraction < 1 (1.0 is one draw)
C_grid = "0.01"  # inverse L2 strength; with several comma-separated values, the best on validation
raw_size = 32  # the raw-pixel floor's thumbnail size
baseline_tower = "resnet18"  # architecture of the baselines when the pretraining chapter exported nothing
baseline_image_size = 64  # their image size in that case (otherwise: the exported towers' size)
imagenet_baseline = "auto"  # "auto": when the towers are tf_efficientnet_lite0; "yes" / "no"
random_baseline = True  # a randomly initialised tower of the same architecture
max_train_patients = 0  # > 0: draw this many training patients (CPU time); 0 keeps them all
batch_size = 64
chexpert_root = ""  # folder of CheXpert-v1.0 or -small; empty for the offline world
seed = 0

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from mlip_core.notebook import setup
from mlip_core.paths import workspace
from mlip_core.transfer.classify import (
    Encoder,
    chexpert_task,
    encoder_features,
    encoder_from_export,
    find_exports,
    fraction_masks,
    offline_world_task,
    probe_sweep,
    summarise,
)

device = setup(seed)
fractions = [float(f) for f in label_fractions.split(",") if f.strip()]
Cs = [float(c) for c in C_grid.split(",") if c.strip()]
print(f"device: {device}; label fractions {fractions}; C {Cs}")

# %% [markdown]
# ## The task and its labels
#
# On the offline world the labels are what the renderer **drew** (`synth/labels.csv`), not what the
# report says: a finding the report hedges about is still 0 or 1 here. That makes the evaluation exact
# in a way real data never is. Images, patients and the train / validate / test split come from the
# same MIMIC-CXR reader the pretraining chapter used, so the test patients were never seen in
# pretraining either. A label is used when the world drew it at least once; a label whose test split
# holds a single class has no AUROC and is listed as skipped.

# %%
if chexpert_root:
    task = chexpert_task(chexpert_root, seed=seed)
    dataset_tag = "chexpert"
else:
    world = workspace("offline_world", create=False)
    task = offline_world_task(world)
    dataset_tag = "offline_world"
print(f"{task.name}: {len(task.df)} images, {task.df['group'].nunique()} patients")
print(task.skips.summary())
print("labels used:", ", ".join(task.labels))
print("labels not used:", task.unused_labels or "none")
prevalence = task.df.groupby("split")[task.labels].sum().T.astype(int)[[s for s in ("train", "validate", "test")
                                                                        if s in set(task.df["split"])]]
prevalence.columns = [f"{c} positives" for c in prevalence.columns]
prevalence

# %% [markdown]
# ## The encoders
#
# Pretrained towers are read from `workspace("pretrained")`, where the pretraining chapter exports each
# model's image tower (`image_tower.pt`, a plain state_dict, and `image_tower.json`, its config). Each
# tower is evaluated at the image size it was pretrained at; the baselines use the same architecture and
# size, so that only the weights differ.

# %%
exports = find_exports(workspace("pretrained", create=False))
pretrained = [encoder_from_export(name, path) for name, path in exports.items()]
if pretrained:
    arch, size = pretrained[0].tower["name"], pretrained[0].image_size
    described = [f"{e.name} ({e.tower['name']} @ {e.image_size} px)" for e in pretrained]
    print("pretrained towers:", ", ".join(described))
else:
    arch, size = baseline_tower, baseline_image_size
    print("The pretraining chapter exported no image tower (workspace('pretrained') is empty): this run compares "
          f"the baselines only ({arch} @ {size} px). Run 05_pretraining first to add the pretrained towers.")
encoders = [Encoder(f"raw pixels {raw_size}x{raw_size}", "raw", raw_size)]
if random_baseline:
    encoders.append(Encoder(f"random init {arch}", "tower", size, tower={"name": arch, "pretrained": ""}, seed=seed))
if imagenet_baseline == "yes" or (imagenet_baseline == "auto" and arch == "tf_efficientnet_lite0"):
    encoders.append(Encoder("ImageNet effnet-lite0", "tower", size,
                            tower={"name": "tf_efficientnet_lite0", "pretrained": "efficientnet_lite0_package"}))
encoders += pretrained
pd.DataFrame([{"encoder": e.name, "kind": e.kind, "architecture": (e.tower or {}).get("name", "pixels"),
               "image size": e.image_size, "weights": e.state_path or (e.tower or {}).get("pretrained") or "none"}
              for e in encoders])

# %% [markdown]
# ## Features
#
# Every image is decoded once into a uint8 cache per image size, then each encoder runs over it in eval
# mode under `torch.inference_mode()` (the deterministic eval transform: no augmentation) and we keep the
# global feature vector. Features are cached on disk by encoder weights and images, so re-running the
# chapter only re-fits the probes. The probes need the train and test splits, and the validation split
# only when choosing C. On two CPU cores the `ci` profile draws a subset of the training patients
# (`max_train_patients`) to keep the chapter to a few minutes; "100%" then means all of that subset.

# %%
task = task.keep_splits(["train", "test"] + (["validate"] if len(Cs) > 1 else []))
task = task.limit_train_patients(max_train_patients, seed=seed)
print(f"{(task.df['split'] == 'train').sum()} training images ({task.split('train')['group'].nunique()} patients), "
      f"{(task.df['split'] == 'test').sum()} test images")
print(task.skips.summary())
paths = task.df["image_path"].tolist()
features, timings = {}, []
for enc in encoders:
    feats, valid, record = encoder_features(enc, paths, workspace("cache", "images"), workspace("features", "classify"),
                                            batch_size=batch_size, device=device, progress=True)
    if not valid.all():  # undecodable images: counted in the record and given NaN features (never scored)
        full = np.full((len(paths), feats.shape[1]), np.nan, np.float32)
        full[valid] = feats
        feats = full
    features[enc.name] = feats
    timings.append(record)
pd.DataFrame(timings)

# %% [markdown]
# ## Probing at 1%, 10% and 100% of the labels
#
# For each fraction and seed the same patients' images train every encoder's probe. A label with a single
# class in a small training subset (often: no positive among 20 images) cannot be learnt; its probe
# predicts a constant and scores exactly 0.5 — chance — which is what a classifier with no positive
# example is worth. Those labels are counted in the "labels at chance" column rather than dropped, so the
# mean is over the same labels at every fraction.

# %%
masks = fraction_masks(task.split("train"), workspace("splits", "classify"), dataset_tag, fractions=fractions,
                       seeds=tuple(range(seed, seed + fraction_seeds)))
t0 = time.perf_counter()
results = []
for enc in encoders:
    X = features[enc.name]
    ok = ~np.isnan(X).any(axis=1)
    if not ok.all():
        raise RuntimeError(f"{(~ok).sum()} images could not be decoded; see the cache skips and drop them first")
    results.append(probe_sweep(X, task, masks, Cs=Cs, encoder=enc.name))
results = pd.concat(results, ignore_index=True)
print(f"probes fitted in {time.perf_counter() - t0:.1f} s")
summary = summarise(results)
table = summary.pivot(index="encoder", columns="fraction", values="mean AUROC").loc[[e.name for e in encoders]]
table.columns = [f"{f:.0%} labels" for f in table.columns]
floor = table.iloc[0]  # the raw-pixel row
for name in [e.name for e in encoders[1:]]:
    below = [c for c in table.columns if not table.loc[name, c] > floor[c]]
    print(f"{name}: " + ("above the raw-pixel floor at every fraction" if not below
                         else f"NOT above the raw-pixel floor at {', '.join(below)}"))
table.round(3)

# %% [markdown]
# The same numbers as data: one row per encoder, label fraction and label draw, in the book's long format
# (`workspace/results/07_classification.csv`; the macro AUROC over the scored labels).

# %%
from mlip_core.results import write_results  # noqa: E402

tidy = (results.dropna(subset=["auroc"]).groupby(["encoder", "fraction", "seed"])["auroc"].mean().reset_index()
        .rename(columns={"encoder": "method", "auroc": "value"}).assign(task=f"linear_probe_{dataset_tag}",
                                                                          metric="macro_AUROC"))
print("results ->", write_results(tidy[["method", "task", "fraction", "seed", "metric", "value"]], "07_classification"))

# %%
fig, ax = plt.subplots(figsize=(7, 4.2))
per_seed = (results.dropna(subset=["auroc"]).groupby(["encoder", "fraction", "seed"])["auroc"].mean()
            .rename("mean AUROC").reset_index())
sns.lineplot(data=per_seed, x="fraction", y="mean AUROC", hue="encoder", hue_order=[e.name for e in encoders],
             marker="o", errorbar="sd", ax=ax)
ax.set_xscale("log")
ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
ax.minorticks_off()
ax.axhline(0.5, color="grey", lw=0.8, ls=":")
ax.set_xlabel("fraction of training labels (patients)")
ax.set_ylabel(f"mean AUROC over {int(summary['labels scored'].max())} scored labels (test)")
ax.set_title(f"Linear probe on frozen features: {task.name}")
ax.legend(fontsize=8, loc="best")
plt.show()

# %% [markdown]
# Bands are one standard deviation over the draws of the training patients: at 1% the probe sees a couple
# of dozen images and which ones matters a lot.
#
# ## Per label
#
# The mean hides which findings each encoder captures. Below: AUROC per label with all training labels,
# beside the number of positive test images. With a handful of test positives an AUROC moves by a tenth
# when one image changes rank — read those rows as noise.

# %%
full_frac = max(fractions)
per_label = results[results["fraction"] == full_frac].pivot(index="label", columns="encoder", values="auroc")
per_label = per_label.loc[task.labels, [e.name for e in encoders]]
counts = results[(results["fraction"] == full_frac) & (results["encoder"] == encoders[0].name)].set_index("label")
per_label.insert(0, "test positives", counts.loc[task.labels, "test positives"])
per_label.insert(1, "train positives", counts.loc[task.labels, "train positives"])
print(f"label fraction {full_frac:.0%}")
per_label.round(3)

# %%
skipped = results[results["status"].str.startswith("skipped")][["label", "status"]].drop_duplicates()
chance = (results[results["status"].str.startswith("chance")].groupby(["fraction", "label"]).size()
          .rename("probes at chance (encoders x seeds)").reset_index())
if len(skipped):
    print("labels without an AUROC on the test split:\n" + skipped.to_string(index=False))
else:
    print("every label has both classes in the test split")
chance

# %% [markdown]
# ## Reading the results
#
# - **The raw-pixel floor.** A logistic regression on 32×32 thumbnails is the first row. The renderer
#   varies pose, body size, exposure and anatomy precisely so that this floor stays low: findings that
#   change large regions in a consistent way (an enlarged heart, fluid at a lung base, bilateral edema)
#   remain partly visible even to it, small or variably placed ones (a nodule, a fracture) do not. A
#   learned encoder should beat it by a margin at every fraction; where it does not, the encoder (or its
#   pretraining) has not learnt the finding.
# - **Random init vs pretrained.** A random convolutional tower is not useless — averaged random filters
#   are texture statistics — and the gap between it and a pretrained tower of the same architecture is
#   the part of the probe's score that pretraining earned.
# - **ImageNet vs image–report pretraining.** When the towers started from ImageNet EfficientNet-lite0,
#   the gap to that row is what pretraining on reports added to natural-image features.
# - **Label efficiency.** The promise of vision–language pretraining is the 1% column: labels are
#   expensive, reports come free with every study. The papers' headline numbers are about how close the
#   1% probe comes to the 100% one.
#
# ## Where the offline world differs from CheXpert and RSNA
#
# - **Exact labels.** Here the labels are what was drawn. CheXpert's come from a rule-based labeler run on
#   the reports (with uncertain mentions mapped by a policy: U-Ones in the papers); RSNA's from
#   radiologists' boxes. Real labels are noisy, which caps AUROC well below 1.
# - **Size and prevalence.** A few hundred test images with a handful of positives for rare findings,
#   against CheXpert's 200k training images (the papers test on a held-out part of it) and RSNA's
#   ~30k. Our per-label AUROCs are noisy; the mean over labels and seeds is the number to read.
# - **Which labels.** The papers report the five CheXpert competition labels (atelectasis, cardiomegaly,
#   consolidation, edema, pleural effusion) or RSNA's single pneumonia label; we score every CheXpert
#   column the world drew, including rare ones. The `full` profile with `chexpert_root` set uses the
#   five competition labels through the CheXpert reader.
# - **Images.** Rendered radiographs are schematic and findings textbook-clean; a linear probe on real
#   radiographs faces overlapping anatomy, devices and positioning far more varied than ours.
# - **Protocol.** The papers train a linear layer with SGD for a fixed number of epochs; we fit an L2
#   logistic regression to convergence. Both are linear in frozen features; scores are comparable in
#   kind, not digit for digit.
