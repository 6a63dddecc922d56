"""Audio sources: a live microphone and an audio/video file, both delivering 16 kHz mono float32 chunks.

The audio source is the clock of the live loop (pcavs_live/pipeline/scheduler.py): each chunk says where it lies
on the source's own sample timeline (`start_sample`) and when it became available (`captured_at`). A
source that has to drop audio (a consumer that fell behind) skips ahead in `start_sample` instead of
hiding the gap, so the timeline stays true and the scheduler can fill the hole with silence.

Queues are bounded (`pcavs_live.common.queues.DropOldestQueue`): the microphone and a real-time file drop their
*oldest* block when full (live audio must not build latency), a fast file blocks its producer until
the consumer catches up.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pcavs_live.common.audio_devices import (AudioDevice, AudioDevicesUnavailable, import_sounddevice,
                                             list_audio_devices)
from pcavs_live.common.errors import UserError
from pcavs_live.common.queues import DropOldestQueue
from pcavs_live.common.workers import Worker
from pcavs.constants import SAMPLE_RATE
from capture.audio_files import finite_audio, read_audio_16k, warn_nonfinite

NO_DEVICES_MESSAGE = ("no audio input devices found; install PortAudio (apt install libportaudio2) / "
                      "connect a microphone")


# ---------------------------------------------------------------------------- contract
@dataclass(frozen=True)
class AudioChunk:
    samples: np.ndarray   # float32 mono 16 kHz, [-1, 1]
    start_sample: int     # index of samples[0] on the source's own timeline (0 = first sample)
    captured_at: float    # time.monotonic() when the chunk's last sample became available


class AudioSource(Protocol):           # MicrophoneSource, FileAudioSource
    sample_rate: int                   # always 16000
    nonfinite_samples: int             # NaN/inf input samples delivered as silence (finite_audio)

    def start(self) -> None: ...
    def read(self, timeout: float) -> AudioChunk | None: ...   # None on timeout
    @property
    def finished(self) -> bool: ...    # True once a finite source is exhausted and drained
    def stop(self) -> None: ...        # idempotent; joins its thread


class AudioDeviceError(UserError):
    """The audio input the user asked for does not exist or cannot be opened (one-line message)."""


# ---------------------------------------------------------------------------- device back end
class InputStreamLike(Protocol):
    @property
    def active(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


BlockCallback = Callable[[np.ndarray, bool], None]   # (block (frames, channels) float32, overflowed)


class AudioBackend(Protocol):
    """What MicrophoneSource needs from an audio system; `SoundDeviceBackend` is the real one, tests
    inject a fake that drives the callback by hand."""

    def input_devices(self) -> list[AudioDevice]: ...
    def default_input_index(self) -> int | None: ...
    def supports(self, index: int, rate: int, channels: int) -> bool: ...
    def open_input(self, index: int, rate: int, channels: int, blocksize: int,
                   callback: BlockCallback) -> InputStreamLike: ...


class SoundDeviceBackend:
    """PortAudio through sounddevice. PortAudio reads its device list when it is initialised (at import);
    audio servers started later (e.g. PulseAudio) are only seen after re-initialising it."""

    def __init__(self) -> None:
        try:
            self._sd = import_sounddevice()
        except AudioDevicesUnavailable:  # libportaudio2 missing: sounddevice cannot load PortAudio at import
            raise AudioDeviceError(NO_DEVICES_MESSAGE) from None

    def input_devices(self) -> list[AudioDevice]:
        try:
            return list_audio_devices(self._sd, "input")
        except AudioDevicesUnavailable as exc:
            raise AudioDeviceError(f"{exc}; {NO_DEVICES_MESSAGE}") from None

    def default_input_index(self) -> int | None:
        try:
            index = self._sd.default.device[0]
            if index is None or index < 0:
                index = self._sd.query_hostapis(0)["default_input_device"]
        except Exception:  # no host API at all
            return None
        return int(index) if index is not None and index >= 0 else None

    def supports(self, index: int, rate: int, channels: int) -> bool:
        try:
            self._sd.check_input_settings(device=index, samplerate=rate, channels=channels, dtype="float32")
        except Exception:  # PortAudioError or ValueError: "invalid sample rate/channels" etc.
            return False
        return True

    def open_input(self, index: int, rate: int, channels: int, blocksize: int,
                   callback: BlockCallback) -> InputStreamLike:
        def _cb(indata, frames, time_info, status) -> None:  # PortAudio's thread
            callback(indata, bool(status.input_overflow))

        return self._sd.InputStream(device=index, samplerate=rate, channels=channels, dtype="float32",
                                    blocksize=blocksize, latency="low", callback=_cb)


def list_input_devices(backend: AudioBackend | None = None) -> list[str]:
    """Input devices as "index: name (host API, channels, default rate)" lines; either part can be
    passed as MicrophoneSource's `device` (the index, or a substring of the name)."""
    backend = backend or SoundDeviceBackend()
    return [d.label() for d in backend.input_devices()]


