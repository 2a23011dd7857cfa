"""Localization scores on hand-made maps and masks, Grad-CAM on the project's towers (timm CNN and ViT,
single-channel input), the random-map baseline's seeding and the probe head that Grad-CAM explains."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mlip_core.config import ImageTowerConfig
from mlip_core.interpret import (PromptHead, gradcam_layer, gradcam_maps, pointing_game, probe_head, random_maps,
                                 resize_maps, result_rows, score_maps, topk_iou, versus)
from mlip_core.model.encoders import ImageTower


def _mask(size: int = 16, box: tuple[int, int, int, int] = (2, 2, 6, 6)) -> np.ndarray:
    y0, x0, y1, x1 = box
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------------------------------
# Pointing game and IoU


def test_pointing_game_scores_a_peak_inside_the_mask_1_and_outside_0():
    mask = _mask()
    inside = np.zeros((16, 16))
    inside[3, 4] = 1.0
    outside = np.zeros((16, 16))
    outside[12, 12] = 1.0
    assert pointing_game(inside, mask) == 1.0
    assert pointing_game(outside, mask) == 0.0


def test_pointing_game_shares_ties_and_a_flat_map_scores_the_mask_area():
    mask = _mask()
    assert pointing_game(np.ones((16, 16)), mask) == pytest.approx(mask.mean())
    two = np.zeros((16, 16))
    two[3, 3] = two[12, 12] = 1.0  # one peak in, one out
    assert pointing_game(two, mask) == pytest.approx(0.5)


def test_pointing_game_refuses_an_empty_mask_and_a_size_mismatch():
    with pytest.raises(ValueError, match="empty mask"):
        pointing_game(np.ones((4, 4)), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="differ in size"):
        pointing_game(np.ones((4, 4)), _mask())


def test_iou_of_a_map_equal_to_the_mask_is_1():
    mask = _mask()
    saliency = mask.astype(float)
    assert topk_iou(saliency, mask, fraction=mask.mean()) == pytest.approx(1.0)
    # A larger k: the map is zero outside the mask, so only its non-zero pixels are its top set.
    assert topk_iou(saliency, mask, fraction=0.5) == pytest.approx(1.0)


def test_iou_of_a_map_away_from_the_mask_is_0_and_partial_overlap_is_exact():
    mask = _mask()
    away = np.zeros((16, 16))
    away[10:14, 10:14] = 1.0
    assert topk_iou(away, mask, fraction=16 / 256) == 0.0
    half = np.zeros((16, 16))
    half[2:6, 4:8] = 1.0  # 8 of its 16 pixels inside the 16-pixel mask: IoU 8 / 24
    assert topk_iou(half, mask, fraction=16 / 256) == pytest.approx(8 / 24)


def test_iou_of_a_flat_map_takes_every_pixel():
    mask = _mask()
    assert topk_iou(np.zeros((16, 16)), mask, 0.1) == pytest.approx(mask.mean())


def test_block_upsampling_keeps_the_chosen_cell():
    """A 2x2 map whose largest cell is bottom-right points at a lesion in the bottom-right quadrant (bilinear
    upsampling would put the plateau of the maximum in the image's corner)."""
    grid = np.array([[[0.1, 0.2], [0.3, 0.9]]], dtype=np.float32)
    up = resize_maps(grid, 16)
    assert up.shape == (1, 16, 16)
    assert (up[0, 8:, 8:] == np.float32(0.9)).all() and (up[0, :8] < 0.5).all()
    lesion = _mask(16, (9, 9, 12, 12))
    pg, iou = score_maps(grid, lesion[None], fraction=0.25)
    assert pg[0] == pytest.approx(lesion[8:, 8:].mean())  # the quadrant shares the credit
    assert iou[0] == pytest.approx(lesion.sum() / 64)


def test_random_maps_are_seeded():
    a, b, c = random_maps(3, 8, 0), random_maps(3, 8, 0), random_maps(3, 8, 1)
    assert a.shape == (3, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() < 1.0


# ---------------------------------------------------------------------------------------------
# Grad-CAM on the project's towers


TOWERS = [
    pytest.param(dict(name="resnet18", image_size=32), (2, 2), id="resnet18"),
    pytest.param(dict(name="resnet18", image_size=32, frozen_stages=3), (2, 2), id="resnet18-frozen-layer3"),
    pytest.param(dict(name="test_efficientnet", image_size=32), (2, 2), id="efficientnet"),
    pytest.param(dict(name="vit_tiny_patch16_224", image_size=32), (2, 2), id="vit"),
]


@pytest.mark.parametrize("cfg,grid", TOWERS)
def test_gradcam_runs_on_single_channel_towers_and_returns_image_sized_maps(cfg, grid):
    torch.manual_seed(0)
    tower = ImageTower(ImageTowerConfig(**cfg)).eval()
    images = torch.randn(3, 1, 32, 32)
    prompts = torch.randn(4, 16)
    head = PromptHead(nn.Linear(tower.global_dim, 16), prompts)
    maps = gradcam_maps(tower, head, images, [0, 2, 3])
    assert maps.shape == (3, 32, 32)
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    native = gradcam_maps(tower, nn.Linear(tower.global_dim, 2), images, [1, 0, 1], native=True)
    assert native.shape == (3, *grid)
    # the tower's weights keep their trainability, and no gradient is left on them
    assert all(p.grad is None for p in tower.parameters())
    assert any(p.requires_grad for p in tower.parameters())


def test_gradcam_reads_the_layer_of_the_patch_grid():
    """For a CNN, the Grad-CAM layer's output is the feature map the local terms read as patches."""
    tower = ImageTower(ImageTowerConfig(name="resnet18", image_size=64)).eval()
    layer, reshape = gradcam_layer(tower)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        out = tower(torch.randn(2, 1, 64, 64))
    handle.remove()
    assert reshape is None
    assert torch.allclose(seen[0].flatten(2).transpose(1, 2), out.patches)


def test_gradcam_of_a_vit_reshapes_patch_tokens_to_the_grid():
    tower = ImageTower(ImageTowerConfig(name="vit_tiny_patch16_224", image_size=64)).eval()
    layer, reshape = gradcam_layer(tower)
    tokens = torch.randn(2, tower.backbone.num_prefix_tokens + 16, 192)
    assert reshape(tokens).shape == (2, 192, 4, 4)
    assert torch.equal(reshape(tokens)[:, :, 0, 1], tokens[:, tower.backbone.num_prefix_tokens + 1])


def test_gradcam_equals_the_definition_on_a_tower_with_frozen_stages():
    """The map is ReLU(sum_c mean(dS/dA_c) A_c), normalised to [0, 1], computed here by hand with autograd: the
    no-grad weights and the hook that lets the gradient start at a frozen layer change nothing."""
    torch.manual_seed(1)
    tower = ImageTower(ImageTowerConfig(name="resnet18", image_size=64, frozen_stages=3)).eval()
    head = nn.Linear(tower.global_dim, 3)
    images, targets = torch.randn(2, 1, 64, 64), [2, 0]
    maps = gradcam_maps(tower, head, images, targets, native=True)
    layer, _ = gradcam_layer(tower)
    for i, k in enumerate(targets):
        seen = []
        handle = layer.register_forward_hook(lambda m, inp, out: seen.append(out))
        x = images[i:i + 1].clone().requires_grad_(True)
        score = head(tower(x).global_)[0, k]
        handle.remove()
        grad = torch.autograd.grad(score, seen[0])[0]
        cam = torch.relu((grad.mean((2, 3), keepdim=True) * seen[0]).sum(1))[0].detach().numpy()
        cam = cam - cam.min()
        cam = cam / (1e-7 + cam.max())
        np.testing.assert_allclose(maps[i], cam, atol=1e-4)  # the library adds 1e-7 to the max, twice


# ---------------------------------------------------------------------------------------------
# Probe head and result rows


def test_probe_head_is_the_logistic_regression_on_raw_features():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5)) * [1, 3, 0.5, 2, 1] + [0, 1, -2, 0, 5]
    y = np.stack([x[:, 0] + 0.3 * rng.normal(size=80) > 0, np.zeros(80)], axis=1).astype(np.float32)
    head, fitted = probe_head(x, y, C=1.0)
    assert fitted.tolist() == [True, False]  # a column with one class is not fitted
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    ref = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000, random_state=0).fit(z, y[:, 0])
    with torch.no_grad():
        logits = head(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(logits[:, 0], ref.decision_function(z), rtol=1e-4, atol=1e-4)
    assert (logits[:, 1] == 0).all()


def test_result_rows_and_versus():
    scores = pd.DataFrame({
        "method": ["mlip"] * 4 + ["random map"] * 4, "seed": [0, 0, 1, 1] * 2,
        "kind": ["attention"] * 4 + ["random"] * 4, "finding": ["effusion", "nodule"] * 4,
        "pointing": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5], "iou": [0.5] * 8,
    })
    rows = result_rows(scores, 0.1)
    assert {"method", "task", "fraction", "seed", "metric", "value"} <= set(rows.columns)
    assert set(rows["metric"]) == {"pointing_game", "iou_top10"}
    assert {"attention/all", "attention/effusion", "random/all"} <= set(rows["task"])
    allrow = rows[(rows["task"] == "attention/all") & (rows["seed"] == 1) & (rows["metric"] == "pointing_game")]
    assert allrow["value"].item() == 0.5 and allrow["n"].item() == 2
    v = versus(scores, ("mlip", "attention"), ("random map", "random"), "pointing")
    assert v["mean_a"] == pytest.approx(0.75) and v["mean_b"] == pytest.approx(0.125)
    assert v["spread"] == pytest.approx(np.std([1.0, 0.5], ddof=1) + np.std([0.0, 0.25], ddof=1))
    assert v["exceeds"] is True


