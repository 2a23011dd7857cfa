"""Knowledge extraction on hand-written report sentences: mentions, negation scope, hedges, labels, token spans."""

from __future__ import annotations

import math

import pytest
import torch

from mlip_core.knowledge import CHEXPERT_14, KnowledgeGraph, minilm_path
from mlip_core.knowledge.extract import KnowledgeExtractor, trie_regex


@pytest.fixture(scope="module")
def ex() -> KnowledgeExtractor:
    return KnowledgeExtractor()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def status(ex: KnowledgeExtractor, text: str) -> dict[str, str]:
    """entity id -> status of its last mention (anatomy and sides left out)."""
    return {m.entity_id: m.status for m in ex.mentions(text)
            if ex.graph.entity(m.entity_id).category in ("finding", "device")}


# ---------------------------------------------------------------- matching
def test_synonyms_match_with_word_boundaries_and_plurals(ex):
    assert status(ex, "Bilateral effusions.") == {"pleural_effusion": "positive"}
    assert status(ex, "Patchy opacities at both bases.") == {"lung_opacity": "positive"}
    # "mass" must not fire inside "massive" or "masses" inside another word; "ett" not inside "cassette".
    assert "mass" not in status(ex, "Massively dilated bowel on the cassette edge.")
    assert "tube" not in status(ex, "The cassette is rotated.")


def test_longest_surface_form_wins(ex):
    found = [(m.entity_id, m.text) for m in ex.mentions("Calcified granulomas in the right upper lobe.")]
    assert ("calcified_granuloma", "Calcified granulomas") in found
    assert not any(e in ("calcification", "granuloma") for e, _ in found)
    assert [m.entity_id for m in ex.mentions("Pleural effusion.")] == ["pleural_effusion"]


def test_look_alike_phrases_are_their_own_entities(ex):
    assert status(ex, "Small pericardial effusion.") == {"pericardial_effusion": "positive"}
    assert status(ex, "Subcutaneous emphysema in the chest wall.") == {"subcutaneous_emphysema": "positive"}
    assert status(ex, "Aortic calcification.") == {"calcification": "positive"}


def test_mention_spans_index_the_original_text(ex):
    text = "Heart size normal.\n\nIMPRESSION: Small  left pleural-effusion."
    for m in ex.mentions(text):
        assert text[m.start:m.end] == m.text
    eff = [m for m in ex.mentions(text) if m.entity_id == "pleural_effusion"][0]
    assert eff.text == "pleural-effusion"


# ---------------------------------------------------------------- negation
@pytest.mark.parametrize("text", [
    "No pleural effusion.",
    "There is no evidence of pleural effusion.",
    "Negative for pleural effusion.",
    "Lungs are free of effusion.",
    "The costophrenic angles are clear of effusion.",
    "Without effusion.",
    "The left effusion has resolved.",
    "Pleural effusion is not seen.",
])
def test_negation_triggers(ex, text):
    assert status(ex, text)["pleural_effusion"] == "negative"


def test_negated_list_covers_every_item(ex):
    s = status(ex, "No focal consolidation, pleural effusion, or pneumothorax.")
    assert s == {"consolidation": "negative", "pleural_effusion": "negative", "pneumothorax": "negative"}
    s = status(ex, "No effusion or pneumothorax.")
    assert s == {"pleural_effusion": "negative", "pneumothorax": "negative"}


@pytest.mark.parametrize("text, negated, affirmed", [
    ("No pneumothorax, but there is a small left effusion.", "pneumothorax", "pleural_effusion"),
    ("No pneumothorax; however, left basilar atelectasis.", "pneumothorax", "atelectasis"),
    ("No pneumonia, small left pleural effusion.", "pneumonia", "pleural_effusion"),
    ("No pneumothorax. Small left pleural effusion.", "pneumothorax", "pleural_effusion"),
    ("No consolidation other than minimal atelectasis.", "consolidation", "atelectasis"),
    ("No effusion and the heart is mildly enlarged.", "pleural_effusion", "cardiomegaly"),
])
def test_negation_scope_ends_at_clause_boundaries(ex, text, negated, affirmed):
    s = status(ex, text)
    assert s[negated] == "negative"
    assert s[affirmed] == "positive"


def test_post_negation_covers_a_conjunction_list_but_not_a_comma_clause(ex):
    assert status(ex, "The effusion and pneumothorax have resolved.") == {
        "pleural_effusion": "negative", "pneumothorax": "negative"}
    assert status(ex, "Small effusion, pneumothorax has resolved.") == {
        "pleural_effusion": "positive", "pneumothorax": "negative"}


def test_negation_does_not_reach_back_before_its_trigger(ex):
    assert status(ex, "Cardiomegaly without pulmonary edema.") == {"cardiomegaly": "positive", "edema": "negative"}


def test_pseudo_negation_is_not_negation(ex):
    assert status(ex, "No change in the small left pleural effusion.")["pleural_effusion"] == "positive"
    assert status(ex, "No significant interval change in cardiomegaly.")["cardiomegaly"] == "positive"


