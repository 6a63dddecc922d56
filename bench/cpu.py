"""The CPU at its own roof (issue 19): this CPU's measured peaks and every stage of a live frame against
them, float32 next to bfloat16, in one run.

Tables:
  roof     GFLOP/s of a 2048² GEMM (float32, bfloat16, int8 via torch._int_mm) and of a 3×3 conv 256→256
           at 56² (float32, bfloat16), batch 1: the yardsticks the generator is measured against.
  stages   ms per frame at batch 1 for each stage in float32 and bfloat16, timed round-robin (fp32, bf16,
           fp32, ...) so a burst of load from other users hits both alike: the audio encoder (A + mouth
           embedding), the identity encoder V (once per photo), the pose encoder E, the generator G (the
           app's form: shared weights, channels_last, identity cache), uint8 conversion, the whole frame
           with still pose (`Avatar.render`: audio + G + conversion, what the live loop runs per frame),
           and the live pose path's networks (face_alignment's 2D-FAN-4 on its 256² crop and SFD at
           320×240, random weights: their cost does not depend on the values). Each row: the bf16
           speed-up, the agreement with float32 (PSNR of the frame with that stage alone in bf16 on the
           oracle case, peak-to-peak 2 for G, 255 for uint8 frames), and the precision the app runs it in.
  G        the generator's achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) as a fraction of
           the same-dtype conv and GEMM peaks.
  threads  generator ms/frame at 1 and 2 intra-op threads, alone and with a pose worker busy beside it
           (the pose worker at 1 or 2 threads): what "renderer and pose worker must not oversubscribe" costs.
  trials   --trials: torch.compile (inductor) of the bf16 generator (first call = compile, steady state)
           and int8 (PT2E + X86InductorQuantizer + torch.compile, needs torchao on PYTHONPATH) of the
           generator's static convs, against bf16 of the same.

Medians of --runs after --warmup, load average before and after (the CPU is shared: compare ratios
within one run, not absolute numbers across runs).

    python bench/cpu.py [--checkpoints checkpoints/parity_seed0] [--runs 7] [--trials]
torchao is not a dependency (int8 was not adopted); for the int8 trial put it on a private path:
    pip install --no-deps --target /tmp/torchao torchao==0.18.0
    PYTHONPATH=/tmp/torchao python bench/cpu.py --trials
Stand-in weights: python ../shared/parity/make_weights.py --seed 0 --out checkpoints/parity_seed0
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import round_robin as timed_in_turns  # noqa: E402
from pcavs.checkpoints import load_networks  # noqa: E402
from pcavs.constants import ID_DIM  # noqa: E402
from pcavs.device import describe_dtype  # noqa: E402
from pcavs.engine import Avatar, EngineOptions, encode_poses  # noqa: E402
from pcavs.runtime import RenderRuntime, frames_on_device  # noqa: E402

CASE = Path(__file__).resolve().parent.parent.parent / "shared" / "parity" / "cases" / "case_seed0.npz"
BF16_FRAME_BOUND_DB = 45.0  # a stage runs in bf16 only if the frame stays this close to float32's


def round_robin(fns: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Median ms of each fn, timed in turns (bench.common.round_robin)."""
    return {k: statistics.median(v) for k, v in timed_in_turns(fns, runs, warmup).items()}


def psnr(a, b, peak_to_peak: float) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(peak_to_peak ** 2 / mse)


def bf16_copy(net: torch.nn.Module) -> torch.nn.Module:
    with torch.inference_mode(False):
        return copy.deepcopy(net).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------ roof
def roof(runs: int) -> dict[str, float]:
    """GFLOP/s peaks of this CPU at the current thread count."""
    n = 2048
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    a8 = torch.randint(-100, 100, (n, n), dtype=torch.int8)
    b8 = torch.randint(-100, 100, (n, n), dtype=torch.int8)
    x32 = torch.randn(1, 256, 56, 56).contiguous(memory_format=torch.channels_last)
    w32 = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    conv = torch.nn.functional.conv2d
    fns = {"gemm float32": lambda: a32 @ b32, "gemm bfloat16": lambda: a16 @ b16,
           "conv float32": lambda: conv(x32, w32, padding=1), "conv bfloat16": lambda: conv(x16, w16, padding=1)}
    try:
        torch._int_mm(a8, b8)
        fns["gemm int8"] = lambda: torch._int_mm(a8, b8)
    except RuntimeError:
        pass
    with torch.inference_mode():
        ms = round_robin(fns, runs, 2)
    flops = {"gemm": 2 * n ** 3, "conv": 2 * 256 * 256 * 9 * 56 * 56}
    return {k: flops[k.split()[0]] / (v * 1e6) for k, v in ms.items()}


