"""Forward+backward time of each loss term, of a whole training step for `convirt` vs `mlip` (identical
towers and batch, one run), of the vectorised local loss vs a per-sample loop of the same formula, and of
GLoRIA's local loss (vectorised, chunked) vs GLoRIA's own per-report loop at GLoRIA's shapes.

    python benchmarks/bench_losses.py                     # batch 48, resnet18 @ 128 px, MiniLM, <= 64 tokens
    python benchmarks/bench_losses.py --image-size 224 --image resnet50 --repeats 5
    python benchmarks/bench_losses.py --only gloria       # just the GLoRIA comparison (about 2 minutes on 2 cores)

The batch is a real PretrainCollator batch (KnowledgeExtractor entity tokens, text-swap pairs with
swap_prob 0.5) of invented report-like texts and random images. Prints a table, the arithmetic of one
step of each config (machine-independent), then ``step_ratio_mlip_vs_convirt=<x>`` (target <= 1.6),
``local_speedup_vs_loop=<y>`` (target >= 10 at batch 48), and as its last two lines
``gloria_time_ratio_vs_loop=<t>`` and ``gloria_memory_ratio_vs_loop=<m>`` (targets <= 0.5 each).

GLoRIA comparison: B=48 report-image pairs, 19x19 = 361 regions, d=768 unnormalised features, reports of
20-97 words (GLoRIA's configs/pretrain/chexpert_gloria_pretrain_config.yaml: batch 48, word_num 97; its
ResNet layer3 at 299 px is 19x19), forward+backward of :class:`GloriaLocalLoss` vs
:func:`gloria_local_loop` (GLoRIA's ``local_loss`` transcribed), values checked equal to 1e-4 first.
Peak memory: each variant runs once in a fresh subprocess, after a small warm-up of the same code; the
figure is the kernel's peak resident-set mark for that process (/proc/self/status VmHWM, reset after the
warm-up) minus its resident set just before the full-size call, i.e. everything the forward and backward
touched at their peak (tensors, autograd's saved tensors, allocator and BLAS workspace). Linux only; on
CUDA the same comparison uses torch.cuda.max_memory_allocated.

Timings are medians after one warm-up, both sides of a comparison alternating round by round; ratios
are medians of the per-round ratios. On CUDA they are wall times; on CPU they are the process's CPU
time (the machines this book is developed on are shared, and other users' load inflates wall time but
not CPU time), with idle OpenMP threads set to sleep rather than spin so that they are not counted.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads burn CPU time that
# would be counted against the step being measured. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mlip_core.config import ImageTowerConfig, TextTowerConfig, named_config
from mlip_core.losses import (
    CategoryLoss,
    GloriaLocalLoss,
    GlobalContrastiveLoss,
    LocalAlignmentLoss,
    MGCALocalLoss,
    gloria_local_loop,
    local_alignment_loop,
    local_token_weights,
)
from mlip_core.model.encoders import build_tokenizer
from mlip_core.model.mlip import MLIP
from mlip_core.repro import default_device, seed_everything


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def once(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of fn (device synchronised)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, alternating between them so that they share the machine's load;
    one warm-up call each first. Returns seconds per call: on CUDA wall time, on CPU the process's CPU
    time (all threads), which other users of a shared machine do not inflate; wall time is kept under
    ``<name>@wall``."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns} | {f"{k}@wall": [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            wall, cpu = once(fn, device)
            times[k].append(wall if device.type == "cuda" else cpu)
            times[f"{k}@wall"].append(wall)
    return times


def backward_of(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: loss_fn().backward()


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios (robust to load changes between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


def fake_batch(tokenizer, B: int, size: int, max_length: int, device, swap_prob: float = 0.5) -> dict[str, torch.Tensor]:
    """A real collated batch (PretrainCollator + KnowledgeExtractor) of invented report-like texts of
    1 to 12 sentences with random images; labels from the extractor, as the offline world has them."""
    from mlip_core.data.collate import PretrainCollator
    from mlip_core.knowledge.extract import KnowledgeExtractor
    from mlip_core.knowledge.graph import CHEXPERT_14

    phrases = ["Heart size is enlarged", "Small left pleural effusion", "No pneumothorax", "Lungs are clear",
               "Right lower lobe opacity", "Mild pulmonary edema", "No acute cardiopulmonary process"]
    texts = [". ".join(phrases[(i + k) % len(phrases)] for k in range(1 + (i * 5) % 12)) + "." for i in range(B)]
    extractor = KnowledgeExtractor()
    g = torch.Generator().manual_seed(0)
    items = []
    for i, text in enumerate(texts):
        lab = extractor.report_labels(text)
        items.append({"image": torch.randn(1, size, size, generator=g), "text": text, "study_id": i, "index": i,
                      "labels": torch.tensor([lab[c] for c in CHEXPERT_14], dtype=torch.float32)})
    collate = PretrainCollator(tokenizer, extractor, max_length, swap_prob, generator=g)
    return {k: v.to(device) for k, v in collate(items).items()}, len(extractor.graph.entity_ids)


GLORIA_SHAPES = {"P": 361, "D": 768, "min_words": 20, "max_words": 97}


def gloria_inputs(B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised word (B,97,768) and region (B,361,768) features, reports of 20..97 words (seeded)."""
    P, D, lo, hi = (GLORIA_SHAPES[k] for k in ("P", "D", "min_words", "max_words"))
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    lengths[0] = hi
    mask = torch.arange(hi)[None, :] < lengths[:, None]
    words = torch.randn(B, hi, D, generator=g).to(device).requires_grad_()
    regions = (0.5 * torch.randn(B, P, D, generator=g)).to(device).requires_grad_()
    return words, regions, mask.to(device)


