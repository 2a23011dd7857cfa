"""Agreement of the knowledge extractor with the IU X-ray reports' MeSH labels (torchxrayvision's NLMCXR archive).

Gold: a report is positive for an entity when one of its *major* MeSH terms maps to it (the ``mesh`` field of
the knowledge base: ``"Head"`` or ``"Head/qualifier"`` or ``"*/qualifier"``); "normal" when a major term is
``normal``. Prediction: the extractor, run on FINDINGS + IMPRESSION, finds a positive (or, by default, an
uncertain) mention of that entity; "normal" when it finds no positive/uncertain finding or device at all.

    python -m mlip_core.knowledge.evaluate_iu [--min-positives 30] [--limit N] [--positive-only]

The last line printed is ``macro_f1=<value> findings=<n> reports=<n>``, the macro F1 over the findings
with at least ``--min-positives`` gold positives. The knowledge base's phrasings were refined by studying
disagreements on these same reports, so this is agreement on development data, not a held-out estimate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from mlip_core.data.iu import IUReport, load_iu_reports, parse_mesh_term
from mlip_core.knowledge.extract import KnowledgeExtractor, Mention
from mlip_core.knowledge.graph import KnowledgeGraph

NORMAL = "normal"


@dataclass
class IUEvaluation:
    """Per-finding agreement table plus the gold / predicted label matrices (reports x findings)."""

    table: pd.DataFrame  # one row per finding: name, positives, tp, fp, fn, precision, recall, f1, evaluated
    gold: pd.DataFrame  # (reports, findings) bool
    pred: pd.DataFrame  # (reports, findings) bool
    macro_f1: float
    num_reports: int
    min_positives: int


def mesh_matches(spec: str, term: str) -> bool:
    """Whether a MeSH term ("Opacity/lung/base/left") matches a spec ("Opacity", "Diaphragm/elevated", "*/degenerative")."""
    parsed = parse_mesh_term(term)
    head, _, qual = spec.partition("/")
    if head != "*" and parsed.finding.strip().lower() != head.strip().lower():
        return False
    return not qual or qual.lower() in [q.lower() for q in parsed.qualifiers]


def gold_entities(report: IUReport, graph: KnowledgeGraph) -> set[str]:
    """Entity ids (plus "normal") that the report's major MeSH terms name."""
    out: set[str] = set()
    for term in report.mesh_major:
        if not term or not term.strip():
            continue
        if parse_mesh_term(term).finding.strip().lower() == NORMAL:
            out.add(NORMAL)
            continue
        for ent in graph.entities:
            if any(mesh_matches(spec, term) for spec in ent.mesh):
                out.add(ent.id)
    return out


def predicted_entities(mentions: Sequence[Mention], graph: KnowledgeGraph, count_uncertain: bool = True) -> set[str]:
    """Entity ids asserted present (positive, and uncertain unless ``count_uncertain`` is False), plus "normal"."""
    keep = {"positive", "uncertain"} if count_uncertain else {"positive"}
    found = {m.entity_id for m in mentions if m.status in keep}
    for eid in list(found):  # umbrella terms that MeSH also uses for narrower entities
        found |= {a for a in graph.ancestors(eid) if graph.entity(a).mesh_includes_narrower}
    abnormal = {e for e in found if graph.entity(e).category in ("finding", "device")}
    return found | ({NORMAL} if not abnormal else set())


def is_unindexed(report: IUReport) -> bool:
    """True when the report has no major MeSH term other than "No Indexing"."""
    terms = [parse_mesh_term(t).finding.strip().lower() for t in report.mesh_major if t and t.strip()]
    return all(t == "no indexing" for t in terms)


def report_text(report: IUReport) -> str:
    """FINDINGS + IMPRESSION, the text the extractor reads."""
    return "\n\n".join(t.strip() for t in (report.findings, report.impression) if t and t.strip())


def evaluate(
    reports: Sequence[IUReport],
    extractor: KnowledgeExtractor | None = None,
    min_positives: int = 30,
    count_uncertain: bool = True,
) -> IUEvaluation:
    """Per-finding precision / recall / F1 of the extractor against MeSH labels; macro F1 over frequent findings."""
    extractor = extractor or KnowledgeExtractor()
    # Reports the indexers marked "No Indexing" carry no labels at all (not even "normal"): no gold to score.
    reports = [r for r in reports if not is_unindexed(r)]
    graph = extractor.graph
    columns = [NORMAL] + [e.id for e in graph.entities if e.mesh]
    gold_rows, pred_rows, uids = [], [], []
    for rep in reports:
        gold = gold_entities(rep, graph)
        pred = predicted_entities(extractor.mentions(report_text(rep)), graph, count_uncertain)
        gold_rows.append([c in gold for c in columns])
        pred_rows.append([c in pred for c in columns])
        uids.append(rep.uid)
    gold_df = pd.DataFrame(gold_rows, index=uids, columns=columns, dtype=bool)
    pred_df = pd.DataFrame(pred_rows, index=uids, columns=columns, dtype=bool)
    rows = []
    for c in columns:
        g, p = gold_df[c], pred_df[c]
        tp, fp, fn = int((g & p).sum()), int((~g & p).sum()), int((g & ~p).sum())
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        name = "Normal (no finding)" if c == NORMAL else graph.entity(c).name
        rows.append(dict(finding=c, name=name, positives=int(g.sum()), predicted=int(p.sum()), tp=tp, fp=fp,
                         fn=fn, precision=prec, recall=rec, f1=f1, evaluated=int(g.sum()) >= min_positives))
    table = pd.DataFrame(rows).sort_values("positives", ascending=False, kind="stable").reset_index(drop=True)
    evaluated = table[table["evaluated"]]
    macro = float(evaluated["f1"].mean()) if len(evaluated) else float("nan")
    return IUEvaluation(table, gold_df, pred_df, macro, len(reports), min_positives)


def format_table(table: pd.DataFrame) -> str:
    """The per-finding table as fixed-width text."""
    show = table[["finding", "positives", "predicted", "tp", "fp", "fn", "precision", "recall", "f1", "evaluated"]]
    return show.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the per-finding table; last line ``macro_f1=<value> findings=<n> reports=<n>``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-positives", type=int, default=30, help="findings with fewer gold positives are listed "
                    "but left out of the macro F1 (default 30)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N reports (0 = all)")
    ap.add_argument("--positive-only", action="store_true", help="count uncertain mentions as absent")
    ap.add_argument("--archive", default=None, help="NLMCXR_reports.tgz (default: torchxrayvision's copy)")
    args = ap.parse_args(argv)
    reports = load_iu_reports(args.archive)
    if args.limit:
        reports = reports[: args.limit]
    extractor = KnowledgeExtractor()
    result = evaluate(reports, extractor, min_positives=args.min_positives, count_uncertain=not args.positive_only)
    other = evaluate(reports, extractor, min_positives=args.min_positives, count_uncertain=args.positive_only)
    print(format_table(result.table))
    n_eval = int(result.table["evaluated"].sum())
    skipped = len(reports) - result.num_reports
    print(f"# {skipped} reports marked 'No Indexing' (no MeSH labels) were left out")
    mode = "counted as present" if not args.positive_only else "counted as absent"
    other_mode = "absent" if not args.positive_only else "present"
    print(f"# uncertain mentions {mode}; with uncertain mentions counted as {other_mode}: "
          f"macro_f1={other.macro_f1:.4f}")
    print(f"macro_f1={result.macro_f1:.4f} findings={n_eval} reports={result.num_reports}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
