"""capture/audio_sources.py: file sources, the microphone with a fake back end, and a real capture through
sounddevice → ALSA pulse plugin → a private PulseAudio server with a null sink (integration)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from capture.audio_sources import (NO_DEVICES_MESSAGE, AudioChunk, AudioDeviceError, FileAudioSource,
                                   InputDevice, MicrophoneSource, list_input_devices)
from pcavs.mel import AudioFileError, load_audio_16k


def _drain(source, max_chunks: int = 100_000, timeout: float = 2.0) -> list[AudioChunk]:
    chunks = []
    while not source.finished and len(chunks) < max_chunks:
        c = source.read(timeout)
        if c is None:
            break
        chunks.append(c)
    return chunks


def _peak_hz(x: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


# ---------------------------------------------------------------------------- file source
def test_file_source_fast_delivers_everything_in_order(speech_wav_path):
    wav = load_audio_16k(speech_wav_path)
    # A 2-block queue: the producer has to wait for the consumer, and must not drop anything.
    src = FileAudioSource(speech_wav_path, realtime=False, block_ms=20, max_queue_ms=40)
    assert src.sample_rate == 16000 and src.duration_s == pytest.approx(3.0)
    with src:
        chunks = _drain(src)
        assert src.finished
        assert src.read(0.01) is None
    assert src.dropped_blocks == 0
    starts = [c.start_sample for c in chunks]
    assert starts == list(range(0, len(wav), 320))
    assert all(c.samples.dtype == np.float32 and len(c.samples) == 320 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), wav)
    assert all(b.captured_at >= a.captured_at for a, b in zip(chunks, chunks[1:]))


def test_file_source_realtime_is_paced_and_stop_joins(speech_wav_path):
    clip = load_audio_16k(speech_wav_path)[:16000]               # 1 s
    src = FileAudioSource.from_samples(clip, realtime=True, block_ms=40)
    t_start = time.monotonic()
    src.start()
    chunks = _drain(src)
    elapsed = time.monotonic() - t_start
    assert src.finished and src.dropped_blocks == 0
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), clip)
    # Pacing: no block is released before its last sample "would have been captured".
    for c in chunks:
        end = c.start_sample + len(c.samples)
        assert c.captured_at >= t_start + end / 16000 - 0.002
    assert all(b.captured_at > a.captured_at for a, b in zip(chunks, chunks[1:]))
    assert elapsed >= 0.8
    src.stop()
    assert src._thread is not None and not src._thread.is_alive()
    src.stop()                                                    # idempotent


def test_file_source_stop_mid_stream_joins_thread():
    src = FileAudioSource.from_samples(np.zeros(16000 * 30, np.float32), realtime=True)
    src.start()
    assert src.read(1.0) is not None
    src.stop()
    assert not src._thread.is_alive()
    with pytest.raises(RuntimeError):
        src.start()


def test_file_source_resamples_44k1_stereo(tmp_path):
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    sine = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "sine44k.wav"
    soundfile.write(str(path), np.stack([sine, sine], axis=1), rate, subtype="PCM_16")
    src = FileAudioSource(path, realtime=False)
    with src:
        x = np.concatenate([c.samples for c in _drain(src)])
    assert x.dtype == np.float32
    assert abs(len(x) - 24000) <= 1
    assert abs(_peak_hz(x) - 440) < 1.0                           # bin spacing 0.67 Hz
    assert np.sqrt(np.mean(x[2000:-2000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_file_source_errors(tmp_path):
    with pytest.raises(AudioFileError, match="missing.wav"):
        FileAudioSource(tmp_path / "missing.wav", realtime=False)
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioFileError, match="junk.mp3"):
        FileAudioSource(junk, realtime=False)
    with pytest.raises(ValueError):
        FileAudioSource.from_samples(np.zeros(10, np.float32), realtime=False, block_ms=0)


# ---------------------------------------------------------------------------- microphone, fake back end
class FakeStream:
    def __init__(self) -> None:
        self.active = False
        self.closed = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Devices and supported (index, rate, channels) formats are given; the test drives the callback."""

    def __init__(self, devices: list[InputDevice], supported: set[tuple[int, int, int]],
                 default: int | None = None, fail_open: bool = False) -> None:
        self.devices = devices
        self.supported = supported
        self.default = default
        self.fail_open = fail_open
        self.opened: list[tuple[int, int, int, int]] = []
        self.callback = None
        self.stream: FakeStream | None = None

    def input_devices(self) -> list[InputDevice]:
        return list(self.devices)

    def default_input_index(self) -> int | None:
        return self.default

    def supports(self, index: int, rate: int, channels: int) -> bool:
        return (index, rate, channels) in self.supported

    def open_input(self, index, rate, channels, blocksize, callback):
        if self.fail_open:
            raise OSError("Device unavailable [PaErrorCode -9985]")
        self.opened.append((index, rate, channels, blocksize))
        self.callback = callback
        self.stream = FakeStream()
        return self.stream


