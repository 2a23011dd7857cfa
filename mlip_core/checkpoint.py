"""Training checkpoints: atomic writes, `resume=auto`, safe loading, every RNG the loop uses, and the
image-tower export that transfer reads.

A checkpoint is one ``torch.save`` dict of plain containers and tensors so that it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs when a file is opened):

``{"format", "step", "epoch", "batch_in_epoch", "model", "optimizer", "scheduler", "scaler",
"rng", "config", "code_version", "metrics"}``.

``model`` is the full ``state_dict`` of the model, so a divergence (momentum) encoder registered as
a sub-module travels with it. Files live in ``RUN_DIR/checkpoints/``: ``step_00000123.pt`` (the last
``keep_last`` of them) and ``best.pt``. Every write goes to a temporary file in the same folder and is
renamed over the target, so a crash (even SIGKILL) never leaves a half-written checkpoint under a real
name; a file that is nevertheless corrupt (disk full, copied half-way) is named in a
:class:`CheckpointError`, and :func:`find_resumable` falls back to the previous good one.

The export (``RUN_DIR/export/image_tower.pt`` + ``image_tower.json``) is the pretrained image tower alone: a
plain ``state_dict`` and the run's config, written by :func:`write_image_tower_export` and read by
:func:`load_image_tower_export` (transfer code needs nothing of the trainer).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "mlip-checkpoint-v1"
REQUIRED_KEYS = ("format", "step", "epoch", "batch_in_epoch", "model", "optimizer", "rng", "config")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` for the caller to fill (by name: ``np.memmap``, a tool that
    writes files); on success fsync it and rename it over ``path``, on an exception delete it. Readers see the
    old file or the whole new one, never a torn one. The name is ``.<name>.<random>.tmp`` (unique, so two
    writers of one path never collide); a process killed mid-write leaves it behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)  # Windows refuses to fsync a read-only handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_leftover_temporaries(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` for targets named like ``pattern``
    (``.<name>.<random>.tmp``) when a process was killed mid-write; returns them. Call it only where no writer
    of those targets can be running (a trainer's resume owns its checkpoint folder)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".{pattern}.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "wb") -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it over ``path`` (:func:`atomic_path`).
    ``mode`` "w" opens text (UTF-8, no newline translation)."""
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
            write(fh)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as "unexpected pos" (a RuntimeError)
        full = disk_full_message(Path(path).parent)
        if full:
            raise OSError(errno.ENOSPC, f"{full} ({type(exc).__name__}: {str(exc)[:200]})") from exc
        raise
    return Path(path)


LOW_DISK_BYTES = 64 * 2**20  # below this, a failed write is reported as a full disk


