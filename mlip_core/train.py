"""The pretraining engine: one loop for CPU, one GPU and many GPUs (PyTorch DDP via torchrun).

From a notebook::

    from mlip_core.config import named_config
    from mlip_core.train import train
    cfg = named_config("mlip"); cfg.train.max_steps = 200
    result = train(cfg, data_dir=workspace("offline_world"), run_dir=workspace("runs", "mlip"))
    result.history[-1]["loss"], result.checkpoint_path, result.export_path

From the command line (single process: CPU or one GPU)::

    python -m mlip_core.train --config mlip --data DIR --out RUN_DIR [--max-steps N] [--resume auto] [--seed S]

Many processes (DDP; gloo on CPU, nccl on GPU); ``--batch-size`` is the *global* batch, split over ranks::

    torchrun --standalone --nproc_per_node 2 -m mlip_core.train --config mlip --data DIR --out RUN_DIR
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        -m mlip_core.train --config mlip --data DIR --out RUN_DIR --precision bf16

What a run writes in ``RUN_DIR``: ``config.yaml``, ``metrics.jsonl`` (one JSON object per line; ``kind`` is
``step``, ``epoch`` or ``val``), ``checkpoints/step_*.pt`` (the last ``keep_last``) and ``checkpoints/best.pt``,
``export/image_tower.pt`` + ``export/image_tower.json`` (the pretrained image tower for transfer), and
``tensorboard/`` when asked.

Reproducibility (``deterministic=True``): the sample order comes from a sampler seeded with (seed, epoch),
every sample's augmentation and every batch's collation (text swapping) run under a generator seeded with
(seed, epoch, index), and the DataLoader draws its worker seeds from its own generator, so the global RNG
that the model uses (dropout, hard-negative sampling) only sees the model. A checkpoint holds that RNG,
the sampler position, optimizer, schedule, scaler and the whole model including the divergence encoder;
resuming from step k replays steps k+1.. exactly as the uninterrupted run (bitwise on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from mlip_core import checkpoint as ckpt_lib
from mlip_core.checkpoint import (
    cache_key,
    cached_tensors,
    load_model_checkpoint_state,
    model_checkpoint_state,
    omitted_fingerprint,
    write_image_tower_export,
)
from mlip_core.metrics import embedding_geometry, retrieval_recall
from mlip_core.optim import build_optimizer
from mlip_core.repro import seed_everything

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class DistInfo:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); nccl on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


# ----------------------------------------------------------------------------------------------
# Deterministic data: resumable sampler, per-sample seeded augmentation, per-batch seeded collation


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded by (seed, epoch)) that yields ``(epoch, index)`` and can start mid-epoch.

    Rank r takes every world-th index of the epoch's permutation, so the union of the ranks' k-th batches is
    the k-th batch of a single process with the same global batch: DDP and one process see the same data.
    """

    def __init__(self, data_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        super().__init__(range(data_len), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share of the epoch (resume)."""
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, int(i)) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _seed_for(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) % (2**32) for k in key]).generate_state(2, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def rng_scope() -> Iterator[None]:
    """Run a block with the python, numpy and torch (CPU) generators saved and restored afterwards, whatever the
    block draws or seeds (:func:`seed_all`). Saving numpy's state is the dear part (~0.1 ms: a 624-word copy each
    way), so a caller that seeds many items in turn opens one scope around them all."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def seed_all(seed: int) -> None:
    """Seed the python, numpy and torch (CPU) generators with ``seed`` (use inside :func:`rng_scope`)."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    # The CPU generator only (what fork_rng saves): torch.manual_seed also queues seeds for every accelerator
    # backend, with a stack trace each, a millisecond per item.
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with python, numpy and torch (CPU) generators seeded, restoring them afterwards."""
    with rng_scope():
        seed_all(seed)
        yield


class SeededDataset(Dataset):
    """Wraps a map-style dataset: item ``(epoch, i)`` is ``dataset[i]`` drawn under a (seed, epoch, i) generator.

    The data loader fetches a batch through :meth:`__getitems__`: the same items, with the callers' generators
    saved and restored once per batch instead of once per item (saving numpy's state per item cost ~4 s of
    chapter 05's 26 800 item draws)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _draw(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed_all(_seed_for(self.seed, epoch, index))
        item = dict(self.dataset[index])
        item["_key"] = (epoch, index)
        return item

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        with rng_scope():
            return self._draw(key)

    def __getitems__(self, keys: Sequence[tuple[int, int] | int]) -> list[dict[str, Any]]:
        with rng_scope():
            return [self._draw(key) for key in keys]


class SeededCollate:
    """Wraps a collator: runs it under a generator seeded by the batch's (epoch, indices); adds ``_meta``.

    ``_meta`` holds ``index`` and ``study_id`` (B,) long tensors for retrieval; the trainer pops it before
    the batch reaches the model.
    """

    def __init__(self, collate_fn: Callable[[list[dict]], dict], seed: int) -> None:
        self.collate_fn, self.seed = collate_fn, seed

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [it.pop("_key", (0, -1)) for it in items]
        epoch = keys[0][0]
        with seeded_rng(_seed_for(self.seed, 1_000_003, epoch, *[k[1] for k in keys])):
            batch = dict(self.collate_fn(items))
        index = torch.tensor([k[1] for k in keys], dtype=torch.long)
        study = torch.tensor([int(it.get("study_id", k[1])) for it, k in zip(items, keys)], dtype=torch.long)
        batch["_meta"] = {"index": index, "study_id": study}
        return batch


# ----------------------------------------------------------------------------------------------
# Metrics logging


def _memory_mb(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated since the last reset, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return {"mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        import psutil

        return {"mem_mb": psutil.Process().memory_info().rss / 2**20}
    except ImportError:  # pragma: no cover - psutil comes with ipykernel
        import resource

        return {"mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class MetricsLog:
    """``metrics.jsonl`` (one record per line) and optional TensorBoard scalars; main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint at ``step``: drop every record written after it."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            # Records up to the checkpoint's step happened before (or, for a run's final validation, right
            # after) that checkpoint and are never written again by the resumed run: keep them. Later ones
            # will be written again.
            if rec.get("step", 0) > step:
                continue
            kept.append(line)
        ckpt_lib.atomic_write(self.path, lambda fh: fh.write("".join(k + "\n" for k in kept)), "w")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind, step = record.get("kind", "step"), record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``RUN_DIR/metrics.jsonl`` (of one ``kind`` when given)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or rec.get("kind") == kind:
            recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    """What a run leaves behind: per-step history, validation history and the files it wrote."""

    history: list[dict[str, Any]]
    val_history: list[dict[str, Any]]
    checkpoint_path: Path | None
    best_checkpoint_path: Path | None
    export_path: Path | None
    run_dir: Path
    steps: int
    resumed_from: Path | None = None


def read_run(run_dir: str | os.PathLike) -> TrainResult:
    """A finished run folder read back without building data or model: a run trained from a terminal
    (``python -m mlip_core.train`` / ``torchrun``) that a chapter reads instead of training in its kernel.

    The folder must hold ``config.yaml``, ``metrics.jsonl`` and the exported image tower (written when a run
    ends); otherwise the error names what is missing and how to finish the run.
    """
    run_dir = Path(run_dir)
    needed = ("config.yaml", "metrics.jsonl", "export/image_tower.pt")
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: not a finished run folder (missing {', '.join(missing)}); pass the --out folder of "
            "`python -m mlip_core.train`, and finish the run first (`--resume auto` continues it)")
    history, val_history = read_metrics(run_dir, "step"), read_metrics(run_dir, "val")
    steps = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    best = run_dir / "checkpoints" / "best.pt"
    return TrainResult(history=history, val_history=val_history, checkpoint_path=steps[-1] if steps else None,
                       best_checkpoint_path=best if best.is_file() else None,
                       export_path=run_dir / "export" / "image_tower.pt", run_dir=run_dir,
                       steps=int(history[-1]["step"]) if history else 0)


