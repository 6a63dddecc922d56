"""Device-check stage: what a live pose frame costs, on the pose worker's own low-priority stream, and
what it costs per session beside the generator when many sessions share a process (issue 20, item 9).

Table `pose`: the pose encoder (ours) at batch 1 and batched (`pcavs.engine.encode_poses`);
face_alignment's landmark network 2D-FAN-4 on its 256² crop and its SFD face detector at 320×240 (the
live box resolution) and 640×480, when face_alignment is importable (random weights: no files are
fetched). Derived: a tracked pose frame (FAN + pose encoder: SFD runs only when the track is lost,
`pcavs.alignment.tracking`), a frame that detects (+ SFD at 320), and the time per session-second at the
capped pose rate.

Table `scale`: N sessions' tracked pose frames (N = 1, 4, 16, and 64 on CUDA), one session after the
other ("one-by-one", as before the studio batched them) and in one FAN forward + one pose-encoder pass
("batched", `pcavs.alignment.fan_batch.FanBatcher` and `PoseBatcher`), each FAN step as the detector
runs it (crops uploaded, heatmaps downloaded). Beside it the generator's cost per session at the same N
(N rows through `RenderRuntime.render`, CUDA-graphed on a GPU) and the ratio per session-second:
(pose ms per frame · pose rate) / (generator ms per frame · 25 fps); the goal is ≤ 0.25. On CUDA the
rows "batched bf16" run FAN and the pose encoder in bfloat16, for speed only: see `pose_precision`.

`pose_precision` (with the parity oracle, not with --smoke): the pose code of the oracle's three pose
frames in bfloat16 (autocast) against float32 and against the oracle. Measured on the CPU (seed 0):
max |Δ| 9.6e-3 against codes up to 1.64 whose frame-to-frame differences are 7.8e-2 (an eighth of a
pose step), 20.5× the encoder bound (`bench.gpu_parity.ENC_ATOL`/`ENC_RTOL`; float32: 8.9e-7 from the
oracle): the studio keeps the pose encoder in float32.
FAN has no stand-in parity (random weights), so it stays float32 too until real weights are measured.

    python bench/gpu_pose.py [--device cuda] [--rate-hz 12.5] [--sessions 1,4,16,64]
    python bench/gpu_pose.py --smoke       # CPU, 1 run per row, FAN of one hourglass on 64² crops, N = 2

The scale rows take at most 5 runs each (64 sessions one by one is ~64 FAN forwards a run).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage import (Report, peak_memory_mb, print_table, random_networks, resolve, stage_args,  # noqa: E402
                         stream_sync, summary, wall_ms)

OUTPUT_FPS = 25.0
TARGET_SHARE = 0.25


def main(argv: list[str] | None = None) -> int:
    ap = stage_args(__doc__)
    ap.add_argument("--rate-hz", type=float, default=12.5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="pose frames of several sessions encoded together")
    ap.add_argument("--sessions", default=None, help="N for the scale table (default 1,4,16; 1,4,16,64 on CUDA)")
    ap.add_argument("--shared", default=None, help="the shared/ folder holding parity/ (pose_precision)")
    args = ap.parse_args(argv)
    device, gen_dtype = resolve(args)
    cuda = device.startswith("cuda")
    runs = 1 if args.smoke else args.runs
    batch = 2 if args.smoke else args.batch
    report = Report("pose", args.json, args.deadline_s)
    report.set("device", device)
    report.set("dtype", "float32")
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
        FAN = None
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
    if FAN is not None:
        sessions = ([2] if args.smoke else [1, 4, 16, 64] if cuda else [1, 4, 16]) if args.sessions is None \
            else [int(n) for n in args.sessions.split(",")]
        scale(args, report, device, gen_dtype, fan, side, sessions, max(1, min(runs, 5)), stream, sync,
              b1_ms=(ms.get(fan_key or "", 0.0), ms.get("pose encoder b1", 0.0)))
    if not args.smoke:
        pose_precision(args, report, device)
    report.set("peak_mb", peak_memory_mb(device))
    print_table(f"pose — {device}, float32, worker stream", report.data["rows"].get("pose", []),
                ["step", "frames", "median_ms", "p95_ms", "ms_per_frame"])
    if "derived" in report.data:
        print(f"derived: {report.data['derived']}")
    if report.data["rows"].get("scale"):
        print_table(f"pose at scale — {device}: per session, pose at {args.rate_hz:g} Hz beside the generator at "
                    f"{OUTPUT_FPS:g} fps (goal pose_share ≤ {TARGET_SHARE})", report.data["rows"]["scale"],
                    SCALE_COLUMNS)
    if "pose_precision" in report.data:
        print(f"pose_precision: {report.data['pose_precision']}")
    report.finish()
    return 0


SCALE_COLUMNS = ["sessions", "mode", "fan_ms", "encoder_ms", "pose_ms_per_session", "generator_ms_per_session",
                 "pose_share", "ok"]


def scale(args, report: Report, device: str, gen_dtype: torch.dtype, fan: torch.nn.Module, side: int,
          sessions: list[int], runs: int, stream, sync, b1_ms: tuple[float, float] = (0.0, 0.0)) -> None:
    """The `scale` table (see the module doc). `b1_ms`: FAN's and the pose encoder's batch-1 ms, to
    skip a row that would not finish before the deadline (a busy CPU)."""
    from pcavs.engine import Avatar, EngineOptions, encode_poses
    from pcavs.runtime import RenderRuntime, RowBatch

    cuda = device.startswith("cuda")
    nets = random_networks(device, gen_dtype, size=28 if args.smoke else 224)
    runtime = RenderRuntime(nets)
    if cuda:
        runtime.configure(graphs=True)
    avatar = Avatar(runtime, torch.rand(3, 224, 224) * 2 - 1, EngineOptions(device=device, dtype=gen_dtype))
    fans = {"float32": fan}
    if cuda:
        fans["bfloat16"] = FanCopy(fan, torch.bfloat16)
    rng = np.random.default_rng(0)
    warm = 0 if args.smoke else 1

    def timed(fn, scope, estimate_ms: float = 0.0) -> float | None:
        if report.out_of_time(3.0 + 2.0 * (runs + warm) * estimate_ms / 1000):
            return None
        with scope(), torch.inference_mode():
            return summary(wall_ms(fn, runs, warmup=warm, sync=sync, deadline=report.deadline - 2.0))["median_ms"]

    for n in sessions:
        if report.out_of_time(5.0):
            break
        rows = RowBatch(np.full(n, avatar.slot, np.int64), rng.uniform(0, 1, (n, 1, 80, 20)).astype(np.float32),
                        rng.normal(0, 0.05, (n, 12)).astype(np.float32), np.full(n, 1.2, np.float32),
                        np.zeros(n, bool))
        runtime.warm_up([n])
        gen_ms = timed(lambda: runtime.render(rows), contextlib.nullcontext)
        if gen_ms is None:
            break
        gen_per_session = gen_ms / n
        crops = rng.random((n, 3, side, side), dtype=np.float32)
        poses = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
        modes = [("one-by-one", "float32", False), ("batched", "float32", True)]
        if cuda:
            modes.append(("batched bf16", "bfloat16", True))
        for mode, dtype_name, batched in modes:
            net = fans[dtype_name]
            autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype_name == "bfloat16" \
                else contextlib.nullcontext
            groups = [slice(0, n)] if batched else [slice(i, i + 1) for i in range(n)]

            def fan_step() -> None:
                for g in groups:
                    heatmaps(net, crops[g], device)

            def encoder_step() -> None:
                with autocast():
                    for g in groups:
                        encode_poses(nets, poses[g])
            fan_ms = timed(fan_step, stream.scope, n * b1_ms[0])
            enc_ms = timed(encoder_step, stream.scope, n * b1_ms[1])
            if fan_ms is None or enc_ms is None:
                break
            pose_per_session = (fan_ms + enc_ms) / n
            share = pose_per_session * args.rate_hz / (gen_per_session * OUTPUT_FPS)
            report.row("scale", {"sessions": n, "mode": mode, "fan_ms": round(fan_ms, 2), "encoder_ms": round(enc_ms, 2),
                                 "pose_ms_per_session": round(pose_per_session, 3),
                                 "generator_ms_per_session": round(gen_per_session, 3),
                                 "pose_share": round(share, 3), "ok": share <= TARGET_SHARE})
    report.set("scale_notes", {"rate_hz": args.rate_hz, "output_fps": OUTPUT_FPS,
                               "generator_dtype": str(gen_dtype).removeprefix("torch."),
                               "fan": f"{'1 hourglass, 64² crops (smoke)' if args.smoke else '2D-FAN-4, 256² crops'}",
                               "generator_graphs": cuda,
                               "pose_share": "(pose ms/frame · rate_hz) / (generator ms/frame · 25)"})


class FanCopy(torch.nn.Module):
    """FAN in another dtype (inputs cast on the way in)."""

    def __init__(self, fan: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        import copy

        self.fan, self.dtype = copy.deepcopy(fan).to(dtype), dtype

    def forward(self, x: torch.Tensor):
        return self.fan(x.to(self.dtype))


def heatmaps(fan: torch.nn.Module, crops: np.ndarray, device: str) -> np.ndarray:
    """FAN as `FaceAlignmentDetector.fan_heatmaps` runs it: upload, forward, last stack's heatmaps home."""
    out = fan(torch.from_numpy(crops).to(device))
    if isinstance(out, (list, tuple)):
        out = out[-1]
    return out.to(device="cpu", dtype=torch.float32).numpy()


