"""The renderer: every finding changes the image measurably, where its mask says, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

from mlip_core.data.synth_anatomy import glyph, lung_templates
from mlip_core.data.synth_findings import Finding
from mlip_core.data.synth_render import render, sample_patient, sample_scene, with_findings

SIZE = 128


def _pairs(finding: Finding, n: int = 6, seed: int = 0, view: str = "PA"):
    """(without, with) renders of the same patient, pose, exposure and noise, for ``n`` patients."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, sample_patient(rng), [], size=SIZE, view=view)
        out.append((render(scene), render(with_findings(scene, [finding]))))
    return out


def _diff(a, b) -> np.ndarray:
    return b.image.astype(np.float32) - a.image.astype(np.float32)


def _on_side(mask: np.ndarray, anatomy: np.ndarray, side: str) -> bool:
    """Is the mask's centroid nearer the centroid of the named lung (patient side) than of the other one?
    (Pose shifts move lungs across the image midline, so the midline is not the test.)"""
    x = np.nonzero(mask)[1].mean()
    right = np.nonzero(anatomy == 1)[1].mean()  # patient right lung: image left on a PA view
    left = np.nonzero(anatomy == 2)[1].mean()
    assert right < left
    return abs(x - (right if side == "right" else left)) < abs(x - (left if side == "right" else right))


def test_lung_templates_come_from_torchxrayvision_masks():
    t = lung_templates()
    assert len(t) > 300  # 433 of the 517 masks have two side-by-side lungs
    assert t.lungs.shape[1:] == (2, 160, 160) and t.lungs.dtype == np.uint8
    # Channel 0 (patient right) lies in the image-left half, channel 1 in the right half.
    cols = np.arange(160)
    cx0 = (t.lungs[:, 0].astype(float).sum(axis=1) * cols).sum(1) / t.lungs[:, 0].astype(float).sum((1, 2))
    cx1 = (t.lungs[:, 1].astype(float).sum(axis=1) * cols).sum(1) / t.lungs[:, 1].astype(float).sum((1, 2))
    assert (cx0 < 80).all() and (cx1 > 80).all()


def test_cardiomegaly_raises_cardiothoracic_ratio_above_half():
    pairs = _pairs(Finding("cardiomegaly", severity="mild"), n=8)
    normal = np.array([a.ctr for a, _ in pairs])
    big = np.array([b.ctr for _, b in pairs])
    assert (normal < 0.5).all(), normal
    assert (big > 0.5).all(), big
    assert (big - normal).min() > 0.05


def test_effusion_whitens_the_named_costophrenic_region_only():
    for side in ("right", "left"):
        for a, b in _pairs(Finding("effusion", side=side, severity="moderate"), n=4):
            (inst,) = b.instances
            d = _diff(a, b)
            assert d[inst.mask].mean() > 40  # fluid replaces air: much brighter
            assert np.abs(d[~inst.mask]).mean() < 1.0
            ys, xs = np.nonzero(inst.mask)
            lung = a.anatomy == (1 if side == "right" else 2)
            ly, lx = np.nonzero(lung)
            assert _on_side(inst.mask, a.anatomy, side)
            assert ys.max() >= np.percentile(ly, 95)  # reaches the bottom of that lung (the angle)
            assert ys.mean() > ly.mean()  # sits in the lower part of the lung


@pytest.mark.parametrize("name", ["opacity", "consolidation", "pneumonia", "atelectasis", "nodule", "mass"])
def test_lung_lesions_brighten_their_mask_in_the_named_zone(name: str):
    zone_rows = []
    for zone in ("upper", "lower"):
        # Right lung: a left lower-zone lesion can hide behind the heart (retrocardiac), as in real films.
        for a, b in _pairs(Finding(name, side="right", zone=zone, severity="moderate"), n=3, seed=1):
            (inst,) = b.instances
            d = _diff(a, b)
            # Opacity is hazy by definition: a smaller but still clear change.
            assert d[inst.mask].mean() > (10 if name == "opacity" else 20), (name, d[inst.mask].mean())
            assert np.abs(d[~inst.mask]).mean() < 1.5
            ys, xs = np.nonzero(inst.mask)
            assert _on_side(inst.mask, a.anatomy, "right")
            lung = np.nonzero(a.anatomy == 1)[0]
            zone_rows.append((zone, (ys.mean() - lung.min()) / (lung.max() - lung.min())))
    upper = [r for z, r in zone_rows if z == "upper"]
    lower = [r for z, r in zone_rows if z == "lower"]
    assert max(upper) < min(lower)


def test_pneumothorax_darkens_and_removes_markings_at_the_apex():
    for a, b in _pairs(Finding("pneumothorax", side="right", severity="moderate"), n=4):
        (inst,) = b.instances
        m = inst.mask
        d = _diff(a, b)
        assert d[m].mean() < -10  # more air, no lung behind it
        # Hyperlucent, without vessel markings: darker than the collapsed lung beside it.
        collapsed = (a.anatomy == 1) & ~m
        assert b.image[m].mean() < b.image[collapsed].mean() - 5
        lung_rows = np.nonzero(a.anatomy == 1)[0]
        assert np.nonzero(m)[0].min() <= lung_rows.min() + 3  # reaches the apex
        assert _on_side(m, a.anatomy, "right")


