"""Transfer datasets in their real on-disk formats, label-fraction splits, and Dataset classes.

Every ``load_*`` returns ``(DataFrame, SkipReport)``: one row per usable image and a count of every row left
out with its reason and file. Missing files and wrong CSV headers are errors that name the file and the fix.

=============  =====================================================================================
CheXpert       ``CheXpert-v1.0-small/{train,valid}.csv``: Path,Sex,Age,Frontal/Lateral,AP/PA,<14 labels>
RSNA           ``stage_2_train_labels.csv``: patientId,x,y,width,height,Target; ``stage_2_train_images/*.dcm``
SIIM-ACR       ``train-rle.csv``: ImageId, EncodedPixels (" -1" = no pneumothorax);
               ``dicom-images-train/<study>/<series>/<ImageId>.dcm``
COVIDx         ``{train,val,test}.txt``: "patient_id filename label source" lines; images in ``{split}/``
Object-CXR     ``{train,dev}.csv``: image_name,annotation ("TYPE x1 y1 x2 y2 ...;..." 0 box, 1 ellipse,
               2 polygon; blank = no object); images in ``{train,dev}/``
IU X-ray       OpenI reports (torchxrayvision's NLMCXR_reports.tgz) + ``<image id>.png`` files
=============  =====================================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .cache import ImageCache
from .images import load_uint8, read_image, resize_uint8
from .mimic import read_csv_checked
from .reports import ReportSections, choose_text, clean_text
from .skips import SkipReport
from .transforms import eval_transform

__all__ = [
    "CHEXPERT_5",
    "CHEXPERT_CSV_LABELS",
    "COVIDX_2",
    "COVIDX_3",
    "DetectionDataset",
    "ImageLabelDataset",
    "SegmentationDataset",
    "TRANSFER_SPLIT_FILE",
    "apply_split_file",
    "dataset_splits",
    "holdout_split",
    "label_fraction_splits",
    "load_chexpert",
    "load_covidx",
    "load_iu",
    "load_object_cxr",
    "load_rsna",
    "load_siim",
    "pad_geometry",
    "parse_object_cxr_annotation",
    "rle_decode",
    "rle_encode",
    "siim_mask",
]

CHEXPERT_CSV_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # fmt: skip
# The five CheXpert competition labels (Irvin et al. 2019), evaluated by MGCA / MLIP.
CHEXPERT_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
COVIDX_3 = ["normal", "pneumonia", "COVID-19"]
COVIDX_2 = ["negative", "positive"]


def _need_file(path: Path, what: str) -> Path:
    """The path if it is a file, else FileNotFoundError naming it and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found; point --root at the dataset folder that contains it.")
    return path


