"""Segmentation transfer: U-Net on the tower's weights, frozen-feature cache, MGCA's loss and Dice, the SIIM sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mlip_core.data.fixture_trees import make_siim_tree
from mlip_core.data.downstream import SegmentationDataset, load_siim
from mlip_core.transfer.classify import Encoder, build_tower
from mlip_core.transfer.segment import (
    build_unet,
    dice_per_image,
    dice_score,
    fraction_subsets,
    load_tower_weights,
    mixed_loss,
    segmentation_data,
    segmentation_sweep,
    to_input,
    train_segmentation,
    unet_encoder_features,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small models run faster and steadier that way on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _encoder(name: str = "tf_efficientnet_lite0", size: int = 32, seed: int = 3) -> Encoder:
    return Encoder(name, "tower", size, tower={"name": name}, seed=seed)


def _discs(n: int = 40, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on dark noise; every fourth image has none."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = rng.integers(0, 120, (n, size, size)).astype(np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if i % 4 == 3:
            continue
        r = rng.uniform(size * 0.12, size * 0.22)
        cx, cy = rng.uniform(r, size - r, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        masks[i] = disc
        images[i][disc] = np.clip(images[i][disc].astype(int) + 130, 0, 255)
    return images, masks


def _encoder_state(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.encoder.model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_unet_encoder_holds_the_towers_weights(name):
    import segmentation_models_pytorch as smp

    enc = _encoder(name)
    unet = build_unet(enc)
    tower_state = build_tower(enc).backbone.state_dict()
    own = unet.encoder.model.state_dict()
    assert len(own) > 100
    assert all(torch.equal(own[k], tower_state[k]) for k in own)
    fresh = smp.Unet(encoder_name=f"tu-{name}", encoder_weights=None, in_channels=1, classes=1).encoder.model
    first = next(k for k in own if k.endswith("weight") and own[k].ndim == 4)
    assert own[first].shape[1] == 1 and not torch.equal(fresh.state_dict()[first], own[first])


def test_loading_a_tower_of_another_architecture_fails():
    import timm

    target = timm.create_model("tf_efficientnet_lite0", features_only=True, in_chans=1)
    with pytest.raises(ValueError, match="no counterpart"):
        load_tower_weights(target, build_tower(_encoder("resnet18")))


def test_dice_hand_cases():
    a = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 1  # 4 pixels
    b = np.zeros((4, 4), np.uint8)
    b[:2, 1:3] = 1  # 4 pixels, 2 shared with a
    c = np.zeros((4, 4), np.uint8)
    c[3, 3] = 1
    empty = np.zeros((4, 4), np.uint8)
    assert dice_score(a, a) == 1.0
    assert dice_score(a, c) == 0.0
    assert dice_score(b, a) == pytest.approx(2 * 2 / (4 + 4))
    assert dice_score(empty, empty) == 1.0  # no foreground, none predicted: MGCA scores 1
    assert dice_score(c, empty) == 0.0  # any foreground predicted on an empty image: 0
    assert dice_score(empty, a) == 0.0
    per = dice_per_image(np.stack([a, b, empty]), np.stack([a, a, empty]))
    np.testing.assert_allclose(per, [1.0, 0.5, 1.0])
    assert dice_score(np.stack([a, b, empty]), np.stack([a, a, empty])) == pytest.approx(2.5 / 3)


def test_mixed_loss_is_mgcas_focal_plus_log_dice():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8) * 3
    t = (torch.rand(2, 1, 8, 8) > 0.7).float()
    # MGCA's FocalLoss and dice_loss as written in mgca/utils/segmentation_loss.py
    max_val = (-x).clamp(min=0)
    bce = x - x * t + max_val + ((-max_val).exp() + (-x - max_val).exp()).log()
    focal = ((torch.nn.functional.logsigmoid(-x * (t * 2.0 - 1.0)) * 2.0).exp() * bce).mean()
    p = torch.sigmoid(x).view(-1)
    dice = (2.0 * (p * t.view(-1)).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    assert mixed_loss(x, t).item() == pytest.approx((10 * focal - torch.log(dice)).item(), rel=1e-5)


def test_frozen_training_learns_discs_and_leaves_the_encoder_untouched():
    images, masks = _discs()
    enc = _encoder("tf_efficientnet_lite0")
    before = _encoder_state(build_unet(enc))
    train, test = np.arange(28), np.arange(28, 40)
    res = train_segmentation(enc, images, masks, train, test, mode="frozen", steps=60, batch_size=8, lr=5e-4, seed=0)
    background = dice_score(np.zeros_like(masks[test]), masks[test])  # 0.25: only the empty images score
    assert res["dice"] > background + 0.3
    assert np.mean(res["loss_curve"][-5:]) < np.mean(res["loss_curve"][:5])
    after = res["model"].encoder.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The decoder trained on float16 cached features predicts (nearly) the same through the live encoder.
    with torch.inference_mode():
        live = torch.sigmoid(res["model"](to_input(images[test]))).squeeze(1).numpy() > 0.5
    assert dice_score(live, masks[test]) == pytest.approx(res["dice"], abs=0.03)


def test_finetune_changes_the_encoder():
    images, masks = _discs(n=12)
    enc = _encoder("resnet18")
    before = _encoder_state(build_unet(enc))
    res = train_segmentation(enc, images, masks, np.arange(8), np.arange(8, 12), mode="finetune", steps=2,
                             batch_size=4, seed=0)
    after = res["model"].encoder.model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2


def test_same_seed_gives_the_same_dice():
    images, masks = _discs(n=20)
    enc = _encoder("resnet18")
    feats = unet_encoder_features(enc, images)
    kw = dict(mode="frozen", steps=8, batch_size=4, features=feats)
    a = train_segmentation(enc, images, masks, np.arange(14), np.arange(14, 20), seed=5, **kw)
    b = train_segmentation(enc, images, masks, np.arange(14), np.arange(14, 20), seed=5, **kw)
    c = train_segmentation(enc, images, masks, np.arange(14), np.arange(14, 20), seed=6, **kw)
    assert a["dice"] == b["dice"] and a["loss_curve"] == b["loss_curve"]
    assert a["loss_curve"] != c["loss_curve"]


def test_feature_cache_on_disk_is_reused_and_keyed_on_the_images(tmp_path):
    images, _ = _discs(n=6)
    enc = _encoder("resnet18")
    first = unet_encoder_features(enc, images, cache_dir=tmp_path)
    assert [f.shape for f in first] == [(6, 64, 16, 16), (6, 64, 8, 8), (6, 128, 4, 4), (6, 256, 2, 2), (6, 512, 1, 1)]
    assert all(f.dtype == np.float16 for f in first)
    again = unet_encoder_features(enc, images, cache_dir=tmp_path)
    assert all(isinstance(f, np.memmap) and np.array_equal(f, g) for f, g in zip(again, first))
    unet_encoder_features(enc, images[::-1].copy(), cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_segmentation_data_matches_segmentation_dataset(tmp_path):
    tree = make_siim_tree(tmp_path / "siim", n=5, size=32)
    df, _ = load_siim(tree["root"])
    data = segmentation_data(df, 24)
    assert data.images.shape == data.masks.shape == (5, 24, 24) and len(data.skips) == 0
    ds = SegmentationDataset(df, image_size=24)
    for i in range(len(df)):
        item = ds[i]
        np.testing.assert_array_equal(data.masks[i], item["mask"][0].numpy().astype(np.uint8))
        torch.testing.assert_close(to_input(data.images[i : i + 1])[0], item["image"])
    assert data.masks.reshape(5, -1).any(1).tolist() == [bool(np.any(m)) for m in df["rles"]]
    cached = segmentation_data(df, 24, cache_dir=tmp_path / "cache")
    again = segmentation_data(df, 24, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    np.testing.assert_array_equal(again.images, cached.images)
    np.testing.assert_array_equal(again.masks, data.masks)


def test_undecodable_images_are_counted_not_fatal(tmp_path):
    tree = make_siim_tree(tmp_path / "siim", n=3, size=32)
    df, _ = load_siim(tree["root"])
    df.loc[1, "image_path"] = str(tmp_path / "missing.dcm")
    data = segmentation_data(df, 16)
    assert len(data.df) == 2 and data.images.shape == (2, 16, 16) and data.skips.counts() == {"undecodable image": 1}


def test_fractions_are_nested_and_seeded():
    ids = [f"img{i}" for i in range(200)]
    sub = fraction_subsets(ids, (0.01, 0.1, 1.0), seeds=(0, 1))
    for seed in (0, 1):
        s1, s10, s100 = (set(sub[(f, seed)]) for f in (0.01, 0.1, 1.0))
        assert len(s1) == 2 and len(s10) == 20 and len(s100) == 200 and s1 <= s10 <= s100
    assert set(sub[(0.1, 0)]) != set(sub[(0.1, 1)])
    assert fraction_subsets(ids, (0.1,), seeds=(0,))[(0.1, 0)].tolist() == sub[(0.1, 0)].tolist()


def test_sweep_on_the_siim_tree_returns_long_rows(tmp_path):
    tree = make_siim_tree(tmp_path / "siim", n=6, size=32)
    df, _ = load_siim(tree["root"])
    data = segmentation_data(df, 32)
    splits = pd.Series(["train"] * 4 + ["test"] * 2)
    out = segmentation_sweep([_encoder("resnet18"), _encoder("tf_efficientnet_lite0")], data, splits,
                             fractions=(0.5, 1.0), seeds=(0, 1), mode="frozen", steps=2, batch_size=2,
                             feature_cache_dir=tmp_path / "feats", split_dir=tmp_path / "splits")
    assert list(out.columns[:6]) == ["method", "task", "fraction", "seed", "metric", "value"]
    assert len(out) == 2 * 2 * 2 and set(out["metric"]) == {"dice"} and set(out["task"]) == {"siim_segmentation"}
    assert out["value"].between(0, 1).all()
    assert out.groupby("fraction")["train images"].first().to_dict() == {0.5: 2, 1.0: 4}
    assert len(list((tmp_path / "splits").glob("*.csv"))) == 4
    fine = segmentation_sweep([_encoder("resnet18")], data, {"train": [0, 1, 2, 3], "test": [4, 5]}, fractions=(1.0,),
                              mode="finetune", steps=1, batch_size=2)
    assert fine[["mode", "train images"]].iloc[0].tolist() == ["finetune", 4]
