"""The catalogue of bad input (issue 14): one table-driven list of cases shared by pytest and the report.

Every case builds a small real-format input in a fresh folder, feeds it to one component and asserts its
OUTCOME, one of:

- ``error``: an exception (or a CLI exit with an ``error:`` line) whose message names the offending file or
  parameter and says how to fix it (a fix verb such as "use", "pass", "re-download", "expected");
- ``skip``: the reader returns a :class:`~mlip_core.data.skips.SkipReport` whose count for the reason is
  exactly the number of bad rows, and every good row is kept (rows + skips = input rows);
- ``ok``: odd but valid input (16-bit, MONOCHROME1, a 1x1 image, ...) that must come out right.

No case may end in an unrelated bare exception (KeyError, IndexError, UnicodeDecodeError, ...): the checker
only accepts the exception types a component documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: toy_clip, ...

from mlip_core.data.fixture_trees import (  # noqa: E402
    make_chexpert_tree,
    make_covidx_tree,
    make_iu_tree,
    make_mimic_tree,
    make_object_cxr_tree,
    make_rsna_tree,
    make_siim_tree,
    truncate,
    write_dicom,
    write_jpg,
    write_png,
)

FIX_VERBS = ("use", "pass", "rewrite", "run", "expected", "re-download", "remove", "point", "delete", "check",
             "choose", "re-export", "resume", "move", "reinstall", "start")
# Whole words only: "use_gpu" or "Unexpected key(s)" in a message is no fix.
_FIX = re.compile(r"(?<![\w-])(" + "|".join(re.escape(v) for v in FIX_VERBS) + r")(?![\w-])", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    """One kind of bad input: ``check(tmp)`` builds it under ``tmp``, asserts the outcome, returns the message."""

    id: str
    component: str
    bad_input: str
    expect: str  # "error" | "skip" | "ok"
    check: Callable[[Path], str]


CASES: list[Case] = []


def case(id: str, component: str, bad_input: str, expect: str):
    """Register the decorated checker as a catalogue case."""
    assert expect in ("error", "skip", "ok")

    def deco(fn: Callable[[Path], str]) -> Callable[[Path], str]:
        assert all(c.id != id for c in CASES), f"duplicate case id {id}"
        CASES.append(Case(id, component, bad_input, expect, fn))
        return fn

    return deco


# ----------------------------------------------------------------------------------------------------------
# Outcome checkers
def expect_error(fn: Callable[[], object], types: tuple[type[BaseException], ...], *names: str) -> str:
    """``fn()`` must raise one of ``types`` whose message holds every ``names`` substring and a fix verb."""
    try:
        fn()
    except types as exc:
        msg = str(exc)
    else:
        raise AssertionError(f"expected {', '.join(t.__name__ for t in types)}; nothing was raised")
    return _check_message(msg, names)


def _check_message(msg: str, names: tuple[str, ...]) -> str:
    for name in names:
        assert name in msg, f"the message does not name {name!r}: {msg}"
    assert _FIX.search(msg), f"the message says no fix (none of {FIX_VERBS}): {msg}"
    return msg


def expect_cli_error(main: Callable[[list[str]], int], argv: list[str], status: int, *names: str) -> str:
    """A CLI ``main(argv)`` must return ``status`` with an ``error:`` line (no traceback) naming ``names``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    text = err.getvalue()
    assert rc == status, f"exit status {rc}, expected {status}; stderr: {text[-400:]}"
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert lines, f"no 'error:' line on stderr: {text[-400:]}"
    return _check_message(text[text.index("error:"):].strip(), names)


def expect_skips(df: pd.DataFrame, report, reason: str, n_bad: int, n_good: int, n_input: int | None = None) -> str:
    """Exactly ``n_bad`` skips whose reason contains ``reason``, ``n_good`` rows kept, nothing else skipped;
    with ``n_input``: rows + skips == input rows (nothing dropped silently)."""
    counts = report.counts()
    got = sum(n for r, n in counts.items() if reason in r)
    assert got == n_bad, f"{got} skips for {reason!r}, expected {n_bad}: {counts}"
    assert len(report) == n_bad, f"other skips too: {counts}"
    assert len(df) == n_good, f"{len(df)} rows kept, expected {n_good}; skips {counts}"
    if n_input is not None:
        assert len(df) + len(report) == n_input, f"{len(df)} rows + {len(report)} skips != {n_input} input rows"
    first = next(s for s in report.skips if reason in s.reason)
    return f"{n_bad} skipped: {first.reason} | {first.item} | {Path(first.path).name}"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Images (mlip_core/data/images.py, cache.py)
def _image_error(path: Path) -> str:
    from mlip_core.data.images import ImageReadError, read_image

    return expect_error(lambda: read_image(path), (ImageReadError,), path.name, "re-download")


@case("img-truncated-jpeg", "images.read_image", "JPEG cut to 40% of its bytes", "error")
def _(tmp: Path) -> str:
    return _image_error(truncate(write_jpg(tmp / "cut.jpg", 256, 256)))


