"""Device-check stage: parity with the oracle on the device in float32 (TF32 off), and the precision
of TF32 / fp16 / bf16 against float32.

Parity: the oracle case (../shared/parity, seed 0) through the engine on the device: identity feature and
map, reference pose, pose codes, mouth codes (the one device bound `ENC_RTOL`/`ENC_ATOL`, shared with
tests/test_gpu_path.py; reported as the worst |Δ|/(atol + rtol·|ref|), ≤ 1 passes), the generator's float output on the recorded
noise (max |Δ| < 1e-4, tests/test_generator.py) and the engine's uint8 frames (max |Δ| ≤ 1). Weights:
make_weights.py's seed 0 (generated into a temporary folder when no complete copy is found).

Precision: the generator on the case's styles with TF32 on, in float16 and in bfloat16, each against the
float32 output (TF32 off): PSNR in dB (peak-to-peak 2) and max |Δ|, and the same against the oracle.

    python bench/gpu_parity.py [--device cuda] [--shared DIR] [--weights DIR]
    python bench/gpu_parity.py --smoke     # CPU, 28² random generator: the precision rows only
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage import Report, peak_memory_mb, print_table, random_networks, resolve, stage_args  # noqa: E402

PARITY_ATOL = 1e-4       # tests/test_generator.py
# The one bound for the float32 encoders on a device (TF32 off) against a CPU result (the oracle here, our
# CPU path in tests/test_gpu_path.py). Not the CPU parity bound of tests/test_engine.py (1e-4, 1e-5):
# a GPU sums every conv's K = C_in·k² products (up to 512·3·3 = 4608) in another order than the CPU, and
# float32 reordering alone moves a sum by up to ~√K·eps ≈ 1e-5 relative per layer (worst case K·eps ≈
# 5e-4); over the ~50 layers of the identity encoder's ResNet, with BatchNorm rescaling, that reaches
# a few 1e-4 relative with no bug. 1e-3 relative (atol 1e-4 for values near zero) holds that with
# margin and still fails any real mistake (a wrong weight or layout is off by ≥ 1e-2).
ENC_RTOL, ENC_ATOL = 1e-3, 1e-4


def shared_dir(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("PCAVS_SHARED_DIR"), REPO / "shared", REPO.parent / "shared"):
        if cand and (Path(cand) / "parity" / "make_weights.py").is_file():
            return Path(cand)
    return None


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def enc_ratio(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64).reshape(ref.shape), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref) / (ENC_ATOL + ENC_RTOL * np.abs(ref))))


def weights_dir(shared: Path, arg: str | None, report: Report) -> Path:
    for cand in (arg, REPO / "checkpoints" / "parity_seed0"):
        if cand and (Path(cand) / ".complete").is_file():
            return Path(cand)
    out = Path(tempfile.gettempdir()) / "pcavs_parity_seed0"
    if not (out / ".complete").is_file():
        t0 = time.monotonic()
        subprocess.run([sys.executable, str(shared / "parity" / "make_weights.py"), "--seed", "0", "--out", str(out),
                        "--nets", "G", "V", "E", "A_sync"], check=True, stdout=subprocess.DEVNULL)
        (out / ".complete").write_text("ok\n")
        report.set("make_weights_s", round(time.monotonic() - t0, 1))
    return out


class Tf32:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def parity(nets, case: dict, device: str, report: Report) -> torch.Tensor:
    """The oracle comparisons in float32 with TF32 off; returns the generator's float output (on CPU)."""
    from pcavs.engine import Avatar, EngineOptions, encode_poses
    from pcavs.runtime import RenderRuntime

    rows = []
    with Tf32(False), torch.inference_mode():
        avatar = Avatar(RenderRuntime(nets), torch.from_numpy(case["identity_input"]), EngineOptions(device=device))
        rows.append(("id_feature", enc_ratio(avatar.id_feature.cpu().numpy(), case["id_feature"][0])))
        rows.append(("id_map", enc_ratio(avatar.id_map.cpu().numpy(), case["id_map"][0])))
        rows.append(("ref_pose_code", enc_ratio(avatar.reference_pose.cpu().numpy(), case["ref_pose_code"][0, 0])))
        codes = encode_poses(nets, torch.from_numpy(case["pose_input"]))
        rows.append(("pose_code", enc_ratio(codes, case["pose_code"][:, 0])))
        mouth = avatar.mouth_codes(case["mel_input"]).cpu().numpy()
        rows.append(("mouth_embed", enc_ratio(mouth, case["mouth_embed"][:, 0])))
        for name, value in rows:
            report.row("parity", {"check": name, "value": float(f"{value:.3g}"), "bound": 1.0, "ok": value <= 1.0,
                                  "measure": f"max |Δ|/({ENC_ATOL:g} + {ENC_RTOL:g}·|ref|)"})
        noise = [torch.from_numpy(case[f"noise_{i}"].astype(np.float32)).to(device) for i in range(11)]
        style = torch.from_numpy(case["style_driven"]).to(device)
        start = torch.from_numpy(case["id_map"]).to(device)
        out = nets.generator(style, start, noise).float().cpu()
        diff = float((out - torch.from_numpy(case["out_driven"])).abs().max())
        report.row("parity", {"check": "generator out_driven", "value": diff, "bound": PARITY_ATOL,
                              "ok": diff < PARITY_ATOL, "measure": "max |Δ|"})
        g = nets.generator
        g.shared_weight = False
        grouped = g(style, start, noise).float().cpu()
        g.shared_weight = True
        diff = float((grouped - torch.from_numpy(case["out_driven"])).abs().max())
        report.row("parity", {"check": "generator grouped", "value": diff, "bound": PARITY_ATOL,
                              "ok": diff < PARITY_ATOL, "measure": "max |Δ|"})
        frames = avatar.render(case["mel_input"], codes, noise=[n.cpu() for n in noise])
        d = np.abs(frames.astype(int) - case["out_driven_uint8"].astype(int))
        report.row("parity", {"check": "engine uint8 frames", "value": int(d.max()), "bound": 1, "ok": int(d.max()) <= 1,
                              "measure": f"max |Δ| ({int((d > 0).sum())} values differ)"})
    return out


