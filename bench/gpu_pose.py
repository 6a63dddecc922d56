"""Device-check stage: what a live pose frame costs, on the pose worker's own low-priority stream.

Rows: the pose encoder (FAN-based, ours) at batch 1 and batched (several sessions' frames together,
`pcavs.engine.encode_poses`); face_alignment's landmark network 2D-FAN-4 on its 256² crop and its SFD
face detector at 320×240 (the live box resolution) and 640×480, when face_alignment is importable (random
weights: no files are fetched). Derived: a tracked pose frame (FAN + pose encoder: SFD runs only when the
track is lost, `pcavs.alignment.tracking`), a frame that detects (+ SFD at 320), and the GPU time per
session-second at the capped pose rate.

    python bench/gpu_pose.py [--device cuda] [--rate-hz 12.5]
    python bench/gpu_pose.py --smoke       # CPU, 1-2 runs per row, small SFD input
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage import (Report, peak_memory_mb, print_table, resolve, stage_args, stream_sync,  # noqa: E402
                         summary, wall_ms)


def main(argv: list[str] | None = None) -> int:
    ap = stage_args(__doc__)
    ap.add_argument("--rate-hz", type=float, default=12.5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="pose frames of several sessions encoded together")
    args = ap.parse_args(argv)
    device, _ = resolve(args)
    runs = 1 if args.smoke else args.runs
    batch = 2 if args.smoke else args.batch
    report = Report("pose", args.json, args.deadline_s)
    report.set("device", device)
    peak_memory_mb(device, reset=True)

    from pcavs.gpu import WorkerStream
    from pcavs.networks.pose_encoder import PoseEncoder

    stream = WorkerStream(device)
    sync = stream_sync(device)
    ms: dict[str, float] = {}

    def measure(name: str, fn, frames: int = 1) -> None:
        if report.out_of_time(3.0):
            return
        with stream.scope(), torch.inference_mode():
            samples = wall_ms(fn, runs, warmup=0 if args.smoke else 1, sync=sync, deadline=report.deadline - 2.0)
        stats = summary(samples)
        ms[name] = stats["median_ms"] / frames
        report.row("pose", {"step": name, "frames": frames, **stats, "ms_per_frame": round(ms[name], 3)})

    enc = PoseEncoder().to(device).eval().requires_grad_(False)
    for b in (1,) if args.smoke else (1, batch):
        x = torch.rand(b, 3, 224, 224, device=device) * 2 - 1
        measure(f"pose encoder b{b}", lambda x=x: enc.pose_code(x), b)
    try:
        from face_alignment.detection.sfd.net_s3fd import s3fd
        from face_alignment.models.fan import FAN
    except ImportError as exc:
        report.set("face_alignment", f"not importable ({exc}); carry its wheel to time FAN and SFD")
    else:
        fan = FAN(1 if args.smoke else 4).to(device).eval().requires_grad_(False)  # 2D-FAN-4: 4 hourglasses
        side = 64 if args.smoke else 256
        crop = torch.rand(1, 3, side, side, device=device)
        measure(f"FAN landmarks ({side}² crop)", lambda: fan(crop))
        sfd = s3fd().to(device).eval().requires_grad_(False)
        for w, h in ((64, 48),) if args.smoke else ((320, 240), (640, 480)):
            img = torch.rand(1, 3, h, w, device=device) * 255 - 120
            measure(f"SFD detector {w}x{h}", lambda img=img: sfd(img))
    fan_key = next((k for k in ms if k.startswith("FAN")), None)
    if fan_key is not None and "pose encoder b1" in ms:
        tracked = ms[fan_key] + ms["pose encoder b1"]
        sfd_key = next((k for k in ms if k.startswith("SFD")), None)
        report.set("derived", {
            "tracked_frame_ms": round(tracked, 2),
            "detect_frame_ms": None if sfd_key is None else round(tracked + ms[sfd_key], 2),
            "gpu_ms_per_session_second": round(tracked * args.rate_hz, 1),
            "rate_hz": args.rate_hz})
    report.set("peak_mb", peak_memory_mb(device))
    print_table(f"pose — {device}, float32, worker stream", report.data["rows"].get("pose", []),
                ["step", "frames", "median_ms", "p95_ms", "ms_per_frame"])
    if "derived" in report.data:
        print(f"derived: {report.data['derived']}")
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
