"""Shared pytest setup. Dataset fixture-tree builders live in tests/dataset_fixtures.py."""

from __future__ import annotations

import sys
from pathlib import Path

# Let test modules `import dataset_fixtures` (and other helpers in tests/) without a package.
sys.path.insert(0, str(Path(__file__).parent))
