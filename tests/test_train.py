"""The pretraining engine: optimizer groups, schedule, retrieval metrics, determinism, exact resume, DDP, export.

Engine tests use the toy model of ``toy_clip.py`` (seconds); ``test_*_mlip_*`` tests run the real MLIP on a
tiny offline world.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlip_core.checkpoint import export_from_checkpoint, load_image_tower_export
from mlip_core.config import TrainConfig
from mlip_core.metrics import retrieval_recall
from mlip_core.optim import build_optimizer, cosine_lr_factor, param_groups
from mlip_core.train import ResumableSampler, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_clip import ToyCLIP  # noqa: E402
from toy_train_run import run  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]


def _losses(history: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss_global"], r["lr"]) for r in history]


def test_weight_decay_skips_biases_norms_temperature_prototypes_and_frozen_momentum_copy():
    model = ToyCLIP()
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    plain = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert decayed == {"image_tower.0.weight", "image_proj.weight", "text_embed.weight", "text_proj.weight"}
    assert {"logit_scale", "prototypes", "image_tower.1.weight", "image_tower.1.bias", "text_proj.bias"} <= plain
    assert not any(n.startswith("m_image") for n in decayed | plain)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05


def test_tower_lr_scale_gives_tower_parameters_their_own_lr_and_scale_one_keeps_two_groups():
    model = ToyCLIP()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["name"] for g in param_groups(model, 0.05, lr=1e-3)] == ["decay", "no_decay"]
    groups = {g["name"]: g for g in param_groups(model, 0.05, lr=1e-3, tower_lr_scale=0.1)}
    towers = {names[id(p)] for k in ("tower_decay", "tower_no_decay") for p in groups[k]["params"]}
    heads = {names[id(p)] for k in ("decay", "no_decay") for p in groups[k]["params"]}
    assert towers == {"image_tower.0.weight", "image_tower.0.bias", "image_tower.1.weight", "image_tower.1.bias"}
    assert "image_proj.weight" in heads and not towers & heads
    assert groups["tower_decay"]["lr"] == pytest.approx(1e-4) and groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["tower_no_decay"]["weight_decay"] == 0.0 and groups["tower_decay"]["weight_decay"] == 0.05
    # The schedule scales every group from its own base lr.
    tc = TrainConfig(lr=1e-3, tower_lr_scale=0.1, warmup_steps=2)
    opt, sched = build_optimizer(model, tc, total_steps=10)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["tower_decay"] == pytest.approx(0.1 * lrs["decay"]) and lrs["decay"] == pytest.approx(5e-4)


def test_the_fused_adamw_takes_the_steps_of_the_textbook_loop():
    """build_optimizer uses PyTorch's fused AdamW kernel; its updates, with the groups' decay and learning rates,
    equal those of the plain for-loop implementation to float rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin, initial = copy.deepcopy(model), model[0].weight.detach().clone()
    tc = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, warmup_ratio=0.0)
    opt, _ = build_optimizer(model, tc, total_steps=10)
    assert opt.defaults["fused"]
    loop = torch.optim.AdamW(param_groups(twin, tc.weight_decay, tc.lr), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             eps=tc.eps, foreach=False)
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (twin, loop)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert (model[0].weight - initial).abs().max() > 1e-3  # the steps moved the weights


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_ratio():
    f = [cosine_lr_factor(s, total_steps=20, warmup_steps=4, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[12] == pytest.approx(0.55) and f[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_retrieval_recall_counts_any_image_of_the_same_study_as_a_hit():
    img = torch.eye(4)
    # Text 0 is closest to image 1 (same study as image 0); text 2 is closest to image 3 (another study).
    txt = torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
    r = retrieval_recall(img, txt, group=torch.tensor([7, 7, 8, 9]), ks=(1, 2))
    # i2t: image0 -> texts 0/1 score 0, image1 -> text0/1 (hit), image2 -> nothing above 0, image3 -> text 3 hit
    assert r["t2i_R@1"] == 75.0  # text0->img1 hit (group 7), text1 hit, text2->img3 miss, text3 hit
    no_groups = retrieval_recall(img, txt, ks=(1,))
    assert no_groups["t2i_R@1"] == 50.0  # text0 -> image1 is now a miss
    assert 0.0 <= r["recall_mean"] <= 100.0


def test_embedding_geometry_measures_pair_alignment_and_how_narrow_each_cone_is():
    from mlip_core.metrics import embedding_geometry

    g = torch.Generator().manual_seed(0)
    spread = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    crowded = F.normalize(torch.randn(200, 16, generator=g) * 0.05 + torch.ones(16), dim=1)
    geo = embedding_geometry(crowded, spread)
    assert geo["image_mean_cos"] > 0.95 and abs(geo["text_mean_cos"]) < 0.05
    pairs = (crowded * spread).sum(1).mean()
    assert geo["pair_cos"] == pytest.approx(float(pairs), abs=1e-6)
    assert embedding_geometry(spread, spread)["pair_cos"] == pytest.approx(1.0, abs=1e-5)
    off = (crowded @ crowded.T).sum() - 200  # the mean over i != j, written out
    assert geo["image_mean_cos"] == pytest.approx(float(off) / (200 * 199), abs=1e-5)


def test_ddp_sampler_shards_union_equals_single_process_batches():
    single = [i for _, i in ResumableSampler(26, 1, 0, seed=3)]
    r0 = [i for _, i in ResumableSampler(26, 2, 0, seed=3)]
    r1 = [i for _, i in ResumableSampler(26, 2, 1, seed=3)]
    b = 4  # global batch 8 = 2 ranks x 4
    for k in range(3):
        assert sorted(r0[k * b:(k + 1) * b] + r1[k * b:(k + 1) * b]) == sorted(single[k * 2 * b:(k + 1) * 2 * b])
    s = ResumableSampler(26, 1, 0, seed=3)
    s.set_start(5)
    assert [i for _, i in s] == single[5:]


class _Draws(torch.utils.data.Dataset):
    """Each item draws from all three global generators, as an augmenting dataset may."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        import random

        import numpy as np

        return {"py": random.random(), "np": float(np.random.rand()), "torch": torch.rand(3), "i": i}


def test_a_batch_fetched_at_once_draws_each_item_as_alone_and_restores_the_generators():
    import random

    import numpy as np

    from mlip_core.train import SeededDataset

    data = SeededDataset(_Draws(), seed=5)
    keys = [(2, 7), (2, 0), (2, 7), (3, 7)]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), float(np.random.rand()), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    batch = data.__getitems__(keys)
    after = (random.random(), float(np.random.rand()), torch.rand(1))
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])  # the callers' streams never moved
    alone = [data[k] for k in keys]
    for got, want in zip(batch, alone):
        assert (got["py"], got["np"], got["_key"]) == (want["py"], want["np"], want["_key"])
        assert torch.equal(got["torch"], want["torch"])
    assert batch[0]["py"] == batch[2]["py"] and batch[0]["py"] != batch[3]["py"]  # seeded by (epoch, index)
    assert batch[0]["py"] != batch[1]["py"]
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=keys, collate_fn=list)
    assert [it["py"] for it in next(iter(loader))] == [it["py"] for it in alone]  # the loader takes __getitems__


def test_short_run_decreases_loss(tmp_path):
    result = run(str(tmp_path), epochs=4, lr=1e-2)
    losses = [r["loss_global"] for r in result.history]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4  # measured: 2.69 -> 2.16


def test_same_seed_gives_identical_loss_history_and_weights(tmp_path):
    a = run(str(tmp_path / "a"), max_steps=5, seed=11)
    b = run(str(tmp_path / "b"), max_steps=5, seed=11)
    c = run(str(tmp_path / "c"), max_steps=5, seed=12)
    assert _losses(a.history) == _losses(b.history)
    wa, wb = _weights(a.run_dir, 5), _weights(b.run_dir, 5)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _losses(a.history) != _losses(c.history)


@pytest.mark.parametrize("accum,workers", [(1, 0), (2, 2)])
def test_resume_after_interruption_is_bitwise_equal(tmp_path, accum, workers):
    kw = dict(epochs=3, batch_size=4 if accum == 2 else 8, grad_accum_steps=accum, num_workers=workers)
    full = run(str(tmp_path / "full"), **kw)
    total = full.steps
    # Interrupted mid-epoch (step 4 of 6 in epoch 0), then again right after an epoch boundary.
    run(str(tmp_path / "cut"), stop_at_step=4, **kw)
    run(str(tmp_path / "cut"), resume="auto", stop_at_step=7, **kw)
    cut = run(str(tmp_path / "cut"), resume="auto", **kw)
    assert cut.resumed_from.name == "step_00000007.pt"
    assert _losses(cut.history) == _losses(full.history)
    wf, wc = _weights(full.run_dir, total), _weights(cut.run_dir, total)
    assert wf.keys() == wc.keys() and any(k.startswith("m_image") for k in wf)  # momentum encoder included
    assert all(torch.equal(wf[k], wc[k]) for k in wf), [k for k in wf if not torch.equal(wf[k], wc[k])]
    full_opt = torch.load(full.checkpoint_path, weights_only=True)["optimizer"]["state"]
    cut_opt = torch.load(cut.checkpoint_path, weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(full_opt[i]["exp_avg"], cut_opt[i]["exp_avg"]) for i in full_opt)


def test_metrics_jsonl_logs_each_term_lr_throughput_memory_and_validation(tmp_path):
    result = run(str(tmp_path), epochs=2)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    vals = [r for r in recs if r["kind"] == "val"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(steps) == 12 and len(vals) == 2 and [v["epoch"] for v in vals] == [0, 1]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[0]["loss"] == pytest.approx(sum(r["loss"] for r in steps[:6]) / 6)
    for key in ("loss", "loss_global", "loss_soft", "loss_proto", "lr", "images_per_s", "mem_mb"):
        assert all(key in r for r in steps), key
    assert steps[0]["lr"] < steps[1]["lr"]  # warm-up
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "val_loss", "val_loss_global"):
        assert key in vals[-1], key
    assert vals[-1]["val_n"] == 16
    assert result.best_checkpoint_path is not None and result.best_checkpoint_path.exists()


def test_exported_image_tower_loads_into_a_fresh_tower_and_equals_its_checkpoints_export(tmp_path):
    result = run(str(tmp_path), max_steps=3)
    state, meta = load_image_tower_export(tmp_path)
    fresh = ToyCLIP().image_tower
    fresh.load_state_dict(state)
    trained = _weights(tmp_path, 3)
    assert torch.equal(fresh[0].weight, trained["image_tower.0.weight"])
    assert meta["step"] == 3 and meta["config"]["train"]["max_steps"] == 3
    assert result.export_path == tmp_path / "export" / "image_tower.pt"
    again, again_meta = load_image_tower_export(export_from_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt",
                                                                       tmp_path / "again"))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert again_meta["step"] == 3 and again_meta["config"] == meta["config"]


def test_torchrun_two_gloo_processes_agree_with_single_process(tmp_path):
    # A model without batch coupling (GroupNorm, no dropout, no random text swap): one process with global
    # batch 8 and two ranks with 4 each then compute the same losses and gradients up to float rounding.
    # (With BatchNorm, CPU ranks normalise over their own half: PyTorch's SyncBatchNorm has no CPU kernel.)
    kw = ["max_steps=4", "batch_size=8", "seed=5", "norm=group", "dropout=0.0", "swap_prob=0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(TESTS / "toy_train_run.py"), str(tmp_path / "one"), *kw],
                   check=True, env=env, capture_output=True, timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(TESTS / "toy_train_run.py"), str(tmp_path / "two"), *kw],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one_steps = [r for r in one if r["kind"] == "step"]
    two_steps = [r for r in two if r["kind"] == "step"]
    assert [r["step"] for r in two_steps] == [1, 2, 3, 4]
    for a, b in zip(one_steps, two_steps):
        for key in ("loss", "loss_global", "loss_soft", "loss_proto"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    w1, w2 = _weights(tmp_path / "one", 4), _weights(tmp_path / "two", 4)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k
    v1 = [r for r in one if r["kind"] == "val"][-1]
    v2 = [r for r in two if r["kind"] == "val"][-1]
    assert v2["val_n"] == v1["val_n"] == 16
    assert v2["i2t_R@1"] == v1["i2t_R@1"] and v2["val_loss"] == pytest.approx(v1["val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# The real MLIP on a tiny offline world (resnet18 at 32 px, a tiny random BERT, 24 studies).

MLIP_ARGS = ["--config", "mlip", "--batch-size", "8", "--image-size", "32", "--text-tower", "tiny", "--seed", "1",
             "--deterministic", "--no-progress", "--set", "train.epochs=2",
             "--set", "train.lr=0.001", "--set", "train.warmup_steps=1", "--set", "model.text.max_length=48"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from mlip_core.data.synth import write_world

    root = tmp_path_factory.mktemp("mlip_world")
    write_world(root / "world", num_studies=24, seed=0, image_size=48)
    return root


@pytest.fixture(scope="module")
def mlip_full_run(tiny_world):
    """An uninterrupted 4-step MLIP run through the command line (2 epochs of 2 steps)."""
    from mlip_core.train import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLIP_WORKSPACE", str(tiny_world / "ws"))
        assert main([*MLIP_ARGS, "--data", str(tiny_world / "world"), "--out", str(tiny_world / "full")]) == 0
    return tiny_world / "full"


def test_mlip_short_run_on_offline_world_decreases_loss(mlip_full_run):
    from mlip_core.train import read_metrics

    steps = read_metrics(mlip_full_run, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for term in ("loss_global", "loss_local", "loss_category", "loss_itm", "loss_swap"):
        assert all(term in r for r in steps), term
    first, last = (steps[0]["loss"] + steps[1]["loss"]) / 2, (steps[-1]["loss"] + steps[-2]["loss"]) / 2
    assert last < first
    vals = read_metrics(mlip_full_run, "val")
    assert [v["epoch"] for v in vals] == [0, 1] and all("t2i_R@5" in v for v in vals)
    state, meta = load_image_tower_export(mlip_full_run)
    assert meta["image"]["image_size"] == 32 and any(k.startswith("backbone.") for k in state)


def test_mlip_resume_after_interruption_is_bitwise_equal(mlip_full_run, tiny_world, monkeypatch):
    from mlip_core.train import main, read_metrics

    monkeypatch.setenv("MLIP_WORKSPACE", str(tiny_world / "ws"))
    cut = tiny_world / "cut"
    args = [*MLIP_ARGS, "--data", str(tiny_world / "world"), "--out", str(cut)]
    assert main([*args, "--stop-at-step", "3"]) == 0  # mid-epoch 1
    assert main([*args, "--resume", "auto"]) == 0
    full_w, cut_w = _weights(mlip_full_run, 4), _weights(cut, 4)
    assert any("_m." in k for k in full_w)  # the divergence encoder is in the checkpoint
    assert all(torch.equal(full_w[k], cut_w[k]) for k in full_w), [k for k in full_w
                                                                    if not torch.equal(full_w[k], cut_w[k])][:5]
    full_hist = [(r["step"], r["loss"], r["loss_itm"], r["loss_swap"]) for r in read_metrics(mlip_full_run, "step")]
    cut_hist = [(r["step"], r["loss"], r["loss_itm"], r["loss_swap"]) for r in read_metrics(cut, "step")]
    assert cut_hist == full_hist


def test_mlip_with_frozen_towers_reads_cached_features_and_resumes_bitwise_equal(tiny_world, monkeypatch):
    """The frozen paths (text features and swapped reports encoded once, the swap drawn per item; the image
    tower's frozen stages run once per augmented view, the view drawn per item) are as resumable as the paths
    that encode every step."""
    from mlip_core.train import main, read_metrics

    monkeypatch.setenv("MLIP_WORKSPACE", str(tiny_world / "ws"))
    args = [*MLIP_ARGS, "--set", "model.text.freeze_layers=2", "--set", "model.image.frozen_stages=2",
            "--set", "train.trunk_views=2", "--data", str(tiny_world / "world")]
    assert main([*args, "--out", str(tiny_world / "frozen_full")]) == 0
    assert main([*args, "--out", str(tiny_world / "frozen_cut"), "--stop-at-step", "3"]) == 0
    assert main([*args, "--out", str(tiny_world / "frozen_cut"), "--resume", "auto"]) == 0
    full_w, cut_w = _weights(tiny_world / "frozen_full", 4), _weights(tiny_world / "frozen_cut", 4)
    assert all(torch.equal(full_w[k], cut_w[k]) for k in full_w)
    hist = [[(r["step"], r["loss"], r["loss_swap"], r["swap_acc"]) for r in read_metrics(tiny_world / d, "step")]
            for d in ("frozen_full", "frozen_cut")]
    assert hist[0] == hist[1] and len(hist[0]) == 4


@pytest.mark.parametrize("seed", [1, 2])
def test_each_seed_draws_its_own_cached_views_of_the_frozen_stages(tiny_world, monkeypatch, seed):
    """Runs that differ only in their seed must not share one set of augmented views: chapter 06's seed spread
    is meant to include the augmentation's share of the run-to-run variation."""
    import mlip_core.train as engine

    monkeypatch.setenv("MLIP_WORKSPACE", str(tiny_world / "ws"))
    drawn = []
    real = engine.frozen_trunk_features
    monkeypatch.setattr(engine, "frozen_trunk_features",
                        lambda *a, **kw: drawn.append(kw.get("seed")) or real(*a, **kw))
    args = [*MLIP_ARGS, "--set", "model.image.frozen_stages=2", "--set", "train.trunk_views=2",
            "--seed", str(seed), "--data", str(tiny_world / "world")]
    run = engine.build_run(engine.config_from_args(engine._parse_args(args + ["--out", str(tiny_world / "x")])),
                           tiny_world / "world")
    assert drawn == [seed, 0]  # the training views under the run's seed; validation's one eval view
    assert isinstance(run["train_set"], engine.TrunkFeatureDataset)


def test_validation_from_cached_frozen_stages_equals_validation_from_the_images(tiny_world, monkeypatch):
    """With ``trunk_views`` the validation images' frozen stages run once (eval transform, float32); every
    validation must then give what it gives from the images themselves."""
    import mlip_core.train as engine

    monkeypatch.setenv("MLIP_WORKSPACE", str(tiny_world / "ws"))
    args = [*MLIP_ARGS, "--set", "model.image.frozen_stages=2", "--set", "train.trunk_views=2",
            "--data", str(tiny_world / "world"), "--out", str(tiny_world / "val_trunk")]
    config = engine.config_from_args(engine._parse_args(args))
    run = engine.build_run(config, tiny_world / "world")
    cached_set = run["val_set"]
    assert isinstance(cached_set, engine.TrunkFeatureDataset) and cached_set.trunk["trunk"].dtype == torch.float32
    trainer = engine.Trainer(config, tiny_world / "val_trunk", run["model"], run["train_set"], run["collate_fn"],
                             cached_set)
    assert "image" not in cached_set[0] and "trunk" in cached_set[0]
    from_cache = trainer.validate()
    images = cached_set.base.base if isinstance(cached_set.base, engine.TextFeatureDataset) else cached_set.base
    images.load_images = True
    trainer.val_set = cached_set.base
    from_images = trainer.validate()
    assert from_cache.keys() == from_images.keys() and from_cache["val_n"] == from_images["val_n"] > 0
    for key, value in from_images.items():
        assert from_cache[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    # Without the loss terms (chapter 06's grid) validation asks the model for the embeddings alone.
    trainer.tc.validation_losses = False
    retrieval_only = trainer.validate()
    trainer.val_set = cached_set
    retrieval_only_cached = trainer.validate()
    assert not any(k.startswith("val_loss") for k in retrieval_only_cached)
    for key, value in retrieval_only.items():
        assert retrieval_only_cached[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        assert value == pytest.approx(from_images[key], rel=1e-4, abs=1e-5), key


def test_mlip_torchrun_two_gloo_processes_completes_and_global_terms_agree(tiny_world):
    """The real MLIP under torchrun (2 CPU processes, gloo) against one process, with frozen towers (BatchNorm in
    eval mode, no dropout: each sample's features do not depend on how the batch is split over ranks). Terms
    computed on gathered features then agree at step 1; per-rank terms (ITM hard negatives) differ later."""
    from mlip_core.train import main, read_metrics

    frozen = ["--set", "model.image.frozen_stages=4", "--set", "model.text.freeze_layers=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLIP_WORKSPACE": str(tiny_world / "ws")}
    one_dir, out = tiny_world / "frozen_one", tiny_world / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "mlip_core.train", *MLIP_ARGS, *frozen, "--data", str(tiny_world / "world"),
         "--out", str(one_dir), "--max-steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for attempt in (1, 2):
        logs = tiny_world / f"ddp_logs{attempt}"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "--log-dir", str(logs), "--redirects", "3", "--tee", "3", "-m", "mlip_core.train", *MLIP_ARGS, *frozen,
             "--data", str(tiny_world / "world"), "--out", str(out / str(attempt)), "--max-steps", "2"],
            env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
        # Each rank's own stderr: the root cause is in the rank that exited first, not in its peer's
        # "Connection closed by peer" that ends the combined output.
        ranks = "\n".join(f"--- {p.relative_to(logs)} ---\n{p.read_text()[-2500:]}" for p in sorted(logs.rglob("stderr.log")))
        if attempt == 1:  # one CI run (2026-11-30) lost rank 0 without a trace we kept: keep it, try once more
            warnings.warn(f"torchrun attempt 1 failed (exit {proc.returncode}); per-rank stderr:\n{ranks}")
    assert proc.returncode == 0, ranks
    out = out / str(attempt)
    two = read_metrics(out, "step")
    one = read_metrics(one_dir, "step")
    assert [r["step"] for r in two] == [1, 2]
    for term in ("loss_global", "loss_local"):
        assert two[0][term] == pytest.approx(one[0][term], rel=1e-3), term
    assert read_metrics(out, "val")[-1]["val_n"] == read_metrics(one_dir, "val")[-1]["val_n"]


def test_rerunning_a_finished_run_keeps_its_metrics_and_final_validation(tmp_path):
    # A notebook re-executed in the same workspace resumes a run that already ended (here mid-epoch at
    # max_steps, so its last validation was written after its last checkpoint): nothing may be lost.
    run(str(tmp_path), max_steps=5)
    before = read_metrics(tmp_path)
    run(str(tmp_path), resume="auto", max_steps=5)
    after = read_metrics(tmp_path)
    assert [r for r in before if r.get("kind") == "val"], "the first run validated at its end"
    assert after == before


def test_reports_apart_from_the_images_train_the_same_run(mlip_full_run, tiny_world, monkeypatch):
    """MIMIC-CXR ships its reports apart from MIMIC-CXR-JPG: with the reports moved out of the world into a
    ``mimic-cxr-reports.zip`` named by ``--reports``, the run is bitwise the run that read them in place."""
    import shutil
    import zipfile

    from mlip_core.train import main, read_metrics

    monkeypatch.setenv("MLIP_WORKSPACE", str(tiny_world / "ws_apart"))
    images_only = tiny_world / "images_only"
    shutil.copytree(tiny_world / "world", images_only)
    reports = sorted(images_only.glob("files/p*/p*/s*.txt"))
    assert reports
    archive = tiny_world / "physionet" / "mimic-cxr-reports.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in reports:
            zf.write(path, "mimic-cxr-reports/" + path.relative_to(images_only).as_posix())
            path.unlink()
    out = tiny_world / "apart"
    with pytest.raises(FileNotFoundError, match="no such reports folder or zip"):
        main([*MLIP_ARGS, "--data", str(images_only), "--reports", str(tiny_world / "nowhere.zip"), "--out", str(out)])
    assert main([*MLIP_ARGS, "--data", str(images_only), "--reports", str(archive), "--out", str(out)]) == 0
    full_w, apart_w = _weights(mlip_full_run, 4), _weights(out, 4)
    assert all(torch.equal(full_w[k], apart_w[k]) for k in full_w)
    assert [r["loss"] for r in read_metrics(out, "step")] == [r["loss"] for r in read_metrics(mlip_full_run, "step")]


def test_a_finished_run_is_read_back_without_data(mlip_full_run, tmp_path):
    """``read_run``: what a chapter reads when the run was trained from a terminal (``pretrained_run``)."""
    from mlip_core.train import read_metrics, read_run

    result = read_run(mlip_full_run)
    assert result.steps == 4 and result.history == read_metrics(mlip_full_run, "step")
    assert [v["epoch"] for v in result.val_history] == [0, 1]
    assert result.export_path.is_file() and result.checkpoint_path.name == "step_00000004.pt"
    (tmp_path / "config.yaml").write_text("name: mlip\n")
    with pytest.raises(FileNotFoundError, match=r"not a finished run folder \(missing metrics.jsonl, "
                                                r"export/image_tower.pt\).*--resume auto"):
        read_run(tmp_path)


def test_a_run_folder_follows_the_data_not_its_path(tmp_path):
    """The same config on another dataset gets another run folder (resume="auto" would otherwise hand back a run
    finished on the first); a moved copy of the same data, or its CSVs gzipped, keeps the folder."""
    import gzip
    import shutil

    from mlip_core.config import pretrain_config
    from mlip_core.data.fixture_trees import make_mimic_tree
    from mlip_core.train import run_folder

    cfg = pretrain_config("mlip")
    one = make_mimic_tree(tmp_path / "one", n_subjects=3, gz=False, seed=0)["root"]
    other = make_mimic_tree(tmp_path / "other", n_subjects=3, gz=False, seed=1)["root"]
    moved = shutil.copytree(one, tmp_path / "moved")
    for csv in moved.glob("*.csv"):
        with open(csv, "rb") as src, gzip.open(csv.with_name(csv.name + ".gz"), "wb") as dst:
            dst.write(src.read())
        csv.unlink()
    folders = {name: run_folder(cfg, tmp_path / "runs", data_dir=root)
               for name, root in (("one", one), ("other", other), ("moved", moved))}
    assert folders["one"] == folders["moved"] != folders["other"]
    assert folders["one"].name.startswith("mlip_") and folders["one"] != run_folder(cfg, tmp_path / "runs")
