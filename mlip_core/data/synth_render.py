"""A procedural chest radiograph renderer: anatomy that varies like real patients, findings where a reader looks.

An image is a sum of densities (soft tissue, mediastinum, heart, bone, metal, minus the air in the lungs) seen
through an exposure curve, then noise and burned-in text. Everything is evaluated per pixel on precomputed
coordinate grids, vectorised in numpy: no Python loop over pixels.

Two coordinate frames: *canonical* (u, v) in [0, 1]^2 is the patient before positioning; the image is that
frame rotated, shifted and zoomed (``Scene.rotation/shift/zoom``). *Template* coordinates (tx, ty) in
[0, T) index the real lung outline chosen for the patient, stretched to the patient's thorax, so lung
findings (effusion level, lobe zone, collapsed lung) follow the lung's real shape and move with the pose.

What varies, and why: a renderer with a fixed pose lets a pixel-wise linear model find each finding at a fixed
place (measured: 0.77 AUROC from raw 32x32 pixels). So body size, lung shape (real outlines), heart size
and position, rotation, shift, zoom, inspiration, exposure, contrast, noise, PA/AP view, ECG leads and
burned-in markers all vary per patient or per image, and none of them is a label.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from mlip_core.data.synth_anatomy import TEMPLATE_SIZE, glyph, lung_templates, vessel_textures
from mlip_core.data.synth_findings import DEVICE_KINDS, Finding

__all__ = ["Patient", "Scene", "Instance", "Rendered", "sample_patient", "sample_scene", "render",
           "ANATOMY_LABELS", "with_findings", "variation_table"]

T = TEMPLATE_SIZE
ANATOMY_LABELS = {0: "background", 1: "right lung", 2: "left lung", 3: "heart"}
_MARKER_TEXTS = ["PORTABLE", "UPRIGHT", "SEMI-ERECT", "SUPINE", "AP", "PA", "STANDING", "INSP", "CXR"]

# The renderer's design ranges (uniform draws unless a standard deviation is named), drawn by sample_patient and
# sample_scene; chapter 01 prints its table of what varies from these (variation_table).
LUNG_WIDTH = (0.6, 0.78)  # of the frame
NORMAL_CTR = (0.37, 0.47)  # cardiothoracic ratio without cardiomegaly
CTR_BY_SEVERITY = {"mild": (0.54, 0.58), "moderate": (0.58, 0.64), "severe": (0.64, 0.7)}
AP_HEART_MAGNIFICATION = 1.06
ROTATION_SD, ROTATION_CLIP = 3.0, 7.0  # degrees
SHIFT_SD = (0.045, 0.04)  # of the frame, horizontal and vertical
ZOOM = (0.85, 1.12)
INSPIRATION = (0.9, 1.1)  # lung height factor
HYPERINFLATION, HYPOINFLATION = 1.14, 0.8  # inspiration factors of those findings


@dataclass(frozen=True)
class Patient:
    """What stays the same across a patient's studies: lung outline, body build, heart, sex."""

    template: int
    lung_width: float  # width of both lungs together, as a fraction of the canonical frame
    aspect_jitter: float  # multiplies the outline's own width/height
    ctr: float  # cardiothoracic ratio when the heart is normal
    heart_dx: float  # heart centre right of the midline, in lung widths (+ = patient left)
    heart_dy: float
    body_fat: float  # 0 thin .. 1 large soft-tissue envelope
    female: bool
    mediastinum: float  # mediastinal width, in lung widths
    heart_density: float = 0.18  # how much denser the heart is than the lung it covers
    heart_axis: float = 25.0  # degrees of the heart's long axis below horizontal


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image deterministically (``seed`` drives noise and finding shapes)."""

    patient: Patient
    findings: tuple[Finding, ...]
    size: int
    seed: int
    view: str = "PA"
    rotation: float = 0.0  # degrees
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the image
    zoom: float = 1.0
    inspiration: float = 1.0  # lung height multiplier
    lung_top: float = 0.14
    exposure: float = 2.2  # attenuation scale: high = dense, bright image
    window: tuple[float, float] = (0.0, 1.0)
    gamma: float = 1.0
    noise: float = 0.02
    heel: float = 0.0  # top-to-bottom brightness gradient
    texture: int = 0
    flip_texture: bool = False
    ecg_leads: int = 0
    markers: tuple[tuple[str, float, float, float], ...] = ()  # (text, x, y, height as image fractions)


@dataclass
class Instance:
    """One drawn finding: its pixel ``mask`` (H, W) bool and ``box`` (x0, y0, x1, y1), inclusive-exclusive."""

    finding: Finding
    mask: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class Rendered:
    """A rendered radiograph ``image`` (H, W) uint8, its finding ``instances``, an ``anatomy`` label map (H, W)
    uint8 (see ANATOMY_LABELS) and the measured cardiothoracic ratio ``ctr``."""

    image: np.ndarray
    instances: list[Instance] = field(default_factory=list)
    anatomy: np.ndarray | None = None
    ctr: float = float("nan")


# ----------------------------------------------------------------------------------------------- sampling
def sample_patient(rng: np.random.Generator) -> Patient:
    """Draw a patient's anatomy."""
    n = len(lung_templates())
    return Patient(
        template=int(rng.integers(n)),
        lung_width=float(rng.uniform(*LUNG_WIDTH)),
        aspect_jitter=float(rng.uniform(0.9, 1.1)),
        ctr=float(rng.uniform(*NORMAL_CTR)),
        heart_dx=float(rng.normal(0.09, 0.025)),
        heart_dy=float(rng.normal(0.0, 0.03)),
        body_fat=float(rng.uniform(0.0, 1.0)),
        female=bool(rng.random() < 0.5),
        mediastinum=float(rng.uniform(0.15, 0.2)),
        heart_density=float(rng.uniform(0.1, 0.22)),
        heart_axis=float(rng.uniform(15.0, 35.0)),
    )


