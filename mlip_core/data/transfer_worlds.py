"""Offline *transfer* worlds: rendered radiographs written in the on-disk layouts of CheXpert, SIIM-ACR, RSNA
Pneumonia, COVIDx and Object-CXR, so that the real readers (``mlip_core.data.downstream.load_*``) read them
unchanged, with zero skips.

    python -m mlip_core.data.transfer_worlds --task siim --out DIR --num-images 800 --seed 0 [--image-size 96]

MLIP is judged by transfer to datasets other than its pretraining data. These worlds are rendered apart from the
pretraining world (:mod:`mlip_core.data.synth`): their own seed streams, template findings chosen per task (no
reports), and other patients. Every image draws from its own seeded stream
(``np.random.default_rng([seed, 11, task index, image index, ...])``), so the files are byte-identical for any
number of workers, and ``rerender`` redraws any one image with its masks.

How they differ from the real datasets (all of them):

- Images are square and small (``image_size``, 64-96 px in the book), one frontal view per study, drawn by
  :mod:`mlip_core.data.synth_render`; the real ones are 320-3000 px, with lateral views in CheXpert.
- Labels, masks and boxes are exact: they are what was drawn (masks and boxes come from the renderer's
  instances), not a labeler's reading of a report nor an annotator's outline.
- Prevalences are raised so that small worlds hold enough positives to measure (pneumothorax about 0.4 in SIIM,
  lung opacity about 0.35 in RSNA, devices in about half of Object-CXR), and the test splits of CheXpert and
  COVIDx hold ``min_test_positives`` of every scored label or class by construction.
- The DICOMs (SIIM, RSNA) are uncompressed 8-bit MONOCHROME2 with a full-range window (centre 128, width 256),
  so the reader returns the rendered pixels unchanged; real SIIM DICOMs hold baseline JPEG, RSNA's are
  uncompressed. UIDs are deterministic (pydicom's ``generate_uid`` from the seed and image index).

The worlds and their layouts (``DIR`` is ``out_dir``):

chexpert
    ``DIR/CheXpert-v1.0-small/{train,valid}.csv`` (Path,Sex,Age,Frontal/Lateral,AP/PA,<14 labels>) and
    ``DIR/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyK/view1_frontal.jpg`` (grayscale JPEG).
    Findings from :data:`TRANSFER_PRIOR` (every CheXpert finding frequent). Labels: 1.0
    drawn; in ``train.csv`` a drawn finding flagged uncertain is -1.0 (CheXpert's train labels come from a
    labeler) and an absent one is blank ("not mentioned"); ``valid.csv`` (radiologist-labelled in CheXpert)
    has only 1.0 and 0.0. "No Finding" is 1.0 when nothing but support devices is drawn. ``valid.csv`` is the
    fixed test split: it holds >= ``min_test_positives`` of each competition finding (Atelectasis,
    Cardiomegaly, Consolidation, Edema, Pleural Effusion), the shortfall of the prior's draws added to test
    images that lack the finding (one added finding per image at most). 1-3 studies per patient; a patient's
    studies are all in one split.
siim
    ``DIR/train-rle.csv`` (header ``ImageId, EncodedPixels``; one row per pneumothorax instance, Kaggle's
    column-major relative RLE of the instance mask; `` -1`` for none) and
    ``DIR/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm``. About 40% of images have
    a pneumothorax (12% of those on both sides: two rows); other findings from ``reportgen.PRIOR``. SIIM has no
    official split, so ``DIR/mlip-transfer-split.csv`` (ImageId,split: train/validate/test, 70/15/15 by
    PatientID; 1-3 images per patient) is written beside it; the reader ignores it.
rsna
    ``DIR/stage_2_train_labels.csv`` (patientId,x,y,width,height,Target: one row per box; a blank box and
    Target 0 for negatives), ``DIR/stage_2_detailed_class_info.csv`` (patientId,class: "Lung Opacity",
    "No Lung Opacity / Not Normal", "Normal") and ``DIR/stage_2_train_images/<patientId>.dcm``. Boxes are the
    bounding boxes of the drawn opacity, consolidation and pneumonia instances (1-2 per positive image, about
    35% positive); "Normal" images have nothing drawn, "Not Normal" ones other findings. One image per
    patientId, as in RSNA; ``DIR/mlip-transfer-split.csv`` (patientId,split) 70/15/15.
covidx
    ``DIR/{train,val,test}.txt`` ("patient_id filename label source" lines, source ``mlip``) and images in
    ``DIR/{train,val,test}/<filename>.png``. Three exclusive classes, one per patient: ``normal`` (no lung
    finding), ``pneumonia`` (one unilateral lobar consolidation or pneumonia) and ``COVID-19``. The renderer has
    no COVID-19 pattern; the stand-in is the closest it draws: 2-4 hazy "opacity" findings (the renderer's
    low-density, ground-glass-like opacity), on both sides, in the middle and lower zones. They are not
    specifically peripheral (the renderer places a zone's opacity anywhere across the lung's width). All three
    classes share one background of non-lung findings (devices, cardiomegaly, fractures, ...), so the lungs
    alone tell the class apart. Classes about 40/30/30; the test split holds >= ``min_test_positives`` images
    of each class; 1-3 images per patient, patient-level splits.
object_cxr
    ``DIR/{train,dev}.csv`` (image_name,annotation: ``0 x0 y0 x1 y1`` rectangles joined by ``;``, blank for
    none; x1, y1 exclusive) and images ``DIR/{train,dev}/NNNNN.jpg``. The objects are the drawn support devices
    (ETT, enteric tube, central line, pacemaker, sternotomy wires; 1-3 in about half the images), boxed from
    their instance masks; real Object-CXR annotates foreign objects (buttons, jewellery, implants) as boxes,
    ellipses and polygons. ECG leads are left out of this world (they are metal the labels would not name).

Every world records its parameters and every file it wrote in ``DIR/mlip-transfer-manifest.json``.
``ensure_transfer_world`` reuses a world written with the same parameters, replaces one this project wrote
(removing only the files its manifest names) and refuses any other non-empty folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mlip_core.data.downstream import TRANSFER_SPLIT_FILE
from mlip_core.data.manifest import Layout, finish_write, read_manifest, remove_written, reuse_or_clear, start_write
from mlip_core.data.reportgen import PRIOR, sample_findings
from mlip_core.data.synth_findings import DEVICE_KINDS, FINDING_TO_CHEXPERT, Finding
from mlip_core.data.synth_render import Patient, Rendered, render, sample_patient, sample_scene

__all__ = ["TRANSFER_PRIOR", "TRANSFER_TASKS", "TransferWorldSummary", "write_transfer_world", "ensure_transfer_world",
           "remove_transfer_world", "transfer_world_parameters", "rerender", "main",
           "MANIFEST_NAME", "SPLIT_FILE", "COMPETITION_FINDINGS"]

# Findings of the CheXpert-layout world (rendered apart from the pretraining world, as CheXpert is apart from
# MIMIC-CXR): template studies with every finding frequent enough that a test split of a few hundred images holds
# >= 50 positives of each scored label (pneumonia at 0.06 gave 40 of 649 test images in the ci world).
TRANSFER_PRIOR: dict[str, float] = {
    "cardiomegaly": 0.16, "effusion": 0.14, "opacity": 0.14, "consolidation": 0.12, "pneumonia": 0.09,
    "atelectasis": 0.14, "nodule": 0.08, "mass": 0.06, "pneumothorax": 0.14, "edema": 0.12, "fracture": 0.12,
    "device": 0.12, "granuloma": 0.04, "enlarged_cardiomediastinum": 0.12, "pleural_thickening": 0.1,
    "hyperinflation": 0.04, "hypoinflation": 0.04, "scoliosis": 0.03, "elevated_diaphragm": 0.02,
}

TRANSFER_TASKS = ("chexpert", "siim", "rsna", "covidx", "object_cxr")
TRANSFER_WORLD_VERSION = 1
MANIFEST_NAME = "mlip-transfer-manifest.json"
SPLIT_FILE = TRANSFER_SPLIT_FILE  # the patient-level split of SIIM / RSNA worlds, read by dataset_splits
# The five CheXpert competition findings, as renderer findings (-> CheXpert column via FINDING_TO_CHEXPERT).
COMPETITION_FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion")
RSNA_CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")

_TASK_INDEX = {t: i for i, t in enumerate(TRANSFER_TASKS)}
# What each world creates at the top of out_dir: the only names its manifest may list.
_WORLD_PATHS: dict[str, tuple[str, ...]] = {
    "chexpert": ("CheXpert-v1.0-small",),
    "siim": ("train-rle.csv", "dicom-images-train", SPLIT_FILE),
    "rsna": ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv", "stage_2_train_images", SPLIT_FILE),
    "covidx": ("train.txt", "val.txt", "test.txt", "train", "val", "test"),
    "object_cxr": ("train.csv", "dev.csv", "train", "dev"),
}
# A transfer world owns its folder: anything else there is refused, never written beside.
TRANSFER = Layout(MANIFEST_NAME, tuple(dict.fromkeys(p for paths in _WORLD_PATHS.values() for p in paths)),
                  what="transfer world", ensure="ensure_transfer_world", exclusive=True,
                  hint="Pass an empty or new folder for the transfer world (or delete that folder's contents "
                       "yourself).")
# (train, validation or None, test) split names; default validation and test fractions (test None: automatic).
_SPLIT_NAMES: dict[str, tuple[str, str | None, str]] = {
    "chexpert": ("train", None, "valid"), "siim": ("train", "validate", "test"),
    "rsna": ("train", "validate", "test"), "covidx": ("train", "val", "test"), "object_cxr": ("train", None, "dev"),
}
_VAL_FRACTION = {"chexpert": 0.0, "siim": 0.15, "rsna": 0.15, "covidx": 0.1, "object_cxr": 0.0}
_TEST_FRACTION = {"chexpert": 0.25, "siim": 0.15, "rsna": 0.15, "covidx": 0.2, "object_cxr": 0.2}
_MULTI_STUDY = {"chexpert", "siim", "covidx"}  # 1-3 images per patient; RSNA and Object-CXR: one

# Background findings (other than the task's target) of the SIIM, RSNA and Object-CXR worlds.
_SIIM_BACKGROUND = {k: v for k, v in PRIOR.items() if k != "pneumothorax"}
_OPACITY_FINDINGS = ("opacity", "consolidation", "pneumonia")
_RSNA_BACKGROUND = {k: v for k, v in PRIOR.items() if k not in _OPACITY_FINDINGS}
_OBJECT_BACKGROUND = {k: v for k, v in PRIOR.items() if k != "device"}
# COVIDx: the same non-lung background in every class, so that only the lungs tell the classes apart.
_COVIDX_BACKGROUND = {"cardiomegaly": 0.06, "device": 0.08, "fracture": 0.03, "scoliosis": 0.03,
                      "hyperinflation": 0.03, "hypoinflation": 0.05, "enlarged_cardiomediastinum": 0.03}
_COVIDX_CLASS_P = (0.4, 0.3, 0.3)
_SEVERITIES = ("mild", "moderate", "severe")


@dataclass
class TransferWorldSummary:
    """What ``write_transfer_world`` wrote: images and patients, images per split, positive images per label or
    class per split (``positives[label][split]``), drawn instances (masks, boxes) and the seconds it took."""

    task: str
    out_dir: str
    images: int
    patients: int
    splits: dict[str, int]
    positives: dict[str, dict[str, int]]
    instances: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        names = list(self.splits)
        width = max([len(k) for k in self.positives] + [8])
        lines = [f"wrote the {self.task} transfer world: {self.images} images of {self.patients} patients to "
                 f"{self.out_dir} in {self.seconds:.1f} s",
                 f"  images per split: {self.splits}",
                 f"  {'positives':<{width}s}  " + "  ".join(f"{n:>8s}" for n in names)]
        for label, per in self.positives.items():
            lines.append(f"  {label:<{width}s}  " + "  ".join(f"{per.get(n, 0):>8d}" for n in names))
        if self.instances:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in self.instances.items()))
        return "\n".join(lines)


@dataclass
class _Item:
    """One image to render: its global ``index`` (its seed stream), patient, split, findings and file name."""

    index: int
    patient: int
    study: int
    split: str
    anatomy: Patient
    findings: tuple[Finding, ...]
    name: str = ""
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ planning
def _check_task(task: str) -> None:
    if task not in TRANSFER_TASKS:
        raise ValueError(f"unknown transfer task {task!r}; choose from {', '.join(TRANSFER_TASKS)}")


def _split_sizes(task: str, num_images: int, min_test_positives: int,
                 test_fraction: float | None) -> tuple[int, int]:
    """(test images, validation images) wanted; ValueError when the world is too small for them."""
    need = {"chexpert": 5 * min_test_positives, "covidx": 3 * min_test_positives}.get(task, 0)
    what = {"chexpert": "valid.csv (the fixed test split) must hold >= {k} positives of each of the 5 competition "
                        "findings by construction, which takes >= {need} valid images",
            "covidx": "test.txt must hold >= {k} images of each of the 3 classes, which takes >= {need} test "
                      "images"}.get(task, "").format(k=min_test_positives, need=need)
    if test_fraction is None:
        n_test = max(round(_TEST_FRACTION[task] * num_images), need)
        if need and n_test > num_images // 2:
            raise ValueError(f"num_images={num_images} is too small for a {task} world with min_test_positives="
                             f"{min_test_positives}: {what}, at most half the world; use num_images >= {2 * need} "
                             "or a smaller min_test_positives")
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = round(test_fraction * num_images)
        if n_test < need:
            raise ValueError(f"num_images={num_images} is too small for a {task} world with min_test_positives="
                             f"{min_test_positives} and test_fraction={test_fraction} ({n_test} test images): "
                             f"{what}; use num_images >= {math.ceil(need / test_fraction)}, a larger test_fraction "
                             "or a smaller min_test_positives")
    n_test = max(n_test, 1)
    n_val = round(_VAL_FRACTION[task] * num_images)
    if n_test + n_val >= num_images:
        raise ValueError(f"num_images={num_images} leaves no training images for a {task} world with {n_test} test "
                         f"and {n_val} validation images; use more images or a smaller test_fraction")
    return n_test, n_val


def _one(rng: np.random.Generator, name: str, **fixed) -> list[Finding]:
    """One finding called ``name`` with side, zone and severity drawn as ``sample_findings`` draws them
    (an effusion may come with its other side), then ``fixed`` attributes imposed."""
    found = sample_findings(rng, {name: 1.0}, uncertain_prob=0.0)
    return [replace(f, **fixed) for f in found] if fixed else found


def _findings(task: str, rng: np.random.Generator, cls: int | None) -> tuple[list[Finding], dict]:
    """Draw one image's findings for ``task`` (``cls``: the COVIDx class of its patient); returns them and
    what the plan meant to draw (for the record; the labels come from what is drawn)."""
    if task == "chexpert":
        return sample_findings(rng, TRANSFER_PRIOR), {}
    if task == "siim":
        found = sample_findings(rng, _SIIM_BACKGROUND)
        if rng.random() < 0.4:
            side = str(rng.choice(["right", "left"]))
            sides = [side, "left" if side == "right" else "right"] if rng.random() < 0.12 else [side]
            for s in sides:
                sev = str(rng.choice(_SEVERITIES, p=[0.4, 0.35, 0.25]))
                found.append(Finding("pneumothorax", side=s, severity=sev))
        return found, {}
    if task == "rsna":
        u = rng.random()
        if u < 0.3:  # Normal: nothing drawn
            return [], {"intended": "Normal"}
        found = sample_findings(rng, _RSNA_BACKGROUND)
        if u < 0.65:
            side = str(rng.choice(["right", "left"]))
            sides = [side, "left" if side == "right" else "right"] if rng.random() < 0.45 else [side]
            for s in sides:
                name = str(rng.choice(_OPACITY_FINDINGS, p=[0.4, 0.25, 0.35]))
                zone = str(rng.choice(["upper", "middle", "lower"], p=[0.2, 0.3, 0.5]))
                sev = str(rng.choice(_SEVERITIES, p=[0.3, 0.45, 0.25]))
                found.append(Finding(name, side=s, zone=zone, severity=sev))
            return found, {"intended": "Lung Opacity"}
        if not found:  # Not Normal: at least one other finding
            names = list(_RSNA_BACKGROUND)
            p = np.array([_RSNA_BACKGROUND[n] for n in names])
            found = _one(rng, str(rng.choice(names, p=p / p.sum())))
        return found, {"intended": "No Lung Opacity / Not Normal"}
    if task == "covidx":
        found = sample_findings(rng, _COVIDX_BACKGROUND)
        if cls == 1:  # pneumonia: one unilateral lobar consolidation / pneumonia
            name = str(rng.choice(["pneumonia", "consolidation"], p=[0.6, 0.4]))
            found.append(Finding(name, side=str(rng.choice(["right", "left"])),
                                 zone=str(rng.choice(["lower", "middle", "upper"], p=[0.5, 0.3, 0.2])),
                                 severity=str(rng.choice(_SEVERITIES, p=[0.2, 0.5, 0.3]))))
        elif cls == 2:  # COVID-19 stand-in: bilateral hazy opacities, middle and lower zones
            for side in ("right", "left"):
                zones = ["lower", "middle"] if rng.random() < 0.5 else [str(rng.choice(["lower", "middle"],
                                                                                      p=[0.65, 0.35]))]
                for z in zones:
                    found.append(Finding("opacity", side=side, zone=z,
                                         severity=str(rng.choice(_SEVERITIES, p=[0.35, 0.45, 0.2]))))
        return found, {}
    # object_cxr
    found = sample_findings(rng, _OBJECT_BACKGROUND)
    if rng.random() < 0.5:
        n = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        for kind in rng.choice(DEVICE_KINDS, size=n, replace=False):
            found.append(Finding("device", kind=str(kind)))
    return found, {}


def _fill(order: np.ndarray, sizes: list[int], n_test: int, n_val: int,
          names: tuple[str, str | None, str]) -> list[str]:
    """Patients in ``order`` fill the test split to ``n_test`` images, then validation to ``n_val``, then train."""
    split = [names[0]] * len(sizes)
    n_t = n_v = 0
    for p in order:
        if n_t < n_test:
            split[p], n_t = names[2], n_t + sizes[p]
        elif names[1] is not None and n_v < n_val:
            split[p], n_v = names[1], n_v + sizes[p]
    return split


def _plan(task: str, num_images: int, seed: int, min_test_positives: int,
          test_fraction: float | None) -> list[_Item]:
    """Every image's patient, split, findings and name, deterministically from ``seed`` (no rendering)."""
    _check_task(task)
    t = _TASK_INDEX[task]
    n_test, n_val = _split_sizes(task, num_images, min_test_positives, test_fraction)
    names = _SPLIT_NAMES[task]
    rng = np.random.default_rng([seed, 10, t])
    sizes: list[int] = []
    if task in _MULTI_STUDY:
        while sum(sizes) < num_images:
            sizes.append(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])))
        sizes[-1] -= sum(sizes) - num_images
    else:
        sizes = [1] * num_images
    anatomy = [sample_patient(rng) for _ in sizes]
    ages = rng.integers(18, 91, size=len(sizes))
    classes = rng.choice(3, size=len(sizes), p=_COVIDX_CLASS_P) if task == "covidx" else None
    order = rng.permutation(len(sizes))
    k = min_test_positives
    if task == "covidx":
        test_count = [0, 0, 0]  # test images per class: a patient joins test while its class is short of k
        split = [names[0]] * len(sizes)
        n_t = n_v = 0
        for p in order:
            if n_t < n_test or test_count[classes[p]] < k:
                split[p], n_t = names[2], n_t + sizes[p]
                test_count[classes[p]] += sizes[p]
            elif n_v < n_val:
                split[p], n_v = names[1], n_v + sizes[p]
        if min(test_count) < k:
            short = [COVIDX_CLASSES[c] for c in range(3) if test_count[c] < k]
            raise ValueError(f"num_images={num_images} is too small for a covidx world with min_test_positives={k}: "
                             f"the world has fewer than {k} images of {', '.join(short)} for the test split; use more "
                             "images or a smaller min_test_positives")
    else:
        split = _fill(order, sizes, n_test, n_val, names)
    if names[0] not in split:
        raise ValueError(f"num_images={num_images} leaves no training images for a {task} world; use more images "
                         "or a smaller test_fraction")

    items: list[_Item] = []
    i = 0
    for p, size in enumerate(sizes):
        for s in range(size):
            frng = np.random.default_rng([seed, 11, t, i, 0])
            found, meta = _findings(task, frng, None if classes is None else int(classes[p]))
            meta.update(age=int(ages[p]) + s, sex="Female" if anatomy[p].female else "Male")
            if classes is not None:
                meta["label"] = COVIDX_CLASSES[int(classes[p])]
            items.append(_Item(index=i, patient=p, study=s + 1, split=split[p], anatomy=anatomy[p],
                               findings=tuple(found), meta=meta))
            i += 1

    if task == "chexpert" and k > 0:  # top up valid.csv to k positives of each competition finding
        test = [it for it in items if it.split == names[2]]
        perm = [test[j] for j in rng.permutation(len(test))]
        forced: set[int] = set()
        for name in COMPETITION_FINDINGS:
            col = FINDING_TO_CHEXPERT[name]
            have = sum(any(f.chexpert == col for f in it.findings) for it in test)
            for it in perm:
                if have >= k:
                    break
                if it.index in forced or any(f.chexpert == col for f in it.findings):
                    continue
                it.findings = it.findings + tuple(_one(np.random.default_rng([seed, 11, t, it.index, 2]), name))
                it.meta["forced"] = name
                forced.add(it.index)
                have += 1
            if have < k:  # cannot happen when valid holds >= 5k images (checked in _split_sizes)
                raise ValueError(f"could not place {k} {col} positives in valid.csv; use more images")
    _name_items(task, items, seed, rng)
    return items


