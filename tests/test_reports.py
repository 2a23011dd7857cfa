"""MIMIC-style section parsing, cleaning, sentence splitting and MGCA's text choice (invented reports)."""

from __future__ import annotations

from mlip_core.data.reports import choose_text, clean_text, parse_sections, split_sentences

FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_sections_are_found_and_cleaned():
    s = parse_sections(FULL)
    assert s.findings == ("There is no focal consolidation, pleural effusion or pneumothorax. "
                          "The cardiomediastinal silhouette is normal.")
    assert s.impression == "No acute cardiopulmonary process."
    assert s.indication == "___F with cough // eval for pneumonia"
    assert s.comparison == "___" and s.examination == "CHEST (PA AND LAT)"


def test_text_is_impression_then_findings():
    c = choose_text(FULL)
    assert c.source == "impression+findings"
    assert c.text.startswith("No acute cardiopulmonary process. There is no focal")


def test_header_variants_map_to_findings_and_impression():
    s = parse_sections("FINDINGS AND IMPRESSION:\nSmall left effusion.\n")
    assert s.findings == s.impression == "Small left effusion."
    assert choose_text(s).text == "Small left effusion."  # not duplicated
    assert parse_sections("IMPRESSIONS: A.\nFINDING: B.").impression == "A."
    assert parse_sections("CONCLUSION:\n  Stable.").impression == "Stable."
    assert parse_sections("NOTE: x\nFINDINGS: y").other == {"NOTE": "x"}
    mixed = parse_sections("Findings: Lungs clear.\nImpression: Normal chest.")
    assert (mixed.findings, mixed.impression) == ("Lungs clear.", "Normal chest.")
    assert parse_sections("The heart: normal size.").other == {}  # lower-case words are not headers


def test_one_section_alone_is_used_and_both_empty_is_reported_not_raised():
    assert choose_text("FINDINGS: Clear lungs.\nIMPRESSION:\n").source == "findings"
    assert choose_text("IMPRESSION: Normal.").text == "Normal."
    for empty in ["", "   \n", "FINDINGS:\n\nIMPRESSION:  \n", "FINAL REPORT\n\nCHEST PA.\n\nNo change."]:
        c = choose_text(empty)
        assert c.empty and c.source == "empty"


def test_last_paragraph_fallback_is_opt_in():
    report = "FINAL REPORT\n\nPA and lateral views.\n\nNo acute process."
    assert choose_text(report).empty
    c = choose_text(report, fallback_last_paragraph=True)
    assert c.text == "No acute process." and c.source == "last_paragraph"


def test_sentence_split_keeps_abbreviations_and_numbers_and_drops_list_marks():
    text = "1. Left lower lobe opacity, approx. 2.5 cm. 2. Small effusion vs. atelectasis. Dr. ___ was notified."
    assert split_sentences(text) == [
        "Left lower lobe opacity, approx. 2.5 cm.",
        "Small effusion vs. atelectasis.",
        "Dr. ___ was notified.",
    ]
    assert split_sentences("") == []
    assert clean_text("a\n\n  b ____ c") == "a b ___ c"
