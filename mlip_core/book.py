"""Run the book: Jupytext source -> Papermill execution with a profile -> executed notebooks for Jupyter Book.

The same runner serves ``make book`` (profile ``ci``), the test suite (profile ``smoke``) and a user
re-running one chapter, so the book and the tests cannot drift apart::

    python -m mlip_core.book --profile ci --build           # what `make book` does
    python -m mlip_core.book --profile smoke --only 00_quickstart -p seed=1
    python -m mlip_core.book --list

Notebooks are the ``notebooks/...`` entries of ``book/_toc.yml``, in table-of-contents order (a later
chapter may read what an earlier one wrote, e.g. the offline world). Each profile
``book/profiles/<name>.yaml`` maps a notebook name to its Papermill parameters. Executed notebooks
land in ``book/notebooks/`` where Jupyter Book renders them with execution off, so nothing runs twice.

Every chapter the runner executes with a profile's own parameters (no ``-p`` override) has its wall time
recorded in ``book/chapter_times.csv`` (one row per chapter and profile, the latest run, with the machine
it ran on); each chapter opens with its row of that table (:func:`chapter_times`), and ``--list`` prints it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from mlip_core.paths import book_dir as default_book_dir
from mlip_core.paths import notebooks_dir as default_notebooks_dir

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class BookError(RuntimeError):
    """A problem with the book's configuration (profile, table of contents, parameters)."""


class NotebookFailed(RuntimeError):
    """A cell raised while executing a notebook; the message shows the notebook, cell and error."""


@dataclass
class NotebookRun:
    name: str
    seconds: float
    status: str  # "ok" or "failed"
    output: Path


@dataclass
class BookRun:
    profile: str
    runs: list[NotebookRun] = field(default_factory=list)

    def timing_table(self) -> str:
        """A plain-text table of per-notebook wall time."""
        width = max([len(r.name) for r in self.runs] + [8])
        lines = [f"{'notebook':<{width}}  {'status':<6}  {'seconds':>8}", "-" * (width + 18)]
        for r in self.runs:
            lines.append(f"{r.name:<{width}}  {r.status:<6}  {r.seconds:8.1f}")
        total = sum(r.seconds for r in self.runs)
        lines.append("-" * (width + 18))
        lines.append(f"{'total (' + self.profile + ')':<{width}}  {'':<6}  {total:8.1f}")
        return "\n".join(lines)


CHAPTER_TIMES_FILE = "chapter_times.csv"
CHAPTER_TIMES_COLUMNS = ("notebook", "profile", "seconds", "machine", "date")
PROFILE_ORDER = ("smoke", "fixtures", "ci", "gpu", "full")


def machine_description() -> str:
    """What the timings were measured on: CPU cores, and the GPU when ``nvidia-smi`` names one."""
    text = f"{os.cpu_count()} CPU cores"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20, check=True).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            names = []
        names = [n.strip() for n in names if n.strip()]
        if names:
            text += f", {len(names)}× {names[0]}"
    return text


def read_chapter_times(book: Path | None = None) -> list[dict[str, str]]:
    """The rows of ``book/chapter_times.csv`` (none when the file does not exist yet)."""
    path = (book or default_book_dir()) / CHAPTER_TIMES_FILE
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(CHAPTER_TIMES_COLUMNS) - set(rows[0]):
        raise BookError(f"{path}: expected the columns {', '.join(CHAPTER_TIMES_COLUMNS)}; delete the file (the "
                        "runner writes it again) or restore it from git")
    return rows


