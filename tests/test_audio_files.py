"""Audio file decoding against librosa, the reader upstream used: int16 scaling, channel mix, resampling,
and one-line errors naming the file."""
from __future__ import annotations

import numpy as np
import pytest

from capture.audio_files import AudioFileError, load_audio_16k


def test_load_audio_16k_matches_librosa_for_int16_wav(speech_wav_path) -> None:
    import librosa
    import soundfile as sf

    speech = load_audio_16k(speech_wav_path)
    raw, rate = sf.read(str(speech_wav_path), dtype="int16")
    assert rate == 16000 and speech.dtype == np.float32
    np.testing.assert_array_equal(speech, raw.astype(np.float32) / 32768)
    np.testing.assert_array_equal(speech, librosa.load(str(speech_wav_path), sr=16000)[0])


def test_load_audio_16k_resamples_like_librosa(tmp_path) -> None:
    import librosa
    import soundfile as sf

    t = np.arange(44100) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 440 * t)], 1)
    path = tmp_path / "tone44k.wav"
    sf.write(str(path), stereo, 44100, subtype="FLOAT")
    ours = load_audio_16k(path)
    assert ours.dtype == np.float32 and len(ours) == 16000
    np.testing.assert_allclose(ours, librosa.load(str(path), sr=16000)[0], atol=1e-6)
    spectrum = np.abs(np.fft.rfft(ours * np.hanning(len(ours))))
    assert abs(np.argmax(spectrum) * 16000 / len(ours) - 440) <= 1.0


def test_load_audio_16k_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(AudioFileError, match="missing.wav"):
        load_audio_16k(tmp_path / "missing.wav")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioFileError, match="junk.mp3"):
        load_audio_16k(junk)
