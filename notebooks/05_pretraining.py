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
# # Pretraining: ConVIRT and MLIP on the offline world
#
# This chapter trains two image–report models on the radiographs and reports written by the
# offline-world chapter, with the same engine and the same data, and compares them:
#
# - **ConVIRT** — the global image–report InfoNCE loss alone: every other report in the batch is a
#   negative, including reports that say exactly the same thing;
# - **MLIP** — the same towers plus the divergence (momentum) encoder that softens the targets, the
#   knowledge guard on negatives, token–knowledge–patch alignment, the knowledge-initialised
#   prototypes and the two proxy tasks (image–text matching and text swapping).
#
# **What you will learn.** The training loss of every term, step by step; how well each model retrieves the
# right report for a held-out image (and the right image for a report); and the exported image tower
# that the ablation and transfer chapters probe.
#
# **The engine in one paragraph.** `mlip_core.train` runs one loop on a CPU, one GPU or many GPUs
# (`torchrun`, PyTorch DDP). It uses AdamW (no weight decay on biases, normalisation layers, the
# temperature and the prototypes), a learning rate that warms up linearly and then follows a cosine,
# gradient clipping, and bf16 autocast on GPUs. Every few steps it writes a checkpoint *atomically*
# (to a temporary file, then renamed), holding the model *and* its momentum copy, the optimizer, the
# schedule, every random generator and the position in the data — so a run that is killed resumes
# exactly where it stopped, bitwise identical on CPU to a run that never stopped (the test suite and
# `benchmarks/kill_resume.py` check this). Re-executing this notebook therefore resumes finished runs
# instead of training again.
#
# Long training is not something to do inside a notebook kernel. For real datasets and GPUs the same
# engine runs from a terminal:
#
# ```
# python -m mlip_core.train --config mlip --data /data/mimic-cxr-jpg --out runs/mlip --resume auto
# torchrun --standalone --nproc_per_node 8 -m mlip_core.train --config mlip --data ... --out ... --precision bf16
# ```
#
# **What it needs.** The offline world of chapter `01_offline_world` (its reports, images and the
# labeler's `mimic-cxr-2.0.0-chexpert.csv`).
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("05_pretraining"))

# %% tags=["parameters"]
configs = "convirt,mlip"  # comma-separated named configs (see mlip_core.config.named_config)
image_tower = "tf_efficientnet_lite0"  # ImageNet-initialised (shipped offline); resnet18 from scratch did not learn on CPU
image_pretrained = "efficientnet_lite0_package"  # "" random init, or "efficientnet_lite0_package": shipped ImageNet weights (tf_efficientnet_lite0)
image_size = 128  # R@10 (i2t, seeds 0 and 1) ConVIRT 14.5 at 96 px, 21.7 and 20.5 at 128; MLIP 16.5 and 14.9 -> 16.1 and 20.1
frozen_stages = 3  # stem + first 3 stages at their ImageNet weights: 2x faster steps on CPU
trunk_views = 4  # the frozen stages run once per image and augmented view (4 views each) before training
text_tower = "minilm"  # minilm: MiniLM-L6 shipped offline; tiny: a small random BERT; or a Hub name
text_allow_download = False  # only the full profile (Bio_ClinicalBERT from the Hub) sets this
max_length = 48  # report tokens
freeze_text_layers = 6  # all of MiniLM frozen (only the projection heads learn on the text side): CPU budget
batch_size = 32  # ConVIRT's batch size
epochs = 6  # ConVIRT's validation R@10 kept rising to epoch 5 (2 epochs: 8.8/7.2 %; 8 epochs: 17.7/15.7 %)
max_steps = 0  # > 0 overrides epochs
lr = 0.001  # heads and image tower (tower_lr_scale 0.3 gave R@10 6.0/8.4 vs 9.2/9.2 at 1.0, convirt)
tower_lr_scale = 1.0  # the (pretrained) towers learn at lr * tower_lr_scale, the projection heads at lr
warmup_ratio = 0.1
weight_decay = 0.05
checkpoint_every = 20  # steps
num_workers = 0
seed = 0
deterministic = True
mimic_root = ""  # a MIMIC-CXR-JPG 2.0.0 folder (CSVs and files/); empty: chapter 01's offline world
mimic_reports_root = ""  # MIMIC-CXR reports not under mimic_root: their folder or mimic-cxr-reports.zip
pretrained_run = ""  # run folders trained from a terminal (python -m mlip_core.train), comma-separated
publish_examples = False  # with mimic_root or mimic_reports_root set, show the example image and report only if True