@case("img-truncated-png", "images.read_image", "PNG cut to 40% of its bytes", "error")
def _(tmp: Path) -> str:
    return _image_error(truncate(write_png(tmp / "cut.png", 256, 256)))


@case("img-corrupt-dicom", "images.read_image", "a .dcm file of garbage bytes", "error")
def _(tmp: Path) -> str:
    path = tmp / "garbage.dcm"
    path.write_bytes(b"\x00not a dicom file" * 64)
    return _image_error(path)


@case("img-truncated-dicom", "images.read_image", "DICOM cut inside its pixel data", "error")
def _(tmp: Path) -> str:
    return _image_error(truncate(write_dicom(tmp / "cut.dcm"), keep=0.6))


@case("img-16bit-png", "images.read_image", "16-bit grey PNG (mode I;16)", "ok")
def _(tmp: Path) -> str:
    from mlip_core.data.images import read_image

    ramp = (np.linspace(0, 65535, 40 * 48).reshape(48, 40)).astype(np.uint16)
    path = tmp / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I"), Image.open(path).mode
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (48, 40)
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out.ravel().astype(int)) >= 0)
    return f"uint8 {out.shape}, range {out.min()}..{out.max()}, monotone"


@case("img-16bit-dicom", "images.read_image", "DICOM with 16 bits stored", "ok")
def _(tmp: Path) -> str:
    from mlip_core.data.images import read_image

    out8 = read_image(write_dicom(tmp / "b8.dcm", bits_stored=8))
    out16 = read_image(write_dicom(tmp / "b16.dcm", bits_stored=16))
    assert out16.dtype == np.uint8 and out16.shape == out8.shape
    assert np.abs(out16.astype(int) - out8.astype(int)).max() <= 2, "16-bit and 8-bit copies disagree"
    return f"uint8 {out16.shape}, equals the 8-bit copy within 2 grey levels"


@case("img-monochrome1", "images.read_image", "MONOCHROME1 DICOM (minimum value is white)", "ok")
def _(tmp: Path) -> str:
    from mlip_core.data.images import read_image

    m1 = read_image(write_dicom(tmp / "m1.dcm", photometric="MONOCHROME1"))
    m2 = read_image(write_dicom(tmp / "m2.dcm", photometric="MONOCHROME2"))
    raw = write_dicom(tmp / "m1raw.dcm", photometric="MONOCHROME1")
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 2, "MONOCHROME1 was not inverted to display polarity"
    import pydicom

    stored = pydicom.dcmread(raw).pixel_array
    assert np.corrcoef(stored.ravel(), m1.ravel())[0, 1] < -0.9  # inverted, not dropped
    return "inverted: equals the MONOCHROME2 copy within 2 grey levels"