def _uid(seed: int, task: str, i: int, what: str) -> str:
    """A deterministic DICOM UID (pydicom's root + a hash of the world, image and element)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["mlip-transfer-world", task, str(seed), str(i), what]))


def _name_items(task: str, items: list[_Item], seed: int, rng: np.random.Generator) -> None:
    """Give every image its file name / id, patients numbered split by split (train first), as the real ones."""
    names = _SPLIT_NAMES[task]
    order = [n for n in (names[0], names[1], names[2]) if n is not None]
    patients = sorted({(order.index(it.split), it.patient) for it in items})
    number = {p: j + 1 for j, (_, p) in enumerate(patients)}
    if task == "chexpert":
        for it in items:
            it.name = (f"CheXpert-v1.0-small/{it.split}/patient{number[it.patient]:05d}/study{it.study}/"
                       "view1_frontal.jpg")
    elif task == "siim":
        pid = {p: str(uuid.UUID(bytes=rng.bytes(16), version=4)) for p in sorted(number)}
        for it in items:
            it.name = _uid(seed, task, it.index, "sop")
            it.meta.update(patient_id=pid[it.patient], study_uid=_uid(seed, task, it.index, "study"),
                           series_uid=_uid(seed, task, it.index, "series"))
    elif task == "rsna":
        for it in items:
            it.name = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            it.meta.update(study_uid=_uid(seed, task, it.index, "study"),
                           series_uid=_uid(seed, task, it.index, "series"), sop_uid=_uid(seed, task, it.index, "sop"))
    elif task == "covidx":
        for it in items:
            it.meta["patient_id"] = str(100000 + number[it.patient])
            it.name = f"mlip-{number[it.patient]:05d}-{it.study}.png"
    else:
        for it in items:
            it.name = f"{number[it.patient]:05d}.jpg"


# ----------------------------------------------------------------------------------------------- rendering
def _draw(task: str, item: _Item, seed: int, image_size: int) -> tuple[str, Rendered]:
    """Render one image from its own scene stream; returns its view (PA / AP) and the rendering."""
    rng = np.random.default_rng([seed, 11, _TASK_INDEX[task], item.index, 1])
    scene = sample_scene(rng, item.anatomy, item.findings, size=image_size)
    if task == "object_cxr":
        scene = replace(scene, ecg_leads=0)  # unlabelled metal would contradict the object labels
    return scene.view, render(scene)


def rerender(task: str, num_images: int, seed: int, index: int, image_size: int = 96, min_test_positives: int = 50,
             test_fraction: float | None = None) -> Rendered:
    """Render image ``index`` of the world these arguments write, with its instance masks: the exact pixels the
    world holds (DICOM, PNG; JPEG before compression). ``index`` counts images in plan order (patient by patient),
    the order of the rows of SIIM's and RSNA's ``mlip-transfer-split.csv``."""
    items = _plan(task, num_images, seed, min_test_positives, test_fraction)
    return _draw(task, items[index], seed, image_size)[1]


def _jpeg(path: Path, image: np.ndarray, quality: int = 95) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _write_dicom(path: Path, image: np.ndarray, meta: dict, sop_uid: str, patient_id: str, view: str) -> None:
    """An uncompressed 8-bit MONOCHROME2 Secondary Capture DICOM with a full-range window (read back exactly)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = meta["study_uid"]
    ds.SeriesInstanceUID = meta["series_uid"]
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientSex = "F" if meta["sex"] == "Female" else "M"
    ds.PatientAge = f"{min(meta['age'], 999):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.SeriesDescription = f"view: {view}"
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = [f"{0.139 * 1024 / image.shape[0]:.6g}"] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.4
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _work(task: str, item: _Item, out: str, image_size: int, seed: int) -> dict:
    """Render and write one image; return its rows and label facts (runs in a worker process)."""
    from mlip_core.data.downstream import CHEXPERT_CSV_LABELS, rle_encode

    root = Path(out)
    view, res = _draw(task, item, seed, image_size)
    if task == "chexpert":
        _jpeg(root / item.name, res.image)
        valid = item.split == "valid"
        values: dict[str, float | None] = {c: (0.0 if valid else None) for c in CHEXPERT_CSV_LABELS}
        for f in item.findings:
            col = f.chexpert
            if col is None:
                continue
            v = -1.0 if (f.uncertain and not valid) else 1.0
            if values[col] != 1.0:
                values[col] = v
        pathology = [c for c in CHEXPERT_CSV_LABELS if c not in ("No Finding", "Support Devices")]
        values["No Finding"] = 1.0 if not any(values[c] in (1.0, -1.0) for c in pathology) else (
            0.0 if valid else None)
        row = [item.name, item.meta["sex"], item.meta["age"], "Frontal", view] + [_label(values[c])
                                                                                for c in CHEXPERT_CSV_LABELS]
        pos = [c for c in CHEXPERT_CSV_LABELS if values[c] == 1.0]
        unc = [c for c in CHEXPERT_CSV_LABELS if values[c] == -1.0]
        return {"row": row, "positives": pos, "instances": {"uncertain (-1.0) labels": len(unc)}}
    if task == "siim":
        path = root / "dicom-images-train" / item.meta["study_uid"] / item.meta["series_uid"] / f"{item.name}.dcm"
        _write_dicom(path, res.image, item.meta, item.name, item.meta["patient_id"], view)
        rles = [rle_encode(inst.mask) for inst in res.instances if inst.finding.name == "pneumothorax"]
        rows = [[item.name, " " + r] for r in rles] or [[item.name, " -1"]]
        return {"rows": rows, "split_row": [item.name, item.split],
                "positives": ["pneumothorax"] if rles else [], "instances": {"pneumothorax masks": len(rles)}}
    if task == "rsna":
        _write_dicom(root / "stage_2_train_images" / f"{item.name}.dcm", res.image, item.meta,
                     item.meta["sop_uid"], item.name, view)
        boxes = [inst.box for inst in res.instances if inst.finding.name in _OPACITY_FINDINGS]
        rows = [[item.name, f"{x0:.1f}", f"{y0:.1f}", f"{x1 - x0:.1f}", f"{y1 - y0:.1f}", 1]
                for x0, y0, x1, y1 in boxes] or [[item.name, "", "", "", "", 0]]
        cls = RSNA_CLASSES[0] if boxes else (RSNA_CLASSES[1] if item.findings else RSNA_CLASSES[2])
        return {"rows": rows, "class_row": [item.name, cls], "split_row": [item.name, item.split],
                "positives": [cls], "instances": {"boxes": len(boxes)}}
    if task == "covidx":
        path = root / item.split / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(res.image).save(path, format="PNG", optimize=False, compress_level=6)
        label = item.meta["label"]
        return {"line": f"{item.meta['patient_id']} {item.name} {label} mlip", "positives": [label],
                "instances": {}}
    # object_cxr
    _jpeg(root / item.split / item.name, res.image)
    boxes = [inst.box for inst in res.instances if inst.finding.name == "device"]
    anno = ";".join(f"0 {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in boxes)
    return {"row": [item.name, anno], "positives": ["object"] if boxes else [], "instances": {"boxes": len(boxes)}}


# ------------------------------------------------------------------------------------------------- writing
def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _parameters(task: str, num_images: int, seed: int, image_size: int, min_test_positives: int,
                test_fraction: float | None) -> dict:
    """What the world's bytes depend on (recorded in the manifest; ``ensure_transfer_world`` compares it)."""
    return {"world_version": TRANSFER_WORLD_VERSION, "task": task, "num_images": int(num_images), "seed": int(seed),
            "image_size": int(image_size),
            "min_test_positives": int(min_test_positives) if task in ("chexpert", "covidx") else None,
            "test_fraction": None if test_fraction is None else float(test_fraction)}


def _validate(task: str, num_images: int, image_size: int, min_test_positives: int, workers: int) -> None:
    _check_task(task)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 16 <= image_size <= 4096:
        raise ValueError(f"image_size must be in [16, 4096], got {image_size}")
    if min_test_positives < 0:
        raise ValueError(f"min_test_positives must be >= 0, got {min_test_positives}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def write_transfer_world(task: str, out_dir: str | os.PathLike, num_images: int, seed: int, image_size: int = 96,
                         workers: int = 1, progress: bool = False, min_test_positives: int = 50,
                         test_fraction: float | None = None) -> TransferWorldSummary:
    """Render the ``task`` transfer world (one of :data:`TRANSFER_TASKS`) into ``out_dir`` in that dataset's
    layout (see the module docstring); ``out_dir`` must be empty or absent.

    ``min_test_positives``: CheXpert's ``valid.csv`` holds at least this many positives of each competition
    finding, COVIDx's ``test.txt`` this many images of each class (ValueError when ``num_images`` is too small).
    ``test_fraction``: the test split's share of images (default: 0.25 for CheXpert and 0.2 for COVIDx, raised to
    what ``min_test_positives`` needs, at most half; 0.15 for SIIM and RSNA, with as many validation images;
    0.2 for Object-CXR's ``dev``). ``workers`` > 1 renders in processes; the files are identical.
    """
    t0 = time.perf_counter()
    _validate(task, num_images, image_size, min_test_positives, workers)
    out = Path(out_dir)
    items = _plan(task, num_images, seed, min_test_positives, test_fraction)  # ValueErrors before any write
    params = _parameters(task, num_images, seed, image_size, min_test_positives, test_fraction)
    manifest = start_write(out, TRANSFER, _WORLD_PATHS[task], task=task, parameters=params)

    args = (str(out), image_size, seed)
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        iterator = pool.map(_work, [task] * len(items), items, *[[a] * len(items) for a in args], chunksize=16)
    else:
        iterator = (_work(task, it, *args) for it in items)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(items), desc=f"rendering the {task} world")
    try:
        results = list(iterator)
    finally:
        if pool is not None:
            pool.shutdown()

    names = [n for n in _SPLIT_NAMES[task] if n is not None]
    names = [names[0]] + [n for n in names[1:] if n != names[0]]
    splits = {n: sum(it.split == n for it in items) for n in names}
    positives: dict[str, dict[str, int]] = {}
    instances: dict[str, int] = {}
    label_order = {"chexpert": None, "siim": ["pneumothorax"], "rsna": list(RSNA_CLASSES),
                   "covidx": list(COVIDX_CLASSES), "object_cxr": ["object"]}[task]
    if label_order is None:
        from mlip_core.data.downstream import CHEXPERT_CSV_LABELS

        label_order = list(CHEXPERT_CSV_LABELS)
    for label in label_order:
        positives[label] = {n: 0 for n in names}
    for it, r in zip(items, results):
        for label in r["positives"]:
            positives[label][it.split] += 1
        for key, v in r["instances"].items():
            instances[key] = instances.get(key, 0) + v

    if task == "chexpert":
        from mlip_core.data.downstream import CHEXPERT_CSV_LABELS

        header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CSV_LABELS]
        base = out / "CheXpert-v1.0-small"
        for split in ("train", "valid"):
            _write_csv(base / f"{split}.csv", header, [r["row"] for it, r in zip(items, results) if it.split == split])
    elif task == "siim":
        lines = ["ImageId, EncodedPixels"] + [f"{a},{b}" for r in results for a, b in r["rows"]]
        (out / "train-rle.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _write_csv(out / SPLIT_FILE, ["ImageId", "split"], [r["split_row"] for r in results])
    elif task == "rsna":
        _write_csv(out / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
                   [row for r in results for row in r["rows"]])
        _write_csv(out / "stage_2_detailed_class_info.csv", ["patientId", "class"],
                   [r["class_row"] for r in results])
        _write_csv(out / SPLIT_FILE, ["patientId", "split"], [r["split_row"] for r in results])
    elif task == "covidx":
        for split in names:
            (out / split).mkdir(exist_ok=True)
            lines = [r["line"] for it, r in zip(items, results) if it.split == split]
            (out / f"{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        for split in names:
            (out / split).mkdir(exist_ok=True)
            _write_csv(out / f"{split}.csv", ["image_name", "annotation"],
                       [r["row"] for it, r in zip(items, results) if it.split == split])

    summary = TransferWorldSummary(task=task, out_dir=str(out), images=len(items),
                                   patients=len({it.patient for it in items}), splits=splits, positives=positives,
                                   instances=instances)
    recorded = {k: v for k, v in asdict(summary).items() if k not in ("out_dir", "seconds")}  # path-free
    finish_write(out, TRANSFER, manifest, summary=recorded)
    summary.seconds = time.perf_counter() - t0
    return summary


def transfer_world_parameters(out_dir: str | os.PathLike) -> dict | None:
    """The parameters recorded in ``out_dir``'s manifest, or None when it holds no complete transfer world."""
    try:
        manifest = read_manifest(out_dir, TRANSFER)
    except FileExistsError:
        return None
    if manifest is None or not manifest.get("complete"):
        return None
    return manifest.get("parameters")


def remove_transfer_world(out_dir: str | os.PathLike) -> int:
    """Remove the transfer world in ``out_dir``: exactly the files its manifest lists, then the folders they leave
    empty, then the manifest (:func:`mlip_core.data.manifest.remove_written`). Anything else stays. A non-empty
    folder without a manifest is refused (``FileExistsError``). Returns the number of files removed."""
    return remove_written(out_dir, TRANSFER)


def ensure_transfer_world(task: str, out_dir: str | os.PathLike, num_images: int, seed: int, image_size: int = 96,
                          workers: int = 1, progress: bool = False, min_test_positives: int = 50,
                          test_fraction: float | None = None) -> tuple[TransferWorldSummary, bool]:
    """Write the ``task`` world into ``out_dir`` unless it already holds one made with the same parameters.

    Returns (summary, whether it was written); a reused world's summary is read from its manifest (seconds 0).
    A world this project wrote with other parameters is removed first, only the files its manifest lists. A
    non-empty folder without the manifest (a real dataset, say) is refused with ``FileExistsError``, untouched.
    """
    _validate(task, num_images, image_size, min_test_positives, workers)
    _split_sizes(task, num_images, min_test_positives, test_fraction)  # too small: fail before removing anything
    out = Path(out_dir)
    wanted = _parameters(task, num_images, seed, image_size, min_test_positives, test_fraction)
    reused = reuse_or_clear(out, TRANSFER, lambda m: m.get("parameters") == wanted and "summary" in m)
    if reused is not None:
        return TransferWorldSummary(out_dir=str(out), **reused["summary"]), False
    summary = write_transfer_world(task, out, num_images, seed, image_size=image_size, workers=workers,
                                   progress=progress, min_test_positives=min_test_positives,
                                   test_fraction=test_fraction)
    return summary, True


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: write (or reuse) one transfer world and print its summary."""
    ap = argparse.ArgumentParser(prog="python -m mlip_core.data.transfer_worlds",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=TRANSFER_TASKS)
    ap.add_argument("--out", required=True, help="output folder (empty, or a transfer world this project wrote)")
    ap.add_argument("--num-images", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--min-test-positives", type=int, default=50)
    ap.add_argument("--test-fraction", type=float, default=None)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        summary, written = ensure_transfer_world(a.task, a.out, a.num_images, a.seed, image_size=a.image_size,
                                                 workers=a.workers, progress=a.progress,
                                                 min_test_positives=a.min_test_positives,
                                                 test_fraction=a.test_fraction)
    except (FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not written:
        print(f"reused the {a.task} transfer world in {a.out} (same parameters; nothing rewritten)")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
