"""Reading radiographs: DICOM (pydicom, with modality/VOI LUTs and MONOCHROME1), JPG/PNG, and resizing to uint8.

Every reader returns a 2-D ``uint8`` array (H, W) where 0 is black and 255 is white as a radiologist views
the image (air dark, bone bright). Anything that cannot be decoded raises :class:`ImageReadError`, which
names the file and what to do about it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "ImageReadError",
    "PREPROCESS_VERSION",
    "dicom_to_float",
    "load_uint8",
    "pydicom_data_path",
    "read_dicom",
    "read_image",
    "resize_uint8",
    "to_uint8",
]

# Bump when reading/resizing changes what pixels come out: the image cache is keyed on it.
PREPROCESS_VERSION = "2"  # 2: JPEGs decoded at reduced DCT scale when resizing

DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageReadError(RuntimeError):
    """An image file that cannot be read; the message names the file and the fix."""


def pydicom_data_path(name: str = "RG1_UNCR.dcm") -> Path:
    """A file shipped in the ``pydicom-data`` wheel (its package is called ``data_store``)."""
    import importlib.util

    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pydicom-data is not installed, so {name} cannot be found; `pip install pydicom-data`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall pydicom-data (`pip install --force-reinstall pydicom-data`).")
    return path


def _stored_range(ds) -> np.ndarray:
    """The smallest and largest value the stored pixels can take, shape (2,)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.float64)
    return np.array([0, 2**bits - 1], dtype=np.float64)


def dicom_to_float(ds, path: Path | str = "<dataset>", apply_voi: bool = True) -> np.ndarray:
    """A pydicom dataset as display intensities in [0, 1], float32 (H, W); MONOCHROME1 inverted.

    The modality LUT (rescale slope/intercept or LUT sequence) then the first VOI LUT or window are applied
    with pydicom's own functions. The output is scaled by the range the *possible* stored values map to, not
    the range present in this image, so a window keeps its meaning (what is outside it saturates).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated / unsupported pixel data
        raise ImageReadError(
            f"{path}: cannot decode the DICOM pixel data ({type(exc).__name__}: {exc}); the file is truncated or "
            "uses a transfer syntax without an installed decoder: re-download it or remove it from the dataset."
        ) from exc
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[0]  # multi-frame: the first frame
    if arr.ndim == 3:  # colour (RGB / YBR) secondary captures: luminance
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2-D image, got pixel array of shape {arr.shape}.")

    # Keep integer dtypes until the VOI step: a VOI LUT indexes its table with the input values.
    bounds = _stored_range(ds).astype(np.int64).reshape(1, 2)
    values = apply_modality_lut(arr, ds)
    bounds = apply_modality_lut(bounds, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if apply_voi and has_voi:
        values = apply_voi_lut(values, ds).astype(np.float64)
        bounds = apply_voi_lut(bounds, ds).astype(np.float64)
        lo, hi = float(bounds.min()), float(bounds.max())
    else:
        # No VOI: stretch what is present (the modality range of a CR is mostly empty).
        values = values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
    out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: the minimum value is white
    return out


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float intensities in [0, 1] (H, W) to uint8 (H, W), rounded."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def read_dicom(path: Path | str, apply_voi: bool = True) -> np.ndarray:
    """A DICOM radiograph as uint8 (H, W), display polarity (MONOCHROME1 inverted), VOI LUT / window applied."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found; check the dataset root and that the download is complete.")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageReadError(
            f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}); re-download it or remove it."
        ) from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no PixelData element; it is not an image, remove it.")
    return to_uint8(dicom_to_float(ds, path, apply_voi=apply_voi))


def _pil_to_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image of any grey/colour mode as uint8 (H, W); 16-bit PNGs scaled by their full range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        return to_uint8(arr / top)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return to_uint8((arr - arr.min()) / max(arr.max() - arr.min(), 1e-12))
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path: Path | str, min_size: int | None = None) -> np.ndarray:
    """Any radiograph file (DICOM by suffix or content, else JPG/PNG via Pillow) as uint8 (H, W).

    ``min_size``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's ``draft``)
    as long as both sides stay >= ``min_size``; several times faster on 2-3k pixel radiographs.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found; check the dataset root and that the download is complete.")
    try:
        with Image.open(path) as img:
            if min_size is not None and img.format == "JPEG":
                img.draft("L", (min_size, min_size))
            img.load()  # decode now: a truncated JPEG raises here rather than yielding grey rows
            return _pil_to_uint8(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return read_dicom(path)
        raise ImageReadError(
            f"{path}: cannot decode image ({type(exc).__name__}: {exc}); the file is corrupt or truncated: "
            "re-download it or remove it from the dataset."
        ) from exc


def resize_uint8(arr: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """uint8 (H, W) to uint8 (size, size).

    ``pad`` (as MGCA): scale the longer side to ``size`` keeping the aspect ratio and centre it on black;
    ``stretch``: scale both sides to ``size``.
    """
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L")
    if mode == "stretch":
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; use 'pad' or 'stretch'")
    h, w = arr.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.uint8)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def load_uint8(path: Path | str, size: int | None = None, mode: str = "pad") -> np.ndarray:
    """Read any radiograph and optionally resize: uint8 (H, W) or (size, size).

    With ``size``, JPEGs are decoded at the smallest DCT scale that keeps both sides >= 2 * size, so the
    final bilinear resize still averages over >= 2x2 source pixels.
    """
    if size is None:
        return read_image(path)
    return resize_uint8(read_image(path, min_size=2 * size), size, mode=mode)