def _resolve_device(backend: AudioBackend, device: str | int | None) -> AudioDevice:
    devices = backend.input_devices()
    if not devices:
        raise AudioDeviceError(NO_DEVICES_MESSAGE)
    listing = "; ".join(d.label() for d in devices)
    if device is None:
        default = backend.default_input_index()
        return next((d for d in devices if d.index == default), devices[0])
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        index = int(device)
        match = next((d for d in devices if d.index == index), None)
        if match is None:
            raise AudioDeviceError(f"audio input device {index} not found; input devices: {listing}")
        return match
    wanted = str(device).strip().lower()
    exact = [d for d in devices if d.name.lower() == wanted]
    partial = [d for d in devices if wanted in d.name.lower()]
    if exact or partial:
        return (exact or partial)[0]
    raise AudioDeviceError(f"audio input device '{device}' not found; input devices: {listing}")


# ---------------------------------------------------------------------------- microphone
class MicrophoneSource:
    """Live capture from an input device, delivered as 16 kHz mono float32 blocks of `block_ms`.

    Captures at 16 kHz mono when the device supports it; otherwise at the device's default rate (and
    two channels if mono is refused), mixed to mono and resampled with a streaming soxr "HQ" resampler
    (≈1 ms extra latency). PortAudio calls back on its own thread; each block is put in a queue that
    holds at most `max_queue_ms` and drops its oldest block when full (`dropped_blocks`), so a stalled
    consumer costs audio, never latency. Dropped audio shows up as a jump in `start_sample`.

    No Python thread of its own: `stop()` stops and closes the PortAudio stream, which waits for the
    callback thread. `finished` is False while running (a microphone never runs out) and True once
    stopped and drained.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, device: str | int | None = None, block_ms: int = 20, max_queue_ms: int = 2000,
                 backend: AudioBackend | None = None) -> None:
        if block_ms <= 0 or max_queue_ms < block_ms:
            raise ValueError(f"MicrophoneSource: need 0 < block_ms <= max_queue_ms (got {block_ms}, "
                             f"{max_queue_ms})")
        self._backend = backend or SoundDeviceBackend()
        self.device = _resolve_device(self._backend, device)
        self.capture_rate, self.capture_channels = self._choose_format(self.device)
        self.block_ms = block_ms
        self._queue: DropOldestQueue[AudioChunk] = DropOldestQueue(max(1, round(max_queue_ms / block_ms)))
        self._stream: InputStreamLike | None = None
        self._resampler = None
        self._produced = 0
        self._overflows = 0
        self.nonfinite_samples = 0
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()

    def _choose_format(self, dev: AudioDevice) -> tuple[int, int]:
        rates = [SAMPLE_RATE] + ([int(dev.default_rate)] if int(dev.default_rate) != SAMPLE_RATE else [])
        channel_options = [1] + ([min(2, dev.max_channels)] if dev.max_channels > 1 else [])
        for channels in channel_options:
            for rate in rates:
                if self._backend.supports(dev.index, rate, channels):
                    return rate, channels
        raise AudioDeviceError(f"audio input device '{dev.name}' supports neither {SAMPLE_RATE} Hz nor "
                               f"{dev.default_rate:g} Hz float32 capture; pick another with --audio-device")

    @property
    def dropped_blocks(self) -> int:
        """Blocks thrown away because the queue was full (the consumer fell behind)."""
        return self._queue.dropped

    @property
    def overflows(self) -> int:
        """Callbacks in which PortAudio reported lost input (the callback itself was late)."""
        return self._overflows

    @property
    def finished(self) -> bool:
        return self._stopped and len(self._queue) == 0

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("MicrophoneSource cannot be restarted after stop(); create a new one")
            if self._started:
                return
            if self.capture_rate != SAMPLE_RATE:
                import soxr

                self._resampler = soxr.ResampleStream(self.capture_rate, SAMPLE_RATE, 1, dtype="float32",
                                                      quality="HQ")
            blocksize = max(1, round(self.capture_rate * self.block_ms / 1000))
            try:
                stream = self._backend.open_input(self.device.index, self.capture_rate, self.capture_channels,
                                                  blocksize, self._on_block)
                stream.start()
            except AudioDeviceError:
                raise
            except Exception as exc:  # sounddevice.PortAudioError and friends
                raise AudioDeviceError(f"cannot open audio input device '{self.device.name}': {exc}") from None
            self._stream = stream
            self._started = True

    def _on_block(self, block: np.ndarray, overflowed: bool) -> None:
        """PortAudio's callback thread: mix, resample, timestamp, enqueue. Must not block."""
        captured_at = time.monotonic()
        if overflowed:
            self._overflows += 1
        data = np.asarray(block, dtype=np.float32)
        if data.ndim == 2 and data.shape[1] > 1:
            mono = data.mean(axis=1, dtype=np.float32)
        else:
            mono = data.reshape(-1).copy()  # PortAudio reuses its buffer after the callback returns
        mono, bad = finite_audio(mono)  # before the resampler, whose filter would smear a NaN
        if bad:
            if not self.nonfinite_samples:
                warn_nonfinite(bad, f"audio input '{self.device.name}'")
            self.nonfinite_samples += bad
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        if len(mono) == 0:
            return
        chunk = AudioChunk(np.ascontiguousarray(mono, dtype=np.float32), self._produced, captured_at)
        self._produced += len(mono)
        self._queue.put(chunk)

    def read(self, timeout: float) -> AudioChunk | None:
        return self._queue.get(timeout)

    def check_health(self) -> None:
        """Raise AudioDeviceError if the stream died under us (device unplugged, server gone); meant for
        the scheduler's health checks."""
        stream = self._stream
        if self._started and not self._stopped and stream is not None and not stream.active:
            raise AudioDeviceError(f"audio input device '{self.device.name}' stopped delivering audio")

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            stream, self._stream = self._stream, None
        try:
            if stream is not None:
                try:
                    stream.stop()  # waits for the callback thread to finish
                finally:
                    stream.close()
        finally:
            self._queue.close()  # no more blocks: readers drain what is queued, then get None

    def __enter__(self) -> "MicrophoneSource":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------- file
