"""Check that ``make lab`` opens a chapter as a notebook, in a real browser: ``python -m mlip_core.check_lab``.

JupyterLab 4 with Jupytext >= 1.16 opens a ``.py`` file with its default viewer, the text editor,
unless ``defaultViewers`` of ``@jupyterlab/docmanager-extension:plugin`` maps the ``python`` file
type to the viewer Jupytext's lab extension registers ("Jupytext Notebook"). The project ships that
default as ``jupyter/lab/settings/overrides.d/mlip-book.json``; ``make lab`` copies it into the
venv's JupyterLab application settings (``.venv/share/jupyter/lab/settings/overrides.d/``), where
jupyterlab_server merges every ``overrides.d/*.json`` before the singleton ``overrides.json`` (left
to the user). It is a default, not a user setting: Settings > Document Manager and "Open With"
still win.

The check runs the lab twice, the way ``make lab`` starts it (``LAB_ARGS``: root in ``notebooks/``,
``JUPYTER_PREFER_ENV_PATH=1``), on a port the OS picks, with a random token, no browser, and HOME,
the Jupyter config/data/runtime folders, the user settings and the workspaces in a temporary folder
so that nothing of the developer's own setup counts; the application settings folder is a temporary
one too, holding the project's file or nothing:

* with the project's settings, ``/lab/tree/00_quickstart.py`` must show a notebook panel with
  markdown cells (``.jp-MarkdownCell``) and code cells (``.jp-CodeCell``) and no ``.jp-FileEditor``,
  and the kernel the page starts must run on the venv's Python (read from ``/proc``, Linux only);
* without them (the negative control, so the check can fail), the same URL must open the file editor.

How: ``chromium --headless=new --virtual-time-budget=… --dump-dom URL`` (as ``check_book`` drives it)
runs JupyterLab's JavaScript and prints the final DOM; virtual time stands still while requests are
pending, so a slow server only costs wall time. The classes of the DOM's elements are counted (the
inlined CSS names the same classes, so a plain text search would not do). A load that shows no
document yet is retried with a longer budget. The two runs go side by side (two servers, at most two
Chromium processes, as ``check_book``). Each server runs in its own process group, which is
terminated (kernel included) whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from mlip_core.check_book import find_chromium

REPO = Path(__file__).resolve().parents[1]
SETTINGS_FILE = REPO / "jupyter" / "lab" / "settings" / "overrides.d" / "mlip-book.json"
# Where the file goes under JupyterLab's application settings folder ({app_dir}/settings).
SETTINGS_RELPATH = Path("overrides.d") / SETTINGS_FILE.name
DOCMANAGER_PLUGIN = "@jupyterlab/docmanager-extension:plugin"
# What `make lab` passes and sets (tests/test_lab.py pins these against `make -n lab`).
LAB_ARGS = ("--notebook-dir=notebooks",)
LAB_ENV = {"JUPYTER_PREFER_ENV_PATH": "1"}
CHAPTER = "00_quickstart.py"
COUNTED = ("jp-NotebookPanel", "jp-MarkdownCell", "jp-CodeCell", "jp-FileEditor")


@dataclass
class LabView:
    """What the browser showed for the chapter, and the kernel the page started."""

    with_settings: bool
    notebook_panels: int
    markdown_cells: int
    code_cells: int
    file_editors: int
    kernel_name: str | None = None
    kernel_python: str | None = None  # argv[0] of the kernel process; None when no kernel or no /proc
    seconds: float = 0.0

    @property
    def as_notebook(self) -> bool:
        return self.notebook_panels > 0 and self.markdown_cells > 0 and self.code_cells > 0 and not self.file_editors

    @property
    def as_text(self) -> bool:
        return self.file_editors > 0 and not (self.notebook_panels or self.markdown_cells or self.code_cells)


# ----------------------------------------------------------------------------- the project's setting
def jupytext_viewer() -> str | None:
    """The viewer (widget factory) name the installed jupyterlab-jupytext extension registers."""
    from jupyter_core.paths import jupyter_path

    for root in jupyter_path("labextensions"):
        for js in sorted((Path(root) / "jupyterlab-jupytext" / "static").glob("*.js")):
            m = re.search(r'\bFACTORY\s*=\s*"([^"]+)"', js.read_text(encoding="utf-8", errors="replace"))
            if m:
                return m.group(1)
    return None


def shipped_viewers(path: Path = SETTINGS_FILE) -> dict[str, str]:
    """The ``defaultViewers`` the project's settings file sets (file type -> viewer)."""
    return json.loads(path.read_text(encoding="utf-8"))[DOCMANAGER_PLUGIN]["defaultViewers"]


