"""MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports: image-report pairs for pretraining.

Real layout (PhysioNet), under ``root``::

    mimic-cxr-2.0.0-split.csv[.gz]     dicom_id,study_id,subject_id,split   (train / validate / test)
    mimic-cxr-2.0.0-metadata.csv[.gz]  dicom_id,subject_id,study_id,...,ViewPosition,Rows,Columns,...
    mimic-cxr-2.0.0-chexpert.csv[.gz]  subject_id,study_id,<14 CheXpert labels: 1.0 / 0.0 / -1.0 / blank>
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg

Reports come from MIMIC-CXR (not -JPG) as ``files/p10/p10000032/s50414267.txt``; ``reports_root`` points at
the folder holding that ``files/`` tree or at ``mimic-cxr-reports.zip`` itself (default: the first of ``root``,
``root/mimic-cxr-reports`` and ``root/mimic-cxr-reports.zip`` that holds any of the studies' reports). Reports
found nowhere are an error that names the places and the fix; one missing report is a counted skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mlip_core.knowledge.graph import CHEXPERT_14  # also the column order of mimic-cxr-2.0.0-chexpert.csv

from .cache import ImageCache
from .images import load_uint8
from .reports import choose_text, parse_sections
from .skips import SkipReport
from .transforms import eval_transform

__all__ = [
    "CHEXPERT_14",
    "MimicPretrainDataset",
    "find_csv",
    "load_mimic_pairs",
    "read_csv_checked",
    "report_path",
]

LABEL_VALUES = {1.0, 0.0, -1.0}
SPLITS = ("train", "validate", "test")
_SPLIT_ALIASES = {"val": "validate", "valid": "validate", "validation": "validate"}

SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
CHEXPERT_COLUMNS = ["subject_id", "study_id", *CHEXPERT_14]


def find_csv(root: Path, stem: str) -> Path:
    """``root/stem.csv`` or ``root/stem.csv.gz``; FileNotFoundError naming both and the fix otherwise."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root / (stem + '.csv')} (or .csv.gz) not found; point --root at the MIMIC-CXR-JPG 2.0.0 folder "
        f"that holds {stem}.csv.gz (download it from PhysioNet with the JPG files)."
    )


def read_csv_checked(path: Path, required: Sequence[str], **kwargs) -> pd.DataFrame:
    """Read a CSV (pandas infers gzip from the suffix) and check its header names every required column."""
    try:
        df = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot parse as CSV ({type(exc).__name__}: {exc}); re-download the file.") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: wrong CSV header: missing column(s) {missing}; found {list(df.columns)}. Expected at least "
            f"{list(required)}: is this the right file (and not a different release or a renamed copy)?"
        )
    return df


_REPORTS_FIX = ("pass the folder that holds MIMIC-CXR's files/p10/p10000032/s50414267.txt tree, or "
                "mimic-cxr-reports.zip itself (reports_root= / --reports DIR_OR_ZIP).")


def report_path(reports_root: Path, subject_id: int, study_id: int) -> Path:
    """``reports_root/files/p10/p10000032/s50414267.txt``."""
    sub = f"{int(subject_id)}"
    return reports_root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{int(study_id)}.txt"


