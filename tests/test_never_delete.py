"""Never delete what the project did not write: the world writer removes only the files its manifest lists.

A user who points the workspace's ``offline_world`` (or ``--out``) at a real MIMIC-CXR-JPG copy must lose
nothing: every entry point that writes a world refuses a folder holding world-like files it did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlip_core.data.synth import MANIFEST_NAME, ensure_world, remove_world, write_world
from mlip_core.paths import repo_root

from mlip_core.data.fixture_trees import ensure_fixture_trees, make_mimic_tree


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def real_tree(tmp_path) -> Path:
    """A MIMIC-CXR-JPG tree with plain (not gzipped) CSVs: the very names the world writer uses."""
    root = tmp_path / "mimic"
    make_mimic_tree(root, n_subjects=3, studies_per_subject=1, gz=False)
    return root


def test_ensure_world_refuses_a_real_tree_and_keeps_every_byte(real_tree):
    before = _digest(real_tree)
    with pytest.raises(FileExistsError, match=f"{real_tree}.*no {MANIFEST_NAME}"):
        ensure_world(real_tree, num_studies=4, seed=0, image_size=32)
    assert _digest(real_tree) == before


def test_the_fixture_trees_writer_refuses_a_real_tree_and_rewrites_only_its_own(real_tree, tmp_path):
    """The `fixtures` profile's trees share the rule: a folder the project did not write is refused untouched; its
    own write is reused, and replaced (its files only) when the manifest is of another version."""
    before = _digest(real_tree)
    with pytest.raises(FileExistsError, match=f"{real_tree}.*no mlip-fixture-trees.json"):
        ensure_fixture_trees(real_tree)
    assert _digest(real_tree) == before
    folder = tmp_path / "trees"
    roots = ensure_fixture_trees(folder)
    written = _digest(folder)
    assert ensure_fixture_trees(folder) == roots and _digest(folder) == written  # reused, not rewritten
    manifest = folder / "mlip-fixture-trees.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 0'))
    (folder / "chexpert" / "mine.txt").write_text("a file the user put there")
    with pytest.raises(FileExistsError, match="still hold files the fixture trees writer did not write"):
        ensure_fixture_trees(folder)
    assert (folder / "chexpert" / "mine.txt").read_text() == "a file the user put there"


def test_write_world_refuses_a_real_tree_and_keeps_every_byte(real_tree):
    before = _digest(real_tree)
    with pytest.raises(FileExistsError, match=str(real_tree)):
        write_world(real_tree, num_studies=4, seed=0, image_size=32)
    assert _digest(real_tree) == before


def test_a_lone_csv_of_the_real_dataset_is_refused_too(tmp_path):
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text("subject_id,study_id\n1,2\n")
    before = _digest(tmp_path)
    with pytest.raises(FileExistsError, match="mimic-cxr-2.0.0-chexpert.csv"):
        ensure_world(tmp_path, num_studies=4, seed=0, image_size=32)
    assert _digest(tmp_path) == before


def test_rewriting_a_world_keeps_a_file_the_user_added_inside_it(tmp_path):
    ensure_world(tmp_path, num_studies=4, seed=0, image_size=32)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["complete"] and len(manifest["files"]) > 4 * 2  # images, reports, masks, CSVs
    added = next((tmp_path / "files").rglob("*.jpg")).parent / "my_annotation.json"
    added.write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        ensure_world(tmp_path, num_studies=5, seed=0, image_size=32)
    assert added.read_text() == "{}"  # kept; the world's own files are gone
    assert not (tmp_path / "mimic-cxr-2.0.0-split.csv").exists()


def test_remove_world_removes_exactly_the_listed_files(tmp_path):
    write_world(tmp_path / "w", num_studies=3, seed=0, image_size=32)
    (tmp_path / "w" / "notes.txt").write_text("mine")
    listed = len(json.loads((tmp_path / "w" / MANIFEST_NAME).read_text())["files"])
    assert remove_world(tmp_path / "w") == listed
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["notes.txt"]


def test_a_writer_killed_half_way_is_cleaned_and_rewritten(tmp_path, monkeypatch):
    import mlip_core.data.synth as synth

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        write_world(tmp_path, num_studies=3, seed=0, image_size=32)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["complete"] is False
    monkeypatch.undo()
    summary, written = ensure_world(tmp_path, num_studies=3, seed=0, image_size=32)
    assert written and summary.studies == 3


def test_world_cli_refuses_a_real_tree(real_tree):
    before = _digest(real_tree)
    proc = subprocess.run([sys.executable, "-m", "mlip_core.data.synth", "--out", str(real_tree), "--num-studies",
                           "3", "--image-size", "32"], cwd=repo_root(), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and str(real_tree) in proc.stderr
    assert "Traceback" not in proc.stderr  # one line naming the folder and the fix
    assert _digest(real_tree) == before


@pytest.mark.notebook
def test_chapter_01_pointed_at_a_real_tree_fails_and_keeps_every_byte(real_tree, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "offline_world").symlink_to(real_tree, target_is_directory=True)
    before = _digest(real_tree)
    proc = subprocess.run([sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--only",
                           "01_offline_world", "--out", str(tmp_path / "executed")], cwd=repo_root(),
                          env={**os.environ, "MLIP_WORKSPACE": str(ws)}, capture_output=True, text=True)
    assert proc.returncode != 0
    assert MANIFEST_NAME in proc.stdout + proc.stderr
    assert _digest(real_tree) == before
