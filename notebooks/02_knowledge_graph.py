# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Knowledge: a radiology knowledge graph and what reports say about it
#
# MLIP is *knowledge-guided*: besides pairing each radiograph with its report, it uses domain knowledge
# in three places (see the method chapter):
#
# 1. **Which report tokens carry knowledge.** The local loss aligns tokens that name a finding
#    ("effusion", "atelectasis") with image patches, so it must know which tokens those are.
# 2. **What each finding means.** Every entity of the knowledge base has a short definition; the text
#    tower embeds "name: definition (synonyms)" and these *knowledge embeddings* are fused with the
#    tokens and initialise the category prototypes.
# 3. **Which reports say the same thing.** Two reports that assert the same findings should not be
#    pushed apart as negatives; for that we need report-level labels — and they must respect
#    negation: "no effusion" is not an effusion.
#
# The paper takes its knowledge from UMLS, which needs a licence. This book ships a small **curated
# knowledge base** instead (`mlip_core/knowledge/radiology_kg.yaml`, reviewed facts written for this
# project) and can build the same kind of graph from a UMLS release when you have one
# (`KnowledgeGraph.from_umls`). This chapter shows the graph, the extractor that finds its entities in
# report text, and — the important part — **how well the extractor agrees with human annotators** on
# the 3,955 real Indiana University reports.
#
# **What you will learn.** What the knowledge graph holds, how the extractor finds its entities (and their
# negation and uncertainty) in report text, and how well its labels agree with human annotators.
#
# **What it needs.** Nothing from earlier chapters: the knowledge base ships with `mlip_core`, the
# reports with `torchxrayvision`.
#
# **How long it takes.** The table below is written by the book's runner (`python -m mlip_core.book`), which
# records every chapter's wall time with each profile it executes, on the machine it ran on.


# %% tags=["remove-input"]
from IPython.display import Markdown

from mlip_core.book import chapter_times

Markdown(chapter_times("02_knowledge_graph"))

# %% tags=["parameters"]
seed = 0
eval_limit = 0  # IU reports to score against MeSH, 0 means all 3955
focus_entity = "pleural_effusion"  # whose neighbourhood is drawn
radius = 1  # hops around focus_entity in the drawing
min_positives = 30  # findings with fewer MeSH positives are listed but left out of the macro F1
speed_reports = 500  # reports timed for a rough speed figure, see benchmarks/bench_extract.py
umls_dir = ""  # a UMLS META folder holding MRCONSO.RRF etc, empty skips the UMLS section

# %%
import time

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pandas as pd
from transformers import AutoTokenizer

from mlip_core.data.iu import load_iu_reports
from mlip_core.knowledge import CHEXPERT_14, KnowledgeGraph, minilm_path
from mlip_core.knowledge.evaluate_iu import evaluate, report_text
from mlip_core.knowledge.extract import KnowledgeExtractor
from mlip_core.notebook import setup

device = setup(seed)
kg = KnowledgeGraph.load_default()
extractor = KnowledgeExtractor(kg)
print(kg)

# %% [markdown]
# ## The knowledge base
#
# Each entity has an id, a preferred name, a UMLS CUI where we are confident of one (blank otherwise —
# a wrong CUI is worse than none), the phrasings reports use for it, a one-to-two sentence definition, a
# UMLS semantic type and a category. Findings also name the CheXpert observation they count towards:
# "infiltrate", "airspace disease" and "opacity" all count as *Lung Opacity*, "nodule" and "mass" as
# *Lung Lesion*. Anatomy (lobes, zones, hilum, costophrenic angle, mediastinum, ...) and sides are
# entities too, so the extractor can say *where* a finding is.

# %%
rows = [dict(id=e.id, name=e.name, category=e.category, cui=e.cui or "—", semantic_type=e.semantic_type,
             chexpert=e.chexpert or "—", phrasings=len(e.synonyms) + len(e.patterns)) for e in kg.entities]
entities = pd.DataFrame(rows)
print(entities.groupby("category").size().rename("entities").to_string())
entities[entities.category.isin(["finding", "device"])].head(20)

