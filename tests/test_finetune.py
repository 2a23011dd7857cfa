"""Full fine-tuning transfer: learning a planted task the frozen probe cannot, NaN-masked loss, seeding, label
fractions and chance labels, multi-class metrics and probe, COVIDx as a multi-class task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mlip_core.data.fixture_trees import make_covidx_tree
from mlip_core.data.skips import SkipReport
from mlip_core.data.transforms import eval_transform
from mlip_core.transfer.classify import (ClassificationTask, Encoder, auroc_per_label, build_tower, encoder_features,
                                         fraction_masks, image_cache, linear_probe, probe_sweep,
                                         summarise)
from mlip_core.transfer.finetune import (MulticlassTask, covidx_task, finetune, finetune_sweep,
                                         linear_probe_multiclass, masked_bce_with_logits, multiclass_metrics,
                                         multiclass_probe_sweep, sweep_results)

RESNET = Encoder("random resnet18", "tower", 32, tower={"name": "resnet18"})


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions run faster on one thread (and the test machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32 px noise images, each with one bright 8x8 square: in the upper half for label 1, the lower half for 0.
    Brightness and texture are alike in both classes: only *where* the square is tells the label."""
    rng = np.random.default_rng(seed)
    x = rng.integers(40, 120, (n, 32, 32)).astype(np.uint8)
    y = (np.arange(n) % 2).astype(np.float32)
    for i in range(n):
        r = rng.integers(2, 10) if y[i] else rng.integers(18, 24)
        c = rng.integers(2, 22)
        x[i, r:r + 8, c:c + 8] = 230
    return x, y


def _planted_task(n_train: int = 60, n_test: int = 40) -> tuple[ClassificationTask, np.ndarray]:
    xtr, ytr = _planted(n_train, 0)
    xte, yte = _planted(n_test, 1)
    n = n_train + n_test
    df = pd.DataFrame({"image_path": [f"img{i}" for i in range(n)], "group": [f"p{i}" for i in range(n)],
                       "split": ["train"] * n_train + ["test"] * n_test, "y": np.concatenate([ytr, yte])})
    return ClassificationTask("planted", df, ["y"], SkipReport("planted")), np.concatenate([xtr, xte])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_finetuning_learns_what_the_frozen_probe_of_the_same_tower_cannot(tmp_path):
    task, images = _planted_task()
    y = task.df["y"].to_numpy()

    tower = build_tower(RESNET)
    before = _state(tower)
    tf = eval_transform(32)
    with torch.inference_mode():
        feats = tower(torch.stack([tf(a) for a in images])).global_.numpy()
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())  # probing changes no weight
    probe = linear_probe(feats[:60], y[:60, None], feats[60:], ["y"], C=1.0)
    probe_auc = auroc_per_label(y[60:, None], probe.scores, ["y"])[0]["y"]

    res = finetune(RESNET, images, task, steps=15, batch_size=16, lr=3e-3, seed=0, augment=False)
    tuned_auc = res.metrics(["y"])["AUROC y"]
    assert res.steps == 15 and len(res.losses) == 15 and res.train_images == 60
    assert list(res.index) == list(range(60, 100))
    assert tuned_auc > 0.9
    assert tuned_auc > probe_auc + 0.15, (tuned_auc, probe_auc)
    after = res.model.image_tower.state_dict()
    changed = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
    assert "backbone.conv1.weight" in changed and "backbone.layer4.1.conv2.weight" in changed  # everything trains
    assert all(torch.equal(before[k], v) for k, v in build_tower(RESNET).state_dict().items())  # init is seeded


def test_nan_labels_give_no_loss_and_no_gradient():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 4.0, -2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, float("nan")]])
    loss = masked_bce_with_logits(logits, targets)
    loss.backward()
    known = ~torch.isnan(targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)
    moved = logits.detach().clone()
    moved[~known] += 100.0  # whatever the model says about an unlabelled entry does not matter
    assert torch.allclose(masked_bce_with_logits(moved, targets), loss.detach())
    assert masked_bce_with_logits(logits.detach(), torch.full_like(targets, float("nan"))) == 0.0


