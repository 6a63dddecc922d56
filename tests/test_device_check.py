"""bench/device_check.sh works before it ever meets a GPU: its smoke mode runs every stage on the CPU with
tiny sizes, through the same scripts and the same result files."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from bench.device_check import run_stage
from tests.conftest import REPO_ROOT


def test_smoke_run_writes_every_stage(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([str(REPO_ROOT / "bench" / "device_check.sh"), str(out), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log", "device_check.txt"]
    results = json.loads((out / "device_check.json").read_text())
    stages = {k: v["status"] for k, v in results.items() if k != "meta"}
    assert stages == dict.fromkeys(["env", "tests", "generator", "sessions", "parity", "pose"], "ok")
    assert results["env"]["missing_imports"] == {}
    assert "skipped" in results["tests"]["summary"] or "passed" in results["tests"]["summary"]
    gen = results["generator"]["rows"]["batches"]
    assert [(r["mode"], r["batch"]) for r in gen] == [("eager", 1), ("eager", 2), ("overlap", 1), ("overlap", 2)]
    assert all(r["frames_per_s"] > 0 and r["host_ms"] > 0 for r in gen)
    fused = results["generator"]["rows"]["fused"]  # the CPU has no fused-tail timings to give
    assert {(r["dtype"], r["note"]) for r in fused} == {("bfloat16", "needs CUDA"), ("float16", "needs CUDA")}
    sessions = results["sessions"]["rows"]["sessions"]
    assert [r["sessions"] for r in sessions] == [1, 2] and all(r["tick_p95_ms"] >= r["tick_median_ms"] for r in sessions)
    precision = {r["variant"]: r for r in results["parity"]["rows"]["precision"]}
    assert set(precision) == {"float16", "bfloat16"} and all(r["finite"] and r["psnr_vs_fp32_db"] > 35
                                                            for r in precision.values())
    assert {r["step"] for r in results["pose"]["rows"]["pose"]} >= {"pose encoder b1"}
    scale = results["pose"]["rows"].get("scale")   # N=2 one by one and batched, unless the stage ran out of time
    assert results["pose"].get("truncated") or [(r["sessions"], r["mode"]) for r in scale] == [
        (2, "one-by-one"), (2, "batched")]
    assert all(r["pose_share"] > 0 and r["generator_ms_per_session"] > 0 for r in scale or [])
    table = (out / "device_check.txt").read_text()
    for title in ("device check — stages", "generator:", "fused tail:", "sessions:", "precision:", "pose:"):
        assert title in table


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    log = io.StringIO()
    code = "import json, sys, time; json.dump({'rows': {'t': [1]}}, open(sys.argv[sys.argv.index('--json') + 1], 'w')); time.sleep(60)"
    result = run_stage("slow", ["-c", code], limit=2.0, smoke=True, log=log, env=dict(os.environ))
    assert result["status"] == "timeout" and result["rows"] == {"t": [1]}   # what it wrote survives
    assert result["wall_s"] < 30
    failed = run_stage("broken", ["-c", "raise SystemExit(3)"], limit=20.0, smoke=True, log=log, env=dict(os.environ))
    assert failed["status"] == "failed" and failed["returncode"] == 3
