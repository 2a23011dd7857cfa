"""Run the bad-input catalogue and print one row per case: case, component, outcome, message.

    python tests/reliability/report.py        (what `make reliability` runs)

Exits 1 when any case fails its assertion (its row then reads FAIL with the assertion or the exception).
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo (mlip_core) when not installed

from reliability.catalogue import CASES  # noqa: E402


def _one_line(text: str, width: int = 100) -> str:
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder="...")


def main() -> int:
    import logging

    logging.disable(logging.WARNING)  # the trainer's own warnings would interleave with the table
    rows, failed, t0 = [], 0, time.perf_counter()
    for case in CASES:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                message, outcome = case.check(Path(tmp)), case.expect
            except Exception as exc:  # AssertionError or an escaping exception: the case fails
                message, outcome = f"{type(exc).__name__}: {exc}", "FAIL"
                failed += 1
            message = message.replace(str(Path(tmp).resolve()), "<tmp>").replace(tmp, "<tmp>")
        rows.append((case.id, case.component, outcome, f"{time.perf_counter() - start:.1f}", _one_line(message)))
    head = ("case", "component", "outcome", "s", "message (first 100 chars)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths) + ("-" * 25,), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    kinds = {k: sum(r[2] == k for r in rows) for k in ("error", "skip", "ok")}
    print(f"\n{len(rows)} cases: {kinds['error']} error, {kinds['skip']} skip, {kinds['ok']} ok, {failed} FAILED "
          f"({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
