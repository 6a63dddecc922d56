"""run_live.py as a user runs it: real subprocesses, real files, stand-in checkpoints from the oracle."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from pcavs_live.cli.config import load_config
from pcavs_live.pipeline.session import RunOptions, SessionBuilder
from tests.conftest import REPO_ROOT, parity_weights_dir


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "run_live.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory, speech_wav_path) -> Path:
    """The oracle's speech, first 1.2 s (30 frames): long enough to be speech, short enough for a CPU test."""
    audio, sr = soundfile.read(speech_wav_path, dtype="int16")
    path = tmp_path_factory.mktemp("audio") / "speech_1200ms.wav"
    soundfile.write(path, audio[: int(1.2 * sr)], sr, subtype="PCM_16")
    return path


def test_print_config_reflects_the_options():
    r = run_cli("--print-config", "--port", "9123", "--out", "webrtc", "--out", "x.mp4")
    assert r.returncode == 0, r.stderr
    assert "port = 9123" in r.stdout and 'targets = ["webrtc", "file"]' in r.stdout


def test_every_config_option_sets_its_key(tmp_path):
    """Each option declared on a config field reaches its key (options beat --set)."""
    from pcavs_live.cli.config import cli_options
    from run_live import overrides_from_args, parse_args

    values = {"--checkpoints": "ckpt", "--device": "cuda:1", "--audio": "talk.wav", "--audio-device": "3",
              "--pose": "head.mp4", "--webcam-index": "2", "--host": "0.0.0.0", "--port": "9001",
              "--token": "t0k", "--vcam-device": "/dev/video9", "--identity": "me.jpg", "--size": "1280x720"}
    argv: list[str] = []
    for option in cli_options():
        argv += [option.flag, option.choices[-1] if option.choices else values[option.flag]]
    config = load_config(None, overrides_from_args(parse_args(argv + ["--set", "server.port=1"])), cwd=tmp_path)
    expected = {"model.checkpoint_dir": tmp_path / "ckpt", "model.device": "cuda:1", "model.dtype": "bfloat16",
                "model.noise": "zero", "audio.source": tmp_path / "talk.wav", "audio.device": "3",
                "pose.source": tmp_path / "head.mp4", "pose.webcam_index": 2, "server.host": "0.0.0.0",
                "server.port": 9001, "server.token": "t0k", "vcam.device": "/dev/video9",
                "identity.photo": tmp_path / "me.jpg", "output.size": "1280x720", "output.framing": "fit"}
    assert {o.key for o in cli_options()} == set(expected)
    for key, value in expected.items():
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == value, key


def test_option_outside_a_keys_words_is_refused_by_argparse(capsys):
    from run_live import parse_args
    with pytest.raises(SystemExit) as info:
        parse_args(["--dtype", "float8"])
    assert info.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_out_maps_to_targets_and_file():
    from run_live import overrides_from_args, parse_args
    o = overrides_from_args(parse_args(["--out", "vcam", "--out", "a.mp4", "--out", "vcam", "--out", "b.mp4"]))
    assert o["output.targets"] == ["vcam", "file"] and o["output.file"] == "b.mp4"


def test_missing_checkpoints_is_one_actionable_line(tmp_path):
    out = tmp_path / "never.mp4"
    r = run_cli("--checkpoints", str(tmp_path / "nothing"), "--out", str(out))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err_lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "--fetch-checkpoints" in err_lines[0]
    assert not out.exists()  # nothing streamed or written


def test_photo_without_a_face_is_a_clear_error(tmp_path):
    photo = tmp_path / "wall.png"
    import cv2
    cv2.imwrite(str(photo), np.full((300, 300, 3), 200, np.uint8))
    (tmp_path / "wall.png.landmarks.json").write_text("[]")
    r = run_cli("--checkpoints", str(parity_weights_dir(0)), "--identity", str(photo),
                "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "wall.png" in r.stderr


@pytest.mark.slow
def test_file_driven_run_writes_an_mp4_with_every_frame_and_the_audio(tmp_path, short_speech):
    out = tmp_path / "talk.mp4"
    r = run_cli("--checkpoints", str(parity_weights_dir(0)), "--audio", str(short_speech), "--pose", "still",
                "--out", str(out), "-q", timeout=600)
    assert r.returncode == 0, r.stderr
    with av.open(str(out)) as c:
        video = c.streams.video[0]
        audio = c.streams.audio[0]
        frames = list(c.decode(video=0))
        assert len(frames) == 30  # 25 fps × 1.2 s
        assert (frames[0].width, frames[0].height) == (224, 224)
        assert video.average_rate == 25
    with av.open(str(out)) as c:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert audio.codec_context.name == "aac"
    assert np.abs(samples).max() > 0.05  # the speech is in there, not silence


class NoFaceInTheMiddle:
    """Landmark detector stand-in: the photo's own anchors, except frames 3..6 of the pose video."""

    def __init__(self, anchors: np.ndarray) -> None:
        self.calls = 0
        self._anchors = anchors

    def detect(self, rgb):
        self.calls += 1
        if 3 <= (self.calls - 1) <= 6:
            return []
        return [self._anchors + np.random.default_rng(self.calls).normal(0, 1.0, self._anchors.shape)]


@pytest.mark.slow
def test_pose_video_with_lost_face_holds_the_last_pose(tmp_path, short_speech):
    """A pose video whose face disappears for a few frames: the run completes, the pose worker reports
    the lost frames, every output slot is filled."""
    from pcavs.alignment import load_landmark_sidecar, read_rgb
    from pcavs_live.cli.config import SAMPLE_PHOTO
    photo = read_rgb(SAMPLE_PHOTO)
    video = tmp_path / "pose.mp4"
    with av.open(str(video), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 512, 512, "yuv420p"
        for _ in range(12):
            for p in s.encode(av.VideoFrame.from_ndarray(photo, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    detector = NoFaceInTheMiddle(load_landmark_sidecar(Path(str(SAMPLE_PHOTO) + ".landmarks.json")))
    config = load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)), "audio.source": str(short_speech),
                                "pose.source": str(video), "output.targets": ["file"],
                                "output.file": str(tmp_path / "posed.mp4")})
    with SessionBuilder(config, RunOptions(realtime=False, status_interval_s=0), landmark_detector=detector).build() as s:
        summary = s.run(threading.Event())
        snap = s.metrics.snapshot()
    assert summary.frames_out == 30
    assert detector.calls >= 7  # the lost frames were really looked at
    assert "pose_face_found" in snap