def test_same_seed_twice_gives_identical_scores_and_leaves_the_global_rng_alone():
    task, images = _planted_task(12, 8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = finetune(RESNET, images, task, steps=3, batch_size=4, lr=1e-3, seed=0, augment=True)
    assert torch.equal(torch.rand(3), expected_next)
    b = finetune(RESNET, images, task, steps=3, batch_size=4, lr=1e-3, seed=0, augment=True)
    c = finetune(RESNET, images, task, steps=3, batch_size=4, lr=1e-3, seed=1, augment=True)
    assert np.array_equal(a.scores, b.scores) and a.losses == b.losses
    assert not np.array_equal(a.scores, c.scores)


def test_sweep_has_probe_columns_scores_chance_labels_and_writes_long_results(tmp_path):
    task, images = _planted_task(16, 8)
    df = task.df
    df["rare"] = 0.0
    df.loc[df["split"] == "test", "rare"] = [1.0, 0.0] * 4  # positives only at test: chance after training
    df["unlabelled"] = np.nan
    df.loc[:3, "unlabelled"] = [0.0, 1.0, 0.0, 1.0]  # NaN everywhere else, and no test label: skipped
    task = ClassificationTask("planted", df, ["y", "rare", "unlabelled"], task.skips)
    masks = fraction_masks(task.split("train"), tmp_path, "planted", fractions=(0.5, 1.0), seeds=(0,))
    res = finetune_sweep([RESNET], task, masks, {32: images}, steps=2, batch_size=4, lr=1e-3)
    probe_cols = list(probe_sweep(np.random.default_rng(0).normal(size=(len(df), 4)), task, masks).columns)
    assert list(res.columns[:len(probe_cols)]) == probe_cols
    full = res[res["fraction"] == 1.0].set_index("label")
    assert full.loc["y", "status"] == "scored" and full.loc["y", "train images"] == 16
    assert full.loc["rare", "status"].startswith("chance") and full.loc["rare", "auroc"] == 0.5
    assert full.loc["unlabelled", "status"].startswith("skipped") and np.isnan(full.loc["unlabelled", "auroc"])
    assert res[res["fraction"] == 0.5]["train images"].iloc[0] == 8
    summary = summarise(res)
    assert set(summary["fraction"]) == {0.5, 1.0} and (summary["labels scored"] == 2).all()
    long = sweep_results(res, "planted")
    assert list(long.columns) == ["method", "task", "fraction", "seed", "metric", "value"]
    one = long[long["fraction"] == 1.0].set_index("metric")["value"]
    assert set(one.index) == {"AUROC y", "AUROC rare", "macro_AUROC"}
    assert one["macro_AUROC"] == pytest.approx((full.loc["y", "auroc"] + 0.5) / 2)
    assert one["macro_AUROC"] == pytest.approx(summary.set_index("fraction").loc[1.0, "mean AUROC"])


def test_multiclass_metrics_by_hand():
    y = np.array([0, 1, 2, 2, 1])
    probs = np.array([[0.7, 0.2, 0.1],   # 0 right
                      [0.1, 0.3, 0.6],   # 1 -> 2 wrong
                      [0.2, 0.2, 0.6],   # 2 right
                      [0.5, 0.1, 0.4],   # 2 -> 0 wrong
                      [0.1, 0.8, 0.1]])  # 1 right
    m, skipped = multiclass_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5) and not skipped
    # class a vs rest: positive score 0.7 above all four negatives; class b: positives 0.3, 0.8 vs 0.2, 0.2, 0.1
    assert m["AUROC a"] == 1.0 and m["AUROC b"] == 1.0
    # class c: positives 0.6, 0.4 against negatives 0.1, 0.6, 0.1 (a tie counts one half)
    wins = sum((p > n) + 0.5 * (p == n) for p in (0.6, 0.4) for n in (0.1, 0.6, 0.1))
    assert m["AUROC c"] == pytest.approx(wins / 6)
    assert m["macro_AUROC"] == pytest.approx((1 + 1 + wins / 6) / 3)
    m2, skipped2 = multiclass_metrics(np.array([0, 2, 2]), probs[:3], ["a", "b", "c"])  # no "b" in the test rows
    assert set(skipped2) == {"b"} and "AUROC b" not in m2 and m2["accuracy"] == 1.0


