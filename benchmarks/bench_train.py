"""Training throughput (image-report pairs per second) and peak memory of the pretraining engine.

    python benchmarks/bench_train.py                 # CPU: the real ci training step of chapter 05, ConVIRT vs MLIP
    python benchmarks/bench_train.py --gpu           # CUDA: ResNet-50 + BERT-base (random init), batch 128, bf16
    python benchmarks/bench_train.py --synthetic --steps 6 --configs mlip --sizes ci
    python benchmarks/bench_train.py --configs convirt,mlip,mlip:swap_variants=0   # a row with a TrainConfig change
    python benchmarks/bench_train.py --configs convirt,mlip,convirt:trunk_views=0:channels_last=false,\
        mlip:trunk_views=0:channels_last=false:swap_variants=0    # the engine without its caches, side by side

Default (CPU): the real thing. A small offline world is written in a temporary folder and each config trains on
it through ``mlip_core.train.train`` with chapter 05's ``ci`` parameters (its parameters cell, with
``book/profiles/ci.yaml``'s block on top): the image cache, the frozen text features computed once, the
collator, augmentation, forward, backward, AdamW and the momentum update. Configs alternate over ``--rounds``
rounds; a step's time is read from the run's metrics (it includes fetching the batch) and the steps after the
first two are kept. The last line is
``train_time_ratio_mlip_vs_convirt=`` (time per pair, median of the rounds' ratios); rows such as
``mlip:swap_variants=0`` (a TrainConfig field changed) print their own ratio just before it. Caches built once per
dataset (frozen text features, swapped reports' encodings) are built before the first step and not timed.

``--synthetic`` / ``--gpu``: batches are synthetic tensors already in the collator's output format, so the numbers
are the engine's (forward, backward, AdamW, momentum update, logging) and not the data pipeline's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import Dataset

from mlip_core.config import named_config
from mlip_core.model.mlip import MLIP
from mlip_core.repro import seed_everything
from mlip_core.train import Trainer, init_distributed, read_metrics

# name: (image tower, image size, text tower, text hidden, text layers, heads, max_length, frozen text layers)
# "ci" is the 05_pretraining chapter's ci profile.
SIZES = {
    "smoke": ("resnet18", 32, "tiny", 32, 2, 2, 32, 0),
    "ci": ("resnet18", 64, "minilm", 384, 6, 12, 48, 4),
    "ci128": ("resnet18", 128, "minilm", 384, 6, 12, 64, 0),
    "gpu": ("resnet50", 224, "tiny", 768, 12, 12, 128, 0),  # "tiny" sized as BERT-base: random init, offline
}
NUM_ENTITIES = 77


class SyntheticPairs(Dataset):
    """Collated-format items: image (1,S,S), ids/mask/entity (L,), labels (14,), swapped ids (L,)."""

    def __init__(self, n: int, size: int, length: int, vocab: int = 30522) -> None:
        self.n, self.size, self.length, self.vocab = n, size, length, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1000, self.vocab, (self.length,), generator=g)
        ids[0], ids[-1] = 101, 102
        ent = torch.where(torch.rand(self.length, generator=g) < 0.15,
                          torch.randint(0, NUM_ENTITIES, (self.length,), generator=g), torch.full((self.length,), -1))
        return {"image": torch.randn(1, self.size, self.size, generator=g), "input_ids": ids,
                "attention_mask": torch.ones(self.length, dtype=torch.long), "token_entity": ent,
                "labels": (torch.rand(14, generator=g) < 0.2).float(), "swap_input_ids": ids.roll(3),
                "swap_attention_mask": torch.ones(self.length, dtype=torch.long),
                "swap_label": torch.tensor(float(i % 2)), "study_id": i}


def stack(items: list[dict]) -> dict:
    """Stack tensor fields."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "study_id"}


