"""The book's prose takes its measured numbers from the run, and names only chapters that exist.

A chapter's markdown may state design facts (a config value, a dataset's size, a protocol's 1 / 10 / 100%), and a
figure from a paper when the sentence names its source. A *measured* figure (an AUROC, a recall, a speed, a
duration) typed into markdown goes stale the first time the code changes; it belongs in a ``glue`` or a printed
cell. Chapter names in the prose must be chapters of the table of contents.
"""

from __future__ import annotations

import re

import pytest
from jupytext import read

from mlip_core.book import toc_notebooks
from mlip_core.paths import book_dir, repo_root

NOTEBOOKS = toc_notebooks(book_dir())
# A measured-looking number: a decimal, a percentage or an integer of two digits or more.
NUMBER = r"(?:\d+\.\d+|\d+(?:,\d{3})*\s?%|\d{2,}(?:,\d{3})*)"
UNIT = r"(?:ms|s|min|minutes?|seconds?|hours?|pairs/s|img/s|images/s)"
METRIC = r"(?:AUROC|AUC|R@\d+|recall|precision|accuracy|Dice|mAP|IoU|faster|slower|speed-?up)"
# "reached 0.77 mean AUROC", "R@10 of 8.2", "about 15 s", "2.0x slower": a number right before a unit, or within
# three words of a metric on either side.
NEAR = re.compile(rf"(?<![\w@$.{{]){NUMBER}\s?{UNIT}\b|(?<![\w@$.{{])\d+(?:\.\d+)?\s?(?:x|×)\s+(?:faster|slower)|"
                  rf"(?<![\w@$.{{]){NUMBER}(?![\w@])\s+(?:[^\s.;:]+\s+){{0,3}}?{METRIC}\b|"
                  rf"\b{METRIC}\b(?:\s+[^\s.;:]+){{0,3}}?\s+(?<![\w@]){NUMBER}(?![\w@])")
SOURCE = re.compile(r"et al\.|arXiv|\bpaper\b|\[\d+\]|reports?\)|CLIP's|MIMIC-CXR's|as in |the original", re.I)


def _markdown_lines(name: str) -> list[str]:
    nb = read(repo_root() / "notebooks" / f"{name}.py")
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                line = re.sub(r"\{glue:[a-z]+\}`[^`]*`", "GLUED", line)  # glued values are measured, by design
                line = re.sub(r"`[^`]*`|\$[^$]*\$", "CODE", line)  # code, parameter values and maths
                lines.append(line)
    return lines


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_measured_figure_is_typed_into_the_prose(name):
    typed = [line.strip() for line in _markdown_lines(name) if NEAR.search(line) and not SOURCE.search(line)]
    assert not typed, f"{name}: measured-looking figures typed into markdown (glue them or name the source): {typed}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prose_names_only_chapters_of_the_table_of_contents(name):
    nb = read(repo_root() / "notebooks" / f"{name}.py")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    named = set(re.findall(r"\b(\d\d_[a-z][a-z0-9_]*)\b(?!\.[a-z])", text))  # not file names (06_x.csv)
    missing = sorted(n for n in named if n not in NOTEBOOKS)
    assert not missing, f"{name} names chapters that are not in book/_toc.yml: {missing}"


def test_the_detector_catches_typed_measurements_and_lets_design_facts_pass():
    assert NEAR.search("A logistic regression on raw thumbnails then reached 0.77 mean AUROC with the labels")
    assert NEAR.search("the chapter takes about 15 s on two cores")
    assert NEAR.search("MLIP trains 2.0× slower than ConVIRT")
    assert not NEAR.search("split 80/10/10 into train/validate/test by patient")
    assert not NEAR.search("a patient has 1.5 studies on average")
    assert SOURCE.search("MGCA reports 0.89 AUROC (Wang et al., 2022)")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_chapter_opens_with_what_it_teaches_needs_and_costs(name):
    """The opening says what you will learn, what the chapter needs and how long it takes, and the cell right
    after it shows the runner's measured times (not a typed duration)."""
    cells = read(repo_root() / "notebooks" / f"{name}.py").cells
    opening, times = cells[0], cells[1]
    assert opening.cell_type == "markdown"
    for label in ("**What you will learn.**", "**What it needs.**", "**How long it takes.**"):
        assert label in opening.source, f"{name}: the opening has no {label}"
    assert times.cell_type == "code" and f'chapter_times("{name}")' in times.source
    assert "remove-input" in times.metadata.get("tags", [])
