"""Check a dataset root and report what a run would see.

    python -m mlip_core.data.check --dataset mimic --root /data/mimic-cxr-jpg/2.0.0
    python -m mlip_core.data.check --dataset mimic --root /data/mimic-cxr-jpg/2.0.0 \
        --reports /data/mimic-cxr/2.0.0/mimic-cxr-reports.zip
    python -m mlip_core.data.check --dataset siim --root /data/siim --no-verify-images

Prints counts per split, every counted skip with its reason and file, and as the last line
``usable=<n> skipped=<m>``. Exit status 0 when something is usable, 1 when nothing is, 2 when the root
cannot be read at all (the error names the file and the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import pandas as pd

from .images import ImageReadError, read_image
from .skips import SkipReport

DATASETS = ("mimic", "chexpert", "rsna", "siim", "covidx", "object-cxr", "iu")
ALIASES = {"object_cxr": "object-cxr"}  # the transfer worlds' task name (mlip_core.data.transfer_worlds)


def _verify(df: pd.DataFrame, report: SkipReport, progress: bool) -> pd.DataFrame:
    """Decode every image; undecodable ones become counted skips and leave the table."""
    ok = []
    paths = df["image_path"].tolist()
    it = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, desc="decoding images", file=sys.stderr)
    for p in it:
        try:
            read_image(p)
            ok.append(True)
        except ImageReadError as exc:
            report.add("undecodable image", Path(p).name, str(exc).split(": ", 1)[0])
            ok.append(False)
    return df[ok]


def _split_tables(dataset: str, root: Path, args: argparse.Namespace) -> dict[str, tuple[pd.DataFrame, SkipReport]]:
    """{split name: (table, skips)} for the splits this dataset has on disk."""
    from . import downstream as D
    from .mimic import SPLITS, load_mimic_pairs

    views = None if args.all_views else tuple(v.strip() for v in args.views.split(",") if v.strip())
    if dataset == "mimic":
        # Read once (the CSVs are shared by all splits), then group: skips are counted once.
        df, report = load_mimic_pairs(root, split=None, views=views, reports_root=args.reports)
        empty = SkipReport("mimic")
        return {s: (df[df["split"] == s], report if i == 0 else empty) for i, s in enumerate(SPLITS)}
    if dataset == "chexpert":
        return {s: D.load_chexpert(root, s) for s in ("train", "valid")
                if s == "train" or any((root / d / f"{s}.csv").is_file() for d in ("", "CheXpert-v1.0-small", "CheXpert-v1.0"))}
    if dataset == "rsna":
        return {"train": D.load_rsna(root)}
    if dataset == "siim":
        return {"train": D.load_siim(root)}
    if dataset == "covidx":
        return {s: D.load_covidx(root, s) for s in ("train", "val", "test") if (root / f"{s}.txt").is_file() or s == "train"}
    if dataset == "object-cxr":
        return {s: D.load_object_cxr(root, s) for s in ("train", "dev") if (root / f"{s}.csv").is_file() or s == "train"}
    if dataset == "iu":
        return {"all": D.load_iu(root)}
    raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")


_DESCRIBE: dict[str, Callable[[pd.DataFrame], str]] = {
    "mimic": lambda d: f"{d['study_id'].nunique()} studies, {d['subject_id'].nunique()} subjects",
    "chexpert": lambda d: f"{d['patient'].nunique()} patients",
    "rsna": lambda d: f"{int(d['target'].sum())} with pneumonia boxes, {int(d['boxes'].map(len).sum())} boxes",
    "siim": lambda d: f"{int(d['pneumothorax'].sum())} with pneumothorax",
    "covidx": lambda d: ", ".join(f"{k}={v}" for k, v in d["label"].value_counts().sort_index().items()),
    "object-cxr": lambda d: f"{int(d['has_object'].sum())} with foreign objects",
    "iu": lambda d: f"{d['uid'].nunique()} reports, {int(d['normal'].sum())} images of 'normal' reports",
}


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m mlip_core.data.check", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=DATASETS + tuple(ALIASES))
    ap.add_argument("--root", type=Path, default=None,
                    help="the dataset folder (as downloaded); optional for iu, whose reports ship with torchxrayvision")
    ap.add_argument("--views", default="PA,AP", help="MIMIC views to keep (comma-separated ViewPosition values)")
    ap.add_argument("--all-views", action="store_true", help="MIMIC: keep every view (laterals too)")
    ap.add_argument("--reports", type=Path, default=None, metavar="DIR_OR_ZIP",
                    help="MIMIC: the reports when not under --root (MIMIC-CXR ships them apart from MIMIC-CXR-JPG): "
                         "the folder that holds their files/ tree, or mimic-cxr-reports.zip")
    ap.add_argument("--no-verify-images", action="store_true", help="skip decoding every image (faster)")
    ap.add_argument("--progress", action="store_true", help="progress bar while decoding images")
    args = ap.parse_args(argv)
    args.dataset = ALIASES.get(args.dataset, args.dataset)
    if args.reports is not None and args.dataset != "mimic":
        ap.error("--reports is for --dataset mimic (MIMIC-CXR ships its reports apart from MIMIC-CXR-JPG)")

    if args.root is None:
        if args.dataset != "iu":
            ap.error(f"--root is required for {args.dataset}: the folder the dataset was downloaded to")
        return _check_iu_reports()
    print(f"dataset={args.dataset} root={args.root}" + (f" reports={args.reports}" if args.reports else ""))
    if not args.root.is_dir():
        print(f"error: {args.root}: no such folder; pass --root the folder the dataset was downloaded to.",
              file=sys.stderr)
        print("usable=0 skipped=0")
        return 2
    try:
        tables = _split_tables(args.dataset, args.root, args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("usable=0 skipped=0")
        return 2

    total = SkipReport(args.dataset)
    usable = 0
    for split, (df, report) in tables.items():
        if not args.no_verify_images and len(df):
            df = _verify(df, report, args.progress)
        describe = _DESCRIBE[args.dataset](df) if len(df) else "nothing usable"
        print(f"split {split:<9s} {len(df):>7d} images  {describe}  ({len(report)} skipped)")
        usable += len(df)
        total.extend(report)
    # Reports read once per split repeat the same file-level skips (e.g. a duplicate row): count each once.
    unique = list(dict.fromkeys(total.skips))
    total.skips = unique
    print(total.summary(max_examples=2))
    for s in unique:
        print(f"  skipped: {s.reason} | {s.item} | {s.path}")
    print(f"usable={usable} skipped={len(unique)}")
    return 0 if usable else 1


def _check_iu_reports() -> int:
    """``--dataset iu`` without ``--root``: the reports that ship with torchxrayvision (the images do not)."""
    from . import downstream as D
    from .iu import iu_archive_path

    try:
        archive = iu_archive_path()
        df, report = D.load_iu(archive.parent, archive=archive, check_files=False)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("usable=0 skipped=0")
        return 2
    print(f"dataset=iu reports={archive} (images not checked: pass --root with the NLMCXR PNGs to check them)")
    print(f"reports {df['uid'].nunique():>7d}  {len(df)} image references, "
          f"{df.drop_duplicates('uid')['normal'].sum()} reports indexed 'normal' only  ({len(report)} skipped)")
    unique = list(dict.fromkeys(report.skips))
    report.skips = unique
    print(report.summary(max_examples=2))
    print(f"usable={df['uid'].nunique()} skipped={len(unique)}")
    return 0 if len(df) else 1


if __name__ == "__main__":
    sys.exit(main())
