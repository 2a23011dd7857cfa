"""Builders of small dataset trees in the exact real on-disk formats (CSV columns, folders, DICOM, RLE).

Each ``make_*`` writes into a folder it is given and returns a dict describing what it wrote, so a test can check
that a reader saw exactly that. Report texts and images are invented (no credentialed byte is in them).

:func:`ensure_fixture_trees` writes one tree of every dataset the book's real-data parameters read (MIMIC-CXR-JPG
with its reports in a separate ``mimic-cxr-reports.zip``, CheXpert, RSNA, SIIM, COVIDx, Object-CXR) into one
folder, big enough for the ``smoke`` batch sizes and label fractions: the ``fixtures`` profile points every
``*_root`` parameter at them, so the test suite executes the chapters along the real-data path.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mlip_core.data.manifest import Layout, finish_write, reuse_or_clear, start_write

CHEXPERT_14 = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]  # fmt: skip
# CheXpert's train.csv column order (differs from MIMIC's chexpert.csv).
CHEXPERT_CSV_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # fmt: skip


def fake_radiograph(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A uint8 (h, w) image with a bright centre column (spine) and two dark ovals (lungs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 170.0)
    for cx in (w * 0.3, w * 0.7):
        img[((xx - cx) / (w * 0.17)) ** 2 + ((yy - h * 0.45) / (h * 0.3)) ** 2 < 1] = 60
    img[:, int(w * 0.46) : int(w * 0.54)] = 235
    img += rng.normal(0, 6, size=(h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpg(path: Path, h: int = 48, w: int = 40, seed: int = 0) -> Path:
    """A grayscale JPEG radiograph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fake_radiograph(h, w, seed), mode="L").save(path, quality=92)
    return path


def write_png(path: Path, h: int = 48, w: int = 40, seed: int = 0) -> Path:
    """A grayscale PNG radiograph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fake_radiograph(h, w, seed), mode="L").save(path)
    return path


def truncate(path: Path, keep: float = 0.4) -> Path:
    """Cut a file to ``keep`` of its bytes (a partial download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    seed: int = 0,
    extra: dict | None = None,
    jpeg_baseline: bool = False,
) -> Path:
    """A single-frame grayscale DICOM (explicit VR little endian) with 16 bits allocated.

    ``pixels`` (uint16, H x W) default: a fake radiograph scaled to ``bits_stored`` bits in display polarity,
    stored inverted when ``photometric`` is MONOCHROME1 (as the modality would). ``jpeg_baseline`` stores
    8-bit pixels as an encapsulated baseline JPEG, the transfer syntax the SIIM-ACR DICOMs use.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if pixels is None:
        disp = fake_radiograph(seed=seed).astype(np.float64) / 255.0
        top = 2**bits_stored - 1
        stored = (1.0 - disp) if photometric == "MONOCHROME1" else disp
        pixels = np.rint(stored * top).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "anon"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    if jpeg_baseline:
        import io

        from PIL import Image
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEGBaseline8Bit

        if bits_stored != 8:
            raise ValueError("baseline JPEG holds 8-bit pixels; pass bits_stored=8")
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
        ds.BitsAllocated = 8
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG 2.0.0 + reports
MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 COMPARISON:  None.

 FINDINGS:

 {findings}

 IMPRESSION:

 {impression}
"""


