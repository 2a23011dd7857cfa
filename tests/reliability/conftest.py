"""Make tests/ importable (toy_clip, toy_train_run) for the catalogue, as tests/conftest.py does."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
