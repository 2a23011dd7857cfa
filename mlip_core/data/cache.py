"""A preprocessed image cache: every image decoded and resized once into a memory-mapped uint8 array.

Layout in ``directory``: ``images.u8`` (raw uint8, shape (N, size, size), C order) and ``index.json`` (the
inputs' key, the shape, which slots hold a decoded image, and the skips). The key hashes everything that
changes the pixels: each file's path, byte size and modification time, the target size, the resize mode
and :data:`~mlip_core.data.images.PREPROCESS_VERSION`. A cache whose key differs is rebuilt, so a changed,
added or re-downloaded image never serves stale pixels. Files that cannot be decoded are counted skips
(``valid[i]`` is False) rather than errors, so one corrupt JPEG does not stop a 377k-image build.

Adapted in spirit from the "preprocess once to uint8 arrays" habit of large-scale loaders (e.g. FFCV); the
format here is deliberately plain numpy so any worker can ``np.memmap`` it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .images import PREPROCESS_VERSION, ImageReadError, load_uint8
from .skips import SkipReport

__all__ = ["ImageCache", "cache_key"]

DATA_NAME = "images.u8"
INDEX_NAME = "index.json"


def _file_signature(path: Path) -> list:
    """[path, byte size, mtime in ns]; a missing file is [path, -1, -1] (and will be a counted skip)."""
    try:
        st = os.stat(path)
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), -1, -1]


def cache_key(paths: Sequence[Path | str], size: int, resize_mode: str = "pad", version: str = PREPROCESS_VERSION) -> str:
    """SHA-256 over (version, size, resize mode, every file's path/size/mtime), hex."""
    h = hashlib.sha256()
    h.update(json.dumps(["mlip-image-cache", version, int(size), resize_mode]).encode())
    for p in paths:
        h.update(json.dumps(_file_signature(Path(p))).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive advisory lock on ``lock_path`` (POSIX ``flock``; a no-op where it does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _decode(args: tuple[str, int, str]) -> tuple[np.ndarray | None, str]:
    """Worker: (path, size, mode) -> (uint8 (size, size) or None, error message)."""
    path, size, mode = args
    try:
        return load_uint8(path, size, mode=mode), ""
    except ImageReadError as exc:
        return None, str(exc)


class ImageCache:
    """uint8 images (N, size, size) memory-mapped from ``directory``; ``cache[i]`` is image ``paths[i]``."""

    def __init__(
        self,
        directory: Path | str,
        paths: Sequence[Path | str],
        size: int,
        resize_mode: str = "pad",
        num_workers: int = 0,
        progress: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.paths = [str(p) for p in paths]
        self.size = int(size)
        self.resize_mode = resize_mode
        self.key = cache_key(self.paths, self.size, resize_mode)
        self.skips = SkipReport("image-cache")
        self.rebuilt = False
        self._mm: np.ndarray | None = None
        if not self._load_index():
            # One builder at a time (e.g. every rank of a torchrun job opens the same cache): the others
            # wait on the lock, then find the finished index.
            self.directory.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.directory / "build.lock"):
                if not self._load_index():
                    self._build(num_workers=num_workers, progress=progress)
                    self.rebuilt = True
                    if not self._load_index():  # pragma: no cover - only if the disk lies to us
                        raise RuntimeError(f"{self.directory}: the cache was just written but its index does not match")

    # -- index ---------------------------------------------------------------------------------------
    def _load_index(self) -> bool:
        """Adopt the on-disk cache if its key and data size match these inputs."""
        index_path, data_path = self.directory / INDEX_NAME, self.directory / DATA_NAME
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            return False
        n = len(self.paths)
        if index.get("key") != self.key or index.get("shape") != [n, self.size, self.size]:
            return False
        if not data_path.is_file() or data_path.stat().st_size != n * self.size * self.size:
            return False
        self.valid = np.array(index["valid"], dtype=bool)
        self.skips = SkipReport("image-cache")
        for reason, item, path in index.get("skips", []):
            self.skips.add(reason, item, path)
        return True

    def _build(self, num_workers: int, progress: bool) -> None:
        """Decode every image into a temporary memmap, then rename data and index into place."""
        from mlip_core.checkpoint import atomic_path, atomic_write

        self.directory.mkdir(parents=True, exist_ok=True)
        # The build lock is held: a temporary data file still here is from a build that was killed; drop it
        # (where the lock is a no-op, another builder's open file refuses deletion and stays).
        for stale in self.directory.glob(f".{DATA_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        n, s = len(self.paths), self.size
        valid = np.zeros(n, dtype=bool)
        skips: list[list[str]] = []
        with atomic_path(self.directory / DATA_NAME) as tmp_data:
            # np.memmap cannot map an empty file; N == 0 keeps the empty temporary file.
            mm = np.memmap(tmp_data, dtype=np.uint8, mode="w+", shape=(n, s, s)) if n else None
            jobs = [(p, s, self.resize_mode) for p in self.paths]
            if num_workers > 0 and n > 1:
                with ProcessPoolExecutor(max_workers=num_workers) as pool:
                    results = pool.map(_decode, jobs, chunksize=max(1, min(64, n // (4 * num_workers) or 1)))
                    self._collect(results, mm, valid, skips, progress)
            else:
                self._collect(map(_decode, jobs), mm, valid, skips, progress)
            if mm is not None:
                mm.flush()
                del mm
        index = {
            "key": self.key,
            "shape": [n, s, s],
            "dtype": "uint8",
            "resize_mode": self.resize_mode,
            "preprocess_version": PREPROCESS_VERSION,
            "valid": valid.tolist(),
            "skips": skips,
            "paths": self.paths,
        }
        # json.dumps (C encoder) then one write: json.dump into the file would encode 377k paths in Python.
        atomic_write(self.directory / INDEX_NAME, lambda fh: fh.write(json.dumps(index)), "w")

    def _collect(self, results, mm, valid: np.ndarray, skips: list[list[str]], progress: bool) -> None:
        """Write decoded images into ``mm``; failures become skip entries."""
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(self.paths), desc="caching images")
        for i, (arr, err) in enumerate(results):
            if arr is None:
                skips.append(["undecodable image", self.paths[i], err])
            else:
                mm[i] = arr
                valid[i] = True

    # -- access --------------------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The whole cache as a read-only memmap, uint8 (N, size, size); opened lazily per process."""
        if self._mm is None:
            n = len(self.paths)
            if n == 0:
                self._mm = np.zeros((0, self.size, self.size), dtype=np.uint8)
            else:
                self._mm = np.memmap(self.directory / DATA_NAME, dtype=np.uint8, mode="r", shape=(n, self.size, self.size))
        return self._mm

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image ``i`` as a writable uint8 copy (size, size); raises for a slot that failed to decode."""
        if not self.valid[i]:
            raise ImageReadError(f"{self.paths[i]}: this image could not be decoded when the cache was built; "
                                 "see cache.skips and drop invalid rows (cache.valid) before training.")
        return np.array(self.array[i])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None  # each DataLoader worker maps the file itself
        return state
