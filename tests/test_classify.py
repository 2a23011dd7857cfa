"""Linear-probe transfer: features, probe, AUROC with reported skips, nested patient-level fractions, exports."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mlip_core.checkpoint import write_image_tower_export
from mlip_core.config import ImageTowerConfig
from mlip_core.data.downstream import ImageLabelDataset
from mlip_core.data.synth import write_world
from mlip_core.model.encoders import ImageTower
from mlip_core.transfer.classify import (
    ClassificationTask,
    Encoder,
    auroc_per_label,
    build_tower,
    encoder_features,
    encoder_from_export,
    extract_features,
    find_exports,
    fraction_masks,
    linear_probe,
    offline_world_task,
    probe_sweep,
    raw_pixel_features,
    summarise,
)
from mlip_core.data.skips import SkipReport


def _pngs(folder, n: int, size: int = 32, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _separable(n: int, d: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float64)[:, None]
    return x, y


def test_tower_features_have_one_global_vector_per_image(tmp_path):
    paths = _pngs(tmp_path / "imgs", 5)
    tower = build_tower(Encoder("rand", "tower", 32, tower={"name": "resnet18"}))
    ds = ImageLabelDataset(pd.DataFrame({"image_path": paths, "y": 0.0}), ["y"], image_size=32)
    feats = extract_features(tower, ds, batch_size=2)
    assert feats.shape == (5, tower.global_dim) == (5, 512) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std(axis=0).max() > 0
    assert raw_pixel_features(np.zeros((3, 32, 32), np.uint8)).shape == (3, 1024)


def test_channels_last_features_match_nchw_and_the_tower_comes_back_contiguous(tmp_path):
    paths = _pngs(tmp_path / "imgs", 5)
    tower = build_tower(Encoder("rand", "tower", 32, tower={"name": "test_efficientnet"}))
    ds = ImageLabelDataset(pd.DataFrame({"image_path": paths, "y": 0.0}), ["y"], image_size=32)
    nchw = extract_features(tower, ds, batch_size=2, channels_last=False)
    cl = extract_features(tower, ds, batch_size=2)  # the default on a CPU
    assert np.allclose(cl, nchw, rtol=1e-4, atol=1e-5) and np.abs(nchw).max() > 0
    assert all(p.is_contiguous() for p in tower.parameters())


def test_random_tower_is_reproducible_from_its_seed():
    x = torch.randn(2, 1, 32, 32)
    a, b, c = (build_tower(Encoder("r", "tower", 32, tower={"name": "resnet18"}, seed=s)) for s in (0, 0, 1))
    with torch.inference_mode():
        assert torch.equal(a(x).global_, b(x).global_) and not torch.equal(a(x).global_, c(x).global_)


def test_probe_beats_chance_on_separable_data_and_not_on_shuffled_labels():
    x, y = _separable(3000)
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
    good = auroc_per_label(yte, linear_probe(xtr, ytr, xte, ["y"], C=1.0).scores, ["y"])[0]["y"]
    shuffled = np.random.default_rng(1).permutation(ytr)
    chance = auroc_per_label(yte, linear_probe(xtr, shuffled, xte, ["y"], C=1.0).scores, ["y"])[0]["y"]
    assert good > 0.95
    assert abs(chance - 0.5) < 0.06


def test_single_class_test_label_is_reported_not_dropped():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.3, 0.4]])
    aurocs, skipped = auroc_per_label(y, scores, ["a", "b"])
    assert aurocs == {"a": 1.0} and set(skipped) == {"b"} and "only negatives" in skipped["b"]


def test_sweep_reports_skipped_and_chance_labels(tmp_path):
    n = 400
    x, y = _separable(n)
    df = pd.DataFrame({"image_path": [f"i{i}" for i in range(n)], "group": [str(i // 2) for i in range(n)],
                       "split": ["train"] * 300 + ["validate"] * 50 + ["test"] * 50})
    df["sep"] = y[:, 0]
    df["never_in_test"] = 0.0
    df.loc[:10, "never_in_test"] = 1.0  # positives only in train
    df["never_in_train"] = 0.0
    df.loc[[320, 360, 370], "never_in_train"] = 1.0  # positives only outside train
    task = ClassificationTask("toy", df, ["sep", "never_in_test", "never_in_train"], SkipReport("toy"))
    masks = fraction_masks(task.split("train"), tmp_path, "toy", fractions=(0.1, 1.0), seeds=(0, 1))
    res = probe_sweep(x, task, masks, Cs=(0.1, 1.0), encoder="toy")
    full = res[res["fraction"] == 1.0].set_index("label")
    assert full.loc["sep", "status"] == "scored" and full.loc["sep", "auroc"] > 0.9
    assert full.loc["never_in_test", "status"].startswith("skipped") and np.isnan(full.loc["never_in_test", "auroc"])
    assert full.loc["never_in_train", "status"].startswith("chance") and full.loc["never_in_train", "auroc"] == 0.5
    summary = summarise(res).set_index("fraction")
    assert summary.loc[0.1, "seeds"] == 2 and summary.loc[1.0, "seeds"] == 1
    assert (summary["labels scored"] == 2).all()


def test_label_fractions_are_nested_and_patient_level(tmp_path):
    groups = np.repeat(np.arange(300), np.random.default_rng(0).integers(1, 4, 300)).astype(str)
    train = pd.DataFrame({"image_path": [f"i{i}" for i in range(len(groups))], "group": groups})
    masks = fraction_masks(train, tmp_path, "toy", fractions=(0.01, 0.1, 1.0), seeds=(0, 1))
    assert set(masks) == {(0.01, 0), (0.1, 0), (0.01, 1), (0.1, 1), (1.0, 0)}
    for seed in (0, 1):
        small, mid = masks[(0.01, seed)], masks[(0.1, seed)]
        assert (small <= mid).all() and (mid <= masks[(1.0, 0)]).all() and masks[(1.0, 0)].all()
        assert train.loc[small, "group"].nunique() == 3 and train.loc[mid, "group"].nunique() == 30
        for m in (small, mid):  # a patient is wholly in or wholly out
            inside = set(train.loc[m, "group"])
            assert set(train.loc[~m, "group"]).isdisjoint(inside)
    assert not np.array_equal(masks[(0.1, 0)], masks[(0.1, 1)])
    assert len(list(tmp_path.glob("toy_train_*pct_seed*.csv"))) == 6


def test_export_round_trips_into_identical_features(tmp_path):
    cfg = ImageTowerConfig(name="resnet18", image_size=32)
    torch.manual_seed(3)
    tower = ImageTower(cfg).eval()
    write_image_tower_export({k: v.clone() for k, v in tower.state_dict().items()},
                             {"model": {"image": asdict(cfg)}}, step=7, out=tmp_path / "pretrained" / "toy")
    exports = find_exports(tmp_path / "pretrained")
    assert list(exports) == ["toy"]
    enc = encoder_from_export("toy", exports["toy"])
    assert enc.image_size == 32 and enc.tower["name"] == "resnet18"
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(build_tower(enc)(x).global_, tower(x).global_)


def test_export_that_does_not_fit_its_config_names_the_file(tmp_path):
    cfg = ImageTowerConfig(name="resnet18", image_size=32)
    state = {k: v for k, v in ImageTower(cfg).state_dict().items() if "layer4" not in k}
    write_image_tower_export(state, {"model": {"image": asdict(cfg)}}, step=0, out=tmp_path / "bad")
    with pytest.raises(RuntimeError, match="image_tower.pt"):
        build_tower(encoder_from_export("bad", tmp_path / "bad"))


def test_offline_world_task_uses_drawn_labels_and_caches_features(tmp_path):
    world = tmp_path / "world"
    write_world(world, 16, seed=0, image_size=64, report_source="template")
    task = offline_world_task(world)
    truth = pd.read_csv(world / "synth" / "labels.csv")
    assert len(task.df) == 16 and set(task.df["split"]) <= {"train", "validate", "test"}
    drawn = [c for c in truth.columns[2:] if truth[c].sum() > 0]
    assert task.labels == drawn and set(task.unused_labels) == set(truth.columns[2:]) - set(drawn)
    merged = task.df.merge(truth, on="study_id", suffixes=("", "_truth"))
    assert all((merged[c] == merged[f"{c}_truth"]).all() for c in drawn)
    enc = Encoder("raw", "raw", 16)
    f1, valid, rec1 = encoder_features(enc, task.df["image_path"].tolist(), tmp_path / "c", tmp_path / "f")
    f2, _, rec2 = encoder_features(enc, task.df["image_path"].tolist(), tmp_path / "c", tmp_path / "f")
    assert f1.shape == (16, 256) and valid.all() and not rec1["from cache"] and rec2["from cache"]
    assert np.array_equal(f1, f2)


def test_train_patient_limit_keeps_whole_patients_and_counts_the_rest():
    df = pd.DataFrame({"image_path": [f"i{i}" for i in range(12)], "group": list("aabbccddeeff"),
                       "split": ["train"] * 10 + ["test"] * 2, "y": [0.0, 1.0] * 6})
    task = ClassificationTask("toy", df, ["y"], SkipReport("toy"))
    small = task.limit_train_patients(3, seed=0)
    train = small.split("train")
    assert train["group"].nunique() == 3 and len(train) == 6 and len(small.split("test")) == 2
    assert sum(small.skips.filtered.values()) == 4
    assert task.limit_train_patients(0) is task