def gloria_run(variant: str, words, regions, mask) -> torch.Tensor:
    """Forward + backward of one GLoRIA variant ('vec' or 'loop'); returns the loss."""
    words.grad = regions.grad = None
    if variant == "vec":
        loss = GloriaLocalLoss()(words, regions, mask)["loss"]
    else:
        loss = gloria_local_loop(words, regions, mask)
    loss.backward()
    return loss.detach()


def proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def gloria_memory_child(variant: str, B: int) -> None:
    """Subprocess body: warm up on a small input, reset the kernel's peak-RSS mark, then print how far one
    full-size forward+backward raised it above the resident set before the call. (``ru_maxrss`` would do
    on a fresh process, but Linux carries it over from the parent across fork/exec; VmHWM belongs to this
    process's own address space and can be reset by writing 5 to /proc/self/clear_refs.)"""
    device = torch.device("cpu")
    w, r, m = gloria_inputs(B, device)
    small = [t[:4, :24].detach().clone().requires_grad_() for t in (w, r)]
    gloria_run(variant, small[0], small[1], m[:4, :24] | (torch.arange(24) == 0))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the mark then includes start-up and the small warm-up, both far below the full call
    before = proc_status_bytes("VmRSS")
    gloria_run(variant, w, r, m)
    print(f"peak_increase_bytes={proc_status_bytes('VmHWM') - before}")