def _logged(key: str) -> bool:
    """Model outputs that go to the metrics log: the loss terms and scalar diagnostics (temperature, accuracies)."""
    return key == "loss" or key.startswith("loss_") or key == "temperature" or key.endswith("_acc")


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Tensors of a batch to ``device`` (images and frozen-stage activations optionally channels_last); other
    values unchanged."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and k in ("image", "trunk", "trunk_fmap") and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def frozen_autocast_dtype(precision: str) -> torch.dtype | None:
    """``TrainConfig.frozen_precision`` -> the autocast dtype of the frozen towers' passes run once before
    training (None: float32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    raise ValueError(f"frozen_precision must be bf16|fp32, got {precision!r}")


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU or when asked; bf16 where supported else fp16 on CUDA for 'auto'."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {precision!r}")


class Trainer:
    """Owns the loop: optimizer, schedule, AMP, DDP, logging, validation, checkpoints and export.

    ``model(batch) -> dict`` must return ``loss`` and ``loss_<term>`` scalars; optional ``momentum_update()``
    runs after every optimizer step; ``encode_image(x)`` / ``encode_text(ids, mask)`` serve retrieval, unless
    the dict also holds the batch's normalised ``image_embedding`` / ``text_embedding``; and ``image_tower`` is
    exported. Datasets yield dicts with at least ``image`` and ``study_id``.
    """

    def __init__(
        self,
        config: Any,
        run_dir: str | os.PathLike,
        model: nn.Module,
        train_set: Dataset,
        collate_fn: Callable[[list[dict]], dict],
        val_set: Dataset | None = None,
        val_collate_fn: Callable[[list[dict]], dict] | None = None,
        dist_info: DistInfo | None = None,
    ) -> None:
        self.config = config
        self.tc = config.train
        self.run_dir = Path(run_dir)
        self.dist = dist_info or init_distributed(self.tc.device)
        self.device = self.dist.device
        tc = self.tc
        if tc.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {tc.batch_size} (global) is not divisible by {self.dist.world_size} ranks")
        self.local_batch = tc.batch_size // self.dist.world_size
        self.train_set, self.val_set = train_set, val_set
        self.collate_fn = collate_fn
        self.val_collate_fn = val_collate_fn or collate_fn
        if len(train_set) < tc.batch_size:  # type: ignore[arg-type]
            raise ValueError(f"the training set has {len(train_set)} samples, fewer than one batch "  # type: ignore
                             f"({tc.batch_size}); lower batch_size or write a larger dataset")

        self.module = model.to(self.device)
        if tc.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        if self.dist.distributed and tc.sync_batchnorm and self.device.type == "cuda":
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.autocast_dtype = _resolve_precision(tc.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)

        self.micro_per_epoch = (len(ResumableSampler(len(train_set), self.dist.world_size, self.dist.rank))  # type: ignore
                                // self.local_batch // tc.grad_accum_steps) * tc.grad_accum_steps
        self.steps_per_epoch = self.micro_per_epoch // tc.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"one optimizer step needs {tc.batch_size * tc.grad_accum_steps} samples; the training "
                             f"set has {len(train_set)}: lower batch_size or grad_accum_steps")  # type: ignore
        self.total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * self.steps_per_epoch
        if hasattr(model, "steps_per_epoch"):  # warm-ups that last an epoch (ALBEF's alpha, MGCA's prototypes)
            model.steps_per_epoch = self.steps_per_epoch
        self.optimizer, self.scheduler = build_optimizer(self.module, tc, self.total_steps)

        fwd: nn.Module = self.module
        if self.dist.distributed:
            fwd = nn.parallel.DistributedDataParallel(
                fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=tc.find_unused_parameters)
        if tc.compile:
            fwd = torch.compile(fwd)  # type: ignore[assignment]
        self.forward_model = fwd

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.best_value: float | None = None
        self._param_list: list[nn.Parameter] | None = None  # every parameter, listed once for clipping
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Frozen pretrained weights never change: fingerprinted once, left out of every checkpoint.
        self._omitted_fingerprint = omitted_fingerprint(self.module)
        self.metrics = MetricsLog(self.run_dir, self.dist.is_main, tc.tensorboard)
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: see :mod:`mlip_core.checkpoint`."""
        from mlip_core.config import config_to_dict

        model_state, omitted = model_checkpoint_state(self.module, self._omitted_fingerprint)
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "model": model_state, "omitted": omitted,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt_lib.rng_state(),
            "config": config_to_dict(self.config),
            "code_version": ckpt_lib.code_version(),
            "best_value": self.best_value,
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (RNG last, so nothing after it perturbs the generators)."""
        load_model_checkpoint_state(self.module, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_value = state.get("best_value")
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("checkpoint was written by %s processes, resuming with %s: the data order differs "
                        "from an uninterrupted run", state.get("world_size"), self.dist.world_size)
        ckpt_lib.set_rng_state(state["rng"])

    def save(self) -> Path | None:
        """Write ``step_*.pt`` (main process; others wait)."""
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        if self.dist.is_main:
            path = ckpt_lib.save_step_checkpoint(self.state_dict(), self.ckpt_dir, self.step, self.tc.keep_last)
        self.last_checkpoint = path  # on every rank: they all decide alike whether a final save is due
        self._barrier()
        return path

    def resume(self, resume: str | os.PathLike | None) -> Path | None:
        """``"auto"``: the newest good checkpoint of this run (none: start fresh); a path: that file."""
        if not resume:
            return None
        if self.dist.is_main:  # half-written checkpoints of a killed run: resume never reads them
            stale = [f for name in ("step_*.pt", "best.pt")
                     for f in ckpt_lib.remove_leftover_temporaries(self.ckpt_dir, name)]
            if stale:
                log.info("removed %d half-written checkpoint file(s) of an interrupted run in %s", len(stale),
                         self.ckpt_dir)
        if str(resume) == "auto":
            found = ckpt_lib.find_resumable(self.ckpt_dir)
            if found is None:
                return None
            path, state = found
        else:
            path, state = Path(resume), ckpt_lib.load_checkpoint(resume)
        self._check_config(state.get("config", {}), path)
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {path} does not fit this model/optimizer ({str(exc)[:300]}); it was written by code "
                f"version {state.get('code_version')}, now {ckpt_lib.code_version()}: resume with that code or "
                "start a new --out folder") from exc
        self.metrics.truncate_after(self.step)
        self.resumed_from = path
        self.last_checkpoint = path
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                     self.batch_in_epoch)
        return path

    def _check_config(self, saved: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another model; training-section differences are only reported."""
        from mlip_core.config import config_to_dict

        now = config_to_dict(self.config)
        for section in ("model", "loss"):
            if section in saved and saved[section] != now.get(section):
                raise ckpt_lib.CheckpointError(
                    f"checkpoint {path} was trained with a different '{section}' config; resume with the run's "
                    f"config.yaml (--config {self.run_dir / 'config.yaml'}) or start a new --out folder")
        if saved.get("train") != now.get("train"):
            diff = {k: (saved.get("train", {}).get(k), v) for k, v in now.get("train", {}).items()
                    if saved.get("train", {}).get(k) != v}
            log.warning("resuming %s with changed training settings (saved, now): %s", path, diff)

    # -- helpers ---------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.dist.distributed:
            dist.barrier()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loader(self, dataset: Dataset, collate_fn: Callable, sampler: Any, batch_size: int,
                drop_last: bool) -> DataLoader:
        # The loader draws its worker base seed from this generator, not from the global RNG.
        gen = torch.Generator().manual_seed(_seed_for(self.tc.seed, 7, getattr(sampler, "epoch", 0)))
        return DataLoader(
            SeededDataset(dataset, self.tc.seed), batch_size=batch_size, sampler=sampler,
            collate_fn=SeededCollate(collate_fn, self.tc.seed), num_workers=self.tc.num_workers,
            drop_last=drop_last, pin_memory=self.device.type == "cuda", generator=gen,
            persistent_workers=False,
        )

    def _reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks."""
        if not self.dist.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.dist.world_size
        return dict(zip(keys, t.tolist()))

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until ``total_steps`` (or ``stop_at_step``); validate each epoch; checkpoint; export."""
        from tqdm.auto import tqdm

        tc = self.tc
        stop_at = min(self.total_steps, tc.stop_at_step) if tc.stop_at_step > 0 else self.total_steps
        # No disable=False when a bar is asked for: an explicit value would override TQDM_DISABLE (the book runner
        # sets it so that executed pages keep results, not bars).
        off = {} if (self.dist.is_main and tc.progress) else {"disable": True}
        bar = tqdm(total=stop_at, initial=self.step, desc="pretrain", dynamic_ncols=True, **off)
        sampler = ResumableSampler(len(self.train_set), self.dist.world_size, self.dist.rank, seed=tc.seed)  # type: ignore
        did_val_at: int | None = None
        start_step = self.step
        self.forward_model.train()
        try:
            while self.step < stop_at:
                sampler.set_epoch(self.epoch)
                sampler.set_start(self.batch_in_epoch * self.local_batch)
                loader = self._loader(self.train_set, self.collate_fn, sampler, self.local_batch, drop_last=True)
                it = iter(loader)
                accum: dict[str, float] = {}
                t0 = time.perf_counter()
                while self.batch_in_epoch < self.micro_per_epoch and self.step < stop_at:
                    batch = next(it)
                    k = self.batch_in_epoch % tc.grad_accum_steps
                    last_micro = k == tc.grad_accum_steps - 1
                    self._micro_step(batch, last_micro, accum)
                    self.batch_in_epoch += 1
                    if not last_micro:
                        continue
                    self._optimizer_step()
                    dt = time.perf_counter() - t0
                    record = self._step_record(accum, dt)
                    accum, t0 = {}, time.perf_counter()
                    if self.step % tc.log_every == 0 or self.step == stop_at:
                        self.metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                    if tc.checkpoint_every > 0 and self.step % tc.checkpoint_every == 0 \
                            and self.batch_in_epoch < self.micro_per_epoch:  # the epoch end saves anyway
                        self.save()
                del it, loader
                if self.batch_in_epoch >= self.micro_per_epoch:  # a full epoch: summarise, validate, move on
                    self._epoch_record()
                    if tc.val_every > 0 and (self.epoch + 1) % tc.val_every == 0:
                        self._validate_and_track()
                        did_val_at = self.step
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.save()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}.pt"):
                self.save()
            # A run resumed at its end (e.g. a notebook re-executed) trains nothing and does not re-validate.
            if self.step >= self.total_steps and did_val_at != self.step and self.step > start_step \
                    and self.val_set is not None and tc.val_every > 0:
                self._validate_and_track(final=True)
            export = self.export_image_tower() if self.dist.is_main else None
        finally:
            bar.close()
            self.metrics.close()
        self._barrier()
        best = self.ckpt_dir / "best.pt"
        return TrainResult(
            history=read_metrics(self.run_dir, "step"), val_history=read_metrics(self.run_dir, "val"),
            checkpoint_path=self.last_checkpoint, best_checkpoint_path=best if best.exists() else None,
            export_path=export, run_dir=self.run_dir, steps=self.step, resumed_from=self.resumed_from,
        )

    def _epoch_record(self) -> None:
        """One ``kind: epoch`` record: mean of each step term over the epoch, pairs/s, time (from the step
        records, so an epoch interrupted and resumed is summarised whole)."""
        if not self.dist.is_main:
            return
        recs = [r for r in read_metrics(self.run_dir, "step") if r.get("epoch") == self.epoch]
        if not recs:
            return
        keys = [k for k in recs[0] if k == "loss" or k.startswith("loss_") or k == "grad_norm"]
        seconds = sum(r.get("time_s", 0.0) for r in recs)
        images = sum(r.get("images_per_s", 0.0) * r.get("time_s", 0.0) for r in recs)
        self.metrics.write({"kind": "epoch", "step": self.step, "epoch": self.epoch, "steps_logged": len(recs),
                            **{k: float(np.mean([r[k] for r in recs if k in r])) for k in keys},
                            "lr_last": recs[-1]["lr"], "images_per_s": images / max(seconds, 1e-9),
                            "time_s": seconds, **_memory_mb(self.device)})

    def _micro_step(self, batch: dict[str, Any], last_micro: bool, accum: dict[str, float]) -> None:
        """Forward + backward of one micro-batch; gradients sync over ranks only on the last one."""
        batch.pop("_meta", None)
        batch = _to_device(batch, self.device, self.tc.channels_last)
        if not self.forward_model.training:  # train() walks every module (7 ms a step for MLIP on a CPU):
            self.forward_model.train()        # only validation changes the mode, and it restores it
        sync = contextlib.nullcontext()
        if self.dist.distributed and not last_micro and hasattr(self.forward_model, "no_sync"):
            sync = self.forward_model.no_sync()
        with sync:
            with self._autocast():
                out = self.forward_model(batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step + 1}; lower lr or use "
                                         "precision fp32/bf16 (terms: " + ", ".join(
                                             f"{k}={float(v):.4g}" for k, v in out.items()
                                             if k.startswith("loss_") and torch.is_tensor(v) and v.numel() == 1) + ")")
            self.scaler.scale(loss / self.tc.grad_accum_steps).backward()
        n = self.tc.grad_accum_steps
        for k, v in out.items():
            if _logged(k) and torch.is_tensor(v) and v.numel() == 1:
                accum[k] = accum.get(k, 0.0) + float(v.detach()) / n
        accum["_images"] = accum.get("_images", 0.0) + batch["labels"].shape[0] * self.dist.world_size

    def _optimizer_step(self) -> None:
        """Unscale, clip, step, schedule, zero, then update the divergence encoder."""
        tc = self.tc
        self.scaler.unscale_(self.optimizer)
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])  # the lr this step uses
        # The total gradient norm is logged whether or not it is clipped (inf = measure only).
        max_norm = tc.clip_grad_norm if tc.clip_grad_norm > 0 else float("inf")
        if self._param_list is None:  # walking the module tree: 1.3 ms a step (MLIP, CPU)
            self._param_list = list(self.module.parameters())
        self._last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self._param_list, max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.module, "momentum_update"):
            self.module.momentum_update()
        self.step += 1

    def _step_record(self, accum: dict[str, float], dt: float) -> dict[str, Any]:
        images = accum.pop("_images", 0.0)
        losses = self._reduce_mean(accum)
        rec: dict[str, Any] = {"kind": "step", "step": self.step, "epoch": self.epoch,
                               "lr": self._last_lr, **losses,
                               "images_per_s": images / max(dt, 1e-9), "time_s": dt}
        if getattr(self, "_last_grad_norm", None) is not None:
            rec["grad_norm"] = self._last_grad_norm
        rec.update(_memory_mb(self.device))
        return rec

    # -- validation ------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss terms and image-text retrieval R@1/5/10 (both directions) on the validation set.

        Runs under a forked RNG, so validating never changes what training draws next.
        """
        if self.val_set is None:
            return {}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._validate()

    def _validate(self) -> dict[str, float]:
        model = self.module
        was_training = model.training
        model.eval()
        # No drop: the last rank's share is padded with repeats, removed again after the gather.
        sampler = ResumableSampler(len(self.val_set), self.dist.world_size, self.dist.rank, shuffle=False,  # type: ignore
                                   drop_last=False)
        loader = self._loader(self.val_set, self.val_collate_fn, sampler, self.local_batch, drop_last=False)
        sums: dict[str, float] = {}
        count = 0
        img, txt, idx, grp = [], [], [], []
        for batch in loader:
            meta = batch.pop("_meta")
            batch = _to_device(batch, self.device, self.tc.channels_last)
            with self._autocast():
                out = model(batch) if self.tc.validation_losses else {}
                # A model whose objective already embedded the batch hands the embeddings back (MLIP: the image
                # tower once per validation batch, not twice); others are asked for them.
                ie, te = out.get("image_embedding"), out.get("text_embedding")
                if ie is None:
                    ie = model.encode_batch_image(batch, normalize=True) if hasattr(model, "encode_batch_image") \
                        else model.encode_image(batch["image"], normalize=True)
                if te is None:
                    te = model.encode_batch_text(batch, normalize=True) if hasattr(model, "encode_batch_text") \
                        else model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=True)
            b = meta["index"].numel()
            for k, v in out.items():
                if _logged(k) and torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v) * b
            count += b
            img.append(ie.float().cpu()), txt.append(te.float().cpu())
            idx.append(meta["index"]), grp.append(meta["study_id"])
        model.train(was_training)
        losses = {k: v / max(count, 1) for k, v in sums.items()}
        losses = self._reduce_mean(losses)
        parts = (torch.cat(img), torch.cat(txt), torch.cat(idx), torch.cat(grp))
        if self.dist.distributed:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, parts)
            parts = tuple(torch.cat([g[i] for g in gathered]) for i in range(4))  # type: ignore[assignment]
        ie_all, te_all, idx_all, grp_all = parts
        # The sampler pads the last rank by repeating samples: keep each index once.
        _, first = np.unique(idx_all.numpy(), return_index=True)
        keep = torch.from_numpy(np.sort(first))
        recall = retrieval_recall(ie_all[keep], te_all[keep], grp_all[keep])
        recall.update({f"val_{k}": v for k, v in embedding_geometry(ie_all[keep], te_all[keep]).items()})
        return {**{f"val_{k}": v for k, v in losses.items()}, **recall, "val_n": int(keep.numel())}

    def _validate_and_track(self, final: bool = False) -> dict[str, float]:
        metrics = self.validate()
        if not metrics:
            return metrics
        rec = {"kind": "val", "step": self.step, "epoch": self.epoch, **metrics}
        self.metrics.write(rec)
        if self.dist.is_main:
            log.info("validation at step %d: %s", self.step,
                     ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        key, mode = self.tc.best_metric, self.tc.best_mode
        value = metrics.get(key)
        if value is not None and (self.best_value is None or (value > self.best_value if mode == "max"
                                                                else value < self.best_value)):
            self.best_value = float(value)
            if self.dist.is_main:
                ckpt_lib.save_best_checkpoint(self.state_dict(), self.ckpt_dir)
        return metrics

    # -- export ----------------------------------------------------------------------------

    def export_image_tower(self, out: str | os.PathLike | None = None) -> Path:
        """``OUT/image_tower.pt`` (a plain state_dict) + ``image_tower.json`` (config, step); OUT defaults to
        ``RUN_DIR/export``."""
        from mlip_core.config import config_to_dict

        state = {k: v.detach().cpu().clone() for k, v in self.module.image_tower.state_dict().items()}
        return write_image_tower_export(state, config_to_dict(self.config), self.step,
                                        Path(out) if out is not None else self.run_dir / "export")


# ----------------------------------------------------------------------------------------------
# Building a run from a config and a dataset folder


def _pairs_dataset(config: Any, data_dir: Path, split: str, train_split: bool,
                   reports_root: Path | None = None, progress: bool = False) -> tuple[Dataset, Any]:
    """A :class:`MimicPretrainDataset` of one split (frontal ``views``), images cached when asked; reports from
    ``reports_root`` (a folder holding ``files/`` or ``mimic-cxr-reports.zip``) when given, else found in
    ``data_dir``."""
    import hashlib

    from mlip_core.data.mimic import MimicPretrainDataset, load_mimic_pairs
    from mlip_core.data.transforms import eval_transform, train_transform
    from mlip_core.paths import workspace

    tc, size = config.train, config.model.image.image_size
    views = tuple(v.strip() for v in tc.views.split(",") if v.strip())
    pairs, skips = load_mimic_pairs(data_dir, split=split, views=views, reports_root=reports_root)
    cache = None
    if tc.image_cache and len(pairs):
        from mlip_core.data.cache import ImageCache

        tag = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
        # Decoded by the data loader's worker count, with a bar where the run shows its own.
        cache = ImageCache(workspace("cache", "images", f"pretrain_{tag}_{split}_{size}"),
                           pairs["image_path"].tolist(), size, num_workers=tc.num_workers,
                           progress=progress)
        skips.extend(cache.skips)
    transform = train_transform(size) if train_split else eval_transform(size)
    return MimicPretrainDataset(pairs, image_size=size, transform=transform, cache=cache), skips


class TextFeatureDataset(Dataset):
    """A pretraining dataset whose items also carry their report's precomputed text-tower outputs
    (``text_tokens`` (L,Dt), ``text_sentence`` (Dt), ``text_cls_attention`` (L)), looked up by ``item["index"]``.

    With ``swap`` (:func:`frozen_swap_features`) each item also carries its text-swap pair, drawn here: with
    probability ``swap_prob`` one of the report's precomputed swapped versions (``swap_label`` 1), else the
    report itself (0), as ``swap_text_tokens`` (L,Dt), ``swap_attention_mask`` (L). The draw uses the torch
    generator, which :class:`SeededDataset` seeds per (run seed, epoch, item): the same on every run and resume."""

    def __init__(self, base: Dataset, features: dict[str, torch.Tensor], swap: dict[str, torch.Tensor] | None = None,
                 swap_prob: float = 0.5) -> None:
        self.base, self.features = base, features
        self.swap, self.swap_prob = swap, swap_prob

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = self.base[key]
        i = int(item["index"])
        item.update({k: v[i] for k, v in self.features.items()})
        if self.swap is not None:
            variant = int(torch.randint(self.swap["swap_label"].shape[0], ()))
            drawn = float(torch.rand(())) < self.swap_prob and bool(self.swap["swap_label"][variant, i])
            if drawn:
                item["swap_text_tokens"] = self.swap["swap_text_tokens"][variant, i]
                item["swap_attention_mask"] = self.swap["swap_attention_mask"][variant, i]
            else:
                item["swap_text_tokens"] = item["text_tokens"].to(self.swap["swap_text_tokens"].dtype)
                item["swap_attention_mask"] = self.swap["attention_mask"][i]
            item["swap_label"] = torch.tensor(int(drawn))
        return item


def _graph_fingerprint(collate: Any) -> str:
    graph = getattr(getattr(collate, "extractor", None), "graph", None)
    return graph.fingerprint() if graph is not None else ""


def encoded_reports(collate: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every report tokenised with its entity and status marks once (:meth:`PretrainCollator.encode_all`), cached
    in ``workspace("cache", "text")`` by a hash of the texts, the tokenizer, the length and the knowledge graph:
    an epoch then stacks rows instead of running the tokenizer and the extractor on every batch again."""
    from mlip_core.paths import workspace

    texts = [t if isinstance(t, str) else "" for t in texts]
    key = cache_key(*texts, "tokens", getattr(collate.tokenizer, "name_or_path", ""), len(collate.tokenizer),
                    collate.max_length, _graph_fingerprint(collate))
    return cached_tensors(workspace("cache", "text") / f"tokens_{key}.pt", lambda: collate.encode_all(texts),
                          what="token cache")


