"""Virtual microphone: the avatar's voice as a microphone a call app can pick, in step with its lips.

Why: in a call the app takes the voice straight from the real microphone while the lips reach the
virtual camera a model look-ahead plus a render later, so the voice leads the lips by hundreds of
milliseconds. Each emitted frame already carries its own 40 ms of audio (the FrameSink contract); this
sink plays exactly that slot on an output device when the frame is released, so the virtual
microphone and the virtual camera carry the same instant.

Timing: the slots go through a `PlayoutBuffer` (stream/playout.py), so a slot starts playing a constant
time after its frame was released: a small fixed pre-roll plus the device's own output latency. That
sum is `playout_delay_s`; the session delays the virtual camera by the same amount (stream/delay.py),
so both arrive together. Underruns play silence and stalls drop the oldest audio, both counted, and
neither changes the offset.

Devices: `vmic.device` names one explicitly (index or part of the name). Otherwise, on Linux, a
PulseAudio (or PipeWire's pulse layer) null sink is created for the run, with a remapped source that
call apps list as "pcavs-live microphone"; exactly the modules we loaded are unloaded on close. On
Windows the VB-CABLE input ("CABLE Input") and on macOS BlackHole are looked up by name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from pcavs_live.common.audio_devices import (AudioDevice, AudioDevicesUnavailable, import_sounddevice,
                                             list_audio_devices)
from pcavs_live.common.errors import UserError
from pcavs.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from stream.playout import PlayoutBuffer

log = logging.getLogger(__name__)

PULSE_SINK_NAME = "pcavs_live_mic"                   # the null sink we play into
PULSE_SOURCE_NAME = "pcavs_live_microphone"          # its monitor, remapped into a plain microphone
MIC_DESCRIPTION = "pcavs-live microphone"            # what call apps list
SINK_DESCRIPTION = "pcavs-live microphone (playback)"
WINDOWS_CABLE = "CABLE Input"
MAC_BLACKHOLE = "BlackHole"
BLOCK_MS = 10                                        # device callback period


class VirtualMicError(UserError):
    """No usable virtual microphone; the message says what to install or choose."""


# ---------------------------------------------------------------------------- device back end
class OutputStreamLike(Protocol):
    @property
    def active(self) -> bool: ...
    @property
    def latency(self) -> float: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


FillCallback = Callable[[np.ndarray], None]  # fills the (frames, channels) float32 block in place


class OutputBackend(Protocol):
    """What VirtualMicSink needs from an audio system; `SoundDeviceOutput` is the real one."""

    def output_devices(self) -> list[AudioDevice]: ...
    def supports(self, index: int, rate: int, channels: int) -> bool: ...
    def open_output(self, index: int, rate: int, channels: int, blocksize: int, fill: FillCallback,
                    pulse_sink: str | None = None) -> OutputStreamLike: ...


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _pulse_sink_env(sink: str | None) -> Iterator[None]:
    """PortAudio reaches PulseAudio through ALSA's "pulse" device, which plays into the server's default
    sink unless PULSE_SINK names another when the stream is opened; set it for that call only."""
    if sink is None:
        yield
        return
    with _ENV_LOCK:
        previous = os.environ.get("PULSE_SINK")
        os.environ["PULSE_SINK"] = sink
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("PULSE_SINK", None)
            else:
                os.environ["PULSE_SINK"] = previous


class SoundDeviceOutput:
    """PortAudio through sounddevice."""

    def __init__(self) -> None:
        try:
            self._sd = import_sounddevice()
        except AudioDevicesUnavailable:  # libportaudio2 missing
            raise VirtualMicError("cannot load PortAudio for the virtual microphone",
                                  hint="install it (apt install libportaudio2)") from None

    def output_devices(self) -> list[AudioDevice]:
        try:
            return list_audio_devices(self._sd, "output")
        except AudioDevicesUnavailable as exc:
            raise VirtualMicError(f"cannot list audio output devices ({exc})") from None

    def supports(self, index: int, rate: int, channels: int) -> bool:
        try:
            self._sd.check_output_settings(device=index, samplerate=rate, channels=channels, dtype="float32")
        except Exception:
            return False
        return True

    def open_output(self, index: int, rate: int, channels: int, blocksize: int, fill: FillCallback,
                    pulse_sink: str | None = None) -> OutputStreamLike:
        measured = _MeasuredLatency()

        def _cb(outdata, frames, time_info, status) -> None:  # PortAudio's thread
            fill(outdata)
            measured.update(time_info.outputBufferDacTime - time_info.currentTime)

        with _pulse_sink_env(pulse_sink):
            stream = self._sd.OutputStream(device=index, samplerate=rate, channels=channels, dtype="float32",
                                           blocksize=blocksize, latency="low", callback=_cb)
        measured.nominal = float(stream.latency)
        return _MeasuredStream(stream, measured)


class _MeasuredLatency:
    """The time from a callback to its first sample leaving the device, as PortAudio measures it per
    callback (through ALSA's pulse plugin this includes the server's buffer, which the nominal latency
    PortAudio was asked for does not), smoothed. Written by the callback, read by the writer: one float."""

    def __init__(self) -> None:
        self.nominal = 0.0
        self.smoothed: float | None = None

    def update(self, delay_s: float) -> None:
        if 0.0 < delay_s < 1.0:  # host APIs without timing report 0
            self.smoothed = delay_s if self.smoothed is None else self.smoothed + 0.02 * (delay_s - self.smoothed)

    @property
    def value(self) -> float:
        return self.nominal if self.smoothed is None else self.smoothed


class _MeasuredStream:
    """A sounddevice stream whose `latency` is the measured one."""

    def __init__(self, stream, measured: _MeasuredLatency) -> None:
        self._stream, self._measured = stream, measured

    @property
    def active(self) -> bool:
        return bool(self._stream.active)

    @property
    def latency(self) -> float:
        return self._measured.value

    def start(self) -> None:
        self._stream.start()

    def stop(self) -> None:
        self._stream.stop()

    def close(self) -> None:
        self._stream.close()


# ---------------------------------------------------------------------------- PulseAudio devices
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(args: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(args), capture_output=True, text=True, timeout=10)


class PulseVirtualMic:
    """The null sink + remapped source that make a microphone out of what we play, in a PulseAudio
    (or PipeWire-pulse) server. Modules that already exist (left by another run, or made by the user)
    are used as they are and left alone; `release` unloads exactly the ones `ensure` loaded."""

    def __init__(self, runner: Runner = _run) -> None:
        self._run = runner
        self.loaded: list[int] = []

    def available(self) -> bool:
        if shutil.which("pactl") is None:
            return False
        try:
            return self._run(["pactl", "info"]).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _names(self, kind: str) -> set[str]:
        r = self._run(["pactl", "list", "short", kind])
        if r.returncode != 0:
            raise VirtualMicError(f"pactl list {kind} failed: {' '.join((r.stderr or r.stdout).split())}")
        return {line.split("\t")[1] for line in r.stdout.splitlines() if line.count("\t") >= 1}

    def _load(self, *args: str) -> None:
        r = self._run(["pactl", "load-module", *args])
        if r.returncode != 0 or not r.stdout.strip().isdigit():
            reason = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
            raise VirtualMicError(f"cannot create the virtual microphone (pactl load-module {args[0]}: {reason})",
                                  hint="check that PulseAudio or pipewire-pulse is running (pactl info)")
        self.loaded.append(int(r.stdout.strip()))

    def ensure(self) -> None:
        """Create whatever of the two is missing. Properties are quoted as a whole ('key="v a l"'):
        PulseAudio's module arguments end an unquoted value at the first space."""
        try:
            if PULSE_SINK_NAME not in self._names("sinks"):
                self._load("module-null-sink", f"sink_name={PULSE_SINK_NAME}",
                           f"sink_properties='device.description=\"{SINK_DESCRIPTION}\"'")
            if PULSE_SOURCE_NAME not in self._names("sources"):
                self._load("module-remap-source", f"master={PULSE_SINK_NAME}.monitor",
                           f"source_name={PULSE_SOURCE_NAME}",
                           f"source_properties='device.description=\"{MIC_DESCRIPTION}\"'")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        loaded, self.loaded = self.loaded, []
        for module in reversed(loaded):
            try:
                r = self._run(["pactl", "unload-module", str(module)])
                if r.returncode != 0:
                    log.warning("could not unload PulseAudio module %d: %s", module, " ".join(r.stderr.split()))
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("could not unload PulseAudio module %d: %s", module, exc)