# ---------------------------------------------------------------------------------------------
# Loading a run's whole model


def test_load_run_model_rebuilds_a_run_whose_checkpoint_left_out_the_frozen_text_tower(tmp_path):
    from mlip_core.checkpoint import model_checkpoint_state, save_step_checkpoint
    from mlip_core.config import config_to_dict, pretrain_config, save_config
    from mlip_core.interpret import load_run_model
    from mlip_core.knowledge.graph import KnowledgeGraph
    from mlip_core.model.mlip import MLIP

    cfg = pretrain_config("mlip", image_tower="resnet18", image_pretrained="", image_size=32, text_tower="minilm",
                          text_allow_download=False, max_length=16, freeze_text_layers=6)
    graph = KnowledgeGraph.load_default()
    torch.manual_seed(0)
    model = MLIP(cfg, torch.randn(len(graph.entity_ids), 384),
                 prototype_entities=[graph.entity_ids.index(i) for i in graph.finding_ids]).eval()
    with torch.no_grad():
        model.image_proj[0].weight.mul_(1.5)  # anything a fresh model would not have
    state, omitted = model_checkpoint_state(model)
    assert omitted["prefixes"]  # the frozen MiniLM is left out, as the trainer does
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    save_step_checkpoint({"step": 1, "epoch": 0, "batch_in_epoch": 1, "model": state, "omitted": omitted,
                          "optimizer": {}, "rng": {}, "config": config_to_dict(cfg)}, run / "checkpoints", 1)
    loaded, tokenizer = load_run_model(run)
    x = torch.randn(2, 1, 32, 32)
    enc = tokenizer(["small left pleural effusion", "no acute findings"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(loaded.encode_text(enc["input_ids"], enc["attention_mask"]),
                              model.encode_text(enc["input_ids"], enc["attention_mask"]), atol=1e-6)
