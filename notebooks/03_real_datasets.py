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
# # Real datasets: formats, bad inputs and a fast image cache
#
# The `full` profile of this book pretrains on MIMIC-CXR-JPG and transfers to CheXpert, RSNA Pneumonia,
# SIIM-ACR, COVIDx and Object-CXR. None of these can be downloaded without credentials, so this chapter
# shows the readers on what *is* available offline, in the exact real formats:
#
# - a **real radiograph**: `RG1_UNCR.dcm` from `pydicom-data`, a PA chest X-ray stored as MONOCHROME1;
# - **MIMIC-style reports** and the choice of training text (impression + findings, as in MGCA);
# - the **offline world** written in the MIMIC-CXR-JPG 2.0.0 layout and read by the real MIMIC reader;
# - the **transfer formats** in miniature (SIIM's run-length masks, Object-CXR's shape strings,
#   label-fraction split files);
# - the **image cache** that makes every epoch after the first skip JPEG decoding.
#
# Every reader returns a table and a `SkipReport`: rows it could not use are counted with their reason
# and file, never dropped silently. To check a real download before a long run:
#
# ```
# python -m mlip_core.data.check --dataset mimic --root /data/mimic-cxr-jpg/2.0.0
# python -m mlip_core.data.check --dataset siim --root /data/siim-acr
# ```
#
# **What you will learn.** How each real dataset's files are read, what happens to bad input, and how the
# image cache saves decoding time.
#
# **What it needs.** Nothing from earlier chapters: the radiograph ships with `pydicom-data`, and the small
# MIMIC-layout world it reads is written here.
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("03_real_datasets"))

# %% tags=["parameters"]
num_studies = 48  # studies in the small world this chapter writes
image_size = 128  # cache / training image side
seed = 0
check_dataset = ""  # optional real dataset to check: mimic, chexpert, rsna, siim, covidx, object-cxr or iu
check_root = ""  # its folder (a real download); both empty: skip

# %%
import contextlib
import io
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pydicom

from mlip_core.data.cache import ImageCache
from mlip_core.data.check import main as check_main
from mlip_core.data.downstream import label_fraction_splits, parse_object_cxr_annotation, rle_decode, rle_encode
from mlip_core.data.images import load_uint8, pydicom_data_path, read_dicom
from mlip_core.data.mimic import load_mimic_pairs
from mlip_core.data.reports import choose_text, parse_sections, split_sentences
from mlip_core.data.synth import write_world
from mlip_core.notebook import setup
from mlip_core.paths import workspace

device = setup(seed)

# %% [markdown]
# ## A real radiograph: polarity and orientation
#
# DICOM stores numbers, not brightness. `PhotometricInterpretation = MONOCHROME1` means *the smallest
# value is white*: shown as stored, air would look bright and bone dark. The reader applies the modality
# LUT, then the VOI window from the header (both with pydicom's own functions), and inverts MONOCHROME1,
# so that every image in this book has air dark and bone bright. `PatientOrientation = [L, F]` says the
# columns run toward the patient's left and the rows toward the feet: the standard PA display, no flip.

# %%
dcm_path = pydicom_data_path("RG1_UNCR.dcm")
ds = pydicom.dcmread(dcm_path)
pd.Series({
    "PhotometricInterpretation": ds.PhotometricInterpretation,
    "BitsStored": ds.BitsStored,
    "Rows x Columns": f"{ds.Rows} x {ds.Columns}",
    "WindowCenter / Width": f"{ds.WindowCenter} / {ds.WindowWidth}",
    "PatientOrientation": list(ds.PatientOrientation),
    "ViewPosition": ds.ViewPosition,
}, name="RG1_UNCR.dcm").to_frame()  # fmt: skip

# %%
display_img = read_dicom(dcm_path)
fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
axes[0].imshow(ds.pixel_array, cmap="gray")
axes[0].set_title("stored values, shown as-is\n(MONOCHROME1: air looks bright)")
axes[1].imshow(display_img, cmap="gray", vmin=0, vmax=255)
axes[1].set_title("read_dicom: window + inversion\n(air dark, bone bright)")
for ax in axes:
    ax.set_xlabel("column (toward patient's left)")
    ax.set_ylabel("row (toward feet)")
plt.show()

# %% [markdown]
# ## Reports: sections and the training text
#
# MIMIC reports are free text with upper-case headers. Following MGCA, the training text is the
# impression followed by the findings; a study whose two sections are both empty is *counted and
# skipped* (MGCA users met about 9,000 such studies in MIMIC-CXR), never a crash. The report below is
# invented.

# %%
report = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 INDICATION:  ___ with cough and fever.
 COMPARISON:  ___.

 FINDINGS:
 Patchy opacity in the left lower lobe. No pleural effusion or pneumothorax.
 Heart size is normal.

 IMPRESSION:
 1. Left lower lobe pneumonia.  2. No effusion.
