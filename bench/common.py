"""What the engine benchmarks share: their command-line options and the network loading they imply."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from pcavs.checkpoints import PcavsNetworks, load_networks
from pcavs.device import resolve_device


def add_network_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoints", default="checkpoints/parity_seed0",
                    help="checkpoint folder (stand-ins: ../shared/parity/make_weights.py --seed 0 --out DIR)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)


def load_for_bench(args: argparse.Namespace) -> tuple[PcavsNetworks, str, torch.dtype]:
    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device, dtype)
    return load_networks(Path(args.checkpoints), device=device, dtype=dtype), device, dtype


def median_ms(fn: Callable[[], object], runs: int, warmup: int, device: str) -> float:
    """Median wall time of `fn` in ms, synchronising CUDA around each run so GPU time is counted."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)