def sample_scene(rng: np.random.Generator, patient: Patient, findings: list[Finding] | tuple[Finding, ...],
                 size: int = 224, view: str | None = None) -> Scene:
    """Draw positioning, exposure and nuisance for one image of ``patient`` showing ``findings``."""
    names = {f.name for f in findings}
    if view is None:
        p_ap = 0.55 if "device" in names else 0.2
        view = "AP" if rng.random() < p_ap else "PA"
    inspiration = float(rng.uniform(*INSPIRATION))
    if "hyperinflation" in names:
        inspiration *= HYPERINFLATION
    if "hypoinflation" in names:
        inspiration *= HYPOINFLATION
    markers = []
    side_marker = str(rng.choice(["L", "R"]))
    mx = float(rng.uniform(0.03, 0.12)) if rng.random() < 0.5 else float(rng.uniform(0.82, 0.93))
    markers.append((side_marker, mx, float(rng.uniform(0.03, 0.2)), float(rng.uniform(0.04, 0.07))))
    n_text = int(rng.integers(0, 3)) + (1 if view == "AP" else 0)
    for _ in range(n_text):
        text = "PORTABLE" if (view == "AP" and rng.random() < 0.6) else str(rng.choice(_MARKER_TEXTS))
        markers.append((text, float(rng.uniform(0.02, 0.6)), float(rng.choice([rng.uniform(0.02, 0.1),
                                                                                rng.uniform(0.88, 0.94)])),
                        float(rng.uniform(0.03, 0.05))))
    lo = float(rng.uniform(0.0, 0.06))
    return Scene(
        patient=patient,
        findings=tuple(findings),
        size=int(size),
        seed=int(rng.integers(2**31)),
        view=view,
        rotation=float(np.clip(rng.normal(0.0, ROTATION_SD), -ROTATION_CLIP, ROTATION_CLIP)),
        shift=(float(rng.normal(0.0, SHIFT_SD[0])), float(rng.normal(0.0, SHIFT_SD[1]))),
        zoom=float(rng.uniform(*ZOOM)) * (1.05 if view == "AP" else 1.0),
        inspiration=inspiration,
        lung_top=float(rng.uniform(0.1, 0.17)) - (0.03 if view == "AP" else 0.0),
        exposure=float(rng.uniform(1.6, 2.8)),
        window=(lo, float(rng.uniform(0.92, 1.06))),
        gamma=float(rng.uniform(0.75, 1.3)),
        noise=float(rng.uniform(0.008, 0.04)),
        heel=float(rng.uniform(-0.08, 0.08)),
        texture=int(rng.integers(len(vessel_textures()))),
        flip_texture=bool(rng.random() < 0.5),
        ecg_leads=int(rng.choice([0, 0, 0, 2, 3, 4])) if view == "PA" else int(rng.choice([0, 3, 4, 5])),
        markers=tuple(markers),
    )


