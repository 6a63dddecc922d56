"""Mp4Recorder: every frame and the whole soundtrack end up in the file with the right timing; plus
FanOutSink's failure isolation (a broken output must not cost us the recording)."""
from __future__ import annotations

import av
import numpy as np
import pytest

from stream.recorder import Mp4Recorder, RecorderError
from stream.sinks import FanOutSink, FrameSink, SinkError

FPS, RATE, SPF = 25, 16000, 640


def _pattern(k: int) -> np.ndarray:
    """A moving bar whose green level also encodes k, so frame order is checkable after H.264."""
    f = np.zeros((224, 224, 3), np.uint8)
    x = (k * 4) % 200
    f[:, x:x + 24, 0] = 255
    f[..., 1] = 4 * k
    return f


def _tone(n_frames: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(n_frames * SPF) / RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _record(path, n=50, sinks_extra=()):
    rec = Mp4Recorder(path)
    sink = FanOutSink([rec, *sinks_extra]) if sinks_extra else rec
    sink.open(224, 224, FPS, RATE)
    tone = _tone(n)
    for k in range(n):
        sink.write(_pattern(k), tone[k * SPF:(k + 1) * SPF], k)
    sink.close()
    return rec


def _read(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        info = dict(vcodec=v.codec_context.name, rate=v.average_rate, vdur=float(v.duration * v.time_base),
                    adur=float(a.duration * a.time_base), arate=a.codec_context.sample_rate,
                    acodec=a.codec_context.name, width=v.codec_context.width, height=v.codec_context.height)
        frames = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return info, frames, audio


def test_fifty_frames_and_a_tone(tmp_path):
    path = tmp_path / "out.mp4"
    rec = _record(path)
    assert rec.frames_written == 50
    info, frames, audio = _read(path)
    assert info["vcodec"] in ("h264", "mpeg4") and info["acodec"] == "aac"
    assert (info["width"], info["height"]) == (224, 224)
    assert info["rate"] == FPS
    assert len(frames) == 50                                  # exactly: the encoders were flushed
    times = [t for _, t in frames]
    np.testing.assert_allclose(times, np.arange(50) / FPS, atol=1e-3)
    assert info["vdur"] == pytest.approx(2.0, abs=0.045)
    # Frames are in order and are the ones written (green channel encodes k, within codec loss).
    greens = [float(f[..., 1].mean()) for f, _ in frames]
    np.testing.assert_allclose(greens, [4 * k for k in range(50)], atol=3)
    bar = [int(np.argmax(f[100, :, 0] > 128)) for f, _ in frames]
    assert bar[:10] == pytest.approx([(4 * k) % 200 for k in range(10)], abs=2)
    # Audio: ~2 s (AAC pads its last 1024-sample frame), and the decoded tone is 440 Hz.
    assert info["adur"] == pytest.approx(2.0, abs=0.07)
    sr = info["arate"]
    assert len(audio) / sr == pytest.approx(2.0, abs=0.07)
    spec = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    assert np.argmax(spec) * sr / len(audio) == pytest.approx(440.0, abs=2.0)
    core = audio[int(0.1 * sr):int(1.9 * sr)]
    assert np.sqrt(np.mean(core ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.15)


def test_audio_and_video_stay_aligned_across_a_skipped_slot(tmp_path):
    """A frame-index jump leaves the video at the right time and pads the audio with silence, so
    the click at frame 30 is heard when frame 30 is shown."""
    path = tmp_path / "gap.mp4"
    rec = Mp4Recorder(path)
    rec.open(224, 224, FPS, RATE)
    for k in [*range(0, 10), *range(15, 40)]:                 # slots 10..14 missing
        audio = np.zeros(SPF, np.float32)
        if k == 30:
            audio[:] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(SPF) / RATE)
        rec.write(_pattern(k), audio, k)
    rec.close()
    info, frames, audio = _read(path)
    assert len(frames) == 35
    assert frames[10][1] == pytest.approx(15 / FPS, abs=1e-3)
    sr = info["arate"]
    env = np.abs(audio)
    onset = np.argmax(env > 0.2) / sr
    assert onset == pytest.approx(30 / FPS, abs=0.01)


def test_bad_path_and_odd_size_are_one_line_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecorderError, match="file") as info:
        Mp4Recorder(blocker / "sub" / "out.mp4").open(224, 224, FPS, RATE)
    assert "\n" not in str(info.value)
    with pytest.raises(RecorderError, match="even"):
        Mp4Recorder(tmp_path / "odd.mp4").open(223, 224, FPS, RATE)


class _Failing:
    """A sink that breaks at a given frame (a disk filling up, a camera unplugged)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.written, self.closed, self.opened = fail_at, [], 0, None

    def open(self, width, height, fps, sample_rate):
        self.opened = (width, height, fps, sample_rate)

    def write(self, frame, audio, frame_index):
        if frame_index >= self.fail_at:
            raise OSError("No space left on device")
        self.written.append(frame_index)

    def close(self):
        self.closed += 1


def test_fanout_isolates_a_failing_sink(tmp_path, caplog):
    path = tmp_path / "fan.mp4"
    bad = _Failing(fail_at=7)
    assert isinstance(bad, FrameSink)
    rec = _record(path, n=50, sinks_extra=(bad,))
    assert bad.opened == (224, 224, FPS, RATE)
    assert bad.written == list(range(7)) and bad.closed == 1    # closed once, when it failed
    assert rec.frames_written == 50
    _, frames, _ = _read(path)
    assert len(frames) == 50
    assert "No space left on device" in caplog.text


def test_fanout_raises_when_every_sink_failed():
    a, b = _Failing(2), _Failing(4)
    fan = FanOutSink([a, b])
    fan.open(8, 8, FPS, RATE)
    frame, audio = np.zeros((8, 8, 3), np.uint8), np.zeros(SPF, np.float32)
    for k in range(4):
        fan.write(frame, audio, k)
    assert fan.active == [b] and [type(e) for _, e in fan.failures] == [OSError]
    with pytest.raises(SinkError, match="every output has failed.*No space left"):
        fan.write(frame, audio, 4)
    fan.close()
    assert a.closed == 1 and b.closed == 1


def test_fanout_open_failure_closes_the_already_opened():
    class NoOpen(_Failing):
        def open(self, *a):
            raise RuntimeError("device busy")
    first = _Failing(99)
    with pytest.raises(RuntimeError, match="device busy"):
        FanOutSink([first, NoOpen(0)]).open(8, 8, FPS, RATE)
    assert first.closed == 1


def test_fanout_reports_a_failing_output_in_one_line(caplog):
    """Issue 21.3: a user-caused output failure is one log line; its traceback only at debug level."""
    fan = FanOutSink([_Failing(1), _Failing(99)])
    fan.open(8, 8, FPS, RATE)
    frame, audio = np.zeros((8, 8, 3), np.uint8), np.zeros(SPF, np.float32)
    with caplog.at_level("INFO", logger="stream.sinks"):
        for k in range(3):
            fan.write(frame, audio, k)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)   # no traceback below DEBUG
    caplog.clear()
    fan = FanOutSink([_Failing(0), _Failing(99)])
    fan.open(8, 8, FPS, RATE)
    with caplog.at_level("DEBUG", logger="stream.sinks"):
        fan.write(frame, audio, 0)
    assert any(r.exc_info for r in caplog.records if r.levelname == "DEBUG")  # --debug / -v still sees it


def test_recording_without_frames_leaves_no_file(tmp_path):
    """Issue 21.2: a recorder closed before its first frame removes the empty mp4 (and the CLI says
    "nothing was written" instead of "wrote")."""
    path = tmp_path / "none.mp4"
    rec = Mp4Recorder(path)
    rec.open(224, 224, FPS, RATE)
    rec.close()
    assert rec.frames_written == 0 and not path.exists()
    kept = _record(tmp_path / "one.mp4", n=1)
    assert kept.frames_written == 1 and (tmp_path / "one.mp4").is_file()