# %%
ent = kg.entity(focus_entity)
print(f"{ent.name} ({ent.cui or 'no CUI'}; {ent.semantic_type})\n")
print("definition:", ent.definition)
print("phrasings :", ", ".join(ent.synonyms))
print("\nwhat the text tower embeds for it:\n ", kg.entity_texts()[kg.index(focus_entity)][:300], "...")

# %% [markdown]
# Relations connect the entities: `is_a` (a calcified granuloma *is a* granuloma), `located_in`
# (pneumothorax is in the pleura), `suggestive_of` (a blunted costophrenic angle suggests an effusion)
# and `co_occurs_with` (effusions and atelectasis tend to come together). The graph is a
# `networkx.MultiDiGraph`; here is the neighbourhood of one finding.

# %%
print(pd.Series([r for _, r, _ in kg.relations()]).value_counts().rename("edges").to_string())
sub = kg.subgraph(focus_entity, radius=radius)
colours = {"finding": "#d62728", "device": "#9467bd", "anatomy": "#1f77b4", "laterality": "#7f7f7f"}
pos = nx.spring_layout(sub, seed=seed, k=1.2)
fig, ax = plt.subplots(figsize=(9, 6.5))
nx.draw_networkx_nodes(sub, pos, ax=ax, node_size=900, alpha=0.85,
                       node_color=[colours[kg.entity(n).category] for n in sub.nodes])
nx.draw_networkx_labels(sub, pos, ax=ax, font_size=8,
                        labels={n: kg.entity(n).name.replace(" ", "\n") for n in sub.nodes})
edge_colours = {"is_a": "black", "located_in": "#1f77b4", "suggestive_of": "#ff7f0e", "co_occurs_with": "#2ca02c"}
for rel, colour in edge_colours.items():
    edges = [(u, v) for u, v, k in sub.edges(keys=True) if k == rel]
    nx.draw_networkx_edges(sub, pos, edgelist=edges, ax=ax, edge_color=colour, arrows=True, arrowsize=14,
                           node_size=900, connectionstyle="arc3,rad=0.08")
handles = [plt.Line2D([], [], color=c, lw=2, label=r) for r, c in edge_colours.items()]
ax.legend(handles=handles, title="relation", loc="lower left", fontsize=8)
ax.set_title(f"Knowledge graph: {radius}-hop neighbourhood of '{kg.entity(focus_entity).name}' "
             "(red finding, blue anatomy, purple device)")
ax.axis("off")
plt.show()

# %% [markdown]
# ## Finding entities in report text
#
# The extractor is rule-based, in the tradition of NegEx and the CheXpert labeller:
#
# - **Mentions.** One regular expression holds every phrasing of every entity (built as a character
#   trie, so adding synonyms does not slow it down), matched on word boundaries, with regular plurals
#   and hyphen/space variants; the longest phrase wins ("calcified granulomas" is one mention, not a
#   calcification plus a granuloma).
# - **Negation** ("no", "without", "negative for", "free of", "clear of", "has resolved", ...) opens a
#   scope that runs to the end of the clause: it stops at "but", "however", "which", a semicolon or the
#   sentence end. A list keeps the scope open ("no effusion, consolidation or pneumothorax") unless the
#   next item starts a new statement ("no pneumothorax, *small* left effusion").
# - **Uncertainty** ("possible", "may represent", "versus", "cannot exclude", ...) works the same way.
#   Double negatives are hedges: "cannot be excluded" is one uncertain trigger, never a negation.
#   "Pseudo-triggers" such as "no change in" or "no ... *to suggest* pneumonia" are recognised so that
#   they do not flip the status of what follows.
# - **Side and location** come from the nearest side word and anatomy mention in the same clause.

# %%
examples = [
    "No pleural effusion or pneumothorax.",
    "No focal consolidation, pleural effusion, or pneumothorax.",
    "No pneumothorax, but there is a small left pleural effusion.",
    "Heart size is normal. The heart is not enlarged.",
    "Mild cardiomegaly without pulmonary edema.",
    "Possible right lower lobe pneumonia.",
    "Pneumonia cannot be excluded.",
    "Bibasilar opacities, atelectasis versus consolidation.",
    "No focal opacity to suggest pneumonia.",
    "No change in the small left effusion.",
    "Calcified granulomas in the right upper lobe. Left subclavian pacemaker.",
]
rows = []
for sentence in examples:
    for m in extractor.mentions(sentence):
        if kg.entity(m.entity_id).category in ("finding", "device"):
            rows.append(dict(sentence=sentence, mention=m.text, entity=m.entity_id, status=m.status,
                             side=m.side or "", location=m.location or ""))
