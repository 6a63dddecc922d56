"""The mel front end against the oracle (stored mel_full) and lws, and incremental == whole-file."""
from __future__ import annotations

import numpy as np
import pytest

from pcavs.mel import (FixedGain, StreamingGain, StreamingMel, file_gain, load_audio_16k, mel_basis, mel_window,
                       wav_to_mel)
from tests.conftest import load_case


@pytest.fixture(scope="module")
def speech(speech_wav_path) -> np.ndarray:
    return load_audio_16k(speech_wav_path)


def test_file_mode_equals_the_original_front_end(speech):
    mel = wav_to_mel(speech)
    ref = load_case(0)["mel_full"]
    assert mel.shape == ref.shape == (307, 80)
    np.testing.assert_allclose(mel, ref, rtol=0, atol=1e-5)


def test_framing_and_window_equal_lws():
    """Our numpy STFT is the lws 'speech' STFT: same frame count (ceil(n/160)+7), padding and window."""
    lws = pytest.importorskip("lws", reason="lws is the framing oracle (scripts/setup.sh builds it)")
    rng = np.random.default_rng(3)
    wav = (0.1 * rng.standard_normal(16000 + 77)).astype(np.float32)  # not a multiple of 160
    mag = np.abs(lws.lws(1280, 160, mode="speech").stft(wav.astype(np.float64)))
    assert mag.shape[0] == int(np.ceil(len(wav) / 160)) + 7
    db = 20 * np.log10(np.maximum(1e-5, mag @ mel_basis().T)) - 20
    expected = np.clip((db + 100) / 100, 0, 1)
    np.testing.assert_allclose(wav_to_mel(wav, normalize=False), expected, rtol=0, atol=1e-5)


def test_incremental_rows_equal_whole_file_rows(speech):
    whole = wav_to_mel(speech)
    stream = StreamingMel(FixedGain(float(file_gain(speech))))
    rng = np.random.default_rng(0)
    rows, pos = [], 0
    while pos < len(speech):
        n = int(rng.choice([0, 1, 159, 160, 161, 640, 2999]))
        got = stream.push(speech[pos:pos + n])
        pos = min(pos + n, len(speech))
        assert stream.rows_emitted == pos // 160  # a row appears as soon as its audio exists
        rows.append(got)
    rows.append(stream.finish())
    np.testing.assert_allclose(np.concatenate(rows), whole, rtol=0, atol=2e-6)


def test_window_layout():
    mel = np.arange(40 * 80, dtype=np.float32).reshape(40, 80)
    w = mel_window(mel, 3)
    assert w.shape == (1, 80, 20)
    np.testing.assert_array_equal(w[0], mel[12:32].T)


def test_silence_gives_an_all_zero_mel_live_and_offline():
    """Zero mel is what the model saw for silence: the mouth closes in pauses."""
    silence = np.zeros(16000, np.float32)
    assert wav_to_mel(silence).max() == 0.0
    assert StreamingMel(StreamingGain()).push(silence).max() == 0.0


@pytest.mark.parametrize("level", [0.1, 1.0, 3.0])
def test_live_gain_recovers_the_level_like_file_mode(speech, level):
    """A quiet (-20 dB) or hot (+10 dB) mic must give the mouth the same features as file mode, which
    normalises the whole file. Without a working gain, -20 dB would shift every row by 0.2."""
    quiet = np.clip(speech * level, -1, 1)
    live = StreamingMel(StreamingGain()).push(quiet)
    whole = wav_to_mel(quiet)[: len(live)]
    tail = slice(50, len(live))  # after 0.5 s the running level has converged on the speech
    assert np.abs(live[tail] - whole[tail]).mean() < 0.02
