# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: the environment and one idea
#
# **What you will learn.** This chapter checks that the book's machinery works on your machine — the `mlip_core` package
# imports, PyTorch sees the device you expect, figures render — and introduces the one number that
# every contrastive method in this book turns on: the **temperature** of the softmax over
# image–report similarities.
#
# Every chapter starts the same way: what you will learn, what it needs from earlier chapters and how
# long it takes; then a `parameters` cell (Papermill replaces it when the book is executed with a
# profile; see the README), then a header that seeds every random generator and picks the device.
#
# **What it needs.** Nothing but the installed project; no data.
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("00_quickstart"))

# %% tags=["parameters"]
num_points = 512  # how many candidate reports one image is compared with
seed = 0

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from myst_nb import glue

import mlip_core
from mlip_core.notebook import setup
from mlip_core.repro import environment_report

device = setup(seed)
print(f"mlip_core {mlip_core.__version__} on {device}")

# %% [markdown]
# ## The environment
#
# Numbers in this book were measured; to compare yours with ours you need to know what produced them.

# %%
pd.DataFrame.from_dict(environment_report(), orient="index", columns=["value"])

# %% [markdown]
# How fast is this machine at the operation that dominates contrastive learning — the similarity
# matrix between a batch of image embeddings and a batch of report embeddings?

# %%
batch, dim = 256, 128
images = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
reports = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
repeats = 200
start = time.perf_counter()
for _ in range(repeats):
    similarity = images @ reports.T
elapsed = time.perf_counter() - start
print(f"{batch}x{batch} similarity matrix (d={dim}): {1e6 * elapsed / repeats:.1f} µs each on {device}")

# %% [markdown]
# ## Temperature: how sharply an image picks its report
#
# Contrastive pretraining (CLIP, ConVIRT, GLoRIA, MGCA and MLIP alike) turns the cosine similarities
# $s_{ij}$ between image $i$ and every report $j$ in the batch into a probability
# $p_{ij} = \exp(s_{ij}/\tau) / \sum_k \exp(s_{ik}/\tau)$ and trains the matching report to win.
# Cosine similarities live in $[-1, 1]$, so with $\tau = 1$ even a perfect match gets little of the
# probability mass; $\tau$ = {glue:text}`qs_init_tau` (CLIP's initial value, and this book's default,
# `mlip_core.config.ModelConfig.init_temperature`) lets one report stand out.
#
# Below, one image is compared with `num_points` reports: its own report has similarity
# {glue:text}`qs_own_similarity`, the others are drawn around {glue:text}`qs_other_mean` with a spread of
# {glue:text}`qs_other_spread` (values set in the cell below), a rough picture of a half-trained model. The
# plot shows the probability the softmax gives to each report, sorted, at three temperatures.

# %%
own_similarity, other_mean, other_spread = 0.6, 0.1, 0.15  # an illustration, not a measurement
from mlip_core.config import ModelConfig  # noqa: E402

glue("qs_init_tau", ModelConfig().init_temperature, display=False)
for key, value in (("qs_own_similarity", own_similarity), ("qs_other_mean", other_mean),
                   ("qs_other_spread", other_spread)):
    glue(key, value, display=False)
rng = np.random.default_rng(seed)
sims = np.concatenate([[own_similarity], rng.normal(other_mean, other_spread, size=num_points - 1).clip(-1, 1)])
fig, ax = plt.subplots(figsize=(7, 4))
for tau in (1.0, 0.3, 0.07):
    logits = sims / tau
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    ax.plot(np.arange(1, num_points + 1), probs[order], label=f"τ = {tau}: p(own report) = {probs[0]:.2f}")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("report rank (by probability)")
ax.set_ylabel("softmax probability")
ax.set_title(f"One image against {num_points} reports: lower temperature, sharper choice")
ax.legend()
plt.show()

# %% [markdown]
# The sharper the softmax, the harder the loss pushes *every* other report away — including reports
# that say the same thing. About a third of real chest X-ray reports are near-identical "normal"
# texts; treating them as negatives of each other is the false-negative problem that MLIP's
# divergence encoder and knowledge-guided negatives address. The next chapters build the data, the
# knowledge and the model that make this concrete.
