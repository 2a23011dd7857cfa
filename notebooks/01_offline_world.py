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
# # The offline world: real reports, rendered radiographs
#
# Medical vision–language pretraining needs pairs of chest radiographs and the radiologists' reports
# about them. The datasets that have them (MIMIC-CXR, CheXpert, ...) need credentialed access, so a
# book that anyone can run needs a stand-in. This chapter builds one and says plainly what it is good
# for and where it differs from the real thing.
#
# - **The reports are real.** `torchxrayvision` ships 3,955 Indiana University chest X-ray reports
#   (OpenI, licence CC BY-NC-ND 4.0) with MeSH terms that annotators attached to each report:
#   `Opacity/lung/base/left/mild`, `Cardiomegaly/borderline`, `normal`. We read them from the installed
#   package every time; they are never copied into the repository.
# - **The images are drawn.** A procedural renderer paints a frontal radiograph for each report from its
#   MeSH terms: an enlarged heart for cardiomegaly, fluid blunting the named costophrenic angle for an
#   effusion, an opacity in the named lobe, a lung edge without vessels for a pneumothorax, metal for
#   devices. Every finding it draws comes with a pixel mask and a bounding box: ground truth that a real
#   dataset rarely has.
# - **The layout is MIMIC-CXR-JPG.** The world is written exactly as MIMIC-CXR-JPG 2.0.0 is laid out on
#   disk, so the chapters that follow read it with the *real* MIMIC reader. Swap the folder for a real
#   MIMIC download and nothing else changes.
#
# **What you will learn.** How the stand-in for MIMIC-CXR is made, what its reports, images and labels look
# like, and where it differs from the real dataset.
#
# **What it needs.** Nothing from earlier chapters: the reports come from the installed `torchxrayvision`
# package. Every later chapter that trains or probes reads the world this chapter writes.
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("01_offline_world"))

# %% tags=["parameters"]
num_studies = 2500  # studies (one report + one frontal image each) to write
seed = 0
image_size = 224  # pixels, square
report_source = "iu"  # "iu" (real IU reports), "template" (generated) or "mixed"
workers = 2  # processes rendering in parallel; the files are identical for any value
preview_n = 8  # images in the quick-look grid

# %%
import collections
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pydicom
from myst_nb import glue
from PIL import Image

from mlip_core.data.images import pydicom_data_path, read_dicom
from mlip_core.data.iu import iu_archive_path, load_iu_reports, parse_mesh_term
from mlip_core.data.preview import preview_grid, report_excerpt, world_examples
from mlip_core.data.synth import ensure_world
from mlip_core.data.synth_anatomy import lung_templates
from mlip_core.data.synth_findings import CHEXPERT_COLUMNS, Finding, findings_from_mesh
from mlip_core.data.synth_render import render, sample_patient, sample_scene, with_findings
from mlip_core.notebook import setup
from mlip_core.paths import workspace

device = setup(seed)
world_dir = workspace("offline_world")
print(f"IU reports: {iu_archive_path()}\nworld folder: {world_dir}")

# %% [markdown]
# ## The real reports
#
# Each IU report is an XML file with FINDINGS, IMPRESSION, INDICATION and COMPARISON sections and two
# lists of MeSH terms. The *major* terms were assigned by people reading the report; they list what is
# **present**. A report that says "No pneumothorax" does not get a pneumothorax term — negations stay
# in the text, which is exactly what a text encoder must learn to read. De-identification replaced
# words with `XXXX`; we leave them as they are.

# %%
reports = load_iu_reports()
n_normal = sum(r.mesh_major == ["normal"] for r in reports)
heads = collections.Counter(parse_mesh_term(t).finding for r in reports for t in r.mesh_major)
print(f"{len(reports)} reports; {n_normal} ({n_normal / len(reports):.0%}) carry only the MeSH term 'normal'")
pd.DataFrame(heads.most_common(15), columns=["MeSH heading", "reports"])

# %% [markdown]
# A third of the reports are "normal", and their texts are near-identical. In a contrastive batch they
# are each other's *false negatives*: the loss pushes apart reports that mean the same thing. MLIP's
# divergence encoder and knowledge-guarded negatives exist for exactly this; the pretraining chapter
# measures it.
#
# The renderer reads only the MeSH terms. Each term is split into a heading and qualifiers (location,
# side, severity) and mapped to something it can draw. Headings it cannot draw (degenerative spine,
# tortuous aorta, ...) are kept in the report and listed as *undrawn*: a real report also mentions
# things a small image cannot show.