@pytest.mark.slow
def test_default_job_streams_the_sample_to_a_webrtc_viewer():
    """The main job (bundled sample → WebRTC) end to end: a real aiortc peer on loopback receives the
    avatar's 224×224 video and the speech audio while the generator runs live.

    The server answers before the generator has warmed up; on a starved machine (load 10 on 2 cores:
    one render took 1.7 s) the first frame leaves 10-20 s after the viewer connected. So the viewer
    waits (bounded) for the session's own count of frames out (/stats) before each frame's 10 s span."""
    import asyncio
    import time

    from tests.test_webrtc import connect_viewer, get_json, receive

    config = load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)), "server.port": "0"})
    assert config.output.targets == ("webrtc",) and config.audio.source == "sample"
    stop = threading.Event()
    session = SessionBuilder(config, RunOptions(status_interval_s=0), ice_host_addresses=("127.0.0.1",))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", session.build().run(stop)))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while (session.server is None or not session.server.running) and time.monotonic() < deadline:
            assert runner.is_alive(), "session ended before its server started"
            time.sleep(0.1)

        async def view():
            base = f"http://127.0.0.1:{session.server.port}/"
            pc, tracks = await connect_viewer(base)
            try:
                while (await get_json(base + "stats"))[1].get("frames_out", 0) == 0:
                    assert runner.is_alive(), "session ended before its first frame"
                    await asyncio.sleep(0.2)
                return await receive(tracks, n_video=10, n_audio=10)
            finally:
                await pc.close()

        video, audio = asyncio.run(asyncio.wait_for(view(), 180))
    finally:
        stop.set()
        runner.join(60)
        session.close()
    assert not runner.is_alive()
    assert all((f.width, f.height) == (224, 224) for f in video)
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in audio]).astype(np.float32) / 32768
    assert np.abs(pcm).max() > 0.01  # speech, not silence
    assert result["summary"].frames_out >= 10


@pytest.mark.slow
def test_fetch_checkpoints_from_a_local_server_then_skip_when_present(tmp_path):
    """`run_live.py --fetch-checkpoints` against a local HTTP server serving a demo.zip built from the
    oracle's stand-in checkpoints (in a demo/ folder, like the authors' zip): all four networks verify;
    a second call does not download again."""
    import functools
    import http.server
    import zipfile

    src = parity_weights_dir(0)
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "demo.zip", "w", zipfile.ZIP_STORED) as z:
        for name in ("G", "V", "E", "A_sync"):
            z.write(src / f"latest_net_{name}.pth", f"demo/latest_net_{name}.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    served = threading.Thread(target=httpd.serve_forever, daemon=True)
    served.start()
    dest = tmp_path / "checkpoints" / "demo"
    url = f"http://127.0.0.1:{httpd.server_address[1]}/demo.zip"
    try:
        first = run_cli("--fetch-checkpoints", "--checkpoints", str(dest), "--set", f"model.checkpoint_url={url}")
        assert first.returncode == 0, first.stderr
        assert sorted(p.name for p in dest.glob("*.pth")) == sorted(
            f"latest_net_{n}.pth" for n in ("A_sync", "E", "G", "V"))
        second = run_cli("--fetch-checkpoints", "--checkpoints", str(dest), "--set", "model.checkpoint_url=http://127.0.0.1:9/x")
        assert second.returncode == 0, second.stderr  # unreachable URL: proves it did not download
    finally:
        httpd.shutdown()
        served.join()


def test_missing_webcam_is_one_line_naming_the_option():
    """No camera on this machine (CI neither): the user sees one line saying which option to change."""
    r = run_cli("--checkpoints", str(parity_weights_dir(0)), "--pose", "webcam", "--webcam-index", "7",
                "--out", "webrtc", "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "[ERROR" not in r.stderr  # OpenCV's own log lines are silenced in favour of ours
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "camera 7" in err[0] and "--webcam-index" in err[0]


def test_stop_signals_end_a_running_session_and_interrupt_a_loading_one():
    """Ctrl-C / SIGTERM: while the networks load (nothing to finish) they interrupt at once; once the
    loop runs the first asks it to stop cleanly; a second one interrupts."""
    import signal

    from run_live import install_stop_handlers

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        live = threading.Event()
        stop = install_stop_handlers(live)
        handler = signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is handler
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        assert not stop.is_set()
        live.set()
        handler(signal.SIGTERM, None)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