def disk_full_message(folder: Path) -> str:
    """One line naming ``folder``'s free space and the fix when it is nearly full (below ``LOW_DISK_BYTES``),
    else ""."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if free >= LOW_DISK_BYTES:
        return ""
    return (f"could not write in {folder}: the disk holds only {free / 2**20:.0f} MiB free; free space (old runs, "
            "caches and clones) or point MLIP_WORKSPACE at a larger disk, then run again (finished work resumes)")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def cache_key(*parts: Any) -> str:
    """A short hash of what a cached tensor file was computed from (texts, names, sizes, seeds...)."""
    return hashlib.sha1("\x00".join(map(str, parts)).encode("utf-8")).hexdigest()[:16]


def cached_tensors(path: Path, build: Callable[[], Any], enabled: bool = True, what: str = "cache") -> Any:
    """``build()``'s tensors (a tensor or a dict of them), read from ``path`` when an earlier build wrote them
    there (atomically); with ``enabled`` False (e.g. a randomly initialised tower, whose outputs depend on the
    run's seed) always built and never written. A torn or foreign file is rebuilt and overwritten; several
    ranks of one torchrun may write it at once, each through its own temporary file."""
    if enabled and path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: recompute and overwrite it
            log.warning("%s %s unreadable; recomputing", what, path)
    out = build()
    if enabled:
        atomic_torch_save(out, path)
    return out


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# RNG states (as tensors and plain containers, so weights_only loading accepts them)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (CPU) and CUDA generator states as weights_only-safe objects."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when present on both sides)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npd = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npd["bit_generator"],
            "state": {"key": npd["key"].numpy().astype(np.uint32), "pos": npd["pos"]},
            "has_gauss": npd["has_gauss"],
            "gauss": npd["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG states but {torch.cuda.device_count()} "
                "devices are visible; CUDA generators are not restored (the run stays valid but is "
                "not bitwise-reproducible)",
                stacklevel=2,
            )


# ----------------------------------------------------------------------------------------------
# Code version


@functools.lru_cache(maxsize=1)
def _code_version() -> tuple[tuple[str, str], ...]:
    return tuple(_read_code_version().items())


def code_version() -> dict[str, str]:
    """The package version and, when run from a git checkout, the commit and whether it was dirty
    (read once per process)."""
    return dict(_code_version())


def _read_code_version() -> dict[str, str]:
    from mlip_core import __version__

    info = {"package": __version__, "git_commit": "unknown", "git_dirty": "unknown"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, timeout=5,
            )
            info["git_dirty"] = str(bool(dirty.stdout.strip())) if dirty.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ----------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate one checkpoint with ``weights_only=True``; :class:`CheckpointError` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the run folder or start without --resume")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes, an interrupted copy?); delete it and resume "
                              "from an earlier checkpoint (resume='auto' does so)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]}); delete it and "
            "resume from an earlier checkpoint (resume='auto' does so)"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mlip training checkpoint (expected format {FORMAT!r}); "
                              "pass the RUN_DIR of an mlip_core.train run")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it was not written by this trainer's save")
    return ckpt


def step_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """``step_*.pt`` files in ``ckpt_dir``, newest (highest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(
    ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``ckpt_dir`` that loads; corrupt newer ones are reported and skipped.

    Returns ``(path, checkpoint)`` or ``None`` when the folder holds no step checkpoint at all.
    Raises :class:`CheckpointError` when there are checkpoints but none of them loads.
    """
    candidates = step_checkpoints(ckpt_dir)
    errors: list[str] = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            warnings.warn(f"resume=auto skips {exc}", stacklevel=2)
    if errors:
        raise CheckpointError("no usable checkpoint in " + str(ckpt_dir) + ":\n  " + "\n  ".join(errors))
    return None


# ----------------------------------------------------------------------------------------------
# Saving with retention


def save_step_checkpoint(
    state: dict[str, Any], ckpt_dir: str | os.PathLike, step: int, keep_last: int = 2
) -> Path:
    """Write ``step_{step:08d}.pt`` atomically and delete all but the newest ``keep_last`` step files."""
    ckpt_dir = Path(ckpt_dir)
    state = {"format": FORMAT, **state}
    path = atomic_torch_save(state, ckpt_dir / f"step_{step:08d}.pt")
    for old in step_checkpoints(ckpt_dir)[max(keep_last, 1):]:
        old.unlink(missing_ok=True)
    return path


def save_best_checkpoint(state: dict[str, Any], ckpt_dir: str | os.PathLike) -> Path:
    """Write ``best.pt`` atomically."""
    return atomic_torch_save({"format": FORMAT, **state}, Path(ckpt_dir) / "best.pt")


# ----------------------------------------------------------------------------------------------
# Model state in a checkpoint, and the image-tower export for transfer


def _reconstructible(model: nn.Module) -> tuple[str, ...]:
    fn = getattr(model, "reconstructible_prefixes", None)
    return tuple(fn()) if callable(fn) else ()


def _fingerprint(model: nn.Module, prefixes: tuple[str, ...]) -> str:
    """sha1 of the names, shapes and bytes of the state-dict entries under ``prefixes`` ("" when none)."""
    if not prefixes:
        return ""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def omitted_fingerprint(model: nn.Module) -> str:
    """The fingerprint of what :func:`model_checkpoint_state` leaves out of ``model`` (compute it once when those
    weights never change, and pass it back in)."""
    return _fingerprint(model, _reconstructible(model))


def model_checkpoint_state(model: nn.Module, fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                         dict[str, Any]]:
    """The model's state dict without what its config rebuilds exactly (``model.reconstructible_prefixes()``,
    e.g. a frozen MiniLM), and the record ``{"prefixes", "fingerprint"}`` that :func:`load_model_checkpoint_state`
    checks so that a checkpoint never meets other frozen weights than the ones it was trained with."""
    prefixes = _reconstructible(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)} if prefixes \
        else model.state_dict()
    fp = fingerprint if fingerprint is not None else omitted_fingerprint(model)
    return state, {"prefixes": list(prefixes), "fingerprint": fp}


def load_model_checkpoint_state(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Load ``checkpoint["model"]`` into ``model`` (built from the run's config, pretrained weights included).

    Entries the checkpoint left out (``checkpoint["omitted"]``) keep the model's own weights after their
    fingerprint is checked; everything else loads strictly. Checkpoints without ``omitted`` hold every entry."""
    omitted = checkpoint.get("omitted") or {"prefixes": [], "fingerprint": ""}
    prefixes = tuple(omitted.get("prefixes", []))
    if not prefixes:
        model.load_state_dict(checkpoint["model"])
        return
    if _fingerprint(model, prefixes) != omitted.get("fingerprint"):
        raise CheckpointError(
            f"the checkpoint leaves out {', '.join(prefixes)} (frozen pretrained weights the config rebuilds), but "
            "the weights this model loaded differ from the ones it was trained with (another text-tower package "
            "or version?): install the version the run used, or start a new run")
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def write_image_tower_export(state: dict[str, torch.Tensor], config: dict[str, Any], step: int, out: Path) -> Path:
    """Write ``image_tower.pt`` (state_dict) and ``image_tower.json`` (the config, step, code version) into ``out``."""
    path = atomic_torch_save(state, out / "image_tower.pt")
    meta = {"image": config.get("model", {}).get("image", {}), "config": config, "step": step,
            "code_version": code_version(), "state_dict": path.name}
    atomic_write(out / "image_tower.json", lambda fh: fh.write(json.dumps(meta, indent=2)), "w")
    return path


def export_from_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the image tower of a training checkpoint (e.g. ``best.pt``) as
    :meth:`mlip_core.train.Trainer.export_image_tower` does at the end of a run."""
    ckpt = load_checkpoint(checkpoint)
    prefix = "image_tower."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint {checkpoint} has no image_tower.* weights; is it an MLIP run?")
    return write_image_tower_export(state, ckpt["config"], ckpt["step"], Path(out))


def load_image_tower_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export (``image_tower.pt`` or its folder/run folder): ``(state_dict, metadata)``."""
    path = Path(path)
    if path.is_dir():
        path = path / "image_tower.pt" if (path / "image_tower.pt").exists() else path / "export" / "image_tower.pt"
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{path}: no exported image tower (expected image_tower.pt + image_tower.json); "
                                "run mlip_core.train to the end, or call Trainer.export_image_tower()")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); re-export it from a checkpoint") from exc
    return state, json.loads(meta_path.read_text())
