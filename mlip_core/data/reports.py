"""Radiology report text: MIMIC-style section parsing, cleaning, sentence splitting and the choice of text.

MIMIC-CXR reports are free text with upper-case section headers ("FINDINGS:", "IMPRESSION:", and variants
such as "FINDINGS AND IMPRESSION:", "IMPRESSIONS:", "CONCLUSION:"). The MGCA line of work trains on
impression + findings and drops studies where both are empty; we do the same but count those studies
(:class:`TextChoice` says why) so the caller can report them instead of crashing on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "ReportSections",
    "TextChoice",
    "choose_text",
    "clean_text",
    "parse_sections",
    "split_sentences",
]

# A header: start of a line, upper-case words (with spaces, '/', '&', '-'), then a colon.
_HEADER = re.compile(r"(?m)^[ \t]*([A-Z][A-Z /&\-]{1,60}?)[ \t]*:")

# Header name (upper case, single spaces) -> canonical section.
SECTION_ALIASES: dict[str, str] = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "FINDINGS/IMPRESSION": "findings_impression",
    "FINDINGS AND IMPRESSION": "findings_impression",
    "FINDINGS AND IMPRESSIONS": "findings_impression",
    "FINDINGS & IMPRESSION": "findings_impression",
    "IMPRESSION/FINDINGS": "findings_impression",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "SUMMARY": "impression",
    "OPINION": "impression",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "CLINICAL INDICATION": "indication",
    "HISTORY": "indication",
    "CLINICAL HISTORY": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR EXAMINATION": "indication",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "TECHNIQUE": "technique",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "WET READ": "wet_read",
    "NOTIFICATION": "notification",
    "RECOMMENDATION": "recommendation",
    "RECOMMENDATIONS": "recommendation",
    "ADDENDUM": "addendum",
}

_KNOWN_HEADER = re.compile(
    r"(?im)^[ \t]*(" + "|".join(re.escape(k) for k in sorted(SECTION_ALIASES, key=len, reverse=True)) + r")[ \t]*:"
)
_DEID = re.compile(r"_{2,}")  # MIMIC de-identification placeholders "___"
_SPACE = re.compile(r"\s+")
_LIST_MARK = re.compile(r"(?:(?<=\s)|^)\d{1,2}[.)](?=\s+[A-Za-z])")  # "1. " "2) " numbered list items


@dataclass
class ReportSections:
    """The sections of one report (cleaned text, '' when absent); ``other`` holds unrecognised headers."""

    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    technique: str = ""
    examination: str = ""
    other: dict[str, str] = field(default_factory=dict)
    last_paragraph: str = ""


@dataclass
class TextChoice:
    """The text chosen for training and where it came from: ``source`` is
    ``impression+findings``, ``impression``, ``findings``, ``last_paragraph`` or ``empty``."""

    text: str
    source: str

    @property
    def empty(self) -> bool:
        """True when the report gave no usable text (the study must be skipped and counted)."""
        return not self.text


def clean_text(text: str) -> str:
    """Collapse whitespace/newlines, normalise de-id placeholders to ``___``, strip list numbering."""
    text = _DEID.sub("___", text)
    text = _LIST_MARK.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def parse_sections(report: str) -> ReportSections:
    """Split a MIMIC-style report into sections by its upper-case ``HEADER:`` lines."""
    out = ReportSections()
    report = report.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [p for p in re.split(r"\n\s*\n", report) if p.strip()]
    out.last_paragraph = clean_text(paragraphs[-1]) if paragraphs else ""

    # Upper-case headers of any name, plus the known names in any case ("Findings:"), by position.
    found = {m.start(): m for m in _HEADER.finditer(report)}
    for m in _KNOWN_HEADER.finditer(report):
        found.setdefault(m.start(), m)
    matches = [found[k] for k in sorted(found)]
    for i, m in enumerate(matches):
        name = _SPACE.sub(" ", m.group(1)).strip().upper()
        end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
        body = clean_text(report[m.end() : end])
        canon = SECTION_ALIASES.get(name)
        if canon is None:
            out.other[name] = (out.other.get(name, "") + " " + body).strip()
            continue
        if canon == "findings_impression":
            # One combined section: the text serves as both (choose_text de-duplicates).
            out.findings = (out.findings + " " + body).strip()
            out.impression = (out.impression + " " + body).strip()
        elif canon in ("findings", "impression", "indication", "comparison", "technique", "examination"):
            setattr(out, canon, (getattr(out, canon) + " " + body).strip())
        else:
            out.other[name] = (out.other.get(name, "") + " " + body).strip()
    return out


def choose_text(sections: ReportSections | str, fallback_last_paragraph: bool = False) -> TextChoice:
    """Impression + findings (MGCA's choice); either alone when the other is empty; else empty.

    With ``fallback_last_paragraph`` a report without either header uses its last paragraph, as the
    MIMIC-CXR section parser does; off by default to match MGCA, which drops such studies.
    """
    if isinstance(sections, str):
        sections = parse_sections(sections)
    imp, fin = sections.impression, sections.findings
    if imp and fin:
        if imp == fin:
            return TextChoice(imp, "impression")  # one combined "FINDINGS AND IMPRESSION" section
        return TextChoice(f"{imp} {fin}", "impression+findings")
    if imp:
        return TextChoice(imp, "impression")
    if fin:
        return TextChoice(fin, "findings")
    if fallback_last_paragraph and sections.last_paragraph and not _HEADER.match(sections.last_paragraph):
        return TextChoice(sections.last_paragraph, "last_paragraph")
    return TextChoice("", "empty")


# Sentence ends: . ! ? followed by space and an upper-case letter, digit or de-id placeholder.
# Abbreviations common in reports are protected first.
_ABBREV = re.compile(r"\b(Dr|Mr|Mrs|Ms|vs|approx|e\.g|i\.e|St)\.", re.IGNORECASE)
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9_(\"'])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a cleaned report text, in order, without empties."""
    text = clean_text(text)
    if not text:
        return []
    protected = _ABBREV.sub(lambda m: m.group(0).replace(".", "\x00"), text)
    parts = _SENT_END.split(protected)
    return [p.replace("\x00", ".").strip() for p in parts if p.strip()]