def test_edema_is_bilateral_perihilar_haze():
    for a, b in _pairs(Finding("edema", side="bilateral", severity="moderate"), n=3):
        (inst,) = b.instances
        assert (inst.mask & (a.anatomy == 1)).any() and (inst.mask & (a.anatomy == 2)).any()
        assert _diff(a, b)[inst.mask].mean() > 15


def test_fracture_changes_only_pixels_near_its_box():
    for a, b in _pairs(Finding("fracture", side="left", kind="rib"), n=4):
        (inst,) = b.instances
        d = np.abs(_diff(a, b))
        x0, y0, x1, y1 = inst.box
        near = np.zeros_like(inst.mask)
        near[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = True
        assert d[near].sum() > 0.9 * d.sum() and d[inst.mask].mean() > 1.5


@pytest.mark.parametrize("kind", ["ett", "ng_tube", "central_line", "pacemaker", "sternotomy"])
def test_devices_are_bright_metal_inside_their_mask(kind: str):
    for a, b in _pairs(Finding("device", kind=kind), n=3):
        (inst,) = b.instances
        assert b.image[inst.mask].mean() > 200
        assert np.abs(_diff(a, b))[~inst.mask].max() == 0


def test_masks_and_boxes_agree_for_every_finding():
    rng = np.random.default_rng(5)
    names = ["cardiomegaly", "effusion", "opacity", "nodule", "granuloma", "pneumothorax", "edema", "fracture",
             "pleural_thickening", "enlarged_cardiomediastinum", "elevated_diaphragm", "scarring"]
    findings = [Finding(n, side="bilateral" if n == "edema" else ("left" if n not in (
        "cardiomegaly", "enlarged_cardiomediastinum") else ""), zone="middle") for n in names]
    scene = sample_scene(rng, sample_patient(rng), findings + [Finding("device", kind="pacemaker")], size=SIZE)
    out = render(scene)
    assert {i.finding.name for i in out.instances} == set(names) | {"device"}
    for inst in out.instances:
        ys, xs = np.nonzero(inst.mask)
        assert inst.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_same_scene_renders_identically_and_seeds_differ():
    rng = np.random.default_rng(9)
    scene = sample_scene(rng, sample_patient(rng), [Finding("opacity", side="right", zone="lower")], size=SIZE)
    assert np.array_equal(render(scene).image, render(scene).image)
    other = sample_scene(np.random.default_rng(10), scene.patient, scene.findings, size=SIZE)
    assert not np.array_equal(render(scene).image, render(other).image)


def test_nuisance_varies_across_images_of_one_patient():
    """Pose, exposure and markers vary per image, so no finding sits at fixed pixels."""
    rng = np.random.default_rng(2)
    patient = sample_patient(rng)
    scenes = [sample_scene(rng, patient, [], size=SIZE) for _ in range(12)]
    assert np.std([s.rotation for s in scenes]) > 1.0
    assert np.std([s.shift[0] for s in scenes]) > 0.01
    assert len({s.markers for s in scenes}) == 12
    lungs = [render(s).anatomy > 0 for s in scenes[:6]]
    centroids = np.array([np.argwhere(m).mean(0) for m in lungs])
    assert centroids.std(0).max() > 1.0  # lung fields move by pixels between images


def test_burned_in_glyphs_have_ink():
    g = glyph("PORTABLE", 12)
    assert g.shape[0] >= 8 and g.shape[1] > g.shape[0] and g.max() > 0.9


def test_variation_table_states_the_ranges_the_renderer_draws():
    from mlip_core.data import synth_render
    from mlip_core.data.synth_render import variation_table

    rng = np.random.default_rng(0)
    patients = [sample_patient(rng) for _ in range(400)]
    how = {row["varies"]: row["how"] for row in variation_table()}
    for values, (lo, hi), varies in (([p.lung_width for p in patients], synth_render.LUNG_WIDTH, "body size"),
                                     ([p.ctr for p in patients], synth_render.NORMAL_CTR, "heart")):
        assert lo <= min(values) < lo + 0.01 and hi - 0.01 < max(values) <= hi  # the draws fill the stated range
        assert f"{lo:g}–{hi:g}" in how[varies]
    zooms = [sample_scene(rng, patients[0], [], size=32, view="PA").zoom for _ in range(300)]
    lo, hi = synth_render.ZOOM
    assert lo <= min(zooms) and max(zooms) <= hi and f"zoom {lo:g}–{hi:g}" in how["pose"]
    assert f"one of {len(synth_render.lung_templates())} real outlines" in how["lung shape"]
