"""Audio and video files → float32 mono 16 kHz samples, decoded the way upstream's `librosa.load` does.

The model was trained on audio read with `librosa.load(path, sr=16000)`; reading a file the same way
(same int16 scaling, same channel mix, same resampler) is what lets the file path reproduce upstream's
mel rows exactly. soundfile reads what libsndfile knows; PyAV (FFmpeg) reads the rest, including the
audio track of a video.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pcavs_live.common.errors import UserError
from pcavs.constants import SAMPLE_RATE


log = logging.getLogger(__name__)


class AudioFileError(UserError, ValueError):
    """An audio file the user named cannot be read (missing, unsupported, no audio stream)."""


def finite_audio(samples: np.ndarray) -> tuple[np.ndarray, int]:
    """The audio boundary's one rule for NaN and ±inf samples: they become silence, and are counted.

    Why here and not downstream: one non-finite sample makes the whole-file gain NaN (or 0 for inf),
    which poisons every mel window, and the AAC encoder refuses NaN outright. Files and live sources
    (microphone, browser) all pass their samples through this, so nothing past capture/ sees one.
    Returns (float32 samples, how many were replaced); the input is copied only when it needs fixing."""
    x = np.asarray(samples, dtype=np.float32)
    bad = ~np.isfinite(x)
    count = int(np.count_nonzero(bad))
    if count:
        x = np.where(bad, np.float32(0.0), x)
    return x, count


def warn_nonfinite(count: int, what: str) -> None:
    """The one warning line for replaced samples (the running total is `audio_nonfinite_samples`)."""
    log.warning("%s: %d non-finite audio samples (NaN/inf) replaced by silence", what, count)


def load_audio_16k(path: str | Path) -> np.ndarray:
    """`read_audio_16k` without the count (the samples are already made finite)."""
    return read_audio_16k(path)[0]


def read_audio_16k(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio or video file to float32 mono 16 kHz, like upstream's `librosa.load(path, sr=16000)`.

    soundfile handles wav/flac/ogg (16-bit PCM becomes int16/32768 exactly, as in librosa); anything else
    (mp3, m4a, mp4, webm, …) is decoded with PyAV. Channels are averaged, then — only if the rate is not
    16 kHz — resampled with soxr "HQ", librosa's default resampler, so non-16 kHz files give librosa's
    samples too. Non-finite samples become silence before the mix and resampling (which would smear them)
    and are counted: returns (samples, how many 16 kHz samples stand in for non-finite input)."""
    p = Path(path)
    if not p.is_file():
        raise AudioFileError(f"audio file not found: {p}")
    try:
        audio, rate = _read_soundfile(p)
    except Exception:  # not a format libsndfile knows: let FFmpeg try
        audio, rate = _read_pyav(p)
    bad_frames = int(np.count_nonzero(~np.isfinite(audio).all(axis=1)))
    audio, _ = finite_audio(audio)
    if bad_frames and bad_frames == len(audio):  # nothing but NaN/inf: no sound to animate, nothing to write
        raise AudioFileError(f"audio file {p} holds only non-finite samples (NaN/inf)",
                             hint="the file is damaged; export it again or pick another")
    mono = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    nonfinite = bad_frames
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
        nonfinite = round(bad_frames * SAMPLE_RATE / rate)
    if len(mono) == 0:  # a valid header with no samples: nothing to animate, and no file to write
        raise AudioFileError(f"audio file {p} holds no samples", hint="record or pick a file with speech in it")
    return np.ascontiguousarray(mono, dtype=np.float32), nonfinite


def _read_soundfile(p: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    audio, rate = sf.read(str(p), dtype="float32", always_2d=True)
    return audio, int(rate)


def _read_pyav(p: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.audio:
                raise AudioFileError(f"no audio stream in {p}")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            # Only convert the sample format (planar float); keep rate and channels for the mix/resample.
            resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
            parts: list[np.ndarray] = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray())
            for out in resampler.resample(None):
                parts.append(out.to_ndarray())
    except AudioFileError:
        raise
    except Exception as exc:  # av.error.* (invalid data, unknown format) → one line naming the file
        raise AudioFileError(f"cannot decode audio from {p}: {exc}") from None
    if not parts:
        raise AudioFileError(f"no audio samples decoded from {p}")
    return np.concatenate(parts, axis=1).T.astype(np.float32, copy=False), int(rate)