# %%
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mlip_core.checkpoint import load_image_tower_export
from mlip_core.config import load_config, pretrain_config
from mlip_core.data.mimic import load_mimic_pairs
from mlip_core.notebook import setup, show_examples
from mlip_core.paths import workspace
from mlip_core.train import read_run, run_folder, train

device = setup(seed, deterministic=deterministic)
print(f"device: {device}")

# %% [markdown]
# ## The data
#
# The offline-world chapter wrote a dataset in the exact layout of MIMIC-CXR-JPG (JPEG radiographs,
# reports as text files, split / metadata / CheXpert label CSVs). The same reader that reads real
# MIMIC-CXR reads it, keeping frontal (PA/AP) images; pretraining uses the `train` split and the
# held-out `validate` split measures retrieval.

#
# With `mimic_root` set, the same cells read your MIMIC-CXR-JPG copy instead (and `mimic_reports_root` the
# reports, which MIMIC-CXR ships apart from the JPG images).

# %%
world = Path(mimic_root) if mimic_root else workspace("offline_world", create=False)
reports_root = mimic_reports_root or None
if not (world / "mimic-cxr-2.0.0-split.csv").exists() and not (world / "mimic-cxr-2.0.0-split.csv.gz").exists():
    raise FileNotFoundError(
        f"{world} holds no mimic-cxr-2.0.0-split.csv(.gz): " + (
            "set mimic_root to the MIMIC-CXR-JPG 2.0.0 folder" if mimic_root else
            "run the chapter 01_offline_world first (python -m mlip_core.book --profile smoke --only 01_offline_world)")
    )
counts = {}
for split in ("train", "validate"):
    pairs, skips = load_mimic_pairs(world, split=split, reports_root=reports_root)
    counts[split] = {"image-report pairs": len(pairs), "studies": pairs["study_id"].nunique(),
                     "skipped rows": len(skips)}
pd.DataFrame(counts).T

# %% [markdown]
# One example pair, as the model sees it before tokenisation: a single-channel radiograph and the
# report text (impression and findings). MIMIC-CXR's data-use agreement forbids sharing its images and reports,
# so with `mimic_root` (or `mimic_reports_root`) set the cell prints one line instead, unless `publish_examples`
# is set.

# %%
if show_examples("MIMIC-CXR", publish_examples, mimic_root=mimic_root, mimic_reports_root=mimic_reports_root):
    from mlip_core.data.images import load_uint8

    example = pairs.iloc[0]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(load_uint8(example["image_path"], image_size), cmap="gray")
    ax.set_title(f"validate study {example['study_id']}")
    ax.axis("off")
    plt.show()
    print(example["text"][:600])

