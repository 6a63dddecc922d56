"""Loading the four PC-AVS checkpoint files into our network classes (spec §2).

Why not just `load_state_dict`: upstream's loader silently falls back to partial loading, so a wrong or
damaged file gives a garbage avatar instead of an error. Here every key on the inference path must be
present with the right shape, and the only leniency is for the heads inference never runs (the
released E file is known to have differently sized classifier heads, upstream issue #64). Every
problem a user can cause (missing, truncated, wrong file) becomes one `CheckpointError` line that names
the file and the offending keys.
"""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from pcavs_live.common.errors import UserError
from pcavs.networks.audio_encoder import AudioEncoder
from pcavs.networks.identity_encoder import IdentityEncoder
from pcavs.networks.pose_encoder import PoseEncoder

if TYPE_CHECKING:  # the generator module is imported lazily (see load_networks)
    from pcavs.networks.generator import ModulatedGenerator

log = logging.getLogger(__name__)

FETCH_HINT = "run `python run_live.py --fetch-checkpoints` to download the PC-AVS checkpoints"
NETWORK_NAMES = ("G", "V", "E", "A_sync")  # the files upstream inference loads, in its order
NETWORK_FILES = {name: f"latest_net_{name}.pth" for name in NETWORK_NAMES}
NETWORK_ROLES = {"G": "generator", "V": "identity encoder", "E": "pose encoder", "A_sync": "audio encoder"}

# Heads stored in the files but never run at inference (spec §2). An entry matches the key itself or
# anything below it ("fc" matches "fc.weight" but not "model.fc.weight").
IGNORABLE_PREFIXES: Mapping[str, tuple[str, ...]] = {
    "G": ("style", "input.input", "noises"),
    "V": ("fc", "model.fc"),
    "E": ("classifier", "mouth_fc", "headpose_fc", "to_mouth"),
    "A_sync": ("fc",),
}

# One key that only each network's file has: lets the error say which file was passed instead.
_SIGNATURES = {
    "conv1x1.weight": "V",
    "to_headpose.0.weight": "E",
    "model.attention.0.weight": "A_sync",
    "to_rgb1.conv.weight": "G",
    "discriminator_0.model0.0.weight": "D",
}
_MAX_LISTED = 3  # offending keys named per category; the rest are counted


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message is one actionable line naming file and keys."""


@dataclass(frozen=True)
class PcavsNetworks:
    """The four inference networks, in eval mode with gradients off. The encoders are float32 (their
    BatchNorm statistics and the identity/pose features lose too much in half precision); only the
    generator runs in the model dtype (`generator_dtype`).

    Plain networks: what rendering shares across avatars (identity bank, render stream, CUDA graphs)
    is a `pcavs.runtime.RenderRuntime` made from these by whoever builds sessions; this module does
    not know about it (imports go runtime → checkpoints only)."""

    identity: IdentityEncoder
    pose: PoseEncoder
    audio: AudioEncoder
    generator: "ModulatedGenerator"

    @property
    def device(self) -> torch.device:
        return self.generator.conv1.conv.weight.device

    @property
    def generator_dtype(self) -> torch.dtype:
        return self.generator.conv1.conv.weight.dtype


# --------------------------------------------------------------------------------------- reading files
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth` state_dict (zip or legacy torch<1.6 format) without executing pickled code.

    Accepted with a warning, because they are lossless to undo: a `{"state_dict": {...}}` wrapper and a
    `module.` prefix on every key (both come from re-saving with common training wrappers; the released
    files have neither). Anything else that is not a flat str→Tensor mapping raises CheckpointError.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found: {FETCH_HINT}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a checkpoint file (.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler wraps every failure in the same preamble; only "Unsupported
        # global" means a well-formed pickle of other Python objects (numpy arrays, a whole nn.Module).
        # We do not run arbitrary pickled code, so say what was refused rather than calling it corrupt.
        detail = _weights_only_detail(exc)
        if "Unsupported global" not in detail:
            raise _unreadable(path, exc, detail) from exc
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors, which are not loaded for safety "
            f"({_clean(detail)}); expected a plain state_dict saved with torch.save(net.state_dict())") from exc
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, KeyError,
            TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        # torch.load reports damage with many exception types depending on where the bytes end or
        # which format it guessed; all of them mean the same thing to the user.
        raise _unreadable(path, exc) from exc
    return _as_flat_state_dict(obj, path)


def _unreadable(path: Path, exc: BaseException, detail: str = "") -> CheckpointError:
    reason = _clean(detail) if detail else _first_line(exc)
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt; "
                           f"{reason}): delete it and {FETCH_HINT}")


def _weights_only_detail(exc: BaseException) -> str:
    """The informative line of torch's weights-only error, which follows 'WeightsUnpickler error:'."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or next((ln for ln in lines[i + 1:] if ln), "")
    return lines[0] if lines else ""