def variation_table() -> list[dict[str, str]]:
    """What the renderer varies per patient or per image, none of it a label: rows of ``varies``, ``how`` (from
    this module's design ranges, so the table cannot drift from the draws) and ``why it matters``."""
    def span(r: tuple[float, float], pct: bool = False) -> str:
        return f"{round(100 * r[0], 2):g}–{round(100 * r[1], 2):g}%" if pct else f"{r[0]:g}–{r[1]:g}"

    cardio = (min(lo for lo, _ in CTR_BY_SEVERITY.values()), max(hi for _, hi in CTR_BY_SEVERITY.values()))
    return [
        {"varies": "lung shape", "how": f"one of {len(lung_templates())} real outlines per patient, width/height jitter",
         "why it matters": "findings follow anatomy, not pixels"},
        {"varies": "body size", "how": f"lung width {span(LUNG_WIDTH)} of the frame, soft-tissue thickness",
         "why it matters": "scale invariance"},
        {"varies": "heart", "how": f"cardiothoracic ratio {span(NORMAL_CTR)} when normal ({span(cardio)} with "
                                   f"cardiomegaly, ×{AP_HEART_MAGNIFICATION:g} on AP), position and density jitter",
         "why it matters": "cardiomegaly is a *ratio*, not a blob size"},
        {"varies": "pose", "how": f"rotation {ROTATION_SD:g}° s.d. (at most {ROTATION_CLIP:g}°), shift "
                                  f"{span(SHIFT_SD[::-1], pct=True)} s.d., zoom {span(ZOOM)}",
         "why it matters": "no fixed pixel per finding"},
        {"varies": "inspiration", "how": f"lung height ×{span(INSPIRATION)} (×{HYPOINFLATION:g} / ×{HYPERINFLATION:g} "
                                         "for hypo-/hyperinflation)", "why it matters": ""},
        {"varies": "exposure", "how": "attenuation, window, gamma, heel effect, quantum noise",
         "why it matters": "intensity invariance"},
        {"varies": "view", "how": 'PA or AP (AP: magnified heart, higher clavicles, "PORTABLE")',
         "why it matters": "a real confounder"},
        {"varies": "nuisance", "how": "ECG leads, burned-in side markers and text",
         "why it matters": "shortcuts a model must ignore"},
    ]


# ---------------------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as fractions of the image: a (1, S) row and an (S, 1) column, float32."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    return c[None, :], c[:, None]


@functools.lru_cache(maxsize=1)
def _padded_assets() -> tuple[np.ndarray, np.ndarray]:
    """Lung templates (N, 2, (T+2)^2) and textures (K, (T+2)^2) with a zero border, flattened for np.take."""
    lt = lung_templates()
    lungs = np.zeros((len(lt), 2, T + 2, T + 2), np.float32)
    lungs[:, :, 1:-1, 1:-1] = lt.lungs.astype(np.float32) / 255.0
    tex = np.zeros((len(vessel_textures()), T + 2, T + 2), np.float32)
    tex[:, 1:-1, 1:-1] = vessel_textures()
    return lungs.reshape(len(lt), 2, -1), tex.reshape(len(tex), -1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """A cheap soft step: a linear ramp from 0 at x=-2 to 1 at x=2 (tanh costs ~10x more per pixel)."""
    return np.clip(np.float32(0.25) * x + np.float32(0.5), 0.0, 1.0)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), exclusive upper bounds, of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _finding_rng(seed: int, f: Finding, k: int) -> np.random.Generator:
    """Per-finding random stream: removing one finding leaves the others' shapes unchanged."""
    key = zlib.crc32(f"{f.name}|{f.side}|{f.zone}|{f.kind}|{k}".encode())
    return np.random.default_rng([seed, key])


