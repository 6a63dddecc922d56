"""The virtual microphone: the playout buffer keeps a constant offset (pre-roll, underruns, stalls, clock
skew), the device is found or created per OS, PulseAudio modules are unloaded exactly, the delayed
camera, the vcam-without-vmic notice; and a real run through a private PulseAudio daemon in which a
click in the audio and a flash in the frames leave the virtual microphone and the virtual camera
together."""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pcavs.constants import MEL_ROWS_PER_FRAME
from pcavs_live.pipeline.timeline import CLIP_CENTRE
from stream.delay import DelayedSink
from stream.playout import PlayoutBuffer
from stream.vmic import (MIC_DESCRIPTION, PULSE_SINK_NAME, PULSE_SOURCE_NAME, AudioDevice, PulseVirtualMic,
                         VirtualMicError, VirtualMicSink, VoiceLeadNotice)
from tests.fakes import RecordingSink

SLOT = 640


# ------------------------------------------------------------------ PlayoutBuffer
def test_preroll_then_every_sample_in_order():
    buf = PlayoutBuffer(capacity=4000, preroll=320, tolerance=160)
    assert not buf.pull(160).any()                       # nothing pushed yet: silence, no underrun
    audio = np.arange(1, 3 * SLOT + 1, dtype=np.float32)
    for k in range(3):
        buf.push(audio[k * SLOT:(k + 1) * SLOT])
    out = np.concatenate([buf.pull(160) for _ in range((320 + 3 * SLOT) // 160)])
    np.testing.assert_array_equal(out[:320], 0)          # the pre-roll
    np.testing.assert_array_equal(out[320:], audio)
    assert buf.underruns == 0 and buf.dropped_samples == 0


def _delays(buf: PlayoutBuffer, slots: int, push_every: float, pull_every: float, block: int = 160,
            stall: tuple[int, float] | None = None, burst_every: int | None = None) -> list[int]:
    """Simulate pushes of one slot each `push_every` and pulls of `block` each `pull_every` (seconds of
    a shared clock). `stall` (k, s): the scheduler stops at slot k for s seconds, then releases the
    slots it owes at once, in order. `burst_every` (slots): rendering takes that long, so the
    scheduler's loop runs at its multiples T: it releases the slots that became due since the last loop
    at once (the last frame repeated), except the newest, which it renders and releases a render later.
    Returns, per slot, the samples
    played between its push and its first sample being played: the offset a listener would see. The
    pulls after the last push (which run out of audio) are not counted in `buf.underruns`."""
    def push_time(k: int) -> float:
        t = k * push_every
        if stall is not None and k >= stall[0]:
            t = max(t, stall[0] * push_every + stall[1])
        if burst_every is not None:  # in slots, so that the arithmetic is exact
            loop = -(-k // burst_every) * burst_every     # the first loop at or after slot k is due
            t = (loop + (burst_every if k == loop else 0)) * push_every
        return t

    events = [(push_time(k), 1, k) for k in range(slots)]
    n_pulls = int(slots * push_every / pull_every) + 50
    events += [(i * pull_every, 0, i) for i in range(n_pulls)]
    played = 0
    pushed_at: dict[int, int] = {}
    first_played: dict[int, int] = {}
    underruns = 0
    for t, kind, k in sorted(events):
        if kind == 1:
            buf.push(np.full(SLOT, k + 1, np.float32), now=t)
            pushed_at[k] = played
            underruns = buf.underruns
        else:
            block_out = buf.pull(block)
            for value in np.unique(block_out[block_out > 0]):
                first_played.setdefault(int(value) - 1, played + int(np.argmax(block_out == value)))
            played += block
    buf.underruns = underruns
    return [first_played[k] - pushed_at[k] for k in sorted(first_played)]


def test_offset_is_the_preroll_and_does_not_drift_with_equal_clocks():
    buf = PlayoutBuffer(capacity=16000, preroll=320, tolerance=160)
    delays = _delays(buf, slots=2000, push_every=0.04, pull_every=0.01)
    assert len(delays) == 2000
    assert set(delays) == {320}                          # every slot: exactly the pre-roll
    assert buf.underruns == 0 and buf.dropped_samples == 0


def test_a_stall_plays_silence_then_returns_to_the_same_offset():
    """The scheduler stalls 100 ms at slot 100, then releases slots 100-102 at once: silence while
    nothing comes, then the queue is 100 ms longer than the pre-roll until a window (twice the 140 ms
    gap) has shown it stays so, and the excess is dropped: back to exactly the pre-roll."""
    buf = PlayoutBuffer(capacity=16000, preroll=320, tolerance=160)
    delays = _delays(buf, slots=300, push_every=0.04, pull_every=0.01, stall=(100, 0.1))
    assert buf.underruns == 1 and buf.silence_samples > 0
    assert delays[:100] == [320] * 100
    assert delays[100:104] == [320, 320 + 640, 320 + 1280, 320 + 1600]   # the burst, then +100 ms
    assert max(delays[104:]) == 320 + 1600
    assert set(delays[100 + 10:]) == {320}               # restored within 0.4 s
    assert buf.dropped_samples == 1600


def test_slower_than_real_time_rendering_keeps_every_sample():
    """Rendering at 600 ms per frame: slots come in bursts of 15. The queue climbs within each burst
    and drains before the next: nothing dropped, the newest slot of each burst (the new frame) plays
    the pre-roll after its release, as in real time."""
    buf = PlayoutBuffer(capacity=32000, preroll=320, tolerance=160)
    delays = _delays(buf, slots=600, push_every=0.04, pull_every=0.01, burst_every=15)
    assert buf.dropped_samples == 0
    rendered = delays[15:-15:15]                          # slots 15, 30, ...: the loop's newest
    assert max(rendered) <= 320 + 160 and min(rendered) >= 0


def test_a_stalled_device_drops_the_oldest_and_returns_to_the_preroll():
    buf = PlayoutBuffer(capacity=3200, preroll=320, tolerance=160)
    for k in range(20):                                  # nobody pulls: 20 slots pushed
        buf.push(np.full(SLOT, k + 1, np.float32))
    assert buf.dropped_samples > 0
    assert buf.level <= buf.capacity
    out = buf.pull(buf.level)
    assert out[-1] == 20 and out[-SLOT] == 20 and out[-SLOT - 1] != 20   # the newest slot survived whole


# ------------------------------------------------------------------ the sink with a fake audio system
class FakeStream:
    def __init__(self, fill, blocksize: int, channels: int) -> None:
        self.fill, self.blocksize, self.channels = fill, blocksize, channels
        self.active = False
        self.closed = False
        self.latency = 0.015

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.closed = True

    def run(self, blocks: int) -> np.ndarray:
        """The device pulling `blocks` blocks; returns channel 0."""
        out = []
        for _ in range(blocks):
            block = np.full((self.blocksize, self.channels), np.nan, np.float32)
            self.fill(block)
            assert not np.isnan(block).any()
            out.append(block[:, 0].copy())
        return np.concatenate(out)


class FakeOutput:
    def __init__(self, devices: list[AudioDevice], supported: set[tuple[int, int, int]]) -> None:
        self.devices, self.supported = devices, supported
        self.streams: list[FakeStream] = []
        self.opened: list[dict] = []

    def output_devices(self):
        return list(self.devices)

    def supports(self, index, rate, channels):
        return (index, rate, channels) in self.supported

    def open_output(self, index, rate, channels, blocksize, fill, pulse_sink=None):
        self.opened.append(dict(index=index, rate=rate, channels=channels, pulse_sink=pulse_sink))
        stream = FakeStream(fill, blocksize, channels)
        self.streams.append(stream)
        return stream


class FakePactl:
    """pactl's answers for a server that holds `sinks`/`sources`; records every call."""

    def __init__(self, sinks=("alsa_output.pci",), sources=("alsa_input.pci",), fail_on: str | None = None):
        self.sinks, self.sources = list(sinks), list(sources)
        self.modules: dict[int, str] = {0: "module-native-protocol-unix"}
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, args):
        args = list(args)
        self.calls.append(args)
        ok = lambda out="": subprocess.CompletedProcess(args, 0, out, "")  # noqa: E731
        if args[1:] == ["info"]:
            return ok("Server Name: pulseaudio\n")
        if args[1:3] == ["list", "short"]:
            names = self.sinks if args[3] == "sinks" else self.sources
            return ok("".join(f"{i}\t{n}\tmodule\tfloat32le 1ch 16000Hz\tIDLE\n" for i, n in enumerate(names)))
        if args[1] == "load-module":
            if args[2] == self.fail_on:
                return subprocess.CompletedProcess(args, 1, "", "Failure: Module initialization failed\n")
            index = max(self.modules) + 1
            self.modules[index] = args[2]
            if args[2] == "module-null-sink":
                self.sinks.append(PULSE_SINK_NAME)
                self.sources.append(PULSE_SINK_NAME + ".monitor")
            else:
                self.sources.append(PULSE_SOURCE_NAME)
            return ok(f"{index}\n")
        if args[1] == "unload-module":
            self.modules.pop(int(args[2]))
            return ok()
        raise AssertionError(args)


PULSE = AudioDevice(0, "pulse", "ALSA", 32, 44100.0)
CABLE = AudioDevice(3, "CABLE Input (VB-Audio Virtual Cable)", "Windows WASAPI", 2, 48000.0)
HOLE = AudioDevice(2, "BlackHole 2ch", "Core Audio", 2, 48000.0)
SPEAKERS = AudioDevice(1, "Speakers", "MME", 2, 48000.0)


def _sink(devices, supported, system, pactl=None, **kw):
    backend = FakeOutput(devices, supported)
    pulse = PulseVirtualMic(runner=pactl or FakePactl())
    pulse.available = lambda: pactl is not None  # type: ignore[method-assign]
    return VirtualMicSink(backend=backend, pulse=pulse, system=system, **kw), backend


def _open_flowing(sink, backend):
    """open() waits until the device takes audio; run the fake device meanwhile, as PortAudio would."""
    done = threading.Event()

    def device():
        while not backend.streams and not done.is_set():
            time.sleep(0.001)
        while not done.is_set():
            if backend.streams and backend.streams[-1].active:
                backend.streams[-1].run(1)
            time.sleep(0.005)

    runner = threading.Thread(target=device, daemon=True)
    runner.start()
    try:
        sink.open(224, 224, 25, 16000)
    finally:
        done.set()
        runner.join()


def test_each_slot_plays_in_order_and_repeated_slots_keep_their_audio():
    pactl = FakePactl()
    sink, backend = _sink([PULSE], {(0, 16000, 1)}, "Linux", pactl, preroll_ms=20)
    _open_flowing(sink, backend)
    stream = backend.streams[0]
    assert backend.opened[0] == dict(index=0, rate=16000, channels=1, pulse_sink=PULSE_SINK_NAME)
    assert stream.blocksize == 160 and sink.playout_delay_s == pytest.approx(0.035)
    frame = np.zeros((4, 4, 3), np.uint8)
    slots = [np.full(SLOT, (k + 1) / 10, np.float32) for k in range(4)]
    for k, slot in enumerate(slots):                     # the same frame object for all: repeated slots
        sink.write(frame, slot, k)
    out = stream.run((320 + 4 * SLOT) // 160)
    np.testing.assert_array_equal(out[:320], 0)
    np.testing.assert_allclose(out[320:], np.concatenate(slots))
    sink.close()
    assert stream.closed and not stream.active
    assert sorted(pactl.modules.values()) == ["module-native-protocol-unix"]  # what we loaded is gone


def test_a_48k_stereo_device_gets_resampled_audio_on_both_channels():
    sink, backend = _sink([CABLE], {(3, 48000, 2)}, "Windows", preroll_ms=20)
    _open_flowing(sink, backend)
    assert (sink.rate, sink.channels) == (48000, 2)
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(25 * SLOT) / 16000)).astype(np.float32)
    for k in range(25):
        sink.write(None, tone[k * SLOT:(k + 1) * SLOT], k)
    stream = backend.streams[0]
    block = np.zeros((48000, 2), np.float32)
    stream.fill(block)
    assert np.array_equal(block[:, 0], block[:, 1])
    played = block[960 + 2000:960 + 40000, 0]            # past the pre-roll and the resampler's onset
    spectrum = np.abs(np.fft.rfft(played * np.hanning(len(played))))
    assert abs(np.argmax(spectrum) * 48000 / len(played) - 440) < 2
    assert np.sqrt(np.mean(played ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.03)
    sink.close()


@pytest.mark.parametrize("system, devices, expect", [
    ("Windows", [SPEAKERS], "VB-CABLE"),
    ("Darwin", [SPEAKERS], "BlackHole"),
])
def test_missing_virtual_cable_says_what_to_install(system, devices, expect):
    sink, _ = _sink(devices, set(), system)
    with pytest.raises(VirtualMicError) as info:
        sink.open(224, 224, 25, 16000)
    message = str(info.value) + " " + (info.value.hint or "")
    assert expect in message and "\n" not in message


def test_found_by_name_on_windows_and_macos():
    for system, device in (("Windows", CABLE), ("Darwin", HOLE)):
        sink, backend = _sink([SPEAKERS, device], {(device.index, 48000, 2)}, system)
        _open_flowing(sink, backend)
        assert backend.opened[0]["index"] == device.index and backend.opened[0]["pulse_sink"] is None
        sink.close()


def test_linux_without_a_pulse_server_is_one_line():
    sink, _ = _sink([PULSE], {(0, 16000, 1)}, "Linux", pactl=None)
    with pytest.raises(VirtualMicError) as info:
        sink.open(224, 224, 25, 16000)
    assert "PulseAudio" in str(info.value) and "pulseaudio-utils" in info.value.hint


def test_an_explicit_device_by_name_and_a_missing_one():
    sink, backend = _sink([SPEAKERS, CABLE], {(1, 48000, 2)}, "Linux", device="speak")
    _open_flowing(sink, backend)
    assert backend.opened[0]["index"] == 1
    sink.close()
    sink, _ = _sink([SPEAKERS], set(), "Linux", device="Loopback")
    with pytest.raises(VirtualMicError, match="'Loopback' not found.*1: Speakers"):
        sink.open(224, 224, 25, 16000)


def test_a_device_that_stops_is_reported_by_write():
    sink, backend = _sink([CABLE], {(3, 16000, 1)}, "Windows")
    _open_flowing(sink, backend)
    backend.streams[0].active = False
    with pytest.raises(VirtualMicError, match="stopped playing"):
        sink.write(None, np.zeros(SLOT, np.float32), 0)
    sink.close()


# ------------------------------------------------------------------ PulseAudio modules
def test_pulse_modules_loaded_only_when_missing_and_unloaded_exactly():
    pactl = FakePactl()
    pulse = PulseVirtualMic(runner=pactl)
    pulse.ensure()
    assert [pactl.modules[i] for i in pulse.loaded] == ["module-null-sink", "module-remap-source"]
    remap = next(c for c in pactl.calls if c[1:3] == ["load-module", "module-remap-source"])
    assert f"master={PULSE_SINK_NAME}.monitor" in remap
    assert f"source_properties='device.description=\"{MIC_DESCRIPTION}\"'" in remap
    loaded = list(pulse.loaded)
    pulse.release()
    assert [c[2] for c in pactl.calls if c[1] == "unload-module"] == [str(i) for i in reversed(loaded)]
    assert list(pactl.modules) == [0] and pulse.loaded == []

    # Left behind by an earlier run (or made by the user): used as it is, never unloaded by us.
    existing = FakePactl(sinks=("alsa_output.pci", PULSE_SINK_NAME), sources=(PULSE_SOURCE_NAME,))
    pulse = PulseVirtualMic(runner=existing)
    pulse.ensure()
    pulse.release()
    assert not any(c[1] in ("load-module", "unload-module") for c in existing.calls)


def test_a_failed_second_module_unloads_the_first():
    pactl = FakePactl(fail_on="module-remap-source")
    pulse = PulseVirtualMic(runner=pactl)
    with pytest.raises(VirtualMicError, match="module-remap-source.*initialization failed"):
        pulse.ensure()
    assert list(pactl.modules) == [0] and pulse.loaded == []


# ------------------------------------------------------------------ the delayed camera and the notice
def test_delayed_sink_forwards_in_order_after_the_delay():
    inner = RecordingSink()
    sink = DelayedSink(inner, lambda: 0.05)
    sink.open(4, 4, 25, 16000)
    written = {}
    for k in range(5):
        written[k] = time.monotonic()
        sink.write(None, None, k)
        time.sleep(0.01)
    time.sleep(0.2)
    sink.close()
    assert [k for k, _ in inner.got] == list(range(5)) and inner.closed
    for k, t in inner.got:
        assert t - written[k] >= 0.05


def test_delayed_sink_reports_the_wrapped_sinks_error_on_the_next_write():
    sink = DelayedSink(RecordingSink(fail_at=1), lambda: 0.0)
    sink.open(4, 4, 25, 16000)
    sink.write(None, None, 0)
    sink.write(None, None, 1)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="camera unplugged"):
        sink.write(None, None, 2)
    sink.close()


def test_vcam_without_vmic_logs_the_measured_lead_once(caplog):
    latency = {"v": None}
    notice = VoiceLeadNotice(lambda: latency["v"], from_microphone=True, after_frames=10)
    with caplog.at_level(logging.WARNING, logger="stream.vmic"):
        for k in range(30):
            if k == 20:
                latency["v"] = 380.0
            notice(k)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "about 380 ms ahead of the lips" in lines[0] and "--out vmic" in lines[0]


def test_run_live_accepts_out_vmic():
    from run_live import overrides_from_args, parse_args
    from pcavs_live.cli.config import load_config

    o = overrides_from_args(parse_args(["--out", "vcam", "--out", "vmic", "--size", "1280x720", "--framing", "fit"]))
    config = load_config(None, o)
    assert config.output.targets == ("vcam", "vmic")
    assert (config.output.size, config.output.framing) == ("1280x720", "fit")
    assert config.vmic.device is None and config.vmic.preroll_ms > 0


# ------------------------------------------------------------------ real run through PulseAudio
@pytest.fixture
def pulse_server(monkeypatch):
    """A private PulseAudio daemon (own runtime dir) with no virtual microphone yet; PortAudio is
    re-initialised to see it. Yields the environment for pactl/parec."""
    from tests.test_audio_sources import _read_pid, _wait_gone

    for tool in ("pulseaudio", "pactl", "parec"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt install pulseaudio pulseaudio-utils)")
    sd = pytest.importorskip("sounddevice", reason="sounddevice/PortAudio not available")
    base = Path(tempfile.mkdtemp(prefix="pa-"))
    env = dict(os.environ, HOME=str(base), XDG_RUNTIME_DIR=str(base), PULSE_RUNTIME_PATH=str(base / "pulse"),
               PULSE_STATE_PATH=str(base / "state"), PULSE_SERVER=f"unix:{base}/pulse/native")
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    subprocess.run(["pulseaudio", "-D", "--exit-idle-time=-1", "-n", "--load=module-native-protocol-unix",
                    "--load=module-null-sink sink_name=speakers", f"--log-target=file:{base}/pulse.log"],
                   env=env, capture_output=True, text=True, timeout=30)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail("PulseAudio did not start: " + (base / "pulse.log").read_text()[-500:]
                            if (base / "pulse.log").exists() else "no log")
            time.sleep(0.1)
        for key in ("PULSE_SERVER", "XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH"):
            monkeypatch.setenv(key, env[key])            # for pactl and libpulse inside this process
        sd._terminate()
        sd._initialize()
        yield env
    finally:
        pid = _read_pid(base / "pulse" / "pid")
        subprocess.run(["pulseaudio", "-k"], env=env, capture_output=True, timeout=30)
        if pid is not None and not _wait_gone(pid, 5.0):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 5.0)
        sd._terminate()
        sd._initialize()
        shutil.rmtree(base, ignore_errors=True)


CLICK_EVERY_S, FIRST_CLICK_S, RUN_S = 1.0, 4.0, 50.0
CLICK_AT = 40                       # samples into the slot; the click is 80 samples at 0.8


def _click_track() -> tuple[np.ndarray, list[int]]:
    audio = np.zeros(int(RUN_S * 16000), np.float32)
    slots = [int(round(s * 25)) for s in np.arange(FIRST_CLICK_S, RUN_S - 1.0, CLICK_EVERY_S)]
    for k in slots:
        audio[k * SLOT + CLICK_AT:k * SLOT + CLICK_AT + 80] = 0.8
    return audio, slots


def _has_click_at_slot_start(window: np.ndarray) -> bool:
    """window (80, 20) mel rows of one slot. A click 40 samples into slot k falls in rows 4k..4k+7
    (each row covers [160m-1120, 160m+160)); slot k's window is rows [4(k-2), 4(k-2)+20) (the model's
    trained timing, pcavs_live.pipeline.timeline), so the click is at window rows 8-15 for slot k, 4-11 for slot k+1
    and 12-19 for slot k-1. Silence is exactly 0, so 'loud' is '> 0'."""
    first = MEL_ROWS_PER_FRAME * CLIP_CENTRE
    return bool(window[:, first].max() > 0 and window[:, first + 4].max() > 0)


class MarkerRenderer:
    """Stand-in for the avatar: a white frame exactly for the slots whose audio starts with a click,
    black otherwise (decided from the mel window the scheduler hands over, as the real model would)."""

    def render(self, mel_windows, pose_codes=None, times=None) -> np.ndarray:
        mels = np.asarray(mel_windows)
        out = np.zeros((len(mels), 224, 224, 3), np.uint8)
        for i, window in enumerate(mels):
            if _has_click_at_slot_start(window[0]):
                out[i] = 255
        return out


def test_marker_rule_picks_exactly_the_click_slots():
    from pcavs.mel import FixedGain, StreamingMel
    from pcavs_live.pipeline.timeline import AudioTimeline

    audio, slots = _click_track()
    timeline = AudioTimeline(StreamingMel(FixedGain(1.0)), history_seconds=RUN_S + 1)
    for start in range(0, len(audio), 320):
        timeline.append(audio[start:start + 320], 0.0)
    timeline.finish()
    flagged = [k for k in range(timeline.frames_ready) if _has_click_at_slot_start(timeline.mel_window(k)[0])]
    assert flagged == slots


@pytest.fixture
def recording_camera(monkeypatch):
    """A pyvirtualcam backend that keeps (send time, mean brightness) of every frame it is sent, standing
    in for v4l2loopback (vcam.backend only accepts the real names) for the duration of the test."""
    from pyvirtualcam.camera import BACKENDS

    sent: list[tuple[float, float]] = []
    shape: list[tuple[int, int]] = []

    class Recording:
        def __init__(self, *, width, height, fps, fourcc, device, **kw):
            shape.append((width, height))

        def send(self, frame):
            sent.append((time.monotonic(), float(frame.mean())))

        def close(self):
            pass

        def device(self):
            return "/dev/recording0"

        def native_fourcc(self):
            return None

    monkeypatch.setitem(BACKENDS, "v4l2loopback", Recording)
    yield "v4l2loopback", sent, shape


def _modules(env) -> list[str]:
    out = subprocess.run(["pactl", "list", "short", "modules"], env=env, capture_output=True, text=True).stdout
    return [line.split("\t")[1] for line in out.splitlines()]


def _wait_for_source(env, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["pactl", "list", "short", "sources"], env=env, capture_output=True, text=True).stdout
        if any(line.split("\t")[1] == name for line in out.splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"source {name} did not appear")


@pytest.mark.integration
@pytest.mark.slow
def test_voice_and_lips_leave_vmic_and_vcam_together(pulse_server, recording_camera, tmp_path, caplog,
                                                   monkeypatch):
    """A real session (stand-in checkpoints, paste framing at 640x480) with --out vcam --out vmic: each
    click must be heard on "pcavs-live microphone" within 20 ms of its flash leaving the camera, at the
    start and at the end of the run alike.

    On a busy machine the scheduler, the device or the camera's delay thread can be late; each such
    disturbance is logged with its time by the sink that saw it (scheduler stalls show as gaps in the
    camera's send times), and the offset returns within the playout buffer's settling window (pinned by
    the tests above). Clicks right after a logged disturbance are reported separately; every other
    click must be within 20 ms. When fewer than half the clicks are undisturbed (a heavily loaded
    machine), there is too little to judge: the test skips and says so with the measured load."""
    import soundfile

    import stream.delay
    import stream.vmic
    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.session import RunOptions, SessionBuilder
    from tests.conftest import parity_weights_dir

    made: dict[str, list] = {"vmic": [], "delay": []}  # the session's sinks, to read their logs after

    class Mic(stream.vmic.VirtualMicSink):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made["vmic"].append(self)

    class Delayed(stream.delay.DelayedSink):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made["delay"].append(self)

    monkeypatch.setattr(stream.vmic, "VirtualMicSink", Mic)
    monkeypatch.setattr(stream.delay, "DelayedSink", Delayed)
    env = pulse_server
    name, sent, shape = recording_camera
    audio, slots = _click_track()
    wav = tmp_path / "clicks.wav"
    soundfile.write(wav, audio, 16000, subtype="FLOAT")
    before = _modules(env)
    config = load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)), "audio.source": str(wav),
                                "audio.gain": "none", "output.targets": ["vcam", "vmic"],
                                "vcam.backend": name})
    caplog.set_level(logging.INFO, logger="stream.vmic")
    load_before = os.getloadavg()[0]
    session = SessionBuilder(config, RunOptions(realtime=True, status_interval_s=0), renderer=MarkerRenderer())
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", session.build().run(threading.Event())))
    runner.start()
    chunks: list[tuple[float, int, bytes]] = []
    try:
        _wait_for_source(env, PULSE_SOURCE_NAME, 120)
        rec = subprocess.Popen(["parec", f"--device={PULSE_SOURCE_NAME}", "--raw", "--format=float32le",
                                "--rate=16000", "--channels=1", "--latency-msec=10"], env=env,
                               stdout=subprocess.PIPE)

        def read() -> None:
            while block := rec.stdout.read1(65536):  # type: ignore[union-attr]
                chunks.append((time.monotonic(), len(block) // 4, block))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        runner.join(RUN_S + 120)
        assert not runner.is_alive(), "session did not finish"
        rec.terminate()
        reader.join(10)
    finally:
        session.close()
        runner.join(10)
    after = _modules(env)
    assert after == before, "the modules we loaded were not all unloaded (or others were)"
    assert shape == [(640, 480)]
    (mic,), (cam,) = made["vmic"], made["delay"]
    assert mic.buffer is not None

    # Flash send times: frames clearly brighter than the rest.
    times = np.array([t for t, _ in sent])
    means = np.array([m for _, m in sent])
    bright = means > (means.min() + means.max()) / 2
    flashes = [sent[i][0] for i in np.flatnonzero(bright & ~np.r_[False, bright[:-1]])]
    # Logged disturbances, as (start, end) of the stretch they may affect.
    gaps = np.diff(times)
    windows = [(t - 0.05, t + 0.5 + 4 * g) for t, g in zip(times[1:], gaps) if g > 0.08]   # scheduler stalls
    windows += [(t - 0.1, t + 1.0) for t, _, _ in mic.buffer.events]                       # underruns, drops
    late_sends = [due + late for due, late in cam.late]                                    # camera thread late
    disturbed = lambda t: (any(a <= t <= b for a, b in windows)  # noqa: E731
                           or any(abs(t - s) < 0.002 for s in late_sends))
    # Click times: recording sample index → monotonic time, from the lower envelope of chunk arrivals
    # (a chunk arrives no earlier than its last sample was recorded) within 2 s around the click.
    data = np.frombuffer(b"".join(c[2] for c in chunks), np.float32)
    ends = np.cumsum([c[1] for c in chunks])
    arrivals = np.array([c[0] for c in chunks])
    loud = np.flatnonzero(np.abs(data) > 0.4)
    onsets = loud[np.r_[True, np.diff(loud) > 8000]] if len(loud) else loud
    clean: list[float] = []
    after_disturbance: list[float] = []
    for onset in onsets:
        j = int(np.searchsorted(ends, onset, side="right"))
        near = np.abs(arrivals - arrivals[min(j, len(arrivals) - 1)]) < 2.0
        heard = float(np.min(arrivals[near] - ends[near] / 16000)) + (onset - CLICK_AT) / 16000
        nearest = min(flashes, key=lambda t: abs(t - heard))
        if abs(nearest - heard) < 0.3:                   # a flash lost to a repeated slot has no partner
            (after_disturbance if disturbed(nearest) else clean).append(1000 * (heard - nearest))
    summary = result["summary"]
    assert summary.frames_out > 0 and len(onsets) > 0, "no frames or no clicks came out"
    if len(clean) < 0.5 * len(slots):
        # Not a verdict on the program: too much of the run was disturbed (each disturbance logged by
        # the sink that saw it) for the undisturbed offset to be measured. Say so with the load measured.
        load = os.getloadavg()
        pytest.skip(f"machine too busy to judge: {len(clean)} of {len(slots)} clicks undisturbed (need half); "
                    f"{len(windows)} disturbances, {len(late_sends)} late camera sends, {summary.frames_dropped} "
                    f"repeated frames; load average {load_before:.1f} before, {load[0]:.1f} after, on "
                    f"{os.cpu_count()} CPUs")
    third = max(1, len(clean) // 3)
    first, last = statistics.median(clean[:third]), statistics.median(clean[-third:])
    everything = clean + after_disturbance
    print(f"\nvmic→vcam offset (voice after lips), {len(clean)} clean clicks of {len(slots)}: "
          f"median {statistics.median(clean):+.1f} ms, max |offset| {max(map(abs, clean)):.1f} ms, "
          f"first third {first:+.1f} ms, last third {last:+.1f} ms (drift {last - first:+.1f} ms); "
          f"all {len(everything)} matched: median {statistics.median(everything):+.1f} ms; "
          f"{len(after_disturbance)} after a logged disturbance: {[round(float(o), 1) for o in after_disturbance]}; "
          f"frames {summary.frames_out} ({summary.frames_repeated} repeated), {len(windows)} disturbances, "
          f"{len(late_sends)} late camera sends; clean: {[round(float(o), 1) for o in clean]}")
    print("\n".join(r.getMessage() for r in caplog.records if r.name == "stream.vmic"))
    # A CPU-starved moment can still throw a single click off (seen: one of 33 at 75 ms while the
    # machine ran a soak beside the tests); the offset itself is what the median and the drift measure.
    within = sum(abs(o) <= 20.0 for o in clean)
    assert within >= 0.9 * len(clean), [round(float(o), 1) for o in clean]
    assert abs(statistics.median(everything)) <= 20.0
    assert abs(last - first) <= 15.0, [round(float(o), 1) for o in clean]  # 45 ms is the ITU detectability line


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_unloads_exactly_the_modules_the_run_loaded(pulse_server):
    """run_live.py --out vmic as a user runs it; Ctrl-C (SIGINT) once the microphone exists: a clean
    exit, and the PulseAudio server holds exactly the modules it had before."""
    import signal
    import sys

    from tests.conftest import REPO_ROOT, parity_weights_dir

    env = pulse_server
    weights = parity_weights_dir(0)
    before = _modules(env)
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "run_live.py"), "--checkpoints", str(weights),
                             "--out", "vmic", "-q"], cwd=REPO_ROOT, env=dict(os.environ),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_source(env, PULSE_SOURCE_NAME, 120)
        assert len(_modules(env)) == len(before) + 2
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert _modules(env) == before


@pytest.mark.slow
def test_vcam_without_vmic_warns_once_in_a_session(recording_camera, caplog, speech_wav_path):
    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.session import RunOptions, SessionBuilder
    from tests.conftest import parity_weights_dir

    name, sent, shape = recording_camera
    config = load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)), "output.targets": ["vcam"],
                                "vcam.backend": name, "audio.source": str(speech_wav_path)})
    caplog.set_level(logging.WARNING, logger="stream.vmic")
    with SessionBuilder(config, RunOptions(realtime=False, max_seconds=2.4, status_interval_s=0),
                        renderer=MarkerRenderer()).build() as session:
        session.run(threading.Event())
    warnings = [r.getMessage() for r in caplog.records if r.name == "stream.vmic"]
    assert len(warnings) == 1 and "--out vmic" in warnings[0]
    assert shape == [(640, 480)] and len(sent) == 60   # the call-sized picture by default
