"""IU X-ray report parsing: real archive from torchxrayvision and a hand-written OpenI fixture (invented text)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mlip_core.data.iu import iu_archive_path, load_iu_reports, parse_iu_xml, parse_mesh_term

FIXTURE_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">{comparison}</AbstractText>
            <AbstractText Label="INDICATION">{indication}</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
   <parentImage id="CXR{n}_1_IM-0{n}-1001"><figureId>F1</figureId></parentImage>
   <parentImage id="CXR{n}_1_IM-0{n}-2001"><figureId>F2</figureId></parentImage>
</eCitation>
"""


def _xml(n: int, findings: str, impression: str, major: list[str], automatic: list[str] = (),
         indication: str = "Invented cough.", comparison: str = "None.") -> str:
    mesh = "\n".join([f"      <major>{t}</major>" for t in major] + [f"      <automatic>{t}</automatic>" for t in automatic])
    return FIXTURE_XML.format(n=n, findings=findings, impression=impression, mesh=mesh,
                              indication=indication, comparison=comparison)


@pytest.fixture()
def fixture_archive(tmp_path: Path) -> Path:
    """A tiny NLMCXR-format .tgz with invented reports (ecgen-radiology/N.xml)."""
    docs = {
        10: _xml(10, "Heart size is invented large. Small left pleural effusion.", "Cardiomegaly and effusion.",
                 ["Cardiomegaly/mild", "Pleural Effusion/left/small"], ["pleural effusion"]),
        2: _xml(2, "Lungs are clear. No pneumothorax.", "No acute disease.", ["normal"]),
        3: _xml(3, "", "Invented   opacity\n   at the right base.", ["Opacity/lung/base/right/mild"],
                indication=""),
    }
    path = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for n, text in docs.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_parse_mesh_term_splits_finding_from_qualifiers():
    term = parse_mesh_term("Opacity/lung/base/left/mild")
    assert term.finding == "Opacity"
    assert term.qualifiers == ["lung", "base", "left", "mild"]
    assert parse_mesh_term("normal").qualifiers == []
    assert parse_mesh_term(" Aorta, Thoracic / tortuous ").finding == "Aorta, Thoracic"
    with pytest.raises(ValueError):
        parse_mesh_term(" / ")


def test_fixture_archive_sections_mesh_and_images(fixture_archive: Path):
    reports = load_iu_reports(fixture_archive)
    assert [r.uid for r in reports] == ["CXR2", "CXR3", "CXR10"]  # numeric, not lexical, order
    r10 = reports[2]
    assert r10.findings == "Heart size is invented large. Small left pleural effusion."
    assert r10.impression == "Cardiomegaly and effusion."
    assert r10.indication == "Invented cough."
    assert r10.comparison == "None."
    assert r10.mesh_major == ["Cardiomegaly/mild", "Pleural Effusion/left/small"]
    assert r10.mesh_automatic == ["pleural effusion"]
    assert r10.image_ids == ["CXR10_1_IM-010-1001", "CXR10_1_IM-010-2001"]
    r3 = reports[1]
    assert r3.findings == "" and r3.indication == ""
    assert r3.impression == "Invented opacity at the right base."  # whitespace collapsed


def test_negated_text_does_not_create_mesh_findings(fixture_archive: Path):
    normal = load_iu_reports(fixture_archive)[0]
    assert "No pneumothorax" in normal.findings
    assert normal.mesh_major == ["normal"] and normal.mesh_automatic == []


def test_malformed_xml_error_names_the_source():
    with pytest.raises(ValueError, match="broken.xml"):
        parse_iu_xml(b"<eCitation><uId id='CXR1'/>", source="broken.xml")
    with pytest.raises(ValueError, match="uId"):
        parse_iu_xml(b"<eCitation/>", source="x.xml")


def test_missing_archive_error_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.tgz"):
        load_iu_reports(tmp_path / "nope.tgz")


def test_real_archive_is_parsed_completely():
    reports = load_iu_reports()
    assert iu_archive_path().name == "NLMCXR_reports.tgz"
    assert len(reports) == 3955
    assert len({r.uid for r in reports}) == len(reports)
    first = reports[0]
    assert first.uid == "CXR1" and first.mesh_major == ["normal"]
    assert len(first.image_ids) == 2 and all(i.startswith("CXR1_") for i in first.image_ids)
    # A few reports (28 in torchxrayvision 1.x) have neither section: readers must cope with empty text.
    empty = [r for r in reports if not (r.findings or r.impression)]
    assert 0 < len(empty) < 0.01 * len(reports)
    assert sum(bool(r.mesh_major) for r in reports) == len(reports)
    # Cached: a second call does not re-parse (same objects) but returns a fresh list.
    again = load_iu_reports()
    assert again is not reports and again[0] is reports[0]


def test_real_archive_normal_reports_with_negated_pneumothorax_stay_normal():
    reports = load_iu_reports()
    negated = [r for r in reports if r.mesh_major == ["normal"] and "no pneumothorax" in
               (r.findings + " " + r.impression).lower()]
    assert len(negated) > 50  # a common phrasing in normal IU reports
    assert not any("pneumothorax" in t.lower() for r in negated for t in r.mesh_major + r.mesh_automatic)
    terms = [parse_mesh_term(t) for r in reports for t in r.mesh_major]
    assert any(t.finding == "Opacity" and {"base", "left"} <= set(t.qualifiers) for t in terms)


def test_real_normal_reports_map_to_no_drawn_findings():
    """Text like "No pneumothorax" never becomes a drawn finding: only MeSH positives are drawn."""
    import numpy as np

    from mlip_core.data.synth_findings import findings_from_mesh

    rng = np.random.default_rng(0)
    normals = [r for r in load_iu_reports() if r.mesh_major == ["normal"]]
    assert len(normals) > 1000
    assert all(findings_from_mesh(r.mesh_major, rng) == ([], []) for r in normals)
    cardio = [r for r in load_iu_reports() if any(t.startswith("Cardiomegaly") for t in r.mesh_major)]
    assert all(any(f.name == "cardiomegaly" for f in findings_from_mesh(r.mesh_major, rng)[0]) for r in cardio)


def test_check_cli_reads_the_packaged_iu_reports_without_a_root(capsys):
    from mlip_core.data.check import main

    assert main(["--dataset", "iu"]) == 0
    out = capsys.readouterr().out
    assert "images not checked" in out
    usable = int(out.strip().splitlines()[-1].split()[0].split("=")[1])
    assert usable > 3000  # the ~3,8xx IU reports with text and images


def test_check_cli_still_requires_a_root_for_datasets_that_do_not_ship(capsys):
    from mlip_core.data.check import main

    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "rsna"])
    assert exc.value.code == 2 and "--root is required for rsna" in capsys.readouterr().err