def _write_csv(df: pd.DataFrame, path: Path, gz: bool) -> Path:
    """Write a CSV, gzipped (as PhysioNet ships it) when ``gz``."""
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", newline="") as fh:
            df.to_csv(fh, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def make_mimic_tree(root: Path, n_subjects: int = 3, studies_per_subject: int = 2, gz: bool = True, seed: int = 0) -> dict:
    """A MIMIC-CXR-JPG tree: each study has a PA, an AP-or-PA, and a LATERAL image, a report and labels.

    Returns ``{"root", "frontal": [(dicom_id, study_id, split)], "studies": [...], "split_csv", ...}``.
    """
    rng = np.random.default_rng(seed)
    split_rows, meta_rows, label_rows, frontal, studies = [], [], [], [], []
    for s in range(n_subjects):
        subject = 10000032 + 1000 * s
        split = ["train", "validate", "test"][s % 3] if n_subjects >= 3 else "train"
        for k in range(studies_per_subject):
            study = 50000000 + 100 * s + k
            studies.append(study)
            sub = str(subject)
            rep = root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{study}.txt"
            rep.parent.mkdir(parents=True, exist_ok=True)
            rep.write_text(MIMIC_REPORT.format(findings=f"Heart size normal, study {study}. Lungs are clear.",
                                               impression=f"No acute process {study}."))
            for j, view in enumerate(["PA", "AP" if k % 2 else "PA", "LATERAL"]):
                dicom_id = f"{s:04x}{k:02x}{j:02x}-{rng.integers(1 << 31):08x}"
                write_jpg(root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{study}" / f"{dicom_id}.jpg", seed=s * 10 + k)
                split_rows.append({"dicom_id": dicom_id, "study_id": study, "subject_id": subject, "split": split})
                meta_rows.append({
                    "dicom_id": dicom_id, "subject_id": subject, "study_id": study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                    "Rows": 48, "Columns": 40, "StudyDate": 21800506, "StudyTime": 213014.531,
                    "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                    "ViewCodeSequence_CodeMeaning": "postero-anterior" if view == "PA" else view.lower(),
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                })  # fmt: skip
                if view != "LATERAL":
                    frontal.append((dicom_id, study, split))
            labels = {c: [1.0, 0.0, -1.0, np.nan][(s + k + i) % 4] for i, c in enumerate(CHEXPERT_14)}
            label_rows.append({"subject_id": subject, "study_id": study, **labels})
    paths = {
        "split_csv": _write_csv(pd.DataFrame(split_rows), root / "mimic-cxr-2.0.0-split.csv", gz),
        "metadata_csv": _write_csv(pd.DataFrame(meta_rows), root / "mimic-cxr-2.0.0-metadata.csv", gz),
        "chexpert_csv": _write_csv(pd.DataFrame(label_rows), root / "mimic-cxr-2.0.0-chexpert.csv", gz),
    }
    return {"root": root, "frontal": frontal, "studies": studies, "labels": label_rows, **paths}


# ----------------------------------------------------------------------------------------------------------
# CheXpert-v1.0-small
def make_chexpert_tree(parent: Path, n_train: int = 8, n_valid: int = 3) -> dict:
    """``parent/CheXpert-v1.0-small/{train,valid}.csv`` + JPGs; Path column relative to ``parent``."""
    root = parent / "CheXpert-v1.0-small"
    out = {"root": root}
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = []
        for i in range(n):
            for view, fl, appa in (("frontal", "Frontal", "PA" if i % 2 else "AP"), ("lateral", "Lateral", "")):
                rel = f"CheXpert-v1.0-small/{split}/patient{i + 1:05d}/study1/view{1 if fl == 'Frontal' else 2}_{view}.jpg"
                write_jpg(parent / rel, seed=i)
                vals = {c: [1.0, 0.0, -1.0, np.nan][(i + j) % 4] for j, c in enumerate(CHEXPERT_CSV_LABELS)}
                if split == "valid":  # the valid set is labelled by radiologists: no blanks or uncertain
                    vals = {c: float((i + j) % 2) for j, c in enumerate(CHEXPERT_CSV_LABELS)}
                rows.append({"Path": rel, "Sex": "Female" if i % 2 else "Male", "Age": 40 + i,
                             "Frontal/Lateral": fl, "AP/PA": appa, **vals})
        df = pd.DataFrame(rows)
        df.to_csv(root / f"{split}.csv", index=False)
        out[f"{split}_csv"] = root / f"{split}.csv"
        out[split] = df
    return out


# ----------------------------------------------------------------------------------------------------------
# RSNA Pneumonia Detection Challenge (stage 2)
def make_rsna_tree(root: Path, n: int = 6) -> dict:
    """``stage_2_train_labels.csv`` (one row per box; NaN box for Target 0) + ``stage_2_train_images/*.dcm``."""
    rows, boxes = [], {}
    for i in range(n):
        pid = f"{i:08x}-0000-4000-8000-{i:012x}"
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", seed=i, bits_stored=8 if i % 2 else 12,
                    photometric="MONOCHROME2")
        if i % 2 == 0:
            bb = [(4.0 + i, 5.0, 10.0, 12.0), (22.0, 6.0 + i, 8.0, 9.0)][: 1 + (i % 4 == 0)]
            for x, y, w, h in bb:
                rows.append({"patientId": pid, "x": x, "y": y, "width": w, "height": h, "Target": 1})
            boxes[pid] = [[x, y, x + w, y + h] for x, y, w, h in bb]
        else:
            rows.append({"patientId": pid, "x": np.nan, "y": np.nan, "width": np.nan, "height": np.nan, "Target": 0})
            boxes[pid] = []
    pd.DataFrame(rows).to_csv(root / "stage_2_train_labels.csv", index=False)
    return {"root": root, "boxes": boxes, "labels_csv": root / "stage_2_train_labels.csv"}


# ----------------------------------------------------------------------------------------------------------
# SIIM-ACR pneumothorax: the Kaggle "mask_functions.py" encoder, transcribed to test our decoder against.
def kaggle_mask2rle(img: np.ndarray, width: int, height: int) -> str:
    """The competition's reference encoder (loop form, column-major via ``img`` = mask.T, relative starts)."""
    rle = []
    last_color, current_pixel, run_start, run_length = 0, 0, -1, 0
    for x in range(width):
        for y in range(height):
            current_color = img[x][y]
            if current_color != last_color:
                if current_color == 255:
                    run_start, run_length = current_pixel, 1
                else:
                    rle += [str(run_start), str(run_length)]
                    run_start, run_length, current_pixel = -1, 0, 0
            elif run_start > -1:
                run_length += 1
            last_color = current_color
            current_pixel += 1
    return " ".join(rle)


def make_siim_tree(root: Path, n: int = 5, size: int = 32) -> dict:
    """``train-rle.csv`` (header ``ImageId, EncodedPixels``; `` -1`` when empty; one row per instance) +
    ``dicom-images-train/<study>/<series>/<ImageId>.dcm``."""
    masks, lines = {}, ["ImageId, EncodedPixels"]
    for i in range(n):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875166.{i}"
        write_dicom(root / "dicom-images-train" / f"1.2.276.0.7230010.3.1.2.{i}" / f"1.2.276.0.7230010.3.1.3.{i}"
                    / f"{image_id}.dcm", pixels=np.full((size, size), 100 + i, dtype=np.uint16), bits_stored=8,
                    jpeg_baseline=True)
        mask = np.zeros((size, size), dtype=np.uint8)
        if i % 2 == 0:
            parts = [(slice(3 + i, 9 + i), slice(2, 6)), (slice(20, 25), slice(10 + i, 18))][: 1 + (i % 4 == 0)]
            for rs, cs in parts:
                inst = np.zeros_like(mask)
                inst[rs, cs] = 255
                lines.append(f"{image_id}, {kaggle_mask2rle(inst.T, size, size)}")
                mask |= inst
        else:
            lines.append(f"{image_id}, -1")
        masks[image_id] = mask
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "masks": masks, "rle_csv": root / "train-rle.csv"}


