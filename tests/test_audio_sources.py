"""Audio sources: file playback (fast and real-time), resampling, the microphone's device handling and
drop-oldest queue through a fake PortAudio, and a real capture through a PulseAudio null sink."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from capture.audio_sources import (NO_DEVICES_MESSAGE, AudioChunk, AudioDeviceError, FileAudioSource,
                                   AudioDevice, MicrophoneSource, list_input_devices)
from capture.audio_files import AudioFileError, load_audio_16k, read_audio_16k
from pcavs.mel import file_gain
import soundfile


def _drain(src, until_finished: bool = True, timeout_s: float = 30.0) -> list[AudioChunk]:
    """Read until the source is finished (or, with until_finished=False, until a read times out)."""
    chunks: list[AudioChunk] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunk = src.read(0.1)
        if chunk is not None:
            chunks.append(chunk)
        elif src.finished or not until_finished:
            return chunks
    raise AssertionError("source did not finish")


def _assert_contiguous(chunks: list[AudioChunk]) -> None:
    pos = 0
    for c in chunks:
        assert c.start_sample == pos and c.samples.dtype == np.float32 and c.samples.ndim == 1
        pos += len(c.samples)


def _dominant_hz(x: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


# ------------------------------------------------------------------ FileAudioSource
@pytest.fixture(scope="module")
def speech(speech_wav_path) -> np.ndarray:
    return load_audio_16k(speech_wav_path)


def test_file_source_fast_delivers_every_sample_in_order(speech_wav_path, speech) -> None:
    src = FileAudioSource(speech_wav_path, realtime=False, block_ms=20, max_queue_ms=100)
    with src:
        assert not src.finished
        time.sleep(0.2)                                  # producer must block on the 5-block queue
        assert src._worker.alive and src.dropped_blocks == 0
        chunks = _drain(src)
        assert src.finished and src.read(5.0) is None    # a finished source answers at once
    assert not src._worker.alive
    _assert_contiguous(chunks)
    assert all(len(c.samples) == 320 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), speech)
    captured = [c.captured_at for c in chunks]
    assert captured == sorted(captured)


def test_file_source_realtime_is_paced_by_the_audio_clock(speech_wav_path, speech) -> None:
    src = FileAudioSource(speech_wav_path, realtime=True, block_ms=40)
    t0 = time.monotonic()
    with src:
        chunks = _drain(src)
    _assert_contiguous(chunks)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), speech)
    assert src.finished and src.dropped_blocks == 0
    for c in chunks:  # no block becomes available before its last sample "was spoken"
        assert c.captured_at >= t0 + (c.start_sample + len(c.samples)) / 16000 - 0.005


def test_file_source_realtime_drops_oldest_when_the_consumer_stalls() -> None:
    audio = (np.arange(8000) / 8000).astype(np.float32)  # 0.5 s, values identify their position
    src = FileAudioSource.from_samples(audio, realtime=True, block_ms=20, max_queue_ms=100)
    with src:
        while not src._done.is_set():                    # consumer away until everything was produced
            time.sleep(0.05)
        chunks = _drain(src)
    assert src.dropped_blocks == 25 - 5
    assert [c.start_sample for c in chunks] == [320 * i for i in range(20, 25)]
    np.testing.assert_array_equal(chunks[0].samples, audio[6400:6720])


def test_file_source_stop_joins_a_blocked_producer_and_is_final(speech_wav_path) -> None:
    src = FileAudioSource(speech_wav_path, realtime=False, max_queue_ms=40)
    src.start()
    assert src.read(1.0) is not None
    time.sleep(0.1)
    src.stop()
    assert not src._worker.alive
    src.stop()                                           # idempotent
    with pytest.raises(RuntimeError):
        src.start()


def test_file_source_resamples_44k1_to_16k(tmp_path) -> None:
    import soundfile as sf

    t = np.arange(44100 * 2) / 44100
    path = tmp_path / "tone.wav"
    sf.write(str(path), (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100, subtype="PCM_16")
    src = FileAudioSource(path, realtime=False)
    with src:
        audio = np.concatenate([c.samples for c in _drain(src)])
    assert len(audio) == 32000
    assert abs(_dominant_hz(audio) - 440) <= 0.5
    expected = 0.4 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    np.testing.assert_allclose(audio[1000:-1000], expected[1000:-1000], atol=2e-3)


def test_compressed_audio_goes_through_pyav(tmp_path) -> None:
    """An m4a (AAC, 48 kHz stereo) takes the PyAV path: decoded, mixed to mono, resampled."""
    import av

    path = tmp_path / "tone.m4a"
    rate, seconds = 48000, 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    audio = load_audio_16k(path)
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 1024  # AAC priming/padding
    assert abs(_dominant_hz(audio) - 300) <= 1.0
    assert 0.15 < np.sqrt(np.mean(audio[2000:-2000] ** 2)) < 0.25   # 0.3/√2 ≈ 0.21


def test_file_source_missing_file_is_a_one_line_error(tmp_path) -> None:
    with pytest.raises(AudioFileError, match="nope.wav"):
        FileAudioSource(tmp_path / "nope.wav", realtime=True)


# ------------------------------------------------------------------ MicrophoneSource with a fake PortAudio
class FakeStream:
    def __init__(self, callback, blocksize: int, channels: int) -> None:
        self.callback, self.blocksize, self.channels = callback, blocksize, channels
        self.active = False
        self.closed = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.closed = True

    def feed(self, mono: np.ndarray, overflowed: bool = False) -> None:
        block = np.repeat(mono.astype(np.float32)[:, None], self.channels, axis=1)
        self.callback(block, overflowed)


class FakeBackend:
    def __init__(self, devices: list[AudioDevice], supported: set[tuple[int, int, int]],
                 default: int | None = None) -> None:
        self.devices, self.supported, self.default = devices, supported, default
        self.streams: list[FakeStream] = []

    def input_devices(self) -> list[AudioDevice]:
        return list(self.devices)

    def default_input_index(self) -> int | None:
        return self.default

    def supports(self, index: int, rate: int, channels: int) -> bool:
        return (index, rate, channels) in self.supported

    def open_input(self, index, rate, channels, blocksize, callback) -> FakeStream:
        stream = FakeStream(callback, blocksize, channels)
        self.streams.append(stream)
        return stream


BUILTIN = AudioDevice(0, "Built-in Audio Analog Stereo", "ALSA", 2, 48000.0)
HEADSET = AudioDevice(3, "USB Headset Mic", "ALSA", 1, 16000.0)


def _backend(**kw) -> FakeBackend:
    return FakeBackend([BUILTIN, HEADSET], {(3, 16000, 1), (0, 48000, 1), (0, 48000, 2)}, **kw)


def test_microphone_picks_device_by_name_index_or_default() -> None:
    assert MicrophoneSource("usb", backend=_backend()).device == HEADSET
    assert MicrophoneSource("3", backend=_backend()).device == HEADSET
    mic = MicrophoneSource(0, backend=_backend())
    assert mic.device == BUILTIN and (mic.capture_rate, mic.capture_channels) == (48000, 1)
    assert MicrophoneSource(None, backend=_backend(default=3)).device == HEADSET
    assert MicrophoneSource(None, backend=_backend(default=None)).device == BUILTIN
    assert list_input_devices(_backend()) == [
        "0: Built-in Audio Analog Stereo (ALSA, 2 ch, 48000 Hz)", "3: USB Headset Mic (ALSA, 1 ch, 16000 Hz)"]


@pytest.mark.parametrize("device", ["Blue Yeti", 7])
def test_missing_microphone_message_lists_the_devices(device) -> None:
    with pytest.raises(AudioDeviceError) as err:
        MicrophoneSource(device, backend=_backend())
    message = str(err.value)
    assert "\n" not in message and str(device) in message
    assert "0: Built-in Audio Analog Stereo" in message and "3: USB Headset Mic" in message


def test_no_input_devices_says_what_to_install() -> None:
    with pytest.raises(AudioDeviceError, match="no audio input devices found; install PortAudio"):
        MicrophoneSource(None, backend=FakeBackend([], set()))
    assert "apt install libportaudio2" in NO_DEVICES_MESSAGE


def test_microphone_queue_drops_oldest_and_counts() -> None:
    backend = _backend()
    with MicrophoneSource("usb", block_ms=20, max_queue_ms=100, backend=backend) as mic:
        stream = backend.streams[0]
        assert stream.active and stream.blocksize == 320
        for i in range(8):                               # nobody reads: 3 blocks too many
            stream.feed(np.full(320, i / 10, np.float32))
        assert mic.dropped_blocks == 3
        chunks = [mic.read(0.1) for _ in range(5)]
        assert mic.read(0.01) is None and not mic.finished
    assert [c.start_sample for c in chunks] == [320 * i for i in range(3, 8)]
    assert [float(c.samples[0]) for c in chunks] == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert stream.closed and not stream.active and mic.finished


def test_microphone_resamples_and_mixes_a_48k_stereo_device() -> None:
    backend = FakeBackend([BUILTIN], {(0, 48000, 2)})
    mic = MicrophoneSource(None, block_ms=20, backend=backend)
    assert (mic.capture_rate, mic.capture_channels) == (48000, 2)
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)).astype(np.float32)
    with mic:
        stream = backend.streams[0]
        assert stream.blocksize == 960
        for start in range(0, len(tone), 960):
            stream.feed(tone[start:start + 960])
        chunks = _drain(mic, until_finished=False, timeout_s=0.3)
    _assert_contiguous(chunks)
    audio = np.concatenate([c.samples for c in chunks])
    assert 16000 - 400 <= len(audio) <= 16000            # minus the resampler's look-ahead
    assert abs(_dominant_hz(audio) - 440) <= 1.0
    assert np.sqrt(np.mean(audio[2000:-2000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_microphone_health_check_and_open_errors() -> None:
    backend = _backend()
    mic = MicrophoneSource("usb", backend=backend)
    mic.start()
    mic.check_health()
    backend.streams[0].active = False                    # device unplugged
    with pytest.raises(AudioDeviceError, match="USB Headset Mic"):
        mic.check_health()
    mic.stop()
    mic.stop()

    class Refusing(FakeBackend):
        def open_input(self, *a, **k):
            raise OSError("Device unavailable [PaErrorCode -9985]")

    refusing = MicrophoneSource("usb", backend=Refusing([HEADSET], {(3, 16000, 1)}))
    with pytest.raises(AudioDeviceError, match="cannot open audio input device 'USB Headset Mic'"):
        refusing.start()


# ------------------------------------------------------------------ real capture through PulseAudio
def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def pulse_null_sink(monkeypatch):
    """A private PulseAudio daemon (own runtime dir, so it cannot disturb anyone else's) with a null
    sink whose monitor is the default source; PortAudio is re-initialised to see it."""
    for tool in ("pulseaudio", "pactl", "paplay"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt install pulseaudio pulseaudio-utils)")
    sd = pytest.importorskip("sounddevice", reason="sounddevice/PortAudio not available")
    base = Path(tempfile.mkdtemp(prefix="pa-"))         # short: unix socket paths are limited
    env = dict(os.environ, HOME=str(base), XDG_RUNTIME_DIR=str(base), PULSE_RUNTIME_PATH=str(base / "pulse"),
               PULSE_STATE_PATH=str(base / "state"), PULSE_SERVER=f"unix:{base}/pulse/native")
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    started = subprocess.run(
        ["pulseaudio", "-D", "--exit-idle-time=-1", "-n", "--load=module-native-protocol-unix",
         "--load=module-null-sink sink_name=vsink", f"--log-target=file:{base}/pulse.log"],
        env=env, capture_output=True, text=True, timeout=30)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                log = (base / "pulse.log").read_text() if (base / "pulse.log").exists() else started.stderr
                pytest.fail(f"PulseAudio did not start: {log.strip()[-500:]}")
            time.sleep(0.1)
        subprocess.run(["pactl", "set-default-source", "vsink.monitor"], env=env, check=True, timeout=10)
        monkeypatch.setenv("PULSE_SERVER", env["PULSE_SERVER"])  # read by ALSA's pulse plugin in-process
        sd._terminate()
        sd._initialize()
        yield env
    finally:
        pid = _read_pid(base / "pulse" / "pid")
        subprocess.run(["pulseaudio", "-k"], env=env, capture_output=True, timeout=30)
        if pid is not None and not _wait_gone(pid, 5.0):  # -k failed: stop our own daemon by its pid
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 5.0)
        sd._terminate()
        sd._initialize()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.integration
def test_microphone_captures_speech_played_into_pulseaudio(pulse_null_sink, speech_wav_path, speech) -> None:
    import scipy.signal

    devices = list_input_devices()
    assert any("pulse" in d for d in devices), devices
    with MicrophoneSource("pulse", block_ms=20) as mic:
        player = subprocess.Popen(["paplay", "--device=vsink", str(speech_wav_path)], env=pulse_null_sink)
        chunks: list[AudioChunk] = []
        stop_at = None
        while stop_at is None or time.monotonic() < stop_at:
            chunk = mic.read(0.1)
            if chunk is not None:
                chunks.append(chunk)
            if stop_at is None and player.poll() is not None:
                stop_at = time.monotonic() + 0.5         # the tail still in flight
            assert len(chunks) < 1000, "capture did not end"
        assert player.returncode == 0
        dropped = mic.dropped_blocks
    chunks += _drain(mic)                                # stopped: what is queued, then finished
    assert chunks and mic.finished
    if dropped == 0:
        _assert_contiguous(chunks)
    audio = np.concatenate([c.samples for c in chunks])
    assert len(audio) >= len(speech) * 0.95
    assert np.sqrt(np.mean(audio ** 2)) > 0.03          # speech.wav is 0.09 RMS; silence would be 0
    corr = scipy.signal.correlate(audio, speech, mode="full", method="fft")
    lag = int(np.argmax(corr)) - (len(speech) - 1)
    a, b = (audio[lag:], speech) if lag >= 0 else (audio, speech[-lag:])
    n = min(len(a), len(b))
    normalised = float(np.dot(a[:n], b[:n]) / (np.linalg.norm(a[:n]) * np.linalg.norm(b[:n])))
    assert normalised > 0.9, (lag, normalised)


# ------------------------------------------------------------------ non-finite samples (issue 21.1)
def _speech_with_bad_stretch(tmp_path, value: float, name: str = "bad.wav"):
    rng = np.random.default_rng(0)
    t = np.arange(3 * 16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
             + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    audio[16000:32000] = value                       # the middle second is NaN or inf
    path = tmp_path / name
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    return path, audio


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_samples_become_counted_silence(tmp_path, value) -> None:
    path, audio = _speech_with_bad_stretch(tmp_path, value)
    samples, count = read_audio_16k(path)
    assert count == 16000 and np.isfinite(samples).all()
    assert not samples[16000:32000].any()
    np.testing.assert_array_equal(samples[:16000], audio[:16000])
    source = FileAudioSource(path, realtime=False)
    assert source.nonfinite_samples == 16000 and np.isfinite(source.audio).all()
    finite_only = np.concatenate([audio[:16000], audio[32000:]])
    assert file_gain(source.audio, source.nonfinite_samples) == pytest.approx(file_gain(finite_only), rel=1e-5)


def test_all_nonfinite_file_is_one_line_error(tmp_path) -> None:
    path = tmp_path / "nan.wav"
    soundfile.write(path, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioFileError, match="nan.wav holds only non-finite samples"):
        FileAudioSource(path, realtime=False)


def test_microphone_nonfinite_block_becomes_silence() -> None:
    backend = _backend()
    with MicrophoneSource("usb", block_ms=20, backend=backend) as mic:
        block = np.full(320, 0.25, np.float32)
        block[10:20] = np.nan
        block[30] = np.inf
        backend.streams[0].feed(block)
        chunk = mic.read(0.5)
    assert chunk is not None and np.isfinite(chunk.samples).all()
    assert mic.nonfinite_samples == 11 and not chunk.samples[10:20].any() and chunk.samples[0] == 0.25


def test_session_renders_normal_frames_around_a_nonfinite_second(tmp_path) -> None:
    """Upstream's whole-file gain of a file with one NaN second was NaN: every mel window was bad and
    every frame a repeat. Now every window is finite, the audio before the bad second moves the mel
    windows, and the count reaches the stats."""
    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.session import RunOptions, SessionBuilder

    path, _ = _speech_with_bad_stretch(tmp_path, np.nan)
    windows: list[np.ndarray] = []

    class Recording:
        def render(self, mel_windows, pose_codes=None, times=None):
            windows.extend(np.asarray(mel_windows))
            return np.zeros((len(mel_windows), 224, 224, 3), np.uint8)

    config = load_config(None, {"audio.source": str(path), "output.targets": ["file"],
                                "output.file": str(tmp_path / "out.mp4"), "pose.source": "still"})
    builder = SessionBuilder(config, RunOptions(realtime=False, status_interval_s=0),
                             avatar=(Recording(), np.zeros((224, 224, 3), np.uint8)))
    with builder, builder.build() as session:
        summary = session.run()
        snap = session.metrics.snapshot()
    assert summary.frames_out == 75 and len(windows) == 75
    assert all(np.isfinite(w).all() for w in windows)
    before = np.stack(windows[5:20])                   # slots well before the bad second
    assert before.std(axis=0).max() > 0.01             # real, changing audio features
    assert snap["audio_nonfinite_samples"] == 16000