"""
sections = parse_sections(report)
choice = choose_text(sections)
pd.DataFrame({
    "section": ["indication", "findings", "impression", "training text"],
    "text": [sections.indication, sections.findings, sections.impression, f"[{choice.source}] {choice.text}"],
})  # fmt: skip

# %%
print("sentences:", split_sentences(choice.text))
print("empty report ->", choose_text("FINAL REPORT\n FINDINGS:\n\n IMPRESSION:\n"))

# %% [markdown]
# ## The offline world read by the real MIMIC-CXR-JPG reader
#
# We write a small world (rendered radiographs paired with real IU X-ray reports) in the MIMIC-CXR-JPG
# layout, then read it exactly as a PhysioNet download would be read: split CSV, metadata (frontal PA/AP
# views only), CheXpert-labeler CSV and one `sSTUDY.txt` report per study.

# %%
world = workspace("real_datasets", f"world_{num_studies}_{seed}_{image_size}", create=False)
if not (world / "mimic-cxr-2.0.0-split.csv").exists():
    write_world(world, num_studies=num_studies, seed=seed, image_size=image_size, images_per_study=2)
tables = {}
for split in ("train", "validate", "test"):
    pairs, skips = load_mimic_pairs(world, split=split)
    tables[split] = {"images": len(pairs), "studies": pairs["study_id"].nunique(), "skipped": len(skips),
                     **{f"left out: {k}": v for k, v in skips.filtered.items() if not k.startswith("split")}}
pd.DataFrame(tables).T.fillna(0).astype(int)

# %% [markdown]
# The command-line check prints the same counts, every counted skip, and a last line a script can parse.

# %%
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    check_main(["--dataset", "mimic", "--root", str(world)])
print(buffer.getvalue())

# %% [markdown]
# With `check_dataset` and `check_root` set (for example
# `python -m mlip_core.book --profile full --only 03_real_datasets -p check_dataset=siim -p check_root=/data/siim`),
# the same check runs on a real download here.

# %%
if check_dataset and check_root:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        check_main(["--dataset", check_dataset, "--root", check_root])
    print(buffer.getvalue())
else:
    print("no real dataset given (check_dataset / check_root are empty)")

# %% [markdown]
# ## Transfer formats in miniature
#
# **SIIM-ACR** masks are run-length encoded *column by column*, each run's start counted from the end of
# the previous run; `-1` means no pneumothorax. The string below is the example on the competition's
# data page; our decoder is tested against the competition's own encoder.

# %%
example = "387620 23 996 33 986 43 977 51 968 58 962 65 956 70 952 74 949 76 946 79"
mask = rle_decode(example, 1024, 1024)
rows, cols = np.nonzero(mask)
fig, ax = plt.subplots(figsize=(4, 4))
ax.imshow(mask[rows.min() - 10 : rows.max() + 10, cols.min() - 10 : cols.max() + 10], cmap="gray")
ax.set_title(f"SIIM example RLE: {mask.sum()} pixels in columns {cols.min()}-{cols.max()}")
ax.set_xlabel("column")
ax.set_ylabel("row")
plt.show()
print("re-encoded identically:", rle_encode(mask) == example)

# %% [markdown]
# **Object-CXR** annotates each foreign object as `TYPE x1 y1 ...` with 0 a rectangle, 1 an ellipse
# (both as a bounding box) and 2 a polygon; objects are separated by `;`.

# %%
for kind, coords in parse_object_cxr_annotation("0 120 300 180 350;1 400 410 440 452;2 600 100 640 120 620 170"):
    print(["rectangle", "ellipse", "polygon"][kind], coords.tolist())

# %% [markdown]
# **Label fractions.** Transfer results at 1% / 10% / 100% of the labels are only comparable if every
# method sees the same images, so the samples are written as files. One seeded permutation serves all
# fractions, so the 1% set lies inside the 10% set.

# %%
train_pairs, _ = load_mimic_pairs(world, split="train")
files = label_fraction_splits(train_pairs, workspace("real_datasets", "splits"), "world", seed=seed, id_col="dicom_id")
pd.DataFrame({"file": [p.name for p in files.values()],
              "images": [len(pd.read_csv(p)) for p in files.values()]}, index=list(files))  # fmt: skip

# %% [markdown]
# ## The image cache
#
# Decoding and resizing a JPEG costs far more than copying a ready uint8 array. The cache decodes each
# image once into a memory-mapped file keyed on the files' paths, sizes and modification times, the
# target size and the preprocessing version; any change rebuilds it. `benchmarks/bench_cache.py` measures
# this on large JPEGs; here we time the world's own images.

# %%
paths = train_pairs["image_path"].tolist()
t0 = time.perf_counter()
for p in paths:
    load_uint8(p, image_size)
decode_rate = len(paths) / (time.perf_counter() - t0)
cache = ImageCache(workspace("real_datasets", "cache"), paths, image_size)
t0 = time.perf_counter()
for _ in range(5):
    for i in range(len(cache)):
        cache[i]
cache_rate = 5 * len(cache) / (time.perf_counter() - t0)
pd.DataFrame({"images/s": [decode_rate, cache_rate]}, index=["decode + resize each time", "memory-mapped cache"]).round(0)

# %%
fig, axes = plt.subplots(1, min(4, len(cache)), figsize=(10, 3))
for ax, i in zip(np.atleast_1d(axes), range(len(cache))):
    ax.imshow(cache[i], cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"study {train_pairs['study_id'].iloc[i]}")
    ax.axis("off")
fig.suptitle("cached images (uint8, single channel)")
plt.show()

# %% [markdown]
# **What to take away.** A reader is correct only on the format it was tested against; each reader here
# is tested on fixture trees in the real layout, including the bad inputs a real download contains
# (missing and truncated files, empty reports, unknown label values, wrong headers, duplicate ids), and
# tells you what it left out and why.