# ----------------------------------------------------------------------------------------------------------
# COVIDx (txt split files: patient id, filename, label, source)
def make_covidx_tree(root: Path, n_train: int = 6, n_test: int = 3) -> dict:
    """``train.txt`` / ``test.txt`` with space-separated ``patient_id filename label source`` + image folders."""
    labels = ["normal", "pneumonia", "COVID-19"]
    out = {"root": root}
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            name = f"{split}_{i:03d}.{'png' if i % 2 else 'jpg'}"
            (write_png if i % 2 else write_jpg)(root / split / name, seed=i)
            lines.append(f"{1000 + i} {name} {labels[i % 3]} {['cohen', 'rsna', 'sirm'][i % 3]}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = lines
    return out


# ----------------------------------------------------------------------------------------------------------
# Object-CXR (train.csv / dev.csv: image_name,annotation)
def make_object_cxr_tree(root: Path, n_train: int = 4, n_dev: int = 2) -> dict:
    """Annotations ``TYPE x1 y1 x2 y2[...];...``: 0 rectangle, 1 ellipse, 2 polygon; blank = no object."""
    annos = ["0 2 3 10 12;1 20 20 30 28", "", "2 5 5 15 6 12 18 4 14", ""]
    out = {"root": root}
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            name = f"{i + (0 if split == 'train' else 8000):05d}.jpg"
            write_jpg(root / split / name, seed=i)
            rows.append({"image_name": name, "annotation": annos[i % len(annos)]})
        pd.DataFrame(rows).to_csv(root / f"{split}.csv", index=False)
        out[split] = rows
    return out


# ----------------------------------------------------------------------------------------------------------
# IU X-ray (OpenI): reports archive (invented text) + PNG images named by image id
IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Invented indication {n}.</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      <major>{mesh}</major>
   </MeSH>
   {images}
</eCitation>
"""


def make_iu_tree(root: Path, n: int = 4) -> dict:
    """``root/NLMCXR_reports.tgz`` (OpenI XML, invented text) + ``root/images/<image id>.png``."""
    import io
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    archive = root / "NLMCXR_reports.tgz"
    image_ids = {}
    with tarfile.open(archive, "w:gz") as tar:
        for k in range(1, n + 1):
            ids = [f"CXR{k}_1_IM-{k:04d}-1001", f"CXR{k}_1_IM-{k:04d}-2001"]
            image_ids[f"CXR{k}"] = ids
            imgs = "\n   ".join(f'<parentImage id="{i}"><figureId>F{j + 1}</figureId></parentImage>' for j, i in enumerate(ids))
            findings = "" if k == n else f"Invented finding {k}. Heart normal."
            impression = "" if k == n else ("No acute disease." if k % 2 else "Invented opacity.")
            mesh = "normal" if k % 2 else "Opacity/lung/base/left/mild"
            xml = IU_XML.format(n=k, findings=findings, impression=impression, mesh=mesh, images=imgs).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{k}.xml")
            info.size = len(xml)
            tar.addfile(info, io.BytesIO(xml))
            for i in ids:
                write_png(root / "images" / f"{i}.png", seed=k)
    return {"root": root, "archive": archive, "image_ids": image_ids, "empty_uid": f"CXR{n}"}


# ----------------------------------------------------------------------------------------------------------
# All of them, for the `fixtures` profile of the book
FIXTURE_TREES_VERSION = 1  # bump when a tree's content changes: ensure_fixture_trees then writes them again
FIXTURE_TREES = Layout(
    manifest="mlip-fixture-trees.json",
    paths=("mimic-cxr-jpg", "mimic-cxr-reports.zip", "chexpert", "rsna", "siim", "covidx", "object-cxr"),
    what="fixture trees", ensure="ensure_fixture_trees",
    hint="Point the fixture trees at an empty folder (the fixtures profile uses workspace/fixture_trees).",
    exclusive=True)


def fixture_roots(folder: Path | str) -> dict[str, Path]:
    """The book's real-data parameters (``mimic_root``, ...) and the trees in ``folder`` they point at."""
    folder = Path(folder)
    return {"mimic_root": folder / "mimic-cxr-jpg", "mimic_reports_root": folder / "mimic-cxr-reports.zip",
            "chexpert_root": folder / "chexpert", "rsna_root": folder / "rsna", "siim_root": folder / "siim",
            "covidx_root": folder / "covidx", "object_cxr_root": folder / "object-cxr"}


def _reports_to_zip(jpg_root: Path, archive: Path) -> int:
    """Move the reports out of a MIMIC-CXR-JPG tree into ``mimic-cxr-reports.zip`` (``files/pXX/pN/sM.txt``, the
    layout of PhysioNet's zip), as MIMIC-CXR ships them apart from the JPG images."""
    import zipfile

    reports = sorted((jpg_root / "files").rglob("s*.txt"))
    with zipfile.ZipFile(archive, "w") as zf:
        for r in reports:
            zf.write(r, "files/" + r.relative_to(jpg_root / "files").as_posix())
            r.unlink()
    return len(reports)


def ensure_fixture_trees(folder: Path | str) -> dict[str, Path]:
    """Write (or reuse, when a complete write of this version is there) every fixture tree in ``folder`` and return
    :func:`fixture_roots`. The folder's manifest lists what was written; a folder this project did not write is
    refused and left untouched (:mod:`mlip_core.data.manifest`)."""
    folder = Path(folder)
    roots = fixture_roots(folder)
    if reuse_or_clear(folder, FIXTURE_TREES, lambda m: m.get("version") == FIXTURE_TREES_VERSION):
        return roots
    manifest = start_write(folder, FIXTURE_TREES, version=FIXTURE_TREES_VERSION)
    # Six MIMIC subjects: 8 train and 8 validate frontal pairs (the smoke batch); the others enough patients for
    # two label fractions, a validation holdout and a test split holding both classes of every label.
    make_mimic_tree(roots["mimic_root"], n_subjects=6)
    _reports_to_zip(roots["mimic_root"], roots["mimic_reports_root"])
    make_chexpert_tree(roots["chexpert_root"], n_train=40, n_valid=10)
    make_rsna_tree(roots["rsna_root"], n=40)
    make_siim_tree(roots["siim_root"], n=40)
    make_covidx_tree(roots["covidx_root"], n_train=36, n_test=12)
    make_object_cxr_tree(roots["object_cxr_root"], n_train=24, n_dev=8)
    finish_write(folder, FIXTURE_TREES, manifest)
    return roots