# %% [markdown]
# ## Training
#
# Both models share every setting below except the loss configuration. A run lives in a folder named after its
# configuration and its data (a hash of both), so changing a parameter or the dataset starts a new run and
# re-running the notebook with the same parameters resumes the old one (`resume="auto"`). With `pretrained_run`
# set, the chapter trains nothing: it reads the run folders you trained from a terminal (their own configs,
# metrics and exported towers), and every cell below shows those runs.
#
# **What is computed once.** Whatever does not change during training is computed before the first step and
# cached in the workspace, for both models and for every run of the ablation chapter: the frozen MiniLM's
# outputs for every report (and for two swapped versions of every report, which text swapping reads), the
# reports tokenised with their knowledge marks, and the frozen image stages' output for `trunk_views`
# augmented views of every training image. Each step then reads a random view and runs only the trainable
# stages. These once-only passes run under bfloat16 autocast (`frozen_precision` of the training config): on a
# CPU with bfloat16 instructions they take about half of float32's time, and their outputs move by one to a
# few percent (`benchmarks/bench_frozen.py` prints both); validation's reports and images are encoded in
# float32, as the towers give them at evaluation. The price is augmentation diversity: however many epochs run,
# an image is seen in at most `trunk_views` different crops; the gain is speed (the throughput table below gives
# pairs per second, and `benchmarks/bench_train.py` compares the engine with and without these caches). On
# MIMIC-CXR with an unfrozen tower (the `full` profile) nothing of the image side is cached.


# %%
params = dict(image_tower=image_tower, image_pretrained=image_pretrained, image_size=image_size,
              frozen_stages=frozen_stages, text_tower=text_tower, text_allow_download=text_allow_download,
              max_length=max_length, freeze_text_layers=freeze_text_layers, batch_size=batch_size, epochs=epochs,
              max_steps=max_steps, lr=lr, tower_lr_scale=tower_lr_scale, warmup_ratio=warmup_ratio,
              weight_decay=weight_decay, checkpoint_every=checkpoint_every, num_workers=num_workers, seed=seed,
              deterministic=deterministic, trunk_views=trunk_views)


def make_config(name: str):
    """The named config with this notebook's parameters (the one mapping: mlip_core.config.pretrain_config)."""
    return pretrain_config(name, **params)


results, run_configs = {}, {}
if pretrained_run:
    for run in (Path(r.strip()) for r in pretrained_run.split(",") if r.strip()):
        cfg = load_config(run / "config.yaml")
        results[cfg.name], run_configs[cfg.name] = read_run(run), cfg
        print(f"{cfg.name}: read from {run} ({results[cfg.name].steps} steps, trained outside this notebook)")
else:
    for name in configs.split(","):
        cfg = run_configs[name] = make_config(name)
        results[name] = train(cfg, data_dir=world, run_dir=run_folder(cfg, data_dir=world), resume="auto",
                              reports_root=reports_root)
        if frozen_stages:
            print(f"{name}: stem and first {frozen_stages} stages of the image tower frozen at their ImageNet weights")

# %% [markdown]
# ## Loss curves, term by term
#
# Each panel is one model; each line one term of its loss (the total is the weighted sum). The
# contrastive terms start near $\log B$ (chance among the $B$ reports of a batch) and fall as image and
# report embeddings align. How far they can fall is bounded by the data: most studies are normal (the
# share is printed with the retrieval ceiling below), and their reports are interchangeable for the image
# tower, so even a perfect model keeps a loss well above 0 — the table under the figure gives each term's mean
# over the first and the last ten steps, and $\log B$ to compare the global term with. In MLIP the global term's
# targets are softened by the momentum encoder, so its floor is higher than ConVIRT's; the local, category,
# matching and swap terms each fall at their own pace, and a term that barely falls has not learned its task.

# %%
fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
for ax, (name, res) in zip(axes[0], results.items()):
    hist = pd.DataFrame(res.history)
    terms = [c for c in hist.columns if c.startswith("loss_")]
    for term in terms:
        ax.plot(hist["step"], hist[term], label=term.removeprefix("loss_"))
    ax.plot(hist["step"], hist["loss"], color="black", lw=2, label="total")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: training loss per term")
    ax.legend(fontsize=8)
plt.show()

term_table = pd.DataFrame([
    {"config": name, "term": term.removeprefix("loss_"), "first 10 steps": hist[term].head(10).mean(),
     "last 10 steps": hist[term].tail(10).mean()}
    for name, res in results.items() for hist in [pd.DataFrame(res.history)]
    for term in hist.columns if term.startswith("loss_")])