# ---------------------------------------------------------------------------------------------- stages
def count_flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class Stages:
    """The oracle case's inputs and both precisions of every network, loaded once."""

    def __init__(self, checkpoints: Path) -> None:
        self.nets32 = load_networks(checkpoints, device="cpu", dtype=torch.float32)
        self.nets16 = load_networks(checkpoints, device="cpu", dtype=torch.bfloat16)  # G in bf16, encoders fp32
        with np.load(CASE) as c:
            case = {k: c[k] for k in c.files}
        self.photo = torch.from_numpy(case["identity_input"])
        self.mel = case["mel_input"][:1]
        self.pose_in = torch.from_numpy(case["pose_input"][:1])
        self.style = torch.from_numpy(case["style_driven"][:1])
        self.start = torch.from_numpy(case["id_map"][:1])
        self.noise = [torch.from_numpy(case[f"noise_{i}"][:1].astype(np.float32)) for i in range(11)]
        self.av32 = Avatar(RenderRuntime(self.nets32), self.photo, EngineOptions(device="cpu", dtype=torch.float32))
        self.av16 = Avatar(RenderRuntime(self.nets16), self.photo, EngineOptions(device="cpu", dtype=torch.bfloat16))

    def rows(self, runs: int, warmup: int) -> tuple[list[tuple], dict[str, float]]:
        n32, n16 = self.nets32, self.nets16
        a16, e16, v16 = bf16_copy(n32.audio), bf16_copy(n32.pose), bf16_copy(n32.identity)
        mel = torch.from_numpy(self.mel)
        g32, g16 = n32.generator, n16.generator
        cache32 = g32.precompute_style(self.style[:, :ID_DIM])
        cache16 = g16.precompute_style(self.style[:, :ID_DIM])
        rest, start = self.style[:, ID_DIM:], self.start
        noise16 = [t.bfloat16() for t in self.noise]
        rows, extra = [], {}
        with torch.inference_mode():
            ref = g32.forward_cached(cache32, rest, start, self.noise)

            def frame_with(mouth: torch.Tensor | None = None, pose: torch.Tensor | None = None) -> torch.Tensor:
                """The fp32 generator's frame with the given mouth code / pose code (one stage changed)."""
                r = rest.clone()
                if mouth is not None:
                    r[:, :mouth.shape[1]] = mouth.float()
                if pose is not None:
                    r[:, -pose.shape[1]:] = pose.float()
                return g32.forward_cached(cache32, r, start, self.noise)

            mouth32 = n32.pose.mouth_code(n32.audio(mel) * 1.2)
            mouth16 = e16.mouth_code(a16(mel.bfloat16()) * 1.2)
            base = frame_with(mouth=mouth32)
            t = round_robin({"32": lambda: n32.pose.mouth_code(n32.audio(mel) * 1.2),
                             "16": lambda: e16.mouth_code(a16(mel.bfloat16()) * 1.2)}, runs, warmup)
            rows.append(("audio encoder (A + mouth)", t["32"], t["16"], psnr(frame_with(mouth=mouth16), base, 2.0)))

            photo = self.photo[None]
            id32, map32 = n32.identity(photo)
            id16, map16 = v16(photo.bfloat16())
            c16 = g32.precompute_style(id16.float())
            t = round_robin({"32": lambda: n32.identity(photo), "16": lambda: v16(photo.bfloat16())}, max(3, runs // 2), 1)
            rows.append(("identity encoder V (per photo)", t["32"], t["16"],
                         psnr(g32.forward_cached(c16, rest, map16.float(), self.noise),
                              g32.forward_cached(g32.precompute_style(id32), rest, map32, self.noise), 2.0)))

            pose_in = self.pose_in
            p32, p16 = n32.pose.pose_code(pose_in), e16.pose_code(pose_in.bfloat16())
            t = round_robin({"32": lambda: n32.pose.pose_code(pose_in), "16": lambda: e16.pose_code(pose_in.bfloat16())},
                            runs, warmup)
            rows.append(("pose encoder E (bf16 weights)", t["32"], t["16"],
                         psnr(frame_with(pose=p16), frame_with(pose=p32), 2.0)))
            # the same float32 weights under bf16 autocast (no second copy of E's weights)

            def autocast_codes():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return n32.pose.pose_code(pose_in)

            pa = autocast_codes()
            t = round_robin({"32": lambda: encode_poses(n32, pose_in), "16": autocast_codes}, runs, warmup)
            rows.append(("pose encoder E (bf16 autocast)", t["32"], t["16"],
                         psnr(frame_with(pose=pa[None] if pa.dim() == 1 else pa), frame_with(pose=p32), 2.0)))

            out16 = g16.forward_cached(cache16, rest, start, noise16)
            t = round_robin({"32": lambda: g32.forward_cached(cache32, rest, start, self.noise),
                             "16": lambda: g16.forward_cached(cache16, rest, start, noise16)}, runs, warmup)
            rows.append(("generator G", t["32"], t["16"], psnr(out16.float(), ref, 2.0)))
            extra["g_flops"] = count_flops(lambda: g32.forward_cached(cache32, rest, start, self.noise))
            extra["g32_ms"], extra["g16_ms"] = t["32"], t["16"]

            t = round_robin({"32": lambda: frames_on_device(ref)[0].numpy(),
                             "16": lambda: frames_on_device(out16)[0].numpy()}, runs, warmup)
            rows.append(("uint8 conversion", t["32"], t["16"], math.nan))

        f32 = self.av32.render(self.mel)
        f16 = self.av16.render(self.mel)
        t = round_robin({"32": lambda: self.av32.render(self.mel), "16": lambda: self.av16.render(self.mel)},
                        runs, warmup)
        rows.append(("whole frame, still pose (app)", t["32"], t["16"], psnr(f16, f32, 255.0)))
        extra["frame32_ms"], extra["frame16_ms"] = t["32"], t["16"]
        rows.extend(landmark_rows(runs, warmup, extra))
        return rows, extra


def landmark_rows(runs: int, warmup: int, extra: dict[str, float]) -> list[tuple]:
    """face_alignment's networks (random weights: no agreement can be measured without the real ones)."""
    try:
        from face_alignment.detection.sfd.net_s3fd import s3fd
        from face_alignment.models.fan import FAN
    except ImportError:
        return []
    rows = []
    with torch.inference_mode():
        fan = FAN(4).eval().requires_grad_(False)
        fan16 = bf16_copy(fan)
        crop = torch.rand(1, 3, 256, 256)
        t = round_robin({"32": lambda: fan(crop), "16": lambda: fan16(crop.bfloat16())}, runs, warmup)
        rows.append(("FAN landmarks 256² (tracked pose)", t["32"], t["16"], math.nan))
        extra["fan32_ms"] = t["32"]
        sfd = s3fd().eval().requires_grad_(False)
        sfd16 = bf16_copy(sfd)
        img = torch.rand(1, 3, 240, 320) * 255 - 120
        t = round_robin({"32": lambda: sfd(img), "16": lambda: sfd16(img.bfloat16())}, max(3, runs // 2), 1)
        rows.append(("SFD detector 320×240 (lost track)", t["32"], t["16"], math.nan))
    return rows


# --------------------------------------------------------------------------------------------- threads
def thread_rows(stages: Stages, seconds: float) -> list[tuple[str, float, float]]:
    """Generator frames/s and pose frames/s with the renderer at R threads and a busy pose worker
    (FAN + pose encoder in a loop) at P threads (P = 0: no pose worker). torch's intra-op thread count
    is per calling thread (OpenMP), so each thread sets its own."""
    g, av = stages.nets16.generator, stages.av16
    try:
        from face_alignment.models.fan import FAN
        fan = FAN(4).eval().requires_grad_(False)
    except ImportError:
        fan = None
    pose_net = stages.nets32.pose
    crop, pose_in = torch.rand(1, 3, 256, 256), stages.pose_in
    rows = []
    for r_threads, p_threads in ((2, 0), (1, 0), (2, 2), (2, 1), (1, 1)):
        stop = threading.Event()
        pose_frames = [0]

        def pose_loop() -> None:
            torch.set_num_threads(p_threads)
            with torch.inference_mode():
                while not stop.is_set():
                    if fan is not None:
                        fan(crop)
                    pose_net.pose_code(pose_in)
                    pose_frames[0] += 1

        worker = threading.Thread(target=pose_loop, daemon=True) if p_threads else None
        saved = torch.get_num_threads()
        torch.set_num_threads(r_threads)
        try:
            av.render(stages.mel)
            if worker is not None:
                worker.start()
            frames, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                av.render(stages.mel)
                frames += 1
            elapsed = time.perf_counter() - t0
        finally:
            stop.set()
            if worker is not None:
                worker.join()
            torch.set_num_threads(saved)
        rows.append((f"renderer {r_threads} thr" + (f" + pose worker {p_threads} thr" if p_threads else " alone"),
                     frames / elapsed, pose_frames[0] / elapsed))
    return rows


# ---------------------------------------------------------------------------------------------- trials
def compile_trial(stages: Stages, runs: int) -> dict[str, float | str]:
    g16 = stages.nets16.generator
    cache = g16.precompute_style(stages.style[:, :ID_DIM])
    rest, start = stages.style[:, ID_DIM:], stages.start.bfloat16()
    noise = [t.bfloat16() for t in stages.noise]
    out: dict[str, float | str] = {}
    try:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        fn = torch.compile(g16.forward_cached)
        with torch.inference_mode():
            t = time.perf_counter()
            y = fn(cache, rest, start, noise)
            out["first_call_s"] = time.perf_counter() - t
            ref = g16.forward_cached(cache, rest, start, noise)
            ms = round_robin({"eager": lambda: g16.forward_cached(cache, rest, start, noise),
                              "compiled": lambda: fn(cache, rest, start, noise)}, runs, 2)
        out.update(eager_ms=ms["eager"], compiled_ms=ms["compiled"], psnr_vs_eager=psnr(y.float(), ref.float(), 2.0))
    except Exception as exc:  # a trial: report why it did not run
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return out


def int8_trial(runs: int) -> dict[str, float | str]:
    """int8 of the generator's convolution stack (the static part of the shared-weight form) through
    PT2E + X86InductorQuantizer + torch.compile, against the same stack in bf16 eager and compiled: the
    most int8 can gain (the modulation, noise, upsampling and activations stay as they are)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    except ImportError as exc:
        return {"error": f"torchao not importable ({exc})"}
    from pcavs.networks.generator import ModulatedGenerator

    g = ModulatedGenerator()
    torch.manual_seed(0)
    out: dict[str, float | str] = {}
    try:
        size_of = {}
        s = 7
        for conv in g.modulated_convs():
            if conv.upsample:
                s *= 2
            if conv.kernel_size == 3 and not conv.upsample:
                size_of.setdefault(len(size_of), (conv.in_channel, conv.out_channel, s))
        blocks = [torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.LeakyReLU(0.2)).eval()
                  for i, o, _ in size_of.values()]
        xs = [torch.randn(1, i, s, s).contiguous(memory_format=torch.channels_last) for i, _, s in size_of.values()]
        flops = sum(2 * i * o * 9 * s * s for i, o, s in size_of.values())
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        q_fns, b_fns, c_fns, t_compile, errs = [], [], [], 0.0, []
        for block, x in zip(blocks, xs):
            with torch.no_grad():
                ref = block(x)
                exported = torch.export.export(block, (x,)).module()
                prepared = prepare_pt2e(exported, quantizer)
                prepared(x)
                converted = convert_pt2e(prepared)
                t = time.perf_counter()
                qf = torch.compile(converted)
                qy = qf(x)
                b16 = bf16_copy(block)
                cf = torch.compile(b16)
                cf(x.bfloat16())
                t_compile += time.perf_counter() - t
                errs.append(psnr(qy.float(), ref, float(ref.max() - ref.min())))
            q_fns.append((qf, x))
            b_fns.append((b16, x.bfloat16()))
            c_fns.append((cf, x.bfloat16()))

        def run(fns):
            def go():
                with torch.no_grad():
                    for f, x in fns:
                        f(x)
            return go
        ms = round_robin({"bf16 eager": run(b_fns), "bf16 compiled": run(c_fns), "int8 compiled": run(q_fns)},
                         runs, 2)
        out.update({k + "_ms": v for k, v in ms.items()})
        out.update(conv_gflop=flops / 1e9, compile_s=t_compile, int8_psnr_min_db=min(errs))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return out


# ------------------------------------------------------------------------------------------------ main
def fmt_db(x: float) -> str:
    return "-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, default=Path("checkpoints/parity_seed0"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--thread-seconds", type=float, default=6.0, help="per threads row (0 = skip)")
    ap.add_argument("--trials", action="store_true", help="also torch.compile and int8 (minutes of compiling)")
    args = ap.parse_args(argv)
    if not CASE.is_file():
        print(f"error: the oracle case {CASE} is missing (place shared/ beside the repo)", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    print(f"pcavs-live CPU roof — torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, auto dtype here: {describe_dtype('auto', 'cpu')}")
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} CPUs\n")

    peaks = roof(args.runs)
    print("roof (GFLOP/s, median):  " + "   ".join(f"{k} {v:.0f}" for k, v in peaks.items()))

    stages = Stages(args.checkpoints)
    rows, extra = stages.rows(args.runs, args.warmup)
    print(f"\n{'stage (batch 1)':<36} | {'fp32 ms':>8} | {'bf16 ms':>8} | {'bf16 ×':>6} | {'PSNR dB':>7} | app runs")
    print("-" * 92)
    for name, t32, t16, db in rows:
        if name.startswith(("generator", "whole", "uint8")):
            app = "auto dtype"
        elif name.startswith("pose encoder E"):
            app = "float32 (bf16 gain not stable across runs here; see README)"
        elif name.startswith(("FAN", "SFD")):
            app = "float32 (no real weights here to bound bf16)"
        else:
            ok = db >= BF16_FRAME_BOUND_DB
            gain = t32 / t16
            app = "float32" + (f" (bf16 only {gain:.2f}×)" if ok else f" (bf16 frame {fmt_db(db)} dB < "
                                                                       f"{BF16_FRAME_BOUND_DB:.0f})")
        print(f"{name:<36} | {t32:8.1f} | {t16:8.1f} | {t32 / t16:6.2f} | {fmt_db(db):>7} | {app}")

    gflop = extra["g_flops"] / 1e9
    print(f"\ngenerator: {gflop:.1f} GFLOP/frame")
    for dt, key in (("float32", "g32_ms"), ("bfloat16", "g16_ms")):
        achieved = gflop / extra[key] * 1e3
        print(f"  {dt:<8} {extra[key]:7.1f} ms  {achieved:6.0f} GFLOP/s = {achieved / peaks[f'conv {dt}']:5.1%} of "
              f"the {dt} conv peak, {achieved / peaks[f'gemm {dt}']:5.1%} of the GEMM peak")
    print(f"whole frame, still pose: float32 {extra['frame32_ms']:.1f} ms, bfloat16 {extra['frame16_ms']:.1f} ms "
          f"(target ≤ 100 ms)")

    if args.thread_seconds > 0:
        print(f"\n{'threads (bf16 generator, FAN + E pose loop)':<46} | {'G frames/s':>10} | {'pose frames/s':>13}")
        print("-" * 76)
        for name, gfps, pfps in thread_rows(stages, args.thread_seconds):
            print(f"{name:<46} | {gfps:10.2f} | {pfps:13.2f}")

    if args.trials:
        c = compile_trial(stages, args.runs)
        print("\ntorch.compile (inductor, freezing) of the bf16 generator: " + (
            c["error"] if "error" in c else
            f"first call {c['first_call_s']:.0f} s, steady {c['compiled_ms']:.1f} ms vs eager {c['eager_ms']:.1f} ms "
            f"({c['eager_ms'] / c['compiled_ms']:.2f}×), PSNR vs eager {fmt_db(c['psnr_vs_eager'])} dB"))
        q = int8_trial(args.runs)
        print("int8 (PT2E X86InductorQuantizer + inductor) of G's 3×3 conv stack: " + (
            q["error"] if "error" in q else
            f"{q['conv_gflop']:.1f} GFLOP; bf16 eager {q['bf16 eager_ms']:.1f} ms, bf16 compiled "
            f"{q['bf16 compiled_ms']:.1f} ms, int8 compiled {q['int8 compiled_ms']:.1f} ms "
            f"({q['bf16 eager_ms'] / q['int8 compiled_ms']:.2f}× bf16 eager, bar 1.5×); conv output PSNR "
            f"≥ {q['int8_psnr_min_db']:.1f} dB; compile {q['compile_s']:.0f} s"))
    load1 = os.getloadavg()
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
