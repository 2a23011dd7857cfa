"""Shape assets for the chest X-ray renderer: real lung outlines, vessel textures and burned-in text glyphs.

The lung outlines are the 517 binary lung masks torchxrayvision ships (``semantic_masks_v7labs_lungs.zip``,
V7 Labs annotations of public COVID-19 radiographs). Each usable mask (exactly two large components, side by
side) is cropped to the union of both lungs and resampled to a ``T x T`` template with two soft channels
(patient right lung = image left, patient left lung = image right). Decoding the zip takes seconds, so the
templates are cached once per process and, when a cache folder is writable, on disk as ``.npz``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = ["LungTemplates", "lung_templates", "lung_mask_zip_path", "vessel_textures", "glyph", "cache_dir"]

TEMPLATE_SIZE = 160
MASK_ZIP = "semantic_masks_v7labs_lungs.zip"
_CACHE_VERSION = 2


def lung_mask_zip_path() -> Path:
    """torchxrayvision's zip of lung masks, found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"torchxrayvision is not installed, so {MASK_ZIP} cannot be found; "
                                "install it with `pip install torchxrayvision`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MASK_ZIP
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall torchxrayvision.")
    return path


def cache_dir() -> Path | None:
    """Where derived assets are cached: ``$MLIP_CACHE``, else ``~/.cache/mlip_core``; None if not writable."""
    base = os.environ.get("MLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlip_core")
    try:
        Path(base).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return Path(base) if os.access(base, os.W_OK) else None


@dataclass(frozen=True)
class LungTemplates:
    """Soft lung templates ``lungs`` (N, 2, T, T) uint8 (channel 0 patient right, 1 patient left, 255 = lung),
    their width/height ``aspect`` (N,), per-side row ranges ``rows`` (N, 2, 2) and hilum points ``hila`` (N, 2, 2)
    as (x, y) in template pixels, and the ``names`` of the source masks."""

    lungs: np.ndarray
    aspect: np.ndarray
    rows: np.ndarray
    hila: np.ndarray
    names: tuple[str, ...]
    skipped: int

    def __len__(self) -> int:
        return len(self.lungs)


def _decode(data: bytes) -> np.ndarray:
    """Decode a mask image to a boolean array; JPEGs are decoded at reduced scale (fast DCT scaling)."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("L", (4 * TEMPLATE_SIZE, 4 * TEMPLATE_SIZE))
    im = im.convert("L")
    scale = max(im.size) / (3 * TEMPLATE_SIZE)
    if scale > 1:
        im = im.resize((max(1, round(im.size[0] / scale)), max(1, round(im.size[1] / scale))), Image.BILINEAR)
    return np.asarray(im) > 127


def _template(mask: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Two side-by-side lung components cropped and resampled to (2, T, T) uint8, or None if unusable."""
    lab, k = ndimage.label(mask)
    if k < 2:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    if sizes[order[1]] < 0.02 * mask.size or (k > 2 and sizes[order[2]] > 0.2 * sizes[order[1]]):
        return None
    comps = [lab == (order[0] + 1), lab == (order[1] + 1)]
    cx = [np.nonzero(c)[1].mean() for c in comps]
    comps = [comps[i] for i in np.argsort(cx)]  # image-left first = patient right
    ys0, xs0 = np.nonzero(comps[0])
    ys1, xs1 = np.nonzero(comps[1])
    if xs0.max() > xs1.min() + 0.1 * (xs1.max() - xs0.min()):  # overlapping columns: not two lungs side by side
        return None
    y0, y1 = min(ys0.min(), ys1.min()), max(ys0.max(), ys1.max()) + 1
    x0, x1 = xs0.min(), xs1.max() + 1
    h, w = y1 - y0, x1 - x0
    aspect = w / h
    if not 0.8 < aspect < 1.9 or min(np.ptp(ys0), np.ptp(ys1)) < 0.6 * h:
        return None
    out = np.zeros((2, TEMPLATE_SIZE, TEMPLATE_SIZE), np.uint8)
    for i, c in enumerate(comps):
        crop = Image.fromarray((c[y0:y1, x0:x1] * 255).astype(np.uint8))
        small = np.asarray(crop.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.BILINEAR), np.float32)
        small = ndimage.gaussian_filter(small, 0.8)
        out[i] = np.clip(small, 0, 255).astype(np.uint8)
    return out, aspect


