"""Counted, reported skips: every row a reader leaves out is recorded here with its reason and file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Skip", "SkipReport"]


@dataclass(frozen=True)
class Skip:
    """One left-out item: what it was (``item``), why (``reason``) and the file that says so (``path``)."""

    reason: str
    item: str
    path: str = ""


@dataclass
class SkipReport:
    """The skips of one reader run plus rows left out by design (``filtered``, e.g. lateral views)."""

    dataset: str
    skips: list[Skip] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)

    def add(self, reason: str, item: object, path: object = "") -> None:
        """Record one skipped item."""
        self.skips.append(Skip(reason, str(item), str(path)))

    def filter(self, reason: str, n: int = 1) -> None:
        """Count ``n`` rows left out on purpose (not an error in the data)."""
        if n:
            self.filtered[reason] += int(n)

    def extend(self, other: SkipReport) -> None:
        """Add another report's skips and filter counts to this one."""
        self.skips.extend(other.skips)
        self.filtered.update(other.filtered)

    def counts(self) -> dict[str, int]:
        """Number of skips per reason, most common first."""
        return dict(Counter(s.reason for s in self.skips).most_common())

    def __len__(self) -> int:
        return len(self.skips)

    def summary(self, max_examples: int = 3) -> str:
        """Human-readable lines: one per reason with a count and a few example items/files."""
        lines = [f"{self.dataset}: {len(self.skips)} skipped"]
        for reason, n in self.counts().items():
            examples = [s for s in self.skips if s.reason == reason][:max_examples]
            shown = ", ".join(f"{s.item} ({s.path})" if s.path else s.item for s in examples)
            lines.append(f"  skip {n:>7d}  {reason}: e.g. {shown}")
        for reason, n in self.filtered.most_common():
            lines.append(f"  filtered {n:>4d}  {reason}")
        return "\n".join(lines)
