"""The manifest that lets a writer replace what it wrote and nothing else (the offline world, the transfer worlds).

A writer that fills a folder lists in ``FOLDER/<manifest>`` every file it wrote. The rule, kept here once:

- :func:`start_write` claims the folder: it refuses unless the paths the writer creates are absent (for an
  *exclusive* layout, unless the folder holds no file at all) and writes an incomplete manifest naming them
  before any other file. :func:`finish_write` rewrites it, complete, with every file under those paths, last.
- :func:`reuse_or_clear` keeps a complete folder that the caller says is the one it wants and whose files are
  all there; any other folder this project wrote is removed by :func:`remove_written` (write it again).
- :func:`remove_written` removes exactly the regular files the manifest lists (reached without following a
  link, under the paths it created), the folders they leave empty, then the manifest. A writer killed half-way
  left an incomplete manifest: the paths it claimed were absent when it started, so they are removed whole.
  Anything else (a file the user added, a dataset beside the world) stays and is named in the error.
- A folder holding the writer's paths (exclusive: anything) but no manifest is not ours: ``FileExistsError``,
  one line naming the folder and the fix, and nothing is touched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Layout", "read_manifest", "write_manifest", "start_write", "finish_write", "remove_written",
           "reuse_or_clear"]


@dataclass(frozen=True)
class Layout:
    """What a writer creates at the top of its folder and how it shares the folder (messages use ``what``)."""

    manifest: str  # the manifest's file name, at the top of the folder
    paths: tuple[str, ...]  # the top-level names it may create: the only ones a manifest may list
    what: str  # "world", "transfer world"
    ensure: str  # the call that reuses or replaces it
    hint: str  # the fix offered when a folder is refused as not ours
    exclusive: bool = False  # True: the folder holds the writer's paths and nothing else


def _is_manifest_tmp(layout: Layout, name: str) -> bool:
    """A temporary file that ``atomic_write`` of the manifest left behind when killed (ours, by its name)."""
    return name.startswith(f".{layout.manifest}.") and name.endswith(".tmp")


def _holds_something(path: Path) -> bool:
    return path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))


def _holds_files(path: Path) -> bool:
    """A file or link at ``path`` or anywhere below it (empty folders do not count)."""
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(files for _, _, files in os.walk(path))


def _files_under(path: Path) -> list[Path]:
    """The regular files at or below ``path``, never through a link."""
    if path.is_symlink():
        return []
    if path.is_file():
        return [path]
    found: list[Path] = []
    for root, _, files in os.walk(path):  # does not descend into linked folders
        found.extend(p for p in (Path(root) / f for f in files) if p.is_file() and not p.is_symlink())
    return found


def _names(names: Sequence[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" ... ({len(names)} in all)" if len(names) > most else "")


def _foreign(folder: Path, layout: Layout, manifest: dict | None) -> list[str]:
    """Top-level names in ``folder`` that hold something the writer did not write."""
    if not folder.is_dir():
        return []
    if not layout.exclusive:
        return [] if manifest is not None else [n for n in layout.paths if _holds_something(folder / n)]
    ours = set(manifest["created"]) | {layout.manifest} if manifest is not None else set()
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in ours and not _is_manifest_tmp(layout, p.name) and _holds_files(p))


def _not_ours(folder: Path, layout: Layout, names: list[str]) -> FileExistsError:
    return FileExistsError(
        f"{folder} holds {_names(names)} but no {layout.manifest}, so this project did not write them: nothing was "
        f"touched (nothing was removed or written). {layout.hint}")


def _refuse_if_not_ours(folder: Path, layout: Layout, manifest: dict | None) -> None:
    """Refuse a path that is a file, or a folder holding what the writer creates (exclusive: anything) and no
    manifest."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder, and holds no {layout.manifest}: nothing was "
                              f"touched. {layout.hint}")
    foreign = [] if manifest is not None else _foreign(folder, layout, None)
    if foreign:
        raise _not_ours(folder, layout, foreign)