# ------------------------------------------------------------------------------------------------------------
# CheXpert
def load_chexpert(
    root: Path | str,
    split: str = "train",
    policy: str = "ones",
    labels: Sequence[str] = CHEXPERT_5,
    frontal_only: bool = True,
    check_files: bool = True,
) -> tuple[pd.DataFrame, SkipReport]:
    """CheXpert ``train``/``valid`` rows with labels under an uncertainty policy.

    Blank (not mentioned) is 0 under every policy; uncertain (-1) becomes 1 (``ones``, U-Ones), 0
    (``zeros``, U-Zeros) or NaN (``ignore``: masked out of the loss). Columns: image_path, patient, split,
    view, and one float32 column per label.
    """
    root = Path(root)
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}; use one of {UNCERTAINTY_POLICIES}")
    split = {"val": "valid", "validate": "valid"}.get(split, split)
    for inner in ("CheXpert-v1.0-small", "CheXpert-v1.0"):  # given the folder above the dataset
        if not (root / f"{split}.csv").is_file() and (root / inner / f"{split}.csv").is_file():
            root = root / inner
    path = _need_file(root / f"{split}.csv", f"CheXpert {split}.csv")
    report = SkipReport("chexpert")
    df = read_csv_checked(path, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CSV_LABELS])
    unknown_labels = [c for c in labels if c not in CHEXPERT_CSV_LABELS]
    if unknown_labels:
        raise ValueError(f"unknown CheXpert label(s) {unknown_labels}; choose from {CHEXPERT_CSV_LABELS}")
    dup = df.duplicated("Path", keep="first")
    for p in df.loc[dup, "Path"]:
        report.add(f"duplicate Path in {path.name}", p, path)
    df = df[~dup]
    if frontal_only:
        lateral = df["Frontal/Lateral"].astype(str).str.strip() != "Frontal"
        report.filter("lateral view", int(lateral.sum()))
        df = df[~lateral]

    raw = df[list(labels)]
    values = raw.apply(pd.to_numeric, errors="coerce")
    blank = raw.isna() | (raw.astype(str).apply(lambda s: s.str.strip()) == "")
    unknown = (~blank) & ~values.isin([1.0, 0.0, -1.0])
    bad = unknown.any(axis=1).to_numpy()
    for i in np.flatnonzero(bad):
        cols = [c for c in labels if unknown.iloc[i][c]]
        report.add("unknown label value (expected 1.0, 0.0, -1.0 or blank)",
                   f"{df['Path'].iloc[i]}: " + ", ".join(f"{c}={raw.iloc[i][c]!r}" for c in cols), path)
    df, values = df[~bad], values[~bad].fillna(0.0)
    uncertain = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
    values = values.mask(values == -1.0, uncertain)

    # "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg" is relative to root's parent.
    def resolve(rel: str) -> str:
        rel_path = Path(str(rel).strip())
        if rel_path.parts and rel_path.parts[0] == root.name:
            return str(root.parent / rel_path)
        return str(root / rel_path)

    out = pd.DataFrame({
        "image_path": [resolve(p) for p in df["Path"]],
        "patient": [next((q for q in Path(str(p)).parts if q.startswith("patient")), "") for p in df["Path"]],
        "split": split,
        "view": df["AP/PA"].fillna("").astype(str).to_numpy(),
    })  # fmt: skip
    for c in labels:
        out[c] = values[c].to_numpy(dtype=np.float32)
    if check_files:
        out, report = _drop_missing(out, report)
    return out.reset_index(drop=True), report


def _drop_missing(df: pd.DataFrame, report: SkipReport, col: str = "image_path") -> tuple[pd.DataFrame, SkipReport]:
    """Rows whose image file is absent become counted skips."""
    exists = np.array([Path(p).is_file() for p in df[col]], dtype=bool)
    for p in df.loc[~exists, col]:
        report.add("missing image file", Path(p).name, p)
    return df[exists], report


