"""Reliability: SIGKILL training at random moments N times, resume each time, compare with an uninterrupted run.

    python benchmarks/kill_resume.py                      # real MLIP (tiny towers) on a small offline world
    python benchmarks/kill_resume.py --toy --kills 10     # the toy model of tests/ (seconds per run)

Each interrupted attempt is started with ``--resume auto`` and killed with SIGKILL once its metrics log
reaches a random target step, after a further random delay of up to one step (so kills land inside
forward/backward, logging, validation and checkpoint writes). When all kills are spent, the run is resumed
to the end. The
script then checks that the final weights are bitwise equal to those of an uninterrupted run with the same
seed and config, that the per-step loss history is identical, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def command(args: argparse.Namespace, out: Path, resume: bool) -> list[str]:
    """The training command line for one attempt."""
    if args.toy:
        cmd = [sys.executable, str(ROOT / "tests" / "toy_train_run.py"), str(out), "epochs=4", "n=96",
               "checkpoint_every=1", "seed=3"]
        return cmd + (["resume=auto"] if resume else [])
    cmd = [sys.executable, "-m", "mlip_core.train", "--config", args.config, "--data", str(args.data),
           "--out", str(out), "--max-steps", str(args.steps), "--batch-size", "8", "--seed", "3",
           "--image-size", "64", "--image-tower", "resnet18", "--text-tower", "tiny", "--deterministic",
           "--checkpoint-every", "1", "--no-progress", "--set", "train.epochs=100", "--set", "train.lr=0.0005"]
    return cmd + (["--resume", "auto"] if resume else [])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model of the newest step checkpoint."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind") == "step"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--toy", action="store_true", help="use the toy model of tests/ instead of MLIP")
    p.add_argument("--config", default="mlip")
    p.add_argument("--data", type=Path, default=None, help="offline world (written to a temp dir if absent)")
    p.add_argument("--studies", type=int, default=24)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    env = {**os.environ, "MLIP_WORKSPACE": str(work / "ws"), "PYTHONPATH": str(ROOT)}
    if not args.toy and args.data is None:
        from mlip_core.data.synth import write_world

        args.data = work / "world"
        write_world(args.data, num_studies=args.studies, seed=0, image_size=64)

    # The uninterrupted run also measures start-up (until the first metrics line) and the time per step.
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(args, work / "full", resume=False), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    startup = None
    while proc.poll() is None:
        if startup is None and (work / "full" / "metrics.jsonl").exists():
            startup = time.perf_counter() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        print(proc.stderr.read()[-3000:])
        return 1
    full_time = time.perf_counter() - t0
    startup = startup or 0.5 * full_time

    # Kill points: a random target step per attempt (non-decreasing, so every attempt makes progress), then a
    # random extra delay of up to one step, so kills land inside forward/backward, logging and checkpoint writes.
    total = len(step_losses(work / "full"))
    step_time = (full_time - startup) / max(total, 1)
    targets = sorted(rng.randint(1, max(1, total - 1)) for _ in range(args.kills))
    rows = []
    cut = work / "cut"
    for k, target in enumerate(targets):
        extra = rng.uniform(0.0, step_time)
        proc = subprocess.Popen(command(args, cut, resume=True), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            done_steps = [s for s, _ in step_losses(cut)] if (cut / "metrics.jsonl").exists() else []
            if done_steps and done_steps[-1] >= target:
                break
            time.sleep(0.02)
        time.sleep(extra)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            outcome = "SIGKILL"
        else:
            outcome = f"finished before kill (rc {proc.returncode})"
        ckpts = sorted((cut / "checkpoints").glob("step_*.pt")) if (cut / "checkpoints").exists() else []
        logged = step_losses(cut)[-1][0] if (cut / "metrics.jsonl").exists() and step_losses(cut) else 0
        rows.append((k + 1, f"step {target} +{extra:.2f}s", outcome, logged, ckpts[-1].name if ckpts else "-"))
    done = subprocess.run(command(args, cut, resume=True), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        return 1

    wf, wc = final_weights(work / "full"), final_weights(cut)
    same_keys = wf.keys() == wc.keys()
    unequal = [k for k in wf if not torch.equal(wf[k], wc.get(k, torch.empty(0)))]
    hist_equal = step_losses(work / "full") == step_losses(cut)
    print(f"\nuninterrupted run: {full_time:.1f} s ({total} steps, start-up {startup:.1f} s); each attempt is killed "
          "once its log reaches the target step, after a random extra delay of up to one step\n")
    print(f"{'attempt':>7}  {'kill point':<16}  {'outcome':<30}  {'last logged step':>16}  newest checkpoint after")
    for r in rows:
        print(f"{r[0]:>7}  {r[1]:<16}  {r[2]:<30}  {r[3]:>16}  {r[4]}")
    print(f"\nkills: {sum(r[2] == 'SIGKILL' for r in rows)} of {len(rows)} attempts")
    print(f"final weights bitwise equal: {same_keys and not unequal} ({len(wf)} tensors"
          + (f", differing: {unequal[:5]}" if unequal else "") + ")")
    print(f"per-step loss history identical: {hist_equal} ({len(step_losses(cut))} steps)")
    print(f"work folder: {work}")
    return 0 if (same_keys and not unequal and hist_equal) else 1


if __name__ == "__main__":
    sys.exit(main())
