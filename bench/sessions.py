"""Many live sessions on one device, the studio's way: N sessions, one SharedRenderer.

Each synthetic session is a real session (pcavs_live/pipeline/builders.py): a real-time looped speech source, its
own AudioTimeline, its own Avatar on the shared networks, a SessionHandle of one `SharedRenderer`
(`pcavs.engine.render_sessions`: every ready frame across sessions in one pass) and a null sink, driven
by the same Scheduler as the CLI and the studio. For N = 1, 2, 4, 8, 16 (and up to 256 on CUDA) it runs
`--seconds` of wall time and prints: aggregate generated frames/s, per-session generated fps (median),
p50/p95 capture→frame latency over every generated frame, the mean rows per generator pass, the
median/p95 time a request waits for its batch (what batching adds), and peak memory (CUDA: peak
allocated in that run; CPU: the process's peak RSS so far).

Usage: python bench/sessions.py [--checkpoints DIR] [--device cuda --dtype float16] [--sessions 1,2,4,8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_network_args, load_for_bench  # noqa: E402
from capture.audio_files import load_audio_16k  # noqa: E402
from capture.audio_sources import FileAudioSource  # noqa: E402
from capture.looped_audio import LoopedAudioSource  # noqa: E402
from pcavs.engine import Avatar, EngineOptions, render_sessions  # noqa: E402
from pcavs.mel import StreamingGain, StreamingMel  # noqa: E402
from pcavs.runtime import RenderRuntime  # noqa: E402
from pcavs_live.pipeline.builders import make_scheduler  # noqa: E402
from pcavs_live.pipeline.metrics import FrameRecord, LiveMetrics  # noqa: E402
from pcavs_live.pipeline.scheduler import SchedulerOptions  # noqa: E402
from pcavs_live.pipeline.shared_renderer import RendererClosed, SharedRenderer  # noqa: E402
from pcavs_live.pipeline.timeline import AudioTimeline  # noqa: E402

SPEECH = Path(__file__).resolve().parent.parent / "assets" / "sample" / "speech.wav"


class RecordingMetrics(LiveMetrics):
    """LiveMetrics that also keeps every generated frame's latency (for percentiles over the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []
        self.generated = 0

    def record(self, rec: FrameRecord) -> None:
        super().record(rec)
        if rec.generated:
            self.generated += 1
            if rec.latency_ms is not None:
                self.latencies.append(rec.latency_ms)


class NullSink:
    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None: ...
    def write(self, frame, audio, frame_index: int) -> None: ...
    def close(self) -> None: ...


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_until_closed(scheduler, stop: threading.Event) -> None:
    try:
        scheduler.run(stop)
    except RendererClosed:
        pass


def run_sessions(n: int, avatars: list[Avatar], speech: np.ndarray, seconds: float, device: str) -> dict:
    renderer = SharedRenderer(render_sessions).start()
    stop = threading.Event()
    metrics, threads = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(n):
        # Staggered starts: real sessions do not begin on the same 40 ms boundary.
        offset = (i * 160) % len(speech)
        samples = np.roll(speech, -offset)
        source = LoopedAudioSource(lambda s=samples: FileAudioSource.from_samples(s, realtime=True))
        m = RecordingMetrics()
        sched = make_scheduler(source, AudioTimeline(StreamingMel(StreamingGain())),
                               renderer.handle(avatars[i % len(avatars)]), NullSink(),
                               np.zeros((224, 224, 3), np.uint8), None, m, SchedulerOptions())
        th = threading.Thread(target=_run_until_closed, args=(sched, stop), daemon=True)
        metrics.append(m)
        threads.append(th)
    t0 = time.monotonic()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    elapsed = time.monotonic() - t0
    renderer.stop()                 # a session waiting for its batch ends with RendererClosed
    for th in threads:
        th.join(30)
    lat = sorted(x for m in metrics for x in m.latencies)
    stats = renderer.stats()
    total = sum(m.generated for m in metrics)
    return {
        "n": n, "agg_fps": total / elapsed,
        "session_fps": statistics.median(m.generated / elapsed for m in metrics),
        "p50": lat[len(lat) // 2] if lat else float("nan"),
        "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
        "rows": stats["rows_rendered"] / max(1, stats["batches"]),
        "wait50": stats["batch_wait_ms_median"], "wait95": stats["batch_wait_ms_p95"],
        "mem": peak_memory_mb(device),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_args(ap)
    ap.add_argument("--sessions", default=None, help="comma-separated N (default 1,2,4,8,16; +32..256 on CUDA)")
    ap.add_argument("--seconds", type=float, default=10.0, help="wall time per N")
    ap.add_argument("--identities", type=int, default=4, help="distinct photos (sessions cycle through them)")
    args = ap.parse_args()
    nets, device, dtype = load_for_bench(args)
    default = "1,2,4,8,16,32,64,128,256" if device.startswith("cuda") else "1,2,4,8,16"
    counts = [int(x) for x in (args.sessions or default).split(",")]
    rng = np.random.default_rng(0)
    runtime = RenderRuntime(nets)
    avatars = [Avatar(runtime, torch.from_numpy(rng.uniform(-1, 1, (3, 224, 224)).astype(np.float32)),
                      EngineOptions(device=device, dtype=dtype, noise_seed=i))
               for i in range(min(args.identities, max(counts)))]
    speech = load_audio_16k(SPEECH)

    print(f"\nsessions bench — device {device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"{args.seconds:g} s per N, real-time speech per session, one SharedRenderer")
    header = (f"{'N':>4} | {'agg frames/s':>12} | {'fps/session':>11} | {'p50 lat ms':>10} | {'p95 lat ms':>10} | "
              f"{'rows/pass':>9} | {'wait p50 ms':>11} | {'wait p95 ms':>11} | {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for n in counts:
        r = run_sessions(n, avatars, speech, args.seconds, device)
        print(f"{r['n']:>4} | {r['agg_fps']:>12.2f} | {r['session_fps']:>11.2f} | {r['p50']:>10.0f} | "
              f"{r['p95']:>10.0f} | {r['rows']:>9.2f} | {r['wait50'] or 0:>11.1f} | {r['wait95'] or 0:>11.1f} | "
              f"{r['mem']:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
