"""The book's own markdown pages (``book/*.md``: the intro, "The method as implemented") keep the chapters' prose
rules: no measured figure typed in without its source, chapter names only of the table of contents, and code
pointers that exist in the repository.
"""

from __future__ import annotations

import re

import pytest
import yaml
from test_prose import NEAR, NOTEBOOKS, SOURCE

from mlip_core.paths import book_dir, repo_root

PAGES = sorted(p.name for p in book_dir().glob("*.md"))


def _masked(line: str) -> str:
    """Code spans and inline maths hold config values, not measurements (as test_prose masks them)."""
    return re.sub(r"`[^`]*`|\$[^$]*\$", "CODE", line)


@pytest.mark.parametrize("page", PAGES)
def test_pages_type_no_measured_figure_and_name_only_chapters_of_the_toc(page):
    text = (book_dir() / page).read_text(encoding="utf-8")
    typed = [line.strip() for line in map(_masked, text.splitlines()) if NEAR.search(line) and not SOURCE.search(line)]
    assert not typed, f"book/{page}: measured-looking figures typed into markdown (name the source): {typed}"
    named = set(re.findall(r"\b(\d\d_[a-z][a-z0-9_]*)\b(?!\.[a-z])", text))
    missing = sorted(n for n in named if n not in NOTEBOOKS)
    assert not missing, f"book/{page} names chapters that are not in book/_toc.yml: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_file_paths_a_page_points_to_exist(page):
    text = (book_dir() / page).read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:mlip_core|tests|book|notebooks|benchmarks)/[\w./-]+)`", text))
    # a chapter is named as {doc}`notebooks/NAME`: its source is notebooks/NAME.py
    missing = sorted(p for p in paths if not any((repo_root() / f"{p}{ext}").exists() for ext in ("", ".py")))
    assert not missing, f"book/{page} points to files that do not exist: {missing}"


def test_every_markdown_page_is_in_the_table_of_contents():
    toc = yaml.safe_load((book_dir() / "_toc.yml").read_text())
    files: list[str] = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    orphans = sorted(p for p in PAGES if p.removesuffix(".md") not in files)
    assert not orphans, f"book/_toc.yml does not list {orphans}; Jupyter Book (only_build_toc_files) would skip them"
