"""The per-frame engine against the oracle: identity once, one generator pass, uint8 like upstream."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pcavs.checkpoints import load_networks
from pcavs.constants import ID_DIM
from pcavs.engine import Avatar, EngineOptions, SessionRequest, render_sessions, to_uint8_frames
from pcavs.runtime import RenderRuntime
from tests.conftest import load_case, parity_weights_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seed0():
    case = load_case(0)
    return RenderRuntime(load_networks(parity_weights_dir(0))), case


def stored_noise(case, rows=slice(None)):
    return [torch.from_numpy(case[f"noise_{i}"][rows].astype(np.float32)) for i in range(11)]


def test_identity_is_encoded_once_and_matches_the_oracle(seed0):
    rt, case = seed0
    avatar = Avatar(rt, torch.from_numpy(case["identity_input"]))
    np.testing.assert_allclose(avatar.id_feature.numpy(), case["id_feature"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(avatar.id_map.numpy(), case["id_map"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(avatar.reference_pose.numpy(), case["ref_pose_code"][0, 0], rtol=1e-4, atol=1e-5)


def test_driven_frames_match_the_original_output(seed0):
    """Engine path end to end (mel window → audio enc ×1.2 → mouth; pose frame → pose code; one G pass)
    reproduces upstream's saved uint8 frames; the float output is checked at 1e-4 in test_generator."""
    rt, case = seed0
    avatar = Avatar(rt, torch.from_numpy(case["identity_input"]))
    codes = np.stack([avatar.pose_code(torch.from_numpy(p)) for p in case["pose_input"]])
    np.testing.assert_allclose(codes, case["pose_code"][:, 0], rtol=1e-4, atol=1e-5)
    mouth = avatar.mouth_codes(case["mel_input"])
    np.testing.assert_allclose(mouth.numpy(), case["mouth_embed"][:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(avatar.frame_style(mouth, codes).numpy(), case["style_driven"][:, ID_DIM:],
                               rtol=1e-4, atol=1e-5)
    frames = avatar.render(case["mel_input"], codes, noise=stored_noise(case))
    diff = np.abs(frames.astype(int) - case["out_driven_uint8"].astype(int))
    # Truncation to uint8 turns float noise of ~1e-6 into an occasional ±1 step; nothing larger.
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


def test_identity_part_of_the_style_is_computed_once_per_photo(seed0, monkeypatch):
    """Frames (alone or batched across sessions) reuse the avatar's cached identity style: the generator
    never runs the full 2560-wide modulation, and precompute_style runs once per photo."""
    rt, case = seed0
    calls = {"precompute_style": 0, "modulations": 0}
    for name in calls:
        real = getattr(rt.networks.generator, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(rt.networks.generator, name, counted)
    avatar = Avatar(rt, torch.from_numpy(case["identity_input"]), EngineOptions(noise="zero"))
    assert calls == {"precompute_style": 1, "modulations": 0}
    frame = avatar.render(case["mel_input"][:1])
    render_sessions([SessionRequest(avatar, case["mel_input"][0])])
    assert calls == {"precompute_style": 1, "modulations": 0}
    # The cached path is the full style's maths: same frame as one forward() on [id | mouth | pose].
    style = torch.cat([avatar.id_feature[None], avatar.frame_style(avatar.mouth_codes(case["mel_input"][:1]), None)], 1)
    with torch.inference_mode():
        full = rt.networks.generator(style, avatar.id_map[None], None)
    assert np.abs(frame.astype(int) - to_uint8_frames(full).astype(int)).max() <= 1


def test_reference_pose_when_no_pose_is_given(seed0):
    rt, case = seed0
    avatar = Avatar(rt, torch.from_numpy(case["identity_input"]))
    mouth = avatar.mouth_codes(case["mel_input"])
    np.testing.assert_allclose(avatar.frame_style(mouth, None).numpy(), case["style_ref"][:, ID_DIM:],
                               rtol=1e-4, atol=1e-5)


def test_noise_policies(seed0):
    rt, case = seed0
    img = torch.from_numpy(case["identity_input"])
    mel = case["mel_input"][:1]
    fixed = Avatar(rt, img, EngineOptions(noise="fixed"))
    np.testing.assert_array_equal(fixed.render(mel), fixed.render(mel))  # steady video: same input, same frame
    rnd = Avatar(rt, img, EngineOptions(noise="random"))
    assert np.any(rnd.render(mel) != rnd.render(mel))
    zero = Avatar(rt, img, EngineOptions(noise="zero"))
    assert np.any(zero.render(mel) != fixed.render(mel))


def test_cross_session_batch_equals_separate_renders(seed0):
    rt, case = seed0
    a = Avatar(rt, torch.from_numpy(case["identity_input"]), EngineOptions(noise_seed=1))
    b = Avatar(rt, torch.from_numpy(case["pose_input"][2]), EngineOptions(noise_seed=2))
    mels = case["mel_input"]
    reqs = [SessionRequest(a, mels[0]), SessionRequest(b, mels[1], case["pose_code"][1, 0])]
    together = render_sessions(reqs)
    alone = [a.render(mels[:1])[0], b.render(mels[1:2], case["pose_code"][1:2, 0])[0]]
    for x, y in zip(together, alone):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    np.testing.assert_array_equal(reqs[1].result, together[1])
    assert np.any(together[0] != together[1])
