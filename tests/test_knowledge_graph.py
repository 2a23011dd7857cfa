"""The curated knowledge graph: its data is well-formed and its look-ups, relations and export behave."""

from __future__ import annotations

import re

import pytest

from mlip_core.knowledge import CHEXPERT_14, KnowledgeGraph, minilm_path
from mlip_core.knowledge.graph import RELATIONS, Entity, plural_forms


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return KnowledgeGraph.load_default()


def test_chexpert_14_order_matches_mimic_csv_columns():
    assert CHEXPERT_14[:3] == ["Atelectasis", "Cardiomegaly", "Consolidation"]
    assert CHEXPERT_14[8] == "No Finding" and CHEXPERT_14[-1] == "Support Devices"
    assert len(CHEXPERT_14) == len(set(CHEXPERT_14)) == 14


def test_default_graph_covers_every_chexpert_observation_except_no_finding(kg):
    for obs in CHEXPERT_14:
        if obs != "No Finding":
            assert kg.chexpert_entities(obs), f"no entity counts towards {obs}"


def test_every_entity_has_definition_semantic_type_and_known_category(kg):
    assert 40 <= len(kg) <= 100
    for ent in kg.entities:
        assert ent.definition and len(ent.definition.split()) >= 8, ent.id
        assert ent.semantic_type, ent.id
        assert ent.category in ("finding", "device", "anatomy", "laterality"), ent.id
        assert ent.synonyms, ent.id
        if ent.cui:
            assert re.fullmatch(r"C\d{7}", ent.cui), ent.id


def test_cuis_are_unique(kg):
    cuis = [e.cui for e in kg.entities if e.cui]
    assert len(cuis) == len(set(cuis))


def test_graph_has_anatomy_and_devices(kg):
    anatomy = set(kg.ids_by_category("anatomy"))
    assert {"lower_lobe", "costophrenic_angle", "hilum", "mediastinum", "lung_apex"} <= anatomy
    assert "pacemaker" in kg.ids_by_category("device")
    assert set(kg.finding_ids) >= {"pleural_effusion", "nodule", "granuloma", "emphysema", "scoliosis"}


@pytest.mark.parametrize("text, expected", [
    ("Pleural effusion", "pleural_effusion"),
    ("effusions", "pleural_effusion"),
    ("  Pleural-Effusion ", "pleural_effusion"),
    ("opacities", "lung_opacity"),
    ("C0018800", "cardiomegaly"),
    ("c0018800", "cardiomegaly"),
    ("calcified granulomas", "calcified_granuloma"),
    ("hiatus hernia", "hiatal_hernia"),
    ("nodule", "nodule"),
])
def test_lookup_by_name_synonym_plural_and_cui(kg, text, expected):
    assert kg.lookup(text).id == expected


def test_lookup_unknown_returns_none(kg):
    assert kg.lookup("spleen of mars") is None
    assert kg.lookup("C9999999") is None


def test_neighbors_by_relation_and_direction(kg):
    assert "granuloma" in kg.neighbors("calcified_granuloma", "is_a")
    assert "calcified_granuloma" in kg.neighbors("granuloma", "is_a", direction="in")
    assert "pleura" in kg.neighbors("pneumothorax", "located_in")
    assert "pleural_effusion" in kg.neighbors("blunted_costophrenic_angle", "suggestive_of")
    assert kg.ancestors("calcified_granuloma")[:2] == ["granuloma", "nodule"]
    with pytest.raises(ValueError):
        kg.neighbors("pneumothorax", "eats")
    with pytest.raises(KeyError, match="no_such"):
        kg.neighbors("no_such")


def test_entity_texts_follow_entity_order_and_name_definition_synonyms(kg):
    texts = kg.entity_texts()
    assert len(texts) == len(kg.entity_ids)
    i = kg.entity_ids.index("pleural_effusion")
    assert texts[i].startswith("Pleural effusion: ")
    assert "(synonyms: " in texts[i] and "effusion" in texts[i].split("(synonyms: ")[1]
    assert kg.index("pleural_effusion") == i


def test_yaml_round_trip_keeps_entities_and_relations(kg, tmp_path):
    path = kg.to_yaml(tmp_path / "kg.yaml")
    again = KnowledgeGraph.from_yaml(path)
    assert again.entity_ids == kg.entity_ids
    assert sorted(again.relations()) == sorted(kg.relations())
    assert again.entity("cardiomegaly") == kg.entity("cardiomegaly")


def test_json_export_is_node_link(kg, tmp_path):
    import json

    data = json.loads(kg.to_json(tmp_path / "kg.json").read_text())
    assert len(data["nodes"]) == len(kg)
    assert {"source", "target", "relation"} <= set(data["links"][0])


def test_bad_relation_target_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entities:\n  - {id: a, name: A, relations: {is_a: [missing]}}\n")
    with pytest.raises(ValueError, match="missing"):
        KnowledgeGraph.from_yaml(bad)


def test_unknown_chexpert_observation_is_rejected():
    with pytest.raises(ValueError, match="CheXpert"):
        KnowledgeGraph([Entity(id="x", name="X", chexpert="Pleural Thing")])


def test_unknown_relation_name_in_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entities:\n  - {id: a, name: A, relations: {eats: []}}\n")
    with pytest.raises(ValueError, match="eats"):
        KnowledgeGraph.from_yaml(bad)


def test_plural_forms_follow_english_rules():
    assert plural_forms("effusion") == ["effusion", "effusions"]
    assert plural_forms("opacity") == ["opacity", "opacities"]
    assert plural_forms("calcified granuloma") == ["calcified granuloma", "calcified granulomas"]
    assert plural_forms("pneumothorax") == ["pneumothorax", "pneumothoraxes"]


def test_subgraph_contains_the_neighbourhood(kg):
    sub = kg.subgraph("pleural_effusion", radius=1)
    assert "pleura" in sub and "atelectasis" in sub and "scoliosis" not in sub


def test_minilm_path_holds_a_fast_tokenizer():
    path = minilm_path()
    assert (path / "tokenizer.json").is_file() and (path / "vocab.txt").is_file()
