"""The offline world on disk: MIMIC-CXR-JPG layout, determinism, patient-level splits, ground truth, IU pairing,
and the reader-facing CheXpert CSV being the labeler on the report text (not the drawn truth)."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlip_core.data.iu import load_iu_reports
from mlip_core.data.reportgen import generate_report, sample_findings
from mlip_core.data.synth import FINDINGS_COLUMNS, METADATA_COLUMNS, label_agreement, main, write_world
from mlip_core.data.synth_findings import CHEXPERT_COLUMNS, Finding, chexpert_row, findings_from_mesh
from mlip_core.knowledge.extract import default_extractor
from mlip_core.knowledge.graph import CHEXPERT_14

N, SIZE = 24, 64


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, num_studies=N, seed=3, image_size=SIZE)
    return out


def test_layout_is_mimic_cxr_jpg(world: Path):
    split = _rows(world / "mimic-cxr-2.0.0-split.csv")
    meta = _rows(world / "mimic-cxr-2.0.0-metadata.csv")
    chex = _rows(world / "mimic-cxr-2.0.0-chexpert.csv")
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(meta[0]) == METADATA_COLUMNS
    assert list(chex[0]) == ["subject_id", "study_id"] + CHEXPERT_COLUMNS
    assert len(split) == len(meta) == N and len(chex) == N
    for row in split:
        sid, stid = row["subject_id"], row["study_id"]
        jpg = world / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}" / f"{row['dicom_id']}.jpg"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (SIZE, SIZE)
        text = (jpg.parent.parent / f"s{stid}.txt").read_text()
        assert "IMPRESSION:" in text or "FINDINGS:" in text
    for row in meta:
        assert row["ViewPosition"] in ("PA", "AP") and row["Rows"] == str(SIZE)
    for row in chex:
        assert all(row[c] in ("", "1.0", "0.0", "-1.0") for c in CHEXPERT_COLUMNS)


def test_splits_are_patient_level_and_cover_all_three(tmp_path: Path):
    write_world(tmp_path, num_studies=120, seed=0, image_size=32)
    split = _rows(tmp_path / "mimic-cxr-2.0.0-split.csv")
    per_subject: dict[str, set[str]] = {}
    for r in split:
        per_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_subject.values())
    assert {r["split"] for r in split} == {"train", "validate", "test"}
    assert len(per_subject) < len(split)  # some patients have several studies


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path, world: Path):
    again = tmp_path / "again"
    write_world(again, num_studies=N, seed=3, image_size=SIZE, workers=2)  # processes give the same bytes
    assert _digest(again) == _digest(world)
    other = tmp_path / "other"
    write_world(other, num_studies=N, seed=4, image_size=SIZE)
    jpgs_a = {hashlib.sha256(p.read_bytes()).hexdigest() for p in world.rglob("*.jpg")}
    jpgs_b = {hashlib.sha256(p.read_bytes()).hexdigest() for p in other.rglob("*.jpg")}
    assert not jpgs_a & jpgs_b


def test_findings_table_masks_and_boxes_agree(world: Path):
    rows = _rows(world / "synth" / "findings.csv")
    assert rows and list(rows[0]) == FINDINGS_COLUMNS
    dicoms = {r["dicom_id"] for r in _rows(world / "mimic-cxr-2.0.0-split.csv")}
    for r in rows:
        assert r["dicom_id"] in dicoms
        mask = np.asarray(Image.open(world / r["mask"])) > 0
        ys, xs = np.nonzero(mask)
        assert (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])) == (xs.min(), ys.min(), xs.max() + 1,
                                                                             ys.max() + 1)
        assert int(r["area"]) == mask.sum()


def test_truth_follows_the_drawn_findings(world: Path):
    labels = {(r["subject_id"], r["study_id"]): r for r in _rows(world / "synth" / "labels.csv")}
    drawn: dict[str, set[str]] = {}
    for r in _rows(world / "synth" / "findings.csv"):
        if r["chexpert"]:
            drawn.setdefault(r["study_id"], set()).add(r["chexpert"])
    assert len(labels) == N
    for key, row in labels.items():
        assert all(row[c] in ("0", "1") for c in CHEXPERT_COLUMNS)
        positives = {c for c in CHEXPERT_COLUMNS if row[c] == "1" and c != "No Finding"}
        assert drawn.get(key[1], set()) <= positives  # every drawn instance is in the truth
        assert row["No Finding"] == str(int(not positives - {"Support Devices"}))


def _labeler_table(root: Path) -> dict[str, list[float]]:
    """The labeler on each study's report file, read back from disk (blank = NaN)."""
    ex = default_extractor()
    out = {}
    for txt in sorted((root / "files").glob("p*/p*/s*.txt")):
        labels = ex.report_labels(txt.read_text(encoding="utf-8"))
        out[txt.stem[1:]] = [labels[c] for c in CHEXPERT_COLUMNS]
    return out


