"""Shared test fixtures: the external parity oracle in ../shared and checkpoints generated from it.

The oracle lives outside the repository (CI places `shared/` beside the clone). Tests that need it
skip with a clear reason when it is absent; they never fake it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("PCAVS_SHARED_DIR", REPO_ROOT.parent / "shared"))
PARITY_DIR = SHARED_DIR / "parity"
CASES_DIR = PARITY_DIR / "cases"
# Generated weights are large (~600 MB per seed): cache them in an ignored folder of the repo.
WEIGHTS_CACHE = Path(os.environ.get("PCAVS_PARITY_WEIGHTS", REPO_ROOT / "checkpoints"))
INFERENCE_NETS = ("G", "V", "E", "A_sync")


def _require_shared() -> None:
    if not (PARITY_DIR / "make_weights.py").is_file():
        pytest.skip(f"parity oracle not found at {PARITY_DIR} (place the project's shared/ folder beside the repo)")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    _require_shared()
    return PARITY_DIR


def parity_weights_dir(seed: int) -> Path:
    """Checkpoint folder with make_weights.py output for `seed`, generated once and cached."""
    _require_shared()
    out = WEIGHTS_CACHE / f"parity_seed{seed}"
    done = out / ".complete"
    if not done.is_file():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(PARITY_DIR / "make_weights.py"), "--seed", str(seed), "--out", str(out),
             "--nets", *INFERENCE_NETS],
            check=True,
        )
        done.write_text("ok\n")
    return out


def load_case(seed: int) -> dict[str, np.ndarray]:
    _require_shared()
    path = CASES_DIR / f"case_seed{seed}.npz"
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session", params=[0, 1], ids=["seed0", "seed1"])
def parity_seed(request) -> int:
    return request.param


@pytest.fixture(scope="session")
def speech_wav_path() -> Path:
    _require_shared()
    return CASES_DIR / "speech.wav"


@pytest.fixture(scope="session")
def identity_png_path() -> Path:
    _require_shared()
    return CASES_DIR / "identity.png"


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A CLI run inside a test (`setup_logging`) points the root logger at that test's captured stderr;
    put the root logger back afterwards, so that threads still ending from that test (a studio session,
    a viewer leaving) never write to a stream pytest has closed ("--- Logging error ---")."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def janus_stack(tmp_path_factory):
    """A real Janus + simple-whip-server in a test-made network namespace (tests.janus_support), one per
    test module; skips with the reason when the machine cannot run it."""
    from tests.janus_support import JanusStack, missing_reason
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    janus = JanusStack(tmp_path_factory.mktemp("janus"))
    janus.start()          # stops what it started (namespace included) if it fails
    try:
        yield janus
    finally:
        janus.stop()       # processes, then the namespace and its veth pair