pd.set_option("display.max_colwidth", 70)
pd.DataFrame(rows)

# %% [markdown]
# ### Report-level labels in CheXpert convention
#
# For a whole report the mentions are collapsed per CheXpert observation: **1** if any mention is
# positive, else **-1** if any is uncertain, else **0** if any is negated, else blank (not mentioned).
# "No Finding" is 1 when no observation other than Support Devices is positive or uncertain.

# %%
report = ("Left subclavian pacemaker. Mild cardiomegaly. No pneumothorax. Small left pleural effusion "
          "with adjacent atelectasis versus consolidation. No pulmonary edema.")
labels = extractor.report_labels(report)
pd.Series(labels, name="label").to_frame().T[CHEXPERT_14]

# %% [markdown]
# ### Which tokens carry which entity
#
# The local loss works on the text tower's tokens, not on characters. The MiniLM tokenizer shipped with
# the book is a WordPiece tokenizer: "pneumothorax" becomes six pieces. `encode` tokenizes with
# `return_offsets_mapping=True` and gives every piece the index of the entity whose character span it
# falls in (`token_entity`, -1 for none) and that mention's status (`token_status`: 1 positive,
# 0 negated, -1 uncertain, -2 none). Negated mentions keep their entity: "no effusion" is still a
# statement about effusions, and the model should learn what it looks like when it is absent.

# %%
tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
enc = extractor.encode([report], tokenizer, max_length=48)
tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
span_table = pd.DataFrame(dict(token=tokens, entity_index=enc["token_entity"][0].numpy(),
                               status=enc["token_status"][0].numpy()))
span_table["entity"] = [kg.entity_ids[i] if i >= 0 else "" for i in span_table.entity_index]
span_table[enc["attention_mask"][0].numpy() == 1].T

# %% [markdown]
# ## How well does it agree with human annotators? (IU X-ray, MeSH)
#
# Each IU report was indexed by people with MeSH terms such as `Opacity/lung/base/left` or
# `normal`. The knowledge base says which MeSH terms each entity corresponds to (its `mesh` field:
# `Cardiomegaly` and `Cardiac Shadow/enlarged` both mean cardiomegaly). A report is *gold positive* for
# an entity when one of its major MeSH terms maps to it, and *predicted positive* when the extractor
# finds a positive or uncertain mention of it in FINDINGS + IMPRESSION; "normal" is predicted when no
# finding or device is asserted at all. The 95 reports indexed "No Indexing" have no labels at all and
# are left out. We report precision, recall and F1 per finding and the macro F1 over the findings with
# at least `min_positives` gold positives (the same table is printed by
# `python -m mlip_core.knowledge.evaluate_iu`).

# %%
reports = load_iu_reports()
if eval_limit:
    reports = reports[:eval_limit]
t0 = time.perf_counter()
result = evaluate(reports, extractor, min_positives=min_positives)
strict = evaluate(reports, extractor, min_positives=min_positives, count_uncertain=False)
elapsed = time.perf_counter() - t0
table = result.table.copy()
table["f1 (uncertain = absent)"] = strict.table.set_index("finding").loc[table.finding, "f1"].to_numpy()
print(f"{result.num_reports} reports scored twice in {elapsed:.1f} s")
print(f"macro F1 over {int(table.evaluated.sum())} findings with >= {min_positives} positives: "
      f"{result.macro_f1:.3f} (uncertain counted as present), {strict.macro_f1:.3f} (uncertain counted as absent)")
table.round(3)

