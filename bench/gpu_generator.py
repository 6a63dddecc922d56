"""Device-check stage: frames/s of the render path against batch size, eager, CUDA-graphed, and graphed
with ticks overlapped (`submit` of tick t+1 before tick t's `result()`); and the generator with and
without its fused pointwise tail.

Table "batches": one avatar's rows through `RenderRuntime.render` (upload, identity gathers, audio
encoder, generator, uint8 conversion, download: what a live tick costs), for batch sizes 1, 8, 32, 128,
256, with the generator's default tail (fused on CUDA when triton imports: `fused_tail` in the results).
Per row: median and p95 wall ms per call, frames/s, the host ms a tick's `submit` takes (pack, one
upload, launches or replays: the host's share of a tick), the generator stage's ms (GPU time from CUDA
events; CPU: wall), graph capture seconds, peak memory.

Table "fused": the generator alone (`forward_cached`, replayed from a CUDA graph as the runtime does),
fused tail off vs on (`ModulatedGenerator.fused_tail`, pcavs/kernels/styled_tail.py), bf16 and fp16, at
batch 1 and a large bucket: GPU ms per pass from CUDA events, frames/s, the speed-up, and the largest
difference between the two outputs (a sanity check: float rounding only). Off CUDA its rows say
"needs CUDA". Random weights (speed does not depend on their values).

    python bench/gpu_generator.py [--device cuda] [--dtype auto] [--batches 1,8,32,128,256] [--fused-batches 1,128]
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
    ap.add_argument("--fused-batches", default="1,128", help="batch sizes of the fused-tail comparison")
    args = ap.parse_args(argv)
    fused_batches = [1, 2] if args.smoke else [int(b) for b in args.fused_batches.split(",")]
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    runs = 3 if args.smoke else args.runs
    device, dtype, report, nets = start_generator_stage("generator", args)

    from pcavs.engine import Avatar, EngineOptions, StageTimes
    from pcavs.runtime import RenderRuntime, RowBatch

    runtime = RenderRuntime(nets)
    photo = torch.rand(3, 224, 224) * 2 - 1
    avatar = Avatar(runtime, photo, EngineOptions(device=device, dtype=dtype))
    report.set("fused_tail", _fused_in_use(nets.generator, device, dtype))
    rng = np.random.default_rng(0)
    modes = ["eager", "graphs", "overlap"] if device.startswith("cuda") else ["eager", "overlap"]
    for mode in modes:
        runtime.configure(graphs=mode != "eager")
        for b in batches:
            if report.out_of_time(FUSED_RESERVE_S if device.startswith("cuda") else 5.0):
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
    print_table(f"generator — {device} {report.data['dtype']} (one avatar's rows through the render path, "
                f"fused tail {'on' if report.data['fused_tail'] else 'off'})",
                report.data["rows"].get("batches", []),
                ["mode", "batch", "median_ms", "p95_ms", "ms_per_frame", "frames_per_s", "host_ms", "generator_ms",
                 "warm_up_s", "peak_mb"])
    del avatar, runtime, nets
    fused_rows(report, device, fused_batches, size=28 if args.smoke else 224, runs=max(runs, 10))
    print_table(f"fused tail — {device} (generator alone, CUDA-graphed; GPU ms per pass)",
                report.data["rows"].get("fused", []), FUSED_COLUMNS)
    report.finish()
    return 0


FUSED_RESERVE_S = 30.0  # the render-path rows stop this long before the deadline: the fused rows' time
FUSED_DTYPES = (torch.bfloat16, torch.float16)
FUSED_COLUMNS = ["dtype", "batch", "unfused_ms", "fused_ms", "unfused_fps", "fused_fps", "speedup",
                 "max_abs_diff", "warm_up_s", "note"]


def _fused_in_use(generator, device: str, dtype: torch.dtype) -> bool:
    """Whether the generator's passes run the fused tail here (default switch: CUDA and triton)."""
    return bool(generator.uses_fused_tail(torch.empty(1, 512, 7, 7, device=device, dtype=dtype)))


def _graphed_pass_ms(gen, inputs: tuple, device: str, runs: int) -> tuple[float, torch.Tensor, float]:
    """(GPU ms per replayed pass, the pass's output, warm-up + capture seconds) of `gen.forward_cached`
    captured as one CUDA graph after two eager passes on a side stream (where Triton compiles)."""
    dev = torch.device(device)
    t0 = time.monotonic()
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):
            gen.forward_cached(*inputs)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gen.forward_cached(*inputs)
    graph.replay()
    torch.cuda.synchronize(dev)
    warm_s = time.monotonic() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / runs
    result = out.clone()
    del graph, out
    return ms, result, warm_s


def fused_rows(report, device: str, batches: list[int], size: int, runs: int) -> None:
    """Table "fused" (see the module doc)."""
    if not device.startswith("cuda"):
        for dtype in FUSED_DTYPES:
            for b in batches:
                report.row("fused", {"dtype": str(dtype).removeprefix("torch."), "batch": b, "note": "needs CUDA"})
        return
    from bench.stage import init_generator_weights
    from pcavs.networks.generator import ModulatedGenerator

    for dtype in FUSED_DTYPES:
        torch.manual_seed(0)
        gen = ModulatedGenerator(size=size)
        init_generator_weights(gen, 0)
        gen = gen.to(device=device, dtype=dtype).eval().requires_grad_(False)
        name = str(dtype).removeprefix("torch.")
        for b in batches:
            row: dict = {"dtype": name, "batch": b}
            if report.out_of_time(8.0):
                break
            g = torch.Generator(device=device).manual_seed(b)
            with torch.inference_mode():
                cache = gen.precompute_style(torch.randn(b, 2048, device=device, generator=g))
                inputs = (cache, torch.randn(b, 512, device=device, generator=g) * 0.1,
                          torch.randn(b, 512, 7, 7, device=device, generator=g),
                          [torch.randn(b, *s[1:], device=device, generator=g) for s in gen.noise_shapes()])
                try:
                    gen.fused_tail = False
                    unfused_ms, unfused, _ = _graphed_pass_ms(gen, inputs, device, runs)
                    gen.fused_tail = True
                    if not gen.uses_fused_tail(inputs[2]):
                        row["note"] = "triton missing: no fused kernel"
                    else:
                        fused_ms, fused, warm_s = _graphed_pass_ms(gen, inputs, device, runs)
                        row.update(fused_ms=round(fused_ms, 3), fused_fps=round(1000.0 * b / fused_ms, 1),
                                   speedup=round(unfused_ms / fused_ms, 2), warm_up_s=round(warm_s, 2),
                                   max_abs_diff=float((fused.float() - unfused.float()).abs().max()))
                    row.update(unfused_ms=round(unfused_ms, 3), unfused_fps=round(1000.0 * b / unfused_ms, 1))
                except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
                    row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                finally:
                    gen.fused_tail = "auto"
            report.row("fused", row)
            torch.cuda.empty_cache()
        del gen


if __name__ == "__main__":
    raise SystemExit(main())
