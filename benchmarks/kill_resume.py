"""Reliability: SIGKILL a CPU training run at seeded random points, resume each time, compare with an uninterrupted run.

    python benchmarks/kill_resume.py                      # real MLIP (tiny towers) on a small offline world
    python benchmarks/kill_resume.py --toy --kills 10     # the toy model of tests/ (seconds in all)

The kill plan comes from ``--seed``: half of the kills go inside a checkpoint write, half inside a training step.
Each attempt resumes with ``resume=auto`` and is killed

* ``write``: at a random moment of its n-th checkpoint write. The attempt's checkpoint writes are slowed: the
  serialised checkpoint goes to its temporary file in two halves with a pause between them, inside the trainer's
  own :func:`mlip_core.checkpoint.atomic_write`, so the kill leaves half a checkpoint on disk under its
  temporary name;
* ``step``: at a random moment of the step after its n-th checkpoint was renamed into place. The attempt's steps
  are slowed instead: half the pause before ``backward()``, half after it, so that kills land in data loading,
  forward, backward or the optimizer step rather than in the (unslowed) checkpoint write that follows.

The pauses only widen windows that a millisecond-scale toy step would make too narrow to hit on a loaded machine;
the computation is unchanged (the uninterrupted reference runs without them).

Where each kill landed is measured, not assumed: a temporary checkpoint file left behind means the process died
inside an atomic write, and a stack dump taken (``faulthandler``, SIGUSR1) just before the SIGKILL names the phase
and function (where the two disagree, the file wins: a loaded machine can delay the kill by a few milliseconds). When the kills are spent the run is resumed to the end; the final model and
optimizer state must be bitwise equal to the uninterrupted run's, and so must every ``metrics.jsonl`` record once
its wall-clock and memory fields are dropped.

Attempts are forked from one ``multiprocessing`` fork server that has imported torch and the trainer once, so an
attempt starts in milliseconds instead of seconds of imports; each is still a process of its own, killed with
SIGKILL. ``tests/test_determinism.py`` imports :func:`kill_resume` from here and runs the toy model.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(1, str(_p))

from mlip_core import checkpoint as ckpt_lib  # noqa: E402

# Fields of metrics.jsonl records that measure the machine, not the computation.
VOLATILE = frozenset({"time_s", "images_per_s", "mem_mb"})
PAUSE_S = 0.2
POLL_S = 0.004
TOY_ARGS = {"epochs": 2, "n": 64, "checkpoint_every": 1, "seed": 3}  # 16 steps of batch 8
MLIP_ARGS = ["--config", "mlip", "--batch-size", "8", "--seed", "3", "--image-size", "32", "--image-tower",
             "resnet18", "--text-tower", "tiny", "--deterministic", "--checkpoint-every", "1", "--no-progress",
             "--set", "train.epochs=100", "--set", "train.lr=0.0005", "--set", "train.warmup_steps=1",
             "--set", "model.text.max_length=48"]


@dataclass(frozen=True)
class KillPoint:
    """One planned kill: ``frac`` of the way into the attempt's ``nth`` checkpoint write (``where="write"``), or
    into the step after its ``nth`` committed checkpoint (``where="step"``)."""

    where: str
    nth: int
    frac: float


def kill_plan(kills: int, seed: int) -> list[KillPoint]:
    """``kills`` kill points drawn from ``seed``: half inside checkpoint writes, half inside steps, shuffled."""
    rng = random.Random(seed)
    modes = ["write"] * (kills // 2) + ["step"] * (kills - kills // 2)
    rng.shuffle(modes)
    return [KillPoint(m, rng.randint(1, 2), rng.uniform(0.1, 0.9)) for m in modes]


@dataclass
class Attempt:
    """What one interrupted attempt did and where its SIGKILL landed."""

    index: int
    point: KillPoint | None
    resumed_from: int  # step of the newest checkpoint when it started (0: none, a fresh start)
    killed: bool
    exitcode: int | None
    phase: str = "-"  # from the stack dump: start-up, step, validation, checkpoint write, export
    frame: str = "-"  # innermost function of the trainer (or the toy model) at the kill
    temp_left: list[str] = field(default_factory=list)  # temporary checkpoint files the kill left, with sizes
    newest_after: int = 0
    seconds: float = 0.0  # from the fork to the kill (or the exit)
    resumed_at: int | None = None  # an attempt that ran to the end: the step the trainer says it resumed from

    @property
    def in_write(self) -> bool:
        """Killed inside an atomic checkpoint write: it left a temporary file that was never renamed."""
        return bool(self.temp_left)


@dataclass
class Report:
    """The experiment's outcome (see :func:`format_report`)."""

    attempts: list[Attempt]
    full_s: float
    startup_s: float
    step_s: float
    steps: int
    total_s: float
    differing: list[str]  # checkpoint entries (model and optimizer) that differ from the uninterrupted run
    records_equal: bool
    records: int
    workdir: Path

    @property
    def kills(self) -> int:
        return sum(a.killed for a in self.attempts)

    @property
    def ok(self) -> bool:
        return not self.differing and self.records_equal