def frozen_text_features(text_tower: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                         progress: bool = False, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Every report encoded once by a wholly frozen text tower (see
    :func:`mlip_core.model.encoders.precompute_text_features`), cached in ``workspace("cache", "text")`` by a
    hash of the tower, the length and the texts: the ablations' runs share one encoding per world.
    ``precision``: bf16 runs the tower under bfloat16 autocast (``TrainConfig.frozen_precision``)."""
    from mlip_core.model.encoders import precompute_text_features
    from mlip_core.paths import workspace

    texts = [t if isinstance(t, str) else "" for t in texts]
    key = cache_key(*texts, text_tower.name, max_length, text_tower.cfg.pooling,
                    *([precision] if precision != "fp32" else []))  # float32 keys stay as they were

    def build() -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        return precompute_text_features(text_tower, enc, progress=progress,
                                        autocast_dtype=frozen_autocast_dtype(precision))

    # a random tower's features depend on the seed: never cached
    return cached_tensors(workspace("cache", "text") / f"{text_tower.name}_{key}.pt", build,
                          enabled=getattr(text_tower, "pretrained", False), what="text feature cache")


class TrunkFeatureDataset(Dataset):
    """A pretraining dataset whose items carry, instead of an image, the image tower's frozen-stage activations of
    one of the image's precomputed augmented views (:func:`frozen_trunk_features`): ``trunk`` (C,h,w) and, when
    the patch map is the output of a frozen stage before the last, ``trunk_fmap``. The view is drawn with the torch generator, which
    :class:`SeededDataset` seeds per (run seed, epoch, item). ``images``: the :class:`MimicPretrainDataset` under
    ``base``; it stops decoding images (``load_images = False``)."""

    def __init__(self, base: Dataset, trunk: dict[str, torch.Tensor], images: Any) -> None:
        self.base, self.trunk = base, trunk
        self.views = int(trunk["trunk"].shape[0])
        images.load_images = False

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = self.base[key]
        i, v = int(item["index"]), int(torch.randint(self.views, ())) if self.views > 1 else 0
        item["trunk"] = self.trunk["trunk"][v, i]
        if "trunk_fmap" in self.trunk:
            item["trunk_fmap"] = self.trunk["trunk_fmap"][v, i]
        return item


@torch.no_grad()
def frozen_trunk_features(tower: nn.Module, dataset: Any, views: int, seed: int = 0, batch_size: int = 64,
                          progress: bool = False, channels_last: bool = False,
                          dtype: torch.dtype = torch.float16, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """``views`` augmented views of every image of ``dataset`` (a :class:`MimicPretrainDataset` with its
    training transform; view v of image i drawn under a generator seeded by (seed, v, i)) through the tower's
    stem and frozen stages (:meth:`~mlip_core.model.encoders.ImageTower.frozen_trunk`), stored in ``dtype``
    (float16 for the training views; validation keeps float32, what its images would give):
    ``trunk`` (V,N,C,h,w) and ``trunk_fmap`` (V,N,Cp,hp,wp) when the patch map is a frozen stage's output other
    than the last (the last one's is ``trunk`` itself, which
    :meth:`~mlip_core.model.encoders.ImageTower.forward_from_trunk` knows). Pretrained weights: cached in ``workspace("cache",
    "trunk")`` by a hash of the image paths, the transform, the tower and its frozen stages, ``views`` and
    ``seed``; a randomly initialised trunk depends on the run's seed and is never cached. ``channels_last``: run
    the stages in that memory format, as the trainer runs the tower (oneDNN: 1.9x faster at 128 px, 1.45x at 64 px
    on a CPU; the outputs differ from NCHW's by ~1e-6 relative, so the format is part of the cache key).
    ``precision``: bf16 runs the stages under bfloat16 autocast (``TrainConfig.frozen_precision``)."""
    from mlip_core.paths import workspace

    cfg = tower.cfg
    key = cache_key(*dataset._paths, repr(dataset.transform), cfg.name, cfg.pretrained, cfg.image_size,
                    tower.frozen_trunk_stages, cfg.patch_level, views, seed,
                    *(["channels_last"] if channels_last else []),  # NCHW and float16 keys stay as they were
                    *([str(dtype)] if dtype != torch.float16 else []),
                    *([precision] if precision != "fp32" else []))
    path = workspace("cache", "trunk") / f"{cfg.name}_{cfg.image_size}_{key}.pt"
    return cached_tensors(path, lambda: _trunk_views(tower, dataset, views, seed, batch_size, progress, channels_last,
                                                     dtype, frozen_autocast_dtype(precision)),
                          enabled=bool(cfg.pretrained), what="trunk feature cache")


def _trunk_views(tower: nn.Module, dataset: Any, views: int, seed: int, batch_size: int,
                 progress: bool, channels_last: bool = False, dtype: torch.dtype = torch.float16,
                 autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from mlip_core.model.encoders import autocast_to, memory_format

    device = next(tower.parameters()).device
    was = dataset.load_images
    dataset.load_images = True
    N = len(dataset)
    trunks: list[torch.Tensor] = []
    fmaps: list[torch.Tensor] = []
    starts = [(v, s) for v in range(views) for s in range(0, N, batch_size)]
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="frozen image stages, once per view", leave=False)
    try:
        with memory_format(tower, channels_last) as fmt:
            for v, s in starts:
                images = []
                with rng_scope():  # one save and restore per batch; each view drawn under its own seed
                    for i in range(s, min(N, s + batch_size)):
                        seed_all(_seed_for(seed, 7_000_003, v, i))
                        images.append(dataset[i]["image"])
                with autocast_to(device, autocast_dtype):
                    x, fmap = tower.frozen_trunk(torch.stack(images).to(device).contiguous(memory_format=fmt))
                trunks.append(x.to(dtype).cpu().contiguous())
                if fmap is not None and fmap is not x:
                    fmaps.append(fmap.to(dtype).cpu().contiguous())
    finally:
        dataset.load_images = was
    out = {"trunk": torch.cat(trunks).unflatten(0, (views, N))}
    if fmaps:
        out["trunk_fmap"] = torch.cat(fmaps).unflatten(0, (views, N))
    return out


def swapped_versions(collate: Any, texts: Sequence[str], variants: int, group_size: int,
                     seed: int = 0) -> tuple[list[list[str]], torch.Tensor]:
    """``variants`` swapped versions of every report, each built by ``collate.swap_texts`` (a
    :class:`~mlip_core.data.collate.PretrainCollator`; ``collate`` itself is not touched) with the report's group
    as the batch: seeded groups of ``group_size``, so donors are drawn as in a training batch. -> (texts[v][i],
    labels (V,N) long, 1 = altered, 0 where nothing could be swapped)."""
    import copy

    builder = copy.copy(collate)
    builder.swap_prob, builder.generator, builder.stats = 1.0, torch.Generator().manual_seed(seed), dict(collate.stats)
    rng = np.random.default_rng(seed)
    swapped, labels = [list(texts) for _ in range(variants)], torch.zeros(variants, len(texts), dtype=torch.long)
    for v in range(variants):
        order = rng.permutation(len(texts))
        for start in range(0, len(order), group_size):
            group = order[start:start + group_size]
            out, lab = builder.swap_texts([texts[j] for j in group])
            for j, t, y in zip(group, out, lab.tolist()):
                swapped[v][j], labels[v, j] = t, y
    return swapped, labels


def frozen_swap_features(collate: Any, text_tower: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                         variants: int, group_size: int, seed: int = 0, progress: bool = False,
                         own_features: dict[str, torch.Tensor] | None = None, precision: str = "fp32"
                         ) -> dict[str, torch.Tensor]:
    """Text swapping for a wholly frozen text tower: the :func:`swapped_versions` of every report encoded once by
    the tower. Returns ``swap_text_tokens`` (V,N,L,Dt) float16, ``swap_attention_mask`` (V,N,L), ``swap_label``
    (V,N) and the reports' own ``attention_mask`` (N,L), L = ``max_length``. The versions depend on the texts and
    ``seed`` only, not on the run's seed, so every run on a dataset shares one encoding, cached in
    ``workspace("cache", "text")`` by a hash of the tower, the length, the texts and what draws the versions.
    ``own_features``: the reports' own :func:`frozen_text_features`; a version that came out equal to a report
    (a swap that changed nothing the tokenizer keeps) takes them instead of a forward pass; they must come from
    the same ``precision`` (bf16: the tower runs under bfloat16 autocast, ``TrainConfig.frozen_precision``)."""
    from mlip_core.model.encoders import precompute_text_features
    from mlip_core.paths import workspace

    texts = [t if isinstance(t, str) else "" for t in texts]
    # Keyed by what determines the versions (the texts, their number, the groups, the seed, the knowledge graph
    # the collator's extractor reads) so that a cached encoding is found without rebuilding them.
    key = cache_key(*texts, "swap", variants, group_size, seed, collate.max_length, _graph_fingerprint(collate),
                    text_tower.name, max_length, *([precision] if precision != "fp32" else []))

    def build() -> dict[str, torch.Tensor]:
        swapped, labels = swapped_versions(collate, texts, variants, group_size, seed)
        flat = [t for version in swapped for t in version]
        own = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        enc = tokenizer(flat, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        known = (own, own_features) if own_features is not None else None
        tokens = precompute_text_features(text_tower, enc, progress=progress, known=known,
                                          autocast_dtype=frozen_autocast_dtype(precision))["text_tokens"]
        N, L = len(texts), enc["input_ids"].shape[1]
        return {"swap_text_tokens": tokens.half().view(variants, N, L, -1),
                "swap_attention_mask": enc["attention_mask"].view(variants, N, L), "swap_label": labels,
                "attention_mask": own["attention_mask"]}

    # a random tower's features depend on the seed: never cached
    return cached_tensors(workspace("cache", "text") / f"{text_tower.name}_swap_{key}.pt", build,
                          enabled=getattr(text_tower, "pretrained", False), what="swap feature cache")


def build_run(config: Any, data_dir: str | os.PathLike, dist_info: DistInfo | None = None,
              reports_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Model (with knowledge embeddings), train/val datasets and the collator for ``config`` on a
    MIMIC-CXR-JPG-layout folder (the offline world or the real dataset)."""
    from mlip_core.data.collate import PretrainCollator
    from mlip_core.knowledge.extract import KnowledgeExtractor
    from mlip_core.knowledge.graph import KnowledgeGraph
    from mlip_core.model.encoders import TextTower, build_tokenizer
    from mlip_core.model.mlip import MLIP, embed_entities

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such dataset folder; write the offline world with "
                                "`python -m mlip_core.data.synth --out DIR --num-studies N` or point at MIMIC-CXR-JPG")
    mc, lc = config.model, config.loss
    if reports_root is not None and not Path(reports_root).exists():
        raise FileNotFoundError(f"{reports_root}: no such reports folder or zip; pass the folder that holds the "
                                "MIMIC-CXR reports' files/ tree or mimic-cxr-reports.zip itself")
    reports = Path(reports_root) if reports_root is not None else None
    bar = config.train.progress and (dist_info is None or dist_info.is_main)
    train_set, train_skips = _pairs_dataset(config, data_dir, "train", train_split=True, reports_root=reports,
                                            progress=bar)
    val_set, val_skips = _pairs_dataset(config, data_dir, "validate", train_split=False, reports_root=reports,
                                        progress=bar)
    for name, skips in (("train", train_skips), ("validate", val_skips)):
        if len(skips) and (dist_info is None or dist_info.is_main):
            log.warning("%s split of %s: %s", name, data_dir, skips.summary() if hasattr(skips, "summary") else skips)
    graph = KnowledgeGraph.load_default()
    tokenizer = build_tokenizer(mc.text)
    # Re-seed right before anything random is built: the readers above may or may not draw random numbers
    # (a cache built now or loaded from disk), and the initial weights must depend on the seed alone.
    seed_everything(config.train.seed, deterministic=config.train.deterministic)
    entity_emb = None
    if (lc.local == "mlip" and lc.knowledge_fusion) or (lc.category and lc.knowledge_prototypes):
        entity_emb = embed_entities(TextTower(mc.text), tokenizer, graph.entity_texts(), max_length=mc.text.max_length)
    protos = [graph.entity_ids.index(i) for i in graph.finding_ids]
    model = MLIP(config, entity_emb, prototype_entities=protos)
    collate = PretrainCollator(tokenizer, KnowledgeExtractor(graph), mc.text.max_length,
                               config.train.swap_prob if lc.swap else 0.0, word_index=lc.local == "gloria")
    if mc.text.cache_features and model.text_tower.frozen:
        for ds in (train_set, val_set):
            if len(ds):
                # The training reports at the engine's frozen precision; validation's as the tower gives them.
                feats = frozen_text_features(model.text_tower, tokenizer, ds._texts, mc.text.max_length,
                                             progress=config.train.progress,
                                             precision=config.train.frozen_precision if ds is train_set else "fp32")
                feats.update(encoded_reports(collate, ds._texts))
                if ds is train_set:
                    swap = None
                    if lc.swap and config.train.swap_variants > 0 and config.train.swap_prob > 0:
                        swap = frozen_swap_features(collate, model.text_tower, tokenizer, ds._texts,
                                                    mc.text.max_length, config.train.swap_variants,
                                                    config.train.batch_size, progress=config.train.progress,
                                                    own_features=feats, precision=config.train.frozen_precision)
                    train_set = TextFeatureDataset(ds, feats, swap, config.train.swap_prob)
                else:
                    val_set = TextFeatureDataset(ds, feats)
    tower = model.image_tower
    if config.train.trunk_views > 0 and tower.frozen_trunk_stages > 0 and not tower.is_vit and len(train_set):
        images = train_set.base if isinstance(train_set, TextFeatureDataset) else train_set
        # Views drawn under the run's seed, as the augmentation of an uncached run would be: seeds that shared
        # one set of views gave chapter 06 a seed spread that missed the augmentation's share of the variation.
        trunk = frozen_trunk_features(tower, images, config.train.trunk_views, seed=config.train.seed,
                                      progress=config.train.progress, channels_last=config.train.channels_last,
                                      precision=config.train.frozen_precision)
        train_set = TrunkFeatureDataset(train_set, trunk, images)
        if len(val_set):
            # Validation's images take the deterministic eval transform: one view, computed once instead of at
            # every validation, and kept in float32 so that the numbers are what the images themselves give.
            val_images = val_set.base if isinstance(val_set, TextFeatureDataset) else val_set
            val_trunk = frozen_trunk_features(tower, val_images, 1, seed=0, progress=config.train.progress,
                                              channels_last=config.train.channels_last, dtype=torch.float32)
            val_set = TrunkFeatureDataset(val_set, val_trunk, val_images)
    return {"model": model, "train_set": train_set, "val_set": val_set if len(val_set) else None,
            "collate_fn": collate, "tokenizer": tokenizer, "graph": graph}


def data_fingerprint(data_dir: str | os.PathLike) -> str:
    """A short hash of what a MIMIC-CXR-JPG-layout folder holds for training: its split and label CSVs,
    decompressed (so a rewritten ``.gz`` with a new timestamp is the same data). It follows the data, not its
    path: a moved copy keeps the fingerprint, another dataset or another offline world gets another one."""
    import gzip
    import hashlib

    from mlip_core.data.mimic import find_csv

    digest = hashlib.sha1()
    for stem in ("mimic-cxr-2.0.0-split", "mimic-cxr-2.0.0-chexpert"):
        path = find_csv(Path(data_dir), stem)
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]


