"""Each tower sees its inputs at the statistics its weights expect (ImageNet's for ImageNet ResNets), while every
transform and cache of the project keeps one convention (pixels mapped to [-1, 1])."""

from __future__ import annotations

import pytest
import torch

from mlip_core.config import ImageTowerConfig
from mlip_core.model.encoders import ImageTower, input_statistics, to_weight_statistics

IMAGENET_GREY = (sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3)


def test_statistics_follow_the_weights():
    assert input_statistics(ImageTowerConfig(name="resnet18")) == (0.5, 0.5)  # random init: the transforms' own
    assert input_statistics(ImageTowerConfig(name="resnet50", pretrained="hub")) == pytest.approx(IMAGENET_GREY)
    # the shipped EfficientNet-lite0 was trained on inputs in [-1, 1] (timm's tf_ ports): nothing to re-map
    lite = ImageTowerConfig(name="tf_efficientnet_lite0", pretrained="efficientnet_lite0_package")
    assert input_statistics(lite) == (0.5, 0.5)
    assert input_statistics(ImageTowerConfig(name="resnet50", pretrained="hub", input_mean=0.3, input_std=0.2)) \
        == (0.3, 0.2)


def test_the_remap_gives_pixel_minus_mean_over_std():
    pixels = torch.rand(2, 1, 8, 8)
    x = (pixels - 0.5) / 0.5
    mean, std = IMAGENET_GREY
    assert torch.allclose(to_weight_statistics(x, mean, std), (pixels - mean) / std, atol=1e-6)
    assert to_weight_statistics(x, 0.5, 0.5) is x


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_a_tower_with_imagenet_weights_sees_imagenet_statistics(tmp_path, frozen_stages):
    torch.manual_seed(0)
    source = ImageTower(ImageTowerConfig(name="resnet18", image_size=64))
    weights = tmp_path / "resnet18_imagenet.pt"
    torch.save(source.backbone.state_dict(), weights)
    tower = ImageTower(ImageTowerConfig(name="resnet18", image_size=64, pretrained=str(weights),
                                        frozen_stages=frozen_stages)).eval()
    backbone = source.backbone.eval()
    pixels = torch.rand(2, 1, 64, 64)
    mean, std = IMAGENET_GREY
    with torch.no_grad():
        got = tower((pixels - 0.5) / 0.5)  # what the transforms hand it
        want = backbone.forward_head(backbone.forward_features((pixels - mean) / std), pre_logits=True)
    assert torch.allclose(got.global_, want, atol=1e-5)


def test_an_export_keeps_the_statistics_its_run_trained_with(tmp_path):
    """An exported tower's config says pretrained="hub" for a run that started from ImageNet weights; the encoder
    built from the export loads the run's weights instead, and must keep ImageNet statistics."""
    from mlip_core.checkpoint import write_image_tower_export
    from mlip_core.transfer.classify import build_tower, encoder_from_export

    tower = ImageTower(ImageTowerConfig(name="resnet18", image_size=32))
    config = {"model": {"image": {"name": "resnet18", "pretrained": "hub", "image_size": 32}}}
    write_image_tower_export(tower.state_dict(), config, 5, tmp_path / "export")
    encoder = encoder_from_export("run", tmp_path / "export")
    assert encoder.tower["pretrained"] == ""
    assert (encoder.tower["input_mean"], encoder.tower["input_std"]) == pytest.approx(IMAGENET_GREY)
    rebuilt = build_tower(encoder)
    assert (rebuilt.input_mean, rebuilt.input_std) == pytest.approx(IMAGENET_GREY)


def test_detector_and_unet_remap_like_the_tower(tmp_path):
    from mlip_core.transfer.classify import Encoder
    from mlip_core.transfer.detect import build_detector
    from mlip_core.transfer.segment import build_unet

    mean, std = IMAGENET_GREY
    enc = Encoder("imagenet-like", "tower", 64, tower={"name": "resnet18", "input_mean": mean, "input_std": std})
    det = build_detector(enc, 64)
    x = torch.rand(1, 64, 64) * 2 - 1
    assert torch.allclose(det.transform.normalize(x), ((x + 1) / 2 - mean) / std, atol=1e-6)
    unet = build_unet(enc).eval()
    seen = {}
    unet.encoder.model.register_forward_pre_hook(lambda _, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        unet(x[None])
    assert torch.allclose(seen["x"], ((x[None] + 1) / 2 - mean) / std, atol=1e-6)
