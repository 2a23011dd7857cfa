"""The offline world: rendered chest radiographs paired with real IU X-ray reports, written like MIMIC-CXR-JPG.

    python -m mlip_core.data.synth --out DIR --num-studies 2000 --seed 0 [--image-size 224]

Layout (MIMIC-CXR-JPG 2.0.0, so the real reader reads it unchanged):

    DIR/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg       grayscale JPEG, one frontal image per study (default)
    DIR/files/pXX/pSUBJECT/sSTUDY.txt                report ("FINDINGS: ...\\n\\nIMPRESSION: ...")
    DIR/mimic-cxr-2.0.0-split.csv                    dicom_id,study_id,subject_id,split (patient-level)
    DIR/mimic-cxr-2.0.0-metadata.csv                 DICOM-header columns (ViewPosition, Rows, ...)
    DIR/mimic-cxr-2.0.0-chexpert.csv                 14 CheXpert columns, 1 / 0 / -1 / blank: the project's labeler
                                                     (knowledge.extract) run on each sSTUDY.txt, as MIMIC's CSV is
                                                     the CheXpert labeler run on the report, errors included
    DIR/synth/findings.csv                           ground truth: one row per drawn finding, box + mask
    DIR/synth/masks/DICOM_ID_K.png                   the finding masks (0/255)
    DIR/synth/anatomy/DICOM_ID.png                   lungs and heart (0 bg, 1 right lung, 2 left lung, 3 heart)
    DIR/synth/labels.csv                             every study's drawn findings as 14 columns of 0/1 (the truth)
    DIR/synth/studies.csv                            report source, IU uid, MeSH terms, undrawn terms
    DIR/synth/world.json                             the parameters that reproduce the world
    DIR/mlip-world-manifest.json                     every file the writer wrote: the only paths it ever removes

Reports: each study takes a real IU report (read from torchxrayvision at run time, never stored in the repo)
and its image is drawn from that report's MeSH terms. Reports with no text or "No Indexing" are skipped and
counted. When more studies are asked for than there are IU reports, or with ``report_source="template"``,
the template generator writes the report. Same seed, same arguments -> byte-identical files, for any number
of workers (every study draws from its own seeded stream). Across machines the bytes can differ in the last
bit where numpy's vectorised exp/sin differ by CPU; the content is the same.

No label leakage: pretraining may read the MIMIC-layout files (images, reports, the labeler's CSV) only. The
renderer's ground truth under ``synth/`` is for evaluation; ``label_agreement`` measures how far the labeler's
CSV is from it (the "labeler error" of this world).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mlip_core.data.iu import IUReport, load_iu_reports
from mlip_core.data.manifest import Layout, finish_write, remove_written, reuse_or_clear, start_write
from mlip_core.data.reportgen import generate_report, sample_findings
from mlip_core.data.synth_findings import CHEXPERT_COLUMNS, findings_from_mesh
from mlip_core.data.synth_render import Patient, render, sample_patient, sample_scene
from mlip_core.knowledge.extract import default_extractor

__all__ = ["WorldSummary", "write_world", "ensure_world", "world_parameters", "label_agreement", "main",
           "METADATA_COLUMNS", "FINDINGS_COLUMNS"]

WORLD_VERSION = 2  # 2: mimic-cxr-2.0.0-chexpert.csv from the labeler on the report text (1: from drawn findings)
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
FINDINGS_COLUMNS = ["dicom_id", "study_id", "subject_id", "finding", "chexpert", "side", "zone", "severity", "kind",
                    "uncertain", "x0", "y0", "x1", "y1", "area", "mask"]


@dataclass
class WorldSummary:
    """What ``write_world`` wrote."""

    out_dir: str
    studies: int
    images: int
    subjects: int
    findings: int
    splits: dict[str, int]
    iu_reports_used: int
    template_reports: int
    iu_reports_skipped: dict[str, int]
    seconds: float = 0.0

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in self.iu_reports_skipped.items()) or "none"
        return (f"wrote {self.studies} studies ({self.images} images, {self.subjects} subjects, {self.findings} "
                f"finding instances) to {self.out_dir} in {self.seconds:.1f} s\n"
                f"  splits (studies): {self.splits}\n"
                f"  reports: {self.iu_reports_used} real IU, {self.template_reports} template; "
                f"IU reports skipped: {skipped}")


@dataclass
class _StudyPlan:
    index: int
    subject_id: int
    study_id: int
    dicom_ids: list[str]
    patient: Patient
    split: str
    study_date: int
    study_time: float
    iu: IUReport | None = None
    prior: dict | None = None  # finding prior of template reports (None: reportgen.PRIOR)


@dataclass
class _StudyResult:
    split_rows: list[list] = field(default_factory=list)
    meta_rows: list[list] = field(default_factory=list)
    chexpert_row: list = field(default_factory=list)
    label_row: list = field(default_factory=list)
    study_row: list = field(default_factory=list)
    finding_rows: list[list] = field(default_factory=list)


def _usable(r: IUReport) -> str | None:
    """Why an IU report cannot pair with an image, or None if it can."""
    if not (r.findings or r.impression):
        return "no findings or impression text"
    if any(t.strip().lower() == "no indexing" for t in r.mesh_major):
        return "MeSH 'No Indexing' (findings unknown)"
    return None


def _dicom_id(rng: np.random.Generator) -> str:
    """A MIMIC-style dicom_id: five dash-separated groups of 8 hex digits."""
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def _report_text(findings: str, impression: str, indication: str = "", comparison: str = "",
                 examination: str = "CHEST (PA AND LAT)") -> str:
    """A report in MIMIC-CXR style; empty sections are left out."""
    parts = ["FINAL REPORT", f"EXAMINATION: {examination}"]
    if indication:
        parts.append(f"INDICATION: {indication}")
    if comparison:
        parts.append(f"COMPARISON: {comparison}")
    if findings:
        parts.append(f"FINDINGS: {findings}")
    if impression:
        parts.append(f"IMPRESSION: {impression}")
    return "\n\n".join(parts) + "\n"


def _fmt(x: float) -> str:
    return "" if isinstance(x, float) and math.isnan(x) else f"{x:.1f}"


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _render_study(plan: _StudyPlan, out: str, image_size: int, seed: int, jpeg_quality: int) -> _StudyResult:
    """Render, write and describe one study; runs in a worker process."""
    root = Path(out)
    rng = np.random.default_rng([seed, 1, plan.index])
    undrawn: list[str] = []
    if plan.iu is not None:
        findings, undrawn = findings_from_mesh(plan.iu.mesh_major, rng)
        source, uid = "iu", plan.iu.uid
        indication, comparison = plan.iu.indication, plan.iu.comparison
        f_text, i_text = plan.iu.findings, plan.iu.impression
    else:
        findings = sample_findings(rng, plan.prior)
        gen = generate_report(findings, rng)
        findings = gen.present
        source, uid = "template", ""
        indication, comparison = "", ""
        f_text, i_text = gen.findings, gen.impression
    res = _StudyResult()
    px = f"p{str(plan.subject_id)[:2]}"
    study_dir = root / "files" / px / f"p{plan.subject_id}" / f"s{plan.study_id}"
    study_dir.mkdir(parents=True, exist_ok=True)
    view0 = None
    for k, dicom_id in enumerate(plan.dicom_ids):
        scene = sample_scene(rng, plan.patient, findings, size=image_size, view=view0)
        view0 = scene.view  # all images of a study share the view
        out_img = render(scene)
        buf = io.BytesIO()
        Image.fromarray(out_img.image, mode="L").save(buf, format="JPEG", quality=jpeg_quality)
        (study_dir / f"{dicom_id}.jpg").write_bytes(buf.getvalue())
        _save_png(out_img.anatomy, root / "synth" / "anatomy" / f"{dicom_id}.png")
        for j, inst in enumerate(out_img.instances):
            rel = f"synth/masks/{dicom_id}_{j}.png"
            _save_png(inst.mask.astype(np.uint8) * 255, root / rel)
            f = inst.finding
            res.finding_rows.append([dicom_id, plan.study_id, plan.subject_id, f.name, f.chexpert or "", f.side,
                                     f.zone, f.severity, f.kind, int(f.uncertain), *inst.box,
                                     int(inst.mask.sum()), rel])
        res.split_rows.append([dicom_id, plan.study_id, plan.subject_id, plan.split])
        ap = scene.view == "AP"
        proc = "CHEST (PORTABLE AP)" if ap else "CHEST (PA AND LAT)"
        res.meta_rows.append([dicom_id, plan.subject_id, plan.study_id, proc, scene.view, image_size, image_size,
                              plan.study_date, f"{plan.study_time:.3f}", proc,
                              "antero-posterior" if ap else "postero-anterior", "Recumbent" if ap else "Erect"])
    examination = "CHEST (PORTABLE AP)" if view0 == "AP" else "CHEST (PA AND LAT)"
    report = _report_text(f_text, i_text, indication, comparison, examination)
    (study_dir.parent / f"s{plan.study_id}.txt").write_text(report, encoding="utf-8")
    # The reader-facing labels come from the text alone, as MIMIC's CheXpert CSV does: never from `findings`.
    # default_extractor() is cached per process, so each worker builds it once.
    labels = default_extractor().report_labels(report)
    res.chexpert_row = [plan.subject_id, plan.study_id] + [_fmt(labels[c]) for c in CHEXPERT_COLUMNS]
    truth = {c: 0 for c in CHEXPERT_COLUMNS}
    for f in findings:
        if f.chexpert:
            truth[f.chexpert] = 1
    truth["No Finding"] = int(not any(truth[c] for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")))
    res.label_row = [plan.subject_id, plan.study_id] + [truth[c] for c in CHEXPERT_COLUMNS]
    res.study_row = [plan.subject_id, plan.study_id, plan.split, source, uid,
                     ";".join(plan.iu.mesh_major) if plan.iu else "", ";".join(f.name for f in findings),
                     ";".join(undrawn)]
    return res


def _plan(num_studies: int, seed: int, report_source: str, images_per_study: int, studies_per_subject: float,
          split_fractions: tuple[float, float, float]) -> tuple[list[_StudyPlan], dict[str, int]]:
    """Decide every id, patient, split and report before rendering (deterministic from ``seed``)."""
    rng = np.random.default_rng([seed, 0])
    skipped: dict[str, int] = {}
    reports: list[IUReport] = []
    if report_source in ("iu", "mixed"):
        for r in load_iu_reports():
            why = _usable(r)
            if why is None:
                reports.append(r)
            else:
                skipped[why] = skipped.get(why, 0) + 1
        reports = [reports[i] for i in rng.permutation(len(reports))]
        if report_source == "mixed":
            reports = reports[: num_studies // 2]
    # Patients: 1 + Poisson(studies_per_subject - 1) studies each.
    sizes: list[int] = []
    while sum(sizes) < num_studies:
        sizes.append(1 + int(rng.poisson(max(0.0, studies_per_subject - 1.0))))
    sizes[-1] -= sum(sizes) - num_studies
    n_subj = len(sizes)
    subject_ids = 10_000_000 + rng.choice(10_000_000, size=n_subj, replace=False)
    study_ids = 50_000_000 + rng.choice(10_000_000, size=num_studies, replace=False)
    order = rng.permutation(n_subj)
    n_train = int(round(split_fractions[0] * n_subj))
    n_val = int(round(split_fractions[1] * n_subj))
    split_of = {}
    for rank, s in enumerate(order):
        split_of[s] = "train" if rank < n_train else ("validate" if rank < n_train + n_val else "test")
    plans: list[_StudyPlan] = []
    k = 0
    for s, size in enumerate(sizes):
        patient = sample_patient(rng)
        date = int(rng.integers(2110, 2190)) * 10000 + int(rng.integers(1, 13)) * 100 + int(rng.integers(1, 29))
        for j in range(size):
            dicoms = [_dicom_id(rng) for _ in range(images_per_study)]
            tm = float(rng.integers(0, 24)) * 10000 + float(rng.integers(0, 60)) * 100 + float(rng.uniform(0, 60))
            plans.append(_StudyPlan(index=k, subject_id=int(subject_ids[s]), study_id=int(study_ids[k]),
                                    dicom_ids=dicoms, patient=patient, split=split_of[s], study_date=date + j * 3,
                                    study_time=round(tm, 3), iu=reports[k] if k < len(reports) else None))
            k += 1
    return plans, skipped


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_world(out_dir: str | os.PathLike, num_studies: int, seed: int, image_size: int = 224,
                report_source: str = "iu", images_per_study: int = 1, studies_per_subject: float = 1.5,
                split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), jpeg_quality: int = 95,
                workers: int = 1, progress: bool = False, finding_prior: dict[str, float] | None = None
                ) -> WorldSummary:
    """Write the offline world to ``out_dir`` (MIMIC-CXR-JPG layout + ``synth/`` ground truth).

    ``report_source``: "iu" (real IU reports, template ones beyond the 3,8xx usable), "template" (all
    generated) or "mixed" (half each). ``workers`` > 1 renders in processes; the files are identical.
    ``finding_prior``: probability of each finding in template studies (default ``reportgen.PRIOR``); a
    transfer world raises rare findings' so that its test split holds enough positives to measure.
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    if report_source not in ("iu", "template", "mixed"):
        raise ValueError(f"report_source must be 'iu', 'template' or 'mixed', got {report_source!r}")
    if not 16 <= image_size <= 4096:
        raise ValueError(f"image_size must be in [16, 4096], got {image_size}")
    if abs(sum(split_fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {split_fractions}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    manifest = start_write(out, WORLD)  # refuses a folder holding world files it did not write
    for sub in ("files", "synth/masks", "synth/anatomy"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plans, skipped = _plan(num_studies, seed, report_source, images_per_study, studies_per_subject, split_fractions)
    if finding_prior is not None:
        from mlip_core.data.reportgen import PRIOR

        unknown = sorted(set(finding_prior) - set(PRIOR))
        if unknown:
            raise ValueError(f"finding_prior names unknown findings {unknown}; known: {sorted(PRIOR)}")
        for plan in plans:
            plan.prior = dict(finding_prior)
    args = (str(out), image_size, seed, jpeg_quality)
    iterator = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        iterator = pool.map(_render_study, plans, *[[a] * len(plans) for a in args], chunksize=16)
    else:
        pool = None
        iterator = (_render_study(p, *args) for p in plans)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(plans), desc="rendering studies")
    results = list(iterator)
    if pool is not None:
        pool.shutdown()
    split_rows = [r for res in results for r in res.split_rows]
    meta_rows = [r for res in results for r in res.meta_rows]
    finding_rows = [r for res in results for r in res.finding_rows]
    by_subject = lambda row: (row[0], row[1])  # noqa: E731
    _write_csv(out / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
               sorted(split_rows, key=lambda r: (r[2], r[1], r[0])))
    _write_csv(out / "mimic-cxr-2.0.0-metadata.csv", METADATA_COLUMNS, sorted(meta_rows, key=lambda r: (r[1], r[2], r[0])))
    _write_csv(out / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT_COLUMNS,
               sorted((res.chexpert_row for res in results), key=by_subject))
    _write_csv(out / "synth" / "labels.csv", ["subject_id", "study_id"] + CHEXPERT_COLUMNS,
               sorted((res.label_row for res in results), key=by_subject))
    _write_csv(out / "synth" / "studies.csv", ["subject_id", "study_id", "split", "report_source", "iu_uid",
                                               "mesh_major", "drawn_findings", "undrawn_mesh"],
               sorted((res.study_row for res in results), key=by_subject))
    _write_csv(out / "synth" / "findings.csv", FINDINGS_COLUMNS, finding_rows)
    splits: dict[str, int] = {"train": 0, "validate": 0, "test": 0}
    for p in plans:
        splits[p.split] += 1
    n_iu = sum(p.iu is not None for p in plans)
    summary = WorldSummary(out_dir=str(out), studies=len(plans), images=len(split_rows),
                           subjects=len({p.subject_id for p in plans}), findings=len(finding_rows), splits=splits,
                           iu_reports_used=n_iu, template_reports=len(plans) - n_iu, iu_reports_skipped=skipped)
    params = {"world_version": WORLD_VERSION, "num_studies": num_studies, "seed": seed, "image_size": image_size,
              "report_source": report_source, "images_per_study": images_per_study,
              "studies_per_subject": studies_per_subject, "split_fractions": list(split_fractions),
              "jpeg_quality": jpeg_quality}
    if finding_prior is not None:
        params["finding_prior"] = dict(sorted(finding_prior.items()))
    recorded = {k: v for k, v in asdict(summary).items() if k not in ("out_dir", "seconds")}  # path-free
    (out / "synth" / "world.json").write_text(json.dumps({"parameters": params, "summary": recorded},
                                                         indent=2, sort_keys=True) + "\n")
    finish_write(out, WORLD, manifest)
    summary.seconds = time.perf_counter() - t0
    return summary


WORLD_FILES = ("files", "synth", "mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-metadata.csv",
               "mimic-cxr-2.0.0-chexpert.csv")
MANIFEST_NAME = "mlip-world-manifest.json"
# The world is written beside whatever else the folder holds (a SIIM copy, say); only these names are its own.
WORLD = Layout(MANIFEST_NAME, WORLD_FILES, what="world", ensure="ensure_world",
               hint="Point the world at an empty folder, or delete those paths yourself if they are an old offline "
                    "world.")


def remove_world(out_dir: str | os.PathLike) -> int:
    """Remove the world the writer put in ``out_dir``: exactly the files its manifest lists, then the folders
    they leave empty (:func:`mlip_core.data.manifest.remove_written`). Anything else in the folder stays. A folder
    holding world files but no manifest is not ours: ``FileExistsError`` naming the folder and the fix. Returns
    the number of files removed."""
    return remove_written(out_dir, WORLD)


def world_parameters(out_dir: str | os.PathLike) -> dict | None:
    """The parameters recorded in ``out_dir/synth/world.json``, or None when there is no complete world."""
    path = Path(out_dir) / "synth" / "world.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["parameters"]
    except (ValueError, KeyError):
        return None


def ensure_world(out_dir: str | os.PathLike, num_studies: int, seed: int, image_size: int = 224,
                 **kwargs) -> tuple[WorldSummary | None, bool]:
    """Write the world unless ``out_dir`` already holds one made with the same parameters, every file there.

    Returns (summary or None when reused, whether it was written). A world with other parameters is removed
    first by :func:`remove_world`: only the files its manifest lists. A folder with world-like files and no
    manifest (a real MIMIC-CXR-JPG copy, say) is refused, never cleaned."""
    out = Path(out_dir)
    wanted = {"world_version": WORLD_VERSION, "num_studies": num_studies, "seed": seed, "image_size": image_size}
    defaults = {"report_source": "iu", "images_per_study": 1, "studies_per_subject": 1.5,
                "split_fractions": [0.8, 0.1, 0.1], "jpeg_quality": 95, "finding_prior": None}
    defaults.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
                     if k not in ("workers", "progress")})
    wanted.update(defaults)
    have = world_parameters(out)
    if reuse_or_clear(out, WORLD, lambda _: have is not None and all(have.get(k) == v for k, v in wanted.items())):
        return None, False
    return write_world(out, num_studies, seed, image_size=image_size, **kwargs), True


