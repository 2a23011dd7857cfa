"""Frozen-feature extraction speed (images/s) of the transfer chapter's encoders, and the linear probe's fit time.

    python benchmarks/bench_probe.py                          # 256 images, resnet18@64, effnet-lite0@128/224
    python benchmarks/bench_probe.py --n 512 --batch 128 --towers resnet18:64,tf_efficientnet_lite0:224

Images come from a uint8 array in memory (as from the image cache), so this measures the tower's forward pass
plus the eval transform under ``torch.inference_mode`` on the default device. Prints one table: encoder,
image size, memory layout (NCHW and channels-last, interleaved), feature dimension, images/s; then the seconds
to fit one standardised logistic regression (liblinear) on N x D features per C; last, the channels-last speedup
of each tower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlip_core.data.transforms import eval_transform  # noqa: E402
from mlip_core.repro import default_device  # noqa: E402
from mlip_core.transfer.classify import Encoder, build_tower, extract_features, linear_probe  # noqa: E402


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 (N, S, S) images -> {"image": (1, S, S) float} through the eval transform."""

    def __init__(self, images: np.ndarray, size: int) -> None:
        self.images, self.transform = images, eval_transform(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.transform(self.images[i])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--towers", default="resnet18:64,tf_efficientnet_lite0:128,tf_efficientnet_lite0:224")
    ap.add_argument("--probe-n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2, help="timed passes per memory format (the fastest counts)")
    args = ap.parse_args()
    device = default_device()
    rng = np.random.default_rng(0)
    rows, ratios = [], {}
    for spec in args.towers.split(","):
        name, size = spec.split(":")
        size = int(size)
        images = rng.integers(0, 256, size=(args.n, size, size), dtype=np.uint8)
        pretrained = "efficientnet_lite0_package" if name == "tf_efficientnet_lite0" else ""
        tower = build_tower(Encoder(name, "tower", size, tower={"name": name, "pretrained": pretrained}))
        seconds = {False: [], True: []}
        for _ in range(args.rounds):  # the two memory formats interleaved, so a slow spell hits both
            for channels_last in (False, True):
                extract_features(tower, ArrayDataset(images[: args.batch], size), args.batch, device,
                                 channels_last=channels_last)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                feats = extract_features(tower, ArrayDataset(images, size), args.batch, device,
                                         channels_last=channels_last)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[channels_last].append(time.perf_counter() - t0)
        for channels_last, times in seconds.items():
            dt = min(times)
            rows.append({"encoder": name, "image size": size, "layout": "channels_last" if channels_last else "NCHW",
                         "feature dim": feats.shape[1], "images": args.n, "seconds": round(dt, 2),
                         "images/s": round(args.n / dt, 1)})
        ratios[f"{name}@{size}"] = min(seconds[False]) / min(seconds[True])
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(pd.DataFrame(rows).to_string(index=False))

    prow = []
    for dim in (512, 1280):
        x = rng.normal(size=(args.probe_n, dim)).astype(np.float32)
        y = (x[:, :1] + rng.normal(size=(args.probe_n, 1)) > 1.0).astype(np.float64)
        for c in (0.01, 0.1, 1.0):
            t0 = time.perf_counter()
            linear_probe(x, y, x[:10], ["y"], C=c)
            prow.append({"N": args.probe_n, "D": dim, "C": c, "fit s": round(time.perf_counter() - t0, 2)})
    print(pd.DataFrame(prow).to_string(index=False))
    for tower_size, ratio in ratios.items():  # last lines, one name=value each
        print(f"extract_speedup_channels_last[{tower_size}]={ratio:.3f}")


if __name__ == "__main__":
    main()