def _build(zip_path: Path) -> LungTemplates:
    lungs, aspects, names, skipped = [], [], [], 0
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(n for n in z.namelist() if not n.endswith("/")):
            try:
                t = _template(_decode(z.read(name)))
            except (OSError, ValueError):
                t = None
            if t is None:
                skipped += 1
                continue
            lungs.append(t[0])
            aspects.append(t[1])
            names.append(name.rsplit("/", 1)[-1])
    if not lungs:
        raise ValueError(f"{zip_path}: no usable two-lung masks; is it torchxrayvision's {MASK_ZIP}?")
    lungs_a = np.stack(lungs)
    rows = np.zeros((len(lungs), 2, 2), np.float32)
    hila = np.zeros((len(lungs), 2, 2), np.float32)
    for n in range(len(lungs)):
        for s in range(2):
            ys, xs = np.nonzero(lungs_a[n, s] > 127)
            rows[n, s] = (ys.min(), ys.max())
            # Hilum: medial third of the lung at 45% of its height.
            yh = ys.min() + 0.45 * (ys.max() - ys.min())
            row = xs[np.abs(ys - yh) < 3]
            xm = row.max() if s == 0 else row.min()
            xl = row.min() if s == 0 else row.max()
            hila[n, s] = (xm + 0.25 * (xl - xm), yh)
    return LungTemplates(lungs_a, np.asarray(aspects, np.float32), rows, hila, tuple(names), skipped)


@functools.lru_cache(maxsize=1)
def lung_templates() -> LungTemplates:
    """The lung templates, built from torchxrayvision's masks once and cached in memory and on disk."""
    zip_path = lung_mask_zip_path()
    stat = zip_path.stat()
    key = hashlib.sha1(f"{_CACHE_VERSION}|{TEMPLATE_SIZE}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir()
    cached = folder / f"lung_templates_{key}.npz" if folder else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as f:
                return LungTemplates(f["lungs"], f["aspect"], f["rows"], f["hila"], tuple(f["names"].tolist()),
                                     int(f["skipped"]))
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache is rebuilt below
    t = _build(zip_path)
    if cached is not None:
        from mlip_core.checkpoint import atomic_write

        atomic_write(cached, lambda fh: np.savez_compressed(fh, lungs=t.lungs, aspect=t.aspect, rows=t.rows,
                                                              hila=t.hila, names=np.asarray(t.names),
                                                              skipped=t.skipped))
    return t


@functools.lru_cache(maxsize=1)
def vessel_textures(count: int = 6, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Lung-marking textures (count, size, size) float32 in [0, 1]: ridges of band-passed noise (vessels),
    strongest near the hila. Fixed seed: the same for every run."""
    rng = np.random.default_rng(20240202)
    out = np.empty((count, size, size), np.float32)
    for i in range(count):
        noise = rng.standard_normal((size, size)).astype(np.float32)
        band = ndimage.gaussian_filter(noise, 2.5) - ndimage.gaussian_filter(noise, 6.0)
        ridges = np.exp(-np.abs(band) / (0.25 * band.std()))  # bright along zero crossings: vessel-like
        ridges = ndimage.gaussian_filter(ridges, 0.7)
        out[i] = ridges / ridges.max()
    return out


@functools.lru_cache(maxsize=256)
def glyph(text: str, height: int) -> np.ndarray:
    """A burned-in text label as a (h, w) float32 alpha mask in [0, 1], ``height`` pixels tall."""
    font = ImageFont.load_default(size=max(6, height))
    x0, y0, x1, y1 = font.getbbox(text)
    im = Image.new("L", (max(1, x1 - x0 + 2), max(1, y1 - y0 + 2)), 0)
    ImageDraw.Draw(im).text((1 - x0, 1 - y0), text, fill=255, font=font)
    return np.asarray(im, np.float32) / 255.0
