"""Device-check stage: frames/s of the render path against batch size, eager, CUDA-graphed, and graphed
with ticks overlapped (`submit` of tick t+1 before tick t's `result()`).

One avatar's rows through `RenderRuntime.render` (upload, identity gathers, audio encoder, generator,
uint8 conversion, download: what a live tick costs), for batch sizes 1, 8, 32, 128, 256. Per row: median
and p95 wall ms per call, frames/s, the host ms a tick's `submit` takes (pack, one upload, launches or
replays: the host's share of a tick), the generator stage's ms (GPU time from CUDA events; CPU: wall),
graph capture seconds, peak memory. Random weights (speed does not depend on their values).

    python bench/gpu_generator.py [--device cuda] [--dtype auto] [--batches 1,8,32,128,256]
    python bench/gpu_generator.py --smoke          # CPU, 28² generator, batches 1,2 (tests the stage)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage import (peak_memory_mb, print_table, stage_args, start_generator_stage, summary,  # noqa: E402
                         wall_ms)


def main(argv: list[str] | None = None) -> int:
    ap = stage_args(__doc__)
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    runs = 3 if args.smoke else args.runs
    device, dtype, report, nets = start_generator_stage("generator", args)

    from pcavs.engine import Avatar, EngineOptions, StageTimes
    from pcavs.runtime import RenderRuntime, RowBatch

    runtime = RenderRuntime(nets)
    photo = torch.rand(3, 224, 224) * 2 - 1
    avatar = Avatar(runtime, photo, EngineOptions(device=device, dtype=dtype))
    rng = np.random.default_rng(0)
    modes = ["eager", "graphs", "overlap"] if device.startswith("cuda") else ["eager", "overlap"]
    for mode in modes:
        runtime.configure(graphs=mode != "eager")
        for b in batches:
            if report.out_of_time(5.0):
                break
            rows = RowBatch(np.full(b, avatar.slot, np.int64), rng.uniform(0, 1, (b, 1, 80, 20)).astype(np.float32),
                            rng.normal(0, 0.05, (b, 12)).astype(np.float32), np.full(b, 1.2, np.float32),
                            np.zeros(b, bool))
            peak_memory_mb(device, reset=True)
            t0 = time.monotonic()
            runtime.warm_up([b])
            warm_s = time.monotonic() - t0
            times = StageTimes()
            host: list[float] = []
            queued: list = []

            def tick() -> None:
                t1 = time.perf_counter()
                pending = runtime.submit(rows)
                host.append((time.perf_counter() - t1) * 1e3)
                if mode == "overlap":  # tick t's frames are read after tick t+1 is queued
                    queued.append(pending)
                    if len(queued) > 1:
                        times.add(queued.pop(0).result().stage_ms)
                else:
                    times.add(pending.result().stage_ms)

            samples = wall_ms(tick, runs, warmup=1, deadline=report.deadline - 2.0)
            for pending in queued:
                times.add(pending.result().stage_ms)
            n = len(samples) + 1
            stats = summary(samples)
            report.row("batches", {
                "mode": mode, "batch": b, **stats, "frames_per_s": round(1000.0 * b / stats["median_ms"], 1),
                "ms_per_frame": round(stats["median_ms"] / b, 3), "host_ms": round(float(np.median(host)), 3),
                "generator_ms": round(times.generator_ms / n, 3), "audio_ms": round(times.audio_ms / n, 3),
                "warm_up_s": round(warm_s, 2), "peak_mb": peak_memory_mb(device)})
    report.set("graph_failures", runtime.stats.graph_failures)
    report.set("captured_buckets", runtime.stats.captured_buckets)
    print_table(f"generator — {device} {report.data['dtype']} (one avatar's rows through the render path)",
                report.data["rows"].get("batches", []),
                ["mode", "batch", "median_ms", "p95_ms", "ms_per_frame", "frames_per_s", "host_ms", "generator_ms",
                 "warm_up_s", "peak_mb"])
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
