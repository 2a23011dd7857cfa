"""Reports labelled per second by the knowledge extractor on one CPU core.

    python benchmarks/bench_extract.py [--repeats 3] [--reports 0]

Times ``KnowledgeExtractor.report_labels`` (mentions + CheXpert labels) and ``encode`` (adds MiniLM
tokenisation and token-entity mapping) on the real IU X-ray reports (findings + impression), pinned to
one thread, and extrapolates to MIMIC-CXR's 227,835 reports. The extractor's cost grows with text length
and MIMIC reports are longer than IU's, so the table also gives characters per second and a MIMIC time
for an *assumed* mean report length (``--mimic-mean-chars``; we have no MIMIC text here to measure it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

MIMIC_REPORTS = 227_835


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reports", type=int, default=0, help="use the first N IU reports (0 = all)")
    ap.add_argument("--batch", type=int, default=64, help="encode batch size")
    ap.add_argument("--mimic-mean-chars", type=int, default=1200,
                    help="assumed mean FINDINGS+IMPRESSION length of a MIMIC report, for the last column")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch
    from transformers import AutoTokenizer

    from mlip_core.data.iu import load_iu_reports
    from mlip_core.knowledge import minilm_path
    from mlip_core.knowledge.evaluate_iu import report_text
    from mlip_core.knowledge.extract import KnowledgeExtractor

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ex = KnowledgeExtractor()
    build_s = time.perf_counter() - t0
    texts = [report_text(r) for r in load_iu_reports()]
    if args.reports:
        texts = texts[: args.reports]
    chars = sum(len(t) for t in texts)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))

    def run_labels() -> None:
        for t in texts:
            ex.report_labels(t)

    def run_encode() -> None:
        for i in range(0, len(texts), args.batch):
            ex.encode(texts[i:i + args.batch], tok, max_length=128)

    def run_tokenize_only() -> None:
        for i in range(0, len(texts), args.batch):
            tok(texts[i:i + args.batch], max_length=128, truncation=True, padding="max_length",
                return_offsets_mapping=True, return_tensors="np")

    rows = []
    for name, fn in (("report_labels", run_labels), ("encode (tokenize + spans)", run_encode),
                     ("tokenizer alone (reference)", run_tokenize_only)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = min(times)
        rps = len(texts) / best
        cps = chars / best
        rows.append((name, rps, cps, MIMIC_REPORTS / rps / 60, MIMIC_REPORTS * args.mimic_mean_chars / cps / 60,
                     statistics.median(times)))

    print(f"IU reports: {len(texts)}, mean {chars / len(texts):.0f} chars; extractor built in {build_s * 1e3:.0f} ms; "
          f"1 thread, best of {args.repeats}")
    print(f"MIMIC columns: 227,835 reports at IU length, and at an assumed {args.mimic_mean_chars} chars each")
    print(f"{'step':<30} {'reports/s':>10} {'kchars/s':>10} {'MIMIC min (IU len)':>19} {'MIMIC min (assumed)':>20}")
    for name, rps, cps, mimic_n, mimic_c, _ in rows:
        print(f"{name:<30} {rps:>10.0f} {cps / 1e3:>10.0f} {mimic_n:>19.1f} {mimic_c:>20.1f}")


if __name__ == "__main__":
    main()
