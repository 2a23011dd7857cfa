"""Radiograph reading: the real pydicom-data chest X-ray, DICOM LUTs and bit depths, JPG/PNG, corrupt files."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from mlip_core.data.fixture_trees import fake_radiograph, truncate, write_dicom, write_jpg, write_png
from PIL import Image

from mlip_core.data.images import (
    ImageReadError,
    load_uint8,
    pydicom_data_path,
    read_dicom,
    read_image,
    resize_uint8,
)


def test_real_monochrome1_radiograph_reads_with_lungs_dark_and_head_up():
    path = pydicom_data_path("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    # Rows run toward the feet and columns toward the patient's left: standard PA display, no flip needed.
    assert list(ds.PatientOrientation) == ["L", "F"]
    img = read_dicom(path)
    assert img.shape == (ds.Rows, ds.Columns) and img.dtype == np.uint8
    # Polarity: MONOCHROME1 stores low values as white, so display = decreasing function of the stored values.
    raw = ds.pixel_array.astype(np.float64)
    assert np.corrcoef(raw.ravel()[::97], img.astype(np.float64).ravel()[::97])[0, 1] < -0.99
    small = resize_uint8(img, 256).astype(np.float64)
    upper_lungs = np.r_[small[50:120, 40:100].ravel(), small[50:120, 156:216].ravel()].mean()
    spine = small[50:200, 120:136].mean()
    below_diaphragm = small[225:250, 40:216].mean()
    assert upper_lungs + 40 < spine  # lungs (air) dark, spine and mediastinum (bone, tissue) bright
    assert upper_lungs + 40 < below_diaphragm  # abdomen at the bottom: the image is not upside down


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_and_monochrome2_of_the_same_scene_read_identically(tmp_path, bits):
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", photometric="MONOCHROME2", bits_stored=bits))
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1", bits_stored=bits))
    truth = fake_radiograph().astype(np.float64)
    stretched = (truth - truth.min()) / (truth.max() - truth.min()) * 255  # no VOI: the present range is stretched
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 1
    assert np.abs(m2 - stretched).max() <= 2.5
    assert np.corrcoef(m1.ravel(), truth.ravel())[0, 1] > 0.99  # MONOCHROME1 inverted back to display polarity


def test_jpeg_baseline_compressed_dicom_decodes_like_siim_files(tmp_path):
    truth = fake_radiograph()
    path = write_dicom(tmp_path / "jpeg.dcm", pixels=truth.astype(np.uint16), bits_stored=8, jpeg_baseline=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    img = read_dicom(path).astype(np.float64)
    assert np.corrcoef(img.ravel(), truth.ravel())[0, 1] > 0.99


def test_window_saturates_outside_and_stretches_inside(tmp_path):
    pix = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))
    img = read_dicom(write_dicom(tmp_path / "w.dcm", pixels=pix, bits_stored=12, window=(2048, 1024)))
    row = img[0].astype(int)
    assert row[pix[0] < 1500].max() == 0 and row[pix[0] > 2600].min() == 255
    inside = (pix[0] > 1600) & (pix[0] < 2500)
    assert np.all(np.diff(row[inside]) > 0)  # strictly increasing in the window
    no_voi = read_dicom(tmp_path / "w.dcm", apply_voi=False)[0].astype(int)
    assert no_voi[0] == 0 and no_voi[-1] == 255 and 100 < no_voi[32] < 160


def test_voi_lut_sequence_is_applied(tmp_path):
    from pydicom.dataset import Dataset

    pix = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))
    path = write_dicom(tmp_path / "lut.dcm", pixels=pix, bits_stored=12)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [1024, 1536, 12]  # 1024 entries, first input 1536, 12-bit output
    item.add_new(0x00283006, "US", (np.linspace(0, 1, 1024) ** 0.5 * 4095).astype(np.uint16).tolist())  # LUTData
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # integer input all the way to the LUT: no pydicom float warning
        row = read_dicom(path)[0].astype(int)
    assert row[pix[0] < 1536].max() == 0 and row[pix[0] >= 1536 + 1023].min() == 255
    inside = (pix[0] > 1536) & (pix[0] < 2559)
    steps = np.diff(row[inside])
    assert (steps > 0).all() and steps[0] > steps[-1]  # the LUT's square-root curve, not a linear window


def test_signed_pixels_read_in_order(tmp_path):
    pix = np.tile(np.linspace(-2000, 2000, 64).astype(np.int16), (4, 1))
    path = write_dicom(tmp_path / "s.dcm", pixels=pix, bits_stored=16, extra={"PixelRepresentation": 1})
    assert pydicom.dcmread(path).pixel_array.min() == -2000
    row = read_dicom(path)[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    windowed = read_dicom(write_dicom(tmp_path / "sw.dcm", pixels=pix, bits_stored=16, window=(0, 1000),
                                      extra={"PixelRepresentation": 1}))[0].astype(int)
    assert windowed[pix[0] < -520].max() == 0 and windowed[pix[0] > 520].min() == 255


def test_rescale_slope_intercept_is_applied_before_the_window(tmp_path):
    pix = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))
    # stored 0..990 -> modality -1000..980 (slope 2, intercept -1000); window on [-200, 200]
    img = read_dicom(write_dicom(tmp_path / "r.dcm", pixels=pix, rescale=(2.0, -1000.0), window=(0, 400)))
    modality = pix[0] * 2.0 - 1000
    assert img[0][modality < -220].max() == 0 and img[0][modality > 220].min() == 255


def test_jpg_png_and_16bit_png_read_as_uint8(tmp_path):
    truth = fake_radiograph()
    assert np.array_equal(read_image(write_png(tmp_path / "a.png")), truth)
    assert np.abs(read_image(write_jpg(tmp_path / "a.jpg")).astype(int) - truth).mean() < 4
    Image.fromarray(truth.astype(np.uint16) * 257).save(tmp_path / "b16.png")
    assert np.abs(read_image(tmp_path / "b16.png").astype(int) - truth).max() <= 1
    Image.fromarray(np.stack([truth] * 3, -1)).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), truth)


@pytest.mark.parametrize("kind", ["jpg", "png", "dcm"])
def test_corrupt_and_truncated_files_raise_an_error_naming_the_file_and_fix(tmp_path, kind):
    writer = {"jpg": write_jpg, "png": write_png, "dcm": write_dicom}[kind]
    path = truncate(writer(tmp_path / f"bad.{kind}"), keep=0.5)
    with pytest.raises(ImageReadError, match=rf"bad\.{kind}.*(re-download|remove)"):
        read_image(path)
    (tmp_path / f"junk.{kind}").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=rf"junk\.{kind}"):
        read_image(tmp_path / f"junk.{kind}")
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / f"absent.{kind}")


def test_resize_pads_to_square_keeping_aspect():
    img = np.full((40, 20), 200, dtype=np.uint8)
    out = resize_uint8(img, 16)
    assert out.shape == (16, 16)
    assert (out[:, :4] == 0).all() and (out[:, -4:] == 0).all() and (out[:, 4:12] == 200).all()
    assert resize_uint8(img, 16, mode="stretch").min() == 200


def test_reduced_scale_jpeg_decoding_matches_full_decoding_after_resize(tmp_path):
    path = write_jpg(tmp_path / "big.jpg", h=512, w=400, seed=3)  # decoded at 1/4 scale for a 64 target
    fast = load_uint8(path, 64).astype(int)
    full = resize_uint8(read_image(path), 64).astype(int)
    assert np.abs(fast - full).mean() < 0.5 and np.abs(fast - full).max() <= 4
