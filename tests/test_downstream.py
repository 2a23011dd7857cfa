"""Transfer-dataset readers (CheXpert, RSNA, SIIM, COVIDx, Object-CXR, IU) on real-format fixture trees."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlip_core.data.fixture_trees import (
    kaggle_mask2rle,
    make_chexpert_tree,
    make_covidx_tree,
    make_iu_tree,
    make_object_cxr_tree,
    make_rsna_tree,
    make_siim_tree,
)

from mlip_core.data import downstream as D


# ---------------------------------------------------------------------------------------------- CheXpert
@pytest.mark.parametrize("policy, uncertain", [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)])
def test_chexpert_uncertainty_policies_map_minus_one_and_blank(tmp_path, policy, uncertain):
    tree = make_chexpert_tree(tmp_path)
    df, report = D.load_chexpert(tree["root"], "train", policy=policy)
    raw = tree["train"][tree["train"]["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    assert len(df) == len(raw) and len(report) == 0 and report.filtered["lateral view"] == len(raw)
    for c in D.CHEXPERT_5:
        for got, want in zip(df[c], raw[c]):
            if want == -1.0:
                assert (math.isnan(got) and math.isnan(uncertain)) or got == uncertain
            elif math.isnan(want):
                assert got == 0.0  # blank = not mentioned = negative
            else:
                assert got == want
    assert all(p.endswith("_frontal.jpg") for p in df["image_path"])
    above, _ = D.load_chexpert(tmp_path, "train", policy=policy)  # the folder holding CheXpert-v1.0-small
    assert above["image_path"].tolist() == df["image_path"].tolist()


def test_chexpert_bad_inputs(tmp_path):
    tree = make_chexpert_tree(tmp_path)
    df = pd.read_csv(tree["train_csv"])
    df.loc[0, "Edema"] = 3.0  # unknown value
    df = pd.concat([df, df.iloc[[2]]])  # duplicate Path
    df.to_csv(tree["train_csv"], index=False)
    (tmp_path / df["Path"].iloc[4]).unlink()  # missing image
    out, report = D.load_chexpert(tree["root"], "train")
    assert report.counts() == {"unknown label value (expected 1.0, 0.0, -1.0 or blank)": 1,
                               "duplicate Path in train.csv": 1, "missing image file": 1}
    df.drop(columns=["AP/PA"]).to_csv(tree["train_csv"], index=False)
    with pytest.raises(ValueError, match=r"train\.csv: wrong CSV header.*AP/PA"):
        D.load_chexpert(tree["root"], "train")
    with pytest.raises(FileNotFoundError, match=r"test\.csv"):
        D.load_chexpert(tree["root"], "test")


# ---------------------------------------------------------------------------------------------- RSNA
def test_rsna_groups_boxes_per_patient_and_converts_to_corners(tmp_path):
    tree = make_rsna_tree(tmp_path)
    df, report = D.load_rsna(tmp_path)
    assert len(report) == 0 and len(df) == len(tree["boxes"])
    for _, row in df.iterrows():
        assert row["boxes"] == tree["boxes"][row["patient_id"]]
        assert row["target"] == int(bool(tree["boxes"][row["patient_id"]]))
    item = D.DetectionDataset(df, image_size=24)[0]
    assert item["image"].shape == (1, 24, 24) and item["boxes"].shape[1] == 4


def test_rsna_bad_inputs(tmp_path):
    make_rsna_tree(tmp_path)
    labels = pd.read_csv(tmp_path / "stage_2_train_labels.csv")
    labels.loc[len(labels) - 1, "Target"] = 2  # unknown target
    labels.loc[0, "width"] = np.nan  # positive without a box
    negative = labels[labels["Target"] == 0].iloc[[0]]
    labels = pd.concat([labels, negative])  # the same negative patient twice
    labels.to_csv(tmp_path / "stage_2_train_labels.csv", index=False)
    gone = tmp_path / "stage_2_train_images" / f"{labels.patientId.unique()[3]}.dcm"
    gone.unlink()
    truncated = tmp_path / "stage_2_train_images" / f"{labels.patientId.unique()[1]}.dcm"
    truncated.write_bytes(truncated.read_bytes()[:300])
    df, report = D.load_rsna(tmp_path)
    assert report.counts()["unknown Target value (expected 0 or 1)"] == 1
    assert report.counts()["Target 1 without a valid box"] == 1
    assert report.counts()["duplicate patientId rows for Target 0"] == 1
    assert report.counts()["missing image file"] == 1 and str(gone) not in set(df["image_path"])
    # The reader lists the truncated file (its CSV row is fine); decoding it names the file and the fix.
    assert str(truncated) in set(df["image_path"])
    from mlip_core.data.images import ImageReadError, read_image

    with pytest.raises(ImageReadError, match=rf"{truncated.name}.*(re-download|remove)"):
        read_image(truncated)
    (tmp_path / "stage_2_train_labels.csv").write_text("patient,Target\nx,0\n")
    with pytest.raises(ValueError, match="stage_2_train_labels.csv: wrong CSV header"):
        D.load_rsna(tmp_path)


# ---------------------------------------------------------------------------------------------- SIIM
def test_siim_rle_matches_the_competition_encoder_and_documented_example():
    rng = np.random.default_rng(0)
    mask = (rng.random((13, 9)) > 0.6).astype(np.uint8)
    mask[-1, -1] = 0  # the reference encoder drops a run touching the last pixel
    ref = kaggle_mask2rle((mask * 255).T, 9, 13)
    assert D.rle_encode(mask) == ref
    assert np.array_equal(D.rle_decode(ref, 13, 9), mask)
    # The competition page's example: 1024x1024, first run absolute, later runs relative, column-major.
    m = D.rle_decode("387620 23 996 33", 1024, 1024)
    col, row = divmod(387620, 1024)
    assert m[row : row + 23, col].all() and not m[row - 1, col] and not m[row + 23, col]
    assert m[388639 % 1024, 388639 // 1024] and m.sum() == 23 + 33
    assert D.rle_decode(" -1", 4, 4).sum() == 0
    with pytest.raises(ValueError, match="past the end"):
        D.rle_decode("10 20", 4, 4)


def test_siim_reader_unions_instances_and_handles_minus_one(tmp_path):
    tree = make_siim_tree(tmp_path)
    df, report = D.load_siim(tmp_path)
    assert len(report) == 0 and len(df) == len(tree["masks"])
    for _, row in df.iterrows():
        want = tree["masks"][row["image_id"]] > 0
        assert np.array_equal(D.siim_mask(row["rles"], 32, 32).astype(bool), want)
        assert row["pneumothorax"] == int(want.any())
    item = D.SegmentationDataset(df, image_size=16)[0]
    assert item["mask"].shape == (1, 16, 16) and item["mask"].sum() > 0


def test_siim_bad_inputs(tmp_path):
    tree = make_siim_tree(tmp_path)
    ids = list(tree["masks"])
    lines = tree["rle_csv"].read_text().splitlines()
    lines += [f"{ids[0]}, -1", f"{ids[2]}, 5 x", "1.2.3.missing, -1", f"{ids[4]}, 1000 50"]
    tree["rle_csv"].write_text("\n".join(lines) + "\n")
    df, report = D.load_siim(tmp_path)
    counts = report.counts()
    assert counts["both -1 and a mask for one ImageId"] == 1
    assert counts["missing DICOM file"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("malformed RLE")) == 1
    assert sum(v for k, v in counts.items() if k.startswith("RLE does not fit the image")) == 1
    assert len(df) == len(ids) - 3
    tree["rle_csv"].write_text("ImageId,Mask\n")
    with pytest.raises(ValueError, match="train-rle.csv: wrong CSV header.*EncodedPixels"):
        D.load_siim(tmp_path)


# ---------------------------------------------------------------------------------------------- COVIDx
def test_covidx_reads_txt_split_files(tmp_path):
    tree = make_covidx_tree(tmp_path)
    df, report = D.load_covidx(tmp_path, "train")
    assert len(report) == 0 and len(df) == len(tree["train"])
    assert list(df["label"][:3]) == ["normal", "pneumonia", "COVID-19"]
    assert list(df["label_index"][:3]) == [0, 1, 2]
    ds = D.ImageLabelDataset(df.assign(y=df["label_index"].astype(float)), ["y"], image_size=16)
    assert ds[2]["image"].shape == (1, 16, 16) and ds[2]["labels"].item() == 2.0


def test_covidx_bad_inputs(tmp_path):
    tree = make_covidx_tree(tmp_path)
    lines = tree["train"] + ["77 extra.png tuberculosis cohen", "bad line", tree["train"][0], "78 gone.png normal x"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    df, report = D.load_covidx(tmp_path, "train")
    assert report.counts() == {"unknown label 'tuberculosis'": 1, "duplicate filename": 1, "missing image file": 1,
                               "malformed line (expected: patient_id filename label source)": 1}
    assert len(df) == len(tree["train"])
    with pytest.raises(FileNotFoundError, match="val.txt"):
        D.load_covidx(tmp_path, "val")


# ---------------------------------------------------------------------------------------------- Object-CXR
def test_object_cxr_parses_box_ellipse_polygon(tmp_path):
    make_object_cxr_tree(tmp_path)
    df, report = D.load_object_cxr(tmp_path, "train")
    assert len(report) == 0 and list(df["has_object"]) == [1, 0, 1, 0]
    assert df["boxes"][0] == [[2, 3, 10, 12], [20, 20, 30, 28]]
    assert [k for k, _ in df["shapes"][0]] == [0, 1]
    assert df["boxes"][2] == [[4, 5, 15, 18]]  # polygon's bounding box
    dev, _ = D.load_object_cxr(tmp_path, "valid")
    assert len(dev) == 2 and set(dev["split"]) == {"dev"}


def test_object_cxr_bad_inputs(tmp_path):
    make_object_cxr_tree(tmp_path)
    df = pd.read_csv(tmp_path / "train.csv", dtype=str, keep_default_na=False)
    extra = pd.DataFrame({"image_name": ["00000.jpg", "00001.jpg"], "annotation": ["", "0 1 2 3"]})
    df = pd.concat([df, extra]).reset_index(drop=True)
    df.loc[1, "annotation"] = "5 1 2 3 4"
    df.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "train" / "00003.jpg").unlink()
    out, report = D.load_object_cxr(tmp_path, "train")
    counts = report.counts()
    assert counts["duplicate image_name"] == 2 and counts["missing image file"] == 1
    assert counts["malformed annotation (unknown ANNO_TYPE 5 (expected 0 rectangle, 1 ellipse, 2 polygon))"] == 1
    assert len(out) == 2
    (tmp_path / "dev.csv").write_text("image,boxes\n08000.jpg,\n")
    with pytest.raises(ValueError, match=r"dev\.csv: wrong CSV header.*image_name,annotation"):
        D.load_object_cxr(tmp_path, "dev")


# ---------------------------------------------------------------------------------------------- IU X-ray
def test_iu_pairs_every_image_and_counts_empty_reports(tmp_path):
    tree = make_iu_tree(tmp_path)
    df, report = D.load_iu(tmp_path)
    assert report.counts() == {"empty report: neither IMPRESSION nor FINDINGS has text": 1}
    want = sorted(i for uid, ids in tree["image_ids"].items() if uid != tree["empty_uid"] for i in ids)
    assert sorted(df["image_id"]) == want
    assert df.set_index("uid")["normal"].groupby(level=0).first().to_dict() == {"CXR1": 1, "CXR2": 0, "CXR3": 1}
    assert df["text"].iloc[0].startswith("No acute disease.")
    (tmp_path / "images" / f"{want[0]}.png").unlink()
    df, report = D.load_iu(tmp_path)
    assert report.counts()["missing image file"] == 1 and len(df) == len(want) - 1


# ---------------------------------------------------------------------------------------------- splits
def test_label_fractions_are_nested_seeded_files(tmp_path):
    df = pd.DataFrame({"image_path": [f"img{i}.jpg" for i in range(500)]})
    files = D.label_fraction_splits(df, tmp_path, "toy", seed=3)
    again = D.label_fraction_splits(df, tmp_path / "again", "toy", seed=3)
    other = D.label_fraction_splits(df, tmp_path / "other", "toy", seed=4)
    sets = {f: set(pd.read_csv(p)["image_path"]) for f, p in files.items()}
    assert [len(sets[f]) for f in (0.01, 0.1, 1.0)] == [5, 50, 500]
    assert sets[0.01] < sets[0.1] < sets[1.0]
    assert files[0.1].read_text() == again[0.1].read_text() != other[0.1].read_text()
    assert files[0.01].name == "toy_train_1pct_seed3.csv"
    sub = D.apply_split_file(df, files[0.1])
    assert set(sub["image_path"]) == sets[0.1]
    with pytest.raises(ValueError, match=r"toy_train_10pct_seed3.csv: \d+ ids are not in the dataset"):
        D.apply_split_file(df.iloc[:5], files[0.1])


def test_holdout_split_keeps_patients_together():
    df = pd.DataFrame({"patient": [i // 3 for i in range(300)]})
    split = D.holdout_split(df, "patient", seed=1)
    assert split.groupby(df["patient"]).nunique().max() == 1
    assert set(split) == {"train", "valid", "test"}


# ---------------------------------------------------------------------------------------------- check CLI
@pytest.mark.parametrize("dataset", ["chexpert", "rsna", "siim", "covidx", "object-cxr", "iu"])
def test_check_cli_counts_usable_and_skipped_images_last(tmp_path, capsys, dataset):
    from mlip_core.data.fixture_trees import truncate

    from mlip_core.data.check import main

    builders = {"chexpert": lambda r: make_chexpert_tree(r)["root"], "rsna": lambda r: make_rsna_tree(r)["root"],
                "siim": lambda r: make_siim_tree(r)["root"], "covidx": lambda r: make_covidx_tree(r)["root"],
                "object-cxr": lambda r: make_object_cxr_tree(r)["root"], "iu": lambda r: make_iu_tree(r)["root"]}
    root = builders[dataset](tmp_path)
    assert main(["--dataset", dataset, "--root", str(root)]) == 0
    clean = capsys.readouterr().out.strip().splitlines()
    n = int(clean[-1].split()[0].split("=")[1])
    skipped = int(clean[-1].split()[1].split("=")[1])
    # corrupt one image: the check decodes it and counts it instead of failing
    victim = sorted(p for p in root.rglob("*") if p.suffix in {".jpg", ".png", ".dcm"})[0]
    truncate(victim, keep=0.2)
    assert main(["--dataset", dataset, "--root", str(root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"usable={n - 1} skipped={skipped + 1}"
    # named in a skip line: "undecodable image", or for SIIM an unreadable header found while checking the RLE
    assert any(line.startswith("  skipped: ") and victim.stem in line for line in out)


def test_check_cli_missing_root_file_exits_2_and_names_it(tmp_path, capsys):
    from mlip_core.data.check import main

    assert main(["--dataset", "rsna", "--root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "stage_2_train_labels.csv" in captured.err and captured.out.strip().endswith("usable=0 skipped=0")
    assert main(["--dataset", "iu", "--root", str(tmp_path / "absent")]) == 2
    assert "absent: no such folder" in capsys.readouterr().err


def test_transfer_datasets_load_through_two_worker_dataloaders(tmp_path):
    import torch

    from mlip_core.data.cache import ImageCache

    tree = make_chexpert_tree(tmp_path)
    df, _ = D.load_chexpert(tree["root"], "train", policy="ignore")
    cache = ImageCache(tmp_path / "cache", df["image_path"].tolist(), 24)
    ds = D.ImageLabelDataset(df, D.CHEXPERT_5, image_size=24, cache=cache)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2))
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.shape == (len(df), 5)
    assert torch.equal(torch.isnan(labels), torch.tensor(df[D.CHEXPERT_5].isna().to_numpy()))
    siim, _ = D.load_siim(make_siim_tree(tmp_path / "siim")["root"])
    masks = [b["mask"] for b in torch.utils.data.DataLoader(D.SegmentationDataset(siim, 16), batch_size=2, num_workers=2)]
    assert torch.cat(masks).shape == (len(siim), 1, 16, 16)