def _csv_table(root: Path) -> dict[str, list[float]]:
    return {r["study_id"]: [float(r[c]) if r[c] != "" else math.nan for c in CHEXPERT_COLUMNS]
            for r in _rows(root / "mimic-cxr-2.0.0-chexpert.csv")}


def _same_cells(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert set(a) == set(b)
    for study, row in a.items():
        for c, x, y in zip(CHEXPERT_COLUMNS, row, b[study]):
            assert (math.isnan(x) and math.isnan(y)) or x == y, (study, c, x, y)


def test_chexpert_csv_is_the_labeler_on_each_report_file(world: Path):
    assert CHEXPERT_COLUMNS == CHEXPERT_14  # the CSV's column order is the labeler's
    labeler, table = _labeler_table(world), _csv_table(world)
    assert len(table) == N
    _same_cells(table, labeler)


def test_chexpert_csv_is_the_labeler_for_template_reports_too(tmp_path: Path):
    write_world(tmp_path, num_studies=20, seed=5, image_size=32, report_source="mixed")
    _same_cells(_csv_table(tmp_path), _labeler_table(tmp_path))


def test_label_agreement_counts_against_the_truth(world: Path):
    agree = label_agreement(world)
    truth = pd.read_csv(world / "synth" / "labels.csv")
    chex = pd.read_csv(world / "mimic-cxr-2.0.0-chexpert.csv")
    assert list(agree.index) == CHEXPERT_COLUMNS
    for c in CHEXPERT_COLUMNS:
        row = agree.loc[c]
        assert row["truth positives"] == (truth[c] == 1).sum()
        assert row["labeler 1"] == (chex[c] == 1).sum() and row["labeler -1"] == (chex[c] == -1).sum()
        both = truth.merge(chex, on=["subject_id", "study_id"])
        assert row["true positives"] == ((both[f"{c}_x"] == 1) & (both[f"{c}_y"] == 1)).sum()
        if row["labeler 1"]:
            assert row["precision"] == pytest.approx(row["true positives"] / row["labeler 1"])
        if row["truth positives"]:
            assert row["recall"] == pytest.approx(row["true positives"] / row["truth positives"])
            assert row["recall"] <= row["recall 1 or -1"] <= 1
    assert agree["truth positives"].sum() > 0 and agree["true positives"].sum() > 0


def test_studies_pair_with_real_iu_reports_and_normal_reports_draw_nothing(world: Path):
    by_uid = {r.uid: r for r in load_iu_reports()}
    studies = _rows(world / "synth" / "studies.csv")
    chex = {r["study_id"]: r for r in _rows(world / "mimic-cxr-2.0.0-chexpert.csv")}
    drawn_ptx = {r["study_id"] for r in _rows(world / "synth" / "findings.csv") if r["finding"] == "pneumothorax"}
    assert all(s["report_source"] == "iu" for s in studies)
    normal = 0
    for s in studies:
        iu = by_uid[s["iu_uid"]]
        assert s["mesh_major"] == ";".join(iu.mesh_major)
        txt = next(world.glob(f"files/*/p{s['subject_id']}/s{s['study_id']}.txt")).read_text()
        assert (iu.impression or iu.findings) in txt
        if iu.mesh_major == ["normal"]:
            normal += 1
            assert s["drawn_findings"] == "" and s["study_id"] not in drawn_ptx
            # The labeler reads "No pneumothorax" in a normal report as a negation, not a finding.
            assert chex[s["study_id"]]["Pneumothorax"] != "1.0"
    assert normal > 0


def test_template_reports_carry_hedges_and_negations(tmp_path: Path):
    write_world(tmp_path, num_studies=30, seed=1, image_size=32, report_source="template")
    chex = _rows(tmp_path / "mimic-cxr-2.0.0-chexpert.csv")
    values = {row[c] for row in chex for c in CHEXPERT_COLUMNS}
    assert {"1.0", "0.0", "-1.0"} <= values  # the labeler finds the generator's negations and hedges
    assert all(s["report_source"] == "template" for s in _rows(tmp_path / "synth" / "studies.csv"))


def test_refuses_to_overwrite_a_world(world: Path):
    with pytest.raises(FileExistsError, match=str(world)):
        write_world(world, num_studies=2, seed=0, image_size=32)


def test_cli_writes_and_reports(tmp_path: Path, capsys):
    assert main(["--out", str(tmp_path / "w"), "--num-studies", "5", "--seed", "2", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "wrote 5 studies" in out and "IU reports skipped" in out
    assert main(["--out", str(tmp_path / "w"), "--num-studies", "5", "--seed", "2"]) == 2
    assert "already holds" in capsys.readouterr().err


def test_mesh_terms_map_to_findings_with_side_zone_severity():
    rng = np.random.default_rng(0)
    found, undrawn = findings_from_mesh(["Opacity/lung/base/left/mild", "Pleural Effusion/bilateral/small",
                                         "Cardiomegaly/moderate", "Catheters, Indwelling/right",
                                         "Lung/hypoinflation", "Spine/degenerative", "normal"], rng)
    got = {(f.name, f.side, f.zone, f.severity, f.kind) for f in found}
    assert ("opacity", "left", "lower", "mild", "") in got
    assert ("effusion", "left", "lower", "mild", "") in got and ("effusion", "right", "lower", "mild", "") in got
    assert ("cardiomegaly", "", "", "moderate", "") in got
    assert ("device", "", "", "mild", "central_line") in got
    assert any(f.name == "hypoinflation" for f in found)
    assert undrawn == ["Spine/degenerative"]
    assert findings_from_mesh(["normal"], rng) == ([], [])


def test_chexpert_row_convention():
    row = chexpert_row([Finding("effusion", side="left"), Finding("nodule", side="right", uncertain=True),
                        Finding("device", kind="ett")], negated={"Pneumothorax"})
    assert row["Pleural Effusion"] == 1.0 and row["Lung Lesion"] == -1.0 and row["Support Devices"] == 1.0
    assert row["Pneumothorax"] == 0.0 and np.isnan(row["Edema"]) and np.isnan(row["No Finding"])
    assert chexpert_row([Finding("device", kind="ett")])["No Finding"] == 1.0


def test_generated_reports_negate_absent_and_hedge_uncertain():
    rng = np.random.default_rng(0)
    seen_hedge = False
    for _ in range(60):
        findings = sample_findings(rng, uncertain_prob=0.5)
        rep = generate_report(findings, rng)
        present = {f.chexpert for f in findings if f.chexpert}
        assert not rep.negated & present  # never negate what is drawn
        text = rep.text.lower()
        if "Pneumothorax" in rep.negated:
            assert "no pneumothorax" in text or "no evidence of pneumothorax" in text
        for f in findings:
            if f.uncertain and f.chexpert:
                seen_hedge = True
                assert any(h in text for h in ("possible", "cannot be excluded", "may represent", "questionable",
                                               "probable"))
    assert seen_hedge


def test_ensure_world_reuses_same_parameters_and_rewrites_changed_ones(tmp_path: Path):
    from mlip_core.data.synth import ensure_world

    summary, written = ensure_world(tmp_path, num_studies=4, seed=0, image_size=32)
    assert written and summary.studies == 4
    before = _digest(tmp_path)
    assert ensure_world(tmp_path, num_studies=4, seed=0, image_size=32) == (None, False)
    assert _digest(tmp_path) == before
    (tmp_path / "unrelated.txt").write_text("kept")
    summary, written = ensure_world(tmp_path, num_studies=6, seed=0, image_size=32)
    assert written and len(_rows(tmp_path / "mimic-cxr-2.0.0-split.csv")) == 6
    assert (tmp_path / "unrelated.txt").read_text() == "kept"  # only the writer's own paths are removed


def test_preview_grid_shows_images_masks_and_report_excerpts(world: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlip_core.data.preview import preview_grid, report_excerpt, world_examples

    ex = world_examples(world, n=4, seed=0)
    assert len(ex) == 4 and ex["image_path"].map(Path.is_file).all()
    assert sum(bool(f) for f in ex["findings"]) >= 2  # most examples show a drawn finding
    fig = preview_grid(world, n=4, cols=2, seed=0)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4
    titles = " ".join(ax.get_title() for ax in shown)
    drawn = {f["finding"] for fs in ex["findings"] for f in fs}
    assert all(name.split("_")[0] in titles for name in drawn)
    plt.close(fig)
    text = "FINAL REPORT\n\nFINDINGS: Lungs clear.\n\nIMPRESSION: No acute process."
    assert report_excerpt(text) == "No acute process."
    assert report_excerpt("FINDINGS: Lungs clear.") == "Lungs clear."
