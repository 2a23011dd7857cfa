"""Where things live: the repository, the workspace that runs write to, and the book."""

from __future__ import annotations

import os
from pathlib import Path

WORKSPACE_ENV = "MLIP_WORKSPACE"


def repo_root() -> Path:
    """The repository checkout that holds this package (``mlip_core/..``)."""
    return Path(__file__).resolve().parent.parent


def workspace(*parts: str, create: bool = True) -> Path:
    """A folder for generated data, caches, checkpoints and runs.

    ``$MLIP_WORKSPACE`` when set (the test suite points it at a temporary folder so that a
    smoke run never touches the book's data), else ``<repo>/workspace`` (git-ignored).
    """
    base = os.environ.get(WORKSPACE_ENV)
    root = Path(base).expanduser() if base else repo_root() / "workspace"
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def book_dir() -> Path:
    """The Jupyter Book source folder (``_config.yml``, ``_toc.yml``, ``profiles/``)."""
    return repo_root() / "book"


def notebooks_dir() -> Path:
    """The percent-format notebook sources."""
    return repo_root() / "notebooks"
