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


# --- parameters cell parsing, parameter types, clean pages and a quiet run (issue 14) ---

from mlip_core.book import parse_parameters_cell  # noqa: E402

TYPED = (
    HEADER + '# %% tags=["parameters"]\n'
    "num_points = 512  # candidates; 1.6x faster than size=96\n"
    'label = "a"  # a=b in a comment\n'
    "lr = 2e-4\n"
    "use_gpu = False\n"
    "\n# %%\nprint('points', num_points, label, lr, use_gpu)\n"
)


def test_comment_with_equals_sign_does_not_hide_a_parameter():
    declared = parse_parameters_cell(
        "image_size = 64  # 1.6x faster than size=96\n"
        "seed: int = 0  # seed=0 is the book's\n"
        "sizes = [\n    32,  # a=b\n    64,\n]\n"
        "name = 'x=y'\n"
        "threshold = None  # None=off\n"
    )
    assert list(declared) == ["image_size", "seed", "sizes", "name", "threshold"]
    assert declared["image_size"].type is int and declared["image_size"].default == "64"
    assert declared["seed"].type is int
    assert declared["name"].type is str and declared["name"].default == "'x=y'"
    assert declared["sizes"].type is None and declared["threshold"].type is None


def test_profile_may_set_a_parameter_whose_comment_has_an_equals_sign(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": TYPED}, {"smoke": "01_a: {num_points: 3}\n"})
    result = run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    assert [r.status for r in result.runs] == ["ok"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("num_points=abc", ["'num_points'", "int", "default 512", "'abc'"]),
        ("lr=fast", ["'lr'", "float", "default 2e-4"]),
        ("use_gpu=3", ["'use_gpu'", "bool", "default False"]),
        ("01_a:num_points=1.5", ["'num_points'", "int", "default 512", "1.5"]),
    ],
)
def test_wrong_type_is_refused_before_the_first_chapter_runs(tmp_path, override, expected):
    book, nb_dir = make_book(tmp_path, {"00_first": GOOD, "01_a": TYPED}, {"smoke": ""})
    with pytest.raises(BookError) as err:
        run_book("smoke", overrides=[override], book=book, notebooks=nb_dir, out_dir=tmp_path / "out")
    message = str(err.value)
    assert "01_a" in message and override in message
    for part in expected:
        assert part in message
    assert not (tmp_path / "out" / "00_first.ipynb").exists(), "types are checked before anything runs"