def _clean(text: str, limit: int = 120) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _clean(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def _as_flat_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        log.warning("%s wraps its weights in a {'state_dict': ...} dict; using that entry", path)
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state_dict (a dict of tensors)")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path} is not a state_dict: non-string key {bad[0]!r}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        log.warning("%s has a 'module.' prefix on every key (saved from DataParallel); stripping it", path)
        state = {k[len("module."):]: v for k, v in state.items()}
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        shown = ", ".join(f"{k} ({type(state[k]).__name__})" for k in non_tensor[:_MAX_LISTED])
        raise CheckpointError(f"{path} is not a plain state_dict: non-tensor value for {shown}"
                              f"{_more(non_tensor)}")
    return state


# ----------------------------------------------------------------------------------- checking keys
def _is_ignorable(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


def _more(items: Sequence[object]) -> str:
    extra = len(items) - _MAX_LISTED
    return f" (+{extra} more)" if extra > 0 else ""


def _guess_other_network(keys: Mapping[str, torch.Tensor], expected_role: str) -> str:
    for key, name in _SIGNATURES.items():
        if key in keys:
            if name == "D":
                return "; it looks like the discriminator file latest_net_D.pth, which inference does not use"
            if name == "A_sync" and keys[key].dim() == 3 and keys[key].shape[1] != 2560:
                return "; it looks like the audio identity file latest_net_A.pth, which inference does not use"
            if NETWORK_ROLES[name] != expected_role:
                return f"; it looks like the {NETWORK_ROLES[name]} file {NETWORK_FILES[name]}"
    return ""


def _plan_load(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
               ignorable_prefixes: Sequence[str], role: str) -> dict[str, torch.Tensor]:
    """The entries to copy into `net`, or CheckpointError listing every mismatch on the inference path."""
    expected = net.state_dict()
    missing, unexpected, shapes, dtypes = [], [], [], []
    to_load: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        if key not in state:
            # BatchNorm's batch counter only matters in training; torch fills it in when absent.
            if not _is_ignorable(key, ignorable_prefixes) and not key.endswith(".num_batches_tracked"):
                missing.append(key)
            continue
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            if _is_ignorable(key, ignorable_prefixes):
                log.info("%s: unused head %s has shape %s (model %s); keeping the model's own values",
                         path, key, _fmt_shape(value.shape), _fmt_shape(ref.shape))
            else:
                shapes.append(f"shape of {key} is {_fmt_shape(value.shape)}, expected {_fmt_shape(ref.shape)}")
            continue
        if ref.is_floating_point() and not value.is_floating_point():
            if not _is_ignorable(key, ignorable_prefixes):
                dtypes.append(f"{key} is {str(value.dtype).removeprefix('torch.')}, expected floating point")
            continue
        to_load[key] = value
    for key in state:
        if key not in expected and not _is_ignorable(key, ignorable_prefixes):
            unexpected.append(key)
    if not (missing or unexpected or shapes or dtypes):
        return to_load
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing[:_MAX_LISTED]) + _more(missing))
    if unexpected:
        parts.append("unexpected " + ", ".join(unexpected[:_MAX_LISTED]) + _more(unexpected))
    if shapes:
        parts.append("; ".join(shapes[:_MAX_LISTED]) + _more(shapes))
    if dtypes:
        parts.append("; ".join(dtypes[:_MAX_LISTED]) + _more(dtypes))
    raise CheckpointError(f"{path} does not match the {role}: " + "; ".join(parts)
                          + _guess_other_network(state, role))