def read_manifest(folder: str | os.PathLike, layout: Layout) -> dict | None:
    """The manifest in ``folder``, or None when there is none; ``FileExistsError`` when it is unreadable or names
    a path the writer never creates (then nothing may be removed on its word)."""
    path = Path(folder) / layout.manifest
    if not path.is_file():
        return None
    fix = (f"nothing was removed. Delete the {layout.what} folder yourself or point the {layout.what} at an empty "
           "folder.")
    try:
        manifest = json.loads(path.read_text())
        created = [str(c) for c in manifest["created"]]
        files = [str(f) for f in manifest.get("files", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise FileExistsError(f"{path} is unreadable ({exc}); {fix}") from exc
    if any(c not in layout.paths for c in created):
        raise FileExistsError(f"{path} names paths the {layout.what} writer never creates ({created}); {fix}")
    return {**manifest, "created": created, "files": files}


def write_manifest(folder: str | os.PathLike, layout: Layout, manifest: dict) -> None:
    """Write the manifest atomically (readers see the old one or the new one, never half of one)."""
    from mlip_core.checkpoint import atomic_write

    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(Path(folder) / layout.manifest, lambda fh: fh.write(text), mode="w")


def start_write(folder: str | os.PathLike, layout: Layout, created: Sequence[str] | None = None, **record) -> dict:
    """Claim ``folder`` for a write of ``created`` (default: all the layout's paths) and return the incomplete
    manifest, ``record`` in it, that :func:`finish_write` completes. Refuses a folder that is not free."""
    folder = Path(folder)
    created = list(layout.paths if created is None else created)
    if (folder / layout.manifest).exists():
        raise FileExistsError(f"{folder} already holds a {layout.what} ({layout.manifest}): write into an empty "
                              f"folder, or call {layout.ensure}, which reuses or replaces a {layout.what} this "
                              "project wrote.")
    _refuse_if_not_ours(folder, layout, None)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**record, "complete": False, "created": created}
    write_manifest(folder, layout, manifest)  # first: a writer killed half-way leaves what it had claimed
    return manifest


def finish_write(folder: str | os.PathLike, layout: Layout, manifest: dict, **record) -> dict:
    """List every file under the claimed paths and write the manifest complete (the writer's last write)."""
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for name in manifest["created"] for p in _files_under(folder / name))
    done = {**manifest, **record, "complete": True, "files": files}
    write_manifest(folder, layout, done)
    return done


def _prune_empty(top: Path) -> None:
    """Remove the empty folders at and below ``top``, deepest first, never through a link."""
    if top.is_symlink() or not top.is_dir():
        return
    for root, dirs, _ in os.walk(top, topdown=False):
        for d in (Path(root) / name for name in dirs):
            if not d.is_symlink() and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if not any(top.iterdir()):
        top.rmdir()


def remove_written(folder: str | os.PathLike, layout: Layout) -> int:
    """Remove what the writer wrote in ``folder`` (see the module docstring); returns the number of files removed.

    ``FileExistsError`` when the folder holds the writer's paths but no manifest (nothing removed), or when files
    the writer did not write are left under its paths (those stay; the world's own files are gone)."""
    folder = Path(folder)
    manifest = read_manifest(folder, layout)
    _refuse_if_not_ours(folder, layout, manifest)
    removed = 0
    if manifest is not None and manifest.get("complete"):
        listed = set(manifest["files"])
        for name in manifest["created"]:
            for path in _files_under(folder / name):
                if str(path.relative_to(folder)) in listed:
                    path.unlink()
                    removed += 1
            _prune_empty(folder / name)
    elif manifest is not None:  # killed half-way: the claimed paths were absent when it started
        for name in manifest["created"]:
            target = folder / name
            removed += len(_files_under(target))
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.is_file() and not target.is_symlink():
                target.unlink()
    if folder.is_dir():
        for tmp in folder.iterdir():
            if _is_manifest_tmp(layout, tmp.name) and tmp.is_file():
                tmp.unlink()
    if manifest is None:
        return 0
    (folder / layout.manifest).unlink()
    leftovers = [name for name in manifest["created"] if _holds_something(folder / name)]
    if leftovers:
        raise FileExistsError(f"{folder}: {', '.join(leftovers)} still hold files the {layout.what} writer did not "
                              f"write; they were kept. Move them away or point the {layout.what} at another folder.")
    return removed


def reuse_or_clear(folder: str | os.PathLike, layout: Layout, wanted: Callable[[dict], bool]) -> dict | None:
    """The manifest of the complete folder to reuse (``wanted(manifest)`` is true and every listed file is there),
    or None once ``folder`` is free to write: an older write is removed (:func:`remove_written`). Refuses a folder
    this project did not write, and for an exclusive layout one that also holds files beside the writer's own."""
    folder = Path(folder)
    manifest = read_manifest(folder, layout)
    _refuse_if_not_ours(folder, layout, manifest)
    foreign = _foreign(folder, layout, manifest)
    if foreign:
        raise FileExistsError(f"{folder} holds a {layout.what} and also {_names(foreign)}, which it did not write: "
                              f"nothing was touched. Move them away or point the {layout.what} at another folder.")
    if (manifest is not None and manifest.get("complete") and wanted(manifest)
            and all((folder / rel).is_file() for rel in manifest["files"])):
        return manifest
    remove_written(folder, layout)
    return None