def expected_cells(chapter: Path) -> Counter:
    """Cell types of a chapter as Jupytext reads it: {'markdown': n, 'code': m}."""
    import jupytext

    return Counter(cell.cell_type for cell in jupytext.read(chapter).cells)


# ----------------------------------------------------------------------------- the server
class _Server:
    """``jupyter lab`` as ``make lab`` starts it, isolated in ``home``; a context manager."""

    def __init__(self, home: Path, app_settings: Path, jupyter: Path, timeout_s: float):
        self.home, self.app_settings, self.jupyter, self.timeout_s = home, app_settings, jupyter, timeout_s
        self.token = secrets.token_hex(16)
        self.runtime = home / "runtime"
        self.log = home / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "_Server":
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("JUPYTER", "JPY_")) and k != "BROWSER"}
        env.update(LAB_ENV)
        env.update(HOME=str(self.home), JUPYTER_CONFIG_DIR=str(self.home / ".jupyter"),
                   JUPYTER_DATA_DIR=str(self.home / "data"), JUPYTER_RUNTIME_DIR=str(self.runtime),
                   JUPYTERLAB_SETTINGS_DIR=str(self.home / "user-settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"))
        cmd = [str(self.jupyter), "lab", *LAB_ARGS, "--no-browser", "--ServerApp.ip=127.0.0.1",
               "--ServerApp.port=0", f"--IdentityProvider.token={self.token}",
               f"--LabApp.app_settings_dir={self.app_settings}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_port(self) -> int:
        info = self.runtime / f"jpserver-{self.proc.pid}.json"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if info.is_file():
                try:
                    self.port = json.loads(info.read_text(encoding="utf-8"))["port"]
                    self.get("api/status")
                    return self.port
                except (ValueError, KeyError, OSError):
                    pass  # the file is being written, or the server is not listening yet
            time.sleep(0.2)
        raise RuntimeError(f"jupyter lab did not start in {self.timeout_s:.0f} s:\n{self.log_tail()}")

    def get(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self.proc is None or (self.proc.poll() is not None and not _group_alive(self.proc.pid)):
            return
        # SIGTERM lets the server shut its kernels down; the group signal reaches any it left behind.
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(self.proc.pid):
                break
            time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kernel_python(kernel_id: str) -> str | None:
    """argv[0] of the process running kernel ``kernel_id`` (its connection file names the id)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(f"kernel-{kernel_id}.json".encode() in arg for arg in argv):
            return argv[0].decode(errors="replace")
    return None


# ----------------------------------------------------------------------------- the browser
class _ClassCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.counts: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        self.counts.update(c for c in COUNTED if c in classes)

    handle_startendtag = handle_starttag


def dump_dom(url: str, chromium: str, budget_ms: int, timeout_s: float) -> str:
    """The DOM of ``url`` after ``budget_ms`` of virtual time in headless Chromium."""
    with tempfile.TemporaryDirectory(prefix="check-lab-chromium-") as profile:
        cmd = [
            chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
            "--mute-audio", "--window-size=1280,1024", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              encoding="utf-8", errors="replace")
    if not proc.stdout.strip():
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"no DOM from chromium ({tail[0][:200]})")
    return proc.stdout


def count_classes(dom: str) -> Counter:
    parser = _ClassCounter()
    parser.feed(dom)
    return parser.counts


def open_chapter(with_settings: bool, chromium: str, chapter: str = CHAPTER, budget_ms: int = 15000,
                 tries: int = 3, timeout_s: float = 60) -> LabView:
    """Start the lab with or without the project's settings, open ``chapter`` in Chromium, report what showed."""
    start = time.monotonic()
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.is_file():
        raise FileNotFoundError(f"no {jupyter} (run from the project's venv: .venv/bin/python -m mlip_core.check_lab)")
    with tempfile.TemporaryDirectory(prefix="check-lab-") as tmp:
        home, app_settings = Path(tmp) / "home", Path(tmp) / "app-settings"
        home.mkdir()
        app_settings.mkdir()
        if with_settings:
            (app_settings / SETTINGS_RELPATH).parent.mkdir(parents=True)
            shutil.copyfile(SETTINGS_FILE, app_settings / SETTINGS_RELPATH)
        with _Server(home, app_settings, jupyter, timeout_s) as server:
            for attempt in range(tries):
                counts = count_classes(dump_dom(server.url(f"lab/tree/{chapter}"), chromium,
                                                budget_ms * (attempt + 1), timeout_s))
                if counts["jp-NotebookPanel"] or counts["jp-FileEditor"]:
                    break
            view = LabView(with_settings, counts["jp-NotebookPanel"], counts["jp-MarkdownCell"],
                           counts["jp-CodeCell"], counts["jp-FileEditor"])
            if view.notebook_panels:
                _find_kernel(server, chapter, view, deadline=time.monotonic() + 20)
    view.seconds = time.monotonic() - start
    return view


def _find_kernel(server: _Server, chapter: str, view: LabView, deadline: float) -> None:
    while time.monotonic() < deadline:
        kernels = [s["kernel"] for s in server.get("api/sessions")
                   if s.get("path") == chapter and s.get("kernel")]
        if kernels:
            view.kernel_name = kernels[0]["name"]
            view.kernel_python = _kernel_python(kernels[0]["id"])
            if view.kernel_python or not Path("/proc").is_dir():
                return
        time.sleep(0.5)


def check(chromium: str, chapter: str = CHAPTER) -> tuple[LabView, LabView]:
    """The chapter opened with the project's settings and without them (two servers, side by side)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        positive, negative = pool.map(lambda with_settings: open_chapter(with_settings, chromium, chapter),
                                      (True, False))
    return positive, negative


# ----------------------------------------------------------------------------- judging
def problems(positive: LabView, negative: LabView, chapter: str = CHAPTER,
             venv_bin: Path | None = None) -> list[str]:
    """What is wrong with the two views (empty: the check passes)."""
    venv_bin = (venv_bin or Path(sys.executable).parent).resolve()
    found = []
    if not positive.as_notebook:
        found.append(f"with the project's settings {chapter} did not open as a notebook ({describe(positive)})")
    if positive.notebook_panels and positive.kernel_name is None:
        found.append("the notebook started no kernel")
    elif positive.kernel_python is not None and Path(positive.kernel_python).parent.resolve() != venv_bin:
        found.append(f"the kernel runs on {positive.kernel_python}, not on the venv's Python in {venv_bin}")
    if not negative.as_text:
        found.append(f"negative control: without the settings {chapter} did not open in the file editor "
                     f"({describe(negative)}), so the check cannot tell the setting works")
    return found


def describe(view: LabView) -> str:
    if view.as_notebook:
        text = f"a notebook: {view.markdown_cells} markdown and {view.code_cells} code cells"
        if view.kernel_name:
            text += f", kernel {view.kernel_name} on {view.kernel_python or '(process not found)'}"
        return text
    if view.as_text:
        return "the file editor (text)"
    return (f"neither: {view.notebook_panels} notebook panels, {view.markdown_cells} markdown cells, "
            f"{view.code_cells} code cells, {view.file_editors} file editors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM or chromium on PATH)")
    ap.add_argument("--chapter", default=CHAPTER, help="the chapter to open, relative to notebooks/")
    args = ap.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check-lab: no Chromium found (apt-get install -y chromium, or set CHROMIUM=...)", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        positive, negative = check(chromium, args.chapter)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"check-lab: {exc}", file=sys.stderr)
        return 1
    want = expected_cells(REPO / "notebooks" / args.chapter)
    print(f"with {SETTINGS_FILE.relative_to(REPO)}: {args.chapter} opened as {describe(positive)} "
          f"(the chapter has {want['markdown']} + {want['code']}; {positive.seconds:.1f} s)")
    print(f"without it (negative control): {describe(negative)} ({negative.seconds:.1f} s)")
    found = problems(positive, negative, args.chapter)
    for problem in found:
        print(f"check-lab: {problem}")
    if not found:
        print(f"check-lab: ok ({time.monotonic() - start:.1f} s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
