"""The PC-AVS audio front end: the exact upstream mel spectrogram, for whole files and incrementally.

Upstream (`config/AudioConfig.py`, spec §4) computes, for 16 kHz mono audio:

    wav · 0.1/max(1e-4, RMS(whole file))            loudness normalisation
    lws STFT: frame 1280, hop 160, FFT 1280, window sqrt(hann_offset)/2,
              1120 zeros in front, end zero-padded to a multiple of 160 plus 1120 zeros,
              ceil(len/160) + 7 frames; magnitude
    Slaney mel basis (80 × 641, 125–7600 Hz) · |X|
    20·log10(max(1e-5, mel)) − 20,  clip((S + 100)/100, 0, 1)  →  float32 (T, 80)

The STFT is re-implemented here in numpy (lws is only the test oracle) because lws can only transform a
whole signal, while the live path needs rows as soon as their audio exists: row m covers samples
[160m − 1120, 160m + 160), so it is complete once 160(m+1) samples have arrived, and window k (rows
[4k, 4k+20), upstream's output frame k) is complete at sample 160(4k + 20). Which window a displayed slot
uses is `pcavs_live.pipeline.timeline`'s business (by default slot t shows window t−2: audio up to 40t+120 ms).

The one thing a live stream cannot reproduce is the whole-file RMS normalisation. `StreamingMel` takes
either a fixed gain (bit-for-bit the file-mode rows when it equals the file's gain) or a
`StreamingGain`, which estimates the level causally and gates silence; see its docstring for how it
differs from upstream.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from typing import Protocol

import numpy as np

from pcavs.constants import HOP, MEL_ROWS_PER_FRAME, N_MELS, SAMPLE_RATE, WINDOW_ROWS

# ---------------------------------------------------------------------------- STFT facts (spec §4)
FRAME_LENGTH = 1280             # STFT frame = FFT size (80 ms)
PAD_LEFT = FRAME_LENGTH - HOP   # 1120 zeros lws puts in front (and, after rounding up, at the end)
TAIL_ROWS = PAD_LEFT // HOP     # 7: rows that only exist once the end of the signal is known

FMIN, FMAX = 125.0, 7600.0
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
FILE_TARGET_RMS = 0.1           # upstream audio_normalize(desired_rms=0.1, eps=1e-4)
FILE_RMS_FLOOR = 1e-4
_MIN_LEVEL = np.exp(MIN_LEVEL_DB / 20 * np.log(10))  # 1e-5, computed exactly as upstream does
_BLOCK_ROWS = 2048              # file mode transforms this many rows at a time (bounded memory)


def samples_needed_for_frame(k: int) -> int:
    """Audio samples (from the start of the source) needed before window k — rows [4k, 4k+20), upstream's
    output frame k, which may be negative — can be rendered: its last row 4k+19 is complete at sample
    160·(4k+20), i.e. at 40k + 200 ms."""
    return HOP * (MEL_ROWS_PER_FRAME * k + WINDOW_ROWS)


def rows_available_to_frames(n_rows: int) -> int:
    """Number of output frames (0..n-1) whose whole 20-row window lies within the first `n_rows` rows."""
    if n_rows < WINDOW_ROWS:
        return 0
    return (n_rows - WINDOW_ROWS) // MEL_ROWS_PER_FRAME + 1


def rows_for_samples(n_samples: int) -> int:
    """Mel rows complete after `n_samples` samples of a still-running stream (row m needs 160(m+1))."""
    return max(0, n_samples) // HOP


def file_row_count(n_samples: int) -> int:
    """Rows of the whole-file mel: ceil(len/160) + 7, as lws frames it."""
    return -(-n_samples // HOP) + TAIL_ROWS


# ---------------------------------------------------------------------------- fixed transforms
@functools.lru_cache(maxsize=1)
def analysis_window() -> np.ndarray:
    """lws' analysis window for mode "speech": sqrt of the half-sample-offset Hann, divided by 2 (the
    perfect-reconstruction normalisation: Hann overlap-adds to 4 at hop N/8). float64, read-only."""
    n = np.arange(FRAME_LENGTH)
    hann_offset = 0.5 * (1.0 - np.cos(2.0 * np.pi * (2 * n + 1) / (2 * FRAME_LENGTH)))
    w = np.sqrt(hann_offset) / 2.0
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """The upstream Slaney mel basis (80 × 641, float32), straight from librosa: it *is* the definition,
    so it is not re-derived. Imported lazily because librosa is slow to import."""
    import librosa.filters

    basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=FRAME_LENGTH, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=1)
def _mel_basis_t64() -> np.ndarray:
    """(641, 80) float64: upstream's np.dot(float32 basis, float64 |X|) upcasts the basis the same way."""
    t = mel_basis().T.astype(np.float64)
    t.setflags(write=False)
    return t


