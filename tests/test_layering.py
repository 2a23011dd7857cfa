"""Package layering: transfer and interpretability code reads exported or checkpointed weights through
:mod:`mlip_core.checkpoint` and never depends on the pretraining engine (:mod:`mlip_core.train`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlip_core"
CONSUMERS = sorted("mlip_core.transfer" + ("" if p.stem == "__init__" else f".{p.stem}")
                   for p in (PACKAGE / "transfer").glob("*.py")) + ["mlip_core.interpret"]


def _source(module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(module: str) -> set[str]:
    """Every ``mlip_core`` module ``module`` imports anywhere in its source, function-level imports included."""
    path = _source(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # ``from mlip_core.x import y`` may name a submodule y or an attribute of x: keep whichever exists.
            names = [f"{base}.{a.name}" if _source(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "mlip_core" and _source(n))
    return found


def test_transfer_and_interpret_never_reach_the_trainer_even_through_function_level_imports():
    for start in CONSUMERS:
        seen, todo, parent = {start}, [start], {start: ""}
        while todo:
            module = todo.pop()
            for dep in _imports(module) - seen:
                seen.add(dep)
                parent[dep] = module
                todo.append(dep)
        if "mlip_core.train" in seen:
            chain, m = [], "mlip_core.train"
            while m:
                chain.append(m)
                m = parent[m]
            raise AssertionError(f"{start} reaches mlip_core.train: {' <- '.join(chain)}")


def test_importing_transfer_and_interpret_does_not_load_the_trainer():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CONSUMERS)
            + "print('mlip_core.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