DEVICES = [InputDevice(0, "Built-in Microphone", "ALSA", 2, 44100.0),
           InputDevice(3, "USB Headset Mic", "ALSA", 1, 48000.0),
           InputDevice(5, "pulse", "ALSA", 32, 44100.0)]


def _mono16k_backend(**kw) -> FakeBackend:
    return FakeBackend(DEVICES, {(d.index, 16000, 1) for d in DEVICES}, default=5, **kw)


def test_microphone_blocks_become_chunks():
    backend = _mono16k_backend()
    mic = MicrophoneSource(device="usb", block_ms=20, backend=backend)
    assert mic.device.index == 3 and (mic.capture_rate, mic.capture_channels) == (16000, 1)
    mic.start()
    mic.start()                                                   # idempotent
    assert backend.opened == [(3, 16000, 1, 320)] and backend.stream.active
    rng = np.random.default_rng(0)
    blocks = [rng.uniform(-1, 1, (320, 1)).astype(np.float32) for _ in range(5)]
    for b in blocks:
        backend.callback(b, False)
    backend.callback(blocks[0], True)                             # PortAudio reported an overflow
    chunks = [mic.read(0.5) for _ in range(6)]
    assert [c.start_sample for c in chunks] == [0, 320, 640, 960, 1280, 1600]
    for c, b in zip(chunks, blocks + [blocks[0]]):
        assert c.samples.dtype == np.float32 and c.samples.shape == (320,)
        np.testing.assert_array_equal(c.samples, b[:, 0])
    assert all(b.captured_at >= a.captured_at for a, b in zip(chunks, chunks[1:]))
    assert mic.overflows == 1 and mic.dropped_blocks == 0
    blocks[1][:] = 0                                              # the chunk must not alias PortAudio's buffer
    assert chunks[1].samples.any()
    assert mic.read(0.01) is None and not mic.finished
    mic.check_health()
    mic.stop()
    assert backend.stream.closed and not backend.stream.active and mic.finished
    mic.stop()
    with pytest.raises(RuntimeError):
        mic.start()


def test_microphone_drops_oldest_when_consumer_stalls():
    backend = _mono16k_backend()
    mic = MicrophoneSource(device=5, block_ms=20, max_queue_ms=100, backend=backend)   # holds 5 blocks
    mic.start()
    for i in range(12):
        backend.callback(np.full((320, 1), i / 100, np.float32), False)
    assert mic.dropped_blocks == 7
    chunks = [mic.read(0.1) for _ in range(5)]
    assert mic.read(0.01) is None
    # The newest five survive, and the timeline shows the gap instead of hiding it.
    assert [c.start_sample for c in chunks] == [320 * i for i in range(7, 12)]
    assert [float(c.samples[0]) for c in chunks] == pytest.approx([i / 100 for i in range(7, 12)])
    mic.stop()


def test_microphone_unknown_device_lists_devices():
    backend = _mono16k_backend()
    with pytest.raises(AudioDeviceError) as err:
        MicrophoneSource(device="Focusrite", backend=backend)
    msg = str(err.value)
    assert "Focusrite" in msg and "\n" not in msg
    for d in DEVICES:
        assert d.label() in msg
    with pytest.raises(AudioDeviceError, match=r"input device 4 not found.*USB Headset Mic"):
        MicrophoneSource(device="4", backend=backend)
    assert backend.opened == []