def test_normal_phrasings_deny_the_finding(ex):
    assert status(ex, "Heart size is normal.")["cardiomegaly"] == "negative"
    assert status(ex, "Normal heart size.")["cardiomegaly"] == "negative"
    assert status(ex, "The heart is not enlarged.")["cardiomegaly"] == "negative"
    assert status(ex, "The heart is mildly enlarged.")["cardiomegaly"] == "positive"


# ---------------------------------------------------------------- uncertainty
@pytest.mark.parametrize("text, entity", [
    ("Possible left lower lobe pneumonia.", "pneumonia"),
    ("Findings may represent atelectasis.", "atelectasis"),
    ("Pneumonia cannot be excluded.", "pneumonia"),
    ("Cannot exclude a small pneumothorax.", "pneumothorax"),
    ("Early pneumonia is not excluded.", "pneumonia"),
    ("Suspicious for a right upper lobe mass.", "mass"),
    ("Borderline cardiomegaly.", "cardiomegaly"),
    ("Borderline heart size.", "cardiomegaly"),
    ("Question small right pleural effusion.", "pleural_effusion"),
    ("Atelectasis versus consolidation.", "consolidation"),
    ("Atelectasis versus consolidation.", "atelectasis"),
    ("Opacity which could be atelectasis.", "atelectasis"),
])
def test_hedges_and_double_negatives_are_uncertain(ex, text, entity):
    assert status(ex, text)[entity] == "uncertain"


def test_no_finding_to_suggest_is_negative_not_uncertain(ex):
    assert status(ex, "No focal opacity to suggest pneumonia.")["pneumonia"] == "negative"


# ---------------------------------------------------------------- side and location
def test_side_and_location(ex):
    ms = {m.entity_id: m for m in ex.mentions("Small left pleural effusion. Right upper lobe nodule.")}
    assert ms["pleural_effusion"].side == "left"
    assert ms["nodule"].side == "right" and ms["nodule"].location == "upper_lobe"
    ms = {m.entity_id: m for m in ex.mentions("Bibasilar atelectasis.")}
    assert ms["atelectasis"].side == "bilateral" and ms["atelectasis"].location == "lung_base"
    ms = {m.entity_id: m for m in ex.mentions("Opacity in the left lower lobe, and a right effusion.")}
    assert ms["lung_opacity"].side == "left" and ms["lung_opacity"].location == "lower_lobe"
    assert ms["pleural_effusion"].side == "right"


# ---------------------------------------------------------------- report labels
def test_report_labels_follow_chexpert_convention(ex):
    labels = ex.report_labels("Mild cardiomegaly. No pleural effusion. Possible left basilar atelectasis. "
                              "Right IJ central venous catheter tip in the SVC.")
    assert list(labels) == CHEXPERT_14
    assert labels["Cardiomegaly"] == 1.0
    assert labels["Pleural Effusion"] == 0.0
    assert labels["Atelectasis"] == -1.0
    assert labels["Support Devices"] == 1.0
    assert math.isnan(labels["Pneumothorax"])
    assert math.isnan(labels["No Finding"])


def test_positive_mention_outranks_negative_and_uncertain(ex):
    labels = ex.report_labels("No right effusion. Possible left effusion. Small left pleural effusion.")
    assert labels["Pleural Effusion"] == 1.0


def test_no_finding_ignores_support_devices_and_negatives(ex):
    labels = ex.report_labels("Pacemaker in place. No pneumothorax or effusion. Heart size is normal.")
    assert labels["No Finding"] == 1.0 and labels["Support Devices"] == 1.0 and labels["Cardiomegaly"] == 0.0


def test_empty_report_is_all_blank(ex):
    assert all(math.isnan(v) for v in ex.report_labels("   ").values())


def test_opacity_family_maps_to_lung_opacity(ex):
    assert ex.report_labels("Right lower lobe infiltrate.")["Lung Opacity"] == 1.0
    assert ex.report_labels("Left upper lobe nodule.")["Lung Lesion"] == 1.0