def precision(nets_f32, style: torch.Tensor, start: torch.Tensor, noise: list[torch.Tensor], device: str,
              oracle: torch.Tensor | None, report: Report) -> None:
    """The generator in TF32 / fp16 / bf16 against float32 (TF32 off) and the oracle."""
    from pcavs.networks.generator import ModulatedGenerator

    g32 = nets_f32.generator
    args = (style.to(device), start.to(device), [n.to(device) for n in noise])
    with torch.inference_mode():
        with Tf32(False):
            ref = g32(*args).float().cpu()
        variants = {}
        if device.startswith("cuda"):
            with Tf32(True):
                variants["tf32"] = g32(*args).float().cpu()
        for dtype in (torch.float16, torch.bfloat16):
            if report.out_of_time(3.0):
                break
            with torch.inference_mode(False):
                g = ModulatedGenerator(size=g32.size)
                g.load_state_dict(g32.state_dict())
                g = g.to(device, dtype).eval().requires_grad_(False)
            with torch.inference_mode():
                variants[str(dtype).removeprefix("torch.")] = g(*args).float().cpu()
            del g
    for name, out in variants.items():
        row = {"variant": name, "psnr_vs_fp32_db": round(psnr(out, ref), 2),
               "max_abs_vs_fp32": float((out - ref).abs().max()), "finite": bool(torch.isfinite(out).all())}
        if oracle is not None:
            row["psnr_vs_oracle_db"] = round(psnr(out, oracle), 2)
        report.row("precision", row)


def main(argv: list[str] | None = None) -> int:
    ap = stage_args(__doc__)
    ap.add_argument("--shared", default=None, help="the shared/ folder holding parity/ (default: $PCAVS_SHARED_DIR, "
                                                   "./shared, ../shared)")
    ap.add_argument("--weights", default=None, help="make_weights.py --seed 0 output (default: generated)")
    args = ap.parse_args(argv)
    device, _ = resolve(args)
    report = Report("parity", args.json, args.deadline_s)
    report.set("device", device)
    peak_memory_mb(device, reset=True)
    shared = None if args.smoke else shared_dir(args.shared)
    if shared is None:
        report.set("parity_skipped", "smoke mode" if args.smoke else
                   "no parity oracle (set PCAVS_SHARED_DIR or --shared to a folder holding parity/)")
        nets = random_networks(device, torch.float32, size=28 if args.smoke else 224)
        gen = torch.Generator().manual_seed(1)
        b = 2
        style, start = torch.randn(b, 2560, generator=gen), torch.randn(b, 512, 7, 7, generator=gen)
        noise = [torch.randn((b, *s[1:]), generator=gen) for s in nets.generator.noise_shapes()]
        precision(nets, style, start, noise, device, None, report)
    else:
        from pcavs.checkpoints import load_networks

        with np.load(shared / "parity" / "cases" / "case_seed0.npz") as c:
            case = {k: c[k] for k in c.files}
        nets = load_networks(weights_dir(shared, args.weights, report), device=device, dtype=torch.float32)
        out = parity(nets, case, device, report)
        noise = [torch.from_numpy(case[f"noise_{i}"].astype(np.float32)) for i in range(11)]
        precision(nets, torch.from_numpy(case["style_driven"]), torch.from_numpy(case["id_map"]), noise, device,
                  torch.from_numpy(case["out_driven"]), report)
        report.set("generator_fp32_vs_oracle_max_abs", float((out - torch.from_numpy(case["out_driven"])).abs().max()))
    report.set("peak_mb", peak_memory_mb(device))
    if "parity" in report.data["rows"]:
        print_table(f"parity — {device} float32, TF32 off, oracle seed 0", report.data["rows"]["parity"],
                    ["check", "value", "bound", "ok", "measure"])
    print_table(f"precision — {device}, generator vs float32 (TF32 off)", report.data["rows"].get("precision", []),
                ["variant", "psnr_vs_fp32_db", "max_abs_vs_fp32", "finite", "psnr_vs_oracle_db"])
    ok = all(r["ok"] for r in report.data["rows"].get("parity", []))
    report.finish("ok" if ok else "failed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
