"""Run the trainer on the toy model (``python tests/toy_train_run.py OUT [key=value ...]``; torchrun-able).

Used by the DDP test and the kill/resume benchmark; prints nothing but the trainer's own lines.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from mlip_core.config import named_config  # noqa: E402
from mlip_core.repro import seed_everything  # noqa: E402
from mlip_core.train import train  # noqa: E402
from toy_clip import ToyCLIP, ToyPairs, toy_collate  # noqa: E402


def toy_config(**overrides):
    """A config whose train section suits the toy model; ``overrides`` are TrainConfig fields."""
    cfg = named_config("convirt")
    tc = cfg.train
    tc.batch_size, tc.epochs, tc.lr, tc.warmup_steps, tc.progress = 8, 2, 3e-3, 2, False
    tc.deterministic = True
    for k, v in overrides.items():
        setattr(tc, k, v)
    return cfg


def run(out: str, resume=None, n: int = 48, norm: str = "batch", dropout: float = 0.2, swap_prob: float = 0.3,
        **overrides):
    """Train the toy model into ``out``; returns the TrainResult."""
    cfg = toy_config(**overrides)
    seed_everything(cfg.train.seed)  # a caller that builds the model seeds its initialisation
    return train(cfg, run_dir=out, resume=resume, model=ToyCLIP(norm=norm, dropout=dropout),
                 train_set=ToyPairs(n, seed=0), val_set=ToyPairs(16, seed=1),
                 collate_fn=functools.partial(toy_collate, swap_prob=swap_prob))


if __name__ == "__main__":
    out = sys.argv[1]
    kv = dict(a.split("=", 1) for a in sys.argv[2:])
    resume = kv.pop("resume", None)
    try:
        run(out, resume=resume, **{k: yaml.safe_load(v) for k, v in kv.items()})
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while its peer still communicates
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