def test_microphone_device_selection():
    backend = _mono16k_backend()
    assert MicrophoneSource(backend=backend).device.index == 5                  # the back end's default
    assert MicrophoneSource(device=0, backend=backend).device.index == 0
    assert MicrophoneSource(device=" 3 ", backend=backend).device.index == 3
    assert MicrophoneSource(device="PULSE", backend=backend).device.index == 5  # exact, case-insensitive
    backend.default = None
    assert MicrophoneSource(backend=backend).device.index == 0                  # no default: first input
    assert list_input_devices(backend) == [d.label() for d in DEVICES]


def test_microphone_without_devices_gives_install_hint():
    with pytest.raises(AudioDeviceError) as err:
        MicrophoneSource(backend=FakeBackend([], set()))
    assert str(err.value) == NO_DEVICES_MESSAGE
    assert "libportaudio2" in NO_DEVICES_MESSAGE


def test_microphone_unusable_format_and_open_failure():
    with pytest.raises(AudioDeviceError, match="USB Headset Mic.*--audio-device"):
        MicrophoneSource(device=3, backend=FakeBackend(DEVICES, set()))
    mic = MicrophoneSource(device=3, backend=_mono16k_backend(fail_open=True))
    with pytest.raises(AudioDeviceError, match="cannot open audio input device 'USB Headset Mic'.*-9985"):
        mic.start()


