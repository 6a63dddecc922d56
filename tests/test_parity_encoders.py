"""Parity of the three encoders (and the style-vector assembly) with the upstream oracle.

Weights come from shared/parity/make_weights.py and go through our own checkpoint loader, so a loader
bug shows up here too. Tolerances are the oracle README's (rtol 1e-4, atol 1e-5); the oracle's own
float noise is ~2e-6, so a failure is a real difference in our code, not a reason to loosen them.
Run with `-s` to see the max |Δ| per array and seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import load_case, parity_weights_dir
from pcavs.checkpoints import IGNORABLE_PREFIXES, NETWORK_FILES, load_network
from pcavs.networks.audio_encoder import AudioEncoder
from pcavs.networks.identity_encoder import IdentityEncoder
from pcavs.networks.pose_encoder import PoseEncoder

RTOL, ATOL = 1e-4, 1e-5
MOUTH_WEIGHT = 1.2  # upstream inference() default (spec §3.5)
COMPARED = ("id_feature", "id_map", "audio_feature", "ref_noid_feature", "ref_headpose_feature",
            "ref_pose_code", "pose_noid_feature", "pose_headpose_feature", "pose_code", "mouth_embed",
            "style_ref", "style_driven")


def _load(net: torch.nn.Module, seed: int, name: str) -> torch.nn.Module:
    path = parity_weights_dir(seed) / NETWORK_FILES[name]
    return load_network(net, path, IGNORABLE_PREFIXES[name]).eval()


@pytest.fixture(scope="module")
def case(parity_seed: int) -> dict[str, np.ndarray]:
    return load_case(parity_seed)


@pytest.fixture(scope="module")
def identity_net(parity_seed: int) -> IdentityEncoder:
    return _load(IdentityEncoder(), parity_seed, "V")


@pytest.fixture(scope="module")
def computed(parity_seed: int, case: dict[str, np.ndarray], identity_net: IdentityEncoder) -> dict[str, np.ndarray]:
    """Every compared array, computed once per seed the way upstream `inference()` chains them."""
    pose_net = _load(PoseEncoder(), parity_seed, "E")
    audio_net = _load(AudioEncoder(), parity_seed, "A_sync")
    batch = case["pose_input"].shape[0]
    # Upstream fed the identity image replicated over the batch; do the same so shapes match exactly.
    identity = torch.from_numpy(case["identity_input"])[None].expand(batch, -1, -1, -1).contiguous()
    poses = torch.from_numpy(case["pose_input"])
    mels = torch.from_numpy(case["mel_input"])
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        out["id_feature"], out["id_map"] = identity_net(identity)
        out["audio_feature"] = audio_net(mels)
        out["ref_noid_feature"] = pose_net.noid_feature(identity)
        out["ref_headpose_feature"] = pose_net.headpose_feature(out["ref_noid_feature"])
        out["ref_pose_code"] = pose_net.headpose_embed(out["ref_headpose_feature"])
        out["pose_noid_feature"] = pose_net.noid_feature(poses)
        out["pose_headpose_feature"] = pose_net.headpose_feature(out["pose_noid_feature"])
        out["pose_code"] = pose_net.pose_code(poses)
        out["mouth_embed"] = pose_net.mouth_code(out["audio_feature"] * MOUTH_WEIGHT)
        out["style_ref"] = torch.cat([out["id_feature"], out["mouth_embed"], out["ref_pose_code"]], dim=1)
        out["style_driven"] = torch.cat([out["id_feature"], out["mouth_embed"], out["pose_code"]], dim=1)
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("name", COMPARED)
def test_encoder_output_matches_oracle(name: str, parity_seed: int, case, computed, record_property) -> None:
    expected = case[name]
    # Upstream keeps a clip axis of length 1 on some heads ((B,1,512), (B,1,12)); ours is (B,·).
    assert computed[name].size == expected.size, (computed[name].shape, expected.shape)
    actual = computed[name].reshape(expected.shape)
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    record_property(f"max_abs_diff_seed{parity_seed}_{name}", diff)
    print(f"\nseed{parity_seed} {name:22s} shape {str(expected.shape):18s} max|diff| {diff:.3e}")
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=f"seed {parity_seed} {name}")


def test_pose_code_separates_pose_frames(parity_seed: int, computed) -> None:
    """Guard against a comparison that passes trivially: the three pose frames must give distinct codes
    (the oracle's sensitivity relies on it), while the replicated identity gives identical rows."""
    codes = computed["pose_code"].reshape(3, 12)
    assert np.abs(codes[0] - codes[1]).max() > 1e-3 and np.abs(codes[1] - codes[2]).max() > 1e-3
    ref = computed["ref_pose_code"].reshape(3, 12)
    np.testing.assert_allclose(ref[0], ref[1], rtol=0, atol=1e-6)


def test_single_identity_image_matches_replicated_batch(case, computed, identity_net: IdentityEncoder) -> None:
    """The engine encodes the photo once at batch 1; that must agree with the oracle's batch-3 rows."""
    with torch.inference_mode():
        id_feature, id_map = identity_net(torch.from_numpy(case["identity_input"])[None])
    np.testing.assert_allclose(id_feature[0].numpy(), case["id_feature"][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(id_map[0].numpy(), case["id_map"][0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,cls", [("V", IdentityEncoder), ("E", PoseEncoder), ("A_sync", AudioEncoder)])
def test_state_dict_layout_matches_manifest(name: str, cls: type, parity_dir: Path) -> None:
    """Keys, order, shapes and dtypes exactly as the upstream module's state_dict (manifest.json)."""
    manifest = json.loads((parity_dir / "manifest.json").read_text())["networks"][name]
    with torch.device("meta"):
        net = cls()
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in net.state_dict().items()]
    assert ours == [entry[:3] for entry in manifest["keys"]]
    assert sum(p.numel() for p in net.parameters()) == manifest["num_parameters"]
