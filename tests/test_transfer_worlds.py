"""The offline transfer worlds: each real reader reads its world whole (zero skips), the labels, masks and boxes
are what was drawn, splits are patient-level, CheXpert / COVIDx test splits hold enough positives by
construction, the files do not depend on the number of workers, and a foreign folder is never touched."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from mlip_core.data import check
from mlip_core.data.downstream import (CHEXPERT_5, CHEXPERT_CSV_LABELS, load_chexpert, load_covidx,
                                       load_object_cxr, load_rsna, load_siim, parse_object_cxr_annotation,
                                       rle_decode, rle_encode)
from mlip_core.data.images import read_image
from mlip_core.data.transfer_worlds import (COVIDX_CLASSES, MANIFEST_NAME, RSNA_CLASSES, SPLIT_FILE, TRANSFER_TASKS,
                                            _plan, ensure_transfer_world, main, remove_transfer_world, rerender,
                                            write_transfer_world)
from mlip_core.paths import repo_root

K = 5  # min_test_positives in these small worlds
WORLDS = {  # task: (num_images, image_size, seed)
    "chexpert": (60, 48, 1), "siim": (40, 48, 2), "rsna": (40, 48, 3), "covidx": (50, 48, 4), "object_cxr": (40, 48, 5),
}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict:
    """Each task's world, rendered once: {task: (folder, summary)}."""
    out = {}
    for task, (n, size, seed) in WORLDS.items():
        root = tmp_path_factory.mktemp(task)
        out[task] = (root, write_transfer_world(task, root, n, seed, image_size=size, min_test_positives=K))
    return out


# ----------------------------------------------------------------------------------------------------- CheXpert
def test_chexpert_reads_whole_with_real_header_and_labels(worlds):
    root, summary = worlds["chexpert"]
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CSV_LABELS]
    tables = {}
    for split in ("train", "valid"):
        with open(base / f"{split}.csv", newline="") as fh:
            assert next(csv.reader(fh)) == header
        df, report = load_chexpert(root, split, policy="ignore", labels=CHEXPERT_CSV_LABELS)
        assert len(report) == 0 and len(df) == summary.splits[split]
        tables[split] = df
        raw = _rows(base / f"{split}.csv")
        values = {r[c] for r in raw for c in CHEXPERT_CSV_LABELS}
        assert values <= ({"1.0", "0.0"} if split == "valid" else {"1.0", "-1.0", ""})  # valid: no -1, no blank
        assert {r["Frontal/Lateral"] for r in raw} == {"Frontal"} and {r["AP/PA"] for r in raw} <= {"AP", "PA"}
        for r in raw:
            assert r["Path"].startswith(f"CheXpert-v1.0-small/{split}/patient") and r["Path"].endswith(
                "/view1_frontal.jpg")
            pathology = [c for c in CHEXPERT_CSV_LABELS if c not in ("No Finding", "Support Devices")]
            assert (r["No Finding"] == "1.0") == (not any(r[c] in ("1.0", "-1.0") for c in pathology))
        for c in CHEXPERT_CSV_LABELS:
            assert int((df[c] == 1.0).sum()) == summary.positives[c][split]
    assert all(Path(p).is_file() for t in tables.values() for p in t["image_path"])
    with Image.open(tables["valid"]["image_path"][0]) as img:
        assert img.format == "JPEG" and img.mode == "L" and img.size == (48, 48)
    assert (tables["train"][CHEXPERT_CSV_LABELS].isna().to_numpy()).any()  # some -1 (uncertain) in train
    for c in CHEXPERT_5:  # the fixed test split holds enough positives by construction
        assert (tables["valid"][c] == 1.0).sum() >= K
    assert set(tables["train"]["patient"]).isdisjoint(tables["valid"]["patient"])
    per_patient = pd.concat(tables.values()).groupby("patient").size()
    assert per_patient.max() <= 3 and (per_patient > 1).any()


def test_chexpert_too_small_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="too small.*num_images >= 50"):
        write_transfer_world("chexpert", tmp_path / "a", 40, 0, image_size=32, min_test_positives=K)
    with pytest.raises(ValueError, match="too small.*test_fraction"):
        write_transfer_world("chexpert", tmp_path / "b", 100, 0, image_size=32, min_test_positives=K,
                             test_fraction=0.2)
    with pytest.raises(ValueError, match="too small"):
        ensure_transfer_world("covidx", tmp_path / "c", 20, 0, image_size=32, min_test_positives=K)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------- SIIM
