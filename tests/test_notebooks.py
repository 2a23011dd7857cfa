"""Every chapter of the book executes with the `smoke` profile, through the same runner as `make book`.

Chapters run in table-of-contents order and share one temporary workspace, as in the book: a later
chapter reads what an earlier one wrote (the offline world, a pretrained checkpoint).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlip_core.paths import book_dir, repo_root
from mlip_core.book import load_profile, toc_notebooks

NOTEBOOKS = toc_notebooks(book_dir())


@pytest.fixture(scope="session")
def book_workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("book_workspace")


def test_every_notebook_has_a_block_in_every_profile():
    for profile in ("smoke", "ci", "gpu", "full"):
        params = load_profile(book_dir(), profile)
        missing = [name for name in NOTEBOOKS if name not in params]
        assert not missing, f"book/profiles/{profile}.yaml has no block for {missing}"


@pytest.mark.notebook
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_smoke_profile(name, book_workspace, tmp_path):
    env = {**os.environ, "MLIP_WORKSPACE": str(book_workspace), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--only", name,
         "--out", str(tmp_path / "executed")],
        cwd=repo_root(), env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "executed" / f"{name}.ipynb").is_file()


CHEAPEST = "00_quickstart"  # about 10 s with the smoke profile, no earlier chapter needed
PROGRESS_BAR_MARKS = ("it/s]", "s/it]", "%|", "IProgress")


@pytest.mark.notebook
def test_chapter_page_has_no_progress_bars_and_the_run_logs_no_error(tmp_path):
    """What `make book` shows for a successful chapter: results in the page, no ERROR line in the terminal."""
    import nbformat

    env = {**os.environ, "MLIP_WORKSPACE": str(tmp_path / "workspace"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--only", CHEAPEST,
         "--out", str(tmp_path / "executed")],
        cwd=repo_root(), env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"{CHEAPEST} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert not errors, f"a successful run logged: {errors}"
    executed = nbformat.read(tmp_path / "executed" / f"{CHEAPEST}.ipynb", as_version=4)
    outputs = [str(out) for cell in executed.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert outputs, "the chapter printed nothing"
    bars = [out[:200] for out in outputs if any(mark in out for mark in PROGRESS_BAR_MARKS)]
    assert not bars, f"progress bars in the executed page: {bars}"


@pytest.mark.parametrize("profile", ["smoke", "ci", "gpu", "full"])
def test_every_profile_value_is_declared_by_its_notebook_and_has_its_type(profile, tmp_path):
    from mlip_core.book import check_parameters, declared_parameters, type_error, to_ipynb

    params = load_profile(book_dir(), profile)
    problems = []
    for name in NOTEBOOKS:
        nb = tmp_path / f"{name}.ipynb"
        to_ipynb(repo_root() / "notebooks" / f"{name}.py", nb)
        declared = declared_parameters(nb)
        check_parameters(name, params.get(name, {}), declared)
        problems += [p for k, v in params.get(name, {}).items()
                     if (p := type_error(name, k, v, declared[k], f"profile {profile}"))]
    assert not problems, problems


@pytest.mark.parametrize("profile", ["smoke", "ci", "gpu", "full"])
def test_a_profile_holds_only_what_differs_from_the_parameters_cell(profile, tmp_path):
    """One place for every value: the cell holds the ci value, a profile only what it changes."""
    import ast

    from mlip_core.book import declared_parameters, to_ipynb

    params = load_profile(book_dir(), profile)
    repeated = []
    for name in NOTEBOOKS:
        nb = tmp_path / f"{name}.ipynb"
        to_ipynb(repo_root() / "notebooks" / f"{name}.py", nb)
        declared = declared_parameters(nb)
        for key, value in params.get(name, {}).items():
            try:
                default = ast.literal_eval(declared[key].default)
            except (ValueError, SyntaxError):
                continue
            if value == default and type(value) is type(default):
                repeated.append(f"{name}: {key}: {value!r}")
    assert not repeated, f"book/profiles/{profile}.yaml repeats the parameters cell: {repeated}"
