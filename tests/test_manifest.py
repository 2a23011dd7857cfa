"""The shared manifest rule (mlip_core/data/manifest.py): a writer removes what it wrote and nothing else.

Toy layouts stand for the two writers: ``BESIDE`` shares its folder (the offline world beside a real dataset),
``OWNS`` owns it (a transfer world). Both worlds' own tests pin the rule end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlip_core.data.manifest import Layout, finish_write, read_manifest, remove_written, reuse_or_clear, start_write
from mlip_core.paths import repo_root

BESIDE = Layout("toy-manifest.json", ("files", "index.csv"), what="toy world", ensure="ensure_toy",
                hint="Point the toy world elsewhere.")
OWNS = Layout("toy-manifest.json", ("files", "index.csv"), what="toy world", ensure="ensure_toy",
              hint="Point the toy world elsewhere.", exclusive=True)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(folder: Path, layout: Layout, n: int = 3, **record) -> dict:
    manifest = start_write(folder, layout, **record)
    for i in range(n):
        (folder / "files" / f"p{i}").mkdir(parents=True, exist_ok=True)
        (folder / "files" / f"p{i}" / "image.txt").write_text(f"image {i}")
    (folder / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in range(n)))
    return finish_write(folder, layout, manifest, summary={"n": n})


@pytest.mark.parametrize("layout", [BESIDE, OWNS], ids=["beside", "owns"])
def test_a_foreign_non_empty_folder_is_refused_and_keeps_every_byte(tmp_path, layout):
    (tmp_path / "files" / "p1").mkdir(parents=True)
    (tmp_path / "files" / "p1" / "real.jpg").write_bytes(b"\xff\xd8real")
    (tmp_path / "index.csv").write_text("a real index\n")
    before = _digest(tmp_path)
    for call in (lambda: start_write(tmp_path, layout), lambda: remove_written(tmp_path, layout),
                 lambda: reuse_or_clear(tmp_path, layout, lambda m: True)):
        with pytest.raises(FileExistsError) as info:
            call()
        message = str(info.value)
        assert str(tmp_path) in message and "toy-manifest.json" in message and "\n" not in message
        assert "nothing was touched" in message and layout.hint in message
    assert _digest(tmp_path) == before
    assert not (tmp_path / "toy-manifest.json").exists()


def test_an_exclusive_layout_refuses_any_file_a_shared_one_writes_beside_it(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds sub but no toy-manifest.json"):
        start_write(tmp_path / "a", OWNS)
    _write(tmp_path / "a", BESIDE)
    assert (tmp_path / "a" / "sub" / "notes.txt").read_text() == "mine"
    assert remove_written(tmp_path / "a", BESIDE) == 4
    assert _digest(tmp_path / "a") == {"sub/notes.txt": hashlib.sha256(b"mine").hexdigest()}
    (tmp_path / "b" / "empty").mkdir(parents=True)  # empty folders are not files: an exclusive write may start
    _write(tmp_path / "b", OWNS)
    (tmp_path / "b" / "theirs.csv").write_text("x\n")
    with pytest.raises(FileExistsError, match="also theirs.csv, which it did not write"):
        reuse_or_clear(tmp_path / "b", OWNS, lambda m: True)
    assert (tmp_path / "b" / "theirs.csv").is_file() and (tmp_path / "b" / "index.csv").is_file()


def test_a_stale_manifest_never_removes_a_file_it_does_not_list(tmp_path):
    world, user = tmp_path / "world", tmp_path / "user"
    _write(world, BESIDE)
    user.mkdir()
    (user / "image.txt").write_text("the user's")
    (tmp_path / "outside.txt").write_text("outside")
    (world / "files" / "p0" / "annotation.json").write_text("{}")  # added inside the world after it was written
    (world / "files" / "p1" / "image.txt").unlink()
    (world / "files" / "p1").rmdir()
    (world / "files" / "p1").symlink_to(user, target_is_directory=True)  # listed path now reached through a link
    (world / "files" / "p2" / "image.txt").unlink()
    (world / "files" / "p2" / "image.txt").symlink_to(user / "image.txt")  # a listed name that is now a link
    manifest = json.loads((world / "toy-manifest.json").read_text())
    manifest["files"] += ["../outside.txt", str(tmp_path / "outside.txt"), "files/../../outside.txt"]
    (world / "toy-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileExistsError, match="files still hold files the toy world writer did not write"):
        remove_written(world, BESIDE)
    assert (user / "image.txt").read_text() == "the user's"
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert (world / "files" / "p0" / "annotation.json").read_text() == "{}"
    assert not (world / "files" / "p0" / "image.txt").exists() and not (world / "index.csv").exists()
    assert not (world / "toy-manifest.json").exists()


def test_a_manifest_naming_paths_the_writer_never_creates_removes_nothing(tmp_path):
    _write(tmp_path / "w", BESIDE)
    before = _digest(tmp_path)
    path = tmp_path / "w" / "toy-manifest.json"
    manifest = json.loads(path.read_text())
    for created in (["files", ".."], ["files", "/"]):
        path.write_text(json.dumps({**manifest, "complete": False, "created": created}))
        with pytest.raises(FileExistsError, match="never creates.*nothing was removed"):
            reuse_or_clear(tmp_path / "w", BESIDE, lambda m: True)
    path.write_text("{not json")
    with pytest.raises(FileExistsError, match="unreadable.*nothing was removed"):
        remove_written(tmp_path / "w", BESIDE)
    assert {k: v for k, v in _digest(tmp_path).items() if "manifest" not in k} == \
        {k: v for k, v in before.items() if "manifest" not in k}


def test_reuse_needs_a_wanted_complete_world_with_every_listed_file(tmp_path):
    _write(tmp_path, OWNS, n=2, parameters={"seed": 0})
    reused = reuse_or_clear(tmp_path, OWNS, lambda m: m["parameters"] == {"seed": 0})
    assert reused is not None and reused["summary"] == {"n": 2} and read_manifest(tmp_path, OWNS) == reused
    assert reuse_or_clear(tmp_path, OWNS, lambda m: m["parameters"] == {"seed": 1}) is None  # other parameters
    assert not any(tmp_path.iterdir())
    _write(tmp_path, OWNS, n=2, parameters={"seed": 0})
    (tmp_path / "files" / "p0" / "image.txt").unlink()
    assert reuse_or_clear(tmp_path, OWNS, lambda m: True) is None  # a file is missing: cleared, to be rewritten
    assert not any(tmp_path.iterdir())


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from mlip_core.data.manifest import Layout, start_write
layout = Layout("toy-manifest.json", ("files", "index.csv"), what="toy world", ensure="ensure_toy", hint="-",
                exclusive=True)
out = Path(sys.argv[1])
start_write(out, layout)
(out / "files" / "p0").mkdir(parents=True)
(out / "files" / "p0" / "image.txt").write_text("half")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_half_way_leaves_what_the_next_call_cleans(tmp_path):
    out = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=repo_root(),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL
    assert read_manifest(out, OWNS)["complete"] is False and (out / "files" / "p0" / "image.txt").is_file()
    assert reuse_or_clear(out, OWNS, lambda m: True) is None
    assert not any(out.iterdir())
    _write(out, OWNS)  # the folder is free again
    # Killed inside the very first manifest write: only atomic_write's temporary file is left, and it is ours.
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / ".toy-manifest.json.x1y2.tmp").write_text("{")
    assert reuse_or_clear(tmp_path / "v", OWNS, lambda m: True) is None
    assert not any((tmp_path / "v").iterdir())


def test_an_interrupted_write_never_follows_a_linked_path_it_claimed(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    out = tmp_path / "w"
    start_write(out, BESIDE)
    (out / "files").symlink_to(user, target_is_directory=True)  # put there after the claim
    with pytest.raises(FileExistsError, match="files still hold files"):
        reuse_or_clear(out, BESIDE, lambda m: True)
    assert (user / "keep.txt").read_text() == "mine" and (out / "files").is_symlink()
