"""Checkpoint loader: strict on the inference path, tolerant for unused heads, one-line errors.

Most cases use freshly initialised encoders saved to tmp_path (no shared oracle needed); the end-to-end
`load_networks` test uses the parity weights and the generator module when both exist.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pcavs.checkpoints import (IGNORABLE_PREFIXES, NETWORK_FILES, CheckpointError, PcavsNetworks,
                               check_checkpoint_file, describe_checkpoints, load_network, load_networks,
                               load_state_dict_file)
from pcavs.networks.audio_encoder import AudioEncoder
from pcavs.networks.identity_encoder import IdentityEncoder
from pcavs.networks.pose_encoder import PoseEncoder

E_IGNORE = IGNORABLE_PREFIXES["E"]
HAS_GENERATOR = importlib.util.find_spec("pcavs.networks.generator") is not None


@pytest.fixture(scope="module")
def pose_state() -> dict[str, torch.Tensor]:
    """A complete, valid E state_dict (random init, nonzero BN statistics so copies are detectable)."""
    torch.manual_seed(0)
    net = PoseEncoder()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.normal_(0, 0.1)
    return state


@pytest.fixture(scope="module")
def target() -> PoseEncoder:
    """One model for the error cases (errors are raised before anything is copied)."""
    torch.manual_seed(1)
    return PoseEncoder()


@pytest.fixture
def fresh() -> PoseEncoder:
    """A model that has never seen `pose_state`, so a successful load is visible in its values."""
    torch.manual_seed(2)
    return PoseEncoder()


def _save(state: dict, path: Path, legacy: bool = False) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def _assert_loaded(net: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = net.state_dict()
    checked = 0
    for k, v in state.items():
        if any(k == p or k.startswith(p + ".") for p in skip):
            continue
        assert torch.equal(got[k], v), k
        checked += 1
    assert checked > 250  # E has 363 keys; most of them must have been compared


def _error(net: torch.nn.Module, path: Path, ignorable=E_IGNORE) -> str:
    with pytest.raises(CheckpointError) as info:
        load_network(net, path, ignorable)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ------------------------------------------------------------------------------------------- formats
def test_legacy_non_zip_format_loads(pose_state, fresh, tmp_path) -> None:
    path = _save(pose_state, tmp_path / "latest_net_E.pth", legacy=True)
    assert path.read_bytes()[:2] != b"PK"  # really the pre-1.6 pickle format, as the released files
    assert list(load_state_dict_file(path)) == list(pose_state)
    _assert_loaded(load_network(fresh, path, E_IGNORE), pose_state)


def test_missing_file_says_how_to_fetch(target, tmp_path) -> None:
    message = _error(target, tmp_path / "demo" / "latest_net_E.pth")
    assert "not found" in message and "python run_live.py --fetch-checkpoints" in message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(pose_state, target, tmp_path, legacy, keep) -> None:
    data = _save(pose_state, tmp_path / "full.pth", legacy=legacy).read_bytes()
    path = tmp_path / "latest_net_E.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    message = _error(target, path)
    assert "truncated or corrupt" in message and "--fetch-checkpoints" in message


@pytest.mark.parametrize("content", [b"", b"<html>404 Not Found</html>\n" * 20], ids=["empty", "html"])
def test_non_checkpoint_file(target, tmp_path, content) -> None:
    path = tmp_path / "latest_net_E.pth"
    path.write_bytes(content)
    assert "not a readable PyTorch checkpoint" in _error(target, path)


def test_non_tensor_value_is_named(pose_state, target, tmp_path) -> None:
    state = dict(pose_state, **{"model.l0.bias": [0.0] * 68})
    message = _error(target, _save(state, tmp_path / "latest_net_E.pth"))
    assert "model.l0.bias (list)" in message


def test_pickled_objects_are_refused_not_executed(pose_state, target, tmp_path) -> None:
    state = dict(pose_state, **{"model.l0.bias": np.zeros(68, np.float32)})  # needs a numpy global
    message = _error(target, _save(state, tmp_path / "latest_net_E.pth"))
    assert "pickled Python objects" in message and "numpy" in message


def test_not_a_dict(target, tmp_path) -> None:
    message = _error(target, _save([torch.zeros(3)], tmp_path / "latest_net_E.pth"))
    assert "holds a list" in message


def test_wrapper_dict_and_module_prefix_load_with_warning(pose_state, fresh, tmp_path, caplog) -> None:
    wrapped = {"state_dict": {"module." + k: v for k, v in pose_state.items()}, "epoch": torch.tensor(3)}
    path = _save(wrapped, tmp_path / "latest_net_E.pth")
    with caplog.at_level(logging.WARNING, logger="pcavs.checkpoints"):
        load_network(fresh, path, E_IGNORE)
    _assert_loaded(fresh, pose_state)
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "state_dict" in warnings and "module." in warnings


# ---------------------------------------------------------------------------------- strict key checks
def test_removed_key_is_named(pose_state, target, tmp_path) -> None:
    state = {k: v for k, v in pose_state.items() if k != "model.m0.b3_1.conv2.weight"}
    message = _error(target, _save(state, tmp_path / "latest_net_E.pth"))
    assert "does not match the pose encoder" in message
    assert "missing model.m0.b3_1.conv2.weight" in message


def test_wrong_shape_is_named(pose_state, target, tmp_path) -> None:
    state = dict(pose_state, **{"to_headpose.2.weight": torch.zeros(512, 256)})
    message = _error(target, _save(state, tmp_path / "latest_net_E.pth"))
    assert "shape of to_headpose.2.weight is (512,256), expected (512,512)" in message


def test_integer_tensor_for_a_weight_is_rejected(pose_state, target, tmp_path) -> None:
    state = dict(pose_state, **{"headpose_embed.1.bias": torch.zeros(12, dtype=torch.int64)})
    message = _error(target, _save(state, tmp_path / "latest_net_E.pth"))
    assert "headpose_embed.1.bias is int64" in message


def test_unexpected_inference_key_is_named(pose_state, target, tmp_path) -> None:
    state = dict(pose_state, **{"headpose_embed.3.weight": torch.zeros(12, 12)})
    message = _error(target, _save(state, tmp_path / "latest_net_E.pth"))
    assert "unexpected headpose_embed.3.weight" in message


def test_identity_file_passed_as_pose_encoder(target, tmp_path) -> None:
    with torch.device("meta"):
        shapes = IdentityEncoder().state_dict()
    v_state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    message = _error(target, _save(v_state, tmp_path / "latest_net_V.pth"))
    # model.conv1.weight and model.bn1.* exist in both files with equal shapes; the E-only keys don't.
    assert "missing model.conv1.bias, model.conv2.bn1.weight" in message
    assert "unexpected model.layer1.0.conv1.weight" in message
    assert "looks like the identity encoder file latest_net_V.pth" in message


def test_ignorable_prefix_does_not_cover_inference_keys(tmp_path) -> None:
    """A_sync ignores its `fc` head, but `model.fc` is the audio feature projection and must be there."""
    net = AudioEncoder()
    state = {k: v for k, v in net.state_dict().items() if k != "model.fc.weight"}
    message = _error(net, _save(state, tmp_path / "latest_net_A_sync.pth"), IGNORABLE_PREFIXES["A_sync"])
    assert "missing model.fc.weight" in message and "audio encoder" in message


# ------------------------------------------------------------------------------- tolerated differences
def test_unused_heads_may_differ(pose_state, fresh, tmp_path) -> None:
    """Upstream issue #64: E files whose classifier heads are missing or sized for another dataset."""
    state = dict(pose_state)
    state["classifier.2.weight"] = torch.randn(1000, 512)   # other number of identities
    state["classifier.2.bias"] = torch.randn(1000)
    state["classifier.4.weight"] = torch.randn(3, 3)        # a head layer our model does not have
    del state["headpose_fc.1.weight"], state["headpose_fc.1.bias"]  # head absent altogether
    state["mouth_fc.1.weight"] = torch.randn(5830, 2560)    # clip_len 5 variant
    for k in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[k]  # pre-0.4.1 BatchNorm files lack the (training-only) batch counter
    path = _save(state, tmp_path / "latest_net_E.pth", legacy=True)
    load_network(fresh, path, E_IGNORE)
    _assert_loaded(fresh, {k: v for k, v in state.items() if k in pose_state}, skip=E_IGNORE)
    # The inference path is fully usable: same pose code as with the clean file.
    clean = load_network(PoseEncoder(), _save(pose_state, tmp_path / "clean.pth"), E_IGNORE).eval()
    img = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(fresh.eval().pose_code(img), clean.pose_code(img))


