"""Import a knowledge graph from a licensed UMLS Metathesaurus release (Rich Release Format, pipe-delimited).

Reads ``MRCONSO.RRF`` (names), ``MRSTY.RRF`` (semantic types), ``MRDEF.RRF`` (definitions) and ``MRREL.RRF``
(relations) from one folder (``.../META``), restricted to a list of CUIs and/or semantic types. UMLS needs a
licence (https://www.nlm.nih.gov/research/umls/), so nothing here downloads anything; the book uses the
curated ``radiology_kg.yaml`` by default and this importer when a user points it at their own release.

Relations follow the Metathesaurus convention that a row ``CUI1 | ... | REL | CUI2 | ... | RELA`` is read
right to left: CUI2 has relation REL/RELA to CUI1 (so ``CHD``/``isa`` means "CUI2 is a CUI1").
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from mlip_core.knowledge.graph import Entity, normalize_term

# Column layouts of the RRF files (UMLS Reference Manual, section 3.3).
MRCONSO_COLUMNS = ["CUI", "LAT", "TS", "LUI", "STT", "SUI", "ISPREF", "AUI", "SAUI", "SCUI", "SDUI", "SAB", "TTY",
                   "CODE", "STR", "SRL", "SUPPRESS", "CVF"]
MRSTY_COLUMNS = ["CUI", "TUI", "STN", "STY", "ATUI", "CVF"]
MRDEF_COLUMNS = ["CUI", "AUI", "ATUI", "SATUI", "SAB", "DEF", "SUPPRESS", "CVF"]
MRREL_COLUMNS = ["CUI1", "AUI1", "STYPE1", "REL", "CUI2", "AUI2", "STYPE2", "RELA", "RUI", "SRUI", "SAB", "SL",
                 "RG", "DIR", "SUPPRESS", "CVF"]

# Semantic types (by name) that make an entity anatomy / device rather than finding.
_ANATOMY_STY = {"Body Part, Organ, or Organ Component", "Body Location or Region", "Body Space or Junction",
                "Tissue", "Body System", "Anatomical Structure"}
_DEVICE_STY = {"Medical Device", "Research Device", "Drug Delivery Device"}
_SPATIAL_STY = {"Spatial Concept"}
_SUPPRESSED = {"O", "E"}  # obsolete, editor-suppressed ("Y" = suppressible by the user: kept)
_TAG = re.compile(r"<[^>]+>")


def read_rrf(path: Path, columns: list[str]) -> Iterator[dict[str, str]]:
    """Rows of one RRF file as dicts (each line ends with a trailing '|'); errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; point rrf_dir at the META folder of a UMLS release "
                                f"(it holds {path.name})")
    with path.open(encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if row[-1] == "":
                row = row[:-1]
            if len(row) != len(columns):
                raise ValueError(f"{path}:{lineno}: expected {len(columns)} fields, found {len(row)}; "
                                 f"is this a {path.name} from a Rich Release Format release?")
            yield dict(zip(columns, row))


def _category(semantic_types: list[str]) -> str:
    if any(s in _DEVICE_STY for s in semantic_types):
        return "device"
    if any(s in _ANATOMY_STY for s in semantic_types):
        return "anatomy"
    if any(s in _SPATIAL_STY for s in semantic_types):
        return "laterality"
    return "finding"


def _relation(rel: str, rela: str) -> tuple[str, bool] | None:
    """(our relation, True if it points CUI2 -> CUI1) for one MRREL row, or None to skip it."""
    rela = rela.lower()
    if rela == "isa" or (not rela and rel == "CHD"):
        return "is_a", True  # CUI2 is a CUI1
    if rela == "inverse_isa" or (not rela and rel == "PAR"):
        return "is_a", False  # CUI1 is a CUI2
    if rela in ("has_finding_site", "has_location", "has_direct_procedure_site"):
        return "located_in", True  # CUI2 has_finding_site CUI1: CUI2 located in CUI1
    if rela in ("finding_site_of", "location_of"):
        return "located_in", False
    if rela in ("co-occurs_with", "co_occurs_with", "associated_with", "has_associated_finding",
                "associated_finding_of"):
        return "co_occurs_with", True
    if rela in ("may_be_finding_of", "manifestation_of"):
        return "suggestive_of", True  # CUI2 may be a finding of CUI1
    if rela in ("has_manifestation", "may_be_cause_of"):
        return "suggestive_of", False  # CUI1 is a manifestation of CUI2
    return None


def read_umls(
    rrf_dir: str | Path,
    cuis: Iterable[str] | None = None,
    semantic_types: Iterable[str] | None = None,
    language: str = "ENG",
    max_synonyms: int = 30,
) -> tuple[list[Entity], list[tuple[str, str, str]]]:
    """Entities (id = CUI) and (source, relation, target) triples for the selected concepts.

    A concept is selected when its CUI is in ``cuis`` or one of its semantic types (name like "Finding" or
    TUI like "T033") is in ``semantic_types``; with both None every concept is selected.
    """
    rrf_dir = Path(rrf_dir)
    want_cuis = {c.strip().upper() for c in cuis} if cuis is not None else None
    want_sty = {s.strip() for s in semantic_types} if semantic_types is not None else None

    stys: dict[str, list[str]] = defaultdict(list)
    tuis: dict[str, set[str]] = defaultdict(set)
    for row in read_rrf(rrf_dir / "MRSTY.RRF", MRSTY_COLUMNS):
        stys[row["CUI"]].append(row["STY"])
        tuis[row["CUI"]].add(row["TUI"])

    def selected(cui: str) -> bool:
        if want_cuis is None and want_sty is None:
            return True
        if want_cuis is not None and cui in want_cuis:
            return True
        if want_sty is not None:
            return bool(want_sty & (set(stys.get(cui, [])) | tuis.get(cui, set())))
        return False

    names: dict[str, list[tuple[int, str]]] = defaultdict(list)
    order: list[str] = []
    for row in read_rrf(rrf_dir / "MRCONSO.RRF", MRCONSO_COLUMNS):
        cui = row["CUI"]
        if row["LAT"] != language or row["SUPPRESS"] in _SUPPRESSED or not selected(cui):
            continue
        if cui not in names:
            order.append(cui)
        # Preferred name first: TS=P (preferred term), STT=PF (preferred form), ISPREF=Y (preferred atom).
        rank = (row["TS"] != "P") * 4 + (row["STT"] != "PF") * 2 + (row["ISPREF"] != "Y")
        names[cui].append((rank, row["STR"]))

    definitions: dict[str, str] = {}
    for row in read_rrf(rrf_dir / "MRDEF.RRF", MRDEF_COLUMNS):
        if row["CUI"] in names and row["CUI"] not in definitions and row["SUPPRESS"] not in _SUPPRESSED:
            definitions[row["CUI"]] = _TAG.sub("", row["DEF"]).strip()

    entities = []
    for cui in order:
        ranked = [s for _, s in sorted(names[cui], key=lambda t: t[0])]
        preferred = ranked[0]
        synonyms = list(dict.fromkeys(normalize_term(s) for s in ranked))[:max_synonyms]
        sty_names = stys.get(cui, [])
        entities.append(Entity(id=cui, name=preferred, cui=cui, synonyms=synonyms,
                               definition=definitions.get(cui, ""), semantic_type=sty_names[0] if sty_names else "",
                               category=_category(sty_names)))

    relations: set[tuple[str, str, str]] = set()
    for row in read_rrf(rrf_dir / "MRREL.RRF", MRREL_COLUMNS):
        c1, c2 = row["CUI1"], row["CUI2"]
        if c1 == c2 or c1 not in names or c2 not in names or row["SUPPRESS"] in _SUPPRESSED:
            continue
        mapped = _relation(row["REL"], row["RELA"])
        if mapped is None:
            continue
        rel, cui2_is_source = mapped
        relations.add((c2, rel, c1) if cui2_is_source else (c1, rel, c2))
        if rel == "co_occurs_with":  # symmetric: store both directions so neighbors() finds it from either end
            relations.add((c1, rel, c2))
            relations.add((c2, rel, c1))
    return entities, sorted(relations)