def load_network(net: nn.Module, path: str | Path, ignorable_prefixes: Sequence[str] = (),
                 role: str | None = None) -> nn.Module:
    """Copy the weights in `path` into `net` (in place; returns `net`).

    Strict for every key not under `ignorable_prefixes`: missing, unexpected, wrong-shaped or
    non-float keys raise CheckpointError. Ignorable keys may be absent, extra or differently sized; the
    model keeps its own initial values for them. `role` names the network in messages (defaults to the
    class's `checkpoint_role`, e.g. "pose encoder").
    """
    path = Path(path)
    role = role or getattr(net, "checkpoint_role", type(net).__name__)
    state = load_state_dict_file(path)
    to_load = _plan_load(net, state, path, ignorable_prefixes, role)
    result = net.load_state_dict(to_load, strict=False)
    leftover = [k for k in result.missing_keys
                if not _is_ignorable(k, ignorable_prefixes) and not k.endswith(".num_batches_tracked")]
    if leftover or result.unexpected_keys:  # cannot happen after _plan_load; guards against drift
        raise CheckpointError(f"{path}: internal key check disagreed with load_state_dict: "
                              f"{(leftover + result.unexpected_keys)[:_MAX_LISTED]}")
    return net


# ------------------------------------------------------------------------------------- all networks
def _generator_class() -> Callable[[], nn.Module]:
    # Imported here so the encoders and this loader stay usable without the generator module.
    from pcavs.networks.generator import ModulatedGenerator

    return ModulatedGenerator


def _network_factory(name: str) -> Callable[[], nn.Module]:
    encoders: dict[str, Callable[[], nn.Module]] = {"V": IdentityEncoder, "E": PoseEncoder, "A_sync": AudioEncoder}
    return _generator_class() if name == "G" else encoders[name]


def _freeze(net: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    net = net.to(device=device, dtype=dtype).eval()
    net.requires_grad_(False)
    return net


def load_networks(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> PcavsNetworks:
    """Build and load G, V, E and A_sync from `checkpoint_dir/latest_net_<name>.pth`.

    All missing files are reported at once (one line), so a partial download is obvious. The networks
    come back in eval mode with requires_grad False, on `device`; the generator in `dtype`, the encoders
    in float32 (integer buffers stay int). Half-precision encoders would put BatchNorm statistics and
    the identity feature in bf16/fp16 for a negligible saving: they run once per photo (identity),
    once per mel window (audio, ~1/20 of the generator's cost) and at the pose rate.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint_dir} not found: {FETCH_HINT}")
    absent = [NETWORK_FILES[n] for n in NETWORK_NAMES if not (checkpoint_dir / NETWORK_FILES[n]).is_file()]
    if absent:
        raise CheckpointError(f"{checkpoint_dir} lacks {', '.join(absent)}: {FETCH_HINT}")
    nets = {}
    for name in NETWORK_NAMES:
        net = _network_factory(name)()
        load_network(net, checkpoint_dir / NETWORK_FILES[name], IGNORABLE_PREFIXES[name], NETWORK_ROLES[name])
        nets[name] = _freeze(net, device, dtype if name == "G" else torch.float32)
    return PcavsNetworks(identity=nets["V"], pose=nets["E"], audio=nets["A_sync"], generator=nets["G"])


def _shape_only(factory: Callable[[], nn.Module]) -> nn.Module:
    """The network without allocating its weights (meta tensors), for key/shape checks only."""
    try:
        with torch.device("meta"):
            return factory()
    except Exception:  # a constructor that cannot run on meta tensors: pay for a real one
        return factory()


def check_checkpoint_file(name: str, path: str | Path) -> None:
    """Raise CheckpointError if `path` is not a usable `latest_net_<name>.pth` (reads the whole file)."""
    if name not in NETWORK_FILES:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORK_NAMES)}")
    net = _shape_only(_network_factory(name))
    state = load_state_dict_file(path)
    _plan_load(net, state, Path(path), IGNORABLE_PREFIXES[name], NETWORK_ROLES[name])


def describe_checkpoints(checkpoint_dir: str | Path) -> dict[str, str]:
    """{"G"|"V"|"E"|"A_sync": "present" | "missing" | "invalid"} for the files in `checkpoint_dir`.

    "present" means the file loads and every inference key matches (the same check load_networks
    does), so a fetch command can tell a finished download from a broken one. The reason for an
    "invalid" entry comes from `check_checkpoint_file`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    report = {}
    for name in NETWORK_NAMES:
        path = checkpoint_dir / NETWORK_FILES[name]
        if not path.is_file():
            report[name] = "missing"
            continue
        try:
            check_checkpoint_file(name, path)
        except CheckpointError as exc:
            log.info("%s", exc)
            report[name] = "invalid"
        else:
            report[name] = "present"
    return report
