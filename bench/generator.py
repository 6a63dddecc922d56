"""Benchmark of the generator G's speed levers: formulation, memory format, identity cache, bf16.

For each batch size, every variant is timed round-robin (variant A, B, C, A, B, C, ...) so a burst of
load from other users of the shared CPU hits all variants alike; the table gives the median ms/frame
over --runs after --warmup, the ratio to the upstream grouped-conv fp32 formulation timed in the same
run, and the output's agreement with it (max |Δ|, PSNR with peak-to-peak 2).

Variants:
  grouped fp32          upstream formulation (rosinality's fused=True): per-sample weights, one grouped
                        conv (groups=B)
  shared fp32 nchw      shared-weight conv between input/output channel scalings, whole batch, NCHW
  shared fp32 nhwc      the same in channels_last
  shared fp32 nhwc b1   the same, run one sample at a time (max_batch=1: the CPU default, "auto")
  shared fp32 nhwc(b1)+id  the default + identity part of the styles precomputed (precompute_style →
                        forward_cached: what the app's Avatar runs)
  shared bf16 nhwc      the module cast to bfloat16 (batch 1 only, --bf16-runs runs: CPUs without native
                        bf16 run reference kernels, far slower)
The modulation stage alone (full 2560-wide style vs identity cache) is timed separately.

Usage: python bench/generator.py [--checkpoints DIR] [--batches 1,16] [--runs 5] [--warmup 1] [--device cuda]
(on CUDA every run waits for its stream; the half-precision row runs in --half-dtype at every batch size;
bench/gpu_generator.py times the whole render path with CUDA graphs)
Without the parity checkpoints: python ../shared/parity/make_weights.py --seed 0 --out DIR --nets G
Check `uptime` first: the CPU is shared; timings on a loaded machine mean little.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pcavs.checkpoints import IGNORABLE_PREFIXES, load_network  # noqa: E402
from pcavs.constants import ID_DIM  # noqa: E402
from pcavs.networks.generator import ModulatedGenerator  # noqa: E402

UPSTREAM_MS = {1: 740.0, 16: 2040.0}  # shared/parity/README.md, same CPU kind, fp32, upstream code
CASE = Path(__file__).resolve().parent.parent.parent / "shared" / "parity" / "cases" / "case_seed0.npz"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def inputs(batch: int, net: ModulatedGenerator) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The oracle's seed-0 inputs tiled to `batch` (realistic activation statistics), else random."""
    if CASE.is_file():
        with np.load(CASE) as c:
            style, start = torch.from_numpy(c["style_driven"]), torch.from_numpy(c["id_map"])
            noise = [torch.from_numpy(c[f"noise_{i}"].astype(np.float32)) for i in range(11)]
        idx = torch.arange(batch) % style.shape[0]
        return style[idx], start[idx], [n[idx] for n in noise]
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 2560, generator=g), torch.randn(batch, 512, 7, 7, generator=g),
            [torch.randn((batch, *s[1:]), generator=g) for s in net.noise_shapes()])


def configure(net: ModulatedGenerator, shared_weight: bool, channels_last: bool,
              max_batch: int | str | None = None) -> ModulatedGenerator:
    net.shared_weight, net.channels_last, net.max_batch = shared_weight, channels_last, max_batch
    return net


def round_robin(fns: dict[str, Callable[[], object]], runs: int, warmup: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default="checkpoints/parity_seed0")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16-runs", type=int, default=2, help="timed half-precision runs (0 = skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args()
    from pcavs.device import resolve_device
    device = resolve_device(args.device)
    sync = ((lambda: torch.cuda.current_stream(torch.device(device)).synchronize()) if device.startswith("cuda")
            else (lambda: None))
    half = getattr(torch, args.half_dtype)

    net = ModulatedGenerator()
    path = Path(args.checkpoints) / "latest_net_G.pth"
    if path.is_file():
        load_network(net, path, IGNORABLE_PREFIXES["G"])
        weights = str(path)
    else:
        weights = "random init (no checkpoint found)"
    net.eval().requires_grad_(False).to(device)
    print(f"G weights: {weights}; device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")

    rows = []
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            style, start, noise = inputs(batch, net)
            style, start, noise = style.to(device), start.to(device), [n.to(device) for n in noise]
            cache = net.precompute_style(style[:, :ID_DIM])
            rest = style[:, ID_DIM:]
            fns = {
                "grouped fp32": lambda: configure(net, False, False)(style, start, noise),
                "shared fp32 nchw": lambda: configure(net, True, False)(style, start, noise),
                "shared fp32 nhwc": lambda: configure(net, True, True)(style, start, noise),
                "shared fp32 nhwc b1": lambda: configure(net, True, True, 1)(style, start, noise),
                "shared fp32 nhwc b1+id": lambda: configure(net, True, True, 1).forward_cached(cache, rest, start,
                                                                                              noise),
            }
            if batch == 1:  # chunking is a no-op
                del fns["shared fp32 nhwc b1"], fns["shared fp32 nhwc b1+id"]
                fns["shared fp32 nhwc+id"] = lambda: configure(net, True, True).forward_cached(cache, rest, start,
                                                                                            noise)
            ref = fns["grouped fp32"]()
            outs = {k: fn() for k, fn in fns.items()}
            times = round_robin(fns, args.runs, args.warmup, sync)
            for name in fns:
                rows.append((name, batch, times[name] / batch, times[name] / times["grouped fp32"],
                             float((outs[name] - ref).abs().max()), psnr(outs[name], ref)))
            mod_times = round_robin({
                "full": lambda: configure(net, True, True).modulations(style),
                "cached": lambda: net.modulations_from_cache(cache, rest)}, max(args.runs, 20), 3, sync)
            print(f"batch {batch}: modulation stage {mod_times['full']:.2f} ms full style, "
                  f"{mod_times['cached']:.2f} ms from the identity cache (per call)")
            if (batch == 1 or device != "cpu") and args.bf16_runs > 0:  # CPU half precision is slow
                configure(net, True, True, "auto")
                with torch.inference_mode(False):
                    net16 = ModulatedGenerator().eval().requires_grad_(False)
                    net16.load_state_dict(net.state_dict())
                    net16.to(device, half)
                fn16 = lambda: net16(style, start, noise)  # noqa: E731
                out16 = fn16().float()
                t16 = round_robin({"half": fn16}, args.bf16_runs, 0 if device == "cpu" else 1, sync)["half"]
                rows.append((f"shared {args.half_dtype[:4]} nhwc", batch, t16 / batch, t16 / times["grouped fp32"],
                             float((out16 - ref).abs().max()), psnr(out16, ref)))
                del net16

    print()
    print(f"{'variant':<22} | {'batch':>5} | {'ms/frame':>9} | {'vs grouped':>10} | {'upstream':>8} | "
          f"{'max|Δ| vs grouped':>17} | {'PSNR dB':>7}")
    print("-" * 98)
    for name, batch, ms, ratio, diff, p in rows:
        up = f"{UPSTREAM_MS[batch] / ms:7.2f}x" if batch in UPSTREAM_MS else f"{'-':>8}"
        ps = "inf" if math.isinf(p) else f"{p:.1f}"
        print(f"{name:<22} | {batch:>5} | {ms:9.1f} | {ratio:10.3f} | {up} | {diff:17.2e} | {ps:>7}")
    print("\n(vs grouped: time ratio to the upstream formulation in this run, < 1 is faster; upstream: "
          "README's upstream ms/frame divided by ours, > 1 is faster; bf16 = median of --bf16-runs)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
