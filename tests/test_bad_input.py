"""Bad input from a user gets its own one-line reason, early, from a real `run_live.py` process (the
stray-line checks need the process's real stderr: C libraries write there directly)."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from capture.audio_files import AudioFileError, load_audio_16k
from pcavs.alignment import AlignmentError, read_rgb
from tests.conftest import REPO_ROOT, parity_weights_dir

SAMPLE_PHOTO = REPO_ROOT / "assets" / "sample" / "astronaut.png"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "run_live.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def assert_one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), r.stderr  # nothing stray
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def truncated_png(tmp_path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "me.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_zero_length_wav_is_refused(tmp_path):
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioFileError, match="holds no samples"):
        load_audio_16k(empty)


def test_damaged_images_are_refused_with_their_reason(tmp_path, truncated_png):
    with pytest.raises(AlignmentError, match="cannot read image file .*me.png"):
        read_rgb(truncated_png)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 100)
    with pytest.raises(AlignmentError, match="garbage.jpg"):
        read_rgb(garbage)
    assert read_rgb(SAMPLE_PHOTO).shape[2] == 3  # a good photo still reads


@pytest.mark.slow
def test_cli_zero_length_wav_writes_nothing_and_says_why(tmp_path):
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.int16), 16000, subtype="PCM_16")
    out = tmp_path / "x.mp4"
    r = run_cli("--audio", str(empty), "--out", str(out), "--checkpoints", str(parity_weights_dir(0)), "-q")
    assert_one_error_line(r, "empty.wav", "no samples")
    assert "wrote" not in r.stderr and not out.exists()


def test_cli_unreadable_photo_is_named_before_models_load(tmp_path, truncated_png):
    """No sidecar and no landmark weights here: the photo's own fault must be what the user hears, and a
    missing checkpoint folder proves it was checked before any network was loaded."""
    r = run_cli("--identity", str(truncated_png), "--out", str(tmp_path / "x.mp4"),
                "--checkpoints", str(tmp_path / "no-checkpoints"))
    assert_one_error_line(r, "me.png", "cannot read image")
    assert "libpng" not in r.stderr


def test_cli_garbage_photo_without_sidecar(tmp_path):
    photo = tmp_path / "me.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 50)
    r = run_cli("--identity", str(photo), "--out", str(tmp_path / "x.mp4"),
                "--checkpoints", str(tmp_path / "no-checkpoints"))
    line = assert_one_error_line(r, "me.jpg")
    assert "landmark" not in line


# ------------------------------------------------------------------ issue 21: the last bad inputs
@pytest.mark.parametrize("seconds", ["nan", "inf", "0", "-1", "0.01"])
def test_impossible_max_seconds_is_refused_at_parse_time(seconds):
    from pcavs_live.cli.main import main
    with pytest.raises(SystemExit) as exit_:
        main(["--max-seconds", seconds, "--print-config"])
    assert exit_.value.code == 2


def test_cli_impossible_max_seconds_one_error_line(tmp_path):
    r = run_cli("--max-seconds", "nan", "--out", str(tmp_path / "x.mp4"), "--checkpoints", str(tmp_path / "none"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--max-seconds" in errors[0] and "'nan'" in errors[0]
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_cli_all_nonfinite_wav_writes_nothing_and_says_why(tmp_path):
    nan = tmp_path / "nan.wav"
    soundfile.write(nan, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    out = tmp_path / "x.mp4"
    r = run_cli("--audio", str(nan), "--out", str(out), "--checkpoints", str(parity_weights_dir(0)), "-q")
    assert_one_error_line(r, "nan.wav", "non-finite")
    assert "wrote" not in r.stderr and not out.exists()


def test_run_that_writes_no_frame_says_so_instead_of_wrote(tmp_path, monkeypatch, capsys):
    """A run whose recorder got no frame (stopped before its first) exits 2 with one line; "wrote" is
    printed only for a file with frames."""
    import pcavs_live.pipeline.session as session_module
    from pcavs_live.cli.main import main
    from pcavs_live.pipeline.scheduler import RunSummary

    frames = {"n": 0}

    class FakeSession:
        def __init__(self):
            self.metrics = session_module.LiveMetrics()
            self.recorder = type("R", (), {"frames_written": frames["n"]})()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def run(self, stop):
            return RunSummary(frames["n"], frames["n"], 0, 0.1, False)

    class FakeBuilder(FakeSession):
        """The builder's part the command line uses: `live`, `with`, and `build()`."""

        def __init__(self, config, run):
            self.live = __import__("threading").Event()

        def build(self):
            return FakeSession()

    monkeypatch.setattr(session_module, "SessionBuilder", FakeBuilder)
    out = tmp_path / "x.mp4"
    assert main(["--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"error: nothing was written to {out}" in err and "wrote" not in err
    frames["n"] = 3
    assert main(["--out", str(out), "-q"]) == 0
    assert f"wrote {out} (3 frames)" in capsys.readouterr().err
