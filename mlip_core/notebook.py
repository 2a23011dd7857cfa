"""The short header every chapter opens with (as in the UvA DL notebooks): seed, device, figure style."""

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
