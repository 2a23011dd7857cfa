"""The book runner: profiles, parameters and failures are reported clearly, on a tiny book in tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mlip_core.book import BookError, NotebookFailed, parse_overrides, run_book, toc_notebooks

HEADER = "# %% [markdown]\n# A tiny chapter.\n\n"


def make_book(tmp_path: Path, notebooks: dict[str, str], profiles: dict[str, str]) -> tuple[Path, Path]:
    """A book folder with a toc over ``notebooks`` (name -> percent source) and the given profiles."""
    book, nb_dir = tmp_path / "book", tmp_path / "notebooks"
    (book / "profiles").mkdir(parents=True)
    nb_dir.mkdir()
    chapters = "\n".join(f"      - file: notebooks/{name}" for name in notebooks)
    (book / "_toc.yml").write_text(f"format: jb-book\nroot: intro\nparts:\n  - caption: Test\n    chapters:\n{chapters}\n")
    for name, source in notebooks.items():
        (nb_dir / f"{name}.py").write_text(source)
    for name, text in profiles.items():
        (book / "profiles" / f"{name}.yaml").write_text(text)
    return book, nb_dir


GOOD = HEADER + '# %% tags=["parameters"]\nx = 1\nlabel = "a"\n\n# %%\nresult = x * 2\nprint("result", result, label)\n'
FAILING = HEADER + '# %% tags=["parameters"]\nx = 1\n\n# %%\ny = x + 1\n\n# %%\nraise ValueError(f"bad value {y}")\n'


def test_toc_order_is_kept(tmp_path):
    book, _ = make_book(tmp_path, {"02_b": GOOD, "01_a": GOOD}, {"smoke": ""})
    assert toc_notebooks(book) == ["02_b", "01_a"]


def test_bad_profile_name_lists_valid_profiles(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD}, {"smoke": "", "ci": ""})
    with pytest.raises(BookError) as err:
        run_book("nightly", book=book, notebooks=nb_dir, out_dir=tmp_path / "out")
    message = str(err.value)
    assert "nightly" in message and "ci, smoke" in message


def test_unknown_profile_parameter_is_named_before_anything_runs(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD, "02_b": GOOD}, {"smoke": "01_a: {x: 2}\n02_b: {epochz: 3}\n"})
    with pytest.raises(BookError) as err:
        run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out")
    assert "epochz" in str(err.value) and "02_b" in str(err.value)
    assert not (tmp_path / "out" / "01_a.ipynb").exists(), "checks must precede execution"


def test_override_nobody_declares_is_an_error(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD}, {"smoke": ""})
    with pytest.raises(BookError, match="lr"):
        run_book("smoke", overrides=["lr=0.1"], book=book, notebooks=nb_dir, out_dir=tmp_path / "out")


def test_parameters_and_overrides_reach_the_notebook(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD}, {"smoke": "01_a: {x: 5}\n"})
    result = run_book("smoke", overrides=["label=zz"], book=book, notebooks=nb_dir, out_dir=tmp_path / "out")
    assert [r.status for r in result.runs] == ["ok"]
    executed = nbformat.read(tmp_path / "out" / "01_a.ipynb", as_version=4)
    printed = "".join(
        out.get("text", "") for cell in executed.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "result 10 zz" in printed
    assert "01_a" in result.timing_table()


def test_parse_overrides_targets_and_types():
    parsed = parse_overrides(["epochs=3", "01_a:use_gpu=false", "name=mlip"])
    assert parsed[None] == {"epochs": 3, "name": "mlip"}
    assert parsed["01_a"] == {"use_gpu": False}
    with pytest.raises(BookError):
        parse_overrides(["no_equals_sign"])


def test_failing_cell_exits_non_zero_and_shows_the_cell(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_bad": FAILING, "02_after": GOOD}, {"smoke": ""})
    with pytest.raises(NotebookFailed) as err:
        run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    message = str(err.value)
    assert "01_bad" in message and 'raise ValueError(f"bad value {y}")' in message and "bad value 2" in message
    assert not (tmp_path / "out" / "02_after.ipynb").exists(), "the book stops at the first failure"

    proc = subprocess.run(
        [sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--book-dir", str(book),
         "--notebooks-dir", str(nb_dir), "--out", str(tmp_path / "out2")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "bad value 2" in proc.stderr and "01_bad" in proc.stderr


def test_missing_parameters_cell_is_a_clear_error(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": HEADER + "# %%\nx = 1\n"}, {"smoke": ""})
    with pytest.raises(BookError, match="parameters"):
        run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out")