def test_wrong_type_in_a_profile_names_the_profile(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": TYPED}, {"smoke": "01_a: {use_gpu: 'no way'}\n"})
    with pytest.raises(BookError, match=r"'use_gpu' is declared as bool \(default False\).*profile 'smoke'"):
        run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out")


def test_cli_refuses_wrong_type_with_one_message(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": TYPED}, {"smoke": ""})
    proc = subprocess.run(
        [sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--book-dir", str(book),
         "--notebooks-dir", str(nb_dir), "--out", str(tmp_path / "out"), "-p", "num_points=abc"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "'num_points' is declared as int (default 512)" in proc.stderr and "01_a" in proc.stderr


def test_fitting_types_pass_and_str_overrides_keep_their_text(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": TYPED}, {"smoke": ""})
    run_book("smoke", overrides=["lr=1", "label=007", "num_points=4", "use_gpu=true"], book=book,
             notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    executed = nbformat.read(tmp_path / "out" / "01_a.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "points 4 007 1 True" in printed


PROGRESS = (
    HEADER + '# %% tags=["parameters"]\nsteps = 50\n\n'
    "# %%\nfrom tqdm.auto import tqdm\nimport tqdm as plain\n"
    "total = 0\nfor i in tqdm(range(steps), desc='training'):\n    total += i\n"
    "for i in plain.trange(steps):\n    total += i\nprint('total', total)\n"
)
PROGRESS_BAR_MARKS = ("it/s]", "%|", "IProgress", "training:")


def test_executed_pages_keep_results_not_progress_bars(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": PROGRESS}, {"smoke": ""})
    run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    executed = nbformat.read(tmp_path / "out" / "01_a.ipynb", as_version=4)
    outputs = [str(o) for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("total 2450" in o for o in outputs)
    bars = [o for o in outputs for mark in PROGRESS_BAR_MARKS if mark in o]
    assert not bars, f"progress bars in the executed page: {bars[:3]}"


def test_kernel_is_not_interrupted_at_shutdown():
    """jupyter_client sends SIGINT before every shutdown; ipykernel then logs 'ERROR | KeyboardInterrupt'."""
    import asyncio

    from mlip_core.book import _kernel_manager_class

    km = _kernel_manager_class()(kernel_name="python3")
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())  # no kernel: the stock manager would raise here
    km.shutting_down = False
    with pytest.raises(RuntimeError):
        asyncio.run(km._async_interrupt_kernel())


def test_successful_run_logs_no_error_and_no_tcp_warning(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD}, {"smoke": ""})
    proc = subprocess.run(
        [sys.executable, "-m", "mlip_core.book", "--profile", "smoke", "--book-dir", str(book),
         "--notebooks-dir", str(nb_dir), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "ERROR" not in log and "KeyboardInterrupt" not in log, log
    assert "without encryption" not in log, log


def test_chapter_times_are_recorded_per_profile_and_shown(tmp_path):
    from mlip_core.book import chapter_times, read_chapter_times, times_table

    book, nb_dir = make_book(tmp_path, {"01_a": GOOD, "02_b": FAILING}, {"smoke": "", "ci": ""})
    assert "No time recorded yet" in chapter_times("01_a", book)
    with pytest.raises(NotebookFailed):
        run_book("smoke", book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    rows = read_chapter_times(book)
    # the chapter that finished is recorded, the failed one is not
    assert [(r["notebook"], r["profile"]) for r in rows] == [("01_a", "smoke")]
    assert float(rows[0]["seconds"]) > 0 and "CPU cores" in rows[0]["machine"]
    run_book("ci", only=["01_a"], book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    first = {r["profile"]: r["seconds"] for r in read_chapter_times(book)}
    assert set(first) == {"smoke", "ci"}
    # an override changes what the time measures: nothing is recorded
    run_book("ci", only=["01_a"], overrides=["x=5"], book=book, notebooks=nb_dir, out_dir=tmp_path / "out",
             log=lambda *_: None)
    assert {r["profile"]: r["seconds"] for r in read_chapter_times(book)} == first
    # a re-run replaces its own row and keeps the other profile's
    run_book("ci", only=["01_a"], book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=lambda *_: None)
    rows = read_chapter_times(book)
    assert sorted(r["profile"] for r in rows) == ["ci", "smoke"]
    table = chapter_times("01_a", book)
    assert "| `smoke` |" in table and "| `ci` |" in table and "Not measured yet: `fixtures`, `gpu`, `full`" in table
    text = times_table(book)
    assert text.splitlines()[1].split() == ["notebook", "smoke", "ci"] and "02_b" in text


def test_a_mangled_times_file_names_itself_and_the_fix(tmp_path):
    from mlip_core.book import read_chapter_times

    book, _ = make_book(tmp_path, {"01_a": GOOD}, {"smoke": ""})
    (book / "chapter_times.csv").write_text("name,secs\n01_a,3\n")
    with pytest.raises(BookError, match="chapter_times.csv: expected the columns .* delete the file"):
        read_chapter_times(book)


REAL = HEADER + '# %% tags=["parameters"]\nsiim_root = ""  # empty: offline\nrsna_root = ""\n\n# %%\nprint(siim_root)\n'


def test_full_run_says_which_chapters_fall_back_before_the_first_runs(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD, "08_seg": REAL}, {"full": ""})
    data = tmp_path / "siim"
    data.mkdir()
    logged: list[str] = []
    run_book("full", overrides=[f"08_seg:siim_root={data}"], book=book, notebooks=nb_dir, out_dir=tmp_path / "out",
             log=logged.append)
    report = next(line for line in logged if line.startswith("[book] real data"))
    assert logged.index(report) == 0  # before the first chapter's line
    assert f"08_seg: siim_root={data}; rsna_root empty (the offline world instead of RSNA Pneumonia)" in report
    assert "01_a" not in report  # a chapter without real-data parameters is not mentioned


def test_a_real_data_folder_that_does_not_exist_is_refused_before_anything_runs(tmp_path):
    book, nb_dir = make_book(tmp_path, {"08_seg": REAL}, {"full": "08_seg:\n  rsna_root: /no/such/rsna\n"})
    with pytest.raises(BookError, match=r"do not exist, nothing was run:\n  08_seg: rsna_root=/no/such/rsna"):
        run_book("full", book=book, notebooks=nb_dir, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_list_shows_the_real_data_parameters(tmp_path):
    book, nb_dir = make_book(tmp_path, {"01_a": GOOD, "08_seg": REAL}, {"smoke": ""})
    out = subprocess.run([sys.executable, "-m", "mlip_core.book", "--list", "--book-dir", str(book),
                          "--notebooks-dir", str(nb_dir)], capture_output=True, text=True, check=True).stdout
    assert "real-data parameters" in out
    assert "08_seg: siim_root empty (the offline world instead of SIIM-ACR Pneumothorax); rsna_root empty" in out


# ------------------------------------------------------------------------------ extends, and the fixture trees
def test_a_profile_extends_another_and_holds_only_its_differences(tmp_path):
    from mlip_core.book import load_profile

    book, _ = make_book(tmp_path, {"01_a": GOOD, "02_b": GOOD},
                        {"smoke": "01_a: {x: 2}\n02_b: {x: 3, label: b}\n", "mine": "extends: smoke\n02_b: {label: c}\n"})
    assert load_profile(book, "mine") == {"01_a": {"x": 2}, "02_b": {"x": 3, "label": "c"}}
    (book / "profiles" / "smoke.yaml").write_text("extends: mine\n")
    with pytest.raises(BookError, match="without a cycle"):
        load_profile(book, "mine")
    (book / "profiles" / "mine.yaml").write_text("extends: nightly\n")
    with pytest.raises(BookError, match="unknown profile 'nightly'"):
        load_profile(book, "mine")


def test_fixture_trees_placeholder_writes_the_trees_and_reaches_the_notebook(tmp_path, monkeypatch):
    from mlip_core.data.fixture_trees import fixture_roots

    monkeypatch.setenv("MLIP_WORKSPACE", str(tmp_path / "ws"))
    book, nb_dir = make_book(tmp_path, {"08_seg": REAL}, {"fixtures": '08_seg:\n  siim_root: "{fixture_trees}/siim"\n'})
    logged: list[str] = []
    run_book("fixtures", book=book, notebooks=nb_dir, out_dir=tmp_path / "out", log=logged.append)
    siim = fixture_roots(tmp_path / "ws" / "fixture_trees")["siim_root"]
    assert (siim / "train-rle.csv").is_file()
    assert f"08_seg: siim_root={siim}" in next(line for line in logged if line.startswith("[book] real data"))