# ----------------------------------------------------------------------------------------------------------------
# The child: one training attempt, forked from the server


def _pause_checkpoint_writes(pause: float) -> None:
    """Make every atomic ``.pt`` write put the first half of its bytes in the temporary file, fsync, sleep ``pause``
    seconds, then write the rest (the trainer's own atomic writer renames the file afterwards)."""
    atomic_write = ckpt_lib.atomic_write

    def slow_atomic_write(path, write, mode="wb"):
        if "b" not in mode or not str(path).endswith(".pt"):
            return atomic_write(path, write, mode)

        def torn(fh):
            buf = io.BytesIO()
            write(buf)
            data = buf.getvalue()
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause)
            fh.write(data[len(data) // 2:])

        return atomic_write(path, torn, mode)

    ckpt_lib.atomic_write = slow_atomic_write


def _pause_steps(pause: float) -> None:
    """Make every ``backward()`` sleep ``pause / 2`` seconds before and after the gradients are computed."""
    backward = torch.Tensor.backward

    def slow_backward(self, *args, **kwargs):
        time.sleep(pause / 2)
        backward(self, *args, **kwargs)
        time.sleep(pause / 2)

    torch.Tensor.backward = slow_backward


def _child(spec: dict[str, Any]) -> None:
    """Run one attempt (``spec`` from :func:`_spec`); output goes to ``spec["log"]``."""
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(spec["env"])
    torch.set_num_threads(1)  # every attempt and the uninterrupted run alike: float sums in one order
    import threading

    from tqdm import tqdm

    # A thread lock for tqdm instead of its default multiprocessing one: a SIGKILLed process cannot unregister
    # a semaphore, and the resource tracker would warn about each at exit.
    tqdm.set_lock(threading.RLock())
    # The parent read the code version once: `git status` takes seconds in a large working tree.
    ckpt_lib.code_version = lambda: dict(spec["code_version"])
    dump = open(spec["stack"], "w")  # noqa: SIM115 - open until the process dies
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    if spec["pause_in"] == "write":
        _pause_checkpoint_writes(spec["pause"])
    elif spec["pause_in"] == "step":
        _pause_steps(spec["pause"])
    import mlip_core.train as train_lib

    def record(result) -> None:  # what the trainer says it did, for the parent
        Path(spec["result"]).write_text(json.dumps(
            {"resumed_from": str(result.resumed_from) if result.resumed_from else None, "steps": result.steps}))

    if spec["toy"]:
        from toy_train_run import run

        record(run(spec["out"], resume=spec["resume"], **spec["toy_args"]))
        return
    train = train_lib.train

    def recording_train(*args, **kwargs):
        result = train(*args, **kwargs)
        record(result)
        return result

    train_lib.train = recording_train  # main() calls the module's train
    argv = [*spec["mlip_args"], "--out", spec["out"]] + (["--resume", "auto"] if spec["resume"] else [])
    rc = train_lib.main(argv)
    if rc:
        raise SystemExit(rc)


def _spec(work: Path, out: Path, toy: bool, resume: bool, tag: str, pause_in: str | None = None, pause: float = 0.0,
          mlip_args: list[str] | None = None, toy_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`_child` needs (picklable); ``pause_in``: "write", "step" or None (see the module docstring)."""
    return {"out": str(out), "toy": toy, "resume": "auto" if resume else None, "pause_in": pause_in, "pause": pause,
            "log": str(work / "logs" / f"{tag}.log"), "stack": str(work / "logs" / f"{tag}.stack"),
            "result": str(work / "logs" / f"{tag}.json"),
            "env": {"MLIP_WORKSPACE": str(work / "ws")}, "mlip_args": mlip_args or [],
            "toy_args": toy_args or TOY_ARGS, "code_version": ckpt_lib.code_version()}


# ----------------------------------------------------------------------------------------------------------------
# The parent: plan, watch, kill, compare

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+ in (?P<func>\S+)')


def classify_stack(text: str) -> tuple[str, str]:
    """(phase, innermost trainer function) from a faulthandler dump of the attempt's threads."""
    frames: list[tuple[str, str]] = []
    for block in text.split("\n\n"):
        found = [(m["file"], m["func"]) for m in _FRAME.finditer(block)]
        if any(f == "_child" for _, f in found):  # the main thread (innermost frame first)
            frames = found
    if not frames:
        return "unknown", "-"
    funcs = [f for _, f in frames]
    ours = [(p, f) for p, f in frames if "/mlip_core/" in p or p.endswith(("toy_clip.py", "toy_train_run.py"))]
    frame = f"{Path(ours[0][0]).stem}.{ours[0][1]}" if ours else funcs[0]
    if funcs[0] in ("torn", "slow_backward"):  # asleep in this module's widening pause
        frame += " (pause)"
    if {"export_image_tower", "write_image_tower_export"} & set(funcs):
        phase = "export"
    elif {"atomic_write", "atomic_path", "atomic_torch_save"} & set(funcs):
        phase = "checkpoint write"
    elif {"_validate", "validate", "_validate_and_track"} & set(funcs):
        phase = "validation"
    elif "fit" in funcs:
        phase = "step"
    else:
        phase = "start-up"
    return phase, frame


def _listing(ckpt_dir: Path) -> set[str]:
    try:
        return set(os.listdir(ckpt_dir))
    except FileNotFoundError:
        return set()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed in the meantime
        return 0


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log: the process died before it started; see stderr)"


def _human(size: int) -> str:
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{size / 2**10:.0f} KB"


def _newest_step(names: set[str]) -> int:
    steps = [int(m.group(1)) for n in names if (m := re.fullmatch(r"step_(\d+)\.pt", n))]
    return max(steps, default=0)


def _kill_with_stack(proc: multiprocessing.process.BaseProcess, stack: Path) -> None:
    """SIGUSR1 (the child dumps its threads' stacks from the signal handler), then SIGKILL the moment the dump is
    whole: the main thread comes last and ends in the fork server's ``<module>`` frame. Busy-waits (a dump takes
    well under a millisecond), so the kill lands where the stack says."""
    if stack.exists():  # the child opens it first thing
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.perf_counter() + 1.0
        with open(stack, "rb") as fh:
            text = b""
            while time.perf_counter() < deadline and not text.rstrip().endswith(b"in <module>"):
                text += fh.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def _attempt(ctx, spec: dict[str, Any], point: KillPoint, index: int, step_s: float, timeout: float) -> Attempt:
    ckpt_dir = Path(spec["out"]) / "checkpoints"
    before = _listing(ckpt_dir)
    window = spec["pause"] + (step_s if point.where == "step" else 0.0)
    proc = ctx.Process(target=_child, args=(spec,), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    deadline = t0 + timeout
    seen: set[str] = set()  # accumulated: a temporary file lives until its rename, old steps are deleted
    while proc.is_alive() and time.perf_counter() < deadline:
        new = _listing(ckpt_dir) - before
        if point.where == "write":  # once the first half is on disk (serialising a large checkpoint takes a while)
            seen |= {n for n in new if n.endswith(".tmp") and _size(ckpt_dir / n) > 0}
        else:
            seen |= {n for n in new if re.fullmatch(r"step_\d+\.pt", n)}
        if len(seen) >= point.nth:
            break
        time.sleep(POLL_S)
    killed = False
    if proc.is_alive():
        time.sleep(point.frac * window)
        if proc.is_alive():
            _kill_with_stack(proc, Path(spec["stack"]))
            killed = True
    proc.join()
    seconds = time.perf_counter() - t0
    after = _listing(ckpt_dir)
    temp_left = sorted(f"{n} ({_human(_size(ckpt_dir / n))})" for n in after - before if n.endswith(".tmp"))
    stack = Path(spec["stack"])
    phase, frame = classify_stack(stack.read_text()) if killed and stack.exists() else ("-", "-")
    if temp_left:  # the file is proof; the stack was sampled a moment before the kill
        phase = "checkpoint write"
    return Attempt(index, point, _newest_step(before), killed, proc.exitcode, phase, frame, temp_left,
                   _newest_step(after), seconds)


def comparable_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``metrics.jsonl`` record without its wall-clock and memory fields."""
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs]


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flat(v, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def checkpoint_differences(a: Path, b: Path) -> list[str]:
    """Entries of the model and optimizer state that are not bitwise equal between two checkpoint files."""
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    fa, fb = _flat({k: ca[k] for k in ("model", "optimizer")}), _flat({k: cb[k] for k in ("model", "optimizer")})
    diff = sorted(set(fa) ^ set(fb))
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k], fb[k]
        same = torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else (type(x) is type(y) and x == y)
        if not same:
            diff.append(k)
    return diff


def _fork_server(preload: list[str]) -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started with ``preload`` imported (a no-op if it already runs)."""
    multiprocessing.set_forkserver_preload(preload)
    # The server gets the parent's sys.path but Python 3.11 never applies it (its forkserver.main ignores the
    # argument) and skips preloads that fail to import: hand it this module's and the tests' folders instead.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent)]
                                               + ([old] if old else []))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return multiprocessing.get_context("forkserver")


def kill_resume(toy: bool = True, kills: int = 10, seed: int = 0, workdir: Path | None = None,
                data: Path | None = None, steps: int = 12, studies: int = 24, pause: float = PAUSE_S,
                timeout: float = 120.0) -> Report:
    """Run the uninterrupted reference, then ``kills`` killed attempts of the plan of ``seed``, then the resume to
    the end, and compare. ``toy``: the toy model of tests/; else the real MLIP (tiny towers) for ``steps`` steps on
    ``data`` (an offline world of ``studies`` studies is written when ``data`` is None)."""
    t_all = time.perf_counter()
    work = Path(workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    mlip_args: list[str] = []
    if not toy:
        if data is None:
            from mlip_core.data.synth import write_world

            data = work / "world"
            write_world(data, num_studies=studies, seed=0, image_size=48)
        mlip_args = [*MLIP_ARGS, "--data", str(data), "--max-steps", str(steps)]
    # torch.use_deterministic_algorithms imports torch._inductor (seconds): once here, not in every attempt.
    preload = ["torch", "torch._inductor", "mlip_core.checkpoint", "mlip_core.train", "kill_resume"]
    if toy:
        preload += ["toy_train_run"]
    else:
        preload += ["mlip_core.model.mlip", "mlip_core.model.encoders", "mlip_core.data.collate"]
    ctx = _fork_server(preload)

    def spec(out: Path, resume: bool, tag: str, pause_in: str | None = None) -> dict[str, Any]:
        return _spec(work, out, toy, resume, tag, pause_in, pause, mlip_args)

    # The uninterrupted run: also measures start-up (until the first metrics line) and the time per step.
    full = work / "full"
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(spec(full, False, "full"),), daemon=True)
    proc.start()
    startup = None
    while proc.is_alive():
        if startup is None and (full / "metrics.jsonl").exists():
            startup = time.perf_counter() - t0
        time.sleep(POLL_S)
    proc.join()
    full_s = time.perf_counter() - t0
    if proc.exitcode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {proc.exitcode}):\n"
                           + _tail(work / "logs" / "full.log"))
    step_recs = [r for r in comparable_records(full) if r.get("kind") == "step"]
    # The step window of a "step" kill: compute and data loading of one step, from the log (no checkpoint write).
    timed = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step_s = sum(r["time_s"] for r in timed if r.get("kind") == "step") / max(len(step_recs), 1)

    cut = work / "cut"
    attempts = []
    for k, point in enumerate(kill_plan(kills, seed)):
        attempts.append(_attempt(ctx, spec(cut, True, f"attempt{k + 1:02d}", point.where), point, k + 1, step_s,
                                 timeout))
    before = _listing(cut / "checkpoints")
    proc = ctx.Process(target=_child, args=(spec(cut, True, "final"),), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    proc.join()
    after = _listing(cut / "checkpoints")
    if proc.exitcode != 0:
        raise RuntimeError(f"the final resume failed (exit {proc.exitcode}):\n"
                           + _tail(work / "logs" / "final.log"))
    resumed = json.loads((work / "logs" / "final.json").read_text())["resumed_from"]
    attempts.append(Attempt(len(attempts) + 1, None, _newest_step(before), False, proc.exitcode,
                            newest_after=_newest_step(after), seconds=time.perf_counter() - t0,
                            resumed_at=_newest_step({Path(resumed).name}) if resumed else None))
    last = f"step_{len(step_recs):08d}.pt"
    differing = checkpoint_differences(full / "checkpoints" / last, cut / "checkpoints" / last)
    rf, rc = comparable_records(full), comparable_records(cut)
    return Report(attempts, full_s, startup or 0.0, step_s, len(step_recs), time.perf_counter() - t_all, differing,
                  rf == rc, len(rf), work)


def format_report(r: Report) -> str:
    """The attempts as a table, then the verdicts."""
    lines = [f"uninterrupted run: {r.full_s:.1f} s ({r.steps} steps; start-up {r.startup_s:.1f} s, "
             f"{r.step_s * 1000:.0f} ms of compute per step)", "",
             f"{'attempt':>7}  {'plan':<18}  {'from step':>9}  {'seconds':>7}  {'outcome':<8}  {'landed in':<16}  "
             f"{'function (stack)':<34}  {'temp file left':<25}  newest after"]
    for a in r.attempts:
        plan = "run to the end" if a.point is None else (
            f"write #{a.point.nth} +{a.point.frac:.0%}" if a.point.where == "write"
            else f"step after #{a.point.nth} +{a.point.frac:.0%}")
        outcome = "SIGKILL" if a.killed else f"exit {a.exitcode}"
        temp = ", ".join(t.split(".pt.")[0].lstrip(".") + ".pt " + t.split(" ", 1)[1] for t in a.temp_left) or "-"
        lines.append(f"{a.index:>7}  {plan:<18}  {a.resumed_from:>9}  {a.seconds:>7.1f}  {outcome:<8}  {a.phase:<16}  "
                     f"{a.frame:<34}  {temp:<25}  step {a.newest_after}")
    killed = [a for a in r.attempts if a.killed]
    lines += ["",
              f"kills: {len(killed)} ({sum(a.in_write for a in killed)} inside a checkpoint write, leaving its "
              f"temporary file; {sum(a.phase == 'step' for a in killed)} inside a training step; "
              f"{sum(a.phase not in ('step', 'checkpoint write') for a in killed)} elsewhere)",
              "the last attempt resumed from: " + (f"step {r.attempts[-1].resumed_at}" if r.attempts[-1].resumed_at
                                                   else "nothing (it started over)"),
              "final model and optimizer state bitwise equal: "
              + ("True" if not r.differing else f"False (differing: {r.differing[:5]})"),
              f"metrics.jsonl records identical without wall-clock fields: {r.records_equal} ({r.records} records)",
              f"total {r.total_s:.1f} s; work folder: {r.workdir}"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--toy", action="store_true", help="use the toy model of tests/ instead of MLIP")
    p.add_argument("--data", type=Path, default=None, help="offline world (written to the work folder if absent)")
    p.add_argument("--studies", type=int, default=24)
    p.add_argument("--steps", type=int, default=12, help="MLIP: optimiser steps of the run")
    p.add_argument("--seed", type=int, default=0, help="the kill plan")
    p.add_argument("--pause", type=float, default=PAUSE_S,
                   help="seconds by which a killed attempt widens each checkpoint write or step (see above)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    report = kill_resume(toy=args.toy, kills=args.kills, seed=args.seed, workdir=args.workdir, data=args.data,
                         steps=args.steps, studies=args.studies, pause=args.pause)
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    # Run through the module name: the fork server's children unpickle their target as kill_resume._child.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kill_resume import main as _main

    sys.exit(_main())