def run_folder(config: Any, root: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Path:
    """``ROOT/<name>_<hash>`` (ROOT defaults to ``workspace("runs", "pretrain")``), the hash of the whole config and,
    with ``data_dir``, of the data (:func:`data_fingerprint`): a new folder whenever a setting or the dataset
    changes, the same one (so ``resume="auto"`` reuses the run) when neither does. Without ``data_dir`` a run on
    one dataset would be resumed, finished, by the same config on another."""
    import hashlib

    from mlip_core.config import config_to_dict
    from mlip_core.paths import workspace

    identity = config_to_dict(config)
    if data_dir is not None:
        identity = {"config": identity, "data": data_fingerprint(data_dir)}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root if root is not None else workspace("runs", "pretrain")) / f"{config.name}_{key}"


def train(
    config: Any,
    data_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    collate_fn: Callable[[list[dict]], dict] | None = None,
    reports_root: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``config`` (a :class:`mlip_core.config.Config`) and return history and checkpoint paths.

    Either ``data_dir`` (an offline world or MIMIC-CXR-JPG) builds model, datasets and collator from the
    config, or the caller passes ``model``/``train_set``/``collate_fn`` (``val_set`` optional) directly.
    ``reports_root`` is where the reports are when they are not inside ``data_dir`` (MIMIC-CXR ships them apart
    from MIMIC-CXR-JPG): the folder holding their ``files/`` tree, or ``mimic-cxr-reports.zip``. Where the data
    lives is not part of the config (nor of the run folder's hash): the same run may move with its data.
    A caller that passes ``model`` seeds its initialisation itself (``seed_everything(config.train.seed)``).
    ``resume="auto"`` continues from the newest good checkpoint in ``run_dir`` when there is one.
    """
    from mlip_core.config import save_config
    from mlip_core.paths import workspace

    tc = config.train
    info = init_distributed(tc.device)
    # Same seed on every rank: identical initial weights (DDP also broadcasts them from rank 0).
    seed_everything(tc.seed, deterministic=tc.deterministic)
    run_dir = Path(run_dir) if run_dir is not None else workspace("runs", config.name)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if model is None or train_set is None or collate_fn is None:
        if data_dir is None:
            raise ValueError("pass data_dir (a MIMIC-CXR-JPG-layout folder) or model, train_set and collate_fn")
        built = build_run(config, data_dir, info, reports_root=reports_root)
        model = model or built["model"]
        train_set = train_set or built["train_set"]
        val_set = val_set if val_set is not None else built.get("val_set")
        collate_fn = collate_fn or built["collate_fn"]
    trainer = Trainer(config, run_dir, model, train_set, collate_fn, val_set, dist_info=info)
    trainer.resume(resume)
    result = trainer.fit()
    if info.is_main and tc.progress:
        print(f"run folder: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  last checkpoint: "
              f"{result.checkpoint_path}\n  image tower: {result.export_path}")
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlip_core.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mlip",
                   help="a named config (mlip, convirt, gloria, mgca, mlip_no_<part>) or a YAML file")
    p.add_argument("--data", required=True, help="dataset folder in MIMIC-CXR-JPG layout (offline world or real)")
    p.add_argument("--reports", default=None, metavar="DIR_OR_ZIP",
                   help="the MIMIC-CXR reports when not inside --data: the folder holding their files/ tree, or "
                        "mimic-cxr-reports.zip")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, export/")
    p.add_argument("--resume", default=None, help="'auto' (newest good checkpoint in --out) or a checkpoint path")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--stop-at-step", type=int, default=None, help="stop after this step (schedule unchanged)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split over ranks)")
    p.add_argument("--grad-accum-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--image-tower", default=None, help="timm name, e.g. resnet18, resnet50")
    p.add_argument("--text-tower", default=None, help="minilm, tiny, or a Hub name / local folder")
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--tensorboard", action="store_true", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set loss.itm=false --set train.warmup_ratio=0.1")
    return p.parse_args(argv)


def _apply_override(cfg: Any, dotted: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) onto nested dataclasses; unknown fields raise."""
    import yaml

    if "=" not in dotted:
        raise ValueError(f"--set {dotted!r}: expected SECTION.KEY=VALUE")
    key, raw = dotted.split("=", 1)
    obj = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    if not hasattr(obj, parts[-1]):
        raise ValueError(f"--set {dotted!r}: {type(obj).__name__} has no field {parts[-1]!r}")
    setattr(obj, parts[-1], yaml.safe_load(raw))


def config_from_args(args: argparse.Namespace) -> Any:
    """The config the CLI asks for: named or YAML, then the explicit flags, then ``--set`` overrides."""
    from mlip_core.config import load_config, named_config

    cfg = load_config(args.config) if args.config.endswith((".yaml", ".yml")) else named_config(args.config)
    tc = cfg.train
    for flag, attr in (("max_steps", "max_steps"), ("epochs", "epochs"), ("stop_at_step", "stop_at_step"),
                       ("seed", "seed"), ("batch_size", "batch_size"), ("grad_accum_steps", "grad_accum_steps"),
                       ("lr", "lr"), ("precision", "precision"), ("num_workers", "num_workers"),
                       ("checkpoint_every", "checkpoint_every"), ("deterministic", "deterministic"),
                       ("channels_last", "channels_last"), ("compile", "compile"), ("tensorboard", "tensorboard")):
        value = getattr(args, flag)
        if value is not None:
            setattr(tc, attr, value)
    if args.no_progress:
        tc.progress = False
    if args.image_size is not None:
        cfg.model.image.image_size = args.image_size
    if args.image_tower is not None:
        cfg.model.image.name = args.image_tower
    if args.text_tower is not None:
        cfg.model.text.name = args.text_tower
    for item in args.set:
        _apply_override(cfg, item)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (also under torchrun)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    cfg = config_from_args(args)
    try:
        train(cfg, data_dir=args.data, run_dir=args.out, resume=args.resume, reports_root=args.reports)
        if dist.is_initialized():
            # Every rank finishes its collectives before any tears gloo/nccl down (an early teardown aborts the peer).
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