def test_multiclass_probe_separates_clusters_and_reports_a_missing_class():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 6))
    y = np.repeat([0, 1, 2], 40)
    x = centres[y] + rng.normal(size=(120, 6))
    tr, te = np.arange(120) % 2 == 0, np.arange(120) % 2 == 1
    res = linear_probe_multiclass(x[tr], y[tr], x[te], 3)
    assert res.scores.shape == (60, 3) and np.allclose(res.scores.sum(1), 1.0)
    assert (res.scores.argmax(1) == y[te]).mean() > 0.95 and not res.constant
    no_two = tr & (y != 2)
    res2 = linear_probe_multiclass(x[no_two], y[no_two], x[te], 3)
    assert set(res2.constant) == {2} and (res2.scores[:, 2] == 0).all()


def test_covidx_is_a_multiclass_task_for_the_probe_and_for_finetuning(tmp_path):
    make_covidx_tree(tmp_path / "covidx", n_train=12, n_test=6)
    task = covidx_task(tmp_path / "covidx", val_frac=0.25)
    assert isinstance(task, MulticlassTask) and task.classes == ["normal", "pneumonia", "COVID-19"]
    assert set(task.df["split"]) == {"train", "validate", "test"} and len(task.split("test")) == 6
    train_groups, val_groups = (set(task.split(s)["group"]) for s in ("train", "validate"))
    assert train_groups.isdisjoint(val_groups)
    masks = fraction_masks(task.split("train"), tmp_path / "splits", "covidx", fractions=(1.0,))
    paths = task.df["image_path"].tolist()
    feats, valid, _ = encoder_features(Encoder("raw", "raw", 16), paths, tmp_path / "cache", tmp_path / "feats")
    assert valid.all()
    probe = multiclass_probe_sweep(feats, task, masks, Cs=(0.1, 1.0), encoder="raw")
    assert list(probe["label"]) == task.classes and probe["accuracy"].nunique() == 1
    assert probe["auroc"].notna().all()
    enc = Encoder("random resnet18", "tower", 32, tower={"name": "resnet18"})
    tuned = finetune_sweep([enc], task, masks, tmp_path / "cache", steps=2, batch_size=4, lr=1e-3)
    assert list(tuned["label"]) == task.classes and tuned["accuracy"].between(0, 1).all()
    long = sweep_results(pd.concat([probe, tuned]), task.name)
    assert set(long["method"]) == {"raw", "random resnet18"}
    assert {"accuracy", "macro_AUROC", "AUROC COVID-19"} <= set(long["metric"])
    cache = image_cache(paths, 32, tmp_path / "cache")  # the sweep's cache, found again
    res = finetune(enc, cache, task, masks[(1.0, 0)], steps=2, batch_size=4, lr=1e-3, eval_split="validate")
    assert res.kind == "multiclass" and res.scores.shape == (len(task.split("validate")), 3)
    assert np.allclose(res.scores.sum(1), 1.0)
    assert res.metrics(task.classes)["accuracy"] == pytest.approx((res.scores.argmax(1) == res.targets).mean())


def test_finetune_refuses_what_it_cannot_train():
    task, images = _planted_task(4, 2)
    with pytest.raises(ValueError, match="only a tower"):
        finetune(Encoder("raw", "raw", 32), images, task, steps=1)
    with pytest.raises(ValueError, match="exactly one of steps= and epochs="):
        finetune(RESNET, images, task)
    with pytest.raises(ValueError, match="64 px"):
        finetune(Encoder("r", "tower", 64, tower={"name": "resnet18"}), images, task, steps=1)
    with pytest.raises(ValueError, match="at least 2"):
        finetune(RESNET, images, task, np.array([True, False, False, False]), steps=1)


def test_a_pretraining_time_frozen_stem_trains_when_fine_tuning():
    task, images = _planted_task(8, 2)
    frozen = Encoder("frozen stem", "tower", 32, tower={"name": "resnet18", "frozen_stages": 2})
    before = build_tower(frozen).state_dict()["backbone.conv1.weight"].clone()
    res = finetune(frozen, images, task, steps=1, batch_size=4, lr=1e-2, augment=False)
    assert not torch.equal(res.model.image_tower.state_dict()["backbone.conv1.weight"], before)
