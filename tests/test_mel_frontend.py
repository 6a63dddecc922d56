"""pcavs/mel.py against the upstream oracle (case_seed0 mel_full, lws) and its own streaming contract.

The file-mode mel must be the upstream numbers exactly (the audio encoder was trained on them); the
streaming mel must give the same rows no matter how the audio is chunked, as early as their audio exists;
the live gain (StreamingGain) must read silence/hiss as silence and speech close to the file-mode rows.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile

from pcavs import mel as M
from tests.conftest import load_case

HOP = 160


@pytest.fixture(scope="module")
def speech(speech_wav_path) -> np.ndarray:
    return M.load_audio_16k(speech_wav_path)


@pytest.fixture(scope="module")
def speech_mel(speech) -> np.ndarray:
    return M.wav_to_mel(speech)


def _stream(sm: M.StreamingMel, wav: np.ndarray, sizes) -> np.ndarray:
    """Push `wav` through `sm` in chunks of the given sizes (cycled), then finish(); all rows."""
    out, i, sizes = [], 0, list(sizes)
    j = 0
    while i < len(wav):
        k = sizes[j % len(sizes)]
        out.append(sm.push(wav[i:i + k]))
        i += k
        j += 1
    out.append(sm.finish())
    return np.concatenate(out)


# ---------------------------------------------------------------------------- file mode vs oracle
def test_load_audio_16k_is_int16_over_32768(speech_wav_path, speech):
    raw, rate = soundfile.read(str(speech_wav_path), dtype="int16")
    assert rate == 16000 and raw.ndim == 1
    assert speech.dtype == np.float32
    np.testing.assert_array_equal(speech, raw.astype(np.float32) / 32768.0)


def test_wav_to_mel_matches_stored_upstream_mel(speech, speech_mel):
    ref = load_case(0)["mel_full"]
    assert speech_mel.shape == ref.shape == (M.file_row_count(len(speech)), 80)
    assert speech_mel.dtype == np.float32
    # Measured: max |diff| = 0.0 (bit-exact); atol leaves room for BLAS/FFT rounding elsewhere.
    np.testing.assert_allclose(speech_mel, ref, rtol=0, atol=1e-5)


def test_mel_windows_match_stored_network_inputs(speech_mel):
    case = load_case(0)
    for k, start, window in zip(case["frame_index"], case["mel_start_row"], case["mel_input"]):
        assert start == 4 * k
        np.testing.assert_allclose(M.mel_window(speech_mel, int(k)), window, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- framing vs lws
@pytest.fixture(scope="module")
def lws_case():
    lws = pytest.importorskip("lws", reason="lws (the STFT oracle) is not installed")
    rng = np.random.default_rng(1234)
    n = 16000 + 77                        # not a multiple of 160: exercises the end padding
    x = (0.1 * rng.standard_normal(n)).astype(np.float32)
    stft = lws.lws(1280, 160, mode="speech").stft(x.astype(np.float64))
    return x, stft


def test_lws_frame_count_matches_module(lws_case):
    x, stft = lws_case
    assert stft.shape == (-(-len(x) // HOP) + 7, 641) == (M.file_row_count(len(x)), 641)


def test_analysis_window_and_framing_give_lws_magnitude(lws_case):
    """|STFT| from the module's window with the framing written out from spec §4 (frame m covers
    samples [160m − 1120, 160m + 160)) equals |lws.stft| — pins the window (incl. the /2)."""
    x, stft = lws_case
    padded = np.zeros(1120 + HOP * len(stft))
    padded[1120:1120 + len(x)] = x
    frames = np.stack([padded[HOP * m:HOP * m + 1280] for m in range(len(stft))])
    ours = np.abs(np.fft.rfft(frames * M.analysis_window(), axis=1))
    theirs = np.abs(stft)
    rel = np.abs(ours - theirs).max() / theirs.max()
    assert rel < 1e-6, rel          # measured 4e-16


def test_wav_to_mel_framing_matches_lws(lws_case):
    """The module's own framing end to end: mel rows from lws' magnitude with upstream's mel/dB/normalise
    steps equal wav_to_mel(normalize=False)."""
    x, stft = lws_case
    mel = np.abs(stft) @ M.mel_basis().T.astype(np.float64)
    s_db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    rows = np.clip((s_db + 100) / 100, 0, 1)
    assert 0.05 < rows.min() and rows.max() < 0.95   # no clipping: every value is actually compared
    ours = M.wav_to_mel(x, normalize=False)
    assert ours.shape == rows.shape
    # 1e-6 relative in magnitude is 8.7e-9 in these units; float32 output rounding is ~6e-8. Measured 3e-8.
    np.testing.assert_allclose(ours, rows, rtol=0, atol=1e-6)


def test_mel_basis_is_slaney_80x641():
    basis = M.mel_basis()
    assert basis.shape == (80, 641) and basis.dtype == np.float32
    freqs = np.arange(641) * 16000 / 1280
    support = freqs[basis.sum(axis=0) > 0]
    assert 120 <= support.min() <= 140 and 7550 <= support.max() <= 7600   # fmin 125, fmax 7600


# ---------------------------------------------------------------------------- windows and timing
def test_mel_window_rows_and_negative_start():
    mel = np.arange(300 * 80, dtype=np.float32).reshape(300, 80)
    for k in (0, 1, 7, 70):
        w = M.mel_window(mel, k)
        assert w.shape == (1, 80, 20) and w.dtype == np.float32
        np.testing.assert_array_equal(w[0], mel[4 * k:4 * k + 20].T)
    assert not M.mel_window(mel, -1).any() and M.mel_window(mel, -1).shape == (1, 80, 20)
    # Past the end: the rows that exist, then zeros (silence padding).
    w = M.mel_window(mel, 72)               # rows 288..307, only 288..299 exist
    np.testing.assert_array_equal(w[0, :, :12], mel[288:].T)
    assert not w[0, :, 12:].any()


def test_timing_constants():
    assert [M.samples_needed_for_frame(k) for k in (0, 1, 10)] == [160 * 20, 160 * 24, 160 * 60]
    for k in range(0, 200, 7):
        assert M.samples_needed_for_frame(k) == 160 * (4 * k + 20)
        # ... which is exactly when the stream has the frame's whole window.
        n = M.samples_needed_for_frame(k)
        assert M.rows_available_to_frames(M.rows_for_samples(n)) == k + 1
        assert M.rows_available_to_frames(M.rows_for_samples(n - 1)) == k
    assert M.file_row_count(48000) == 307 and M.file_row_count(48001) == 308
    assert (M.MEL_ROWS_PER_FRAME, M.WINDOW_ROWS, M.SAMPLES_PER_FRAME) == (4, 20, 640)


# ---------------------------------------------------------------------------- streaming
def test_streaming_fixed_gain_equals_file_mode_and_emits_rows_early(speech, speech_mel):
    rng = np.random.default_rng(7)
    sizes = [int(s) for s in rng.integers(0, 900, size=400)] + [0, 1, 1, 0, 159, 1, 160, 161, 3]
    rng.shuffle(sizes)
    sm = M.StreamingMel(M.FixedGain(M.file_gain(speech)))
    out, pushed, j = [], 0, 0
    while pushed < len(speech):
        k = sizes[j % len(sizes)]
        j += 1
        rows = sm.push(speech[pushed:pushed + k])
        pushed += min(k, len(speech) - pushed)
        out.append(rows)
        # Row m is complete at sample 160(m+1): after n samples exactly n // 160 rows exist.
        assert sm.rows_emitted == sum(len(r) for r in out) == pushed // HOP == M.rows_for_samples(pushed)
        assert rows.dtype == np.float32 and rows.shape[1:] == (80,)
    tail = sm.finish()
    assert len(tail) == M.file_row_count(len(speech)) - len(speech) // HOP == 7
    assert len(sm.finish()) == 0                       # idempotent
    got = np.concatenate(out + [tail])
    # Measured max |diff| = 0.0.
    np.testing.assert_allclose(got, speech_mel, rtol=0, atol=2e-6)
    with pytest.raises(RuntimeError):
        sm.push(speech[:10])


def test_streaming_float_gain_and_ragged_length():
    rng = np.random.default_rng(3)
    x = (0.05 * rng.standard_normal(16000 + 77)).astype(np.float32)   # partial last hop → 8 tail rows
    gain = M.file_gain(x)
    sm = M.StreamingMel(float(gain))
    got = _stream(sm, x, [1, 333, 0, 4000, 17])
    assert len(got) == M.file_row_count(len(x)) == 108
    np.testing.assert_allclose(got, M.wav_to_mel(x), rtol=0, atol=2e-6)


def test_streaming_gain_is_independent_of_chunking(speech):
    whole = _stream(M.StreamingMel(M.StreamingGain()), speech, [len(speech)])
    ragged = _stream(M.StreamingMel(M.StreamingGain()), speech, [1, 0, 37, 160, 999, 5])
    np.testing.assert_array_equal(whole, ragged)


# ---------------------------------------------------------------------------- silence and live gain
def test_digital_silence_is_all_zero():
    z = np.zeros(16000, dtype=np.float32)
    assert not M.wav_to_mel(z).any()
    assert not _stream(M.StreamingMel(), z, [320]).any()
    assert not _stream(M.StreamingMel(1.0), z, [320]).any()


def test_streaming_gain_keeps_quiet_hiss_silent():
    """−60 dBFS white noise for 3 s: upstream's ×1000 RMS floor would read it as loud as speech (file
    mode ≈ 0.58 mean). StreamingGain: −60 dBFS is below gate_dbfs (−55), so no hop is voiced and the gate
    stays closed (−60 dB on top of at most ×35) — the docstring promises gated content ≤ ~0.05."""
    rng = np.random.default_rng(11)
    noise = (10 ** (-60 / 20) * rng.standard_normal(48000)).astype(np.float32)
    assert M.wav_to_mel(noise).mean() > 0.4                       # upstream really would read it as sound
    sm = M.StreamingMel(M.StreamingGain())
    rows = _stream(sm, noise, [320])
    warm = round(0.3 * 100) + 8 + 8                                # warm-up + hold + release, in rows
    assert rows[warm:].max() <= 0.05                              # measured 0.0 (whole clip)


def test_streaming_gain_learns_a_steady_noise_floor():
    """−40 dBFS hiss is above gate_dbfs, so it reads as voice until the noise floor is known (0.3 s
    warm-up), then it is gated: mean ≤ 0.05 as documented, single bins a few dB higher (measured max
    0.072 after 0.6 s, mean 0.01)."""
    rng = np.random.default_rng(12)
    noise = (10 ** (-40 / 20) * rng.standard_normal(48000)).astype(np.float32)
    gain = M.StreamingGain()
    rows = _stream(M.StreamingMel(gain), noise, [640])
    assert rows[:25].mean() > 0.3                                 # during the warm-up it is "voice"
    assert rows[60:300].mean() <= 0.05 and rows[60:300].max() <= 0.1
    assert gain.noise_floor_db is not None and abs(gain.noise_floor_db - -40) < 3


def test_streaming_gain_speech_close_to_file_mode(speech, speech_mel):
    """speech.wav through StreamingGain vs upstream's whole-file normalisation. After convergence the only
    difference is the AGC's level vs the file RMS: voiced-hop target 0.11 vs file RMS 0.1 at 79% voiced
    → ≈0.2 dB ≈ 0.002 mel units (1 dB = 0.01). Measured: mean |diff| 0.0087 over all rows (the first
    ~100 ms overshoot while the running mean has seen only the quiet onset hops), 0.0032 mean / 0.010
    max after row 30. Bounds: 2 dB mean overall, 1 dB mean and 3 dB max once warmed up."""
    sm = M.StreamingMel(M.StreamingGain())
    rows = _stream(sm, speech, [320])
    assert rows.shape == speech_mel.shape
    diff = np.abs(rows - speech_mel)
    assert diff.mean() < 0.02
    assert diff[30:].mean() < 0.01
    assert diff[30:].max() < 0.03
    assert abs(20 * np.log10(sm.gain.agc_gain / M.file_gain(speech))) < 1.0


def test_streaming_gain_rejects_bad_parameters():
    with pytest.raises(ValueError):
        M.StreamingGain(target_rms=0)
    with pytest.raises(ValueError):
        M.StreamingGain(gate_floor_db=3)


def test_bad_input_shapes_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"\(n,\)"):
        M.wav_to_mel(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError):
        M.StreamingMel(1.0).push(np.zeros((100, 2), dtype=np.float32))
    # (n, 1) is accepted as mono
    assert M.wav_to_mel(np.zeros((1600, 1), dtype=np.float32)).shape == (17, 80)
    missing = tmp_path / "nope.wav"
    with pytest.raises(M.AudioFileError, match="nope.wav"):
        M.load_audio_16k(missing)


@pytest.mark.parametrize("level", [0.1, 3.0])
def test_streaming_gain_recovers_quiet_and_hot_input_like_file_mode(speech, level):
    """A quiet (-20 dB) or hot (+10 dB) mic must give the mouth the same features as file mode, which
    normalises the whole file. Without a working gain, -20 dB would shift every row by ~0.17."""
    scaled = np.clip(speech * level, -1, 1).astype(np.float32)
    live = M.StreamingMel(M.StreamingGain()).push(scaled)
    whole = M.wav_to_mel(scaled)[: len(live)]
    tail = slice(50, len(live))  # after 0.5 s the running level has converged on the speech
    assert np.abs(live[tail] - whole[tail]).mean() < 0.02
