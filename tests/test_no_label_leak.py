"""No label leakage: pretraining on the offline world never reads the renderer's ground truth in ``synth/``.

MIMIC-CXR gives pretraining images, report text and a labeler's CheXpert CSV; the offline world's ``synth/``
folder (drawn findings, masks, exact labels) has no counterpart there, so only evaluation may read it. The test
hides ``synth/`` and records every file opened under it while ``train`` runs two steps end to end.
"""

from __future__ import annotations

import builtins
import io
import os
import pathlib
from pathlib import Path

import pytest

from mlip_core.data.synth import write_world
from mlip_core.paths import WORKSPACE_ENV


def _is_synth(path) -> bool:
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:  # a file descriptor or a file object
        return False
    return f"{os.sep}synth{os.sep}" in text or text.endswith(f"{os.sep}synth")


@pytest.fixture()
def synth_opens(monkeypatch) -> list[str]:
    """Every path under a ``synth`` folder passed to ``open`` / ``io.open`` / ``Path.open`` while the test runs."""
    seen: list[str] = []
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def spy_open(file, *args, **kwargs):
        if _is_synth(file):
            seen.append(os.fsdecode(os.fspath(file)))
        return real_open(file, *args, **kwargs)

    def spy_path_open(self, *args, **kwargs):
        if _is_synth(self):
            seen.append(str(self))
        return real_path_open(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(pathlib.Path, "open", spy_path_open)
    return seen


def test_the_spy_sees_synth_reads(tmp_path: Path, synth_opens: list[str]):
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "labels.csv").write_text("x\n")
    import pandas as pd

    pd.read_csv(tmp_path / "synth" / "labels.csv")
    (tmp_path / "synth" / "labels.csv").read_text()
    assert len(synth_opens) >= 2 and all(p.endswith("labels.csv") for p in synth_opens)


def test_pretraining_runs_without_synth_and_never_opens_it(tmp_path: Path, monkeypatch, synth_opens: list[str]):
    from mlip_core.config import named_config
    from mlip_core.train import train

    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "workspace"))
    world = tmp_path / "world"
    write_world(world, num_studies=40, seed=0, image_size=32, report_source="iu")
    (world / "synth").rename(tmp_path / "hidden")  # out of the world folder: nothing can find it
    synth_opens.clear()  # the writer itself wrote synth/

    cfg = named_config("mlip")
    cfg.model.image.name = "resnet18"
    cfg.model.image.image_size = 32
    cfg.model.text.name = "tiny"
    cfg.model.text.pretrained = False
    cfg.train.batch_size = 8
    cfg.train.max_steps = 2
    cfg.train.device = "cpu"
    cfg.train.progress = False
    cfg.train.image_cache = False
    result = train(cfg, data_dir=world, run_dir=tmp_path / "run")

    assert not synth_opens, f"pretraining opened the renderer's ground truth: {sorted(set(synth_opens))}"
    assert not (world / "synth").exists()
    assert result.steps == 2