# ---------------------------------------------------------------------------- choosing the device
def _match(devices: Sequence[AudioDevice], wanted: str) -> AudioDevice | None:
    text = wanted.strip()
    if text.isdigit():
        return next((d for d in devices if d.index == int(text)), None)
    exact = [d for d in devices if d.name.lower() == text.lower()]
    partial = [d for d in devices if text.lower() in d.name.lower()]
    return (exact or partial or [None])[0]


def _listing(devices: Sequence[AudioDevice]) -> str:
    return "; ".join(d.label() for d in devices) or "none"


@dataclass(frozen=True)
class MicTarget:
    device: AudioDevice
    pulse_sink: str | None   # the PulseAudio sink PortAudio's "pulse" device must play into, if any
    pick: str                # what the user selects as the microphone in the call app


def find_target(backend: OutputBackend, wanted: str | None, system: str, pulse: PulseVirtualMic) -> MicTarget:
    """The output device to play into (creating the PulseAudio one when needed; see the module doc)."""
    devices = backend.output_devices()
    if wanted and wanted.strip():
        device = _match(devices, wanted)
        if device is None:
            raise VirtualMicError(f"audio output device '{wanted}' not found (vmic.device); "
                                  f"output devices: {_listing(devices)}")
        return MicTarget(device, None, "the input side of that device")
    if system == "Windows":
        device = _match(devices, WINDOWS_CABLE)
        if device is None:
            raise VirtualMicError("no virtual microphone: VB-CABLE's 'CABLE Input' device was not found",
                                  hint="install VB-CABLE (https://vb-audio.com/Cable/), then pick "
                                       "'CABLE Output' as the microphone in the call app")
        return MicTarget(device, None, "CABLE Output")
    if system == "Darwin":
        device = _match(devices, MAC_BLACKHOLE)
        if device is None:
            raise VirtualMicError("no virtual microphone: no BlackHole audio device was found",
                                  hint="install BlackHole (brew install blackhole-2ch), then pick "
                                       "'BlackHole 2ch' as the microphone in the call app")
        return MicTarget(device, None, device.name)
    if system == "Linux":
        if not pulse.available():
            raise VirtualMicError("no virtual microphone: needs a PulseAudio server (or PipeWire's pulse "
                                  "layer) reachable with pactl",
                                  hint="install pulseaudio-utils and run PulseAudio or pipewire-pulse, or set "
                                       "vmic.device to an output device")
        device = _match(devices, "pulse")
        if device is None:
            raise VirtualMicError(f"PortAudio lists no 'pulse' output device (output devices: {_listing(devices)})",
                                  hint="install ALSA's PulseAudio plugin (apt install libasound2-plugins)")
        pulse.ensure()
        return MicTarget(device, PULSE_SINK_NAME, MIC_DESCRIPTION)
    raise VirtualMicError(f"no virtual microphone support on {system}", hint="set vmic.device to an output device")