term_table["fell by %"] = 100 * (1 - term_table["last 10 steps"] / term_table["first 10 steps"])
print("log B (chance of the global term): " + ", ".join(
    f"{name} {math.log(cfg.train.batch_size):.3f}" for name, cfg in run_configs.items()))
term_table.set_index(["config", "term"]).round(3)

# %% [markdown]
# The learning rate that produced these curves: linear warm-up, then a cosine decay (the same
# schedule for both models).

# %%
first = next(iter(results.values()))
hist = pd.DataFrame(first.history)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(hist["step"], hist["lr"])
ax.set_xlabel("optimizer step")
ax.set_ylabel("learning rate")
ax.set_title("warm-up + cosine schedule")
plt.show()

# %% [markdown]
# ## Retrieval on the held-out split
#
# For every validation image, rank all validation reports by cosine similarity; **R@K** (image→text)
# is the percentage of images whose own report is among the top K — and text→image the same the other
# way. A report shared by several images of one study counts as a hit for each of them. With N
# validation pairs, a random ranking scores about K/N.

# %%
rows = []
for name, res in results.items():
    for rec in res.val_history:
        rows.append({"config": name, "epoch": rec["epoch"], "step": rec["step"],
                     **{k: rec[k] for k in rec if "R@" in k}, "val loss": rec.get("val_loss")})
val = pd.DataFrame(rows)
n_val = results[next(iter(results))].val_history[-1]["val_n"] if rows else 0
print(f"validation pairs: {n_val}; chance R@1/5/10 ≈ {100 / max(n_val, 1):.1f} / "
      f"{min(100, 500 / max(n_val, 1)):.1f} / {min(100, 1000 / max(n_val, 1)):.1f} %")
final = val.sort_values("step").groupby("config").tail(1).set_index("config")
final.round(1)

# %% [markdown]
# Chance is the floor; what is the ceiling? Most studies of the offline world are normal (as in MIMIC-CXR),
# and a normal radiograph carries nothing that says *which* of the many normal reports belongs to it. So
# no model can retrieve much better than one that knows every study's findings exactly: the reference
# row below embeds each image and each report by the set of positive CheXpert labels of its study, ties
# broken at random. The same reason keeps the training loss well above 0: within a batch, the reports
# of normal studies are interchangeable for the image tower.

# %%
from mlip_core.knowledge.graph import CHEXPERT_14  # noqa: E402
from mlip_core.metrics import retrieval_recall  # noqa: E402

val_pairs, _ = load_mimic_pairs(world, split="validate", reports_root=reports_root)
label_sets = torch.tensor((val_pairs[CHEXPERT_14].to_numpy() == 1).astype("float32"))
gen = torch.Generator().manual_seed(seed)
oracle = retrieval_recall(
    torch.nn.functional.normalize(label_sets + 0.01 * torch.rand(label_sets.shape, generator=gen), dim=1),
    torch.nn.functional.normalize(label_sets + 0.01 * torch.rand(label_sets.shape, generator=gen), dim=1),
    torch.tensor(val_pairs["study_id"].to_numpy()))
normal_share = 100 * float((val_pairs["No Finding"] == 1).mean())
print(f"normal ('No Finding') validation images: {normal_share:.0f} %")
from myst_nb import glue  # noqa: E402

for name in final.index:
    glue(f"r10_i2t_{name}", round(float(final.loc[name, "i2t_R@10"]), 1), display=False)
    glue(f"r10_t2i_{name}", round(float(final.loc[name, "t2i_R@10"]), 1), display=False)
glue("r10_ceiling", round(float(oracle["i2t_R@10"]), 1), display=False)
glue("r10_chance", round(min(100.0, 1000 / max(n_val, 1)), 1), display=False)
glue("normal_share", round(normal_share), display=False)
# ITM scores each true pair beside its hard negatives: always answering "no match" is right k/(k+1) of the time,
# so an ITM accuracy at that share means the head has learned nothing yet.
from mlip_core.objective import ITMTerm  # noqa: E402

