"""With credentialed data, an executed chapter shows no image and no report text from it unless
``publish_examples`` is set (the data-use agreements forbid redistribution); aggregate figures stay.

The offline worlds (images drawn by the project, IU reports shipped openly in torchxrayvision) are free to show.
The executed chapters on the real-format fixture trees are checked in tests/test_notebooks.py
(``test_real_data_chapters_run_with_the_fixtures_profile``): no example image or report text by default, the
example pair with ``publish_examples=true``.
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
# Roots a chapter's example cells may leave out of their guard: the figures never show that dataset.
NOT_IN_FIGURES = {
    ("09_detection", "object_cxr_root"): "the example boxes are RSNA's; Object-CXR is reported as numbers only",
}
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
            missing = [r for r in roots if f"{r}={r}" not in guard and (name, r) not in NOT_IN_FIGURES]
            assert not missing, f"{name}: {guard!r} does not pass {missing}"
