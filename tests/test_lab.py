"""`make lab` opens the chapters as notebooks: the shipped JupyterLab default and mlip_core.check_lab.

The cheap tests pin the settings file against what the installed jupytext and jupyterlab_server do;
the browser test (skipped without Chromium) opens a chapter in a real lab, with and without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlip_core import check_lab
from mlip_core.check_book import find_chromium

REPO = Path(__file__).resolve().parents[1]


def test_shipped_settings_name_the_viewer_the_installed_jupytext_registers():
    settings = json.loads(check_lab.SETTINGS_FILE.read_text(encoding="utf-8"))
    assert list(settings) == [check_lab.DOCMANAGER_PLUGIN]
    registered = check_lab.jupytext_viewer()
    assert registered is not None, "no jupyterlab-jupytext lab extension found in jupyter_path('labextensions')"
    assert check_lab.shipped_viewers() == {"python": registered}


def test_jupyterlab_server_merges_the_file_from_overrides_d(tmp_path, monkeypatch):
    from jupyterlab_server.settings_utils import _get_overrides

    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "config"))  # no labconfig of the developer's
    target = tmp_path / "settings" / check_lab.SETTINGS_RELPATH
    target.parent.mkdir(parents=True)
    shutil.copyfile(check_lab.SETTINGS_FILE, target)
    # A user's own overrides.json next to it is still read, and merged with the project's file.
    (tmp_path / "settings" / "overrides.json").write_text(json.dumps(
        {check_lab.DOCMANAGER_PLUGIN: {"defaultViewers": {"markdown": "Jupytext Notebook"}}}))
    overrides, error = _get_overrides(str(tmp_path / "settings"))
    assert not error
    viewers = overrides[check_lab.DOCMANAGER_PLUGIN]["defaultViewers"]
    assert viewers["python"] == check_lab.shipped_viewers()["python"]
    assert viewers["markdown"] == "Jupytext Notebook"


def test_make_lab_installs_the_settings_where_the_venvs_jupyterlab_reads_them(monkeypatch):
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    from jupyterlab.commands import get_app_dir

    monkeypatch.delenv("JUPYTERLAB_DIR", raising=False)
    # LabApp.app_settings_dir defaults to {app_dir}/settings, and app_dir to {sys.prefix}/share/jupyter/lab.
    assert Path(get_app_dir()) == Path(sys.prefix) / "share" / "jupyter" / "lab"
    env = {k: v for k, v in os.environ.items() if k != "JUPYTERLAB_DIR"}
    dry = subprocess.run(["make", "-n", "lab", "VENV=.venv"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    source = check_lab.SETTINGS_FILE.relative_to(REPO).as_posix()
    target = (Path(".venv/share/jupyter/lab/settings") / check_lab.SETTINGS_RELPATH).as_posix()
    assert f"cp {source} {target}" in dry
    launch = next(line for line in dry.splitlines() if "jupyter lab" in line)
    for arg in check_lab.LAB_ARGS:
        assert arg in launch.split()
    for key, value in check_lab.LAB_ENV.items():
        assert f"{key}={value}" in launch.split()


def test_views_are_judged_as_notebook_or_text():
    notebook = check_lab.LabView(True, 1, 5, 6, 0, "python3", str(Path(sys.executable)))
    text = check_lab.LabView(False, 0, 0, 0, 1)
    assert check_lab.problems(notebook, text) == []
    # The setting not taking effect fails, and so does a negative control that shows a notebook.
    assert len(check_lab.problems(text, text)) == 1
    assert "negative control" in check_lab.problems(notebook, notebook)[0]
    elsewhere = check_lab.LabView(True, 1, 5, 6, 0, "python3", "/usr/bin/python3")
    assert "not on the venv's Python" in check_lab.problems(elsewhere, text, venv_bin=Path(sys.executable).parent)[0]


def test_dom_classes_are_counted_on_elements_not_in_inlined_css():
    dom = ('<style>.jp-FileEditor { color: red } .jp-CodeCell {}</style>'
           '<div class="lm-Widget jp-NotebookPanel"><div class="jp-Cell jp-MarkdownCell jp-mod-rendered"></div>'
           '<div class="jp-Cell jp-CodeCell"></div><div class="jp-Cell jp-CodeCell"/></div>')
    counts = check_lab.count_classes(dom)
    assert (counts["jp-NotebookPanel"], counts["jp-MarkdownCell"], counts["jp-CodeCell"],
            counts["jp-FileEditor"]) == (1, 1, 2, 0)


@pytest.mark.timeout(180)
def test_lab_opens_a_chapter_as_a_notebook_and_without_the_setting_as_text():
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium, or set CHROMIUM=...); `make check-lab` installs it")
    if not Path(sys.executable).with_name("jupyter").is_file():
        pytest.skip(f"no jupyter next to {sys.executable}: run the tests from the project's venv")
    positive, negative = check_lab.check(chromium)
    assert check_lab.problems(positive, negative) == []
    assert positive.as_notebook and positive.markdown_cells and positive.code_cells
    assert positive.kernel_name == "python3"
    assert negative.as_text