# ---------------------------------------------------------------------------- the sink
class VirtualMicSink:
    """FrameSink playing each frame's own audio slot on a virtual microphone; the picture is ignored.

    `device`: "" finds or creates the platform's virtual microphone; otherwise an output device index or
    part of its name. `preroll_ms`: the constant audio-after-frame delay that absorbs release jitter.
    `max_buffer_ms`: the queue bound (a stalled device loses audio beyond it).
    """

    def __init__(self, device: str | None = None, preroll_ms: float = 40.0, max_buffer_ms: float = 1000.0,
                 tolerance_ms: float = 10.0, backend: OutputBackend | None = None,
                 pulse: PulseVirtualMic | None = None, system: str | None = None) -> None:
        if preroll_ms < 0 or max_buffer_ms <= preroll_ms + 1000 * SAMPLES_PER_FRAME / SAMPLE_RATE:
            raise ValueError("VirtualMicSink: need 0 <= preroll_ms and max_buffer_ms > preroll_ms + one slot")
        self.device_setting = device
        self.preroll_ms, self.max_buffer_ms, self.tolerance_ms = preroll_ms, max_buffer_ms, tolerance_ms
        self._backend = backend
        self._pulse = pulse or PulseVirtualMic()
        self._system = system or platform.system()
        self._stream: OutputStreamLike | None = None
        self._resampler = None
        self.buffer: PlayoutBuffer | None = None
        self.target: MicTarget | None = None
        self.rate = SAMPLE_RATE
        self.channels = 1
        self._next_index: int | None = None

    # ------------------------------------------------------------------ FrameSink
    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        backend = self._backend or SoundDeviceOutput()
        self.target = find_target(backend, self.device_setting, self._system, self._pulse)
        try:
            self._start(backend, sample_rate)
        except BaseException:  # also Ctrl-C while waiting for the device: leave no module behind
            self.close()
            raise
        log.info("virtual microphone on %s at %d Hz (output latency %.0f ms + pre-roll %.0f ms): pick "
                 "'%s' as the microphone in the call app", self.target.device.name, self.rate,
                 self.output_latency_s * 1000, self.preroll_ms, self.target.pick)

    def _start(self, backend: OutputBackend, sample_rate: int) -> None:
        dev = self.target.device  # type: ignore[union-attr]
        rates = [sample_rate] + ([int(dev.default_rate)] if int(dev.default_rate) != sample_rate else [])
        fmt = next(((r, c) for c in (1, 2) if c <= max(1, dev.max_channels) for r in rates
                    if backend.supports(dev.index, r, c)), None)
        if fmt is None:
            raise VirtualMicError(f"audio output device '{dev.name}' takes neither {sample_rate} Hz nor "
                                  f"{dev.default_rate:g} Hz float32 audio", hint="set vmic.device to another one")
        self.rate, self.channels = fmt
        if self.rate != sample_rate:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, self.rate, 1, dtype="float32", quality="HQ")
        per_ms = self.rate / 1000
        self.buffer = PlayoutBuffer(capacity=round(self.max_buffer_ms * per_ms),
                                    preroll=round(self.preroll_ms * per_ms),
                                    tolerance=round(self.tolerance_ms * per_ms))
        buffer = self.buffer

        def fill(out: np.ndarray) -> None:
            out[:] = buffer.pull(len(out))[:, None]

        try:
            stream = backend.open_output(dev.index, self.rate, self.channels, round(BLOCK_MS * per_ms), fill,
                                         pulse_sink=self.target.pulse_sink)  # type: ignore[union-attr]
            stream.start()
        except VirtualMicError:
            raise
        except Exception as exc:  # sounddevice.PortAudioError and friends
            raise VirtualMicError(f"cannot open audio output device '{dev.name}' for the virtual microphone: "
                                  f"{' '.join(str(exc).split())}") from None
        self._stream = stream
        self._next_index = None
        self._wait_until_flowing(buffer)

    def _wait_until_flowing(self, buffer: PlayoutBuffer, timeout_s: float = 2.5, window_s: float = 0.2) -> None:
        """Return once the device takes audio at its real rate. A PulseAudio null sink that nobody
        records from renders in blocks of up to two seconds and pulls nothing in between; slots played
        into such a pause would only be dropped. Gives up (and carries on) after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        start_t, start_n = time.monotonic(), buffer.pulled_samples
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now, pulled = time.monotonic(), buffer.pulled_samples
            if now - start_t >= window_s:
                if pulled - start_n >= 0.75 * (now - start_t) * self.rate:
                    return
                start_t, start_n = now, pulled
        log.info("virtual microphone '%s' is not taking audio at its rate yet (no call app listening?); "
                 "audio it cannot take is dropped until it does", self.target.device.name if self.target else "?")

    @property
    def output_latency_s(self) -> float:
        """The device's own output latency as PortAudio measures it (0 before open)."""
        stream = self._stream
        return float(getattr(stream, "latency", 0.0) or 0.0) if stream is not None else 0.0

    @property
    def playout_delay_s(self) -> float:
        """How long after its frame's release a slot's audio leaves the device: pre-roll + output latency."""
        return self.preroll_ms / 1000 + self.output_latency_s

    @property
    def underruns(self) -> int:
        return 0 if self.buffer is None else self.buffer.underruns

    @property
    def dropped_samples(self) -> int:
        return 0 if self.buffer is None else self.buffer.dropped_samples

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        stream, buffer, target = self._stream, self.buffer, self.target
        if stream is None or buffer is None or target is None:
            raise VirtualMicError("VirtualMicSink.write called before open()")
        if not stream.active:
            raise VirtualMicError(f"the virtual microphone '{target.device.name}' stopped playing")
        x = np.asarray(audio, np.float32).reshape(-1)
        if self._next_index is not None and frame_index > self._next_index:  # a skipped slot is silence
            x = np.concatenate([np.zeros((frame_index - self._next_index) * len(x), np.float32), x])
        self._next_index = frame_index + 1
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        buffer.push(x)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        try:
            if stream is not None:
                try:
                    stream.stop()
                finally:
                    stream.close()
        finally:
            self._pulse.release()
        buffer = self.buffer
        if buffer is not None and (buffer.underruns or buffer.dropped_samples):
            log.info("virtual microphone: %d underruns (%.0f ms of silence), %.0f ms of audio dropped",
                     buffer.underruns, 1000 * buffer.silence_samples / self.rate,
                     1000 * buffer.dropped_samples / self.rate)


