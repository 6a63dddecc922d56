"""What the engine benchmarks share: their command-line options and the network loading they imply."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from pcavs.checkpoints import PcavsNetworks, load_networks
from pcavs.device import resolve_device_and_dtype


def add_network_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoints", default="checkpoints/parity_seed0",
                    help="checkpoint folder (stand-ins: ../shared/parity/make_weights.py --seed 0 --out DIR)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="generator dtype (auto: bfloat16 on CUDA sm_80+ and on CPUs with native bf16, else float32; "
                         "encoders stay float32)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)


def load_for_bench(args: argparse.Namespace) -> tuple[PcavsNetworks, str, torch.dtype]:
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    return load_networks(Path(args.checkpoints), device=device, dtype=dtype), device, dtype


def sync(device: str) -> None:
    """Wait for the calling thread's current stream on `device` (never the whole device: the engine's
    own calls already wait for their render stream)."""
    if device.startswith("cuda"):
        torch.cuda.current_stream(torch.device(device)).synchronize()


def median_ms(fn: Callable[[], object], runs: int, warmup: int, device: str) -> float:
    """Median wall time of `fn` in ms, waiting for the current stream around each run so GPU time is counted."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def round_robin(fns: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """ms of every run of each fn, timed in turns (a, b, a, b, ...) so a burst of load from other users of
    a shared CPU hits all of them alike: compare ratios within one call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e3)
    return samples