class FileAudioSource:
    """An audio (or video) file as a source, decoded once up front with `load_audio_16k`.

    `realtime=True` plays it like a microphone: block i is released when its last sample "would have
    been captured" (origin + end sample / 16 kHz on the monotonic clock, an absolute schedule, so
    late wake-ups never accumulate into a slow clock), and a consumer that falls behind loses the
    oldest blocks, as with a mic. `start_at` sets that origin (default: when `start` is called);
    `LoopedAudioSource` passes the instant the previous pass ended, so a loop seam loses no time.
    `realtime=False` delivers as fast as the consumer reads: the producer blocks on the bounded queue,
    nothing is dropped. `finished` becomes True after the last block has been read.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, path: str | Path | None, realtime: bool, block_ms: int = 20, max_queue_ms: int = 2000,
                 *, samples: np.ndarray | None = None, start_at: float | None = None) -> None:
        if block_ms <= 0 or max_queue_ms < block_ms:
            raise ValueError(f"FileAudioSource: need 0 < block_ms <= max_queue_ms (got {block_ms}, "
                             f"{max_queue_ms})")
        if samples is None:
            if path is None:
                raise ValueError("FileAudioSource needs a path or samples")
            samples, nonfinite = read_audio_16k(path)
        else:
            samples, nonfinite = finite_audio(samples)
        self.path = Path(path) if path is not None else None
        self.audio = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        self.nonfinite_samples = nonfinite   # replaced by silence when decoded; the gain sees only finite audio
        if nonfinite:
            warn_nonfinite(nonfinite, f"audio file {self.path}" if self.path is not None else "audio")
        self.realtime = realtime
        self.start_at = start_at
        self.block = max(1, round(SAMPLE_RATE * block_ms / 1000))
        self._queue: DropOldestQueue[AudioChunk] = DropOldestQueue(max(1, round(max_queue_ms / block_ms)))
        self._stop = threading.Event()
        self._done = threading.Event()
        self._worker: Worker | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_samples(cls, samples: np.ndarray, realtime: bool, block_ms: int = 20,
                     max_queue_ms: int = 2000, start_at: float | None = None) -> "FileAudioSource":
        """The same source over audio already in memory (16 kHz mono float32)."""
        return cls(None, realtime, block_ms, max_queue_ms, samples=samples, start_at=start_at)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def dropped_blocks(self) -> int:
        return self._queue.dropped

    @property
    def finished(self) -> bool:
        return self._done.is_set() and len(self._queue) == 0

    def start(self) -> None:
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("FileAudioSource cannot be restarted after stop(); create a new one")
            if self._worker is not None:
                return
            self._worker = Worker(self._produce, "file-audio", stopping=self._stop)
            self._worker.start()

    def _produce(self) -> None:
        try:
            t0 = time.monotonic() if self.start_at is None else self.start_at
            for start in range(0, len(self.audio), self.block):
                end = min(start + self.block, len(self.audio))
                if self.realtime:
                    # Its capture instant is the schedule's, not the wake-up's: a mic's block is
                    # captured on time even when its delivery is late, and downstream clocks
                    # (the scheduler's output pacing) should not inherit this thread's jitter.
                    captured_at = t0 + end / SAMPLE_RATE
                    if self._stop.wait(max(0.0, captured_at - time.monotonic())):
                        return
                else:
                    if self._stop.is_set():
                        return
                    captured_at = time.monotonic()
                chunk = AudioChunk(self.audio[start:end].copy(), start, captured_at)
                if self.realtime:
                    self._queue.put(chunk)
                elif not self._queue.put_wait(chunk):  # False once stop() closed the queue
                    return
        finally:
            self._done.set()
            self._queue.close()

    def read(self, timeout: float) -> AudioChunk | None:
        chunk = self._queue.get(timeout)
        if chunk is None and self._worker is not None:
            self._worker.check()         # the reader thread failed: say so instead of just ending
        return chunk

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            worker = self._worker
        self._queue.close()
        if worker is not None:
            worker.join()

    def __enter__(self) -> "FileAudioSource":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