# %%
rng = np.random.default_rng(seed)
examples = [r for r in reports if len(r.mesh_major) >= 2][:6]
pd.DataFrame([{
    "uid": r.uid,
    "MeSH major": "; ".join(r.mesh_major),
    "drawn": ", ".join(f"{f.side + ' ' if f.side else ''}{f.zone + ' ' if f.zone else ''}{f.name} ({f.severity})"
                       for f in findings_from_mesh(r.mesh_major, rng)[0]),
    "undrawn": "; ".join(findings_from_mesh(r.mesh_major, rng)[1]),
    "impression": report_excerpt(f"IMPRESSION: {r.impression}", 90),
} for r in examples])

# %% [markdown]
# ## The renderer, and why it varies what it varies
#
# An image is a sum of densities seen through an exposure curve: soft tissue, mediastinum, heart, ribs,
# clavicles and spine add density; the air in the lungs removes it; findings put density back (fluid,
# consolidation) or remove more (pneumothorax); metal adds a lot. The lung outlines are **real**:
# `torchxrayvision` ships {glue:text}`lung_masks_total` hand-drawn lung masks, and the {glue:text}`lung_templates_used` with two clean lungs side by side become
# templates, stretched to each patient's thorax. Lung findings are placed in template coordinates, so an
# effusion sits at *that* lung's costophrenic angle and a "left upper lobe" opacity in that lung's upper
# third, whatever the pose.
#
# **A warning shaped this renderer.** An earlier renderer drew every patient with one anatomy in one pose. A
# logistic regression on raw 32×32 pixels then did as well as a pretrained encoder with 10% of the labels,
# because each finding always landed on the same pixels (the raw-pixel floor below measures this world). Nothing
# about representation learning could be learned from that world. So this renderer varies, per patient or
# per image, everything real radiographs vary and none of which is a label. The ranges are the renderer's
# design constants, not measurements; the table is built from the same constants that
# `mlip_core.data.synth_render.sample_patient` and `sample_scene` draw from (`variation_table`).

# %% tags=["remove-input"]
from mlip_core.data.synth_render import variation_table  # noqa: E402
from mlip_core.notebook import markdown_table  # noqa: E402

templates = lung_templates()
glue("lung_templates_used", len(templates), display=False)
glue("lung_masks_total", len(templates) + templates.skipped, display=False)
Markdown(markdown_table(variation_table()))

# %% [markdown]
# Below: one patient, no findings, six images — only positioning, exposure and nuisance change.

