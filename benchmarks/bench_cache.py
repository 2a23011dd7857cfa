"""Image cache vs decoding files each time, on the same images in one run; and whether two DataLoader
workers reading the cache keep ahead of one training step.

    python benchmarks/bench_cache.py                       # 192 JPEGs of 1024x1024 -> 224, resnet50 step
    python benchmarks/bench_cache.py --n 64 --source-size 2048 --model resnet18 --batch 16

Images are written to a temporary folder as grayscale JPEGs (MIMIC-CXR-JPG images are ~2500x3000 JPEGs;
``--source-size`` sets ours). Prints one table: images/s for each way of reading, the cache's speed-up, the
training step's images/s on the default device, and whether the two-worker loader keeps ahead of it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlip_core.data.cache import ImageCache  # noqa: E402
from mlip_core.data.downstream import ImageLabelDataset  # noqa: E402
from mlip_core.data.images import load_uint8  # noqa: E402
from mlip_core.data.transforms import train_transform  # noqa: E402
from mlip_core.repro import default_device, seed_everything  # noqa: E402


def write_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` grayscale JPEGs (size x size) with smooth structure plus noise, like radiographs compress."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        base = 120 + 60 * np.sin(6 * xx + i) * np.cos(4 * yy) + 40 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1)
        img = np.clip(base + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(img, mode="L").save(p, quality=95)
        paths.append(p)
    return paths


def rate(fn, n: int, repeat: int = 1) -> float:
    """Items per second of calling ``fn(i)`` for i in range(n), best of ``repeat`` passes."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def loader_rate(ds, batch: int, workers: int, epochs: int = 2) -> float:
    """Images per second a DataLoader delivers (after its first batch, so worker start-up is excluded)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    it = iter(loader)
    next(it)
    t0, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for b in it:
            seen += b["image"].shape[0]
        it = iter(loader)
    return seen / (time.perf_counter() - t0)


def step_rate(model_name: str, batch: int, size: int, steps: int, device: torch.device) -> float:
    """Training images per second of one optimizer step (forward, backward, AdamW) on ``device``."""
    import timm

    model = timm.create_model(model_name, pretrained=False, in_chans=1, num_classes=14).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.rand(batch, 14, device=device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192, help="number of images")
    ap.add_argument("--source-size", type=int, default=1024, help="side of the JPEGs on disk")
    ap.add_argument("--size", type=int, default=224, help="training image size")
    ap.add_argument("--cache-size", type=int, default=256, help="size stored in the cache (crop to --size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="resnet50", help="timm model for the training-step rate")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seed_everything(args.seed)
    step_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reading is timed on one thread, as each DataLoader worker runs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "img", args.n, args.source_size, args.seed)
        df = pd.DataFrame({"image_path": [str(p) for p in paths], "y": 0.0})

        rows = []
        decode = rate(lambda i: load_uint8(paths[i], args.cache_size), args.n)
        rows.append(("decode + resize each time (uint8)", decode))
        t0 = time.perf_counter()
        cache = ImageCache(tmp / "cache", paths, args.cache_size)
        build = time.perf_counter() - t0
        rows.append((f"cache build, one-time ({build:.1f} s)", args.n / build))
        cache_read = rate(lambda i: cache[i], args.n, repeat=3)
        rows.append(("cache read (uint8)", cache_read))

        tf = train_transform(args.size)
        files_ds = ImageLabelDataset(df, ["y"], image_size=args.cache_size, transform=tf)
        cache_ds = ImageLabelDataset(df, ["y"], image_size=args.cache_size, transform=tf, cache=cache)
        files_item = rate(lambda i: files_ds[i], args.n)
        cache_item = rate(lambda i: cache_ds[i], args.n, repeat=2)
        rows.append(("dataset item from files (+ train transform)", files_item))
        rows.append(("dataset item from cache (+ train transform)", cache_item))
        two_workers = loader_rate(cache_ds, args.batch, workers=2)
        rows.append((f"DataLoader from cache, 2 workers, batch {args.batch}", two_workers))

        torch.set_num_threads(step_threads)
        device = default_device()
        step = step_rate(args.model, args.batch, args.size, args.steps, device)
        rows.append((f"training step {args.model} @ {args.size}, {device.type}", step))

    width = max(len(r[0]) for r in rows)
    print(f"{args.n} JPEGs {args.source_size}x{args.source_size} -> cache {args.cache_size} -> crop {args.size}; "
          f"reading on 1 thread, step on {step_threads}")
    print(f"{'what':<{width}}  {'images/s':>10}")
    print(f"{'-' * width}  {'-' * 10}")
    for name, r in rows:
        print(f"{name:<{width}}  {r:>10.1f}")
    print(f"cache read vs decode: {cache_read / decode:.1f}x   (target >= 5x)")
    print(f"dataset item, cache vs files: {cache_item / files_item:.1f}x")
    per_worker = two_workers / 2
    print(f"loader workers needed for this step rate: {max(1, int(np.ceil(step / per_worker)))} "
          f"(one worker ~ {per_worker:.0f} images/s)")
    verdict = "yes" if two_workers >= step else "NO"
    print(f"two cache workers keep ahead of one training step: {verdict} ({two_workers:.0f} vs {step:.0f} images/s)")


if __name__ == "__main__":
    main()
