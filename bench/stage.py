"""What the device-check stages share: a result file written after every row, a deadline, timing, and
random-weight networks of the real architectures (speed does not depend on the weights' values, and
the device machine has no checkpoints).

A stage is a script `bench/gpu_*.py` with `--json PATH --deadline-s S [--smoke] [--device D]`; it writes
PATH after every measured row (so a stage killed at its time limit still leaves what it measured), prints
a table, and exits 0. `bench/device_check.py` runs the stages and merges their files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stage_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write results here (rewritten after every row)")
    ap.add_argument("--deadline-s", type=float, default=600.0, help="stop starting new rows after this long")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: tiny generator, few rows (tests the stage)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="generator dtype: auto (bf16 on sm_80+ CUDA), float32, ...")
    return ap


def resolve(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    from pcavs.device import resolve_device_and_dtype

    if args.smoke and args.device == "auto":
        args.device = "cpu"
    return resolve_device_and_dtype(args.device, args.dtype)


class Report:
    """One stage's results: `data` is written as JSON to `path` on every change."""

    def __init__(self, name: str, path: Path | None, deadline_s: float) -> None:
        self.name, self.path = name, path
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.data: dict[str, Any] = {"stage": name, "status": "running", "rows": {}}
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, need_s: float = 0.0) -> bool:
        if self.time_left() > need_s:
            return False
        self.data["truncated"] = True
        self.save()
        return True

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def row(self, table: str, row: dict[str, Any]) -> None:
        self.data["rows"].setdefault(table, []).append(row)
        self.save()

    def finish(self, status: str = "ok") -> None:
        self.data["status"] = status
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def wall_ms(fn: Callable[[], object], runs: int, warmup: int = 1, sync: Callable[[], None] = lambda: None,
            deadline: float | None = None) -> list[float]:
    """Wall time of each run in ms; `sync` waits for the device work `fn` queued (a stream, never the
    whole device, unless that is what is measured)."""
    for _ in range(warmup):
        fn()
        sync()
    out = []
    for _ in range(runs):
        if deadline is not None and out and time.monotonic() > deadline:
            break
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples), 3), "p95_ms": round(percentile(samples, 95), 3),
            "runs": len(samples)}


def peak_memory_mb(device: str, reset: bool = False) -> float | None:
    if not device.startswith("cuda"):
        return None
    mb = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    return round(mb, 1)


def init_generator_weights(net: torch.nn.Module, seed: int) -> None:
    """Values drawn like shared/parity/make_weights.py (activations O(1), tanh unsaturated)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("style.", "input.")):
                continue
            if name.endswith("modulation.bias"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("noise.weight"):
                p.copy_(0.02 + 0.08 * torch.rand(p.shape, generator=g))
            elif name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.25 if name.startswith("to_rgb") else 1.0))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))


def random_networks(device: str, dtype: torch.dtype, size: int = 224, seed: int = 0):
    """PcavsNetworks of the real architectures with random weights (generator at `size`²)."""
    from pcavs.checkpoints import PcavsNetworks
    from pcavs.networks.audio_encoder import AudioEncoder
    from pcavs.networks.generator import ModulatedGenerator
    from pcavs.networks.identity_encoder import IdentityEncoder
    from pcavs.networks.pose_encoder import PoseEncoder

    torch.manual_seed(seed)
    gen = ModulatedGenerator(size=size)
    init_generator_weights(gen, seed)
    parts = [IdentityEncoder(), PoseEncoder(), AudioEncoder(), gen]
    for i, net in enumerate(parts):
        net.to(device=device, dtype=dtype if i == 3 else torch.float32).eval().requires_grad_(False)
    return PcavsNetworks(*parts)


def stream_sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return lambda: torch.cuda.current_stream(torch.device(device)).synchronize()
    return lambda: None


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str], echo: bool = True) -> str:
    """A plain-text table of `columns` (missing values '-'); returned, and printed when `echo`."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    grid = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(g[i]) for g in grid)) if grid else len(c) for i, c in enumerate(columns)]
    lines = [title, " | ".join(c.rjust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.rjust(w) for v, w in zip(g, widths)) for g in grid]
    text = "\n".join(lines)
    if echo:
        print(text, flush=True)
    return text


def start_generator_stage(name: str, args: argparse.Namespace) -> tuple[str, torch.dtype, "Report", object]:
    """What every generator stage starts with: the device and dtype, its Report (both recorded), cuDNN
    set as a live session sets it (autotuned during the warm-up), and random networks (a 28-pixel
    generator with --smoke)."""
    from pcavs.device import configure_cudnn

    device, dtype = resolve(args)
    report = Report(name, args.json, args.deadline_s)
    report.set("device", device)
    report.set("dtype", str(dtype).removeprefix("torch."))
    configure_cudnn(device)
    return device, dtype, report, random_networks(device, dtype, size=28 if args.smoke else 224)