def label_agreement(world_dir: str | os.PathLike):
    """How well the labeler's ``mimic-cxr-2.0.0-chexpert.csv`` finds the drawn truth (``synth/labels.csv``).

    One row per CheXpert column: ``truth positives`` (drawn), ``labeler 1`` / ``labeler -1`` (positive / uncertain
    in the CSV), ``true positives`` (drawn and labelled 1), ``precision`` and ``recall`` of the labeler's 1s, and
    ``recall 1 or -1`` counting uncertain as found. Precision is NaN where the labeler gave no 1, recall where
    nothing was drawn. This is an evaluation-side view: it reads ``synth/``, which pretraining never does.
    """
    import pandas as pd

    root = Path(world_dir)
    keys = ["subject_id", "study_id"]
    csv_labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")
    truth = pd.read_csv(root / "synth" / "labels.csv")
    both = truth.merge(csv_labels, on=keys, how="inner", suffixes=("_truth", "_labeler"), validate="one_to_one")
    if len(both) != len(truth) or len(both) != len(csv_labels):
        raise ValueError(f"{root}: the labeler CSV ({len(csv_labels)} studies) and synth/labels.csv "
                         f"({len(truth)}) do not cover the same studies")
    rows = []
    for c in CHEXPERT_COLUMNS:
        t = both[f"{c}_truth"].to_numpy() == 1
        lab = both[f"{c}_labeler"].to_numpy()
        pos, unc = lab == 1.0, lab == -1.0
        tp = int((t & pos).sum())
        rows.append({"finding": c, "truth positives": int(t.sum()), "labeler 1": int(pos.sum()),
                     "labeler -1": int(unc.sum()), "true positives": tp,
                     "precision": tp / pos.sum() if pos.any() else math.nan,
                     "recall": tp / t.sum() if t.any() else math.nan,
                     "recall 1 or -1": int((t & (pos | unc)).sum()) / t.sum() if t.any() else math.nan})
    return pd.DataFrame(rows).set_index("finding")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m mlip_core.data.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (MIMIC-CXR-JPG layout)")
    ap.add_argument("--num-studies", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--report-source", choices=["iu", "template", "mixed"], default="iu")
    ap.add_argument("--images-per-study", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        summary = write_world(a.out, a.num_studies, a.seed, image_size=a.image_size, report_source=a.report_source,
                              images_per_study=a.images_per_study, workers=a.workers, progress=a.progress)
    except (FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
