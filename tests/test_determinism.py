"""Reproducibility on one CPU machine: SIGKILL and resume give the uninterrupted run's weights bit for bit, and
the same seed twice gives the same metrics tables, for pretraining and for a transfer task.

The kill test drives ``benchmarks/kill_resume.py`` on the toy model of ``toy_clip.py`` (attempts forked from one
pre-imported server: about ten seconds for ten kills); the same experiment on the real MLIP takes minutes, so it is
run by hand (``python benchmarks/kill_resume.py``). The same-seed tests run the real MLIP (tiny towers, a tiny
offline world) and the linear probe of ``python -m mlip_core.transfer``, each run in its own workspace so that no
cache is shared between the two.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from kill_resume import comparable_records, format_report, kill_plan, kill_resume  # noqa: E402

from mlip_core.paths import WORKSPACE_ENV  # noqa: E402


def test_kill_plan_is_seeded_and_splits_kills_between_writes_and_steps():
    assert kill_plan(10, 0) == kill_plan(10, 0) != kill_plan(10, 1)
    assert sorted(p.where for p in kill_plan(10, 0)) == ["step"] * 5 + ["write"] * 5


def test_sigkill_at_ten_random_points_resumes_to_bitwise_equal_weights_and_history(tmp_path):
    report = kill_resume(toy=True, kills=10, seed=0, workdir=tmp_path)
    table = format_report(report)
    killed = [a for a in report.attempts if a.killed]
    assert len(killed) == 10, table
    # Where the kills landed, as measured: a temporary checkpoint file left behind (half a checkpoint, never
    # renamed) proves a kill inside an atomic write; a stack dump inside the training loop, with no such file, a
    # kill inside a step.
    assert sum(a.in_write for a in killed) >= 3, table
    assert sum(a.phase == "step" and not a.in_write for a in killed) >= 3, table
    assert all(a.newest_after >= a.resumed_from for a in killed), table  # resume=auto never went backwards
    final = report.attempts[-1]
    assert final.point is None and final.exitcode == 0, table
    assert final.resumed_at == final.resumed_from > 0, table  # it resumed from the newest checkpoint, not step 0
    assert report.differing == [], table  # model (momentum encoder, BatchNorm buffers) and optimizer state
    assert report.records_equal, table  # every step, epoch and validation record, wall-clock fields aside
    # each resume removed the half-written checkpoints its killed predecessor left behind
    assert not list((report.workdir / "cut" / "checkpoints").glob(".*.tmp")), table


# ----------------------------------------------------------------------------------------------------------------
# Same seed twice: pretraining (the real MLIP) and the linear probe on its export. Pretraining run a is in this
# process, run b in a fresh one with another PYTHONHASHSEED (set orders of strings change) and this process's thread
# count; the two probes run here, each in its own workspace (world, image cache and feature cache of its own).

ROOT = Path(__file__).resolve().parent.parent
MLIP_ARGS = ["--config", "mlip", "--batch-size", "8", "--image-size", "32", "--image-tower", "test_resnet",
             "--text-tower", "tiny", "--seed", "5", "--deterministic", "--no-progress", "--set", "train.epochs=2",
             "--set", "train.lr=0.001", "--set", "train.warmup_steps=1", "--set", "model.text.max_length=48"]


@pytest.fixture(scope="module")
def two_pretraining_runs(tmp_path_factory):
    """Two 4-step MLIP runs (2 epochs, validation after each) with one seed, each in its own workspace; b runs in a
    fresh process started first, so that its imports overlap run a."""
    from mlip_core.data.synth import write_world
    from mlip_core.train import main

    root = tmp_path_factory.mktemp("same_seed")
    write_world(root / "world", num_studies=24, seed=0, image_size=48)
    a, b = root / "a", root / "b"
    env = {**os.environ, WORKSPACE_ENV: str(b / "ws"), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"}
    log = root / "b.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlip_core.train", *MLIP_ARGS, "--data", str(root / "world"),
                                 "--out", str(b / "run")], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(WORKSPACE_ENV, str(a / "ws"))
                assert main([*MLIP_ARGS, "--data", str(root / "world"), "--out", str(a / "run")]) == 0
            proc.wait(timeout=600)
        finally:
            proc.kill()  # a no-op once it has exited
    assert proc.returncode == 0, log.read_text()[-3000:]
    return a, b


def test_same_seed_twice_gives_identical_pretraining_metrics_and_exported_tower(two_pretraining_runs):
    a, b = two_pretraining_runs
    ra, rb = comparable_records(a / "run"), comparable_records(b / "run")
    kinds = [r["kind"] for r in ra]
    assert kinds.count("step") == 4 and kinds.count("val") == 2
    assert {"loss_global", "loss_local", "loss_itm", "grad_norm"} <= set(ra[0])
    assert {"i2t_R@1", "t2i_R@10", "val_loss"} <= set(ra[kinds.index("val")])
    assert ra == rb  # losses, lr, grad norms, retrieval recalls: equal floats, not approximately equal
    ta = torch.load(a / "run" / "export" / "image_tower.pt", weights_only=True)
    tb = torch.load(b / "run" / "export" / "image_tower.pt", weights_only=True)
    assert ta.keys() == tb.keys() and len(ta) > 0
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def _probe_tables(run: Path, monkeypatch) -> list[str]:
    """The linear probe's printed tables (per label, then per metric) and last line for the export of ``run/run``,
    in the workspace ``run/ws`` (which renders its own transfer world), without the wall-clock lines."""
    from mlip_core.transfer.__main__ import main

    monkeypatch.setenv(WORKSPACE_ENV, str(run / "ws"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--task", "linear", "--encoder", str(run / "run"), "--data", "offline", "--quick",
                     "--seed", "2"]) == 0
    lines = out.getvalue().replace(str(run), "ROOT").splitlines()
    return [x for x in lines if not re.match(r"wrote the offline |\d+(\.\d+)? s$", x)]


def test_same_seed_twice_gives_identical_linear_probe_table(two_pretraining_runs, monkeypatch):
    a, b = two_pretraining_runs
    table_a, table_b = _probe_tables(a, monkeypatch), _probe_tables(b, monkeypatch)
    assert sum(x.split()[:1] == ["macro_AUROC"] for x in table_a) == 1, table_a
    assert table_a[-1].startswith("task=linear fraction=0.1 metric=macro_AUROC value="), table_a
    assert table_a == table_b
