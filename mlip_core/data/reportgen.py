"""Template radiology reports: fully synthetic image-report pairs and test text with known labels.

A report is built from the findings that were drawn: each positive finding gets a sentence (synonyms, side,
zone, severity), hedged findings get a hedge ("possible", "cannot exclude"), and a few absent findings are
negated explicitly ("No pneumothorax."), as radiologists do. The generator returns the CheXpert columns it
negated, so the labels of a template report are known exactly, hedges (-1) and negations (0) included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mlip_core.data.synth_findings import DEVICE_KINDS, Finding

__all__ = ["GeneratedReport", "sample_findings", "generate_report", "PRIOR"]

# Per-study probability of each finding in a fully synthetic study (roughly IU X-ray prevalence, with more
# of the rarer CheXpert findings so that every class has examples in a few thousand studies).
PRIOR: dict[str, float] = {
    "cardiomegaly": 0.12, "effusion": 0.09, "opacity": 0.1, "consolidation": 0.04, "pneumonia": 0.04,
    "atelectasis": 0.09, "nodule": 0.05, "mass": 0.02, "pneumothorax": 0.03, "edema": 0.04, "fracture": 0.03,
    "device": 0.1, "granuloma": 0.1, "enlarged_cardiomediastinum": 0.02, "pleural_thickening": 0.02,
    "hyperinflation": 0.06, "hypoinflation": 0.06, "scoliosis": 0.03, "elevated_diaphragm": 0.02,
}
_SIDED = {"effusion", "opacity", "consolidation", "pneumonia", "atelectasis", "nodule", "mass", "pneumothorax",
          "fracture", "granuloma", "pleural_thickening", "elevated_diaphragm"}
_ZONED = {"opacity", "consolidation", "pneumonia", "atelectasis", "nodule", "mass", "granuloma"}


@dataclass
class GeneratedReport:
    """A template report: ``findings`` and ``impression`` text, the ``present`` findings (with ``uncertain``
    set where the text hedges) and the CheXpert columns the text ``negated``."""

    findings: str
    impression: str
    present: list[Finding]
    negated: set[str]

    @property
    def text(self) -> str:
        """MIMIC-style report body."""
        return f"FINDINGS: {self.findings}\n\nIMPRESSION: {self.impression}"


def sample_findings(rng: np.random.Generator, prior: dict[str, float] | None = None,
                    uncertain_prob: float = 0.12) -> list[Finding]:
    """Draw a finding set for a synthetic study: independent draws from ``prior``; sides, zones, severity,
    device kinds at random; ``uncertain_prob`` of the findings will be hedged in the report."""
    prior = PRIOR if prior is None else prior
    out: list[Finding] = []
    for name, p in prior.items():
        if rng.random() >= p:
            continue
        if name == "hyperinflation" and any(f.name == "hypoinflation" for f in out):
            continue
        side = str(rng.choice(["right", "left"])) if name in _SIDED else ("bilateral" if name == "edema" else "")
        zone = str(rng.choice(["upper", "middle", "lower"], p=[0.25, 0.3, 0.45])) if name in _ZONED else ""
        if name == "effusion":
            zone = "lower"
        severity = str(rng.choice(["mild", "moderate", "severe"], p=[0.55, 0.3, 0.15]))
        kind = str(rng.choice(DEVICE_KINDS)) if name == "device" else ("rib" if name == "fracture" else "")
        uncertain = bool(rng.random() < uncertain_prob) and name not in ("device", "hyperinflation",
                                                                           "hypoinflation", "scoliosis")
        out.append(Finding(name, side=side, zone=zone, severity=severity, kind=kind, uncertain=uncertain))
        if name == "effusion" and rng.random() < 0.3:  # bilateral effusions are common
            other = "left" if side == "right" else "right"
            out.append(Finding(name, side=other, zone=zone, severity=severity, uncertain=uncertain))
    return out


_ZONE_WORDS = {"upper": ["upper lobe", "upper zone", "apex"], "middle": ["mid lung", "perihilar region", "midzone"],
               "lower": ["lower lobe", "base", "lung base"]}
_SEV = {"mild": ["small", "mild", "minimal"], "moderate": ["moderate", "moderate-sized"], "severe": ["large", "severe"]}
_HEDGES = ["possible {x}", "{x} cannot be excluded", "findings may represent {x}", "questionable {x}",
           "probable {x}"]
_DEVICE_WORDS = {"ett": "endotracheal tube with tip above the carina", "ng_tube": "enteric tube coursing below the diaphragm",
                 "central_line": "right-sided central venous catheter with tip in the SVC",
                 "pacemaker": "left chest wall pacemaker with lead in the right ventricle",
                 "sternotomy": "median sternotomy wires"}
_NEGATIONS = {
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."],
    "Consolidation": ["No focal consolidation.", "There is no focal airspace consolidation."],
    "Edema": ["No pulmonary edema.", "There is no evidence of pulmonary edema."],
    "Cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is not enlarged."],
    "Fracture": ["No acute displaced rib fracture.", "No fracture is identified."],
    "Lung Lesion": ["No suspicious pulmonary nodule or mass."],
    "Pneumonia": ["No evidence of pneumonia."],
}


_PLURAL = ("hyperinflated lungs", "low lung volumes", "median sternotomy wires", "increased interstitial markings")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(f: Finding, rng: np.random.Generator) -> str:
    side = f.side if f.side in ("left", "right") else ""
    if f.zone:
        zone = _pick(rng, _ZONE_WORDS[f.zone])
        return f"in the {side} {zone}".replace("  ", " ") if side else f"in the {zone}s"
    return f"on the {side}" if side else ""


def _phrase(f: Finding, rng: np.random.Generator) -> str | None:
    """The noun phrase for one finding, or None for findings that reports rarely name (scoliosis is named)."""
    sev = _pick(rng, _SEV[f.severity])
    where = _where(f, rng)
    n = f.name
    if n == "cardiomegaly":
        return _pick(rng, [f"{f.severity} cardiomegaly", f"{f.severity} enlargement of the cardiac silhouette"])
    if n == "effusion":
        return f"{sev} {f.side} pleural effusion".replace("  ", " ")
    if n == "opacity":
        return f"{_pick(rng, ['patchy opacity', 'hazy opacity', 'airspace opacity', 'opacification'])} {where}"
    if n == "consolidation":
        return f"{_pick(rng, ['focal consolidation', 'airspace consolidation', 'dense consolidation'])} {where}"
    if n == "pneumonia":
        return f"{_pick(rng, ['pneumonia', 'infectious consolidation compatible with pneumonia'])} {where}"
    if n == "atelectasis":
        return f"{_pick(rng, ['subsegmental atelectasis', 'plate-like atelectasis', 'atelectasis'])} {where}"
    if n == "nodule":
        return f"{_pick(rng, ['a nodule', 'a pulmonary nodule', 'a nodular opacity'])} {where}"
    if n == "mass":
        return f"{_pick(rng, ['a mass', 'a large rounded mass', 'a masslike opacity'])} {where}"
    if n == "granuloma":
        return f"a calcified granuloma {where}"
    if n == "pneumothorax":
        return f"{sev} {f.side} {_pick(rng, ['pneumothorax', 'apical pneumothorax'])}"
    if n == "edema":
        return _pick(rng, [f"{f.severity} pulmonary edema", f"{f.severity} interstitial edema",
                           "perihilar haziness consistent with pulmonary edema"])
    if n == "fracture":
        return f"a {_pick(rng, ['fracture of a', 'displaced fracture of a'])} {f.side} rib".replace("  ", " ")
    if n == "device":
        return _DEVICE_WORDS.get(f.kind, "a support device")
    if n == "enlarged_cardiomediastinum":
        return "widening of the mediastinum"
    if n == "pleural_thickening":
        return f"{f.side} pleural thickening"
    if n == "hyperinflation":
        return "hyperinflated lungs"
    if n == "hypoinflation":
        return "low lung volumes"
    if n == "scoliosis":
        return "scoliosis of the thoracic spine"
    if n == "elevated_diaphragm":
        return f"elevation of the {f.side} hemidiaphragm"
    if n == "scarring":
        return f"linear scarring {where}"
    if n == "interstitial":
        return "increased interstitial markings"
    return None


def generate_report(findings: list[Finding], rng: np.random.Generator, negation_prob: float = 0.6) -> GeneratedReport:
    """Write a FINDINGS / IMPRESSION report for ``findings``; hedge the uncertain ones; negate some absent ones."""
    sentences: list[str] = []
    impression: list[str] = []
    for f in findings:
        phrase = _phrase(f, rng)
        if phrase is None:
            continue
        phrase = " ".join(phrase.split())
        if f.uncertain:
            text = _pick(rng, _HEDGES).format(x=phrase)
            sentences.append(text[0].upper() + text[1:] + ".")
        else:
            plural = phrase.startswith(_PLURAL)
            lead = _pick(rng, ["{X}.", "Redemonstration of {x}."] if plural else
                         ["There is {x}.", "{X}.", "{X} is seen.", "Redemonstration of {x}."])
            text = lead.replace("{x}", phrase).replace("{X}", phrase[0].upper() + phrase[1:])
            sentences.append(text)
        if f.name not in ("granuloma", "scoliosis", "hypoinflation", "hyperinflation", "scarring") and len(impression) < 3:
            impression.append(("Possible " if f.uncertain else "") + phrase)
    present_cols = {f.chexpert for f in findings if f.chexpert}
    negated: set[str] = set()
    for col, options in _NEGATIONS.items():
        if col not in present_cols and rng.random() < negation_prob:
            sentences.append(_pick(rng, options))
            negated.add(col)
    if not any(f.chexpert for f in findings):
        sentences.insert(0, _pick(rng, ["The lungs are clear.", "Lungs are well expanded and clear.",
                                        "The cardiomediastinal silhouette is within normal limits."]))
    order = rng.permutation(len(sentences))
    # Keep the first sentence first (positives lead), shuffle the rest for variety.
    body = [sentences[0]] + [sentences[i] for i in order if i != 0] if sentences else []
    if impression:
        imp = "; ".join(impression)
        imp = imp[0].upper() + imp[1:] + "."
    else:
        imp = _pick(rng, ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                          "Normal chest radiograph."])
    return GeneratedReport(findings=" ".join(body), impression=imp, present=[replace(f) for f in findings],
                           negated=negated)
