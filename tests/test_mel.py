"""The mel front end against its oracles: lws (framing, window), the stored upstream mel of speech.wav,
and itself (incremental == whole file); plus the live gain's promise that silence stays silence."""
from __future__ import annotations

import numpy as np
import pytest

from capture.audio_files import load_audio_16k
from tests.conftest import load_case
from pcavs import mel as M
from pcavs.constants import FPS, HOP, MEL_ROWS_PER_FRAME, SAMPLE_RATE, WINDOW_ROWS

lws = pytest.importorskip("lws", reason="lws not installed (build it with LWS_USE_CYTHON=1, see scripts/)")


def _upstream_mel(wav: np.ndarray) -> np.ndarray:
    """config/AudioConfig.py, line for line, with lws doing the STFT (the spec's reference)."""
    wav = wav.astype(np.float32)
    rms = np.maximum(1e-4, np.sqrt(np.mean(wav ** 2)))
    wav = wav * (0.1 / rms)
    d = lws.lws(1280, 160, mode="speech").stft(wav).T
    basis = M.mel_basis()
    s = 20 * np.log10(np.maximum(np.exp(-100 / 20 * np.log(10)), np.dot(basis, np.abs(d)))) - 20
    return np.clip((s + 100) / 100, 0, 1).astype(np.float32).T