# ---------------------------------------------------------------------------------- folder-level API
def test_load_networks_reports_all_missing_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found.*--fetch-checkpoints"):
        load_networks(tmp_path / "nowhere")
    (tmp_path / NETWORK_FILES["E"]).write_bytes(b"x")
    with pytest.raises(CheckpointError) as info:
        load_networks(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "--fetch-checkpoints" in message
    assert "latest_net_G.pth, latest_net_V.pth, latest_net_A_sync.pth" in message


def test_check_checkpoint_file(pose_state, tmp_path) -> None:
    good = _save(pose_state, tmp_path / "latest_net_E.pth")
    check_checkpoint_file("E", good)
    with pytest.raises(CheckpointError, match="does not match the audio encoder"):
        check_checkpoint_file("A_sync", good)
    with pytest.raises(ValueError, match="unknown network"):
        check_checkpoint_file("X", good)


class StubGenerator(torch.nn.Module):
    """Stands in for ModulatedGenerator (another module) so the folder-level API is tested on its own:
    one inference key (`conv1.weight`) and the generator's ignorable groups."""

    checkpoint_role = "generator"

    def __init__(self) -> None:
        super().__init__()
        self.style = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 4))
        self.conv1 = torch.nn.Conv2d(2, 2, 3)
        self.noises = torch.nn.Module()
        self.noises.register_buffer("noise_0", torch.zeros(1, 1, 7, 7))