last_val = results["mlip"].val_history[-1] if "mlip" in results and results["mlip"].val_history else {}
glue("mlip_itm_acc", round(float(last_val.get("val_itm_acc", float("nan"))), 3), display=False)
glue("mlip_swap_acc", round(float(last_val.get("val_swap_acc", float("nan"))), 3), display=False)
k = ITMTerm.negatives_per_positive
glue("itm_majority", round(k / (k + 1), 3), display=False)
both = [n for n in final.index if all(final.loc[n, f"{d}_R@10"] > final.drop(index=n)[f"{d}_R@10"].max()
                                   for d in ("i2t", "t2i"))]
glue("r10_verdict", f"{both[0]} retrieves more than every other configuration in both directions" if both
     else "neither model retrieves more in both directions", display=False)
pd.concat([final[[c for c in final.columns if "R@" in c]],
           pd.DataFrame({k: v for k, v in oracle.items() if "R@" in k}, index=["knows the findings"])]).round(1)

# %% [markdown]
# With the `ci` settings, MLIP retrieves the right report among the top ten for
# {glue:text}`r10_i2t_mlip` % of held-out images (text→image {glue:text}`r10_t2i_mlip` %), ConVIRT for
# {glue:text}`r10_i2t_convirt` % ({glue:text}`r10_t2i_convirt` %); chance is {glue:text}`r10_chance` % and a model
# that knew every study's findings exactly would reach {glue:text}`r10_ceiling` %, because
# {glue:text}`normal_share` % of the validation images are normal. In this run
# {glue:text}`r10_verdict`. One seed cannot say whether such a difference means anything: the next chapter
# (`06_ablations`) trains every configuration on three seeds, but with a much smaller budget per run (fewer steps on
# smaller images, so that its 33 runs fit the book). Nor is one run at this scale a verdict on the method. MLIP's
# proxy tasks show how far from converged it is: on the validation split its matching head ends at
# {glue:text}`mlip_itm_acc` accuracy, where always answering "no match" scores {glue:text}`itm_majority` (each
# true pair is scored beside a hard-negative report and a hard-negative image), and its swap head at
# {glue:text}`mlip_swap_acc`. A head that has not learned its task adds gradient
# without signal to the towers it shares with the global loss.

# %% [markdown]
# ## Where the embeddings sit
#
# Retrieval compresses two questions into one number. Two simpler measures separate them (Wang & Isola, ICML 2020,
# call them alignment and uniformity): how close each image sits to its own report (the mean cosine of the
# validation pairs), and how widely each modality spreads over the sphere (the mean cosine between two different
# images, and between two different reports). The validation step of the engine records all three
# (`mlip_core.metrics.embedding_geometry`). A mean cosine near 1 means a modality's embeddings crowd into a
# narrow cone: the differences between them, which retrieval ranks by, are then a small part of each vector.

# %%
nan = float("nan")  # runs validated before the engine recorded the geometry
geometry = pd.DataFrame({name: {"own report (pair cosine)": res.val_history[-1].get("val_pair_cos", nan),
                                "image vs image (mean cosine)": res.val_history[-1].get("val_image_mean_cos", nan),
                                "report vs report (mean cosine)": res.val_history[-1].get("val_text_mean_cos", nan)}
                         for name, res in results.items() if res.val_history}).T.astype(float)
for name in geometry.index:
    glue(f"geo_image_{name}", f"{geometry.loc[name, 'image vs image (mean cosine)']:.2f}", display=False)
    glue(f"geo_text_{name}", f"{geometry.loc[name, 'report vs report (mean cosine)']:.2f}", display=False)
crowded = geometry["image vs image (mean cosine)"].idxmax() if len(geometry) else ""
glue("geo_crowded", crowded, display=False)
geometry.round(3)

# %% [markdown]
# The images of {glue:text}`geo_crowded` crowd most. Between two different validation images the mean cosine is
# {glue:text}`geo_image_mlip` for MLIP and {glue:text}`geo_image_convirt` for ConVIRT; between two different
# reports, {glue:text}`geo_text_mlip` and {glue:text}`geo_text_convirt`. One run says nothing about noise: the
# ablation chapter repeats this measure on every configuration and three seeds, and asks which of MLIP's parts
# moves it beyond the seed spread.