# %%
shown = table[table.evaluated].sort_values("f1")
fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(shown))))
ax.barh(shown.finding, shown.f1, color="#4c72b0", label="F1")
ax.scatter(shown.precision, shown.finding, color="#dd8452", s=14, label="precision", zorder=3)
ax.scatter(shown.recall, shown.finding, color="#55a868", s=14, label="recall", zorder=3)
ax.axvline(result.macro_f1, color="black", ls="--", lw=1, label=f"macro F1 {result.macro_f1:.3f}")
ax.set_xlim(0, 1.02)
ax.set_xlabel("agreement with MeSH labels")
ax.set_title(f"Extractor vs. MeSH annotators on {result.num_reports} IU reports")
ax.legend(loc="lower right", fontsize=8)
plt.show()

# %% [markdown]
# ### Reading the table
#
# Where the extractor and the annotators disagree, it is worth asking *who* is wrong, because the
# disagreements are not random. Studying them (without tuning to single reports) showed four kinds:
#
# - **Annotation conventions.** The MeSH indexers label what the radiologist *observed*, and often not
#   a diagnosis that was only *suggested*: "opacity, may represent pneumonia" is indexed as `Opacity`,
#   not `Pneumonia`. That is why diagnostic findings such as pneumonia and edema gain precision when
#   uncertain mentions count as absent (last column), while descriptive ones such as cardiomegaly lose
#   recall ("borderline cardiomegaly" *is* indexed). Neither choice is "right"; the CheXpert convention
#   keeps the distinction with the -1 label.
# - **Wording the indexers mapped differently from us.** A "nodular opacity" is indexed as a round
#   `Opacity`, "aortic calcification" as `Calcinosis/aorta` rather than atherosclerosis; the knowledge
#   base follows these conventions because they are also the radiologically sensible reading.
# - **Things a phrase list cannot see.** De-identification replaced many words with "XXXX" (often the
#   very noun: "right chest XXXX tip in the SVC"), findings are referred back to ("the nodule" meaning
#   the granuloma of the previous sentence), and some reports describe other body parts (a knee, an
#   ankle) whose "degenerative changes" are not chest findings.
# - **Genuine extractor errors**: unusual negation forms and long lists whose scope is cut too early
#   or too late.
#
# **A caveat on the number.** The phrase lists and trigger rules were refined by studying exactly these
# disagreements on these same 3,955 reports (always by adding general phrasings or rules, never by
# special-casing a report), so the macro F1 above is not a held-out estimate: expect somewhat lower
# agreement on reports from another hospital or era. There is no second MeSH-labelled corpus offline to
# measure that on.
#
# A rule-based labeller is transparent — every decision can be traced to a phrase and a trigger — and
# fast, which matters when it has to label every report of a pretraining corpus.

# %%
sample = [report_text(r) for r in load_iu_reports()[:speed_reports]]
t0 = time.perf_counter()
for text in sample:
    extractor.report_labels(text)
seconds = time.perf_counter() - t0
rate, chars_rate = len(sample) / seconds, sum(map(len, sample)) / seconds
print(f"{rate:.0f} IU reports/s ({chars_rate / 1e3:.0f} k characters/s) in this kernel: MIMIC-CXR's 227,835 "
      f"reports would take {227_835 / rate / 60:.1f} min at IU length, proportionally longer for longer reports. "
      "benchmarks/bench_extract.py measures it on one pinned core.")

# %% [markdown]
# ## With a UMLS licence
#
# `KnowledgeGraph.from_umls(meta_dir, cuis=..., semantic_types=...)` reads `MRCONSO.RRF` (names),
# `MRDEF.RRF` (definitions), `MRSTY.RRF` (semantic types) and `MRREL.RRF` (relations, read right to left
# as the Metathesaurus specifies) and returns a graph with the same interface; the extractor and the
# model accept it unchanged. Set `umls_dir` to your release's `META` folder to try it; restricting it to
# the curated CUIs keeps it small.

# %%
if umls_dir:
    cuis = [e.cui for e in kg.entities if e.cui]
    umls_kg = KnowledgeGraph.from_umls(umls_dir, cuis=cuis)
    print(umls_kg)
    display(pd.DataFrame([dict(cui=e.id, name=e.name, synonyms=len(e.synonyms), definition=e.definition[:80])
                          for e in umls_kg.entities]))
else:
    print("umls_dir is empty: skipped (the importer is tested on RRF fixtures in tests/test_umls.py)")