# ---------------------------------------------------------------------------- vcam without vmic
class VoiceLeadNotice:
    """Called once per emitted frame while a virtual camera runs without the virtual microphone: after
    `after_frames` frames, logs once how far the voice (straight from the microphone into the call) leads
    the lips, measured, and how to fix it."""

    def __init__(self, latency_ms: Callable[[], float | None], from_microphone: bool, after_frames: int = 50) -> None:
        self._latency_ms, self._mic, self._after = latency_ms, from_microphone, after_frames
        self.logged = False

    def __call__(self, frame_index: int) -> None:
        if self.logged or frame_index < self._after:
            return
        if not self._mic:
            log.warning("the call app does not hear the audio file that drives the avatar; add --out vmic "
                        "and pick '%s' as the call's microphone", MIC_DESCRIPTION)
            self.logged = True
            return
        latency = self._latency_ms()
        if latency is None:
            return
        # The live loop measures from each slot's own audio to its release: the model's look-ahead, the
        # render and the output budget are all inside it.
        log.warning("the call app takes your voice straight from the microphone, about %.0f ms ahead of the "
                    "lips on the virtual camera (measured: the model's look-ahead plus rendering); add "
                    "--out vmic and pick '%s' as the call's microphone to keep them in step",
                    latency, MIC_DESCRIPTION)
        self.logged = True