@pytest.fixture
def stub_generator(monkeypatch) -> type[StubGenerator]:
    monkeypatch.setattr("pcavs.checkpoints._generator_class", lambda: StubGenerator)
    return StubGenerator


def _stub_g_state(**overrides) -> dict[str, torch.Tensor]:
    state = {k: torch.randn(v.shape) for k, v in StubGenerator().state_dict().items()}
    state.update(overrides)
    return state


def test_describe_checkpoints(stub_generator, pose_state, tmp_path) -> None:
    _save(pose_state, tmp_path / NETWORK_FILES["E"])
    (tmp_path / NETWORK_FILES["A_sync"]).write_bytes(b"\x80\x02")  # truncated
    _save({k: v for k, v in pose_state.items() if k != "model.conv1.weight"}, tmp_path / NETWORK_FILES["V"])
    assert describe_checkpoints(tmp_path) == {"G": "missing", "V": "invalid", "E": "present",
                                              "A_sync": "invalid"}
    _save(_stub_g_state(**{"conv1.weight": torch.zeros(2, 2, 1, 1)}), tmp_path / NETWORK_FILES["G"])
    assert describe_checkpoints(tmp_path)["G"] == "invalid"
    # A mapping MLP of another width and absent noise buffers are unused parts: still "present".
    state = _stub_g_state(**{"style.1.weight": torch.zeros(8, 8)})
    del state["noises.noise_0"]
    _save(state, tmp_path / NETWORK_FILES["G"])
    assert describe_checkpoints(tmp_path)["G"] == "present"


def test_load_networks_with_stub_generator(stub_generator, tmp_path) -> None:
    from tests.conftest import load_case, parity_weights_dir

    weights = parity_weights_dir(0)
    for name in ("V", "E", "A_sync"):
        (tmp_path / NETWORK_FILES[name]).symlink_to(weights / NETWORK_FILES[name])
    g_state = _stub_g_state()
    _save(g_state, tmp_path / NETWORK_FILES["G"])
    nets = load_networks(tmp_path)
    assert isinstance(nets, PcavsNetworks)
    assert isinstance(nets.identity, IdentityEncoder) and isinstance(nets.pose, PoseEncoder)
    assert isinstance(nets.audio, AudioEncoder) and isinstance(nets.generator, StubGenerator)
    for net in (nets.identity, nets.pose, nets.audio, nets.generator):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())
    assert torch.equal(nets.generator.conv1.weight, g_state["conv1.weight"])
    case = load_case(0)
    with torch.inference_mode():
        audio = nets.audio(torch.from_numpy(case["mel_input"]))
    torch.testing.assert_close(audio, torch.from_numpy(case["audio_feature"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(AttributeError):
        nets.pose = nets.pose  # frozen: the engine shares one instance across sessions


@pytest.mark.skipif(not HAS_GENERATOR, reason="pcavs/networks/generator.py not written yet")
def test_load_networks_end_to_end(tmp_path) -> None:
    from tests.conftest import load_case, parity_weights_dir

    weights = parity_weights_dir(0)
    assert describe_checkpoints(weights) == dict.fromkeys(["G", "V", "E", "A_sync"], "present")
    nets = load_networks(weights)
    for net in (nets.identity, nets.pose, nets.audio, nets.generator):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())
    case = load_case(0)
    with torch.inference_mode():
        id_feature, id_map = nets.identity(torch.from_numpy(case["identity_input"])[None])
    torch.testing.assert_close(id_map[0], torch.from_numpy(case["id_map"][0]), rtol=1e-4, atol=1e-5)
    # A damaged file in an otherwise complete folder fails with that file's name (G: checked first).
    for name, file in NETWORK_FILES.items():
        if name != "G":
            (tmp_path / file).symlink_to(weights / file)
    with open(weights / NETWORK_FILES["G"], "rb") as src:
        (tmp_path / NETWORK_FILES["G"]).write_bytes(src.read(1 << 20))
    with pytest.raises(CheckpointError, match="latest_net_G.pth is not a readable"):
        load_networks(tmp_path)
    assert describe_checkpoints(tmp_path)["G"] == "invalid"
