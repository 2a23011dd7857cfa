"""The short header every chapter opens with (as in the UvA DL notebooks): seed, device, figure style;
and the guard that keeps credentialed data's images and report text out of a chapter's outputs."""

from __future__ import annotations

import torch

from mlip_core.repro import default_device, seed_everything


def setup(seed: int = 0, deterministic: bool = False, threads: int | None = None) -> torch.device:
    """Seed everything, fix figure style and format, optionally cap torch threads; return the device."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    seed_everything(seed, deterministic=deterministic)
    if threads:
        torch.set_num_threads(threads)
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 120, "figure.autolayout": True})
    try:  # crisp inline figures in Jupyter; a no-op outside IPython
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except ImportError:
        pass
    return default_device()


def examples_allowed(publish_examples: bool, **roots: str | None) -> bool:
    """True when every dataset root is empty (the offline worlds, free to show) or ``publish_examples`` is set.

    ``roots`` are a chapter's real-data parameters by name (``mimic_root=mimic_root``); a set one means the
    chapter reads data whose agreement forbids redistribution, so its images and report text stay out of the page.
    """
    return bool(publish_examples) or not any(root is not None and str(root).strip() for root in roots.values())


def withheld_line(dataset: str, **roots: str | None) -> str:
    """The one line a chapter prints in place of examples it withholds from ``dataset``."""
    named = ", ".join(name for name, root in roots.items() if root is not None and str(root).strip())
    return (f"examples withheld: {dataset} is data under a use agreement ({named} set); set publish_examples=True "
            "only where its data-use agreement allows redistribution")


def show_examples(dataset: str, publish_examples: bool, **roots: str | None) -> bool:
    """:func:`examples_allowed`, printing :func:`withheld_line` when it is False; guards a chapter's example cells."""
    allowed = examples_allowed(publish_examples, **roots)
    if not allowed:
        print(withheld_line(dataset, **roots))
    return allowed


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (header from the first row's keys) for ``IPython.display.Markdown``: unlike a DataFrame's
    HTML, its cells keep Markdown such as *emphasis*. Pipes inside cells are escaped."""
    if not rows:
        return ""
    keys = list(rows[0])
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