def _test_signal(n: int, seed: int) -> np.ndarray:
    """Harmonics + noise with silent stretches: exercises loud, quiet and exactly-zero rows."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)
    x[n // 3: n // 2] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def speech(speech_wav_path) -> np.ndarray:
    return load_audio_16k(speech_wav_path)


# ------------------------------------------------------------------ framing and window vs lws
@pytest.mark.parametrize("n", [1, 159, 160, 1279, 1280, 4000, 16001])
def test_stft_equals_lws(n: int) -> None:
    x = _test_signal(n, seed=n)
    ours = M.stft(x)
    ref = lws.lws(1280, 160, mode="speech").stft(x.astype(np.float64))
    assert ours.shape == ref.shape == (M.file_row_count(n), 641)
    assert ours.shape[0] == -(-n // 160) + 7
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10 * max(1.0, np.abs(ref).max()))


def test_window_is_lws_window() -> None:
    """An impulse at sample 1120 lands at position 1120 of frame 0 (the left pad) — the STFT of frame 0
    is then w[1120]·e^{-iωn}; its magnitude reads the window value that lws uses."""
    n = np.arange(1280)
    expected = np.sqrt(0.5 * (1 - np.cos(2 * np.pi * (2 * n + 1) / 2560))) / 2
    np.testing.assert_allclose(M.analysis_window(), expected, atol=1e-15)
    for pos in (0, 80, 159):
        x = np.zeros(160, np.float32)
        x[pos] = 1.0
        frame0 = lws.lws(1280, 160, mode="speech").stft(x.astype(np.float64))[0]
        np.testing.assert_allclose(np.abs(frame0), expected[1120 + pos], rtol=1e-9)


def test_wav_to_mel_equals_lws_pipeline_on_synthetic_audio() -> None:
    for n, seed in [(5000, 1), (16000 * 2 + 77, 2)]:
        x = _test_signal(n, seed)
        ours, ref = M.wav_to_mel(x), _upstream_mel(x)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-5


# ------------------------------------------------------------------ the stored upstream oracle
def test_wav_to_mel_equals_stored_upstream_mel(speech: np.ndarray) -> None:
    case = load_case(0)
    mel = M.wav_to_mel(speech)
    assert mel.shape == case["mel_full"].shape == (307, 80)
    assert np.abs(mel - case["mel_full"]).max() <= 1e-5
    for k, window in zip(case["frame_index"], case["mel_input"]):
        np.testing.assert_allclose(M.mel_window(mel, int(k)), window, atol=1e-5)


# ------------------------------------------------------------------ windows and timing
def test_mel_window_layout_and_edges() -> None:
    mel = np.arange(30 * 80, dtype=np.float32).reshape(30, 80)
    w = M.mel_window(mel, 1)
    assert w.shape == (1, 80, 20) and w.dtype == np.float32
    np.testing.assert_array_equal(w[0], mel[4:24].T)
    assert not M.mel_window(mel, -1).any()                      # negative start: zeros, as upstream
    tail = M.mel_window(mel, 4)                                  # rows 16..35, only 16..29 exist
    np.testing.assert_array_equal(tail[0, :, :14], mel[16:30].T)
    assert not tail[0, :, 14:].any()


def test_timing_facts_agree_with_streaming_rows() -> None:
    assert (SAMPLE_RATE, HOP, MEL_ROWS_PER_FRAME, WINDOW_ROWS, FPS) == (16000, 160, 4, 20, 25)
    assert M.samples_needed_for_frame(0) == 3200                 # 200 ms of audio for frame 0
    assert M.samples_needed_for_frame(10) == 16 * (400 + 200)            # 40k + 200 ms at k = 10
    sm = M.StreamingMel(1.0)
    x = np.zeros(16000, np.float32)
    pushed = 0
    for size in [100, 60, 3040, 1, 5000, 7799]:
        sm.push(x[pushed:pushed + size])
        pushed += size
        frames = M.rows_available_to_frames(sm.rows_emitted)
        assert sm.rows_emitted == M.rows_for_samples(pushed) == pushed // 160
        # frame k is ready exactly when the audio it needs has arrived
        for k in range(0, 30):
            assert (k < frames) == (pushed >= M.samples_needed_for_frame(k))


# ------------------------------------------------------------------ incremental == whole file
def test_streaming_rows_equal_file_rows_with_file_gain(speech: np.ndarray) -> None:
    reference = M.wav_to_mel(speech)
    rng = np.random.default_rng(7)
    sm = M.StreamingMel(M.file_gain(speech))
    rows, pos = [], 0
    while pos < len(speech):
        size = int(rng.choice([0, 1, 17, 159, 160, 161, 320, 999, 2500]))
        out = sm.push(speech[pos:pos + size])
        pos += size
        assert out.dtype == np.float32 and out.shape[1] == 80
        assert sm.rows_emitted == pos // 160                     # rows appear as soon as complete
        rows.append(out)
    rows.append(sm.finish())
    got = np.concatenate(rows)
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() <= 1e-6
    assert len(sm.finish()) == 0
    with pytest.raises(RuntimeError):
        sm.push(speech[:10])


def test_streaming_live_gain_does_not_depend_on_chunking(speech: np.ndarray) -> None:
    whole = M.StreamingMel()
    expected = np.concatenate([whole.push(speech), whole.finish()])
    rng = np.random.default_rng(3)
    sm = M.StreamingMel()
    parts, pos = [], 0
    while pos < len(speech):
        size = int(rng.integers(1, 900))
        parts.append(sm.push(speech[pos:pos + size]))
        pos += size
    parts.append(sm.finish())
    np.testing.assert_allclose(np.concatenate(parts), expected, atol=1e-6)


# ------------------------------------------------------------------ live gain: level and silence
def _live(x: np.ndarray, **kw) -> tuple[np.ndarray, M.StreamingGain]:
    gain = M.StreamingGain(**kw)
    sm = M.StreamingMel(gain)
    return np.concatenate([sm.push(x), sm.finish()]), gain


def _hiss(n: int, dbfs: float, seed: int = 0) -> np.ndarray:
    return (10 ** (dbfs / 20) * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_digital_silence_is_all_zero_mel() -> None:
    zeros = np.zeros(16000, np.float32)
    assert not M.wav_to_mel(zeros).any()
    assert not _live(zeros)[0].any()
    sm = M.StreamingMel(1000.0)                                 # upstream's largest gain
    assert not np.concatenate([sm.push(zeros), sm.finish()]).any()


# Bound for "silent": 0.05 in normalised mel is −95 dB re the model's reference, 75 dB under the level
# speech is normalised to; upstream's own rows for digital silence are exactly 0, and those for
# −60 dBFS hiss under −20 dBFS speech are ≈0.2 (asserted below), so 0.05 sits well inside "closed".
SILENT = 0.05


@pytest.mark.parametrize("dbfs", [-70.0, -60.0])
def test_quiet_hiss_stays_silent_with_live_gain(dbfs: float) -> None:
    hiss = _hiss(3 * 16000, dbfs)
    rows, gain = _live(hiss)
    assert rows.max() <= SILENT
    # the same hiss, normalised the upstream way, would read as speech-loud: the gate is what matters
    assert M.wav_to_mel(hiss).mean() > 0.4


def test_loud_hiss_is_learned_as_noise_after_warm_up() -> None:
    hiss = _hiss(3 * 16000, -40.0)
    rows, gain = _live(hiss)
    assert gain.noise_floor_db is not None and -45 < gain.noise_floor_db < -40
    assert rows[60:].max() <= 2 * SILENT                         # after 0.3 s warm-up + 80 ms release


def test_speech_in_hiss_keeps_upstream_level_and_closes_after(speech: np.ndarray) -> None:
    lead, trail = 16000, 16000
    clean = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(trail, np.float32)])
    noisy = clean + _hiss(len(clean), -60.0)
    rows, gain = _live(noisy)
    # upstream's rows for the same noisy audio at the level upstream would give the speech
    sm = M.StreamingMel(M.file_gain(speech))
    upstream = np.concatenate([sm.push(noisy), sm.finish()])
    assert 20 * np.log10(gain.agc_gain / M.file_gain(speech)) == pytest.approx(0, abs=1.0)
    start, stop = lead // 160, (lead + len(speech)) // 160
    voiced = np.zeros(len(rows), bool)
    voiced[start:stop] = M.wav_to_mel(speech)[: stop - start].max(1) > 0.5
    assert np.abs(rows - upstream)[voiced].mean() < 0.02        # measured 0.0065
    assert rows[: start].max() <= SILENT                         # before speech: closed
    assert rows[stop + 8 + 8 + 2:].max() <= SILENT               # after: window + release + margin
    assert upstream[stop + 20:].mean() > 0.15                    # upstream keeps "talking" in the hiss


def test_live_gain_compensates_a_quiet_microphone(speech: np.ndarray) -> None:
    loud, _ = _live(speech)
    quiet, gain = _live(speech * np.float32(0.1) + _hiss(len(speech), -75.0))
    voiced = M.wav_to_mel(speech).max(1) > 0.5
    assert gain.agc_gain > 9
    assert np.abs(loud - quiet)[voiced].mean() < 0.03