# %%
from mlip_core.results import write_results  # noqa: E402

rows = [{"method": name, "task": f"retrieval_{d}", "fraction": float("nan"), "seed": seed, "metric": f"R@{k}",
         "value": float(final.loc[name, f"{d}_R@{k}"])}
        for name in final.index for d in ("i2t", "t2i") for k in (1, 5, 10)]
print("results ->", write_results(rows, "05_pretraining"))

# %%
if len(val):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, grp in val.groupby("config"):
        ax.plot(grp["epoch"] + 1, grp["i2t_R@5"], marker="o", label=f"{name} image→text")
        ax.plot(grp["epoch"] + 1, grp["t2i_R@5"], marker="s", ls="--", label=f"{name} text→image")
    ax.axhline(min(100, 500 / max(n_val, 1)), color="grey", lw=1, label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("R@5 (%)")
    ax.set_title("Held-out retrieval during pretraining")
    ax.legend(fontsize=8)
    plt.show()

# %% [markdown]
# ## Speed and memory
#
# The metrics log also records throughput (image–report pairs per second) and memory at every step;
# `benchmarks/bench_train.py` measures the same numbers for larger models and on GPUs.

# %%
speed = pd.DataFrame({
    name: {"steps": res.steps, "median pairs/s": pd.DataFrame(res.history)["images_per_s"].median(),
           "peak memory (MiB)": pd.DataFrame(res.history)["mem_mb"].max()}
    for name, res in results.items()}).T
speed.round(1)

# %% [markdown]
# ## Exporting the image tower
#
# Transfer learning needs only the image tower: a plain `state_dict` plus the configuration that
# builds it. Each run exported its tower at the end; we copy it to `workspace("pretrained", NAME)`, a
# stable path outside the hash-named run folder (point `python -m mlip_core.transfer --encoder` at it), and
# check that it loads into a freshly built tower. The transfer chapters compare the towers of chapter
# `06_ablations` instead, three pretraining seeds per method.

# %%
from mlip_core.model.encoders import ImageTower  # noqa: E402
from mlip_core.checkpoint import write_image_tower_export  # noqa: E402

for name, res in results.items():
    state, meta = load_image_tower_export(res.export_path)
    dest = workspace("pretrained", name)
    write_image_tower_export(state, meta["config"], meta["step"], dest)
    tower = ImageTower(run_configs[name].model.image)
    tower.load_state_dict(state)
    with torch.no_grad():
        size = run_configs[name].model.image.image_size
        feats = tower.eval()(torch.zeros(1, 1, size, size))
    print(f"{name}: {len(state)} tensors from step {meta['step']} -> {dest}; "
          f"global {tuple(feats.global_.shape)}, patches {tuple(feats.patches.shape)}")

# %% [markdown]
# ## What a checkpoint holds
#
# The last checkpoint of the MLIP run (loaded with `weights_only=True`: no code from the file runs).
# Resuming needs every one of these entries — the momentum encoder's weights are part of `model`,
# the data position is `epoch` + `batch_in_epoch`, and `rng` holds the Python, NumPy and PyTorch
# generators.

# %%
last = results[list(results)[-1]].checkpoint_path
ckpt = torch.load(last, map_location="cpu", weights_only=True)
momentum = [k for k in ckpt["model"] if k.split(".")[0].endswith("_m")]
pd.DataFrame({
    "entry": ["step", "epoch", "batch_in_epoch", "model tensors", "of which momentum encoder", "optimizer",
              "rng", "code_version"],
    "value": [ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], len(ckpt["model"]), len(momentum),
              f"{len(ckpt['optimizer']['state'])} parameter states", ", ".join(ckpt["rng"]),
              ckpt["code_version"].get("git_commit", "")[:10]],
})