def record_chapter_times(book: Path, profile: str, runs: list[NotebookRun], machine: str | None = None) -> Path:
    """Replace the rows of ``profile`` for the chapters in ``runs`` (status ok) with their new times."""
    from mlip_core.checkpoint import atomic_write

    machine = machine or machine_description()
    today = date.today().isoformat()
    fresh = {r.name: r for r in runs if r.status == "ok"}
    rows = [row for row in read_chapter_times(book) if not (row["profile"] == profile and row["notebook"] in fresh)]
    rows += [{"notebook": r.name, "profile": profile, "seconds": f"{r.seconds:.1f}", "machine": machine,
              "date": today} for r in fresh.values()]
    toc = {name: i for i, name in enumerate(toc_notebooks(book))}
    rank = {name: i for i, name in enumerate(PROFILE_ORDER)}
    rows.sort(key=lambda row: (toc.get(row["notebook"], len(toc)), rank.get(row["profile"], len(rank)),
                               row["profile"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CHAPTER_TIMES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(book / CHAPTER_TIMES_FILE, lambda fh: fh.write(buffer.getvalue()), mode="w")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def chapter_times(notebook: str, book: Path | None = None) -> str:
    """A Markdown table of ``notebook``'s last measured wall time with each profile, as the runner recorded
    it, for a chapter's opening (``IPython.display.Markdown(chapter_times(...))``)."""
    rows = [row for row in read_chapter_times(book) if row["notebook"] == notebook]
    if not rows:
        return (f"*No time recorded yet for `{notebook}`: the runner (`python -m mlip_core.book`) records one "
                "each time it executes the chapter with a profile.*")
    lines = ["| profile | time | machine | measured |", "|---|---:|---|---|"]
    lines += [f"| `{row['profile']}` | {_duration(float(row['seconds']))} | {row['machine']} | {row['date']} |"
              for row in rows]
    missing = [p for p in PROFILE_ORDER if p not in {row["profile"] for row in rows}]
    if missing:
        lines.append("")
        lines.append("Not measured yet: " + ", ".join(f"`{p}`" for p in missing) + ".")
    return "\n".join(lines)


# The chapters' parameters that point at real data (the ``full`` profile sets them), each with what an empty
# value means, for the runner's report.
OFFLINE = "the offline world"
REAL_DATA_PARAMETERS = {
    "mimic_root": f"{OFFLINE} instead of MIMIC-CXR-JPG",
    "mimic_reports_root": "the reports are looked for under mimic_root",
    "pretrained_run": "the chapter trains its own runs",
    "chexpert_root": f"{OFFLINE} instead of CheXpert",
    "covidx_root": f"{OFFLINE} instead of COVIDx",
    "siim_root": f"{OFFLINE} instead of SIIM-ACR Pneumothorax",
    "rsna_root": f"{OFFLINE} instead of RSNA Pneumonia",
    "object_cxr_root": f"{OFFLINE} instead of Object-CXR",
}


def real_data_report(plan: list[tuple[str, dict[str, Any], dict[str, Parameter]]]) -> list[str]:
    """One line per chapter that declares real-data parameters: what each reads, or what it does instead."""
    lines = []
    for name, params, declared in plan:
        parts = []
        for key, empty_means in REAL_DATA_PARAMETERS.items():
            if key not in declared:
                continue
            value = params.get(key, declared[key].default.strip("'\""))
            parts.append(f"{key}={value}" if value else f"{key} empty ({empty_means})")
        if parts:
            lines.append(f"{name}: " + "; ".join(parts))
    return lines


def available_profiles(book: Path) -> list[str]:
    """Profile names found in ``book/profiles/*.yaml``."""
    return sorted(p.stem for p in (book / "profiles").glob("*.yaml"))


def load_profile(book: Path, profile: str, _seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Parameters per notebook for ``profile``; a bad name lists the valid ones. A profile that starts with
    ``extends: OTHER`` holds only what differs from OTHER (``fixtures`` is ``smoke`` with real-data roots)."""
    path = book / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        valid = ", ".join(available_profiles(book)) or "(none found)"
        raise BookError(f"unknown profile {profile!r}: no file {path}. Valid profiles: {valid}; "
                       "use one of them with --profile")
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("extends", None) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise BookError(f"{path}: expected a mapping 'notebook_name: {{param: value, ...}}' at the top level")
    own = {name: dict(params or {}) for name, params in data.items()}
    if parent is None:
        return own
    if not isinstance(parent, str) or parent in (*_seen, profile):
        raise BookError(f"{path}: 'extends: {parent}' must name another profile, without a cycle")
    merged = load_profile(book, parent, (*_seen, profile))
    for name, params in own.items():
        merged[name] = {**merged.get(name, {}), **params}
    return merged


FIXTURE_TREES = "{fixture_trees}"  # in a profile value: the folder of the real-format fixture trees


def resolve_fixture_trees(params: dict[str, dict[str, Any]], folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """Replace ``{fixture_trees}`` in the profile's string values with ``folder`` (default
    ``workspace/fixture_trees``), writing the trees there first (:func:`mlip_core.data.fixture_trees.
    ensure_fixture_trees`) when a value names them."""
    if not any(isinstance(v, str) and FIXTURE_TREES in v for block in params.values() for v in block.values()):
        return params
    from mlip_core.data.fixture_trees import ensure_fixture_trees
    from mlip_core.paths import workspace

    folder = Path(folder) if folder is not None else workspace("fixture_trees", create=False)
    ensure_fixture_trees(folder)
    return {name: {k: v.replace(FIXTURE_TREES, str(folder)) if isinstance(v, str) else v for k, v in block.items()}
            for name, block in params.items()}


def toc_notebooks(book: Path) -> list[str]:
    """Notebook names (``notebooks/NAME`` entries of ``_toc.yml``) in table-of-contents order."""
    toc_path = book / "_toc.yml"
    if not toc_path.is_file():
        raise BookError(f"no table of contents at {toc_path}")
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            entry = node.get("file")
            if isinstance(entry, str) and entry.startswith("notebooks/"):
                names.append(Path(entry).name.removesuffix(".ipynb").removesuffix(".py"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc_path.read_text()))
    return names


def parse_overrides(pairs: list[str]) -> dict[str | None, dict[str, Any]]:
    """``key=value`` (every selected notebook that declares ``key``) or ``notebook:key=value``.

    Values are parsed as YAML scalars, so ``-p epochs=3 -p use_gpu=false`` give an int and a bool.
    """
    out: dict[str | None, dict[str, Any]] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BookError(f"override {pair!r} is not key=value (or notebook:key=value)")
        key, raw = pair.split("=", 1)
        notebook, _, name = key.rpartition(":")
        out.setdefault(notebook or None, {})[name.strip()] = yaml.safe_load(raw)
    return out


def _override_texts(pairs: list[str]) -> dict[tuple[str | None, str], str]:
    """The text after ``=`` of each override: a str parameter takes it verbatim (``-p seeds=0`` means "0")."""
    texts: dict[tuple[str | None, str], str] = {}
    for pair in pairs:
        key, raw = pair.split("=", 1)
        notebook, _, name = key.rpartition(":")
        texts[(notebook or None, name.strip())] = raw
    return texts


PARAMETER_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Parameter:
    """One name assigned in a notebook's ``parameters`` cell.

    ``type`` is the annotation when it is ``bool``/``int``/``float``/``str``, otherwise the type of a
    literal default of one of those types; ``None`` (not checked) for anything else, e.g. ``x = None``.
    ``default`` is the default as written in the cell.
    """

    name: str
    type: type | None
    default: str


def parse_parameters_cell(source: str, where: str = "parameters cell") -> dict[str, Parameter]:
    """The names a ``parameters`` cell assigns at top level, parsed with :mod:`ast`.

    Comments never matter (``image_size = 64  # 1.6x faster than size=96`` declares ``image_size``),
    nor do multi-line values; IPython magics are turned into Python first, as the kernel would.
    """
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        source = TransformerManager().transform_cell(source)
    except Exception:  # no IPython, or a cell it cannot transform: parse the text as it is
        pass
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise BookError(f"{where}: the parameters cell is not valid Python (line {err.lineno}: {err.msg})") from None
    declared: dict[str, Parameter] = {}

    def declare(target: ast.expr, value: ast.expr | None, annotation: ast.expr | None) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):  # a, b = 1, 2: names only
            for element in target.elts:
                declare(element, None, None)
            return
        if not isinstance(target, ast.Name):
            return
        kind: type | None = None
        if isinstance(annotation, ast.Name):
            kind = PARAMETER_TYPES.get(annotation.id)
        elif isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            kind = PARAMETER_TYPES.get(annotation.value.strip())
        default = ""
        if value is not None:
            default = ast.get_source_segment(source, value) or ast.unparse(value)
            if kind is None:
                try:
                    literal = ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    literal = None
                if type(literal) in PARAMETER_TYPES.values():
                    kind = type(literal)
        declared[target.id] = Parameter(target.id, kind, default)

    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                declare(target, node.value, None)
        elif isinstance(node, ast.AnnAssign):
            declare(node.target, node.value, node.annotation)
    return declared


def declared_parameters(nb_path: Path) -> dict[str, Parameter]:
    """Names declared in the notebook's ``parameters`` cell (see :func:`parse_parameters_cell`).

    Papermill's own inference (``papermill.inspect_notebook``) reads the cell with a regular
    expression and drops any line whose comment contains ``=``; :mod:`ast` has no such blind spot.
    """
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise BookError(f"{nb_path}: no cell tagged 'parameters'")
    return parse_parameters_cell(cells[0].source, where=str(nb_path))


def _parameters_source(source: Path) -> str:
    """The source of the ``parameters`` cell of a percent-format ``.py`` (empty when it has none)."""
    import jupytext

    cells = [c for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", [])]
    return cells[0].source if cells else ""


def to_ipynb(source: Path, target: Path) -> None:
    """Convert a percent-format ``.py`` into an ``.ipynb`` with the book's kernel."""
    import jupytext

    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        raise BookError(f"{source}: no cell tagged 'parameters'; add `# %% tags=[\"parameters\"]` above the defaults")
    target.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(nb, target, fmt="ipynb")


def check_parameters(name: str, params: dict[str, Any], declared: dict[str, Any]) -> None:
    """Every parameter a profile or override sets must be declared by the notebook's parameters cell."""
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise BookError(
            f"notebook {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters cell declares: {', '.join(sorted(declared)) or '(nothing)'}. Use one of those names in "
            "the profile or -p override, or add the parameter to the notebook's parameters cell"
        )


def type_error(notebook: str, key: str, value: Any, parameter: Parameter, origin: str) -> str | None:
    """Why ``value`` does not fit ``parameter``'s declared type (``None`` when it does).

    bool, int, float and str are checked; an int is accepted for a float; a parameter whose
    default is not a literal of one of those types (``None``, a list, a call) is not checked.
    """
    kind = parameter.type
    if kind is None:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    got = "nothing (null)" if value is None else f"{value!r} ({type(value).__name__})"
    return (
        f"notebook {notebook!r}: parameter {key!r} is declared as {kind.__name__} "
        f"(default {parameter.default}), but {origin} gives {got}"
    )


# The kernel's environment: results in the pages, not progress bars. tqdm (>= 4.66) reads TQDM_DISABLE
# as the default of every bar it creates, libraries' included (Hugging Face downloads); a call that passes
# ``disable=`` itself keeps its own choice (so mlip_core.train passes it only to switch a bar off). The
# warning filter drops tqdm.auto's "IProgress not found" (ipywidgets is not installed, nothing is
# interactive in a rendered page). The runner's own terminal keeps its per-notebook log and timings.
KERNEL_ENV = {
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore:IProgress not found",
}


def _kernel_manager_class():
    """An ``AsyncKernelManager`` for unattended runs: the book's kernel environment, IPC sockets and a
    quiet shutdown.

    jupyter_client sends SIGINT to the kernel's process group before every shutdown (to stop a running
    cell). After a successful notebook nothing is running, so the signal only makes ipykernel log
    ``ERROR | KeyboardInterrupt caught in kernel`` when it lands while a message is being handled; the
    shutdown request on the control channel (then SIGTERM, then SIGKILL) stops the kernel without it.
    IPC transport (local sockets, Linux/macOS) replaces loopback TCP and ipykernel's "running over TCP
    without encryption" warning.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class BookKernelManager(AsyncKernelManager):
        _socket_dir = ""

        @default("transport")
        def _book_transport(self) -> str:
            return "ipc" if os.name == "posix" else "tcp"

        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            env = dict(kw.pop("env", None) or os.environ)
            env.update(KERNEL_ENV)
            existing = os.environ.get("PYTHONWARNINGS")
            if existing:
                env["PYTHONWARNINGS"] = f"{existing},{KERNEL_ENV['PYTHONWARNINGS']}"
            if self.transport == "ipc" and not self._socket_dir:
                # absolute socket paths of its own: jupyter_client's default is relative to the cwd
                self._socket_dir = tempfile.mkdtemp(prefix="mlip-kernel-")
                self.ip = os.path.join(self._socket_dir, "kernel")
            await super().start_kernel(env=env, **kw)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart and self._socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = ""

        cleanup_resources = _async_cleanup_resources

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

        interrupt_kernel = _async_interrupt_kernel

    return BookKernelManager


def execute(name: str, unexecuted: Path, params: dict[str, Any], out_dir: Path, cwd: Path,
            timeout: float | None = None) -> Path:
    """Execute one converted notebook with Papermill; raise :class:`NotebookFailed` showing the failing cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = out_dir / f"{name}.ipynb"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            str(unexecuted),
            str(output),
            parameters=params,
            kernel_name="python3",
            cwd=str(cwd),
            progress_bar=sys.stderr.isatty(),  # cells of this notebook, in the terminal only
            kernel_manager_class=_kernel_manager_class(),
            request_save_on_cell_execute=False,
            execution_timeout=timeout,
        )
    except PapermillExecutionError as err:
        source_lines = "\n".join(f"    {line}" for line in (err.source or "").splitlines())
        trace = ANSI_ESCAPE.sub("", "\n".join(err.traceback or []))
        raise NotebookFailed(
            f"notebook {name!r} failed in cell {err.cell_index} (In [{err.exec_count}]):\n"
            f"{source_lines}\n{err.ename}: {err.evalue}\n{trace}\n"
            f"(partially executed notebook: {output})"
        ) from None
    return output


def run_book(
    profile: str,
    only: list[str] | None = None,
    overrides: list[str] | None = None,
    out_dir: Path | None = None,
    book: Path | None = None,
    notebooks: Path | None = None,
    timeout: float | None = None,
    log=print,
    record_times: bool = True,
) -> BookRun:
    """Execute the selected notebooks (default: all, in toc order) and return their timings.

    Every notebook's parameters are checked before the first one runs, so a typo in a profile fails
    in seconds, not after an hour. Stops at the first failing notebook (raising
    :class:`NotebookFailed`): later chapters depend on what earlier ones wrote. With ``record_times``
    and no overrides, each chapter's time is written to ``book/chapter_times.csv`` as soon as it finishes.
    """
    book = book or default_book_dir()
    notebooks = notebooks or default_notebooks_dir()
    out_dir = out_dir or book / "notebooks"
    profile_params = resolve_fixture_trees(load_profile(book, profile))
    all_names = toc_notebooks(book)
    stray = sorted(set(profile_params) - set(all_names))
    if stray:
        raise BookError(f"profile {profile!r} names notebook(s) not in the table of contents: {', '.join(stray)}")
    names = all_names
    if only:
        missing = [n for n in only if n not in all_names]
        if missing:
            raise BookError(f"not in {book / '_toc.yml'}: {', '.join(missing)}. Notebooks: {', '.join(all_names)}")
        names = [n for n in all_names if n in only]
    parsed = parse_overrides(overrides or [])
    for target in parsed:
        if target is not None and target not in names:
            raise BookError(f"override for {target!r}, which is not among the selected notebooks: {', '.join(names)}")

    texts = _override_texts(overrides or [])
    profile_file = book / "profiles" / f"{profile}.yaml"

    result = BookRun(profile=profile)
    with tempfile.TemporaryDirectory() as tmp:
        plan: list[tuple[str, Path, dict[str, Any]]] = []
        declared_by: dict[str, dict[str, Parameter]] = {}
        used_globals: set[str] = set()
        type_errors: list[str] = []
        for name in names:
            source = notebooks / f"{name}.py"
            if not source.is_file():
                raise BookError(f"notebook {name!r} is in the table of contents but {source} does not exist")
            unexecuted = Path(tmp) / f"{name}.ipynb"
            to_ipynb(source, unexecuted)
            declared = declared_parameters(unexecuted)
            params = {**profile_params.get(name, {}), **parsed.get(name, {})}
            check_parameters(name, params, declared)
            origins = {key: f"profile {profile!r} ({profile_file})" for key in profile_params.get(name, {})}
            origins.update({key: (name, key) for key in parsed.get(name, {})})
            for key, value in parsed.get(None, {}).items():
                if key in declared:
                    params[key] = value
                    origins[key] = (None, key)
                    used_globals.add(key)
            for key, value in params.items():
                origin = origins[key]
                if isinstance(origin, tuple):  # a -p override: a str parameter takes its text verbatim
                    text = texts[origin]
                    if declared[key].type is str and not isinstance(value, str):
                        params[key] = value = text
                    origin = f"-p {'' if origin[0] is None else origin[0] + ':'}{key}={text}"
                problem = type_error(name, key, value, declared[key], origin)
                if problem:
                    type_errors.append(problem)
            plan.append((name, unexecuted, params))
            declared_by[name] = declared
        unused = sorted(set(parsed.get(None, {})) - used_globals)
        if unused:
            raise BookError(f"no selected notebook declares parameter(s) {', '.join(unused)}")
        if type_errors:
            raise BookError("parameter(s) of the wrong type, nothing was run:\n  " + "\n  ".join(type_errors)
                           + "\npass values of the declared types (in the profile or with -p KEY=VALUE)")
        missing_roots = [f"{name}: {key}={path}" for name, _, params in plan for key in REAL_DATA_PARAMETERS
                         if key in declared_by[name] and params.get(key)
                         for path in str(params[key]).split(",") if path.strip() and not Path(path.strip()).exists()]
        if missing_roots:
            raise BookError("real-data folder(s) that do not exist, nothing was run:\n  " + "\n  ".join(missing_roots)
                            + "\nfix the path (in the profile or with -p KEY=VALUE), or leave it empty for the "
                            "offline world")
        real = real_data_report([(name, params, declared_by[name]) for name, _, params in plan])
        if real and (profile == "full" or any("=" in line for line in real)):
            log("[book] real data, before the first chapter runs:\n  " + "\n  ".join(real))

        for name, unexecuted, params in plan:
            log(f"[book] {name}: profile={profile} {params}")
            start = time.perf_counter()
            try:
                output = execute(name, unexecuted, params, out_dir, notebooks, timeout)
            except NotebookFailed:
                result.runs.append(NotebookRun(name, time.perf_counter() - start, "failed", out_dir / f"{name}.ipynb"))
                log(result.timing_table())
                raise
            result.runs.append(NotebookRun(name, time.perf_counter() - start, "ok", output))
            if record_times and not overrides:  # a -p override changes what the time measures
                record_chapter_times(book, profile, result.runs[-1:])
    return result


def times_table(book: Path) -> str:
    """Plain text: each chapter's last recorded time per profile (``book/chapter_times.csv``)."""
    rows = read_chapter_times(book)
    profiles = [p for p in PROFILE_ORDER if any(r["profile"] == p for r in rows)]
    profiles += sorted({r["profile"] for r in rows} - set(profiles))
    if not rows:
        return f"chapter times: none recorded yet ({book / CHAPTER_TIMES_FILE})"
    seconds = {(r["notebook"], r["profile"]): float(r["seconds"]) for r in rows}
    names = toc_notebooks(book)
    width = max(len(n) for n in names + ["notebook"])
    lines = [f"last recorded time per chapter and profile ({book / CHAPTER_TIMES_FILE}):",
             f"{'notebook':<{width}}" + "".join(f"  {p:>12}" for p in profiles)]
    for name in names:
        cells = [_duration(seconds[(name, p)]) if (name, p) in seconds else "-" for p in profiles]
        lines.append(f"{name:<{width}}" + "".join(f"  {c:>12}" for c in cells))
    machines = sorted({f"{r['profile']}: {r['machine']}" for r in rows})
    lines.append("measured on " + "; ".join(machines))
    return "\n".join(lines)


def build_html(book: Path | None = None) -> Path:
    """Render the executed notebooks with Jupyter Book 1 (execution is off in ``_config.yml``)."""
    book = book or default_book_dir()
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(book)]
    subprocess.run(cmd, check=True)
    index = book / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BookError(f"jupyter-book finished but {index} is missing")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlip_core.book", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="ci", help="parameter profile: book/profiles/<profile>.yaml")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks (toc order kept)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter (KEY=VALUE or NOTEBOOK:KEY=VALUE); repeatable")
    parser.add_argument("--out", type=Path, help="where executed notebooks go (default: book/notebooks)")
    parser.add_argument("--timeout", type=float, help="per-cell timeout in seconds")
    parser.add_argument("--build", action="store_true", help="build the HTML book after executing")
    parser.add_argument("--list", action="store_true", help="list the notebooks and profiles, then exit")
    parser.add_argument("--book-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--notebooks-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    book = args.book_dir or default_book_dir()
    try:
        if args.list:
            print("notebooks:", " ".join(toc_notebooks(book)))
            print("profiles:", " ".join(available_profiles(book)))
            print(times_table(book))
            notebooks_dir = args.notebooks_dir or default_notebooks_dir()
            listed = []
            for name in toc_notebooks(book):
                declared = parse_parameters_cell(_parameters_source(notebooks_dir / f"{name}.py"), name)
                listed.append((name, {}, declared))
            lines = real_data_report(listed)
            print("real-data parameters, as the parameters cells declare them (set them in a profile or with -p):")
            print("\n".join(f"  {line}" for line in lines) if lines else "  (none declared)")
            return 0
        result = run_book(args.profile, args.only, args.param, args.out, book, args.notebooks_dir, args.timeout)
        print(result.timing_table())
        if args.build:
            print(f"[book] HTML: {build_html(book)}")
    except BookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NotebookFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