def _frames_to_rows(frames: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
    """(n, 1280) float64 frames → (n, 80) float32 normalised mel rows; `gains` (n,) scale each row's
    magnitude (the STFT is linear, so this equals scaling that frame's samples)."""
    spec = np.abs(np.fft.rfft(frames * analysis_window(), axis=1))
    mel = spec @ _mel_basis_t64()
    if gains is not None:
        mel *= gains[:, None]
    s_db = 20.0 * np.log10(np.maximum(_MIN_LEVEL, mel)) - REF_LEVEL_DB
    return np.clip((s_db - MIN_LEVEL_DB) / -MIN_LEVEL_DB, 0.0, 1.0).astype(np.float32)


def _as_mono_float32(wav: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(wav)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected mono audio of shape (n,), got {x.shape}")
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- file mode
def file_gain(wav16k: np.ndarray, stand_ins: int = 0) -> np.float32:
    """Upstream's whole-file loudness gain 0.1 / max(1e-4, RMS), in float32 as upstream computes it.
    `stand_ins`: how many samples are silence standing in for non-finite input (capture.audio_files):
    left out of the RMS, so the gain is that of the finite audio alone."""
    x = _as_mono_float32(wav16k, "file_gain")
    n = len(x) - min(max(0, stand_ins), len(x))
    if stand_ins <= 0:
        mean_square = np.mean(x ** 2) if len(x) else np.float32(0)
    else:
        mean_square = np.sum(x ** 2, dtype=np.float32) / np.float32(n) if n else np.float32(0)
    rms = np.maximum(np.float32(FILE_RMS_FLOOR), np.sqrt(mean_square))
    return np.float32(FILE_TARGET_RMS) / np.float32(rms)


def _padded_frames(x: np.ndarray) -> np.ndarray:
    """lws "perfectrec" framing of the whole signal: (ceil(len/160) + 7, 1280) float64 strided view."""
    n_rows = file_row_count(len(x))
    padded = np.zeros(PAD_LEFT + HOP * n_rows, dtype=np.float64)
    padded[PAD_LEFT:PAD_LEFT + len(x)] = x
    return np.lib.stride_tricks.sliding_window_view(padded, FRAME_LENGTH)[::HOP][:n_rows]


def stft(wav16k: np.ndarray) -> np.ndarray:
    """The complex STFT exactly as `lws.lws(1280, 160, mode="speech").stft(wav)` returns it:
    (ceil(len/160) + 7, 641) complex128. Used by tests to pin the framing and window to lws."""
    return np.fft.rfft(_padded_frames(_as_mono_float32(wav16k, "stft")) * analysis_window(), axis=1)


def wav_to_mel(wav16k: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Whole-signal mel exactly as upstream: (T, 80) float32 in [0, 1], T = ceil(len/160) + 7.

    `normalize=True` applies upstream's whole-file RMS normalisation (which needs the entire utterance:
    offline only). The input is cast to float32 first, as librosa.load delivers it."""
    x = _as_mono_float32(wav16k, "wav_to_mel")
    if normalize:
        x = x * file_gain(x)
    frames = _padded_frames(x)
    out = np.empty((len(frames), N_MELS), dtype=np.float32)
    for start in range(0, len(frames), _BLOCK_ROWS):
        out[start:start + _BLOCK_ROWS] = _frames_to_rows(frames[start:start + _BLOCK_ROWS])
    return out


def mel_window(mel: np.ndarray, k: int) -> np.ndarray:
    """(1, 80, 20) network input for output frame k: rows [4k, 4k+20) transposed.

    As upstream, a window that would start before row 0 is all zeros. Upstream returns a *shorter* window
    past the end (and then fails in batching); here missing rows past the end are zeros, the same silence
    padding the live timeline uses."""
    start = MEL_ROWS_PER_FRAME * k
    out = np.zeros((1, N_MELS, WINDOW_ROWS), dtype=np.float32)
    if start < 0:
        return out
    rows = mel[start:start + WINDOW_ROWS]
    out[0, :, :len(rows)] = rows.T
    return out


# ---------------------------------------------------------------------------- live gain
class RowGain(Protocol):
    """Per-row linear gain for `StreamingMel`. `update` receives, for each new row m, the 160 samples of
    hop m (the newest hop of row m's window) and returns that row's gain. Must be causal."""

    def update(self, hops: np.ndarray) -> np.ndarray: ...


class FixedGain:
    """A constant gain, e.g. `file_gain(wav)` of a known file. StreamingMel applies it (like a plain
    float) to the float32 samples, exactly as upstream normalises, so the rows equal the file-mode rows."""

    def __init__(self, gain: float) -> None:
        self.gain = float(gain)

    def update(self, hops: np.ndarray) -> np.ndarray:
        return np.full(len(hops), self.gain)


class StreamingGain:
    """Causal stand-in for upstream's whole-file RMS normalisation, with a silence gate.

    Upstream scales every file so that its RMS over the *whole* utterance (pauses included) is 0.1, with
    the RMS floored at 1e-4 (so up to ×1000 on near-silence). Live audio has no "whole file", and a mic's
    pauses are hiss, not zeros, so this differs deliberately:

    * Level (AGC): the mean energy of *voiced* 10 ms hops only — a running mean over the voiced hops so
      far that turns into an exponential average over `time_constant_s` of speech. Energy (not dB) is
      averaged, as RMS does, so the loud hops dominate within a syllable and the quiet onset hops barely
      matter. Gain = target_rms / max(rms_floor, level). The target is a voiced-hop RMS, 0.11, which
      matches upstream's whole-file 0.1 for speech with ~80% voiced hops (speech.wav: 79%; voiced RMS
      0.1027 vs file RMS 0.0915). `rms_floor` (−50 dBFS, i.e. at most ×35) replaces upstream's 1e-4
      (×1000): a quiet mic is lifted, hiss is never lifted by 60 dB.
    * Voicing: a hop is voiced when its level exceeds `gate_dbfs` and, after `noise_warmup_s` of
      non-silent audio, also the noise floor + `gate_margin_db`, where the noise floor is the quietest
      hop of the last `noise_window_s` (minimum statistics; digital-silence hops are ignored). A
      constantly noisy mic is thus recognised as noise after the warm-up (until then its noise reads as
      voice), while speech, which has quiet hops every second or so, keeps a low floor. In noise, speech
      hops less than `gate_margin_db` above the noise are gated (upstream would pass them, and the noise).
    * Gate: a row is open while any hop of its 80 ms window is voiced (full gain, instant attack); then
      its gain ramps down by `gate_floor_db` over `release_ms`. Since voiced hops are scaled to about
      −19 dBFS, a closed gate (−60 dB) leaves any gated content below ≈ −79 dBFS-equivalent, i.e. mel
      ≤ ~0.05. Upstream has no gate: a file with −60 dBFS hiss under −20 dBFS speech reads ≈0.2 in its
      pauses and the mouth keeps moving; here pauses read 0, like the digital silence that the model
      maps to a closed mouth.

    State advances per 10 ms hop, never per chunk, so rows do not depend on how the audio was chunked.
    Not thread-safe (owned by the one StreamingMel that calls it).
    """

    def __init__(self, target_rms: float = 0.11, rms_floor: float = 10 ** (-50 / 20),
                 gate_dbfs: float = -55.0, gate_margin_db: float = 12.0, gate_floor_db: float = -60.0,
                 release_ms: float = 80.0, time_constant_s: float = 5.0, noise_window_s: float = 1.5,
                 noise_warmup_s: float = 0.3) -> None:
        if not (target_rms > 0 and rms_floor > 0 and gate_floor_db <= 0 and release_ms > 0
                and noise_window_s > 0):
            raise ValueError("StreamingGain: target_rms, rms_floor, release_ms and noise_window_s must be "
                             "> 0 and gate_floor_db <= 0")
        hops_per_s = SAMPLE_RATE / HOP
        self.target_rms = target_rms
        self.rms_floor = rms_floor
        self.gate_dbfs = gate_dbfs
        self.gate_margin_db = gate_margin_db
        self.gate_floor_db = gate_floor_db
        self._release_per_hop = -gate_floor_db / max(1.0, release_ms / 1000 * hops_per_s)
        self._alpha_min = 1.0 / max(1.0, time_constant_s * hops_per_s)
        self._hold_hops = FRAME_LENGTH // HOP           # a voiced hop lies in 8 rows' windows
        self._noise_hops = max(1, round(noise_window_s * hops_per_s))
        self._warmup_hops = min(self._noise_hops, max(1, round(noise_warmup_s * hops_per_s)))
        self._energy = 0.0                              # running voiced mean energy
        self._count = 0.0                               # voiced hops averaged so far
        self._minq: deque[tuple[int, float]] = deque()  # (hop number, level), increasing levels
        self._heard = 0                                 # non-silent hops so far
        self._since_voiced = self._hold_hops            # hops since the last voiced one
        self._gate_db = gate_floor_db                   # start closed: nothing heard yet

    @property
    def level_rms(self) -> float:
        """Current estimate of the speech level (RMS of voiced hops)."""
        return math.sqrt(self._energy)

    @property
    def agc_gain(self) -> float:
        """Gain applied to voiced rows now (before the gate)."""
        return self.target_rms / max(self.rms_floor, self.level_rms)

    @property
    def noise_floor_db(self) -> float | None:
        """Quietest non-silent hop level of the last `noise_window_s` (dBFS); None during the warm-up."""
        return self._minq[0][1] if self._minq and self._heard >= self._warmup_hops else None

    def update(self, hops: np.ndarray) -> np.ndarray:
        energies = np.mean(np.square(np.asarray(hops, dtype=np.float64)), axis=1)
        levels = 10.0 * np.log10(energies + 1e-12)
        gains = np.empty(len(energies))
        for i, (energy, level) in enumerate(zip(energies.tolist(), levels.tolist())):
            if level > -100.0:  # digital silence says nothing about the mic's noise
                while self._minq and self._minq[-1][1] >= level:
                    self._minq.pop()
                self._minq.append((self._heard, level))
                self._heard += 1
                while self._minq[0][0] <= self._heard - 1 - self._noise_hops:
                    self._minq.popleft()
            noise = self.noise_floor_db
            threshold = self.gate_dbfs if noise is None else max(self.gate_dbfs, noise + self.gate_margin_db)
            if level > threshold:
                self._count += 1.0
                self._energy += max(1.0 / self._count, self._alpha_min) * (energy - self._energy)
                self._since_voiced = 0
            else:
                self._since_voiced += 1
            if self._since_voiced < self._hold_hops:
                self._gate_db = 0.0
            else:
                self._gate_db = max(self.gate_floor_db, self._gate_db - self._release_per_hop)
            gains[i] = self.agc_gain * 10.0 ** (self._gate_db / 20.0)
        return gains


# ---------------------------------------------------------------------------- streaming mel
class StreamingMel:
    """Incremental mel: push chunks of any size, get back the rows that became complete.

    Row m is emitted as soon as sample 160(m+1) − 1 has been pushed; `finish()` appends the end padding
    and returns the last rows, so that all rows together are exactly `file_row_count(len)` rows. With a
    fixed gain equal to `file_gain(wav)` they equal `wav_to_mel(wav)` row for row (float rounding only);
    with the default `StreamingGain` they are the live approximation described there.

    Each push does one vectorised FFT over its new frames; the state is the last 1120 + <160 samples.
    Not thread-safe: owned by one consumer (the scheduler's timeline).
    """

    def __init__(self, gain: float | RowGain | None = None) -> None:
        if gain is None:
            gain = StreamingGain()
        # A fixed gain scales the float32 samples, exactly as upstream's normalisation does (so the rows
        # are the file-mode rows to float64 rounding); any other RowGain scales each row's magnitude.
        if isinstance(gain, FixedGain):
            gain = gain.gain
        self._sample_gain = np.float32(gain) if isinstance(gain, (int, float, np.floating)) else None
        self.gain: RowGain | None = None if self._sample_gain is not None else gain
        self._buf = np.zeros(PAD_LEFT, dtype=np.float64)  # unconsumed tail, left pad included
        self._samples = 0
        self._rows = 0
        self._finished = False

    @property
    def rows_emitted(self) -> int:
        return self._rows

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append samples (float mono 16 kHz); returns the (n, 80) float32 rows completed by them."""
        if self._finished:
            raise RuntimeError("StreamingMel.push after finish()")
        x = _as_mono_float32(samples, "StreamingMel.push")
        if self._sample_gain is not None:
            x = x * self._sample_gain
        self._samples += len(x)
        self._buf = np.concatenate([self._buf, x.astype(np.float64)])
        return self._drain()

    def finish(self) -> np.ndarray:
        """End of stream: zero-pad the partial hop and the 1120-sample tail as lws does; returns the last
        7 or 8 rows. Idempotent (a second call returns no rows)."""
        if self._finished:
            return np.zeros((0, N_MELS), dtype=np.float32)
        self._finished = True
        pending = len(self._buf) - PAD_LEFT
        pad = (-pending) % HOP + PAD_LEFT
        self._buf = np.concatenate([self._buf, np.zeros(pad)])
        rows = self._drain()
        assert self._rows == file_row_count(self._samples)
        return rows

    def _drain(self) -> np.ndarray:
        n = (len(self._buf) - FRAME_LENGTH) // HOP + 1 if len(self._buf) >= FRAME_LENGTH else 0
        if n == 0:
            return np.zeros((0, N_MELS), dtype=np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(self._buf, FRAME_LENGTH)[::HOP][:n]
        gains = None if self.gain is None else self.gain.update(frames[:, PAD_LEFT:])
        rows = _frames_to_rows(frames, gains)
        self._buf = self._buf[n * HOP:].copy()
        self._rows += n
        return rows