def bench(config: str, size: str, batch: int, steps: int, precision: str, device: str,
          channels_last: bool, compile_: bool) -> dict:
    """One row: run the trainer for ``steps`` steps and read its throughput and memory."""
    tower, px, text, hidden, layers, heads, length, frozen = SIZES[size]
    cfg = named_config(config)
    cfg.model.image.name, cfg.model.image.image_size = tower, px
    cfg.model.text.name, cfg.model.text.max_length = text, length
    cfg.model.text.tiny_hidden_size, cfg.model.text.tiny_layers, cfg.model.text.tiny_heads = hidden, layers, heads
    cfg.model.text.freeze_layers = frozen
    tc = cfg.train
    tc.batch_size, tc.max_steps, tc.precision, tc.device = batch, steps, precision, device
    tc.channels_last, tc.compile, tc.progress, tc.val_every, tc.warmup_steps = channels_last, compile_, False, 0, 1
    seed_everything(0)
    info = init_distributed(device)
    ent = torch.randn(NUM_ENTITIES, hidden if text == "tiny" else 384)
    model = MLIP(cfg, ent, prototype_entities=list(range(20)))
    data = SyntheticPairs(batch * (steps + 1), px, length)
    with tempfile.TemporaryDirectory() as tmp:
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg, Path(tmp), model, data, stack, dist_info=info)
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        recs = read_metrics(tmp, "step")
    rates = [r["images_per_s"] for r in recs[2:]] or [r["images_per_s"] for r in recs]
    mem = (torch.cuda.max_memory_allocated() / 2**30) if info.device.type == "cuda" else max(r["mem_mb"] for r in recs) / 1024
    return {"config": config, "size": size, "model": f"{tower}@{px} + {text}({hidden}x{layers}{f', {frozen} frozen' if frozen else ''}) L={length}",
            "batch": batch, "precision": "fp32" if info.device.type == "cpu" else precision,
            "pairs_s": statistics.median(rates), "peak_gib": mem, "wall_s": wall,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def ci_parameters(notebook: str = "05_pretraining") -> dict:
    """The chapter's ci pretraining parameters: its parameters cell (which holds the ci values) with the ci
    profile's block for it on top (profiles hold only differences), keys of PRETRAIN_PARAMETERS only."""
    import ast

    import jupytext
    import yaml

    from mlip_core.book import parse_parameters_cell
    from mlip_core.config import PRETRAIN_PARAMETERS
    from mlip_core.paths import book_dir, notebooks_dir

    cells = [c for c in jupytext.read(notebooks_dir() / f"{notebook}.py").cells
             if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise SystemExit(f"notebooks/{notebook}.py has no parameters cell")
    declared = parse_parameters_cell(cells[0].source, notebook)
    params = {k: ast.literal_eval(p.default) for k, p in declared.items() if k in PRETRAIN_PARAMETERS}
    block = (yaml.safe_load((book_dir() / "profiles" / "ci.yaml").read_text()) or {}).get(notebook) or {}
    params.update({k: v for k, v in block.items() if k in PRETRAIN_PARAMETERS})
    return params


def bench_real(configs: list[str], steps: int, rounds: int, studies: int) -> list[dict]:
    """Rows of (config, round, seconds per pair, pairs/s) for the real ci training step (see the docstring)."""
    import os

    from mlip_core.config import pretrain_config
    from mlip_core.data.synth import write_world
    from mlip_core.train import train

    params = ci_parameters()
    params.update(max_steps=steps, checkpoint_every=0, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLIP_WORKSPACE"] = str(Path(tmp) / "workspace")
        world = Path(tmp) / "world"
        write_world(world, num_studies=studies, seed=0, image_size=int(params["image_size"]), report_source="template",
                    workers=2)
        for r in range(rounds):
            for label in configs:
                name, *overrides = label.split(":")
                cfg = pretrain_config(name, **params)
                cfg.train.val_every = 0
                for item in overrides:  # "mlip:swap_variants=0": a TrainConfig field set for this row
                    key, value = item.split("=")
                    getattr(cfg.train, key)  # an unknown field is an AttributeError naming it
                    setattr(cfg.train, key, yaml.safe_load(value))
                res = train(cfg, data_dir=world, run_dir=Path(tmp) / f"{label.replace(':', '_')}_{r}")
                recs = res.history[2:] or res.history
                seconds = sum(x["time_s"] for x in recs)
                pairs = sum(x["images_per_s"] * x["time_s"] for x in recs)
                rows.append({"config": label, "round": r, "s_per_pair": seconds / pairs, "pairs_s": pairs / seconds,
                             "image": f"{params['image_tower']}@{params['image_size']}, {params['frozen_stages']} "
                                      f"stages frozen", "text": f"{params['text_tower']} (frozen, cached)",
                             "batch": int(params["batch_size"])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="ResNet-50 + BERT-base at batch 128 in bf16 on CUDA")
    p.add_argument("--configs", default="convirt,mlip")
    p.add_argument("--sizes", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--synthetic", action="store_true", help="synthetic batches on CPU (the engine alone)")
    p.add_argument("--rounds", type=int, default=2, help="real path: alternating rounds of the configs")
    p.add_argument("--studies", type=int, default=240, help="real path: studies in the temporary world")
    args = p.parse_args()
    if not (args.gpu or args.synthetic):
        configs = args.configs.split(",")
        rows = bench_real(configs, args.steps or 12, args.rounds, args.studies)
        print(f"\nreal ci training step on CPU, {torch.get_num_threads()} threads (torch {torch.__version__}); "
              f"steps 3..{args.steps or 12} of each run\n")
        print(f"{'config':<58} {'round':>5} {'image tower':<40} {'batch':>5} {'pairs/s':>8} {'ms/pair':>8}")
        for r in rows:
            print(f"{r['config']:<58} {r['round']:>5} {r['image']:<40} {r['batch']:>5} {r['pairs_s']:>8.1f} "
                  f"{r['s_per_pair'] * 1000:>8.2f}")
        if "convirt" in configs:
            per = {(r["config"], r["round"]): r["s_per_pair"] for r in rows}
            # variants first, the ratio last
            for label in sorted((c for c in configs if c.startswith("mlip")), key=lambda c: c == "mlip"):
                # against ConVIRT with the same engine settings (swap_variants means nothing to ConVIRT)
                same = ":".join(["convirt", *(o for o in label.split(":")[1:] if not o.startswith("swap_variants"))])
                base = same if same in configs else "convirt"
                ratios = [per[(label, k)] / per[(base, k)] for k in range(args.rounds)]
                name = "mlip" if label == "mlip" else label.replace(":", "_").replace("=", "")
                print(f"train_time_ratio_{name}_vs_convirt={statistics.median(ratios):.3f}")
        return
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu asked but torch.cuda.is_available() is False")
    device = "cuda" if args.gpu else "cpu"
    sizes = (args.sizes or ("gpu" if args.gpu else "ci")).split(",")
    batch = args.batch or (128 if args.gpu else 16)
    steps = args.steps or (12 if args.gpu else 5)
    rows = [bench(c, s, batch, steps, args.precision, device, args.channels_last, args.compile)
            for s in sizes for c in args.configs.split(",")]
    where = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntraining throughput on {where} (torch {torch.__version__}); median of steps 3..{steps}\n")
    head = f"{'config':<9} {'model':<52} {'batch':>5} {'prec':>5} {'params M':>8} {'pairs/s':>8} {'peak GiB':>8} {'wall s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<9} {r['model']:<52} {r['batch']:>5} {r['precision']:>5} {r['params_m']:>8.1f} "
              f"{r['pairs_s']:>8.1f} {r['peak_gib']:>8.2f} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
