"""A quick look at the offline world: rendered images with their report excerpts and ground-truth masks."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

__all__ = ["world_examples", "preview_grid", "report_excerpt"]

def report_excerpt(text: str, chars: int = 140) -> str:
    """The impression (else findings) of a MIMIC-style report, cut to ``chars`` characters."""
    parts = dict(re.findall(r"^(IMPRESSION|FINDINGS):\s*(.*?)(?=\n\n[A-Z ]+:|\Z)", text, re.M | re.S))
    body = parts.get("IMPRESSION") or parts.get("FINDINGS") or text
    body = " ".join(body.split())
    return body if len(body) <= chars else body[: chars - 1].rstrip() + "…"


def world_examples(world_dir: str | os.PathLike, n: int = 8, seed: int = 0,
                   with_findings: float = 0.75) -> pd.DataFrame:
    """``n`` images of the world (about ``with_findings`` of them with drawn findings), one row each: dicom_id,
    subject_id, study_id, image_path, report_path, findings (list of dict rows of synth/findings.csv)."""
    root = Path(world_dir)
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv")
    findings = pd.read_csv(root / "synth" / "findings.csv", keep_default_na=False)
    rng = np.random.default_rng(seed)
    has = split["dicom_id"].isin(findings["dicom_id"])
    k = min(int(round(n * with_findings)), int(has.sum()))
    pick = list(rng.permutation(np.flatnonzero(has.to_numpy()))[:k])
    pick += list(rng.permutation(np.flatnonzero(~has.to_numpy()))[: n - k])
    rows = []
    for i in sorted(pick):
        r = split.iloc[i]
        sid, stid = str(r["subject_id"]), str(r["study_id"])
        study = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}"
        rows.append({"dicom_id": r["dicom_id"], "subject_id": int(sid), "study_id": int(stid),
                     "image_path": study / f"{r['dicom_id']}.jpg", "report_path": study.parent / f"s{stid}.txt",
                     "findings": findings[findings["dicom_id"] == r["dicom_id"]].to_dict("records")})
    return pd.DataFrame(rows)


def preview_grid(world_dir: str | os.PathLike, n: int = 8, cols: int = 4, seed: int = 0, masks: bool = True,
                 excerpt_chars: int = 120, figsize_per: float = 3.2):
    """A matplotlib figure: ``n`` rendered images, masks overlaid in colour with their boxes, finding names in
    the title and the report's impression underneath."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    root = Path(world_dir)
    ex = world_examples(root, n=n, seed=seed)
    rows = int(np.ceil(len(ex) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(figsize_per * cols, figsize_per * rows * 1.35), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), ex.iterrows()):
        img = np.asarray(Image.open(row["image_path"]).convert("L"))
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        names = []
        for j, f in enumerate(row["findings"]):
            color = palette(j % 10)
            label = f["finding"] if f["finding"] != "device" else f"device:{f['kind']}"
            names.append(f"{f['side'] + ' ' if f['side'] in ('left', 'right') else ''}{label}")
            if masks:
                m = np.asarray(Image.open(root / f["mask"])) > 0
                overlay = np.zeros(m.shape + (4,))
                overlay[m] = (*color[:3], 0.35)
                ax.imshow(overlay)
                ax.add_patch(Rectangle((f["x0"] - 0.5, f["y0"] - 0.5), f["x1"] - f["x0"], f["y1"] - f["y0"],
                                       fill=False, edgecolor=color, linewidth=1.2))
        ax.set_title(textwrap.fill(", ".join(names) or "no drawn finding", 34), fontsize=8)
        text = report_excerpt(Path(row["report_path"]).read_text(), excerpt_chars)
        ax.text(0.0, -0.02, textwrap.fill(text, 44), transform=ax.transAxes, va="top", fontsize=7)
    fig.suptitle(f"Offline world: {len(ex)} rendered radiographs, drawn findings (masks, boxes) and report "
                 "impressions")
    return fig
