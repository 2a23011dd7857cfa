"""Rendering speed of the offline world: images per second per core at 224 and 512 pixels, and a world build.

    python benchmarks/bench_render.py [--n 300] [--sizes 224,512] [--world-studies 1000]

"per core" uses process CPU time (numpy runs these element-wise kernels on one thread), so the number
holds on a busy machine; wall-clock rates are printed beside it. Scenes carry findings drawn from the
template prior (about one per image), like a written world.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mlip_core.data.reportgen import sample_findings  # noqa: E402
from mlip_core.data.synth import write_world  # noqa: E402
from mlip_core.data.synth_anatomy import lung_templates  # noqa: E402
from mlip_core.data.synth_render import render, sample_patient, sample_scene  # noqa: E402


def bench_size(size: int, n: int, seed: int = 0) -> dict[str, float]:
    """Render ``n`` images at ``size``; rates for render alone and render + JPEG encode."""
    rng = np.random.default_rng(seed)
    patients = [sample_patient(rng) for _ in range(50)]
    scenes = [sample_scene(rng, patients[i % 50], sample_findings(rng), size=size) for i in range(n)]
    render(scenes[0])  # warm caches (coordinate grids)
    c0, w0 = time.process_time(), time.perf_counter()
    images = [render(s).image for s in scenes]
    c1, w1 = time.process_time(), time.perf_counter()
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im, mode="L").save(buf, format="JPEG", quality=95)
    c2, w2 = time.process_time(), time.perf_counter()
    return {"size": size, "n": n, "render img/s/core": n / (c1 - c0), "render img/s wall": n / (w1 - w0),
            "+jpeg img/s/core": n / (c2 - c0), "ms/img (cpu)": 1000 * (c1 - c0) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--world-studies", type=int, default=1000)
    a = ap.parse_args()
    t = time.perf_counter()
    lung_templates()
    print(f"lung templates ready in {time.perf_counter() - t:.2f} s ({len(lung_templates())} outlines)")
    rows = [bench_size(int(s), a.n) for s in a.sizes.split(",")]
    cols = list(rows[0])
    print("\n" + "  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>18.1f}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    if a.world_studies:
        with tempfile.TemporaryDirectory() as tmp:
            c0, w0 = time.process_time(), time.perf_counter()
            s = write_world(os.path.join(tmp, "w"), a.world_studies, seed=0, image_size=224)
            c1, w1 = time.process_time(), time.perf_counter()
        print(f"\nwrite_world: {s.studies} studies at 224 px, 1 worker: {w1 - w0:.1f} s wall, {c1 - c0:.1f} s CPU "
              f"({s.studies / (c1 - c0):.0f} studies/s/core; includes IU parsing, JPEG + PNG masks, CSVs)")


if __name__ == "__main__":
    main()