def gloria_memory(variant: str, B: int) -> float:
    """Peak resident memory (MiB) that one forward+backward of the variant adds, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--gloria-memory-child", variant, "--batch", str(B)],
                         capture_output=True, text=True, check=True, env=os.environ.copy())
    line = [x for x in out.stdout.splitlines() if x.startswith("peak_increase_bytes=")][-1]
    return int(line.split("=")[1]) / 2**20


def bench_gloria(B: int, repeats: int, device: torch.device) -> tuple[list[tuple[str, float, str]], str, float, float]:
    """GLoRIA's local loss: vectorised vs GLoRIA's per-report loop (time and peak memory)."""
    words, regions, mask = gloria_inputs(B, device)
    vec = gloria_run("vec", words, regions, mask)
    g_vec = (words.grad.clone(), regions.grad.clone())
    loop = gloria_run("loop", words, regions, mask)
    g_loop = (words.grad, regions.grad)
    if not torch.allclose(vec, loop, rtol=1e-4, atol=1e-4) or not all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max())) for a, b in zip(g_vec, g_loop)
    ):
        raise SystemExit(f"GLoRIA vectorised loss {vec.item()} != loop {loop.item()} (or their gradients differ)")
    times = interleaved({"vec": lambda: gloria_run("vec", words, regions, mask),
                         "loop": lambda: gloria_run("loop", words, regions, mask)}, repeats, device)
    note = (f"fwd+bwd, B={B} P={GLORIA_SHAPES['P']} d={GLORIA_SHAPES['D']} words "
            f"{int(mask.sum(1).min())}-{int(mask.sum(1).max())} (sum {int(mask.sum())}), unnormalised")
    rows = [("GLoRIA local vectorised", statistics.median(times["vec"]), f"{note}; value {vec.item():.5f}"),
            ("GLoRIA local per-report loop", statistics.median(times["loop"]), f"{note}; value {loop.item():.5f}")]
    if device.type == "cuda":
        mem = {}
        for v in ("vec", "loop"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            gloria_run(v, words, regions, mask)
            mem[v] = (torch.cuda.max_memory_allocated() - base) / 2**20
        how = "torch.cuda.max_memory_allocated increase"
    else:
        mem = {v: gloria_memory(v, B) for v in ("vec", "loop")}
        how = "peak RSS increase, fresh subprocess"
    mem_line = f"GLoRIA peak memory ({how}): vectorised {mem['vec']:.0f} MiB, loop {mem['loop']:.0f} MiB"
    return rows, mem_line, median_ratio(times["vec"], times["loop"]), mem["vec"] / mem["loop"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--image", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--text", default="minilm")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--only", choices=["all", "gloria"], default="all", help="run only the GLoRIA comparison")
    ap.add_argument("--gloria-repeats", type=int, default=3, help="timed rounds of the GLoRIA comparison")
    ap.add_argument("--gloria-memory-child", choices=["vec", "loop"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gloria_memory_child:
        gloria_memory_child(args.gloria_memory_child, args.batch)
        return
    seed_everything(0)
    device = default_device()
    if args.only == "gloria":
        rows, mem_line, t_ratio, m_ratio = bench_gloria(args.batch, args.gloria_repeats, device)
        clock = "wall time" if device.type == "cuda" else "CPU time of this process (all threads)"
        print(f"device={device} threads={torch.get_num_threads()} repeats={args.gloria_repeats}; ms = median {clock}")
        for label, sec, note in rows:
            print(f"{label:<32}  {sec * 1000:>10.1f}  {note}")
        print(mem_line)
        print(f"gloria_time_ratio_vs_loop={t_ratio:.3f}")
        print(f"gloria_memory_ratio_vs_loop={m_ratio:.3f}")
        return
    B, L, d = args.batch, args.max_length, 128
    rows: list[tuple[str, float, str]] = []

    # ---- whole training steps: identical towers and batch ------------------------------------
    def configured(name: str):
        cfg = named_config(name)
        cfg.model.image = ImageTowerConfig(name=args.image, image_size=args.image_size)
        cfg.model.text = TextTowerConfig(name=args.text, max_length=L)
        return cfg

    tokenizer = build_tokenizer(configured("mlip").model.text)
    batch, num_entities = fake_batch(tokenizer, B, args.image_size, L, device)
    steps: dict[str, Callable[[], None]] = {}
    flops: dict[str, int] = {}
    for name in ("convirt", "mlip"):
        cfg = configured(name)
        seed_everything(0)
        ent = torch.randn(num_entities, 384 if args.text == "minilm" else cfg.model.text.tiny_hidden_size)
        model = MLIP(cfg, ent).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def train_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            opt.step()
            model.momentum_update()

        steps[name] = train_step
        # arithmetic of one fwd+bwd, independent of the machine and its load
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            model(batch)["loss"].backward()
        flops[name] = counter.get_total_flops()
        opt.zero_grad(set_to_none=True)
    step_times = interleaved(steps, args.repeats, device)
    note = f"B={B} {args.image}@{args.image_size} {args.text} L={batch['input_ids'].shape[1]}"
    for name in steps:
        rows.append((f"step {name} (fwd+bwd+opt+ema)", statistics.median(step_times[name]),
                     f"{note}; wall {statistics.median(step_times[name + '@wall']) * 1000:.0f} ms"))
    step_ratio = median_ratio(step_times["mlip"], step_times["convirt"])
    flop_line = (f"arithmetic of one fwd+bwd (torch FlopCounterMode): mlip {flops['mlip'] / 1e9:.1f} GFLOP, "
                 f"convirt {flops['convirt'] / 1e9:.1f} GFLOP, ratio {flops['mlip'] / flops['convirt']:.3f}")

    # ---- each loss term on features of the sizes that step used ------------------------------
    g = torch.Generator().manual_seed(1)
    P = (args.image_size // 16) ** 2

    def leaf(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device).requires_grad_()

    img, txt = leaf(B, d), leaf(B, d)
    img_m, txt_m = img.detach().clone(), txt.detach().clone()
    scale = torch.tensor(1 / 0.07, device=device)
    labels = batch["labels"]
    L = batch["input_ids"].shape[1]
    tokens, patches = leaf(B, L, d), leaf(B, P, d)
    mask = batch["attention_mask"].bool()
    weights = local_token_weights(mask, batch["token_entity"], 2.0)
    protos = leaf(num_entities + 32, d)
    terms = {
        "global InfoNCE (convirt)": lambda: GlobalContrastiveLoss(0.0, False)(img, txt, scale)["loss"],
        "global + divergence + knowledge guard": lambda: GlobalContrastiveLoss(0.4, True)(img, txt, scale, img_m, txt_m, labels)["loss"],
        "local token-knowledge-patch": lambda: LocalAlignmentLoss(0.1)(tokens, patches, mask, weights)["loss"],
        "local MGCA word+patch": lambda: MGCALocalLoss(0.1)(tokens, patches, mask, weights)["loss"],
        "local GLoRIA word-region": lambda: GloriaLocalLoss()(tokens, patches, mask)["loss"],
        "category (sinkhorn + supcon)": lambda: CategoryLoss()(img, txt, protos, labels)["loss"],
    }
    term_times = interleaved({k: backward_of(fn) for k, fn in terms.items()}, args.repeats, device)
    for label in terms:
        rows.append((label, statistics.median(term_times[label]), f"fwd+bwd, B={B} L={L} P={P} d={d}"))

    # ---- local loss: vectorised vs per-sample loop --------------------------------------------
    vec = LocalAlignmentLoss(0.1)(tokens, patches, mask, weights)["loss"]
    loop = local_alignment_loop(tokens, patches, mask, weights, 0.1)
    if not torch.allclose(vec, loop, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"vectorised local loss {vec.item()} != loop {loop.item()}")
    local_times = interleaved({
        "vec": backward_of(lambda: LocalAlignmentLoss(0.1)(tokens, patches, mask, weights)["loss"]),
        "loop": backward_of(lambda: local_alignment_loop(tokens, patches, mask, weights, 0.1)),
    }, max(args.repeats, 7), device)
    for key, label, value in (("vec", "local vectorised", vec), ("loop", "local per-sample loop", loop)):
        wall = statistics.median(local_times[key + "@wall"]) * 1000
        rows.append((label, statistics.median(local_times[key]), f"fwd+bwd, value {value.item():.5f}; wall {wall:.1f} ms"))

    g_rows, g_mem_line, g_time, g_mem = bench_gloria(B, args.gloria_repeats, device)
    rows += g_rows

    clock = "wall time" if device.type == "cuda" else "CPU time of this process (all threads)"
    print(f"device={device} threads={torch.get_num_threads()} repeats={args.repeats}; ms = median {clock}")
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'ms':>10}  notes")
    for label, sec, note in rows:
        print(f"{label:<{width}}  {sec * 1000:>10.1f}  {note}")
    print(flop_line)
    print(g_mem_line)
    print("ratios are medians of per-round ratios (each round runs both sides back to back)")
    print(f"step_ratio_mlip_vs_convirt={step_ratio:.3f}")
    print(f"local_speedup_vs_loop={median_ratio(local_times['loop'], local_times['vec']):.2f}")
    print(f"gloria_time_ratio_vs_loop={g_time:.3f}")
    print(f"gloria_memory_ratio_vs_loop={g_mem:.3f}")


if __name__ == "__main__":
    main()
