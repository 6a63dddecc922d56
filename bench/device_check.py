"""The whole GPU check in one command: bench/device_check.sh OUTDIR (this is what it runs).

Stages, each a separate process with its own time limit inside one overall budget (default 450 s, so
the check ends within 8 minutes on an H100/H200 with its start-up), so a crash, hang or out-of-memory in
one loses nothing else:

  env        Python, torch/CUDA build, GPU, driver; the project imports missing on the machine
  tests      pytest -m cuda (tests/test_gpu_path.py, tests/test_generator.py, tests/test_styled_tail.py):
             batch 1, batched, graphs, encoders and Avatar on CUDA against the CPU; the fused tail compiled
  generator  render-path frames/s against batch size (1, 8, 32, 128, 256), eager, CUDA-graphed and graphed
             with ticks overlapped (submit t+1 before reading t); host ms per tick; the generator alone
             with its pointwise tail eager vs fused (Triton), bf16 and fp16, batch 1 and 128
  sessions   N sessions per tick through render_sessions up to 256: aggregate fps, p95 tick latency
  parity     the oracle case in float32 with TF32 off; PSNR of TF32/fp16/bf16 against float32
  pose       pose encoder, FAN, SFD ms per frame on the worker stream; tracked-frame cost; per-session pose
             cost at N = 1, 4, 16, 64 sessions one by one and batched, next to the generator's (pose_share)

OUTDIR gets device_check.json (every stage's results, rewritten after each stage), device_check.txt (the
tables) and device_check.log (all output). `--smoke` runs every stage on the CPU with tiny sizes (the
test suite does, so the script is known to work before it meets a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage import print_table  # noqa: E402

# (name, command after the interpreter, time limit in seconds)
STAGES: list[tuple[str, list[str], float]] = [
    ("env", ["bench/gpu_env.py"], 30),
    ("tests", ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_gpu_path.py",
               "tests/test_generator.py", "tests/test_styled_tail.py"], 110),
    ("generator", ["bench/gpu_generator.py"], 90),
    ("sessions", ["bench/gpu_sessions.py"], 90),
    ("parity", ["bench/gpu_parity.py"], 90),
    ("pose", ["bench/gpu_pose.py"], 60),
]
EXIT_MARGIN_S = 8.0  # a stage stops starting new rows this long before its limit


def run_stage(name: str, cmd: list[str], limit: float, smoke: bool, log, env: dict[str, str]) -> dict[str, Any]:
    fd, tmp = tempfile.mkstemp(prefix=f"pcavs_{name}_", suffix=".json")
    os.close(fd)
    Path(tmp).unlink()
    argv = [sys.executable, *cmd]
    if name != "tests":
        argv += ["--json", tmp, "--deadline-s", f"{max(limit - EXIT_MARGIN_S, 5.0):.0f}"]
        if smoke:
            argv.append("--smoke")
    log.write(f"\n===== {name}: {' '.join(argv)} (limit {limit:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    log.write(out or "")
    log.flush()
    sys.stdout.write(out or "")
    result: dict[str, Any] = {}
    if Path(tmp).is_file():
        try:
            result = json.loads(Path(tmp).read_text())
        except json.JSONDecodeError:
            result = {}
        Path(tmp).unlink()
    if name == "tests":
        lines = [ln for ln in (out or "").splitlines() if ln.strip()]
        result = {"summary": lines[-1] if lines else "", "failures": [ln for ln in lines if ln.startswith("FAILED")]}
    result["returncode"] = proc.returncode
    result["wall_s"] = round(time.monotonic() - t0, 1)
    if status is None:
        status = "ok" if proc.returncode == 0 else ("no-tests" if name == "tests" and proc.returncode == 5 else "failed")
        if name != "tests" and result.get("status") not in (None, "ok", "running"):
            status = str(result["status"])
    result["status"] = status
    if status != "ok":
        result["output_tail"] = "\n".join((out or "").splitlines()[-15:])
    return result


def tables(results: dict[str, Any]) -> str:
    """Every stage's table, from the merged results."""
    parts = []
    summary = [{"stage": k, "status": v.get("status"), "wall_s": v.get("wall_s"),
                "peak_mb": v.get("peak_mb") or _max_peak(v)} for k, v in results.items() if k != "meta"]
    parts.append(print_table("device check — stages", summary, ["stage", "status", "wall_s", "peak_mb"],
                              echo=False))
    env = results.get("env", {}).get("info")
    if env:
        parts.append("env: " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "executable"))
        missing = results["env"].get("missing_imports")
        parts.append(f"missing imports: {', '.join(missing) if missing else 'none'}")
    if "tests" in results:
        parts.append(f"tests (-m cuda): {results['tests'].get('summary', '')}")
        parts += results["tests"].get("failures", [])
    specs = [("generator", "batches", "generator: one avatar's rows through the render path",
              ["mode", "batch", "median_ms", "p95_ms", "ms_per_frame", "frames_per_s", "host_ms", "generator_ms",
               "warm_up_s", "peak_mb"]),
             ("generator", "fused", "fused tail: the generator alone, CUDA-graphed, eager tail vs fused (GPU ms per pass)",
              ["dtype", "batch", "unfused_ms", "fused_ms", "unfused_fps", "fused_fps", "speedup", "max_abs_diff",
               "warm_up_s", "note"]),
             ("sessions", "sessions", "sessions: one render_sessions call per tick",
              ["sessions", "tick_median_ms", "tick_p95_ms", "aggregate_fps", "fits_25fps", "generator_ms", "peak_mb"]),
             ("parity", "parity", "parity: float32, TF32 off, oracle seed 0", ["check", "value", "bound", "ok"]),
             ("parity", "precision", "precision: generator vs float32 (TF32 off)",
              ["variant", "psnr_vs_fp32_db", "max_abs_vs_fp32", "finite", "psnr_vs_oracle_db"]),
             ("pose", "pose", "pose: worker stream, float32", ["step", "frames", "median_ms", "p95_ms", "ms_per_frame"]),
             ("pose", "scale", "pose at scale: per session, pose at 12.5 Hz beside the generator at 25 fps "
              "(goal pose_share ≤ 0.25)",
              ["sessions", "mode", "fan_ms", "encoder_ms", "pose_ms_per_session", "generator_ms_per_session",
               "pose_share", "ok"])]
    for stage, table, title, cols in specs:
        rows = results.get(stage, {}).get("rows", {}).get(table)
        if rows:
            head = results[stage]
            parts.append(print_table(f"{title} ({head.get('device', '?')} {head.get('dtype', '')})".replace(" )", ")"),
                                     rows, cols, echo=False))
    for stage in ("generator", "pose", "parity"):
        for key in ("fused_tail", "derived", "parity_skipped", "face_alignment", "scale_notes", "pose_precision"):
            if key in results.get(stage, {}):
                parts.append(f"{stage} {key}: {results[stage][key]}")
    return "\n\n".join(parts) + "\n"