def image_path(root: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """``root/files/p10/p10000032/s50414267/<dicom_id>.jpg``."""
    sub = f"{int(subject_id)}"
    return root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"


def _to_int(df: pd.DataFrame, cols: Sequence[str], path: Path, report: SkipReport) -> pd.DataFrame:
    """Coerce id columns to int; rows with a non-integer id are counted skips."""
    bad = np.zeros(len(df), dtype=bool)
    for c in cols:
        num = pd.to_numeric(df[c], errors="coerce")
        bad |= num.isna().to_numpy() | (num.fillna(0) % 1 != 0).to_numpy()
    for _, row in df[bad].iterrows():
        report.add(f"non-integer id in {path.name}", dict(row[list(cols)]), path)
    df = df[~bad].copy()
    for c in cols:
        df[c] = pd.to_numeric(df[c]).astype(np.int64)
    return df


def _drop_duplicates(df: pd.DataFrame, key: Sequence[str], path: Path, report: SkipReport) -> pd.DataFrame:
    """Keep the first row per key; every later duplicate is a counted skip."""
    dup = df.duplicated(subset=list(key), keep="first")
    for _, row in df[dup].iterrows():
        report.add(f"duplicate {'/'.join(key)} in {path.name}", "/".join(str(row[k]) for k in key), path)
    return df[~dup]


def _read_labels(path: Path, report: SkipReport) -> tuple[pd.DataFrame, set[int]]:
    """The CheXpert-labeler CSV: one row per study, values in {1, 0, -1, NaN}, and the studies skipped for
    unknown values (each a counted skip)."""
    df = read_csv_checked(path, CHEXPERT_COLUMNS)
    df = _to_int(df, ["subject_id", "study_id"], path, report)
    df = _drop_duplicates(df, ["study_id"], path, report)
    values = df[CHEXPERT_14].apply(pd.to_numeric, errors="coerce")
    # A cell that is not blank but did not parse, or parsed to something outside {1, 0, -1}.
    raw_blank = df[CHEXPERT_14].isna() | (df[CHEXPERT_14].astype(str).apply(lambda s: s.str.strip()) == "")
    unknown = (~raw_blank) & ~values.isin(LABEL_VALUES)
    bad_rows = unknown.any(axis=1)
    for idx in np.flatnonzero(bad_rows.to_numpy()):
        row = df.iloc[idx]
        cols = [c for c in CHEXPERT_14 if unknown.iloc[idx][c]]
        report.add(
            "unknown CheXpert label value (expected 1.0, 0.0, -1.0 or blank)",
            f"study {row['study_id']}: " + ", ".join(f"{c}={row[c]!r}" for c in cols),
            path,
        )
    out = df.loc[~bad_rows.to_numpy(), ["subject_id", "study_id"]].copy()
    out[CHEXPERT_14] = values.loc[~bad_rows.to_numpy()].astype(np.float32)
    return out, set(df.loc[bad_rows.to_numpy(), "study_id"].tolist())


PROBE_STUDIES = 1000  # studies whose report is looked for, spread over the list, when deciding where reports are


class _Reports:
    """Report texts from a ``files/`` tree or straight from PhysioNet's ``mimic-cxr-reports.zip``.

    A place holds the reports when one of ``studies`` (up to :data:`PROBE_STUDIES` of them, spread over the
    list) has its report there: a few ``stat`` calls, where a glob over ``files/p*/p*/`` would list every
    subject folder of an images-only MIMIC-CXR-JPG tree (65k of them) before finding no report. A
    ``reports_root`` that holds none, or no report found in any default place, is an error naming where it
    looked and the fix, never a "missing report file" skip for every study.
    """

    def __init__(self, root: Path, reports_root: Path | None, studies: Sequence[tuple[int, int]] = ()) -> None:
        self.zip = None
        self.dir = root
        step = max(1, len(studies) // PROBE_STUDIES)
        probe = [report_path(Path(""), a, b) for a, b in list(studies)[::step][:PROBE_STUDIES]]
        if reports_root is not None:
            reports_root = Path(reports_root)
            if not reports_root.exists():
                raise FileNotFoundError(f"{reports_root}: no such reports folder or zip; {_REPORTS_FIX}")
            if reports_root.is_file() and reports_root.suffix != ".zip":
                raise ValueError(f"{reports_root}: a file that is not a .zip; {_REPORTS_FIX}")
            if reports_root.is_dir() and not (reports_root / "files").is_dir():
                hint = ""
                if reports_root.name == "files":
                    hint = " (this is the files/ folder itself: pass its parent)"
                elif (reports_root / "mimic-cxr-reports.zip").is_file():
                    hint = f" (it holds {reports_root / 'mimic-cxr-reports.zip'}: pass that)"
                raise FileNotFoundError(f"{reports_root}: no files/ folder in it{hint}; {_REPORTS_FIX}")
            if not probe or self._open(reports_root, probe):
                return
            raise FileNotFoundError(f"{reports_root}: none of these studies' reports is there (looked for {len(probe)}, "
                                    f"e.g. {probe[0].as_posix()}; a MIMIC-CXR-JPG folder holds images only); "
                                    f"{_REPORTS_FIX}")
        if not probe:  # no study to read: nothing to find
            return
        for cand in (root, root / "mimic-cxr-reports", root / "mimic-cxr-reports.zip"):
            if ((cand.is_file() and cand.suffix == ".zip") or (cand / "files").is_dir()) and self._open(cand, probe):
                return
        raise FileNotFoundError(
            f"{root}: no MIMIC-CXR report of these studies in {root / 'files'}, {root / 'mimic-cxr-reports' / 'files'} "
            f"or {root / 'mimic-cxr-reports.zip'} (looked for {len(probe)}, e.g. {probe[0].as_posix()}). "
            "MIMIC-CXR-JPG ships without the reports: put PhysioNet's mimic-cxr-reports.zip (from MIMIC-CXR) there, "
            "or pass where they are: reports_root= / --reports DIR_OR_ZIP.")

    def _open(self, cand: Path, probe: Sequence[Path]) -> bool:
        """Use ``cand`` (a folder holding ``files/`` or a zip) if any probed report is in it; else leave it closed."""
        if cand.is_file():
            import zipfile

            try:
                zf = zipfile.ZipFile(cand)
            except zipfile.BadZipFile as exc:
                raise ValueError(f"{cand}: not a readable zip ({exc}); download mimic-cxr-reports.zip again.") from exc
            # "…/files/p10/p10000032/s50414267.txt" -> member name, whatever the prefix
            members = {"/".join(n.split("/")[-4:]): n for n in zf.namelist() if n.endswith(".txt")}
            if any(p.as_posix() in members for p in probe):
                self.zip, self.zip_path, self.members = zf, cand, members
                return True
            zf.close()
            return False
        if any((cand / p).is_file() for p in probe):
            self.dir = cand
            return True
        return False

    def close(self) -> None:
        """Close the zip file, if one is open."""
        if self.zip is not None:
            self.zip.close()

    def where(self, subject_id: int, study_id: int) -> Path:
        """The file (or zip member) a study's report is read from, for messages."""
        rel = report_path(Path(""), subject_id, study_id)
        return self.zip_path / rel if self.zip is not None else self.dir / rel

    def read(self, subject_id: int, study_id: int) -> str | None:
        """The report text, or None when the study has no report file."""
        if self.zip is not None:
            name = self.members.get(report_path(Path(""), subject_id, study_id).as_posix())
            return None if name is None else self.zip.read(name).decode("utf-8", errors="replace")
        try:
            return self.where(subject_id, study_id).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None


def load_mimic_pairs(
    root: Path | str,
    split: str | None = "train",
    views: Sequence[str] | None = ("PA", "AP"),
    reports_root: Path | str | None = None,
    check_files: bool = True,
) -> tuple[pd.DataFrame, SkipReport]:
    """One row per frontal image with its report text and study labels, plus the skips.

    Columns: dicom_id, subject_id, study_id, split, view, image_path, text, text_source, and the 14
    CheXpert columns (float32, NaN = blank). ``split=None`` keeps all splits; ``views=None`` keeps all views.
    Studies whose report is missing or has neither IMPRESSION nor FINDINGS are counted skips; a
    ``reports_root`` (folder holding ``files/``, or the zip) without any of their reports, or no reports under
    ``root`` when it is not given, raises FileNotFoundError naming the place and the fix.
    """
    root = Path(root)
    report = SkipReport("mimic")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root does not exist; pass --root / root= the MIMIC-CXR-JPG folder.")
    split_csv = find_csv(root, "mimic-cxr-2.0.0-split")
    meta_csv = find_csv(root, "mimic-cxr-2.0.0-metadata")
    label_csv = find_csv(root, "mimic-cxr-2.0.0-chexpert")
    if split is not None:
        split = _SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS} or None for all")

    sp = read_csv_checked(split_csv, SPLIT_COLUMNS, dtype={"dicom_id": str})
    sp["dicom_id"] = sp["dicom_id"].astype(str).str.strip()
    sp = _to_int(sp, ["study_id", "subject_id"], split_csv, report)
    sp = _drop_duplicates(sp, ["dicom_id"], split_csv, report)
    sp["split"] = sp["split"].astype(str).str.strip()
    unknown = ~sp["split"].isin(SPLITS)
    for _, row in sp[unknown].iterrows():
        report.add(f"unknown split value {row['split']!r} (expected train/validate/test)", row["dicom_id"], split_csv)
    sp = sp[~unknown]

    meta = read_csv_checked(meta_csv, METADATA_COLUMNS, dtype={"dicom_id": str})
    meta["dicom_id"] = meta["dicom_id"].astype(str).str.strip()
    meta = _drop_duplicates(meta, ["dicom_id"], meta_csv, report)
    meta = meta[["dicom_id", "ViewPosition"]].rename(columns={"ViewPosition": "view"})
    df = sp.merge(meta, on="dicom_id", how="left", indicator=True)
    no_meta = df["_merge"] == "left_only"
    for _, row in df[no_meta].iterrows():
        report.add("image has no row in the metadata CSV", row["dicom_id"], meta_csv)
    df = df[~no_meta].drop(columns="_merge")
    df["view"] = df["view"].fillna("").astype(str).str.strip()

    if split is not None:
        report.filter(f"split is not {split}", int((df["split"] != split).sum()))
        df = df[df["split"] == split]
    if views is not None:
        keep = df["view"].isin(list(views))
        report.filter(f"view not in {tuple(views)}", int((~keep).sum()))
        df = df[keep]

    labels, bad_studies = _read_labels(label_csv, report)
    # A study whose label row was skipped is left out too (already counted once, per study).
    df = df[~df["study_id"].isin(bad_studies)]
    # Studies without a labeler row keep blank (NaN) labels: real MIMIC has a few; they still pretrain.
    df = df.merge(labels.drop(columns="subject_id"), on="study_id", how="left")

    # Report text, once per study.
    studies = list(df[["subject_id", "study_id"]].drop_duplicates().itertuples(index=False, name=None))
    source = _Reports(root, Path(reports_root) if reports_root else None, studies)
    texts: dict[int, tuple[str, str]] = {}
    for subject_id, study_id in studies:
        rp = source.where(subject_id, study_id)
        raw = source.read(subject_id, study_id)
        if raw is None:
            report.add("missing report file", f"study {study_id}", rp)
            continue
        choice = choose_text(parse_sections(raw))
        if choice.empty:
            report.add("empty report: neither IMPRESSION nor FINDINGS has text", f"study {study_id}", rp)
            continue
        texts[int(study_id)] = (choice.text, choice.source)
    source.close()
    df = df[df["study_id"].isin(list(texts))].copy()
    df["text"] = [texts[s][0] for s in df["study_id"]]
    df["text_source"] = [texts[s][1] for s in df["study_id"]]

    df["image_path"] = [str(image_path(root, a, b, c)) for a, b, c in df[["subject_id", "study_id", "dicom_id"]].itertuples(index=False)]
    if check_files:
        exists = np.array([Path(p).is_file() for p in df["image_path"]], dtype=bool)
        for _, row in df[~exists].iterrows():
            report.add("missing image file", row["dicom_id"], row["image_path"])
        df = df[exists]

    cols = ["dicom_id", "subject_id", "study_id", "split", "view", "image_path", "text", "text_source", *CHEXPERT_14]
    df = df[cols].sort_values(["subject_id", "study_id", "dicom_id"]).reset_index(drop=True)
    for c in CHEXPERT_14:
        df[c] = df[c].astype(np.float32)
    return df, report


class MimicPretrainDataset(Dataset):
    """Image-report pairs: items ``{"image": (1, H, W) float, "text": str, "labels": (14,) float (NaN = blank),
    "study_id": int, "index": int}``. Images come from an :class:`ImageCache` when given, else from disk."""

    def __init__(self, pairs: pd.DataFrame, image_size: int = 224, transform=None, cache: ImageCache | None = None) -> None:
        if cache is not None:
            if list(cache.paths) != [str(p) for p in pairs["image_path"]]:
                raise ValueError("the cache was built for other image paths; build it from pairs['image_path']")
            keep = np.asarray(cache.valid, dtype=bool)
            self._slots = np.flatnonzero(keep)
            pairs = pairs.iloc[self._slots]
        else:
            self._slots = None
        self.pairs = pairs.reset_index(drop=True)
        self.image_size = int(image_size)
        self.transform = transform if transform is not None else eval_transform(self.image_size)
        self.cache = cache
        self._labels = torch.tensor(self.pairs[CHEXPERT_14].to_numpy(dtype=np.float32))
        self._texts = self.pairs["text"].tolist()
        self._studies = self.pairs["study_id"].to_numpy(dtype=np.int64)
        self._paths = self.pairs["image_path"].tolist()
        # False: items carry no image (nothing decoded or augmented), for a wrapper that supplies what the image
        # tower reads instead (mlip_core.train.TrunkFeatureDataset)
        self.load_images = True

    @classmethod
    def from_root(
        cls,
        root: Path | str,
        split: str = "train",
        image_size: int = 224,
        transform=None,
        cache_dir: Path | str | None = None,
        cache_size: int | None = None,
        reports_root: Path | str | None = None,
        cache_workers: int = 0,
    ) -> tuple[MimicPretrainDataset, SkipReport]:
        """Read the pairs and, with ``cache_dir``, cache images at ``cache_size`` (default: ``image_size``),
        decoding in ``cache_workers`` processes (0: this one)."""
        pairs, report = load_mimic_pairs(root, split=split, reports_root=reports_root)
        cache = None
        if cache_dir is not None:
            cache = ImageCache(cache_dir, pairs["image_path"].tolist(), cache_size or image_size,
                               num_workers=cache_workers)
            report.extend(cache.skips)
        return cls(pairs, image_size=image_size, transform=transform, cache=cache), report

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        """One pair; the image is (1, image_size, image_size) after the transform (absent if not load_images)."""
        item = {
            "text": self._texts[index],
            "labels": self._labels[index].clone(),
            "study_id": int(self._studies[index]),
            "index": int(index),
        }
        if self.load_images:
            arr = self.cache[int(self._slots[index])] if self.cache is not None else \
                load_uint8(self._paths[index], self.image_size)
            item["image"] = self.transform(arr)
        return item
