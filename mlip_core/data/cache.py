"""A preprocessed image cache: every image decoded and resized once into a memory-mapped uint8 array.

Layout in ``directory``: ``images.u8`` (raw uint8, shape (N, size, size), C order) and ``index.json`` (the
inputs' key, the shape, which slots hold a decoded image, and the skips). The key hashes everything that
changes the pixels: each file's path, byte size and modification time, the target size, the resize mode
and :data:`~mlip_core.data.images.PREPROCESS_VERSION`. A cache whose key differs is rebuilt, so a changed,
added or re-downloaded image never serves stale pixels. Files that cannot be decoded are counted skips
(``valid[i]`` is False) rather than errors, so one corrupt JPEG does not stop a 377k-image build.

The build decodes in chunks of up to :data:`CHUNK` images, in ``num_workers`` processes that each write
their chunk's slots of the memmap, and resumes: until it finishes, it lives in ``directory/.partial/``
(``images.u8`` being filled, ``build.json`` naming the key it is for, and one ``done/<first slot>.json`` per
finished chunk, written atomically after the chunk's pixels are flushed). A build killed after hours
continues from its finished chunks; an interrupted chunk is decoded again. The bytes are the same for any
``num_workers``, whether or not the build was interrupted.

Adapted in spirit from the "preprocess once to uint8 arrays" habit of large-scale loaders (e.g. FFCV); the
format here is deliberately plain numpy so any worker can ``np.memmap`` it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np

from .images import PREPROCESS_VERSION, ImageReadError, load_uint8
from .skips import SkipReport

__all__ = ["ImageCache", "cache_key"]

DATA_NAME = "images.u8"
INDEX_NAME = "index.json"
PARTIAL_NAME = ".partial"  # an unfinished build: resumed by the next one with the same key
CHUNK = 512  # images per resumable unit of work (~25 MB of 224-pixel images): at most this many are redone


def chunk_size(n: int) -> int:
    """Images per chunk for ``n`` images: :data:`CHUNK`, smaller for small caches so that workers share them.
    It depends on ``n`` alone, so a build resumed with another ``num_workers`` reuses the same chunks."""
    return max(1, min(CHUNK, -(-n // 64)))


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


def _reserve(path: Path, nbytes: int) -> None:
    """Create ``path`` as ``nbytes`` zero bytes, allocated on disk where the filesystem can: a full disk is then
    an error here, not a SIGBUS in a worker writing into a sparse memmap hours later."""
    with open(path, "wb") as fh:
        try:
            if nbytes:
                os.posix_fallocate(fh.fileno(), 0, nbytes)
        except (AttributeError, OSError) as exc:  # AttributeError: no posix_fallocate (macOS, Windows)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise OSError(exc.errno, f"{path}: cannot reserve {nbytes / 2**30:.1f} GiB for the image cache "
                                         f"({exc.strerror}); free space there or pass another cache folder") from exc
            fh.truncate(nbytes)  # a filesystem that cannot allocate ahead: the file grows as it is written
        os.fsync(fh.fileno())


def _build_chunk(job: tuple[str, int, str, int, list[str]]) -> tuple[int, list[bool], list[list[str]]]:
    """Worker: decode ``paths`` into slots ``start..`` of the data file, flush them to disk, and return
    (start, which slots hold an image, skip entries). Failed slots are zeroed (the same bytes on a redo)."""
    data, size, mode, start, paths = job
    mm = np.memmap(data, dtype=np.uint8, mode="r+", offset=start * size * size, shape=(len(paths), size, size))
    valid, skips = [], []
    for i, path in enumerate(paths):
        try:
            mm[i] = load_uint8(path, size, mode=mode)
            valid.append(True)
        except ImageReadError as exc:
            mm[i] = 0
            valid.append(False)
            skips.append(["undecodable image", path, str(exc)])
    mm.flush()  # msync of this chunk's pages: the pixels are on disk before the chunk is recorded as done
    del mm
    return start, valid, skips


class ImageCache:
    """uint8 images (N, size, size) memory-mapped from ``directory``; ``cache[i]`` is image ``paths[i]``."""

    def __init__(
        self,
        directory: Path | str,
        paths: Sequence[Path | str],
        size: int,
        resize_mode: str = "pad",
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        """Open the cache in ``directory``, building (or resuming the build of) whatever is missing first.

        ``num_workers`` > 0 decodes in that many processes (0: in this one). ``progress`` shows a tqdm bar
        while building; it is still silenced by ``TQDM_DISABLE`` (the book runner sets it).
        """
        self.directory = Path(directory)
        self.paths = [str(p) for p in paths]
        self.size = int(size)
        self.resize_mode = resize_mode
        self.key = cache_key(self.paths, self.size, resize_mode)
        self.skips = SkipReport("image-cache")
        self.rebuilt = False
        self.resumed = 0  # images taken over from an interrupted build rather than decoded by this one
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
        """Decode every image not already done into ``.partial/``, then rename data and index into place."""
        from mlip_core.checkpoint import _fsync_dir, atomic_write

        self.directory.mkdir(parents=True, exist_ok=True)
        # Temporary data files of the builders before resumable builds: the lock is held, so they are dead.
        for stale in self.directory.glob(f".{DATA_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        n, s = len(self.paths), self.size
        part = self.directory / PARTIAL_NAME
        done = self._partial_build(part)
        self.resumed = sum(len(r["valid"]) for r in done.values())
        c = chunk_size(n)
        jobs = [(str(part / DATA_NAME), s, self.resize_mode, a, self.paths[a:a + c])
                for a in range(0, n, c) if a not in done]
        from tqdm.auto import tqdm

        # No disable=False when a bar is asked for: it would override TQDM_DISABLE.
        off = {} if progress else {"disable": True}
        bar = tqdm(total=n, initial=self.resumed, desc="caching images", unit="img", **off)
        pool = ProcessPoolExecutor(max_workers=num_workers) if num_workers > 0 and len(jobs) > 1 else None
        try:
            if pool is None:
                results = map(_build_chunk, jobs)
            else:
                results = (f.result() for f in as_completed([pool.submit(_build_chunk, j) for j in jobs]))
            for a, valid, skips in results:
                record = {"key": self.key, "start": a, "valid": valid, "skips": skips}
                atomic_write(part / "done" / f"{a:010d}.json", lambda fh: fh.write(json.dumps(record)), "w")
                done[a] = record
                bar.update(len(valid))
        finally:
            if pool is not None:  # an interruption: chunks not started are dropped, running ones finish
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

        records = [done[a] for a in sorted(done)]
        index = {
            "key": self.key,
            "shape": [n, s, s],
            "dtype": "uint8",
            "resize_mode": self.resize_mode,
            "preprocess_version": PREPROCESS_VERSION,
            "valid": [v for r in records for v in r["valid"]],
            "skips": [k for r in records for k in r["skips"]],
            "paths": self.paths,
        }
        # Data first, then the index naming its key: a kill between the two leaves an index whose key does not
        # match, so the cache is rebuilt, never served with the wrong pixels.
        os.replace(part / DATA_NAME, self.directory / DATA_NAME)
        _fsync_dir(self.directory)
        # json.dumps (C encoder) then one write: json.dump into the file would encode 377k paths in Python.
        atomic_write(self.directory / INDEX_NAME, lambda fh: fh.write(json.dumps(index)), "w")
        self._remove_partial(part)

    @staticmethod
    def _remove_partial(part: Path) -> None:
        """Remove an unfinished build's folder, which holds only what a build writes (``build.json``, the data
        file, ``done/<start>.json`` and their temporaries); anything else there is refused, named, untouched."""
        if not part.exists():
            return
        own_top = {"build.json", DATA_NAME, "done"}
        foreign = [p for p in part.iterdir() if p.name not in own_top and not
                   (p.name.startswith(".") and p.name.endswith(".tmp"))]
        done = part / "done"
        if done.is_dir():
            foreign += [p for p in done.iterdir() if not (p.suffix == ".json" or p.name.endswith(".tmp"))]
        if foreign or part.is_symlink() or not part.is_dir():
            raise RuntimeError(f"{part}: an unfinished image-cache build folder holding files no build writes "
                               f"(e.g. {foreign[:3] or [part]}); nothing was removed. Move them out of the cache "
                               "folder (the project owns workspace/cache), then run again")
        shutil.rmtree(part)

    def _partial_build(self, part: Path) -> dict[int, dict]:
        """The finished chunks {first slot: record} of an interrupted build of these inputs in ``part``; any
        other partial build is discarded and a fresh one (zeroed data file + ``build.json``) is started."""
        from mlip_core.checkpoint import atomic_write

        n, s = len(self.paths), self.size
        ident = {"key": self.key, "shape": [n, s, s], "chunk": chunk_size(n)}
        data = part / DATA_NAME
        try:
            same = json.loads((part / "build.json").read_text()) == ident and data.stat().st_size == n * s * s
        except (OSError, ValueError):
            same = False
        if same:
            c, done = ident["chunk"], {}
            for path in (part / "done").glob("*.json"):
                try:
                    r = json.loads(path.read_text())
                    a = r["start"]
                    ok = r["key"] == self.key and a % c == 0 and 0 <= a < n and len(r["valid"]) == min(c, n - a)
                except (OSError, ValueError, KeyError, TypeError):
                    ok = False
                if ok:
                    done[a] = r
            return done
        self._remove_partial(part)
        (part / "done").mkdir(parents=True)
        _reserve(data, n * s * s)
        atomic_write(part / "build.json", lambda fh: fh.write(json.dumps(ident)), "w")
        return {}

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