class _Frame:
    """Per-image geometry: canonical and template coordinates for every pixel, plus the forward map."""

    def __init__(self, scene: Scene) -> None:
        lt = lung_templates()
        p = scene.patient
        s = scene.size
        px, py = _grid(s)
        th = np.deg2rad(scene.rotation)
        c, sn = np.float32(np.cos(th)), np.float32(np.sin(th))
        z = np.float32(scene.zoom)
        dx = px - np.float32(0.5 + scene.shift[0])
        dy = py - np.float32(0.5 + scene.shift[1])
        self.u = (0.5 + (c * dx + sn * dy) / z).astype(np.float32)  # (S, S)
        self.v = (0.5 + (-sn * dx + c * dy) / z).astype(np.float32)
        self.cos, self.sin, self.zoom, self.shift, self.size = float(c), float(sn), float(z), scene.shift, s
        self.W = p.lung_width
        aspect = float(lt.aspect[p.template]) * p.aspect_jitter
        self.H = min(self.W / aspect * scene.inspiration, 0.8 - scene.lung_top)
        self.x0 = 0.5 - self.W / 2
        self.y0 = scene.lung_top
        self.tx = (self.u - self.x0) * np.float32(T / self.W)
        self.ty = (self.v - self.y0) * np.float32(T / self.H)
        self.flat = self._index(self.tx, self.ty)
        self.rows = lt.rows[p.template]
        self.hila = lt.hila[p.template]

    @staticmethod
    def _index(tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
        """Flat index into a zero-bordered (T+2)^2 template; outside maps to the zero border."""
        ix = np.clip(tx + 1.0, 0, T + 1).astype(np.int32)
        iy = np.clip(ty + 1.0, 0, T + 1).astype(np.int32)
        return iy * (T + 2) + ix

    def to_canonical(self, tx: float, ty: float) -> tuple[float, float]:
        """Template point -> canonical point."""
        return self.x0 + tx * self.W / T, self.y0 + ty * self.H / T

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        """Canonical point -> image pixel coordinates (x, y)."""
        a, b = (u - 0.5) * self.zoom, (v - 0.5) * self.zoom
        x = self.cos * a - self.sin * b + 0.5 + self.shift[0]
        y = self.sin * a + self.cos * b + 0.5 + self.shift[1]
        return x * self.size - 0.5, y * self.size - 0.5


def _sample_in_lung(fr: _Frame, lung: np.ndarray, side: int, zone: str, rng: np.random.Generator) -> tuple[float, float]:
    """A template point inside lung ``side`` (0 right, 1 left) within ``zone`` (rejection sampling)."""
    top, bottom = fr.rows[side]
    lo, hi = {"upper": (0.08, 0.36), "middle": (0.36, 0.62), "lower": (0.62, 0.86)}.get(zone, (0.1, 0.85))
    tx0, tx1 = (0.05 * T, 0.48 * T) if side == 0 else (0.52 * T, 0.95 * T)
    best = (0.5 * (tx0 + tx1), top + 0.5 * (lo + hi) * (bottom - top))
    for _ in range(60):
        x = rng.uniform(tx0, tx1)
        y = top + rng.uniform(lo, hi) * (bottom - top)
        if lung[side, int(y) + 1, int(x) + 1] > 0.8:
            return float(x), float(y)
    return best


def render(scene: Scene) -> Rendered:
    """Render one radiograph with its finding masks and anatomy labels."""
    fr = _Frame(scene)
    p = scene.patient
    s = scene.size
    u, v, W, H = fr.u, fr.v, fr.W, fr.H
    lungs_flat, tex_flat = _padded_assets()
    lung_r = np.take(lungs_flat[p.template, 0], fr.flat)
    lung_l = np.take(lungs_flat[p.template, 1], fr.flat)
    tex = np.take(tex_flat[scene.texture], fr.flat)
    if scene.flip_texture:
        tex = tex[:, ::-1]
    lungs2d = lungs_flat[p.template].reshape(2, T + 2, T + 2)
    names = [f.name for f in scene.findings]

    # --- soft tissue envelope: a cylinder whose half-width widens into the shoulders and narrows at the neck.
    xc = u - np.float32(0.5)
    y_sh = fr.y0 - 0.02
    bw0 = W * (0.58 + 0.12 * p.body_fat)
    shoulder = _sigmoid((y_sh + 0.06 - v) / 0.025)  # 1 above the shoulders
    neck = _sigmoid((y_sh - 0.07 - v) / 0.015)
    bw = bw0 * (1 + 0.25 * shoulder) * (1 - 0.62 * neck)
    r = xc / bw
    body = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))

    # --- mediastinum, spine and trachea.
    spine_x = np.float32(0.0)
    if "scoliosis" in names:
        amp = 0.035 * W
        spine_x = np.float32(amp) * np.sin((v - fr.y0) / H * np.float32(np.pi * 1.3)).astype(np.float32)
    mw = p.mediastinum * W
    if "enlarged_cardiomediastinum" in names:
        mw_upper = mw * 1.65
    else:
        mw_upper = mw
    xs = xc - spine_x
    med = _sigmoid((mw / 2 - np.abs(xs)) / (0.01 * W))
    spine = _sigmoid((0.045 * W - np.abs(xs)) / (0.004 * W))
    vert = 0.5 + 0.5 * np.cos((v - fr.y0) * np.float32(2 * np.pi / (0.075 * H)))
    trachea = _sigmoid((0.018 * W - np.abs(xc + 0.005)) / 0.003) * _sigmoid((fr.y0 + 0.3 * H - v) / 0.01)

    # --- heart: an ellipse left of centre; its width / lung width is the cardiothoracic ratio.
    cardio = next((f for f in scene.findings if f.name == "cardiomegaly"), None)
    ctr = p.ctr
    if cardio is not None:
        lo_, hi_ = CTR_BY_SEVERITY[cardio.severity]
        ctr = float(_finding_rng(scene.seed, cardio, 0).uniform(lo_, hi_))
    if scene.view == "AP":
        ctr *= AP_HEART_MAGNIFICATION  # AP magnifies the heart: a real confounder of the cardiothoracic ratio
    # An ellipse whose long axis runs from the right atrium down to the apex (patient left, image right);
    # the semi-axes are set so that its horizontal extent is exactly ctr * (lung width).
    th_h = np.deg2rad(p.heart_axis)
    ch, sh, k = float(np.cos(th_h)), float(np.sin(th_h)), 0.62
    a = ctr * W / 2 / np.sqrt(ch * ch + k * k * sh * sh)
    b = k * a
    half_h = np.sqrt(a * a * sh * sh + b * b * ch * ch)
    hx = 0.5 + (p.heart_dx + (ctr - 0.42) * 0.25) * W
    hy = fr.y0 + 0.95 * H - 0.7 * half_h + p.heart_dy * H  # resting on the diaphragm
    du_h, dv_h = u - np.float32(hx), v - np.float32(hy)
    r2 = ((du_h * ch + dv_h * sh) / a) ** 2 + ((dv_h * ch - du_h * sh) / b) ** 2
    heart = np.clip((1.0 - r2) * 6.0, 0.0, 1.0)
    upper_med = _sigmoid((mw_upper / 2 - np.abs(xs)) / (0.01 * W)) * _sigmoid((hy - 0.8 * half_h - v) / 0.01)
    med = np.maximum(med, upper_med)
    knob = np.exp(-(((u - (0.5 + 0.5 * mw_upper + 0.02 * W)) / (0.035 * W)) ** 2
                    + ((v - (fr.y0 + 0.22 * H)) / (0.04 * H)) ** 2))

    # --- lungs: air, thicker centrally; markings strongest medially.
    lung = np.maximum(lung_r, lung_l)
    air = lung * (0.21 + 0.06 * body) * np.float32(1.12 if "hyperinflation" in names else 1.0)
    air = air * (1.0 - 0.85 * heart)  # little lung in front of and behind the heart
    medial = 1.0 - np.abs(fr.tx * np.float32(2.0 / T) - 1.0)
    markings = tex * (0.35 + 0.65 * medial) * lung

    # --- ribs: posterior arcs per hemithorax, and the clavicles.
    d = np.abs(xc) / np.float32(W / 2)
    spacing = np.float32(0.105 * H)
    phase = (v - np.float32(fr.y0 - 0.05 * H) - np.float32(0.2 * H) * d * d) / spacing
    rib_shift = np.zeros_like(phase)
    rib_gap = np.ones_like(phase)
    fractures = [(i, f) for i, f in enumerate(scene.findings) if f.name == "fracture"]
    frac_geom = []
    for i, f in fractures:
        rng = _finding_rng(scene.seed, f, 0)
        k = float(rng.integers(3, 8))
        d0 = float(rng.uniform(0.55, 0.85))
        side_sel = (xc < 0) if f.side != "left" else (xc > 0)
        win = np.exp(-((d - d0) / 0.1) ** 2 - ((phase - k) / 0.7) ** 2) * side_sel
        rib_shift += 0.35 * win * np.clip((d - d0) / 0.01, -1.0, 1.0)  # displaced fragments
        rib_gap *= 1.0 - win * np.exp(-((d - d0) / 0.025) ** 2)  # lucent fracture line
        frac_geom.append((f, win > 0.08))  # the patch around the break that the displacement changes
    ph = phase + rib_shift
    rib_band = (0.5 + 0.5 * np.cos(ph * np.float32(2 * np.pi))) ** 8
    thorax = _sigmoid((1.08 - d) / 0.03) * _sigmoid((ph + 0.5) / 0.2) * _sigmoid((10.5 - ph) / 0.3)
    ribs = rib_band * thorax * rib_gap * (0.6 + 0.4 * d)
    clav = np.zeros_like(u)
    for sgn in (-1.0, 1.0):
        ax, ay = 0.5 + sgn * 0.05 * W, fr.y0 + 0.03 * H
        bx, by = 0.5 + sgn * 0.55 * W, fr.y0 - 0.06 * H
        lx, ly = bx - ax, by - ay
        ln = np.hypot(lx, ly)
        along = ((u - ax) * lx + (v - ay) * ly) / (ln * ln)
        across = ((u - ax) * ly - (v - ay) * lx) / ln
        clav = np.maximum(clav, _sigmoid((0.013 * W - np.abs(across)) / 0.002)
                          * _sigmoid(along / 0.03) * _sigmoid((1 - along) / 0.03))

    # --- density before findings.
    # Below the domes of the diaphragm everything is abdomen: uniformly dense, heart and mediastinum merge.
    abdomen = _sigmoid((v - np.float32(fr.y0 + 0.93 * H)) / 0.015)
    above = 1.0 - abdomen
    dens = (0.44 * body + 0.2 * abdomen * body + 0.16 * med * body * above
            + 0.1 * spine * (0.6 + 0.4 * vert) - 0.12 * trachea
            + p.heart_density * heart * above * (1.0 - med) + 0.1 * knob * (1 - lung) + 0.13 * ribs + 0.16 * clav - air)
    if p.female:
        for sgn in (-1.0, 1.0):
            dens += 0.07 * np.exp(-(((u - (0.5 + sgn * 0.32 * W)) / (0.16 * W)) ** 2
                                    + ((v - (fr.y0 + 0.95 * H)) / (0.12 * H)) ** 2))
    gas = np.exp(-(((u - (0.5 + 0.28 * W)) / (0.06 * W)) ** 2 + ((v - (fr.y0 + 1.05 * H)) / (0.03 * H)) ** 2))
    dens -= 0.12 * gas * (1 - lung)

    instances: list[Instance] = []
    mark_gain = np.ones_like(u)
    for i, f in enumerate(scene.findings):
        rng = _finding_rng(scene.seed, f, 0)
        sides = [0, 1] if f.side == "bilateral" else [1 if f.side == "left" else 0]
        side = sides[0]
        Ls = lung_l if side == 1 else lung_r
        top, bottom = fr.rows[side]
        span = bottom - top
        sev = {"mild": 0, "moderate": 1, "severe": 2}[f.severity]
        mask = None
        if f.name == "cardiomegaly":
            mask = (r2 < 1.0) & (v < fr.y0 + H)
        elif f.name == "enlarged_cardiomediastinum":
            mask = (upper_med > 0.5) & (np.abs(xs) > mw / 2)
        elif f.name in ("effusion", "elevated_diaphragm"):
            frac = [(0.1, 0.2), (0.22, 0.38), (0.4, 0.58)][sev] if f.name == "effusion" else (0.12, 0.22)
            level = bottom - rng.uniform(*frac) * span
            lat = (fr.tx / T) if side == 0 else (1.0 - fr.tx / T)  # 0 lateral .. 1 medial
            lat = np.clip(lat * 2.0, 0.0, 1.0)
            if f.name == "effusion":  # meniscus: the fluid climbs the lateral chest wall
                surface = level - 0.12 * span * (1.0 - lat) ** 2
            else:  # a dome, highest mid-hemithorax
                surface = level - 0.08 * span * (1.0 - (2 * lat - 1.0) ** 2)
            region = _sigmoid((fr.ty - surface) / 2.0) * Ls
            dens += region * (air * 1.05 + 0.04)
            mark_gain *= 1.0 - region
            mask = region > 0.5
        elif f.name in ("opacity", "consolidation", "pneumonia", "scarring", "atelectasis"):
            cx, cy = _sample_in_lung(fr, lungs2d, side, f.zone, rng)
            field_ = np.zeros_like(u)
            if f.name in ("atelectasis", "scarring"):
                ang = rng.uniform(-0.35, 0.35)
                la = (0.14 + 0.05 * sev) * T
                lb = (0.025 if f.name == "atelectasis" else 0.012) * T
                ca, sa = np.cos(ang), np.sin(ang)
                al = (fr.tx - cx) * ca + (fr.ty - cy) * sa
                ac = -(fr.tx - cx) * sa + (fr.ty - cy) * ca
                field_ = np.exp(-((al / la) ** 4) - (ac / lb) ** 2)
                strength = 0.8 if f.name == "atelectasis" else 0.6
            else:
                nblob = int(rng.integers(2, 5))
                base_r = (0.07 + 0.03 * sev) * T * (1.25 if f.name == "pneumonia" else 1.0)
                for _ in range(nblob):
                    bx = cx + rng.normal(0, base_r * 0.5)
                    by = cy + rng.normal(0, base_r * 0.5)
                    rr = base_r * rng.uniform(0.6, 1.1)
                    field_ = field_ + np.exp(-((fr.tx - bx) ** 2 + (fr.ty - by) ** 2) / np.float32(2 * rr * rr))
                strength = {"opacity": 0.55, "consolidation": 0.85, "pneumonia": 0.8}[f.name]
            region = np.clip((field_ - 0.3) * 2.5, 0.0, 1.0) * Ls
            if f.name in ("consolidation", "pneumonia"):
                region = region * (1.0 - 0.35 * tex)  # air bronchograms: branching lucencies in the opacity
            dens += strength * region * (air + 0.03)
            mask = region > 0.4
        elif f.name in ("nodule", "mass", "granuloma"):
            cx, cy = _sample_in_lung(fr, lungs2d, side, f.zone, rng)
            cu, cv = fr.to_canonical(cx, cy)
            rad = {"nodule": rng.uniform(0.011, 0.022) * (1 + 0.3 * sev), "mass": rng.uniform(0.04, 0.07),
                   "granuloma": rng.uniform(0.005, 0.009)}[f.name]
            rad = max(rad, 1.5 / s)  # at least a pixel and a half, so small images still show it
            du, dv = u - cu, v - cv
            rr = np.sqrt(du * du + dv * dv)
            if f.name == "mass":  # lobulated edge
                ang = np.arctan2(dv, du)
                rad_map = rad * (1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.06 * np.sin(5 * ang))
            else:
                rad_map = rad
            disc = _sigmoid((rad_map - rr) / np.float32(0.0015 + 0.05 * rad))
            strength = {"nodule": 0.35, "mass": 0.45, "granuloma": 0.6}[f.name]
            dens += strength * disc * (0.4 + 0.6 * np.maximum(lung, 0.3))
            mask = disc > 0.5
        elif f.name in ("pneumothorax", "pleural_thickening"):
            if f.name == "pneumothorax":
                fac = [(0.84, 0.9), (0.72, 0.82), (0.55, 0.68)][sev]
                fct = rng.uniform(*fac)
                ax_, ay_ = fr.hila[side][0], top + 0.85 * span  # collapse toward the hilum, base anchored
            else:
                fct = rng.uniform(0.92, 0.95)
                ax_, ay_ = fr.hila[side][0], top + 0.55 * span
            ctx = ax_ + (fr.tx - ax_) / fct
            cty = ay_ + (fr.ty - ay_) / fct
            collapsed = np.take(lungs_flat[p.template, side], _Frame._index(ctx, cty))
            region = np.clip(Ls - collapsed, 0.0, 1.0)
            if f.name == "pneumothorax":
                mark_gain *= 1.0 - region  # no lung markings beyond the pleural line
                line = 4.0 * collapsed * (1.0 - collapsed) * Ls
                dens += 0.1 * line - 0.1 * region
            else:
                dens += 0.5 * region * air
            mask = region > 0.5
        elif f.name == "edema":
            region = np.zeros_like(u)
            for sd in (0, 1):
                hxx, hyy = fr.hila[sd]
                haze = np.exp(-(((fr.tx - hxx) / (0.22 * T)) ** 2 + ((fr.ty - hyy) / (0.3 * T)) ** 2))
                region = region + haze * (lung_l if sd == 1 else lung_r)
            strength = 0.3 + 0.15 * sev
            dens += strength * region * air
            mark_gain *= 1.0 + 1.2 * region
            mask = region > 0.45
        elif f.name == "interstitial":
            mark_gain *= 1.8
            mask = lung > 0.5
        elif f.name == "fracture":
            mask = next(m for g, m in frac_geom if g is f)
        elif f.name in ("hyperinflation", "hypoinflation", "scoliosis"):
            mask = None  # global changes (lung height, spine curve): no local mask
        elif f.name == "device":
            continue  # drawn below with PIL
        if mask is not None and mask.any():
            instances.append(Instance(f, mask, _box(mask)))

    dens += 0.14 * markings * mark_gain
    if "hypoinflation" in names:
        dens += 0.05 * lung  # crowded markings, less air

    # --- devices and ECG leads: metal, drawn as polylines in canonical coordinates.
    devices = [f for f in scene.findings if f.name == "device"]
    if devices or scene.ecg_leads:
        metal = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(metal)
        lw = max(1, round(s / 160))
        for f in devices:
            layer = Image.new("L", (s, s), 0)
            ld = ImageDraw.Draw(layer)
            _draw_device(ld, f, fr, hx, hy, a, b, lw, _finding_rng(scene.seed, f, 0))
            m = np.asarray(layer) > 0
            if m.any():
                instances.append(Instance(f, m, _box(m)))
            metal.paste(255, mask=layer)
        rng = np.random.default_rng([scene.seed, 7])
        for _ in range(scene.ecg_leads):
            cu = 0.5 + rng.uniform(-0.6, 0.6) * W
            cv = fr.y0 + rng.uniform(-0.05, 0.9) * H
            x, y = fr.to_pixel(cu, cv)
            rad = 0.012 * s
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], outline=200, width=lw)
            ex, ey = fr.to_pixel(cu + rng.uniform(-0.2, 0.2), cv + rng.uniform(-0.3, 0.1))
            draw.line([(x, y), (ex, ey)], fill=120, width=lw)
        dens += np.asarray(metal, np.float32) * np.float32(0.9 / 255)

    # --- exposure, contrast, noise.
    dens = np.maximum(dens, 0.0)
    img = 1.0 - np.exp(-scene.exposure * dens)
    img *= np.float32(1.0 / (1.0 - np.exp(-scene.exposure * 1.0)))
    lo, hi = scene.window
    img = (img - lo) / (hi - lo)
    img = np.clip(img, 0.0, 1.0) ** np.float32(scene.gamma)
    img = img * (1.0 + np.float32(scene.heel) * (v - 0.5))
    noise_rng = np.random.default_rng([scene.seed, 0])
    img += noise_rng.standard_normal((s, s), dtype=np.float32) * np.float32(scene.noise)
    for text, mx, my, mh in scene.markers:
        g = glyph(text, max(6, round(mh * s)))
        x0, y0 = int(mx * s), int(my * s)
        gh, gw = min(g.shape[0], s - y0), min(g.shape[1], s - x0)
        if gh > 0 and gw > 0:
            sub = img[y0:y0 + gh, x0:x0 + gw]
            np.maximum(sub, g[:gh, :gw] * 0.97, out=sub)
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    anatomy = np.zeros((s, s), np.uint8)
    anatomy[lung_r > 0.5] = 1
    anatomy[lung_l > 0.5] = 2
    heart_mask = (r2 < 1.0) & (v < fr.y0 + H * 1.0)  # the ellipse whose width defines the CTR
    anatomy[heart_mask] = 3
    measured = _measure_ctr(heart_mask, (lung_r > 0.5) | (lung_l > 0.5))
    return Rendered(image=image, instances=instances, anatomy=anatomy, ctr=measured)


