"""Shared pytest setup. Dataset fixture-tree builders live in mlip_core/data/fixture_trees.py (the `fixtures`
profile of the book uses them too)."""

from __future__ import annotations

import sys
from pathlib import Path

# Let test modules import the helpers in tests/ (toy_clip, toy_train_run) without a package.
sys.path.insert(0, str(Path(__file__).parent))