@case("img-1x1", "images.load_uint8", "1x1-pixel PNG resized to 32", "ok")
def _(tmp: Path) -> str:
    from mlip_core.data.images import load_uint8

    path = tmp / "dot.png"
    Image.fromarray(np.full((1, 1), 200, np.uint8), mode="L").save(path)
    out = load_uint8(path, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8 and out.max() == 200
    return "resized to (32, 32), padded"


def _png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose data holds one row of grey."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * min(width, 1000))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@case("img-absurd-png-header", "images.read_image", "PNG header claiming 100000x100000 pixels, 1 KB of data", "error")
def _(tmp: Path) -> str:
    return _image_error(_png_with_header(tmp / "huge.png", 100_000, 100_000))


@case("img-absurd-wide-png", "images.read_image", "PNG header claiming 100000x2 pixels, one short row", "error")
def _(tmp: Path) -> str:
    return _image_error(_png_with_header(tmp / "wide.png", 100_000, 2))


@case("img-absurd-dicom-header", "images.read_image", "DICOM header Rows=65535 Columns=65535 over 48x40 pixels",
      "error")
def _(tmp: Path) -> str:
    import pydicom

    path = write_dicom(tmp / "wide.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 65535, 65535  # the largest a DICOM US element holds (100000 cannot be written)
    ds.save_as(path)
    return _image_error(path)


@case("cache-undecodable", "cache.ImageCache", "2 good JPEGs + 1 truncated JPEG in the cache's paths", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.cache import ImageCache

    paths = [write_jpg(tmp / f"i{i}.jpg", 128, 128, seed=i) for i in range(3)]
    truncate(paths[1])
    cache = ImageCache(tmp / "cache", paths, 32)
    valid = np.asarray(cache.valid, dtype=bool)
    assert valid.tolist() == [True, False, True], valid
    return expect_skips(pd.DataFrame(index=np.flatnonzero(valid)), cache.skips, "undecodable image", 1, 2, 3)


# ----------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG (mlip_core/data/mimic.py)
def _mimic(tmp: Path, gz: bool = False) -> dict:
    return make_mimic_tree(tmp / "mimic", n_subjects=3, studies_per_subject=2, gz=gz)


def _load_mimic(tree: dict):
    from mlip_core.data.mimic import load_mimic_pairs

    return load_mimic_pairs(tree["root"], split=None)


def _mimic_missing_column(tmp: Path, key: str, column: str) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    tree = _mimic(tmp)
    path = tree[key]
    pd.read_csv(path).drop(columns=[column]).to_csv(path, index=False)
    return expect_error(lambda: load_mimic_pairs(tree["root"], split=None), (ValueError,), path.name, column)


@case("mimic-split-missing-column", "mimic.load_mimic_pairs", "split CSV without its 'split' column", "error")
def _(tmp: Path) -> str:
    return _mimic_missing_column(tmp, "split_csv", "split")


@case("mimic-metadata-missing-column", "mimic.load_mimic_pairs", "metadata CSV without 'ViewPosition'", "error")
def _(tmp: Path) -> str:
    return _mimic_missing_column(tmp, "metadata_csv", "ViewPosition")


@case("mimic-chexpert-wrong-column", "mimic.load_mimic_pairs", "chexpert CSV with 'Edema' renamed 'edema'", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    tree = _mimic(tmp)
    path = tree["chexpert_csv"]
    pd.read_csv(path).rename(columns={"Edema": "edema"}).to_csv(path, index=False)
    return expect_error(lambda: load_mimic_pairs(tree["root"], split=None), (ValueError,), path.name, "Edema")


@case("mimic-truncated-gz-csv", "mimic.load_mimic_pairs", "metadata .csv.gz cut to half its bytes", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    tree = _mimic(tmp, gz=True)
    truncate(tree["metadata_csv"], keep=0.5)
    return expect_error(lambda: load_mimic_pairs(tree["root"], split=None), (ValueError,),
                        tree["metadata_csv"].name, "re-download")


@case("mimic-duplicate-dicom-id", "mimic.load_mimic_pairs", "split CSV with one dicom_id row twice", "skip")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    sp = pd.read_csv(tree["split_csv"], dtype={"dicom_id": str})
    pd.concat([sp, sp.iloc[[0]]]).to_csv(tree["split_csv"], index=False)
    df, rep = _load_mimic(tree)
    return expect_skips(df, rep, "duplicate dicom_id", 1, len(base))


@case("mimic-non-integer-id", "mimic.load_mimic_pairs", "split CSV row with study_id 'abc'", "skip")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    sp = pd.read_csv(tree["split_csv"], dtype=str)
    bad = sp.index[sp["dicom_id"] == tree["frontal"][0][0]][0]
    sp.loc[bad, "study_id"] = "abc"
    sp.to_csv(tree["split_csv"], index=False)
    df, rep = _load_mimic(tree)
    return expect_skips(df, rep, "non-integer id", 1, len(base) - 1)


@case("mimic-unknown-label-value", "mimic.load_mimic_pairs", "chexpert CSV cell 'Edema' = 2.0 for one study",
      "skip")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    lab = pd.read_csv(tree["chexpert_csv"])
    study = int(lab.loc[0, "study_id"])
    lab.loc[0, "Edema"] = 2.0
    lab.to_csv(tree["chexpert_csv"], index=False)
    df, rep = _load_mimic(tree)
    n_study = int((base["study_id"] == study).sum())  # the study's images leave with its one label row
    assert study not in set(df["study_id"])
    return expect_skips(df, rep, "unknown CheXpert label value", 1, len(base) - n_study)


def _one_report(tree: dict) -> tuple[Path, int]:
    _, study, _ = tree["frontal"][0]
    return next(tree["root"].rglob(f"s{study}.txt")), study


@case("mimic-empty-report", "mimic.load_mimic_pairs", "one study's report file is empty", "skip")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    path, study = _one_report(tree)
    path.write_text("")
    df, rep = _load_mimic(tree)
    return expect_skips(df, rep, "empty report", 1, len(base) - int((base["study_id"] == study).sum()))


@case("mimic-missing-report", "mimic.load_mimic_pairs", "one study's report file deleted", "skip")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    path, study = _one_report(tree)
    path.unlink()
    df, rep = _load_mimic(tree)
    return expect_skips(df, rep, "missing report file", 1, len(base) - int((base["study_id"] == study).sum()))


@case("mimic-non-utf8-report", "mimic.load_mimic_pairs", "report in Latin-1 ('pleural effusion \\xe9')", "ok")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    path, study = _one_report(tree)
    path.write_bytes(b" FINDINGS: Small pleural effusion \xe9 noted.\n IMPRESSION: Effusion caf\xe9.\n")
    df, rep = _load_mimic(tree)
    assert len(rep) == 0 and len(df) == len(base), rep.summary()
    text = df.loc[df["study_id"] == study, "text"].iloc[0]
    assert "Effusion caf" in text and "\ufffd" in text, text
    return "kept: undecodable bytes become U+FFFD, the rest of the text is read"


@case("mimic-missing-image", "mimic.load_mimic_pairs", "one frontal JPEG deleted", "skip")
def _(tmp: Path) -> str:
    tree = _mimic(tmp)
    base, _ = _load_mimic(tree)
    Path(base["image_path"].iloc[0]).unlink()
    df, rep = _load_mimic(tree)
    return expect_skips(df, rep, "missing image file", 1, len(base) - 1, len(base))


@case("mimic-root-missing", "mimic.load_mimic_pairs", "a data root that does not exist", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    return expect_error(lambda: load_mimic_pairs(tmp / "nowhere"), (FileNotFoundError,), "nowhere", "pass")


@case("mimic-root-is-chexpert", "mimic.load_mimic_pairs", "a CheXpert folder given as the MIMIC root", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    root = make_chexpert_tree(tmp, 2, 1)["root"]
    return expect_error(lambda: load_mimic_pairs(root), (FileNotFoundError,), "mimic-cxr-2.0.0-split.csv", "point")


@case("mimic-reports-nowhere", "mimic.load_mimic_pairs", "MIMIC-CXR-JPG without reports, none elsewhere named",
      "error")
def _(tmp: Path) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    tree = _mimic(tmp)
    for path in (tree["root"] / "files").glob("p*/p*/s*.txt"):
        path.unlink()
    return expect_error(lambda: load_mimic_pairs(tree["root"]), (FileNotFoundError,), "mimic-cxr-reports.zip",
                        "--reports DIR_OR_ZIP")


@case("mimic-reports-root-without-files", "mimic.load_mimic_pairs", "reports_root: a folder with no files/ in it",
      "error")
def _(tmp: Path) -> str:
    from mlip_core.data.mimic import load_mimic_pairs

    tree, empty = _mimic(tmp), tmp / "reports"
    empty.mkdir()
    return expect_error(lambda: load_mimic_pairs(tree["root"], reports_root=empty), (FileNotFoundError,),
                        str(empty), "no files/ folder", "pass")


# ----------------------------------------------------------------------------------------------------------
# CheXpert (mlip_core/data/downstream.py)
def _chexpert(tmp: Path) -> dict:
    return make_chexpert_tree(tmp, n_train=6, n_valid=2)


def _load_chexpert(tree: dict):
    from mlip_core.data.downstream import load_chexpert

    return load_chexpert(tree["root"], "train")


@case("chexpert-missing-column", "downstream.load_chexpert", "train.csv without the 'AP/PA' column", "error")
def _(tmp: Path) -> str:
    tree = _chexpert(tmp)
    pd.read_csv(tree["train_csv"]).drop(columns=["AP/PA"]).to_csv(tree["train_csv"], index=False)
    return expect_error(lambda: _load_chexpert(tree), (ValueError,), "train.csv", "AP/PA")


@case("chexpert-unknown-label-value", "downstream.load_chexpert", "train.csv 'Edema' = 2.0 on one frontal row",
      "skip")
def _(tmp: Path) -> str:
    tree = _chexpert(tmp)
    base, _ = _load_chexpert(tree)
    df = pd.read_csv(tree["train_csv"])
    df.loc[0, "Edema"] = 2.0  # row 0 is frontal
    df.to_csv(tree["train_csv"], index=False)
    out, rep = _load_chexpert(tree)
    return expect_skips(out, rep, "unknown label value", 1, len(base) - 1, len(base))


@case("chexpert-duplicate-path", "downstream.load_chexpert", "train.csv with one frontal Path row twice", "skip")
def _(tmp: Path) -> str:
    tree = _chexpert(tmp)
    base, _ = _load_chexpert(tree)
    df = pd.read_csv(tree["train_csv"])
    pd.concat([df, df.iloc[[0]]]).to_csv(tree["train_csv"], index=False)
    out, rep = _load_chexpert(tree)
    return expect_skips(out, rep, "duplicate Path", 1, len(base), len(base) + 1)


@case("chexpert-missing-image", "downstream.load_chexpert", "one frontal JPG deleted", "skip")
def _(tmp: Path) -> str:
    tree = _chexpert(tmp)
    base, _ = _load_chexpert(tree)
    Path(base["image_path"].iloc[0]).unlink()
    out, rep = _load_chexpert(tree)
    return expect_skips(out, rep, "missing image file", 1, len(base) - 1, len(base))


@case("chexpert-non-utf8-csv", "downstream.load_chexpert", "train.csv saved in Latin-1 with an accented cell",
      "error")
def _(tmp: Path) -> str:
    tree = _chexpert(tmp)
    df = pd.read_csv(tree["train_csv"])
    df.loc[0, "Sex"] = "F\xe9minin"
    df.to_csv(tree["train_csv"], index=False, encoding="latin-1")
    return expect_error(lambda: _load_chexpert(tree), (ValueError,), "train.csv", "re-download")


@case("chexpert-root-is-siim", "downstream.load_chexpert", "the SIIM folder given as the CheXpert root", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_chexpert

    root = make_siim_tree(tmp / "siim", n=2)["root"]
    return expect_error(lambda: load_chexpert(root), (FileNotFoundError,), "train.csv", "point")


@case("chexpert-root-missing", "downstream.load_chexpert", "a data root that does not exist", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_chexpert

    return expect_error(lambda: load_chexpert(tmp / "nowhere"), (FileNotFoundError,), "nowhere", "point")


# ----------------------------------------------------------------------------------------------------------
# RSNA, SIIM, COVIDx, Object-CXR, IU (mlip_core/data/downstream.py, iu.py)
@case("rsna-unknown-target", "downstream.load_rsna", "stage_2_train_labels.csv with Target 'x' on one row", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_rsna

    tree = make_rsna_tree(tmp / "rsna", n=6)
    base, _ = load_rsna(tree["root"])
    df = pd.read_csv(tree["labels_csv"], dtype=str)
    df.loc[df.index[-1], "Target"] = "x"  # the last patient: Target 0, one row
    df.to_csv(tree["labels_csv"], index=False)
    out, rep = load_rsna(tree["root"])
    return expect_skips(out, rep, "unknown Target value", 1, len(base) - 1, len(base))


@case("rsna-missing-column", "downstream.load_rsna", "stage_2_train_labels.csv without 'Target'", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_rsna

    tree = make_rsna_tree(tmp / "rsna", n=2)
    pd.read_csv(tree["labels_csv"]).drop(columns=["Target"]).to_csv(tree["labels_csv"], index=False)
    return expect_error(lambda: load_rsna(tree["root"]), (ValueError,), "stage_2_train_labels.csv", "Target")


@case("siim-wrong-rle-header", "downstream.load_siim", "train-rle.csv headed 'ImageId, Pixels'", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_siim

    tree = make_siim_tree(tmp / "siim", n=2)
    text = tree["rle_csv"].read_text().replace("EncodedPixels", "Pixels", 1)
    tree["rle_csv"].write_text(text)
    return expect_error(lambda: load_siim(tree["root"]), (ValueError,), "train-rle.csv", "EncodedPixels")


@case("siim-malformed-rle", "downstream.load_siim", "one ImageId with EncodedPixels 'abc 3'", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_siim

    tree = make_siim_tree(tmp / "siim", n=5)
    base, _ = load_siim(tree["root"])
    lines = tree["rle_csv"].read_text().splitlines()
    image_id = lines[-1].split(",")[0]  # the last image: one row, "-1"
    lines[-1] = f"{image_id}, abc 3"
    tree["rle_csv"].write_text("\n".join(lines) + "\n")
    out, rep = load_siim(tree["root"])
    return expect_skips(out, rep, "malformed RLE", 1, len(base) - 1, len(base))


@case("siim-missing-dicom", "downstream.load_siim", "one ImageId's DICOM deleted", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_siim

    tree = make_siim_tree(tmp / "siim", n=5)
    base, _ = load_siim(tree["root"])
    Path(base["image_path"].iloc[0]).unlink()
    out, rep = load_siim(tree["root"])
    return expect_skips(out, rep, "missing DICOM file", 1, len(base) - 1, len(base))


@case("covidx-duplicate-filename", "downstream.load_covidx", "train.txt naming one filename twice", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_covidx

    tree = make_covidx_tree(tmp / "covidx", 6, 2)
    path = tmp / "covidx" / "train.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[0]]) + "\n")
    out, rep = load_covidx(tree["root"], "train")
    return expect_skips(out, rep, "duplicate filename", 1, len(lines), len(lines) + 1)


@case("covidx-unknown-label", "downstream.load_covidx", "train.txt line with label 'flu'", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_covidx

    tree = make_covidx_tree(tmp / "covidx", 6, 2)
    path = tmp / "covidx" / "train.txt"
    lines = path.read_text().splitlines()
    tok = lines[0].split()
    lines[0] = " ".join([tok[0], tok[1], "flu", tok[3]])
    path.write_text("\n".join(lines) + "\n")
    out, rep = load_covidx(tree["root"], "train")
    return expect_skips(out, rep, "unknown label", 1, len(lines) - 1, len(lines))


@case("covidx-missing-image", "downstream.load_covidx", "one train image deleted", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_covidx

    tree = make_covidx_tree(tmp / "covidx", 6, 2)
    (tree["root"] / "train" / "train_000.jpg").unlink()
    out, rep = load_covidx(tree["root"], "train")
    return expect_skips(out, rep, "missing image file", 1, 5, 6)


@case("object-cxr-malformed-annotation", "downstream.load_object_cxr", "annotation '7 1 2 3 4' (no such type)",
      "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_object_cxr

    tree = make_object_cxr_tree(tmp / "ocxr", 4, 1)
    path = tree["root"] / "train.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[1, "annotation"] = "7 1 2 3 4"
    df.to_csv(path, index=False)
    out, rep = load_object_cxr(tree["root"], "train")
    return expect_skips(out, rep, "malformed annotation", 1, 3, 4)


@case("iu-empty-report", "downstream.load_iu", "an OpenI report with empty FINDINGS and IMPRESSION", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_iu

    tree = make_iu_tree(tmp / "iu", n=4)
    out, rep = load_iu(tree["root"])
    assert tree["empty_uid"] not in set(out["uid"])
    return expect_skips(out, rep, "empty report", 1, 2 * 3)  # 3 good reports x 2 images


@case("iu-missing-image", "downstream.load_iu", "one IU PNG deleted", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.downstream import load_iu

    tree = make_iu_tree(tmp / "iu", n=3)
    (tree["root"] / "images" / f"{tree['image_ids']['CXR1'][0]}.png").unlink()
    out, rep = load_iu(tree["root"])
    # report 3 is the empty one (skipped); reports 1-2 hold 4 images, one missing
    assert {s.reason for s in rep.skips} == {"empty report: neither IMPRESSION nor FINDINGS has text",
                                             "missing image file"}
    assert rep.counts()["missing image file"] == 1 and len(out) == 3
    return f"1 skipped: missing image file | {tree['image_ids']['CXR1'][0]}.png"


def _iu_archive(tmp: Path, xml: bytes) -> Path:
    archive = tmp / "iu" / "NLMCXR_reports.tgz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("ecgen-radiology/1.xml")
        info.size = len(xml)
        tar.addfile(info, io.BytesIO(xml))
    return archive


@case("iu-malformed-xml", "iu.load_iu_reports", "an OpenI report XML cut mid-element", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.iu import load_iu_reports

    archive = _iu_archive(tmp, b'<?xml version="1.0"?><eCitation><uId id="CXR1"/><MedlineCit')
    return expect_error(lambda: load_iu_reports(archive), (ValueError,), "NLMCXR_reports.tgz", "1.xml")


@case("iu-truncated-archive", "iu.load_iu_reports", "NLMCXR_reports.tgz cut to half its bytes", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.iu import load_iu_reports

    archive = make_iu_tree(tmp / "iu", n=40)["archive"]
    truncate(archive, keep=0.5)
    return expect_error(lambda: load_iu_reports(archive), (ValueError,), "NLMCXR_reports.tgz")


# ----------------------------------------------------------------------------------------------------------
# The dataset check CLI (mlip_core/data/check.py)
@case("check-root-missing", "check.main (CLI)", "--root of a folder that does not exist", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.check import main

    return expect_cli_error(main, ["--dataset", "rsna", "--root", str(tmp / "nowhere")], 2, "nowhere")


@case("check-root-is-other-dataset", "check.main (CLI)", "--dataset chexpert --root <the SIIM folder>", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.check import main

    root = make_siim_tree(tmp / "siim", n=2)["root"]
    return expect_cli_error(main, ["--dataset", "chexpert", "--root", str(root)], 2, "train.csv")


@case("check-undecodable-dicom", "check.main (CLI)", "RSNA tree with one DICOM truncated", "skip")
def _(tmp: Path) -> str:
    from mlip_core.data.check import main

    tree = make_rsna_tree(tmp / "rsna", n=4)
    bad = sorted((tree["root"] / "stage_2_train_images").glob("*.dcm"))[0]
    truncate(bad, keep=0.6)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["--dataset", "rsna", "--root", str(tree["root"])])
    text = out.getvalue()
    assert rc == 0, text
    assert "usable=3 skipped=1" in text, text
    assert f"undecodable image | {bad.name}" in text, text
    return f"usable=3 skipped=1: undecodable image | {bad.name}"


# ----------------------------------------------------------------------------------------------------------
# World writers (mlip_core/data/synth.py, transfer_worlds.py): a foreign folder loses nothing
@case("world-foreign-mimic-folder", "synth.ensure_world", "a real MIMIC-CXR-JPG tree as the world folder", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.synth import ensure_world

    root = make_mimic_tree(tmp / "mimic", n_subjects=2, studies_per_subject=1, gz=False)["root"]
    before = _digest(root)
    msg = expect_error(lambda: ensure_world(root, num_studies=4, seed=0, image_size=32), (FileExistsError,),
                       str(root), "nothing was removed")
    assert _digest(root) == before, "a file of the foreign folder changed"
    return msg


@case("world-write-into-foreign-folder", "synth.write_world", "write_world into a MIMIC-CXR-JPG tree", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.synth import write_world

    root = make_mimic_tree(tmp / "mimic", n_subjects=2, studies_per_subject=1, gz=False)["root"]
    before = _digest(root)
    msg = expect_error(lambda: write_world(root, num_studies=4, seed=0, image_size=32), (FileExistsError,),
                       str(root), "mimic-cxr-2.0.0")
    assert _digest(root) == before, "a file of the foreign folder changed"
    return msg


@case("world-beside-other-dataset", "synth.ensure_world", "a SIIM folder (no MIMIC names) as the world folder",
      "ok")
def _(tmp: Path) -> str:
    from mlip_core.data.synth import MANIFEST_NAME, ensure_world

    root = make_siim_tree(tmp / "siim", n=2)["root"]
    before = _digest(root)
    ensure_world(root, num_studies=3, seed=0, image_size=32, report_source="template")
    after = _digest(root)
    assert all(after.get(k) == v for k, v in before.items()), "a file of the foreign folder changed or vanished"
    assert (root / MANIFEST_NAME).is_file()
    return f"world written beside the {len(before)} SIIM files; every one kept byte for byte"


@case("transfer-world-foreign-folder", "transfer_worlds.ensure_transfer_world",
      "a real CheXpert folder as the chexpert world folder", "error")
def _(tmp: Path) -> str:
    from mlip_core.data.transfer_worlds import ensure_transfer_world

    root = make_chexpert_tree(tmp / "data", 2, 1)["root"]
    before = _digest(root)
    msg = expect_error(lambda: ensure_transfer_world("chexpert", root, num_images=400, seed=0, image_size=32,
                                                     min_test_positives=2),
                       (FileExistsError,), str(root), "nothing was touched")
    assert _digest(root) == before, "a file of the foreign folder changed"
    return msg


# ----------------------------------------------------------------------------------------------------------
# The labeler (mlip_core/knowledge/extract.py)
_EXTRACTOR = []


def _extractor():
    from mlip_core.knowledge.extract import KnowledgeExtractor

    if not _EXTRACTOR:
        _EXTRACTOR.append(KnowledgeExtractor())
    return _EXTRACTOR[0]


@case("labeler-nan-report", "extract.report_labels", "report text NaN (a blank CSV cell) / None / ''", "ok")
def _(tmp: Path) -> str:
    import math

    ex = _extractor()
    for text in (float("nan"), None, "", "   \n"):
        labels = ex.report_labels(text)
        assert all(math.isnan(v) for v in labels.values()), (text, labels)
    return "all 14 labels NaN (not mentioned) for NaN, None, '' and blank"


@case("labeler-non-utf8-report", "extract.report_labels", "text with U+FFFD replacement chars and Latin-1 bytes",
      "ok")
def _(tmp: Path) -> str:
    ex = _extractor()
    text = b"Large left pleural effusion \xe9\xff. No pneumothorax.".decode("utf-8", errors="replace")
    labels = ex.report_labels(text)
    assert labels["Pleural Effusion"] == 1.0 and labels["Pneumothorax"] == 0.0, labels
    raw = ex.report_labels(b"Large left pleural effusion \xe9.")  # bytes: decoded, not a crash
    assert raw["Pleural Effusion"] == 1.0, raw
    return "Pleural Effusion=1, Pneumothorax=0; bytes are decoded with replacement"


# ----------------------------------------------------------------------------------------------------------
# The trainer and checkpoints (mlip_core/train.py, checkpoint.py)
def _toy_train(out: Path, resume=None, **loss):
    import functools

    from mlip_core.repro import seed_everything
    from mlip_core.train import train
    from toy_clip import ToyCLIP, ToyPairs, toy_collate
    from toy_train_run import toy_config

    cfg = toy_config(max_steps=2, epochs=1)
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    seed_everything(cfg.train.seed)
    return train(cfg, run_dir=out, resume=resume, model=ToyCLIP(), train_set=ToyPairs(16, seed=0),
                 val_set=ToyPairs(8, seed=1), collate_fn=functools.partial(toy_collate, swap_prob=0.3))


@case("train-resume-other-config", "train.Trainer.resume", "resume=auto with another loss config", "error")
def _(tmp: Path) -> str:
    from mlip_core.checkpoint import CheckpointError
    from mlip_core.config import config_to_dict
    from toy_train_run import toy_config

    _toy_train(tmp / "run")
    loss = config_to_dict(toy_config()).get("loss", {})
    key = next(k for k, v in loss.items() if isinstance(v, float) and not isinstance(v, bool))
    return expect_error(lambda: _toy_train(tmp / "run", resume="auto", **{key: loss[key] + 0.5}),
                        (CheckpointError,), "step_00000002.pt", "'loss' config", "config.yaml")


@case("train-truncated-checkpoint", "train.Trainer.resume", "resume=<step_00000002.pt cut in half>", "error")
def _(tmp: Path) -> str:
    from mlip_core.checkpoint import CheckpointError

    _toy_train(tmp / "run")
    ckpt = tmp / "run" / "checkpoints" / "step_00000002.pt"
    truncate(ckpt, keep=0.5)
    return expect_error(lambda: _toy_train(tmp / "run2", resume=ckpt), (CheckpointError,),
                        "step_00000002.pt", "corrupt or truncated")


@case("checkpoint-empty-file", "checkpoint.load_checkpoint", "a 0-byte step checkpoint", "error")
def _(tmp: Path) -> str:
    from mlip_core.checkpoint import CheckpointError, load_checkpoint

    path = tmp / "step_00000001.pt"
    path.write_bytes(b"")
    return expect_error(lambda: load_checkpoint(path), (CheckpointError,), "step_00000001.pt", "empty")


# ----------------------------------------------------------------------------------------------------------
# Transfer (mlip_core/transfer/classify.py)
def _export(out: Path, state_filter=None) -> Path:
    from dataclasses import asdict

    from mlip_core.checkpoint import write_image_tower_export
    from mlip_core.config import ImageTowerConfig
    from mlip_core.model.encoders import ImageTower

    cfg = ImageTowerConfig(name="resnet18", image_size=32)
    state = {k: v for k, v in ImageTower(cfg).state_dict().items() if state_filter is None or state_filter(k)}
    write_image_tower_export(state, {"model": {"image": asdict(cfg)}}, step=0, out=out)
    return out


@case("classify-export-missing-json", "classify.encoder_from_export", "image_tower.pt without image_tower.json",
      "error")
def _(tmp: Path) -> str:
    from mlip_core.transfer.classify import encoder_from_export

    out = _export(tmp / "exp")
    (out / "image_tower.json").unlink()
    return expect_error(lambda: encoder_from_export("x", out), (FileNotFoundError,), "image_tower.json", "re-export")


@case("classify-export-wrong-weights", "classify.build_tower", "image_tower.pt lacking layer4 for its resnet18 .json",
      "error")
def _(tmp: Path) -> str:
    from mlip_core.transfer.classify import build_tower, encoder_from_export

    out = _export(tmp / "exp", state_filter=lambda k: "layer4" not in k)
    return expect_error(lambda: build_tower(encoder_from_export("x", out)), (RuntimeError,), "image_tower.pt",
                        "resnet18")


@case("classify-export-truncated", "classify.build_tower", "image_tower.pt cut in half", "error")
def _(tmp: Path) -> str:
    from mlip_core.checkpoint import CheckpointError
    from mlip_core.transfer.classify import build_tower, encoder_from_export

    out = _export(tmp / "exp")
    truncate(out / "image_tower.pt", keep=0.5)
    return expect_error(lambda: build_tower(encoder_from_export("x", out)), (CheckpointError,), "image_tower.pt")


# ----------------------------------------------------------------------------------------------------------
# The book runner (mlip_core/book.py): every check runs before any notebook executes
TYPED = ('# %% [markdown]\n# A tiny chapter.\n\n# %% tags=["parameters"]\n'
         "num_points = 512  # 1.6x faster than size=96\nlr = 2e-4\nuse_gpu = False\n\n# %%\nprint(num_points)\n")


def _book(tmp: Path, profile: str) -> tuple[Path, Path]:
    book, nb_dir = tmp / "book", tmp / "notebooks"
    (book / "profiles").mkdir(parents=True)
    nb_dir.mkdir()
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nparts:\n  - caption: T\n    chapters:\n"
                                   "      - file: notebooks/01_a\n")
    (nb_dir / "01_a.py").write_text(TYPED)
    (book / "profiles" / "smoke.yaml").write_text(profile)
    return book, nb_dir


def _run_book(tmp: Path, book: Path, nb_dir: Path, profile: str = "smoke", overrides=()):
    from mlip_core.book import run_book

    return run_book(profile, overrides=list(overrides), book=book, notebooks=nb_dir, out_dir=tmp / "out",
                    log=lambda *_: None)


@case("book-unknown-parameter", "book.run_book", "profile sets 01_a: {epochz: 3}", "error")
def _(tmp: Path) -> str:
    from mlip_core.book import BookError

    book, nb_dir = _book(tmp, "01_a: {epochz: 3}\n")
    msg = expect_error(lambda: _run_book(tmp, book, nb_dir), (BookError,), "epochz", "01_a", "num_points",
                       "Use one of those names")
    assert not (tmp / "out").exists() or not any((tmp / "out").iterdir()), "a notebook ran"
    return msg


@case("book-mistyped-value", "book.main (CLI)", "-p num_points=abc (declared int)", "error")
def _(tmp: Path) -> str:
    from mlip_core.book import main

    book, nb_dir = _book(tmp, "")
    msg = expect_cli_error(main, ["--profile", "smoke", "--book-dir", str(book), "--notebooks-dir", str(nb_dir),
                                  "--out", str(tmp / "out"), "-p", "num_points=abc"], 2,
                           "num_points=abc", "declared as int", "01_a",
                           "pass values of the declared types")
    assert not (tmp / "out").exists() or not any((tmp / "out").iterdir()), "a notebook ran"
    return msg


@case("book-unknown-profile", "book.run_book", "--profile nightly (no such file)", "error")
def _(tmp: Path) -> str:
    from mlip_core.book import BookError

    book, nb_dir = _book(tmp, "")
    return expect_error(lambda: _run_book(tmp, book, nb_dir, profile="nightly"), (BookError,), "nightly", "smoke",
                        "--profile")


@case("book-comment-with-equals", "book.declared_parameters", "parameters cell 'num_points = 512  # ... size=96'",
      "ok")
def _(tmp: Path) -> str:
    from mlip_core.book import check_parameters, declared_parameters, to_ipynb, type_error

    book, nb_dir = _book(tmp, "01_a: {num_points: 3}\n")
    to_ipynb(nb_dir / "01_a.py", tmp / "01_a.ipynb")
    declared = declared_parameters(tmp / "01_a.ipynb")
    assert set(declared) == {"num_points", "lr", "use_gpu"}, declared
    check_parameters("01_a", {"num_points": 3}, declared)  # no BookError
    assert type_error("01_a", "num_points", 3, declared["num_points"], "profile") is None
    return "num_points declared (int, default 512): the profile may set it"