def pose_precision(args, report: Report, device: str) -> None:
    """bf16 (autocast) pose codes of the oracle's pose frames against float32 and the oracle."""
    from bench.gpu_parity import ENC_ATOL, ENC_RTOL, REPO, enc_ratio, shared_dir
    from pcavs.checkpoints import load_networks
    from pcavs.engine import encode_poses

    import tempfile

    shared = shared_dir(args.shared)
    weights = [d for d in (REPO / "checkpoints" / "parity_seed0", Path(tempfile.gettempdir()) / "pcavs_parity_seed0")
               if (d / ".complete").is_file()]   # the parity stage's weights; not generated again here
    if shared is None or not weights or report.out_of_time(15.0):
        report.set("pose_precision", "skipped: no parity oracle (PCAVS_SHARED_DIR), no weights from the parity "
                                     "stage, or no time left")
        return
    with np.load(shared / "parity" / "cases" / "case_seed0.npz") as c:
        x, ref = torch.from_numpy(c["pose_input"]), c["pose_code"][:, 0]
    nets = load_networks(weights[0], device=device, dtype=torch.float32)
    with torch.inference_mode():
        f32 = encode_poses(nets, x)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            b16 = encode_poses(nets, x)
    report.set("pose_precision", {
        "fp32_vs_oracle_max_abs": float(f"{np.abs(f32 - ref).max():.3g}"),
        "bf16_vs_fp32_max_abs": float(f"{np.abs(b16 - f32).max():.3g}"),
        "bf16_bound_ratio": float(f"{enc_ratio(b16, ref):.3g}"),
        "bound": f"max |Δ|/({ENC_ATOL:g} + {ENC_RTOL:g}·|ref|) ≤ 1",
        "code_frame_to_frame_max": float(f"{np.abs(ref[0] - ref[1]).max():.3g}")})


if __name__ == "__main__":
    raise SystemExit(main())