def test_microphone_48k_stereo_device_is_mixed_and_resampled():
    dev = InputDevice(7, "Pro Interface", "ALSA", 2, 48000.0)
    backend = FakeBackend([dev], {(7, 48000, 2)})
    mic = MicrophoneSource(device="pro", block_ms=20, backend=backend)
    assert (mic.capture_rate, mic.capture_channels) == (48000, 2)
    mic.start()
    assert backend.opened == [(7, 48000, 2, 960)]
    t = np.arange(48000 * 2) / 48000                              # 2 s
    left = 0.6 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1).astype(np.float32)   # mono mix = left / 2
    for i in range(0, len(stereo), 960):
        backend.callback(stereo[i:i + 960], False)
    chunks = []
    while (c := mic.read(0.01)) is not None:
        chunks.append(c)
    mic.stop()
    x = np.concatenate([c.samples for c in chunks])
    starts = np.cumsum([0] + [len(c.samples) for c in chunks[:-1]])
    assert [c.start_sample for c in chunks] == starts.tolist()   # continuous 16 kHz timeline
    # The streaming resampler holds back a few ms; everything else arrives at 16 kHz.
    assert 32000 - 480 <= len(x) <= 32000
    steady = x[4000:-4000]
    assert abs(_peak_hz(steady) - 440) < 1.0
    assert np.sqrt(np.mean(steady ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.01)


# ---------------------------------------------------------------------------- real capture (PulseAudio)
def _pactl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module")
def pulse_server():
    """A private PulseAudio server (its own runtime dir, null sink 'vsink', default source its monitor),
    seen in-process by PortAudio through the ALSA pulse plugin. Works as root without --system: the
    server only warns. Yields the environment the pulse tools need."""
    if shutil.which("pulseaudio") is None or shutil.which("paplay") is None:
        pytest.skip("pulseaudio / paplay not installed (apt install pulseaudio pulseaudio-utils)")
    sd = pytest.importorskip("sounddevice", reason="sounddevice/PortAudio not importable")
    runtime = tempfile.mkdtemp(prefix="pcavs-pulse-")
    socket = Path(runtime) / "pulse" / "native"
    env_vars = {"XDG_RUNTIME_DIR": runtime, "HOME": runtime, "PULSE_SERVER": f"unix:{socket}"}
    env = {**os.environ, **env_vars}
    log = Path(runtime) / "pulseaudio.log"
    cmd = ["pulseaudio", "-D", "-n", "--exit-idle-time=-1", "--system=false", "--disallow-exit",
           f"--log-target=file:{log}", "--load=module-native-protocol-unix auth-anonymous=1",
           "--load=module-null-sink sink_name=vsink rate=44100"]
    mp = pytest.MonkeyPatch()
    started = False
    try:
        proc = subprocess.run(cmd, env={k: v for k, v in env.items() if k != "PULSE_SERVER"},
                              capture_output=True, text=True, timeout=20)
        deadline = time.monotonic() + 10
        while _pactl(env, "info").returncode != 0:
            if time.monotonic() > deadline:
                tail = log.read_text()[-600:] if log.exists() else ""
                pytest.fail(f"PulseAudio did not start (rc={proc.returncode}): {proc.stderr.strip()} {tail}")
            time.sleep(0.1)
        started = True
        assert _pactl(env, "set-default-source", "vsink.monitor").returncode == 0
        for k, v in env_vars.items():
            mp.setenv(k, v)
        sd._terminate()                 # PortAudio lists devices at initialisation: make it see the server
        sd._initialize()
        yield env
    finally:
        mp.undo()
        if started:
            subprocess.run(["pulseaudio", "-k"], env=env, capture_output=True, timeout=10)
        sd._terminate()
        sd._initialize()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.integration
def test_microphone_captures_speech_played_into_pulseaudio(pulse_server, speech_wav_path):
    """paplay → null sink → its monitor → ALSA "pulse" PCM → PortAudio → MicrophoneSource.

    Pass criterion: normalised cross-correlation with the played file > 0.5 at the best lag. The path is
    digital (16 k → 44.1 k sink → 16 k, two resamplers), so the capture is the speech, delayed: measured
    NCC 0.99 (0.999 on half-second pieces). Silence, noise or the wrong device give |NCC| ≈ 0 (for
    unrelated signals it is ~1/sqrt(N) over 48 000 samples), so 0.5 cannot pass by accident yet tolerates
    a lost block or resampler phase error. The null sink's monitor only delivers while something plays,
    so the capture starts with the speech; the lag is searched both ways."""
    wav = load_audio_16k(speech_wav_path)
    names = list_input_devices()
    assert any("pulse" in n for n in names), names
    mic = MicrophoneSource(device="pulse", block_ms=20)
    chunks: list[AudioChunk] = []
    with mic:
        player = subprocess.Popen(["paplay", "--device=vsink", str(speech_wav_path)], env=pulse_server,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline, tail_end = time.monotonic() + 15, None
            while time.monotonic() < deadline:
                c = mic.read(0.2)
                if c is not None:
                    chunks.append(c)
                if player.poll() is not None:        # keep 0.5 s more for the buffered end of the speech
                    tail_end = tail_end or time.monotonic() + 0.5
                    if time.monotonic() > tail_end:
                        break
            assert player.wait(timeout=10) == 0, player.stderr.read()
        finally:
            if player.poll() is None:
                player.kill()
                player.wait()
        mic.check_health()
    assert chunks, "no audio captured from PulseAudio"
    assert [c.start_sample for c in chunks] == np.cumsum([0] + [len(c.samples) for c in chunks[:-1]]).tolist()
    x = np.concatenate([c.samples for c in chunks]).astype(np.float64)
    assert len(x) >= 0.8 * len(wav)
    rms = np.sqrt(np.mean(x ** 2))
    assert rms > 0.02, f"capture RMS {rms:.4f}: silence (played speech has RMS {np.sqrt(np.mean(wav ** 2)):.3f})"
    ref = wav.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(x) + len(ref))))
    corr = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(ref, n)), n)   # corr[l]: x[l + i] · ref[i]
    lags = np.concatenate([np.arange(0, len(x)), np.arange(-len(ref) + 1, 0)])
    vals = np.concatenate([corr[:len(x)], corr[n - len(ref) + 1:]])
    lag = int(lags[np.argmax(np.abs(vals))])
    seg_x = x[max(0, lag):lag + len(ref)]
    seg_r = ref[max(0, -lag):max(0, -lag) + len(seg_x)]
    assert len(seg_x) >= 0.5 * len(ref), f"best lag {lag} leaves too little overlap"
    ncc = float(np.dot(seg_x, seg_r) / (np.linalg.norm(seg_x) * np.linalg.norm(seg_r)))
    print(f"pulse capture: {len(x)} samples, RMS {rms:.4f}, NCC {ncc:.4f} at lag {lag}")
    assert ncc > 0.5, f"capture does not match the played speech: NCC {ncc:.3f} at lag {lag}"
