"""Device-check stage: many sessions on one device through `render_sessions`.

N sessions (each its own identity, noise, mel window and pose code) due on every tick, rendered by one
`pcavs.engine.render_sessions` call (one audio pass, one generator pass; CUDA graphs on a GPU, batches
padded to their bucket), ticks back to back. Per N: median and p95 tick latency (the latency batching
adds to every session's frame), aggregate frames/s, and whether N sessions fit 25 fps (p95 tick ≤ 40 ms).
Random weights. (bench/sessions.py measures the studio's SharedRenderer end to end; this is the engine.)

    python bench/gpu_sessions.py [--device cuda] [--sessions 1,16,64,100,128,256]
    python bench/gpu_sessions.py --smoke           # CPU, 28² generator, 1-2 sessions
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
from pcavs.constants import FPS  # noqa: E402

TICK_BUDGET_MS = 1000.0 / FPS


def main(argv: list[str] | None = None) -> int:
    ap = stage_args(__doc__)
    ap.add_argument("--sessions", default="1,16,64,100,128,256")
    ap.add_argument("--ticks", type=int, default=30)
    args = ap.parse_args(argv)
    counts = [1, 2] if args.smoke else [int(n) for n in args.sessions.split(",")]
    ticks = 3 if args.smoke else args.ticks
    device, dtype, report, nets = start_generator_stage("sessions", args)

    from pcavs.engine import Avatar, EngineOptions, SessionRequest, StageTimes, render_sessions, warm_up
    from pcavs.runtime import RenderRuntime

    runtime = RenderRuntime(nets)

    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    avatars = []
    for i in range(max(counts)):
        if report.out_of_time(20.0):
            break
        photo = torch.from_numpy(rng.uniform(-1, 1, (3, 224, 224)).astype(np.float32))
        avatars.append(Avatar(runtime, photo, EngineOptions(device=device, dtype=dtype, noise_seed=i,
                                                         noise="random" if i % 4 == 3 else "fixed")))
    report.set("identities", len(avatars))
    report.set("identity_setup_s", round(time.monotonic() - t0, 2))
    counts = [n for n in counts if n <= len(avatars)]
    t0 = time.monotonic()
    report.set("warm_up_buckets", warm_up(runtime, counts))
    report.set("warm_up_s", round(time.monotonic() - t0, 2))
    for n in counts:
        if report.out_of_time(5.0):
            break
        peak_memory_mb(device, reset=True)
        times = StageTimes()
        # Inputs drawn up front: a tick times building the requests and render_sessions, not the RNG.
        mels = rng.uniform(0, 1, (4, n, 1, 80, 20)).astype(np.float32)
        poses = rng.normal(0, 0.05, (4, n, 12)).astype(np.float32)
        turn = [0]

        def tick() -> None:
            j = turn[0] % 4
            turn[0] += 1
            reqs = [SessionRequest(a, mels[j, i], None if i % 3 == 2 else poses[j, i])
                    for i, a in enumerate(avatars[:n])]
            render_sessions(reqs, times)

        samples = wall_ms(tick, ticks, warmup=1, deadline=report.deadline - 2.0)
        stats = summary(samples)
        k = len(samples) + 1
        report.row("sessions", {
            "sessions": n, "tick_median_ms": stats["median_ms"], "tick_p95_ms": stats["p95_ms"], "ticks": stats["runs"],
            "aggregate_fps": round(1000.0 * n / stats["median_ms"], 1),
            "fits_25fps": stats["p95_ms"] <= TICK_BUDGET_MS,
            "generator_ms": round(times.generator_ms / k, 2), "audio_ms": round(times.audio_ms / k, 2),
            "convert_ms": round(times.convert_ms / k, 2), "peak_mb": peak_memory_mb(device)})
    report.set("graph_failures", runtime.stats.graph_failures)
    print_table(f"sessions — {device} {report.data['dtype']} (one render_sessions call per tick, ticks back to back)",
                report.data["rows"].get("sessions", []),
                ["sessions", "tick_median_ms", "tick_p95_ms", "aggregate_fps", "fits_25fps", "generator_ms",
                 "audio_ms", "convert_ms", "peak_mb"])
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