def _measure_ctr(heart: np.ndarray, lungs: np.ndarray) -> float:
    """Cardiothoracic ratio from masks: widest heart extent / widest lung-field extent (pixels)."""
    if not heart.any() or not lungs.any():
        return float("nan")
    hc = np.flatnonzero(heart.any(axis=0))
    lc = np.flatnonzero(lungs.any(axis=0))
    return float((hc[-1] - hc[0] + 1) / (lc[-1] - lc[0] + 1))


def _draw_device(draw: ImageDraw.ImageDraw, f: Finding, fr: _Frame, hx: float, hy: float, a: float, b: float,
                 lw: int, rng: np.random.Generator) -> None:
    """Draw one support device in canonical coordinates onto ``draw`` (image pixels)."""
    W, H, y0 = fr.W, fr.H, fr.y0
    kind = f.kind or str(rng.choice(DEVICE_KINDS))

    def path(points: list[tuple[float, float]], width: int) -> None:
        draw.line([fr.to_pixel(u, v) for u, v in points], fill=255, width=width, joint="curve")

    j = lambda: rng.normal(0, 0.01)  # noqa: E731 - small placement jitter
    if kind == "ett":
        tip = y0 + rng.uniform(0.18, 0.28) * H
        path([(0.495 + j(), -0.05), (0.497, y0 - 0.05), (0.498 + j(), tip)], lw + 1)
    elif kind == "ng_tube":
        path([(0.51, -0.05), (0.505 + j(), y0 + 0.4 * H), (0.52, y0 + H * 0.95),
              (0.5 + 0.22 * W + j(), y0 + H * 1.08)], lw)
    elif kind == "central_line":
        if rng.random() < 0.5:  # right subclavian
            pts = [(0.5 - 0.5 * W, y0 - 0.02), (0.5 - 0.22 * W, y0 + 0.04 * H), (0.5 - 0.08 * W, y0 + 0.1 * H)]
        else:  # right internal jugular
            pts = [(0.5 - 0.12 * W, -0.05), (0.5 - 0.1 * W, y0 + 0.02 * H)]
        pts.append((0.5 - 0.06 * W + j(), y0 + rng.uniform(0.35, 0.5) * H))
        path(pts, lw)
    elif kind == "pacemaker":
        gx, gy = 0.5 + rng.uniform(0.3, 0.42) * W, y0 + rng.uniform(0.0, 0.1) * H
        corners = [(gx - 0.04, gy - 0.025), (gx + 0.04, gy - 0.025), (gx + 0.04, gy + 0.025), (gx - 0.04, gy + 0.025)]
        draw.polygon([fr.to_pixel(u, v) for u, v in corners], fill=255)
        path([(gx - 0.03, gy), (0.5 + 0.02 * W, y0 + 0.2 * H), (0.5 - 0.02 * W, y0 + 0.45 * H),
              (hx + 0.4 * a, hy + 0.2 * b)], lw)
    else:  # sternotomy wires: small loops down the midline
        n = int(rng.integers(5, 8))
        for k in range(n):
            cu = 0.5 + rng.normal(0, 0.004)
            cv = y0 + (0.1 + 0.55 * k / max(1, n - 1)) * H
            x, y = fr.to_pixel(cu, cv)
            rx, ry = 0.012 * fr.size, 0.006 * fr.size
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], outline=255, width=lw)


def with_findings(scene: Scene, findings: list[Finding] | tuple[Finding, ...]) -> Scene:
    """The same patient, pose, exposure and noise with other findings (for before/after comparisons)."""
    return replace(scene, findings=tuple(findings))