# %%
rng = np.random.default_rng(seed + 1)
patient = sample_patient(rng)
fig, axes = plt.subplots(1, 6, figsize=(15, 2.9))
for ax in axes:
    scene = sample_scene(rng, patient, [], size=image_size)
    ax.imshow(render(scene).image, cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{scene.view}, rot {scene.rotation:+.1f}°, exp {scene.exposure:.1f}", fontsize=8)
    ax.axis("off")
fig.suptitle(f"One patient (lung outline {patient.template} of {len(lung_templates())}), six images: "
             "what varies without being a label")
plt.show()

# %% [markdown]
# ## Each finding, and what it changes
#
# The same image rendered without and with one finding; the third row is the difference (white = denser
# with the finding), with the finding's mask outlined. A finding changes the image where a radiologist
# would look — and nowhere else. The test suite checks this for every finding: the cardiothoracic ratio
# crosses 0.5 with cardiomegaly, an effusion whitens the bottom of the named lung, a pneumothorax
# darkens the apex and removes the vessels there, a fracture changes only pixels next to its box.

# %%
demo = [Finding("cardiomegaly", severity="moderate"), Finding("effusion", side="right", severity="moderate"),
        Finding("consolidation", side="left", zone="lower", severity="moderate"),
        Finding("nodule", side="right", zone="upper", severity="moderate"), Finding("mass", side="left", zone="middle"),
        Finding("pneumothorax", side="right", severity="moderate"), Finding("edema", side="bilateral", severity="moderate"),
        Finding("atelectasis", side="right", zone="lower"), Finding("fracture", side="left", kind="rib"),
        Finding("device", kind="pacemaker")]
rng = np.random.default_rng(seed + 2)
fig, axes = plt.subplots(3, len(demo), figsize=(1.8 * len(demo), 5.8))
for j, f in enumerate(demo):
    base = sample_scene(rng, sample_patient(rng), [], size=image_size, view="PA")
    before, after = render(base), render(with_findings(base, [f]))
    diff = after.image.astype(np.float32) - before.image.astype(np.float32)
    axes[0, j].imshow(before.image, cmap="gray", vmin=0, vmax=255)
    axes[1, j].imshow(after.image, cmap="gray", vmin=0, vmax=255)
    axes[2, j].imshow(diff, cmap="gray", vmin=-60, vmax=60)
    for inst in after.instances:
        axes[2, j].contour(inst.mask, levels=[0.5], colors="tab:red", linewidths=0.6)
    label = f.kind if f.name == "device" else f.name
    axes[0, j].set_title(f"{f.side + ' ' if f.side in ('left', 'right') else ''}{label}", fontsize=8)
    if f.name == "cardiomegaly":
        axes[1, j].set_xlabel(f"CTR {before.ctr:.2f} → {after.ctr:.2f}", fontsize=8)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
for i, name in enumerate(["without", "with", "difference"]):
    axes[i, 0].set_ylabel(name)
fig.suptitle("One finding at a time: before, after, and where the image changed (mask in red)")
plt.show()

# %% [markdown]
# ## Writing the world
#
# `ensure_world` writes the world unless the folder already holds one made with the same parameters (a
# re-run of this chapter is then instant). The same seed gives byte-identical files, with any number of
# worker processes. The writer lists every file it writes in `mlip-world-manifest.json`; replacing a world
# removes exactly those files, and a folder that holds MIMIC-like files without that manifest (your real
# MIMIC-CXR-JPG copy, say) is refused with a message instead of being cleaned. From a terminal the same thing is
# `python -m mlip_core.data.synth --out DIR --num-studies N --seed S --image-size 224`.
#
# Patients are drawn first (in this world a patient has {glue:text}`world_studies_per_patient` studies on average,
# counted below, and keeps one anatomy across them), then
# split 80/10/10 into train/validate/test **by patient**, so that no patient's anatomy leaks from training
# into evaluation.

# %%
t0 = time.perf_counter()
summary, written = ensure_world(world_dir, num_studies, seed, image_size=image_size, report_source=report_source,
                                workers=workers)
elapsed = time.perf_counter() - t0
print(summary if written else f"reused the world already in {world_dir} (same parameters)")
print(f"{elapsed:.1f} s")

# %%
split = pd.read_csv(world_dir / "mimic-cxr-2.0.0-split.csv")
meta = pd.read_csv(world_dir / "mimic-cxr-2.0.0-metadata.csv")
glue("world_studies_per_patient", f"{split.groupby('subject_id')['study_id'].nunique().mean():.2f}", display=False)
chexpert = pd.read_csv(world_dir / "mimic-cxr-2.0.0-chexpert.csv")
truth = pd.read_csv(world_dir / "synth" / "labels.csv")
findings = pd.read_csv(world_dir / "synth" / "findings.csv", keep_default_na=False)
print("files:", sorted(p.name for p in world_dir.iterdir()))
print("one image:", next((world_dir / "files").rglob("*.jpg")).relative_to(world_dir))
print("views:", meta["ViewPosition"].value_counts().to_dict())
split.head(3)

# %% [markdown]
# Two label tables sit side by side. `mimic-cxr-2.0.0-chexpert.csv` is made the way MIMIC-CXR's is: a
# labeller **reads the report text** — here the project's rule-based labeller (`mlip_core.knowledge.extract`,
# chapter 02), run on exactly the `sNNN.txt` file the readers see — and writes the CheXpert convention:
# 1 positive, 0 negated, −1 hedged, blank not mentioned. It is the only label table pretraining may use.
# `synth/labels.csv` is what was actually **drawn**, 0 or 1 for every study: the truth, which only
# evaluation reads (pretraining never opens `synth/`; `tests/test_no_label_leak.py` hides the folder and
# trains anyway).

# %%
by_split = truth.merge(split[["study_id", "split"]].drop_duplicates(), on="study_id")
prevalence = by_split.groupby("split")[CHEXPERT_COLUMNS].sum().T
prevalence["reader table: 1.0"] = (chexpert[CHEXPERT_COLUMNS] == 1.0).sum()
prevalence["reader table: -1.0"] = (chexpert[CHEXPERT_COLUMNS] == -1.0).sum()
prevalence["reader table: blank"] = chexpert[CHEXPERT_COLUMNS].isna().sum()
prevalence

# %% [markdown]
# How far is the labeller's table from the truth? For each finding: how many studies show it (`truth
# positives`), how many the labeller marked 1 or −1, and the precision and recall of its 1s (`recall 1 or
# −1` counts a hedge as found). The disagreements have two sources: the labeller's own mistakes (a phrasing
# it does not know, a negation whose scope it cuts wrongly), and reports whose text says more or less than
# the MeSH terms the image was drawn from. MIMIC's CSV has errors of the same kinds; pretraining learns
# with them, and evaluation against the truth shows what they cost.

# %%
from mlip_core.data.synth import label_agreement

label_agreement(world_dir).round(3)

# %% [markdown]
# ## A quick look
#
# Rendered images with their drawn findings (masks and boxes in colour) and the impression of the real
# report each was drawn from.

# %%
fig = preview_grid(world_dir, n=preview_n, cols=4, seed=seed)
plt.show()

# %% [markdown]
# ## Next to a real radiograph
#
# `pydicom-data` ships one real PA chest radiograph, `RG1_UNCR.dcm`. Its photometric interpretation is
# MONOCHROME1: the *smallest* stored value is white, the opposite of most images. Read naively it looks
# like a negative; `read_dicom` applies the VOI window and inverts MONOCHROME1 so that bone is white.

# %%
path = pydicom_data_path("RG1_UNCR.dcm")
ds = pydicom.dcmread(path)
raw = ds.pixel_array
real = read_dicom(path)
print(f"{path.name}: {ds.get('PhotometricInterpretation')}, {raw.shape[1]}x{raw.shape[0]} px, "
      f"{ds.get('BitsStored')} bits stored, modality {ds.get('Modality')}")
ex = world_examples(world_dir, n=3, seed=seed + 3)
fig, axes = plt.subplots(1, 5, figsize=(16, 3.6))
axes[0].imshow(raw, cmap="gray")
axes[0].set_title("RG1_UNCR.dcm, raw pixels\n(MONOCHROME1: looks inverted)", fontsize=9)
axes[1].imshow(real, cmap="gray")
axes[1].set_title("real PA radiograph, display polarity", fontsize=9)
for ax, (_, row) in zip(axes[2:], ex.iterrows()):
    ax.imshow(np.asarray(Image.open(row["image_path"])), cmap="gray", vmin=0, vmax=255)
    names = ", ".join(f["finding"] for f in row["findings"]) or "no drawn finding"
    ax.set_title(f"rendered: {names}", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.suptitle("A real chest radiograph (pydicom-data) beside rendered ones")
plt.show()

# %% [markdown]
# ## Is the world too easy? The raw-pixel floor
#
# The warning above came from a linear model on raw pixels. Here is the same probe on this world: a
# logistic regression on 32×32 thumbnails, trained on the train split, scored by AUROC on the test split,
# for the labels with enough positives. Pretrained encoders in later chapters must beat these numbers;
# if they do not, the renderer is leaking findings through fixed pixels again.

# %%
from mlip_core.data.images import load_uint8
from mlip_core.transfer.classify import auroc_per_label, linear_probe, offline_world_task, raw_pixel_features

probe_labels = ["Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Atelectasis", "Support Devices", "No Finding"]
task = offline_world_task(world_dir, labels=probe_labels)
train_rows, test_rows = task.split("train"), task.split("test")
thumbs = raw_pixel_features(np.stack([load_uint8(p, 32) for p in task.df["image_path"]]))
result = linear_probe(thumbs[train_rows.index], train_rows[task.labels].to_numpy(), thumbs[test_rows.index],
                      task.labels, C=0.1)
aurocs, not_scored = auroc_per_label(test_rows[task.labels].to_numpy(), result.scores, task.labels)
pd.DataFrame([{"label": c, "test positives": int(test_rows[c].sum()) if c in task.labels else 0,
               "raw-pixel AUROC": aurocs.get(c, np.nan),
               "not scored because": not_scored.get(c) or result.constant.get(c) or task.unused_labels.get(c, "")}
              for c in probe_labels])

# %% [markdown]
# (With the smoke profile's handful of studies the table is mostly empty: too few positives to score.)
#
# ## Where this world differs from MIMIC-CXR
#
# - **One frontal image per study, no laterals.** MIMIC studies often have a lateral view too; the reader
#   filters to PA/AP anyway, but multi-view methods cannot be studied here.
# - **Reports and images were not made together.** The image is drawn *from* the MeSH terms, so it shows
#   what the annotators listed, at a side, zone and severity drawn at random when the term does not say.
#   Text that the terms do not cover (old granulomas the terms missed, degenerative spine, comparison with
#   prior films) has no image counterpart.
# - **IU, not MIMIC, text.** IU reports are outpatient, shorter and more often normal than MIMIC's
#   (mostly inpatient and ICU) reports; `XXXX` replaces MIMIC's `___`.
# - **Labels.** The reader-facing CheXpert table is our labeller's reading of each report, as MIMIC's is
#   the CheXpert labeler's; the two labellers make different mistakes. `synth/labels.csv` is exact, which
#   real data never is.
# - **Anatomy is schematic.** Real lung outlines, but the heart is an ellipse, ribs are regular arcs, lung
#   vessels are a texture, and there is no lateral-view depth, scapula or breast tissue detail beyond a
#   shadow. Findings are textbook-clean. A model can learn *where to look* here; how it transfers to real
#   radiographs is for the real-data profile to show.
# - **Size.** A few thousand studies, not 377,110 images.
#
# The next chapters read this folder with the MIMIC-CXR reader and pretrain on it.
