"""MIMIC-CXR-JPG 2.0.0 reader on fixture trees in the real layout, including bad inputs."""

from __future__ import annotations

import gzip
import math

import pandas as pd
import pytest
import torch
from mlip_core.data.fixture_trees import CHEXPERT_14, make_mimic_tree, truncate

from mlip_core.data.cache import ImageCache
from mlip_core.data.mimic import MimicPretrainDataset, load_mimic_pairs


def _read(path):
    return pd.read_csv(path)


def _write(df, path):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", newline="") as fh:
            df.to_csv(fh, index=False)
    else:
        df.to_csv(path, index=False)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_every_frontal_image_of_a_split_from_csv_and_csv_gz(tmp_path, gz):
    tree = make_mimic_tree(tmp_path, n_subjects=3, studies_per_subject=2, gz=gz)
    pairs, report = load_mimic_pairs(tmp_path, split="train")
    expected = sorted(d for d, _, s in tree["frontal"] if s == "train")
    assert sorted(pairs["dicom_id"]) == expected
    assert len(report) == 0
    assert report.filtered["view not in ('PA', 'AP')"] > 0  # the laterals were filtered, and said so
    assert set(pairs["view"]) <= {"PA", "AP"}
    # impression first, then findings (MGCA's text choice)
    row = pairs.iloc[0]
    assert row["text"].startswith(f"No acute process {row['study_id']}.")
    assert "Lungs are clear." in row["text"]
    all_pairs, _ = load_mimic_pairs(tmp_path, split=None, views=None)
    assert len(all_pairs) == 3 * 2 * 3


def test_labels_keep_chexpert_convention_with_nan_for_blank(tmp_path):
    tree = make_mimic_tree(tmp_path, n_subjects=1, studies_per_subject=2)
    pairs, _ = load_mimic_pairs(tmp_path, split="train")
    for _, row in pairs.iterrows():
        truth = next(r for r in tree["labels"] if r["study_id"] == row["study_id"])
        for c in CHEXPERT_14:
            assert (math.isnan(truth[c]) and math.isnan(row[c])) or truth[c] == row[c]


def test_empty_and_missing_reports_are_counted_skips(tmp_path):
    tree = make_mimic_tree(tmp_path, n_subjects=1, studies_per_subject=3)
    s0, s1 = tree["studies"][:2]
    (tmp_path / "files" / "p10" / "p10000032" / f"s{s0}.txt").write_text("FINAL REPORT\n FINDINGS:\n\n IMPRESSION:  \n")
    (tmp_path / "files" / "p10" / "p10000032" / f"s{s1}.txt").unlink()
    pairs, report = load_mimic_pairs(tmp_path, split="train")
    assert set(pairs["study_id"]) == {tree["studies"][2]}
    counts = report.counts()
    assert counts["empty report: neither IMPRESSION nor FINDINGS has text"] == 1
    assert counts["missing report file"] == 1
    assert f"s{s0}.txt" in report.summary()


def test_missing_csv_error_names_the_file_and_the_fix(tmp_path):
    tree = make_mimic_tree(tmp_path, n_subjects=1, studies_per_subject=1)
    tree["metadata_csv"].unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-metadata\.csv.*PhysioNet"):
        load_mimic_pairs(tmp_path)


def test_wrong_csv_header_error_names_the_file_and_the_missing_column(tmp_path):
    tree = make_mimic_tree(tmp_path, n_subjects=1, studies_per_subject=1)
    df = _read(tree["split_csv"]).rename(columns={"split": "fold"})
    _write(df, tree["split_csv"])
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz: wrong CSV header.*'split'"):
        load_mimic_pairs(tmp_path)


def test_unknown_label_values_and_duplicate_ids_are_counted_skips(tmp_path):
    tree = make_mimic_tree(tmp_path, n_subjects=1, studies_per_subject=3)
    labels = _read(tree["chexpert_csv"])
    labels["Edema"] = labels["Edema"].astype(object)
    labels.loc[0, "Edema"] = "2.0"
    _write(labels, tree["chexpert_csv"])
    split = _read(tree["split_csv"])
    _write(pd.concat([split, split.iloc[[1]]]), tree["split_csv"])
    pairs, report = load_mimic_pairs(tmp_path, split="train")
    counts = report.counts()
    assert counts["unknown CheXpert label value (expected 1.0, 0.0, -1.0 or blank)"] == 1
    assert counts["duplicate dicom_id in mimic-cxr-2.0.0-split.csv.gz"] == 1
    bad_study = int(labels.loc[0, "study_id"])
    assert bad_study not in set(pairs["study_id"])
    assert pairs["dicom_id"].is_unique
    assert len(pairs) == sum(1 for _, st, _ in tree["frontal"] if st != bad_study)


