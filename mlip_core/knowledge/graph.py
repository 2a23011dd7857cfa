"""The radiology knowledge graph: entities (findings, devices, anatomy), synonyms, definitions, relations.

The default graph is read from ``radiology_kg.yaml`` (curated, reviewed facts shipped with the package).
A graph of the same shape can be built from a licensed UMLS release with :meth:`KnowledgeGraph.from_umls`
(see :mod:`mlip_core.knowledge.umls`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import yaml

# The 14 CheXpert observations, in the column order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_14: list[str] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]

RELATIONS: tuple[str, ...] = ("is_a", "located_in", "suggestive_of", "co_occurs_with")
CATEGORIES: tuple[str, ...] = ("finding", "device", "anatomy", "laterality", "other")
DEFAULT_KG_PATH = Path(__file__).with_name("radiology_kg.yaml")
_CUI = re.compile(r"^C\d{7}$")
_SEP = re.compile(r"[\s\-]+")


def normalize_term(text: str) -> str:
    """Lower-case, hyphens and runs of whitespace folded to one space: the key every surface form is stored under."""
    return _SEP.sub(" ", text.strip().lower())


def plural_forms(term: str) -> list[str]:
    """The term and its regular English plurals (last word inflected): effusion -> effusions, opacity -> opacities."""
    forms = [term]
    last = term.rsplit(" ", 1)[-1]
    if not last or not last[-1].isalpha() or len(last) < 3:
        return forms
    if last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        forms.append(term[:-1] + "ies")
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        forms.append(term + "es")
    else:
        forms.append(term + "s")
    return forms


@dataclass
class Entity:
    """One concept of the knowledge base; ``category`` is finding | device | anatomy | laterality | other."""

    id: str
    name: str
    cui: str = ""
    synonyms: list[str] = field(default_factory=list)
    definition: str = ""
    semantic_type: str = ""
    category: str = "finding"
    chexpert: str = ""
    patterns: list[str] = field(default_factory=list)
    negative_patterns: list[str] = field(default_factory=list)
    mesh: list[str] = field(default_factory=list)
    mesh_includes_narrower: bool = False
    side: str = ""

    def text(self) -> str:
        """``"name: definition (synonyms: a, b, ...)"``, the string the text tower embeds for this entity."""
        syn = [s for s in self.synonyms if normalize_term(s) != normalize_term(self.name)]
        tail = f" (synonyms: {', '.join(syn)})" if syn else ""
        return f"{self.name}: {self.definition}{tail}"


class KnowledgeGraph:
    """Entities plus typed relations, held in a ``networkx.MultiDiGraph`` (edge key = relation name)."""

    def __init__(self, entities: Iterable[Entity], relations: Iterable[tuple[str, str, str]] = ()) -> None:
        """Build from entities (order kept: an entity's index is its position) and (source, relation, target) triples."""
        self._entities: dict[str, Entity] = {}
        for ent in entities:
            if ent.id in self._entities:
                raise ValueError(f"duplicate entity id {ent.id!r}")
            if ent.category not in CATEGORIES:
                raise ValueError(f"entity {ent.id!r}: category {ent.category!r} is not one of {CATEGORIES}")
            if ent.chexpert and ent.chexpert not in CHEXPERT_14:
                raise ValueError(f"entity {ent.id!r}: chexpert {ent.chexpert!r} is not a CheXpert observation")
            self._entities[ent.id] = ent
        self.entity_ids: list[str] = list(self._entities)
        self._index = {eid: i for i, eid in enumerate(self.entity_ids)}
        self.graph = nx.MultiDiGraph()
        for eid, ent in self._entities.items():
            self.graph.add_node(eid, name=ent.name, category=ent.category, cui=ent.cui)
        for src, rel, dst in relations:
            for node in (src, dst):
                if node not in self._entities:
                    raise ValueError(f"relation {src} -{rel}-> {dst}: unknown entity {node!r}")
            if not self.graph.has_edge(src, dst, key=rel):
                self.graph.add_edge(src, dst, key=rel, relation=rel)
        self._lookup = self._build_lookup()

    def fingerprint(self) -> str:
        """A short hash of the entities (names, synonyms, definitions, categories) and relations: what keys
        a cache built from mentions found with this graph."""
        import hashlib

        edges = sorted((u, k, v) for u, v, k in self.graph.edges(keys=True))
        return hashlib.sha1(repr((list(self._entities.values()), edges)).encode("utf-8")).hexdigest()[:16]

    # ------------------------------------------------------------------ construction
    @classmethod
    def load_default(cls) -> "KnowledgeGraph":
        """The curated chest X-ray knowledge base shipped in ``radiology_kg.yaml``."""
        return cls.from_yaml(DEFAULT_KG_PATH)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "KnowledgeGraph":
        """Read a knowledge base file in the ``radiology_kg.yaml`` format."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read knowledge base ({exc}); fix the YAML or point to another file") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entities"), list):
            raise ValueError(f"{path}: expected a mapping with an 'entities' list")
        entities, relations = [], []
        known = set(Entity.__dataclass_fields__)
        for i, raw in enumerate(data["entities"]):
            if not isinstance(raw, dict) or "id" not in raw or "name" not in raw:
                raise ValueError(f"{path}: entity #{i} needs at least 'id' and 'name'")
            rels = raw.get("relations") or {}
            for rel, targets in rels.items():
                if rel not in RELATIONS:
                    raise ValueError(f"{path}: entity {raw['id']!r} has unknown relation {rel!r}; use one of {RELATIONS}")
                relations += [(raw["id"], rel, t) for t in targets or []]
            unknown = set(raw) - known - {"relations"}
            if unknown:
                raise ValueError(f"{path}: entity {raw['id']!r} has unknown fields {sorted(unknown)}")
            fields = {k: v for k, v in raw.items() if k in known}
            for key in ("synonyms", "patterns", "negative_patterns", "mesh"):
                fields[key] = [str(s) for s in (fields.get(key) or [])]
            for key in ("cui", "definition", "semantic_type", "chexpert", "side"):
                fields[key] = str(fields.get(key) or "")
            entities.append(Entity(**fields))
        return cls(entities, relations)

    @classmethod
    def from_umls(
        cls,
        rrf_dir: str | Path,
        cuis: Iterable[str] | None = None,
        semantic_types: Iterable[str] | None = None,
    ) -> "KnowledgeGraph":
        """Build a graph from a UMLS release (MRCONSO/MRDEF/MRREL/MRSTY.RRF) restricted to CUIs and/or semantic types."""
        from mlip_core.knowledge.umls import read_umls

        entities, relations = read_umls(rrf_dir, cuis=cuis, semantic_types=semantic_types)
        return cls(entities, relations)

    def _build_lookup(self) -> dict[str, str]:
        table: dict[str, str] = {}
        for eid, ent in self._entities.items():
            keys = [eid, ent.name, *ent.synonyms]
            for key in keys:
                for form in plural_forms(normalize_term(key)):
                    table.setdefault(form, eid)
            if ent.cui:
                table.setdefault(ent.cui.upper(), eid)
        return table

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.entity_ids)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._entities

    def entity(self, entity_id: str) -> Entity:
        """The entity with this id (KeyError names the id when unknown)."""
        try:
            return self._entities[entity_id]
        except KeyError:
            raise KeyError(f"unknown entity {entity_id!r}") from None

    def index(self, entity_id: str) -> int:
        """Position of the entity in ``entity_ids`` (the index used by ``token_entity``)."""
        return self._index[entity_id]

    @property
    def entities(self) -> list[Entity]:
        """All entities in ``entity_ids`` order."""
        return [self._entities[e] for e in self.entity_ids]

    @property
    def finding_ids(self) -> list[str]:
        """Ids of the entities whose category is ``finding``, in ``entity_ids`` order."""
        return [e for e in self.entity_ids if self._entities[e].category == "finding"]

    def ids_by_category(self, category: str) -> list[str]:
        """Ids of the entities of one category, in ``entity_ids`` order."""
        return [e for e in self.entity_ids if self._entities[e].category == category]

    def lookup(self, text: str) -> Entity | None:
        """The entity named by an id, preferred name, synonym (singular or plural) or CUI; None when unknown."""
        text = text.strip()
        if _CUI.match(text.upper()):
            eid = self._lookup.get(text.upper())
        else:
            eid = self._lookup.get(normalize_term(text))
        return self._entities[eid] if eid else None

    def neighbors(self, entity_id: str, relation: str | None = None, direction: str = "out") -> list[str]:
        """Entities linked to ``entity_id`` by ``relation`` (any when None); direction "out", "in" or "both"."""
        self.entity(entity_id)
        if relation is not None and relation not in RELATIONS and not any(
            k == relation for _, _, k in self.graph.edges(keys=True)
        ):
            raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")
        out: list[str] = []
        if direction in ("out", "both"):
            out += [v for _, v, k in self.graph.out_edges(entity_id, keys=True) if relation in (None, k)]
        if direction in ("in", "both"):
            out += [u for u, _, k in self.graph.in_edges(entity_id, keys=True) if relation in (None, k)]
        if direction not in ("out", "in", "both"):
            raise ValueError(f"direction must be 'out', 'in' or 'both', got {direction!r}")
        return list(dict.fromkeys(out))

    def ancestors(self, entity_id: str) -> list[str]:
        """All entities reachable by following ``is_a`` upwards (nearest first)."""
        seen: list[str] = []
        frontier = [entity_id]
        while frontier:
            nxt = []
            for node in frontier:
                for parent in self.neighbors(node, "is_a"):
                    if parent not in seen and parent != entity_id:
                        seen.append(parent)
                        nxt.append(parent)
            frontier = nxt
        return seen

    def relations(self) -> list[tuple[str, str, str]]:
        """All (source, relation, target) triples."""
        return [(u, k, v) for u, v, k in self.graph.edges(keys=True)]

    def entity_texts(self) -> list[str]:
        """One ``"name: definition (synonyms: ...)"`` string per entity, in ``entity_ids`` order, for embedding."""
        return [self._entities[e].text() for e in self.entity_ids]

    def chexpert_entities(self, observation: str) -> list[str]:
        """Entities that count towards one CheXpert observation."""
        if observation not in CHEXPERT_14:
            raise KeyError(f"{observation!r} is not one of CHEXPERT_14")
        return [e for e in self.entity_ids if self._entities[e].chexpert == observation]

    def subgraph(self, entity_id: str, radius: int = 1) -> nx.MultiDiGraph:
        """The neighbourhood of an entity (edges in both directions, up to ``radius`` hops), for drawing."""
        return nx.ego_graph(self.graph, entity_id, radius=radius, undirected=True)

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        """A plain dict in the ``radiology_kg.yaml`` layout (entities with their outgoing relations)."""
        rows = []
        for ent in self.entities:
            row = asdict(ent)
            row["relations"] = {r: self.neighbors(ent.id, r) for r in RELATIONS}
            extra = sorted({k for _, _, k in self.graph.out_edges(ent.id, keys=True)} - set(RELATIONS))
            if extra:
                raise ValueError(f"entity {ent.id!r} has relations {extra} outside {RELATIONS}; export them with to_json")
            rows.append(row)
        return {"version": 1, "entities": rows}

    def to_yaml(self, path: str | Path) -> Path:
        """Write the graph in the ``radiology_kg.yaml`` format (round-trips through :meth:`from_yaml`)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
        return path

    def to_json(self, path: str | Path) -> Path:
        """Write node-link JSON (networkx format) with every entity field on its node."""
        path = Path(path)
        g = self.graph.copy()
        for ent in self.entities:
            g.nodes[ent.id].update(asdict(ent))
        path.write_text(json.dumps(nx.node_link_data(g, edges="links"), indent=1), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        cats = {c: len(self.ids_by_category(c)) for c in CATEGORIES if self.ids_by_category(c)}
        return f"KnowledgeGraph({len(self)} entities {cats}, {self.graph.number_of_edges()} relations)"