def test_siim_reads_whole_and_masks_are_the_drawn_pneumothoraces(worlds):
    root, summary = worlds["siim"]
    n, size, seed = WORLDS["siim"]
    assert (root / "train-rle.csv").read_text().splitlines()[0] == "ImageId, EncodedPixels"
    df, report = load_siim(root)
    assert len(report) == 0 and len(df) == n
    assert int(df["pneumothorax"].sum()) == sum(summary.positives["pneumothorax"].values()) > 0
    assert sum(len(r) for r in df["rles"]) == summary.instances["pneumothorax masks"]
    split = pd.read_csv(root / SPLIT_FILE)
    assert list(split.columns) == ["ImageId", "split"] and set(split["split"]) == {"train", "validate", "test"}
    assert set(split["ImageId"]) == set(df["image_id"])
    by_id = df.set_index("image_id")
    patient_split: dict[str, set] = {}
    for index, (image_id, sp) in enumerate(zip(split["ImageId"], split["split"])):  # the split file is in plan order
        row = by_id.loc[image_id]
        ds = pydicom.dcmread(row["image_path"])
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
        assert ds.SOPInstanceUID == image_id and Path(row["image_path"]).parent.name == ds.SeriesInstanceUID
        patient_split.setdefault(str(ds.PatientID), set()).add(sp)
        for r in row["rles"]:
            m = rle_decode(r, size, size)
            assert m.any() and m.shape == (size, size) and rle_encode(m) == r
            assert np.array_equal(rle_decode(rle_encode(m), size, size), m)
        if index < 12:  # re-render: the file and the masks are exactly what was drawn
            drawn = rerender("siim", n, seed, index, image_size=size, min_test_positives=K)
            assert np.array_equal(read_image(row["image_path"]), drawn.image)
            ptx = [inst.mask for inst in drawn.instances if inst.finding.name == "pneumothorax"]
            assert len(ptx) == len(row["rles"])
            for r, mask in zip(row["rles"], ptx):
                assert np.array_equal(rle_decode(r, size, size), mask.astype(np.uint8))
    assert all(len(s) == 1 for s in patient_split.values())  # patient-level split
    assert len(patient_split) < n  # some patients have several images


# --------------------------------------------------------------------------------------------------------- RSNA
def test_rsna_boxes_inside_and_target_matches_class_info(worlds):
    root, summary = worlds["rsna"]
    n, size, _ = WORLDS["rsna"]
    df, report = load_rsna(root)
    assert len(report) == 0 and len(df) == n
    info = pd.read_csv(root / "stage_2_detailed_class_info.csv").set_index("patientId")["class"]
    assert set(info) == set(RSNA_CLASSES)
    for pid, target, boxes in zip(df["patient_id"], df["target"], df["boxes"]):
        assert (target == 1) == (info[pid] == "Lung Opacity") == bool(boxes)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    assert sum(len(b) for b in df["boxes"]) == summary.instances["boxes"]
    assert int(df["target"].sum()) == sum(summary.positives["Lung Opacity"].values())
    split = pd.read_csv(root / SPLIT_FILE)
    assert list(split.columns) == ["patientId", "split"] and sorted(split["patientId"]) == sorted(df["patient_id"])
    ds = pydicom.dcmread(df["image_path"][0])
    assert ds.PatientID == df["patient_id"][0] and (ds.Rows, ds.Columns) == (size, size)


# ------------------------------------------------------------------------------------------------------- COVIDx
def test_covidx_exclusive_classes_patient_splits_and_test_quota(worlds):
    root, summary = worlds["covidx"]
    n, size, seed = WORLDS["covidx"]
    tables = {}
    for split in ("train", "val", "test"):
        df, report = load_covidx(root, split)
        assert len(report) == 0 and len(df) == summary.splits[split]
        tables[split] = df
    everything = pd.concat(tables.values())
    assert len(everything) == n and everything["filename"].is_unique
    assert set(everything["label"]) <= set(COVIDX_CLASSES) and set(everything["source"]) == {"mlip"}
    assert everything.groupby("patient_id")["label"].nunique().max() == 1  # one class per patient
    assert everything.groupby("patient_id")["split"].nunique().max() == 1  # patient-level splits
    counts = tables["test"]["label"].value_counts()
    assert all(counts.get(c, 0) >= K for c in COVIDX_CLASSES)
    with Image.open(tables["test"]["image_path"][0]) as img:
        assert img.format == "PNG" and img.size == (size, size)
    lung = {"opacity", "consolidation", "pneumonia", "atelectasis", "effusion", "edema", "nodule", "mass",
            "pneumothorax", "granuloma", "scarring", "interstitial", "pleural_thickening"}
    for item in _plan("covidx", n, seed, K, None):  # the classes are what was drawn, and exclusive
        drawn = [f for f in item.findings if f.name in lung]
        label = item.meta["label"]
        if label == "normal":
            assert not drawn
        elif label == "pneumonia":
            assert len(drawn) == 1 and drawn[0].name in ("pneumonia", "consolidation") and drawn[0].side != "bilateral"
        else:
            assert {f.name for f in drawn} == {"opacity"} and {f.side for f in drawn} == {"left", "right"}
            assert {f.zone for f in drawn} <= {"middle", "lower"}


