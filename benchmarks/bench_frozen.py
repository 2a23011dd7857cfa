"""The once-only passes through the frozen towers (``train.frozen_precision``): float32 against bfloat16 autocast.

    python benchmarks/bench_frozen.py                  # chapter 05's ci towers on a small offline world
    python benchmarks/bench_frozen.py --rounds 3 --studies 480

Before training, the engine runs every training report through the wholly frozen text tower and every training
image's augmented views through the image tower's stem and frozen stages (see ``mlip_core.train.build_run``).
This times both passes as the engine runs them (``precompute_text_features`` on the reports; the trunk views,
augmentation included, on the images) with chapter 05's ``ci`` towers, image size and report length, in float32
and under bfloat16 autocast, alternating over ``--rounds`` rounds, and prints how far the bf16 outputs are from
float32's (relative Frobenius distance). The last lines, one ``name=value`` each:
``frozen_text_speedup_bf16_vs_fp32=``, ``frozen_trunk_speedup_bf16_vs_fp32=`` (median of the rounds' ratios of
float32 time to bf16 time), ``frozen_text_rel_diff=``, ``frozen_trunk_rel_diff=``. A CPU without native bf16
(AVX512-BF16 or AMX) may show a ratio below 1: there ``frozen_precision: fp32`` is the faster setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_train import ci_parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--studies", type=int, default=240, help="studies in the temporary offline world")
    args = p.parse_args()

    from mlip_core.config import pretrain_config
    from mlip_core.data.synth import write_world
    from mlip_core.model.encoders import build_tokenizer, precompute_text_features
    from mlip_core.model.mlip import MLIP
    from mlip_core.train import _pairs_dataset, _trunk_views

    params = ci_parameters()
    params.update(progress=False)
    cfg = pretrain_config("convirt", **params)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLIP_WORKSPACE"] = str(Path(tmp) / "workspace")
        world = Path(tmp) / "world"
        write_world(world, num_studies=args.studies, seed=0, image_size=int(params["image_size"]),
                    report_source="template", workers=2)
        dataset, _ = _pairs_dataset(cfg, world, "train", train_split=True)
        model = MLIP(cfg)
        text, image = model.text_tower, model.image_tower
        if not text.frozen or not image.frozen_trunk_stages:
            raise SystemExit("chapter 05's ci parameters no longer freeze the text tower and image stages")
        tokenizer = build_tokenizer(cfg.model.text)
        enc = tokenizer([t if isinstance(t, str) else "" for t in dataset._texts],
                        max_length=cfg.model.text.max_length, truncation=True, padding="max_length",
                        return_tensors="pt")
        image.eval()
        passes = {
            "text": lambda dt: precompute_text_features(text, enc, autocast_dtype=dt)["text_tokens"],
            "trunk": lambda dt: _trunk_views(image, dataset, 1, 0, 64, False, cfg.train.channels_last,
                                             torch.float32, dt)["trunk"],
        }
        times: dict[tuple[str, str], list[float]] = {}
        outputs: dict[tuple[str, str], torch.Tensor] = {}
        for name, run in passes.items():
            run(torch.bfloat16)  # warm both paths (oneDNN primitives, allocator) before timing
            run(None)
        print(f"\nfrozen passes on {len(dataset)} training pairs of a {args.studies}-study offline world, "
              f"{torch.get_num_threads()} threads (torch {torch.__version__}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()})\n")
        print(f"{'pass':<6} {'round':>5} {'precision':>9} {'seconds':>8}")
        for r in range(args.rounds):
            for name, run in passes.items():
                for label, dt in (("fp32", None), ("bf16", torch.bfloat16)):
                    t0 = time.perf_counter()
                    outputs[name, label] = run(dt).float()
                    times.setdefault((name, label), []).append(time.perf_counter() - t0)
                    print(f"{name:<6} {r:>5} {label:>9} {times[name, label][-1]:>8.2f}")
        print()
        for name in passes:
            ratios = [a / b for a, b in zip(times[name, "fp32"], times[name, "bf16"])]
            print(f"frozen_{name}_speedup_bf16_vs_fp32={statistics.median(ratios):.3f}")
        for name in passes:
            exact, fast = outputs[name, "fp32"], outputs[name, "bf16"]
            print(f"frozen_{name}_rel_diff={float((fast - exact).norm() / exact.norm()):.4f}")


if __name__ == "__main__":
    main()
