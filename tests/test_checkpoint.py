"""Checkpoint files: atomic writes, clear errors on damaged files, resume=auto fallback, RNG round trip."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlip_core import checkpoint as ck

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_clip import ToyCLIP  # noqa: E402
from toy_train_run import run  # noqa: E402


def _state(step: int) -> dict:
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "model": {"w": torch.full((3,), float(step))},
            "optimizer": {}, "rng": ck.rng_state(), "config": {"train": {}}}


def test_atomic_save_leaves_no_temp_file_and_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.pt"
    ck.atomic_torch_save({"x": torch.ones(2)}, target)
    assert torch.load(target, weights_only=True)["x"].sum() == 2

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_torch_save({"x": torch.zeros(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]  # no temp file left behind
    assert torch.load(target, weights_only=True)["x"].sum() == 2  # the previous file is intact


def test_two_writers_of_one_path_at_once_both_succeed(tmp_path):
    # Two torchrun ranks cache the same entity embeddings: the second writer finishes while the first is still
    # writing. A shared temporary name (``path.tmp``) made the first rename fail (CI, 2026-11-30).
    target = tmp_path / "entities.pt"

    def slow_writer(fh):
        torch.save({"who": torch.tensor(1)}, fh)
        ck.atomic_torch_save({"who": torch.tensor(2)}, target)  # the other rank, start to end

    ck.atomic_write(target, slow_writer)
    assert torch.load(target, weights_only=True)["who"].item() == 1  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entities.pt"]


def test_atomic_path_publishes_a_file_written_by_name_and_removes_it_on_failure(tmp_path):
    # The image cache fills its data file through np.memmap, which needs a path rather than a file handle.
    target = tmp_path / "images.u8"
    with ck.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(2, 3))
        mm[:] = 7
        mm.flush()
        del mm
    assert target.read_bytes() == bytes([7] * 6)
    with pytest.raises(RuntimeError, match="decode failed"):
        with ck.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("decode failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.u8"]
    assert target.read_bytes() == bytes([7] * 6)


def test_entity_embeddings_and_configs_are_written_through_the_atomic_writer(tmp_path, monkeypatch):
    from mlip_core import config as config_lib
    from mlip_core.model import mlip as mlip_lib

    written = []
    real = ck.atomic_write
    monkeypatch.setattr(ck, "atomic_write", lambda path, *a, **k: written.append(Path(path).name) or real(path, *a, **k))
    config_lib.save_config(config_lib.Config(), tmp_path / "config.yaml")
    assert written == ["config.yaml"]
    assert mlip_lib.cached_tensors is ck.cached_tensors  # which writes through ck.atomic_torch_save


def test_truncated_checkpoint_raises_error_naming_the_file(tmp_path):
    path = ck.save_step_checkpoint(_state(3), tmp_path, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="step_00000003.pt.*corrupt or truncated"):
        ck.load_checkpoint(path)


def test_garbage_and_empty_files_raise_checkpoint_error(tmp_path):
    garbage = tmp_path / "step_00000001.pt"
    garbage.write_bytes(b"\x00not a zip archive" * 10)
    with pytest.raises(ck.CheckpointError, match="step_00000001.pt"):
        ck.load_checkpoint(garbage)
    empty = tmp_path / "step_00000002.pt"
    empty.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty"):
        ck.load_checkpoint(empty)


def test_pickled_code_is_refused_by_weights_only_loading(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"  # any non-allowlisted class would run its reducer on a plain torch.load
    torch.save({**_state(1), "format": ck.FORMAT, "extra": argparse.Namespace(cmd="rm -rf")}, path)
    with pytest.raises(ck.CheckpointError, match="evil.pt"):
        ck.load_checkpoint(path)


def test_foreign_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(ck.CheckpointError, match="not an mlip training checkpoint"):
        ck.load_checkpoint(path)


def test_resume_auto_falls_back_to_previous_good_checkpoint(tmp_path):
    for step in (2, 4, 6):
        ck.save_step_checkpoint(_state(step), tmp_path, step, keep_last=3)
    newest = tmp_path / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000006.pt"):
        path, state = ck.find_resumable(tmp_path)
    assert path.name == "step_00000004.pt" and state["step"] == 4


def test_resume_auto_with_only_bad_checkpoints_raises_and_empty_folder_starts_fresh(tmp_path):
    assert ck.find_resumable(tmp_path / "missing") is None
    (tmp_path / "step_00000001.pt").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ck.CheckpointError, match="no usable checkpoint"):
        ck.find_resumable(tmp_path)


def test_only_the_last_k_step_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        ck.save_step_checkpoint(_state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in ck.step_checkpoints(tmp_path)] == ["step_00000005.pt", "step_00000004.pt"]


def test_rng_state_round_trip_restores_python_numpy_torch(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.atomic_torch_save(ck.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_trainer_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path):
    run(str(tmp_path), max_steps=6, checkpoint_every=2, keep_last=3, epochs=1)
    newest = tmp_path / "checkpoints" / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:-500])
    with pytest.warns(UserWarning, match="step_00000006.pt"):
        result = run(str(tmp_path), resume="auto", max_steps=6, checkpoint_every=2, keep_last=3, epochs=1)
    assert result.resumed_from.name == "step_00000004.pt"
    assert result.steps == 6
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]  # no duplicated records after resume


def test_resuming_a_checkpoint_of_another_architecture_names_the_file(tmp_path):
    run(str(tmp_path), max_steps=2, epochs=1)
    with pytest.raises(ck.CheckpointError, match=r"step_00000002.pt does not fit this model"):
        run(str(tmp_path), resume="auto", max_steps=4, epochs=1, norm="group")  # GroupNorm: other state keys


class _FrozenTextToy(ToyCLIP):
    """The toy with a frozen, "pretrained" text embedding the config would rebuild (as a frozen MiniLM)."""

    def __init__(self, text_seed: int = 5, **kw) -> None:
        super().__init__(**kw)
        with torch.no_grad():
            self.text_embed.weight.copy_(torch.randn(self.text_embed.weight.shape,
                                                     generator=torch.Generator().manual_seed(text_seed)))
        self.text_embed.requires_grad_(False)

    def reconstructible_prefixes(self) -> tuple[str, ...]:
        return ("text_embed.",)


def _frozen_text_run(out, text_seed: int = 5, **overrides):
    import functools

    from mlip_core.repro import seed_everything
    from mlip_core.train import train
    from toy_clip import ToyPairs, toy_collate
    from toy_train_run import toy_config

    cfg = toy_config(**overrides)
    seed_everything(cfg.train.seed)
    return train(cfg, run_dir=out, resume="auto", model=_FrozenTextToy(text_seed=text_seed),
                 train_set=ToyPairs(48, seed=0), val_set=ToyPairs(16, seed=1),
                 collate_fn=functools.partial(toy_collate, swap_prob=0.3))


def test_frozen_pretrained_weights_are_left_out_of_checkpoints_and_resume_stays_exact(tmp_path):
    full = _frozen_text_run(tmp_path / "full")
    ckpt = torch.load(full.checkpoint_path, weights_only=True)
    assert not [k for k in ckpt["model"] if k.startswith("text_embed.")]
    assert ckpt["omitted"]["prefixes"] == ["text_embed."] and len(ckpt["omitted"]["fingerprint"]) == 40
    _frozen_text_run(tmp_path / "cut", stop_at_step=5)
    cut = _frozen_text_run(tmp_path / "cut")
    a = torch.load(full.checkpoint_path, weights_only=True)["model"]
    b = torch.load(cut.checkpoint_path, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_refuses_other_frozen_weights_than_it_was_trained_with(tmp_path):
    _frozen_text_run(tmp_path / "run", stop_at_step=3)
    with pytest.raises(ck.CheckpointError, match="text_embed"):
        _frozen_text_run(tmp_path / "run", text_seed=6)


def test_half_written_checkpoints_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    from mlip_core.checkpoint import remove_leftover_temporaries

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    stale = [ckpt / ".step_00000007.pt.k2j3h4.tmp", ckpt / ".best.pt.abc123.tmp"]
    kept = [ckpt / "step_00000006.pt", ckpt / ".notes.tmp", ckpt / "step_00000007.pt.tmp", ckpt / "mine.txt"]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = [f for name in ("step_*.pt", "best.pt") for f in remove_leftover_temporaries(ckpt, name)]
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_leftover_temporaries(tmp_path / "absent", "step_*.pt") == []


def test_a_write_that_fails_on_a_nearly_full_disk_says_so_and_names_the_folder(tmp_path, monkeypatch):
    """torch.save on a full disk raises "unexpected pos"; the atomic writer turns that into one line naming the
    folder, the free space and the fix, and leaves no temporary file. On a disk with room the error is unchanged."""
    import collections
    import errno

    from mlip_core import checkpoint

    def torn(fh):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 76204352 vs 76204240")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(OSError) as info:
        checkpoint.atomic_write(tmp_path / "cache" / "x.pt", torn)
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path / "cache") in str(info.value) and "5 MiB free" in str(info.value)
    assert "MLIP_WORKSPACE" in str(info.value) and "unexpected pos" in str(info.value)
    assert not list((tmp_path / "cache").iterdir())
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10 * 2**30, 0, 10 * 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoint.atomic_write(tmp_path / "cache" / "x.pt", torn)
