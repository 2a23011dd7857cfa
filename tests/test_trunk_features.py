"""The image tower's frozen stages run once per augmented view (``train.trunk_views``): the cached activations
are what the tower computes on that view, a step that reads them gives the features and loss of a step that
runs the whole tower on the same view, and items draw a view per (seed, epoch, item)."""

from __future__ import annotations

import pytest
import torch

from mlip_core.config import ImageTowerConfig, TextTowerConfig, named_config
from mlip_core.data.transforms import train_transform
from mlip_core.model.encoders import ImageTower
from mlip_core.train import SeededDataset, TrunkFeatureDataset, _seed_for, frozen_trunk_features, seeded_rng

SIZE = 32


class Images:
    """A MimicPretrainDataset-like set of random images with the training transform."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self._arrays = [torch.randint(0, 255, (1, SIZE + 8, SIZE + 8), generator=g, dtype=torch.uint8) for _ in range(n)]
        self._paths = [f"img{i}.jpg" for i in range(n)]
        self.transform = train_transform(SIZE)
        self.load_images = True

    def __len__(self) -> int:
        return len(self._arrays)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "text": "", "labels": torch.zeros(14)}
        if self.load_images:
            item["image"] = self.transform(self._arrays[i])
        return item


def tower(frozen: int, patch_level: int = -2) -> ImageTower:
    torch.manual_seed(0)
    t = ImageTower(ImageTowerConfig(name="resnet18", image_size=SIZE, frozen_stages=frozen, patch_level=patch_level))
    return t.eval()


@pytest.mark.parametrize("frozen,patch_level", [(1, -2), (3, -2), (2, 2)])
def test_cached_view_is_the_frozen_stages_output_on_that_augmented_view(frozen, patch_level):
    images, t = Images(), tower(frozen, patch_level)
    trunk = frozen_trunk_features(t, images, views=3, seed=0, batch_size=4)
    assert trunk["trunk"].shape[:2] == (3, len(images)) and trunk["trunk"].dtype == torch.float16
    assert images.load_images  # restored
    for v in range(3):
        for i in (0, 7):
            with seeded_rng(_seed_for(0, 7_000_003, v, i)):
                x = images[i]["image"]
            act, fmap = t.frozen_trunk(x[None])
            assert torch.allclose(trunk["trunk"][v, i].float(), act[0], atol=2e-2, rtol=1e-2)
            if fmap is not None and fmap is not act:
                assert torch.allclose(trunk["trunk_fmap"][v, i].float(), fmap[0], atol=2e-2, rtol=1e-2)
            assert ("trunk_fmap" in trunk) == (fmap is not None and fmap is not act)
            if fmap is act:  # the patch map is the last frozen stage's output: the tower takes it from the trunk
                with torch.no_grad():
                    assert torch.equal(t.forward_from_trunk(act).patches, t.forward_from_trunk(act, fmap).patches)
    assert not torch.equal(trunk["trunk"][0], trunk["trunk"][1])  # the views are different augmentations


def test_items_draw_a_view_per_seed_epoch_and_item_and_decode_no_image():
    images, t = Images(), tower(2)
    trunk = frozen_trunk_features(t, images, views=4, seed=0, batch_size=4)
    data = SeededDataset(TrunkFeatureDataset(images, trunk, images), seed=3)
    assert not images.load_images
    seen = set()
    for epoch in range(12):
        item = data[(epoch, 5)]
        assert "image" not in item
        view = [v for v in range(4) if torch.equal(item["trunk"], trunk["trunk"][v, 5])]
        assert len(view) == 1
        seen.add(view[0])
        assert torch.equal(data[(epoch, 5)]["trunk"], item["trunk"])
    assert len(seen) > 1


def test_a_step_on_cached_stages_gives_the_loss_of_the_whole_tower_on_that_view():
    from mlip_core.data.collate import PretrainCollator
    from mlip_core.model.encoders import build_tokenizer
    from mlip_core.model.mlip import MLIP

    cfg = named_config("convirt")
    cfg.model.image = ImageTowerConfig(name="resnet18", image_size=SIZE, frozen_stages=2)
    cfg.model.text = TextTowerConfig(name="tiny", tiny_hidden_size=32)
    cfg.model.embed_dim, cfg.model.proj_hidden_dim = 16, 32
    torch.manual_seed(0)
    model = MLIP(cfg).eval()
    images = Images(6)
    texts = ["Small left pleural effusion.", "Lungs are clear.", "Heart size is enlarged.", "No pneumothorax.",
             "Mild pulmonary edema.", "Right lower lobe opacity."]
    collate = PretrainCollator(build_tokenizer(cfg.model.text), None, 32, swap_prob=0.0)
    trunk = frozen_trunk_features(model.image_tower, images, views=1, seed=0)
    images.load_images = True
    whole = []
    for i in range(6):
        with seeded_rng(_seed_for(0, 7_000_003, 0, i)):
            whole.append(dict(images[i], text=texts[i]))
    cached = [dict(it, trunk=trunk["trunk"][0, i]) for i, it in enumerate(whole)]
    for it in cached:
        del it["image"]
    a, b = model(collate(whole)), model(collate(cached))
    assert torch.allclose(a["loss"], b["loss"], atol=1e-2), (a["loss"], b["loss"])
    fa, fb = model.features(collate(whole)), model.features(collate(cached))
    assert torch.allclose(fa["image_global"], fb["image_global"], atol=1e-2)
    assert torch.allclose(fa["image_patches"], fb["image_patches"], atol=5e-2, rtol=1e-2)


def test_channels_last_trunk_matches_nchw_and_leaves_the_tower_as_it_found_it():
    """The trainer's memory format for the frozen stages: the same views to float16 rounding, a cache of its own."""
    images, t = Images(), tower(2)
    nchw = frozen_trunk_features(t, images, views=2, seed=0, batch_size=4)
    cl = frozen_trunk_features(t, images, views=2, seed=0, batch_size=4, channels_last=True)
    assert cl["trunk"].shape == nchw["trunk"].shape and cl["trunk"].is_contiguous()
    assert torch.allclose(cl["trunk"].float(), nchw["trunk"].float(), atol=2e-2, rtol=1e-2)
    assert all(p.is_contiguous() for p in t.parameters())  # layout restored, values untouched


def test_bf16_frozen_precision_runs_the_stages_under_autocast_near_float32():
    """``train.frozen_precision = "bf16"``: the same views through the stages under bfloat16 autocast, close to the
    float32 pass (not equal: the autocast ran), stored in the same dtype; the tower stays float32."""
    images, t = Images(), tower(3)
    exact = frozen_trunk_features(t, images, views=2, seed=0, batch_size=4, dtype=torch.float32)
    fast = frozen_trunk_features(t, images, views=2, seed=0, batch_size=4, dtype=torch.float32, precision="bf16")
    assert fast["trunk"].dtype == torch.float32 and fast["trunk"].shape == exact["trunk"].shape
    rel = (fast["trunk"] - exact["trunk"]).norm() / exact["trunk"].norm()
    assert 0 < rel < 0.05
    assert all(p.dtype == torch.float32 for p in t.parameters())
    with pytest.raises(ValueError, match="frozen_precision must be bf16|fp32"):
        frozen_trunk_features(t, images, views=1, precision="fp16")
