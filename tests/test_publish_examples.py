"""With credentialed data, an executed chapter shows no image and no report text from it unless
``publish_examples`` is set (the data-use agreements forbid redistribution); aggregate figures stay.

The offline worlds (images drawn by the project, IU reports shipped openly in torchxrayvision) are free to show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jupytext import read

from mlip_core.book import parse_parameters_cell, toc_notebooks
from mlip_core.notebook import examples_allowed, show_examples, withheld_line
from mlip_core.paths import book_dir, repo_root

NOTEBOOKS = toc_notebooks(book_dir())
# A cell that draws an image (an overlay too) or prints report text.
SHOWS_DATA = re.compile(r"imshow\(|overlay\(|\[\"(?:text|report)\"\]")
# Chapters with a root parameter whose example cells never read what the root points at.
OFFLINE_EXAMPLES_ONLY = {
    "03_real_datasets": "check_root feeds only the command-line check, which prints counts and skip lines; the "
                        "images shown are pydicom-data's RG1_UNCR.dcm, the SIIM page's RLE and the chapter's own world",
}


# ---------------------------------------------------------------------------------------------- the function
def test_offline_data_is_always_shown():
    assert examples_allowed(False)
    assert examples_allowed(False, mimic_root="", mimic_reports_root="")
    assert examples_allowed(False, siim_root=None, rsna_root="  ")


def test_a_set_root_withholds_examples_unless_publish_examples():
    assert not examples_allowed(False, mimic_root="/data/mimic", mimic_reports_root="")
    assert not examples_allowed(False, mimic_root="", mimic_reports_root="/data/mimic-cxr-reports.zip")
    assert not examples_allowed(False, siim_root=Path("/data/siim"))
    assert examples_allowed(True, mimic_root="/data/mimic")


def test_withheld_examples_print_one_line_naming_the_dataset_and_the_parameter(capsys):
    assert not show_examples("MIMIC-CXR", False, mimic_root="/data/mimic", mimic_reports_root="")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("examples withheld: MIMIC-CXR")
    assert "(mimic_root set)" in out and "mimic_reports_root" not in out and "publish_examples=True" in out
    assert "/data/mimic" not in out, "the line names the parameter, not the (private) path"
    assert out.strip() == withheld_line("MIMIC-CXR", mimic_root="/data/mimic")


def test_shown_examples_print_nothing(capsys):
    assert show_examples("MIMIC-CXR", False, mimic_root="")
    assert show_examples("MIMIC-CXR", True, mimic_root="/data/mimic")
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- the chapters
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_example_cell_of_a_real_data_chapter_is_guarded(name):
    """A chapter that can read real data draws images and prints reports only behind ``show_examples``."""
    cells = read(repo_root() / "notebooks" / f"{name}.py").cells
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    declared = parse_parameters_cell(params.source, where=name)
    roots = sorted(k for k in declared if k.endswith("_root"))
    if not roots or name in OFFLINE_EXAMPLES_ONLY:
        return
    shows = [c.source for c in cells if c.cell_type == "code" and SHOWS_DATA.search(c.source)]
    unguarded = [src.splitlines()[0] for src in shows if not src.startswith("if show_examples(")]
    assert not unguarded, f"{name} reads {roots}; cells that show data without show_examples(...): {unguarded}"
    if shows:
        assert declared["publish_examples"].default == "False", f"{name}: publish_examples must default to False"
        for src in shows:
            guard = src.splitlines()[0]
            missing = [r for r in roots if f"{r}={r}" not in guard]
            assert not missing, f"{name}: {guard!r} does not pass {missing}"


# ------------------------------------------------------------------------------ chapter 05 on a MIMIC tree
@pytest.fixture(scope="module")
def mimic_run(tmp_path_factory):
    """A real-format MIMIC-CXR-JPG tree big enough for the smoke batch (8 train and 8 validate pairs), and one
    workspace for both runs: the second resumes the first's finished training instead of training again."""
    from dataset_fixtures import make_mimic_tree

    base = tmp_path_factory.mktemp("publish")
    tree = make_mimic_tree(base / "mimic", n_subjects=6)
    workspace = base / "workspace"

    def run(*overrides: str):
        import nbformat

        out = base / f"executed_{len(list(base.glob('executed_*')))}"
        env = {**os.environ, "MLIP_WORKSPACE": str(workspace), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--only", "05_pretraining",
             "--out", str(out), "-p", f"mimic_root={tree['root']}", *(a for o in overrides for a in ("-p", o))],
            cwd=repo_root(), env=env, capture_output=True, text=True,
        )
        assert proc.returncode == 0, f"05_pretraining failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return nbformat.read(out / "05_pretraining.ipynb", as_version=4)

    return run


def _example_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("if show_examples("))


def _mimes(cell) -> set[str]:
    return {m for out in cell.get("outputs", []) for m in out.get("data", {})}


REPORT_TEXT = ("Lungs are clear", "No acute process")  # in every report of make_mimic_tree


@pytest.mark.notebook
def test_chapter_05_on_mimic_shows_no_image_or_report_text_by_default(mimic_run):
    nb = mimic_run()
    example = _example_cell(nb)
    assert "image/png" not in _mimes(example)
    assert "examples withheld: MIMIC-CXR" in str(example.outputs)
    everything = str([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    leaked = [t for t in REPORT_TEXT if t in everything]
    assert not leaked, f"report text in the executed chapter: {leaked}"
    figures = [c for c in nb.cells if c.cell_type == "code" and "image/png" in _mimes(c)]
    assert figures, "the aggregate figures (loss curves, schedule, retrieval) should stay"


@pytest.mark.notebook
def test_chapter_05_on_mimic_shows_the_example_pair_with_publish_examples(mimic_run):
    example = _example_cell(mimic_run("publish_examples=true"))
    assert "image/png" in _mimes(example)
    assert all(t in str(example.outputs) for t in REPORT_TEXT)