def _max_peak(stage: dict[str, Any]) -> float | None:
    peaks = [r.get("peak_mb") for rows in stage.get("rows", {}).values() for r in rows if r.get("peak_mb")]
    return max(peaks) if peaks else None


def _tidy_tmp(out: Path) -> None:
    """device_check.sh points TMPDIR at OUT/tmp so nothing is written outside OUT; at the end the
    carried wheels' install folder and the compile caches (Triton's, torch inductor's) go, and the folder
    itself when nothing else is left in it."""
    tmp = Path(os.environ.get("TMPDIR", ""))
    if not tmp.is_dir() or tmp.resolve().parent != out.resolve():
        return
    for name in ("pcavs_site", "triton_cache", "torchinductor_cache", *(p.name for p in tmp.glob("torchinductor_*"))):
        shutil.rmtree(tmp / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        tmp.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="every stage on the CPU with tiny sizes")
    ap.add_argument("--budget-s", type=float, default=450.0, help="all stages together")
    ap.add_argument("--stages", default=",".join(s[0] for s in STAGES))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.stages.split(",")
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        ap.error(f"unknown stage(s): {', '.join(sorted(unknown))}")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
    deadline = time.monotonic() + args.budget_s
    results: dict[str, Any] = {"meta": {"smoke": args.smoke, "budget_s": args.budget_s,
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}}
    json_path, txt_path = args.out / "device_check.json", args.out / "device_check.txt"
    with open(args.out / "device_check.log", "w") as log:
        for name, cmd, limit in STAGES:
            if name not in wanted:
                continue
            left = deadline - time.monotonic()
            if left < 15:
                results[name] = {"status": "skipped", "reason": f"out of time ({left:.0f} s of the budget left)"}
            else:
                results[name] = run_stage(name, cmd, min(limit, left), args.smoke, log, env)
            json_path.write_text(json.dumps(results, indent=1))
            txt_path.write_text(tables(results))
    print("\n" + txt_path.read_text())
    print(f"wrote {json_path}, {txt_path} and {args.out / 'device_check.log'}")
    _tidy_tmp(args.out)
    failed = [k for k, v in results.items() if k != "meta" and v.get("status") not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
