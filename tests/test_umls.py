"""The UMLS importer on small RRF fixtures in the real pipe-delimited Metathesaurus format (invented rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlip_core.knowledge import KnowledgeGraph
from mlip_core.knowledge.extract import KnowledgeExtractor

# CUI|LAT|TS|LUI|STT|SUI|ISPREF|AUI|SAUI|SCUI|SDUI|SAB|TTY|CODE|STR|SRL|SUPPRESS|CVF|
MRCONSO = """\
C0032227|ENG|P|L0032227|PF|S0076267|Y|A0106286||||MSH|MH|D010996|Pleural Effusion|0|N||
C0032227|ENG|S|L0032228|PF|S0076268|N|A0106287||||MSH|ET|D010996|Effusion, Pleural|0|N||
C0032227|ENG|S|L0032229|PF|S0076269|Y|A0106288||||SNOMEDCT_US|SY|60046008|Pleural fluid|9|N||
C0032227|ENG|S|L0032230|PF|S0076270|Y|A0106289||||SNOMEDCT_US|SY|60046008|Hydrothorax old name|9|O||
C0032227|FRE|P|L0032231|PF|S0076271|Y|A0106290||||MSHFRE|MH|D010996|Epanchement pleural|3|N||
C0032225|ENG|P|L0032225|PF|S0076265|Y|A0106280||||MSH|MH|D010994|Pleura|0|N||
C0032326|ENG|P|L0032326|PF|S0076300|Y|A0106300||||MSH|MH|D011030|Pneumothorax|0|N||
C0032326|ENG|S|L0032327|PF|S0076301|N|A0106301||||SNOMEDCT_US|SY|36118008|PTX|9|N||
C0024115|ENG|P|L0024115|PF|S0060000|Y|A0090000||||MSH|MH|D008171|Lung Diseases|0|N||
C0018787|ENG|P|L0018787|PF|S0047000|Y|A0070000||||MSH|MH|D006321|Heart|0|N||
"""
# CUI|TUI|STN|STY|ATUI|CVF|
MRSTY = """\
C0032227|T046|B2.2.1.2|Pathologic Function|AT17683839||
C0032225|T023|A1.2.3.1|Body Part, Organ, or Organ Component|AT17683840||
C0032326|T046|B2.2.1.2|Pathologic Function|AT17683841||
C0024115|T047|B2.2.1.2.1|Disease or Syndrome|AT17683842||
C0018787|T023|A1.2.3.1|Body Part, Organ, or Organ Component|AT17683843||
"""
# CUI|AUI|ATUI|SATUI|SAB|DEF|SUPPRESS|CVF|
MRDEF = """\
C0032227|A0106286|AT38152019||MSH|Presence of fluid in the pleural cavity (invented fixture text).|N||
C0032326|A0106300|AT38152020||MSH|<p>Air in the pleural space</p> (invented fixture text).|N||
"""
# CUI1|AUI1|STYPE1|REL|CUI2|AUI2|STYPE2|RELA|RUI|SRUI|SAB|SL|RG|DIR|SUPPRESS|CVF|
MRREL = """\
C0024115|A0090000|SCUI|CHD|C0032227|A0106286|SCUI|isa|R000001||SNOMEDCT_US|SNOMEDCT_US||Y|N||
C0032227|A0106286|SCUI|PAR|C0024115|A0090000|SCUI|inverse_isa|R000002||SNOMEDCT_US|SNOMEDCT_US||Y|N||
C0032225|A0106280|SCUI|RO|C0032227|A0106286|SCUI|has_finding_site|R000003||SNOMEDCT_US|SNOMEDCT_US||Y|N||
C0032326|A0106300|SCUI|RO|C0032227|A0106286|SCUI|co-occurs_with|R000004||MEDLINEPLUS|MEDLINEPLUS||Y|N||
C0018787|A0070000|SCUI|RO|C0032326|A0106300|SCUI|mapped_to|R000005||MTH|MTH||Y|N||
C0024115|A0090000|SCUI|CHD|C0032326|A0106300|SCUI|isa|R000006||SNOMEDCT_US|SNOMEDCT_US||Y|O||
"""


@pytest.fixture
def rrf_dir(tmp_path: Path) -> Path:
    for name, text in {"MRCONSO.RRF": MRCONSO, "MRSTY.RRF": MRSTY, "MRDEF.RRF": MRDEF, "MRREL.RRF": MRREL}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_umls_import_builds_entities_with_preferred_names_synonyms_definitions(rrf_dir):
    kg = KnowledgeGraph.from_umls(rrf_dir)
    eff = kg.entity("C0032227")
    assert eff.name == "Pleural Effusion" and eff.cui == "C0032227"
    assert "effusion, pleural" in eff.synonyms and "pleural fluid" in eff.synonyms
    assert "hydrothorax old name" not in eff.synonyms  # obsolete atom (SUPPRESS=O)
    assert "epanchement pleural" not in eff.synonyms  # not English
    assert eff.definition.startswith("Presence of fluid")
    assert eff.semantic_type == "Pathologic Function" and eff.category == "finding"
    assert kg.entity("C0032225").category == "anatomy"
    assert kg.entity("C0032326").definition.startswith("Air in the pleural space")  # HTML stripped
    assert kg.lookup("pleural fluid").id == "C0032227"


def test_umls_relations_are_read_right_to_left(rrf_dir):
    kg = KnowledgeGraph.from_umls(rrf_dir)
    assert kg.neighbors("C0032227", "is_a") == ["C0024115"]  # effusion is a lung disease (both rows agree)
    assert kg.neighbors("C0032227", "located_in") == ["C0032225"]  # effusion has finding site pleura
    assert "C0032227" in kg.neighbors("C0032326", "co_occurs_with")
    assert kg.neighbors("C0032326", "is_a") == []  # the only such row is obsolete
    assert kg.neighbors("C0018787") == []  # unmapped relation types are skipped


def test_umls_restriction_by_cui_and_semantic_type(rrf_dir):
    kg = KnowledgeGraph.from_umls(rrf_dir, cuis=["C0032227", "C0032225"])
    assert set(kg.entity_ids) == {"C0032227", "C0032225"}
    assert kg.neighbors("C0032227", "is_a") == []  # its parent was not selected
    kg = KnowledgeGraph.from_umls(rrf_dir, semantic_types=["Pathologic Function"])
    assert set(kg.entity_ids) == {"C0032227", "C0032326"}
    kg = KnowledgeGraph.from_umls(rrf_dir, semantic_types=["T023"])
    assert set(kg.entity_ids) == {"C0032225", "C0018787"}


def test_umls_graph_drives_the_extractor(rrf_dir):
    kg = KnowledgeGraph.from_umls(rrf_dir, semantic_types=["Pathologic Function"])
    ex = KnowledgeExtractor(kg)
    found = {m.entity_id: m.status for m in ex.mentions("No pleural fluid. Small PTX.")}
    assert found == {"C0032227": "negative", "C0032326": "positive"}


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="MRSTY.RRF.*META"):
        KnowledgeGraph.from_umls(tmp_path)


def test_malformed_row_names_the_file_and_line(rrf_dir):
    (rrf_dir / "MRDEF.RRF").write_text(MRDEF + "C0032227|only|three|\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"MRDEF.RRF:3"):
        KnowledgeGraph.from_umls(rrf_dir)