# ---------------------------------------------------------------- token spans
def test_encode_marks_the_wordpiece_tokens_of_each_mention(ex, tokenizer):
    texts = ["No pneumothorax. Small left pleural effusion.", "Heart size is normal."]
    enc = ex.encode(texts, tokenizer, max_length=24)
    for key in ("input_ids", "attention_mask", "token_entity", "token_status"):
        assert enc[key].shape == (2, 24) and enc[key].dtype == torch.long
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    ptx = ex.graph.index("pneumothorax")
    eff = ex.graph.index("pleural_effusion")
    by_token = {t: (int(e), int(s)) for t, e, s in zip(tokens, enc["token_entity"][0], enc["token_status"][0])}
    # WordPiece splits "pneumothorax" into pieces; every piece carries the entity, status negative (0).
    ptx_tokens = [t for t, e in zip(tokens, enc["token_entity"][0]) if int(e) == ptx]
    assert len(ptx_tokens) >= 2 and "".join(t.lstrip("#") for t in ptx_tokens) == "pneumothorax"
    assert all(by_token[t] == (ptx, 0) for t in ptx_tokens)
    eff_tokens = [t for t, e in zip(tokens, enc["token_entity"][0]) if int(e) == eff]
    assert "".join(t.lstrip("#") for t in eff_tokens) == "pleuraleffusion"
    assert all(by_token[t] == (eff, 1) for t in eff_tokens)
    assert by_token["small"] == (-1, -2) and by_token["."] == (-1, -2)
    assert by_token["[CLS]"] == (-1, -2) and by_token["[SEP]"] == (-1, -2)
    # padding carries nothing
    assert (enc["token_entity"][enc["attention_mask"] == 0] == -1).all()
    card = ex.graph.index("cardiomegaly")
    assert (enc["token_entity"][1] == card).any() and (enc["token_status"][1][enc["token_entity"][1] == card] == 0).all()


def test_encode_truncates_without_misaligning(ex, tokenizer):
    text = "Normal heart. " * 20 + "Large right pneumothorax."
    enc = ex.encode([text], tokenizer, max_length=16)
    assert enc["input_ids"].shape == (1, 16)
    assert not (enc["token_entity"] == ex.graph.index("pneumothorax")).any()


def test_encode_rejects_a_bare_string(ex, tokenizer):
    with pytest.raises(TypeError):
        ex.encode("No effusion.", tokenizer, max_length=8)


# ---------------------------------------------------------------- building blocks
def test_trie_regex_matches_exactly_its_terms_longest_first():
    import re

    rx = re.compile(r"\b(?:" + trie_regex(["effusion", "effusions", "pleural effusion", "ptx"]) + r")\b")
    assert [m.group(0) for m in rx.finditer("pleural  effusion, effusions; ptxs ptx")] == [
        "pleural  effusion", "effusions", "ptx"]


def test_conflicting_synonyms_are_a_data_error():
    from mlip_core.knowledge.graph import Entity

    g = KnowledgeGraph([Entity(id="a", name="A", synonyms=["shadow"]), Entity(id="b", name="B", synonyms=["shadow"])])
    with pytest.raises(ValueError, match="shadow"):
        KnowledgeExtractor(g)


def test_custom_graph_patterns_must_not_capture():
    from mlip_core.knowledge.graph import Entity

    g = KnowledgeGraph([Entity(id="a", name="A", synonyms=["aa"], patterns=["(big) thing"])])
    with pytest.raises(ValueError, match="groups"):
        KnowledgeExtractor(g)


# ---------------------------------------------------------------- IU evaluation on invented IU-format reports
def test_iu_evaluation_scores_against_mesh_terms():
    from mlip_core.data.iu import IUReport
    from mlip_core.knowledge.evaluate_iu import evaluate, mesh_matches

    assert mesh_matches("Opacity", "Opacity/lung/base/left")
    assert mesh_matches("Diaphragm/elevated", "Diaphragm/right/elevated/mild")
    assert not mesh_matches("Diaphragm/elevated", "Diaphragm/flattened")
    assert mesh_matches("*/degenerative", "Spine/degenerative/mild")

    def rep(uid, findings, impression, mesh):
        return IUReport(uid=uid, findings=findings, impression=impression, indication="", comparison="",
                        mesh_major=mesh, mesh_automatic=[], image_ids=[])

    reports = [
        rep("1", "The heart is enlarged. No effusion.", "Cardiomegaly.", ["Cardiomegaly/mild"]),
        rep("2", "Lungs are clear. No pneumothorax.", "Normal chest.", ["normal"]),
        rep("3", "Small right pleural effusion.", "Effusion.", ["Pleural Effusion/right/small"]),
        rep("4", "No effusion.", "No acute disease.", ["Pleural Effusion/left"]),  # a miss
        rep("5", "Lungs are clear.", "No disease.", ["No Indexing"]),  # no gold: left out
    ]
    res = evaluate(reports, min_positives=1)
    t = res.table.set_index("finding")
    assert res.num_reports == 4
    assert t.loc["cardiomegaly", ["tp", "fp", "fn"]].tolist() == [1, 0, 0]
    assert t.loc["pleural_effusion", ["tp", "fp", "fn"]].tolist() == [1, 0, 1]
    assert t.loc["normal", ["tp", "fp", "fn"]].tolist() == [1, 1, 0]
    assert t.loc["pleural_effusion", "f1"] == pytest.approx(2 / 3)
    evaluated = t[t["evaluated"]]
    assert res.macro_f1 == pytest.approx(evaluated["f1"].mean())


def test_extractor_survives_pickling_for_dataloader_workers(ex):
    import pickle

    again = pickle.loads(pickle.dumps(ex))
    text = "No effusion. Mild cardiomegaly."
    assert again.mentions(text) == ex.mentions(text)
