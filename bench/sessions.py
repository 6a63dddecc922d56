"""Many sessions on one device: one generator step serves every session due on a tick.

For N concurrent 25-fps sessions (each its own identity, noise and mouth/pose), one tick renders N frames
with `pcavs.engine.render_sessions` (one batched generator pass). Prints, per N: median tick ms, aggregate
frames/s, and whether the tick fits the 40 ms frame budget (what "N real-time sessions" means).

Usage: python bench/sessions.py --checkpoints DIR [--device cuda --dtype float16] [--sessions 1,4,8,16,32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_network_args, load_for_bench  # noqa: E402
from pcavs.engine import Avatar, EngineOptions, SessionRequest, render_sessions  # noqa: E402

FRAME_BUDGET_MS = 40.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_args(ap)
    ap.add_argument("--sessions", default="1,2,4")
    args = ap.parse_args()
    nets, device, dtype = load_for_bench(args)
    rng = np.random.default_rng(0)
    counts = [int(x) for x in args.sessions.split(",")]
    avatars = [Avatar(nets, torch.from_numpy(rng.uniform(-1, 1, (3, 224, 224)).astype(np.float32)),
                      EngineOptions(device=device, dtype=dtype, noise_seed=i)) for i in range(max(counts))]

    print(f"\nsessions bench — device {device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"medians of {args.runs} ticks after {args.warmup} warm-ups")
    header = f"{'sessions':>8} | {'tick ms':>8} | {'ms/frame':>8} | {'frames/s':>8} | {'real-time (tick<40ms)':>21}"
    print(header)
    print("-" * len(header))
    for n in counts:
        def tick() -> None:
            reqs = [SessionRequest(a, rng.uniform(0, 1, (1, 80, 20)).astype(np.float32),
                                   rng.normal(size=12).astype(np.float32)) for a in avatars[:n]]
            render_sessions(reqs)
        for _ in range(args.warmup):
            tick()
        samples = []
        for _ in range(args.runs):
            t = time.perf_counter()
            tick()
            samples.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(samples)
        print(f"{n:>8} | {ms:>8.1f} | {ms / n:>8.1f} | {1000 * n / ms:>8.1f} | {'yes' if ms < FRAME_BUDGET_MS else 'no':>21}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