# ------------------------------------------------------------------------------------------------------------
# RSNA Pneumonia
def load_rsna(root: Path | str, check_files: bool = True) -> tuple[pd.DataFrame, SkipReport]:
    """One row per patientId: image_path, target (0/1), boxes (list of [x0, y0, x1, y1] in pixels)."""
    root = Path(root)
    path = _need_file(root / "stage_2_train_labels.csv", "RSNA stage_2_train_labels.csv")
    report = SkipReport("rsna")
    df = read_csv_checked(path, ["patientId", "x", "y", "width", "height", "Target"])
    img_dir = root / "stage_2_train_images"
    rows = []
    for pid, g in df.groupby("patientId", sort=True):
        targets = pd.to_numeric(g["Target"], errors="coerce")
        if targets.isna().any() or not targets.isin([0, 1]).all():
            report.add("unknown Target value (expected 0 or 1)", f"{pid}: {g['Target'].tolist()}", path)
            continue
        if targets.nunique() > 1:
            report.add("rows disagree on Target", pid, path)
            continue
        box = g[["x", "y", "width", "height"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        if int(targets.iloc[0]) == 1:
            if np.isnan(box).any() or (box[:, 2:] <= 0).any():
                report.add("Target 1 without a valid box", pid, path)
                continue
            boxes = [[x, y, x + w, y + h] for x, y, w, h in box.tolist()]
        else:
            if not np.isnan(box).all():
                report.add("Target 0 with a box", pid, path)
                continue
            if len(g) > 1:
                report.add("duplicate patientId rows for Target 0", pid, path)
            boxes = []
        rows.append({"patient_id": pid, "image_path": str(img_dir / f"{pid}.dcm"), "target": int(targets.iloc[0]),
                     "boxes": boxes})
    out = pd.DataFrame(rows, columns=["patient_id", "image_path", "target", "boxes"])
    if check_files:
        out, report = _drop_missing(out, report)
    return out.reset_index(drop=True), report


# ------------------------------------------------------------------------------------------------------------
# SIIM-ACR pneumothorax: Kaggle RLE = column-major pixel order, each start relative to the end of the
# previous run (the competition's mask_functions.py; decoded there as rle2mask(...).T).
def _parse_rle(rle: str) -> np.ndarray:
    """'s0 l0 s1 l1 ...' as an int array (2K,); ValueError for anything else."""
    try:
        nums = np.array([int(t) for t in rle.split()], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"RLE has a non-integer token: {rle[:40]!r}") from exc
    if nums.size == 0 or nums.size % 2:
        raise ValueError(f"RLE needs start/length pairs, got {nums.size} numbers")
    if (nums < 0).any() or (nums[1::2] <= 0).any():
        raise ValueError("RLE has a negative start or a non-positive length")
    return nums


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Kaggle SIIM RLE to a uint8 mask (height, width) with 1 inside; ``-1`` / blank give an empty mask."""
    rle = str(rle).strip()
    mask = np.zeros(height * width, dtype=np.uint8)
    if rle in ("", "-1", "nan"):
        return mask.reshape(height, width)
    nums = _parse_rle(rle)
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        pos += int(start)
        if pos + length > mask.size:
            raise ValueError(f"RLE run ends at pixel {pos + length}, past the end of a {height}x{width} mask")
        mask[pos : pos + length] = 1
        pos += int(length)
    return mask.reshape(width, height).T  # flat index = column * height + row


def rle_encode(mask: np.ndarray) -> str:
    """uint8/bool mask (H, W) to Kaggle SIIM RLE (relative starts); ``-1`` when empty."""
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    if not flat.any():
        return "-1"
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    prev_end = np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s - p} {e - s}" for s, e, p in zip(starts, ends, prev_end))


def siim_mask(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Union of an image's instance RLEs, uint8 (height, width) in {0, 1}."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for r in rles:
        mask |= rle_decode(r, height, width)
    return mask


def load_siim(root: Path | str, check_files: bool = True) -> tuple[pd.DataFrame, SkipReport]:
    """One row per ImageId: image_path, pneumothorax (0/1), rles (list of instance RLE strings)."""
    import pydicom

    root = Path(root)
    path = _need_file(root / "train-rle.csv", "SIIM train-rle.csv")
    report = SkipReport("siim")
    # The Kaggle header is "ImageId, EncodedPixels" (with a space); values " -1" likewise.
    df = read_csv_checked(path, ["ImageId", "EncodedPixels"], dtype=str, skipinitialspace=True)
    dicom_dir = root / "dicom-images-train" if (root / "dicom-images-train").is_dir() else root
    found: dict[str, Path] = {}
    for p in sorted(dicom_dir.rglob("*.dcm")):
        if p.stem in found:
            report.add("duplicate DICOM for ImageId", p.stem, p)
            continue
        found[p.stem] = p
    rows = []
    for image_id, g in df.groupby("ImageId", sort=True):
        image_id = str(image_id).strip()
        rles = [str(r).strip() for r in g["EncodedPixels"].fillna("-1")]
        empty = [r == "-1" for r in rles]
        if any(empty) and not all(empty):
            report.add("both -1 and a mask for one ImageId", image_id, path)
            continue
        if all(empty) and len(rles) > 1:
            report.add("duplicate ImageId rows", image_id, path)
        pos = [r for r in rles if r != "-1"]
        try:
            for r in pos:
                _parse_rle(r)
        except ValueError as exc:
            report.add(f"malformed RLE ({exc})", image_id, path)
            continue
        dcm = found.get(image_id)
        if dcm is None:
            if check_files:
                report.add("missing DICOM file", image_id, dicom_dir / f"**/{image_id}.dcm")
                continue
            dcm = dicom_dir / f"{image_id}.dcm"
        if check_files and pos:
            try:
                hdr = pydicom.dcmread(dcm, stop_before_pixels=True)
                siim_mask(pos, int(hdr.Rows), int(hdr.Columns))
            except ValueError as exc:
                report.add(f"RLE does not fit the image ({exc})", image_id, path)
                continue
            except Exception as exc:  # unreadable header: the image itself is unusable
                report.add(f"unreadable DICOM header ({type(exc).__name__})", image_id, dcm)
                continue
        rows.append({"image_id": image_id, "image_path": str(dcm), "pneumothorax": int(bool(pos)), "rles": pos})
    return pd.DataFrame(rows, columns=["image_id", "image_path", "pneumothorax", "rles"]), report


# ------------------------------------------------------------------------------------------------------------
# COVIDx
_COVIDX_LABELS = {"normal": "normal", "pneumonia": "pneumonia", "covid-19": "COVID-19", "covid": "COVID-19",
                  "negative": "negative", "positive": "positive"}  # fmt: skip


def load_covidx(root: Path | str, split: str = "train", check_files: bool = True) -> tuple[pd.DataFrame, SkipReport]:
    """Rows of ``{split}.txt``: patient_id, filename, image_path, label, label_index, source, split.

    Labels are the 3-class set (normal / pneumonia / COVID-19, COVIDx <= 8A) or the binary set
    (negative / positive, COVIDx 8B+); one file must use one set.
    """
    root = Path(root)
    split = {"valid": "val", "validate": "val"}.get(split, split)
    path = _need_file(root / f"{split}.txt", f"COVIDx {split}.txt split file")
    report = SkipReport("covidx")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        tok = line.split()
        if len(tok) < 4:
            report.add("malformed line (expected: patient_id filename label source)", f"line {n}", path)
            continue
        # Filenames may contain spaces: patient id first, label and source last.
        pid, fname, label, source = tok[0], " ".join(tok[1:-2]), tok[-2], tok[-1]
        canon = _COVIDX_LABELS.get(label.lower())
        if canon is None:
            report.add(f"unknown label {label!r}", f"line {n}: {fname}", path)
            continue
        if fname in seen:
            report.add("duplicate filename", f"line {n}: {fname}", path)
            continue
        seen.add(fname)
        rows.append({"patient_id": pid, "filename": fname, "image_path": str(root / split / fname), "label": canon,
                     "source": source, "split": split})
    df = pd.DataFrame(rows, columns=["patient_id", "filename", "image_path", "label", "source", "split"])
    classes = COVIDX_2 if set(df["label"]) <= set(COVIDX_2) and len(df) else COVIDX_3
    if not set(df["label"]) <= set(classes):
        raise ValueError(f"{path}: mixes binary (positive/negative) and 3-class labels; use one COVIDx release per root.")
    df["label_index"] = [classes.index(x) for x in df["label"]]
    if check_files:
        df, report = _drop_missing(df, report)
    return df.reset_index(drop=True), report


# ------------------------------------------------------------------------------------------------------------
# Object-CXR
OBJECT_CXR_SHAPES = {0: "rectangle", 1: "ellipse", 2: "polygon"}


def parse_object_cxr_annotation(text: str) -> list[tuple[int, np.ndarray]]:
    """``"0 x1 y1 x2 y2;2 x1 y1 ... xn yn"`` to [(shape type, coords (K, 2))]; blank -> []."""
    text = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text).strip()
    objects = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        tok = part.split()
        try:
            kind, nums = int(tok[0]), np.array([float(t) for t in tok[1:]], dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"non-numeric annotation {part[:40]!r}") from exc
        if kind not in OBJECT_CXR_SHAPES:
            raise ValueError(f"unknown ANNO_TYPE {kind} (expected 0 rectangle, 1 ellipse, 2 polygon)")
        if nums.size % 2 or (kind in (0, 1) and nums.size != 4) or (kind == 2 and nums.size < 6):
            raise ValueError(f"{OBJECT_CXR_SHAPES[kind]} with {nums.size} coordinates")
        objects.append((kind, nums.reshape(-1, 2)))
    return objects


def load_object_cxr(root: Path | str, split: str = "train", check_files: bool = True) -> tuple[pd.DataFrame, SkipReport]:
    """Rows of ``{train,dev}.csv``: image_path, split, has_object (0/1), boxes ([x0, y0, x1, y1] per object),
    shapes ([(type, coords)])."""
    root = Path(root)
    split = {"valid": "dev", "val": "dev", "validate": "dev"}.get(split, split)
    path = _need_file(root / f"{split}.csv", f"Object-CXR {split}.csv")
    report = SkipReport("object-cxr")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    name_col = "image_name" if "image_name" in df.columns else "image_path" if "image_path" in df.columns else None
    if name_col is None or "annotation" not in df.columns:
        raise ValueError(f"{path}: wrong CSV header {list(df.columns)}; expected image_name,annotation (Object-CXR).")
    rows, seen = [], set()
    for name, anno in zip(df[name_col], df["annotation"]):
        base = Path(str(name).strip()).name
        if base in seen:
            report.add("duplicate image_name", base, path)
            continue
        seen.add(base)
        try:
            shapes = parse_object_cxr_annotation(anno)
        except ValueError as exc:
            report.add(f"malformed annotation ({exc})", base, path)
            continue
        boxes = [[*c.min(axis=0).tolist(), *c.max(axis=0).tolist()] for _, c in shapes]
        rows.append({"image_name": base, "image_path": str(root / split / base), "split": split,
                     "has_object": int(bool(shapes)), "boxes": boxes, "shapes": shapes})
    out = pd.DataFrame(rows, columns=["image_name", "image_path", "split", "has_object", "boxes", "shapes"])
    if check_files:
        out, report = _drop_missing(out, report)
    return out.reset_index(drop=True), report


# ------------------------------------------------------------------------------------------------------------
# IU X-ray
def load_iu(root: Path | str, archive: Path | str | None = None, check_files: bool = True) -> tuple[pd.DataFrame, SkipReport]:
    """One row per IU image: uid, image_id, image_path, text (impression + findings), normal (MeSH "normal"),
    mesh_major. Reports come from ``archive`` (default ``root/NLMCXR_reports.tgz``, else torchxrayvision's);
    images are ``<image id>.png`` under ``root/images``, ``root/NLMCXR_png`` or ``root``."""
    from .iu import load_iu_reports

    root = Path(root)
    if archive is None and (root / "NLMCXR_reports.tgz").is_file():
        archive = root / "NLMCXR_reports.tgz"
    from .iu import iu_archive_path

    archive = Path(archive) if archive is not None else iu_archive_path()
    reports = load_iu_reports(archive)
    img_dir = next((d for d in (root / "images", root / "NLMCXR_png") if d.is_dir()), root)
    report = SkipReport("iu")
    rows = []
    for r in reports:
        choice = choose_text(ReportSections(findings=clean_text(r.findings), impression=clean_text(r.impression)))
        if choice.empty:
            report.add("empty report: neither IMPRESSION nor FINDINGS has text", r.uid, archive)
            continue
        if not r.image_ids:
            report.add("report has no images", r.uid, archive)
            continue
        normal = int([m.strip().lower() for m in r.mesh_major] == ["normal"])
        for image_id in r.image_ids:
            rows.append({"uid": r.uid, "image_id": image_id, "image_path": str(img_dir / f"{image_id}.png"),
                         "text": choice.text, "normal": normal, "mesh_major": list(r.mesh_major)})
    df = pd.DataFrame(rows, columns=["uid", "image_id", "image_path", "text", "normal", "mesh_major"])
    if check_files:
        df, report = _drop_missing(df, report)
    return df.reset_index(drop=True), report


# ------------------------------------------------------------------------------------------------------------
# Splits written as files so every method sees the same images
def holdout_split(df: pd.DataFrame, group_col: str, val_frac: float = 0.15, test_frac: float = 0.15,
                  seed: int = 0) -> pd.Series:
    """``train``/``valid``/``test`` per row, assigned by group (patient) so no patient spans two splits."""
    groups = np.array(sorted(df[group_col].astype(str).unique()))
    perm = np.random.default_rng(seed).permutation(len(groups))
    n_test, n_val = round(test_frac * len(groups)), round(val_frac * len(groups))
    which = {}
    for rank, gi in enumerate(perm):
        which[groups[gi]] = "test" if rank < n_test else "valid" if rank < n_test + n_val else "train"
    return df[group_col].astype(str).map(which).rename("split")


TRANSFER_SPLIT_FILE = "mlip-transfer-split.csv"  # written beside SIIM / RSNA layouts by the offline transfer worlds


def dataset_splits(root: Path | str, df: pd.DataFrame, id_col: str, file_id_col: str, val_frac: float = 0.15,
                   test_frac: float = 0.15, seed: int = 0) -> pd.Series:
    """train / validate / test per row of a dataset without an official split (SIIM, RSNA).

    The offline transfer worlds write ``root/mlip-transfer-split.csv`` (``file_id_col``, split; drawn by patient);
    it is used when present. Otherwise the rows are split at random by ``id_col`` (``val_frac`` / ``test_frac``,
    seeded), as MGCA splits SIIM and RSNA (70 / 15 / 15)."""
    path = Path(root) / TRANSFER_SPLIT_FILE
    if path.is_file():
        table = read_csv_checked(path, [file_id_col, "split"], dtype=str)
        which = dict(zip(table[file_id_col].str.strip(), table["split"].str.strip()))
        split = df[id_col].astype(str).map(which)
        if split.isna().any():
            raise ValueError(f"{path}: {int(split.isna().sum())} rows of the dataset have no split (e.g. "
                             f"{df.loc[split.isna(), id_col].iloc[0]!r}); the split file belongs to another world: "
                             "rewrite the world or delete the split file to draw a random split")
        return split.rename("split")
    return holdout_split(df, id_col, val_frac=val_frac, test_frac=test_frac, seed=seed).replace({"valid": "validate"})


def label_fraction_splits(
    train: pd.DataFrame,
    out_dir: Path | str,
    dataset: str,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
    id_col: str = "image_path",
) -> dict[float, Path]:
    """Write ``{dataset}_train_{pct}pct_seed{seed}.csv`` (one ``id_col`` column) per fraction.

    One seeded permutation serves all fractions, so the 1% set is inside the 10% set, inside 100%; each
    fraction keeps at least one image. Returns {fraction: file}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = train[id_col].astype(str).to_numpy()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{dataset}: {id_col} is not unique in the training table; de-duplicate before sampling")
    order = ids[np.random.default_rng(seed).permutation(len(ids))]
    files = {}
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fraction {f} must be in (0, 1]")
        n = max(1, int(round(f * len(ids))))
        pct = f"{f * 100:g}".replace(".", "p")
        path = out_dir / f"{dataset}_train_{pct}pct_seed{seed}.csv"
        pd.DataFrame({id_col: order[:n]}).to_csv(path, index=False)
        files[f] = path
    return files


def apply_split_file(df: pd.DataFrame, path: Path | str, id_col: str = "image_path") -> pd.DataFrame:
    """The rows of ``df`` listed in a split file, in the file's order; error if the file lists unknown ids."""
    path = Path(path)
    wanted = read_csv_checked(_need_file(path, "split file"), [id_col], dtype=str)[id_col].tolist()
    index = {v: i for i, v in enumerate(df[id_col].astype(str))}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} ids are not in the dataset (e.g. {missing[0]!r}); the split file "
                         "was written for another dataset root or version: rewrite it with label_fraction_splits.")
    return df.iloc[[index[w] for w in wanted]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------------
# Datasets
def pad_geometry(height: int, width: int, size: int) -> tuple[float, int, int]:
    """(scale, top, left) of :func:`~mlip_core.data.images.resize_uint8`'s ``pad`` mode, for boxes/masks."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, (size - nh) // 2, (size - nw) // 2


class ImageLabelDataset(Dataset):
    """Classification items ``{"image": (1, S, S) float, "labels": (C,) float (NaN = ignore), "index": int}``."""

    def __init__(self, df: pd.DataFrame, label_cols: Sequence[str], image_size: int = 224, transform=None,
                 cache: ImageCache | None = None) -> None:
        if cache is not None:
            if list(cache.paths) != [str(p) for p in df["image_path"]]:
                raise ValueError("the cache was built for other image paths; build it from df['image_path']")
            self._slots = np.flatnonzero(np.asarray(cache.valid, dtype=bool))
            df = df.iloc[self._slots]
        self.df = df.reset_index(drop=True)
        self.cache, self.image_size = cache, int(image_size)
        self.transform = transform if transform is not None else eval_transform(self.image_size)
        self._labels = torch.tensor(self.df[list(label_cols)].to_numpy(dtype=np.float32))
        self._paths = self.df["image_path"].tolist()

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict:
        arr = self.cache[int(self._slots[i])] if self.cache is not None else load_uint8(self._paths[i], self.image_size)
        return {"image": self.transform(arr), "labels": self._labels[i].clone(), "index": int(i)}


class SegmentationDataset(Dataset):
    """SIIM items ``{"image": (1, S, S) float, "mask": (1, S, S) float in {0, 1}, "index": int}`` (no augmentation
    here: geometric transforms must move image and mask together)."""

    def __init__(self, df: pd.DataFrame, image_size: int = 224) -> None:
        self.df, self.image_size = df.reset_index(drop=True), int(image_size)
        self.transform = eval_transform(self.image_size)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict:
        row = self.df.iloc[i]
        full = read_image(row["image_path"])
        mask = siim_mask(row["rles"], *full.shape) * 255
        return {
            "image": self.transform(resize_uint8(full, self.image_size)),
            "mask": torch.from_numpy((resize_uint8(mask, self.image_size) >= 128).astype(np.float32))[None],
            "index": int(i),
        }


class DetectionDataset(Dataset):
    """RSNA / Object-CXR items ``{"image": (1, S, S) float, "boxes": (K, 4) float x0y0x1y1 in resized pixels,
    "labels": (K,) long (all 1: one foreground class), "index": int}``."""

    def __init__(self, df: pd.DataFrame, image_size: int = 224) -> None:
        self.df, self.image_size = df.reset_index(drop=True), int(image_size)
        self.transform = eval_transform(self.image_size)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict:
        row = self.df.iloc[i]
        full = read_image(row["image_path"])
        scale, top, left = pad_geometry(*full.shape, self.image_size)
        boxes = torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * scale + torch.tensor([left, top, left, top], dtype=torch.float32)
        return {
            "image": self.transform(resize_uint8(full, self.image_size)),
            "boxes": boxes,
            "labels": torch.ones(len(boxes), dtype=torch.long),
            "index": int(i),
        }