def test_missing_image_is_a_counted_skip_and_corrupt_image_a_cache_skip(tmp_path):
    make_mimic_tree(tmp_path, n_subjects=1, studies_per_subject=2)
    pairs, _ = load_mimic_pairs(tmp_path)
    gone, broken = pairs["image_path"].iloc[0], pairs["image_path"].iloc[1]
    import os

    os.unlink(gone)
    truncate(__import__("pathlib").Path(broken), keep=0.3)
    pairs, report = load_mimic_pairs(tmp_path)
    assert report.counts() == {"missing image file": 1}
    ds, report = MimicPretrainDataset.from_root(tmp_path, image_size=32, cache_dir=tmp_path / "cache", cache_workers=2)
    assert report.counts()["undecodable image"] == 1
    assert len(ds) == len(pairs) - 1
    assert broken not in ds.pairs["image_path"].tolist()


def test_dataset_items_have_the_contract_shapes_and_work_with_two_workers(tmp_path):
    make_mimic_tree(tmp_path, n_subjects=2, studies_per_subject=2)
    pairs, _ = load_mimic_pairs(tmp_path, split="train")
    cache = ImageCache(tmp_path / "cache", pairs["image_path"].tolist(), 32)
    ds = MimicPretrainDataset(pairs, image_size=32, cache=cache)
    item = ds[1]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (14,) and item["labels"].dtype == torch.float32
    assert torch.isnan(item["labels"]).any()  # blanks stay NaN
    assert item["study_id"] == int(pairs["study_id"].iloc[1]) and item["index"] == 1
    # cached and uncached give the same image
    plain = MimicPretrainDataset(pairs, image_size=32)
    assert torch.allclose(plain[1]["image"], item["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda b: b)
    seen = sorted(x["index"] for batch in loader for x in batch)
    assert seen == list(range(len(ds)))


def test_check_cli_sees_every_frontal_image_per_split(tmp_path, capsys):
    from mlip_core.data.check import main

    tree = make_mimic_tree(tmp_path, n_subjects=3, studies_per_subject=2)
    assert main(["--dataset", "mimic", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"usable={len(tree['frontal'])} skipped=0"
    for split in ("train", "validate", "test"):
        n = sum(1 for _, _, s in tree["frontal"] if s == split)
        assert any(line.startswith(f"split {split}") and f" {n} images" in line for line in out)


def test_reader_and_check_cli_see_every_study_of_an_offline_world(tmp_path, capsys):
    from mlip_core.data.check import main
    from mlip_core.data.synth import write_world

    summary = write_world(tmp_path / "world", num_studies=10, seed=1, image_size=32, report_source="mixed",
                          images_per_study=2)
    root = tmp_path / "world"
    studies = pd.read_csv(root / "synth" / "studies.csv")
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv")
    pairs, report = load_mimic_pairs(root, split=None)
    assert len(report) == 0
    assert set(pairs["study_id"]) == set(studies["study_id"]) and len(studies) == summary.studies
    frontal = meta[meta["ViewPosition"].isin(["PA", "AP"])]
    assert sorted(pairs["dicom_id"]) == sorted(frontal["dicom_id"])
    assert (pairs["text"].str.len() > 0).all()
    assert main(["--dataset", "mimic", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"usable={len(frontal)} skipped=0"


def test_reports_are_read_from_a_separate_tree_or_straight_from_the_zip(tmp_path):
    import shutil
    import zipfile

    root = tmp_path / "jpg"
    tree = make_mimic_tree(root, n_subjects=1, studies_per_subject=2)
    expected, _ = load_mimic_pairs(root)
    reports = sorted((root / "files").rglob("s*.txt"))
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as zf:
        for r in reports:
            zf.write(r, "mimic-cxr-reports/" + r.relative_to(root).as_posix())
    other = tmp_path / "reports"
    for r in reports:
        (other / r.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(r, other / r.relative_to(root))
    from_zip, report = load_mimic_pairs(root)
    assert len(report) == 0 and from_zip["text"].tolist() == expected["text"].tolist()
    from_dir, report = load_mimic_pairs(root, reports_root=other)
    assert len(report) == 0 and from_dir["text"].tolist() == expected["text"].tolist()
    (root / "mimic-cxr-reports.zip").unlink()
    # Reports nowhere: an error that names the places looked in and the fix, not a skip per study.
    with pytest.raises(FileNotFoundError, match=r"no MIMIC-CXR report of these studies in .*mimic-cxr-reports\.zip"
                                                r".*--reports DIR_OR_ZIP") as err:
        load_mimic_pairs(root)
    assert f"s{tree['studies'][0]}.txt" in str(err.value)


def _reports_apart(tmp_path):
    """A MIMIC-CXR-JPG tree without reports, and the reports as a files/ tree and as a zip elsewhere."""
    import shutil
    import zipfile

    root = tmp_path / "jpg"
    tree = make_mimic_tree(root, n_subjects=3, studies_per_subject=2)
    other = tmp_path / "mimic-cxr" / "2.0.0"
    reports = sorted((root / "files").rglob("s*.txt"))
    with zipfile.ZipFile(tmp_path / "mimic-cxr-reports.zip", "w") as zf:
        for r in reports:
            zf.write(r, "files/" + r.relative_to(root / "files").as_posix())
            (other / r.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(r, other / r.relative_to(root))
    return tree, root, other, tmp_path / "mimic-cxr-reports.zip"


@pytest.mark.parametrize("where", ["no files/", "files/ itself", "images only", "zip of other studies", "not a zip"])
def test_a_reports_root_without_these_reports_is_an_error_naming_it_and_the_fix(tmp_path, where):
    import zipfile

    tree, root, other, archive = _reports_apart(tmp_path)
    bad = {"no files/": other.parent, "files/ itself": other / "files", "images only": root,
           "zip of other studies": tmp_path / "other.zip", "not a zip": tmp_path / "reports.tar"}[where]
    if where == "zip of other studies":
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("files/p19/p19999999/s59999999.txt", "FINDINGS: clear.")
    if where == "not a zip":
        bad.write_bytes(b"not a zip")
    hint = {"no files/": "no files/ folder", "files/ itself": "files/ folder itself: pass its parent",
            "images only": "none of these studies' reports is there", "zip of other studies": "reports is there",
            "not a zip": "not a .zip"}[where]
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        load_mimic_pairs(root, reports_root=bad)
    assert str(bad) in str(err.value) and hint in str(err.value) and "DIR_OR_ZIP" in str(err.value)
    good, report = load_mimic_pairs(root, reports_root=other)
    assert len(report) == 0 and len(good) == sum(1 for _, _, s in tree["frontal"] if s == "train")


def test_finding_the_reports_lists_no_subject_folder(tmp_path, monkeypatch):
    """Default discovery looks up a few expected report paths; a glob over files/p*/p*/ listed every subject
    folder of an images-only tree (65k on real MIMIC-CXR-JPG) before moving on to mimic-cxr-reports.zip."""
    import os
    import shutil

    tree, root, _, archive = _reports_apart(tmp_path)
    shutil.copy(archive, root / "mimic-cxr-reports.zip")
    listed = []
    real_scandir = os.scandir

    def scandir(path="."):
        listed.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    pairs, report = load_mimic_pairs(root, split=None)
    assert len(report) == 0 and len(pairs) == len(tree["frontal"])
    assert not [p for p in listed if p.startswith(str(root / "files"))]


def test_check_cli_reads_reports_kept_apart_with_reports(tmp_path, capsys):
    from mlip_core.data.check import main

    tree, root, other, archive = _reports_apart(tmp_path)
    for where in (other, archive):
        assert main(["--dataset", "mimic", "--root", str(root), "--reports", str(where), "--no-verify-images"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out[0].endswith(f"reports={where}") and out[-1] == f"usable={len(tree['frontal'])} skipped=0"
    assert main(["--dataset", "mimic", "--root", str(root), "--no-verify-images"]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "usable=0 skipped=0"
    assert "--reports DIR_OR_ZIP" in captured.err
    assert main(["--dataset", "mimic", "--root", str(root), "--reports", str(other.parent)]) == 2
    assert f"{other.parent}: no files/ folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", "siim", "--root", str(root), "--reports", str(other)])
