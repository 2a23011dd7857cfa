"""The renderer's finding vocabulary, its CheXpert columns, and the mapping from IU MeSH terms to findings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlip_core.data.iu import parse_mesh_term
from mlip_core.knowledge.graph import CHEXPERT_14

__all__ = ["Finding", "CHEXPERT_COLUMNS", "FINDING_TO_CHEXPERT", "RENDERED_FINDINGS", "DEVICE_KINDS",
           "findings_from_mesh", "chexpert_row"]

# The 14 CheXpert observations, in the column order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_COLUMNS: list[str] = list(CHEXPERT_14)

# Renderer finding -> CheXpert column (None: drawn and recorded, but not one of the 14 observations).
FINDING_TO_CHEXPERT: dict[str, str | None] = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
    "fracture": "Fracture",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "opacity": "Lung Opacity",
    "effusion": "Pleural Effusion",
    "pleural_thickening": "Pleural Other",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "device": "Support Devices",
    "granuloma": None,
    "scarring": None,
    "interstitial": None,
    "hyperinflation": None,
    "hypoinflation": None,
    "elevated_diaphragm": None,
    "scoliosis": None,
}
RENDERED_FINDINGS: list[str] = list(FINDING_TO_CHEXPERT)
DEVICE_KINDS: list[str] = ["ett", "ng_tube", "central_line", "pacemaker", "sternotomy"]
SIDED = {"atelectasis", "consolidation", "nodule", "mass", "opacity", "effusion", "pleural_thickening", "pneumonia",
         "pneumothorax", "fracture", "granuloma", "scarring", "elevated_diaphragm"}
ZONED = {"atelectasis", "consolidation", "nodule", "mass", "opacity", "pneumonia", "granuloma", "scarring"}


@dataclass(frozen=True)
class Finding:
    """One finding to draw. ``side`` is the patient's ("right" is image left on a PA view); ``zone`` is
    upper/middle/lower lung; ``kind`` refines devices (ett, ng_tube, ...) and fractures (rib)."""

    name: str
    side: str = ""
    zone: str = ""
    severity: str = "mild"
    kind: str = ""
    uncertain: bool = False

    def __post_init__(self) -> None:
        if self.name not in FINDING_TO_CHEXPERT:
            raise ValueError(f"unknown finding {self.name!r}; known: {', '.join(RENDERED_FINDINGS)}")
        if self.side not in ("", "left", "right", "bilateral"):
            raise ValueError(f"side must be left/right/bilateral or empty, got {self.side!r}")
        if self.severity not in ("mild", "moderate", "severe"):
            raise ValueError(f"severity must be mild/moderate/severe, got {self.severity!r}")

    @property
    def chexpert(self) -> str | None:
        """The CheXpert column this finding labels, or None."""
        return FINDING_TO_CHEXPERT[self.name]


# MeSH heading (lower case) -> renderer finding. Headings not listed (degenerative spine, tortuous aorta,
# osteophytes, ...) are left undrawn: the report still mentions them, as a real report mentions what a model
# cannot learn from a small image.
_MESH: dict[str, str] = {
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "effusion",
    "hydropneumothorax": "pneumothorax",
    "opacity": "opacity",
    "airspace disease": "opacity",
    "density": "opacity",
    "infiltrate": "opacity",
    "consolidation": "consolidation",
    "pneumonia": "pneumonia",
    "pulmonary atelectasis": "atelectasis",
    "atelectasis": "atelectasis",
    "nodule": "nodule",
    "mass": "mass",
    "calcified granuloma": "granuloma",
    "granuloma": "granuloma",
    "granulomatous disease": "granuloma",
    "cicatrix": "scarring",
    "pneumothorax": "pneumothorax",
    "pulmonary edema": "edema",
    "pulmonary congestion": "edema",
    "heart failure": "edema",
    "fractures, bone": "fracture",
    "emphysema": "hyperinflation",
    "pulmonary emphysema": "hyperinflation",
    "pulmonary disease, chronic obstructive": "hyperinflation",
    "lung, hyperlucent": "hyperinflation",
    "lung diseases, interstitial": "interstitial",
    "pulmonary fibrosis": "interstitial",
    "scoliosis": "scoliosis",
    "catheters, indwelling": "device",
    "tube, inserted": "device",
    "implanted medical device": "device",
    "medical device": "device",
    "surgical instruments": "device",
    "sutures": "device",
    "stents": "device",
    "diaphragmatic eventration": "elevated_diaphragm",
}
_SEVERITY = {"borderline": "mild", "mild": "mild", "small": "mild", "minimal": "mild", "trace": "mild",
             "moderate": "moderate", "severe": "severe", "large": "severe", "massive": "severe"}
_ZONE = {"upper lobe": "upper", "apex": "upper", "middle lobe": "middle", "lingula": "middle", "hilum": "middle",
         "lower lobe": "lower", "base": "lower", "retrocardiac": "lower", "costophrenic angle": "lower"}
_SEV_RANK = {"mild": 0, "moderate": 1, "severe": 2}


def _map_term(term: str) -> tuple[str | None, list[str]]:
    """One MeSH string -> (renderer finding or None, lower-cased qualifiers)."""
    t = parse_mesh_term(term)
    head = t.finding.lower()
    quals = [q.lower() for q in t.qualifiers]
    qs = set(quals)
    if head == "lung" and "hypoinflation" in qs:
        return "hypoinflation", quals
    if head == "lung" and "hyperdistention" in qs:
        return "hyperinflation", quals
    if head == "diaphragm" and "flattened" in qs:
        return "hyperinflation", quals
    if head == "diaphragm" and "elevated" in qs:
        return "elevated_diaphragm", quals
    if head == "costophrenic angle" and "blunted" in qs:
        return "effusion", quals + ["small"]
    if head == "calcinosis" and qs & {"lung", "lymph nodes", "hilum"}:
        return "granuloma", quals
    if head in ("cardiac shadow", "heart") and "enlarged" in qs:
        return "cardiomegaly", quals
    if head == "mediastinum" and qs & {"enlarged", "prominent", "widened"}:
        return "enlarged_cardiomediastinum", quals
    if head == "markings" and qs & {"interstitial", "prominent"}:
        return "interstitial", quals
    if head in ("pleura", "thickening") and ("thickening" in qs or head == "thickening"):
        return "pleural_thickening", quals
    return _MESH.get(head), quals


def _device_kind(head: str, quals: list[str], rng: np.random.Generator) -> str:
    if head == "catheters, indwelling":
        return "central_line"
    if head == "tube, inserted":
        return str(rng.choice(["ett", "ng_tube"]))
    if head in ("sutures", "surgical instruments") or "sternum" in quals:
        return "sternotomy"
    return "pacemaker"


def findings_from_mesh(terms: list[str], rng: np.random.Generator) -> tuple[list[Finding], list[str]]:
    """IU MeSH major terms -> (findings to draw, terms left undrawn). Missing sides/zones are drawn from ``rng``;
    "bilateral" becomes one finding per side (one mask each), except edema, which is bilateral by nature.
    "normal" and "No Indexing" yield no findings; text negations never reach here (MeSH lists positives only)."""
    found: dict[tuple[str, str, str, str], Finding] = {}
    undrawn: list[str] = []
    for term in terms:
        name, quals = _map_term(term)
        if name is None:
            if term.strip().lower() not in ("normal", "no indexing"):
                undrawn.append(term)
            continue
        qs = set(quals)
        severity = "mild"
        for q in quals:
            if q in _SEVERITY and _SEV_RANK[_SEVERITY[q]] > _SEV_RANK[severity]:
                severity = _SEVERITY[q]
        zone = next((_ZONE[q] for q in quals if q in _ZONE), "")
        if name in ZONED and not zone:
            zone = str(rng.choice(["upper", "middle", "lower"], p=[0.25, 0.3, 0.45]))
        if name == "effusion":
            zone = "lower"
        kind = _device_kind(parse_mesh_term(term).finding.lower(), quals, rng) if name == "device" else ""
        if name == "fracture":
            kind = "rib"
        if name in SIDED:
            if "bilateral" in qs or ("left" in qs and "right" in qs):
                sides = ["right", "left"]
            elif "left" in qs:
                sides = ["left"]
            elif "right" in qs:
                sides = ["right"]
            else:
                sides = [str(rng.choice(["right", "left"]))]
        else:
            sides = ["bilateral"] if name == "edema" else [""]
        count = 3 if ("multiple" in qs or "scattered" in qs) and name in ("nodule", "granuloma") else 1
        for side in sides:
            for k in range(count):
                z = zone if k == 0 else str(rng.choice(["upper", "middle", "lower"]))
                key = (name, side, z, kind)
                old = found.get(key)
                if old is None or _SEV_RANK[severity] > _SEV_RANK[old.severity]:
                    found[key] = Finding(name, side=side, zone=z, severity=severity, kind=kind)
    return list(found.values()), undrawn


def chexpert_row(present: list[Finding], negated: set[str] = frozenset()) -> dict[str, float]:
    """CheXpert-convention labels for a study: 1.0 present, -1.0 present but hedged in the report, 0.0 negated in
    the report, NaN (blank) unmentioned. "No Finding" is 1.0 when no other observation except Support Devices
    is positive or uncertain, as in the CheXpert labeler."""
    row = {c: float("nan") for c in CHEXPERT_COLUMNS}
    for c in negated:
        row[c] = 0.0
    for f in present:
        col = f.chexpert
        if col is None:
            continue
        value = -1.0 if f.uncertain else 1.0
        if np.isnan(row[col]) or row[col] != 1.0:
            row[col] = value
    pathology = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")]
    if not any(row[c] in (1.0, -1.0) for c in pathology):
        row["No Finding"] = 1.0
    return row
