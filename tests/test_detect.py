"""Detection transfer: RetinaNet + FPN on the tower's weights, mAP over IoU 0.40:0.05:0.75, the RSNA sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mlip_core.data.fixture_trees import make_object_cxr_tree, make_rsna_tree
from mlip_core.data.downstream import DetectionDataset, load_object_cxr, load_rsna
from mlip_core.transfer.classify import Encoder, build_tower
from mlip_core.transfer.detect import (
    backbone_features,
    build_detector,
    detection_data,
    detection_map,
    detection_sweep,
    train_detection,
)
from mlip_core.transfer.segment import to_input


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small models run faster and steadier that way on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _encoder(name: str = "resnet18", size: int = 64, seed: int = 3) -> Encoder:
    return Encoder(name, "tower", size, tower={"name": name}, seed=seed)


def _squares(n: int = 48, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Bright squares (a fifth to a third of the side) on dark noise; every fourth image has none."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 100, (n, size, size)).astype(np.uint8)
    boxes = []
    for i in range(n):
        b = []
        for _ in range(0 if i % 4 == 3 else int(rng.integers(1, 3))):
            w = int(rng.integers(size // 5, size // 3))
            x0, y0 = (int(v) for v in rng.integers(0, size - w, 2))
            images[i, y0 : y0 + w, x0 : x0 + w] = np.clip(images[i, y0 : y0 + w, x0 : x0 + w].astype(int) + 150, 0, 255)
            b.append([x0, y0, x0 + w, y0 + w])
        boxes.append(np.array(b, np.float32).reshape(-1, 4))
    return images, boxes


def _body_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.body.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_detector_backbone_holds_the_towers_weights(name):
    enc = _encoder(name)
    model = build_detector(enc, 64)
    tower_state = build_tower(enc).backbone.state_dict()
    own = model.backbone.body.state_dict()
    assert len(own) > 100 and all(torch.equal(own[k], tower_state[k]) for k in own)
    assert model.backbone.strides == [8, 16, 32]
    model.eval()
    with torch.inference_mode():
        out = model([torch.zeros(1, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_map_hand_cases():
    target = [{"boxes": [[0, 0, 10, 10]]}]
    perfect = detection_map([{"boxes": [[0, 0, 10, 10]], "scores": [0.9]}], target)
    assert perfect == {"mAP@0.5": 1.0, "mAP@0.4:0.75": 1.0}
    # IoU 0.42: a hit at threshold 0.40 only, so the mean over the eight thresholds is 1/8
    low = detection_map([{"boxes": [[0, 0, 10, 4.2]], "scores": [0.9]}], target)
    assert low["mAP@0.5"] == 0.0 and low["mAP@0.4:0.75"] == pytest.approx(1 / 8)
    # a false positive scored below the true positive does not lower AP
    fp_after = detection_map([{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "scores": [0.9, 0.3]}], target)
    assert fp_after == {"mAP@0.5": 1.0, "mAP@0.4:0.75": 1.0}
    # an image without targets: its detections are false positives; ranked first they halve the precision
    two = target + [{"boxes": np.zeros((0, 4))}]
    assert detection_map([{"boxes": [[0, 0, 10, 10]], "scores": [0.9]}, {"boxes": [[0, 0, 5, 5]], "scores": [0.95]}],
                         two)["mAP@0.5"] == pytest.approx(0.5)
    assert detection_map([{"boxes": [[0, 0, 10, 10]], "scores": [0.9]}, {"boxes": np.zeros((0, 4)), "scores": []}],
                         two)["mAP@0.5"] == 1.0
    nothing = detection_map([{"boxes": np.zeros((0, 4)), "scores": []}], [{"boxes": np.zeros((0, 4))}])
    assert all(np.isnan(v) for v in nothing.values())


def test_frozen_training_finds_bright_squares_and_leaves_the_backbone_untouched():
    images, boxes = _squares()
    enc = _encoder("resnet18")
    before = _body_state(build_detector(enc, 64))
    train, test = np.arange(32), np.arange(32, 48)
    res = train_detection(enc, images, boxes, train, test, mode="frozen", steps=100, batch_size=8, lr=1e-3, seed=0)
    rng = np.random.default_rng(1)
    random_preds = []
    for _ in test:
        xy, wh = rng.uniform(0, 45, (5, 2)), rng.uniform(12, 21, (5, 2))
        random_preds.append({"boxes": np.concatenate([xy, np.minimum(xy + wh, 64)], 1), "scores": rng.random(5)})
    baseline = detection_map(random_preds, [{"boxes": boxes[i]} for i in test])["mAP@0.5"]
    assert res["mAP@0.5"] > 0.3 > baseline + 0.2
    assert np.mean(res["loss_curve"][-10:]) < 0.6 * np.mean(res["loss_curve"][:10])
    for p in res["predictions"]:
        b = p["boxes"]
        assert b.shape[1] == 4 and len(b) == len(p["scores"]) <= 20
        assert (b >= 0).all() and (b <= 64).all() and (b[:, 2:] >= b[:, :2]).all()
    after = res["model"].backbone.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # trained on float16 cached features, it scores about the same through the live backbone
    with torch.inference_mode():
        live = res["model"](list(to_input(images[test])))
    live_map = detection_map([{"boxes": o["boxes"], "scores": o["scores"]} for o in live],
                             [{"boxes": boxes[i]} for i in test])
    assert live_map["mAP@0.5"] == pytest.approx(res["mAP@0.5"], abs=0.05)


def test_finetune_changes_the_backbone():
    images, boxes = _squares(n=8)
    enc = _encoder("tf_efficientnet_lite0")
    before = _body_state(build_detector(enc, 64))
    res = train_detection(enc, images, boxes, np.arange(6), np.arange(6, 8), mode="finetune", steps=2, batch_size=3)
    after = res["model"].backbone.body.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2


def test_same_seed_gives_the_same_map():
    images, boxes = _squares(n=16)
    enc = _encoder("resnet18")
    feats = backbone_features(enc, images)
    kw = dict(mode="frozen", steps=6, batch_size=4, lr=1e-3, features=feats)
    a = train_detection(enc, images, boxes, np.arange(12), np.arange(12, 16), seed=2, **kw)
    b = train_detection(enc, images, boxes, np.arange(12), np.arange(12, 16), seed=2, **kw)
    c = train_detection(enc, images, boxes, np.arange(12), np.arange(12, 16), seed=3, **kw)
    assert a["loss_curve"] == b["loss_curve"]
    np.testing.assert_equal([a["mAP@0.5"], a["mAP@0.4:0.75"]], [b["mAP@0.5"], b["mAP@0.4:0.75"]])
    assert a["loss_curve"] != c["loss_curve"]


def test_detection_data_maps_boxes_as_detection_dataset(tmp_path):
    tree = make_rsna_tree(tmp_path / "rsna", n=6)
    df, _ = load_rsna(tree["root"])
    data = detection_data(df, 32)
    assert data.images.shape == (6, 32, 32) and len(data.boxes) == 6 and len(data.skips) == 0
    ds = DetectionDataset(df, image_size=32)
    for i in range(len(df)):
        item = ds[i]
        torch.testing.assert_close(to_input(data.images[i : i + 1])[0], item["image"])
        np.testing.assert_allclose(data.boxes[i], item["boxes"].numpy(), rtol=0, atol=1e-4)
    assert [len(b) for b in data.boxes] == [len(tree["boxes"][p]) for p in df["patient_id"]]
    cached = detection_data(df, 32, cache_dir=tmp_path / "cache")
    again = detection_data(df, 32, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, cached.images)
    assert all(np.array_equal(a, b) for a, b in zip(again.boxes, data.boxes))

    ocxr = make_object_cxr_tree(tmp_path / "ocxr")
    odf, _ = load_object_cxr(ocxr["root"], "train")
    odata = detection_data(odf, 32, task="object_cxr")
    assert [len(b) for b in odata.boxes] == [2, 0, 1, 0]
    assert all(((b >= 0) & (b <= 32)).all() for b in odata.boxes)


def test_sweep_on_the_rsna_tree_returns_long_rows(tmp_path):
    tree = make_rsna_tree(tmp_path / "rsna", n=8)
    df, _ = load_rsna(tree["root"])
    data = detection_data(df, 64)
    splits = pd.Series(["train"] * 6 + ["test"] * 2)  # the test rows hold one image with a box, one without
    out = detection_sweep([_encoder("resnet18")], data, splits, fractions=(0.5, 1.0), seeds=(0, 1), mode="frozen",
                          steps=2, batch_size=2, id_col="patient_id", feature_cache_dir=tmp_path / "feats")
    assert list(out.columns[:6]) == ["method", "task", "fraction", "seed", "metric", "value"]
    assert len(out) == 2 * 2 * 2 and set(out["metric"]) == {"mAP@0.5", "mAP@0.4:0.75"}
    assert set(out["task"]) == {"rsna_detection"} and out["value"].between(0, 1).all()
    assert out.groupby("fraction")["train images"].first().to_dict() == {0.5: 3, 1.0: 6}
    fine = detection_sweep([_encoder("resnet18")], data, {"train": range(6), "test": [6, 7]}, fractions=(1.0,),
                           mode="finetune", steps=1, batch_size=2, task="object_cxr_detection")
    assert len(fine) == 2 and set(fine["task"]) == {"object_cxr_detection"}