# --------------------------------------------------------------------------------------------------- Object-CXR
def test_object_cxr_annotations_parse_and_boxes_are_devices(worlds):
    root, summary = worlds["object_cxr"]
    n, size, _ = WORLDS["object_cxr"]
    frames = []
    for split in ("train", "dev"):
        with open(root / f"{split}.csv", newline="") as fh:
            assert next(csv.reader(fh)) == ["image_name", "annotation"]
        df, report = load_object_cxr(root, split)
        assert len(report) == 0 and len(df) == summary.splits[split]
        frames.append(df)
        for anno in pd.read_csv(root / f"{split}.csv", dtype=str, keep_default_na=False)["annotation"]:
            for kind, coords in parse_object_cxr_annotation(anno):
                assert kind == 0 and coords.shape == (2, 2)
                (x0, y0), (x1, y1) = coords
                assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    df = pd.concat(frames)
    assert len(df) == n and 0.25 <= df["has_object"].mean() <= 0.75
    assert sum(len(b) for b in df["boxes"]) == summary.instances["boxes"]


def test_check_cli_reads_every_world_with_zero_skips(worlds, capsys):
    for task in TRANSFER_TASKS:
        root, summary = worlds[task]
        assert check.main(["--dataset", task, "--root", str(root)]) == 0
        out = capsys.readouterr().out
        assert out.strip().splitlines()[-1] == f"usable={summary.images} skipped=0"


# ---------------------------------------------------------------------------------- determinism and reuse
def test_workers_give_byte_identical_files(tmp_path):
    a = write_transfer_world("siim", tmp_path / "one", 24, 7, image_size=32, workers=1)
    b = write_transfer_world("siim", tmp_path / "two", 24, 7, image_size=32, workers=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    assert a.positives == b.positives and a.splits == b.splits
    write_transfer_world("siim", tmp_path / "three", 24, 8, image_size=32)
    assert _digest(tmp_path / "three") != _digest(tmp_path / "one")  # the seed matters


def test_ensure_reuses_then_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "w"
    first, written = ensure_transfer_world("object_cxr", out, 20, 0, image_size=32)
    assert written and (out / MANIFEST_NAME).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again, written = ensure_transfer_world("object_cxr", out, 20, 0, image_size=32, workers=2)
    assert not written and again.positives == first.positives and again.splits == first.splits
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    other, written = ensure_transfer_world("object_cxr", out, 24, 0, image_size=32)
    assert written and other.images == 24
    added = out / "train" / "my_notes.txt"
    added.write_text("mine")
    with pytest.raises(FileExistsError, match="did not"):
        ensure_transfer_world("object_cxr", out, 20, 1, image_size=32)
    assert added.read_text() == "mine"
    added.unlink()
    assert remove_transfer_world(out) == 0  # the failed attempt left nothing of ours
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_a_foreign_folder_is_refused_and_keeps_every_byte(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mlip_core.data.fixture_trees import make_object_cxr_tree

    real = tmp_path / "object-cxr"
    make_object_cxr_tree(real)
    before = _digest(real)
    for call in (lambda: ensure_transfer_world("object_cxr", real, 20, 0, image_size=32),
                 lambda: write_transfer_world("object_cxr", real, 20, 0, image_size=32),
                 lambda: remove_transfer_world(real)):
        with pytest.raises(FileExistsError) as info:
            call()
        message = str(info.value)
        assert str(real) in message and MANIFEST_NAME in message and "\n" not in message
    assert _digest(real) == before
    proc = subprocess.run([sys.executable, "-m", "mlip_core.data.transfer_worlds", "--task", "object_cxr", "--out",
                           str(real), "--num-images", "20", "--image-size", "32"], cwd=repo_root(),
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and str(real) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _digest(real) == before


def test_cli_writes_and_prints_the_summary(tmp_path, capsys):
    assert main(["--task", "rsna", "--out", str(tmp_path / "r"), "--num-images", "12", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "rsna transfer world: 12 images" in out and "Lung Opacity" in out
    assert main(["--task", "rsna", "--out", str(tmp_path / "r"), "--num-images", "12", "--image-size", "32"]) == 0
    assert "reused" in capsys.readouterr().out
