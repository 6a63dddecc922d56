"""Choosing the torch device: every problem a user can cause is one `DeviceError` line, found before
any checkpoint is read (the four files are ~600 MB; a bad `--device` should not cost that wait).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pcavs_live.common.errors import UserError

_DEVICE = re.compile(r"cpu|mps|cuda(?::(\d+))?")
_BF16_MIN_CAPABILITY = (8, 0)  # bfloat16 tensor-core kernels start with Ampere (sm_80)
_CPUINFO = Path("/proc/cpuinfo")
# CPU flags (Linux names) of native bf16 arithmetic: oneDNN then runs bf16 convolutions and GEMMs at about
# twice float32's rate; without them it converts to float32 and back (slower than float32 itself).
_CPU_BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


class DeviceError(UserError):
    """The requested device (or dtype on that device) cannot run here."""


def _cuda_available() -> tuple[bool, str]:
    """(usable, why not): torch reports an unusable driver as a warning, which becomes our reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reason = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
    return available, reason


def _no_cuda(name: str, reason: str) -> DeviceError:
    built_for = torch.version.cuda
    if built_for is None:
        return DeviceError(f"device {name!r} requested but this PyTorch build has no CUDA support",
                           hint="install the CUDA build of torch pinned in requirements.txt, or use --device cpu")
    detail = f" ({reason.rstrip('.')})" if reason else ""
    major = built_for.split(".")[0]
    return DeviceError(
        f"device {name!r} requested but PyTorch sees no usable CUDA GPU{detail}",
        hint=f"the pinned torch wheel is built for CUDA {built_for} and needs an NVIDIA GPU with a driver "
             f"for CUDA {major} or newer (check `nvidia-smi`); or use --device cpu")


def resolve_device(name: str, dtype: torch.dtype | None = None) -> str:
    """The torch device string for `name` ("auto", "cpu", "cuda", "cuda:N", "mps"), checked to be usable
    here with `dtype` (None: no dtype check). "auto" picks CUDA when usable, else the CPU."""
    if name == "auto":
        name = "cuda" if _cuda_available()[0] else "cpu"
    match = _DEVICE.fullmatch(name)
    if match is None:
        raise DeviceError(f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        _check_cuda(name, match.group(1), dtype)
    elif name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' requested but PyTorch sees no usable Apple GPU (MPS)",
                          hint="MPS needs Apple silicon with macOS 12.3 or newer; use --device cpu")
    return name


def _check_cuda(name: str, index_text: str | None, dtype: torch.dtype | None) -> None:
    available, reason = _cuda_available()
    if not available:
        raise _no_cuda(name, reason)
    index = int(index_text) if index_text is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {name!r} requested but only {count} CUDA GPU(s) are visible "
                          f"(cuda:0 to cuda:{count - 1})",
                          hint="pick a smaller index, or check CUDA_VISIBLE_DEVICES")
    if dtype == torch.bfloat16:
        capability = tuple(torch.cuda.get_device_capability(index))
        if capability < _BF16_MIN_CAPABILITY:
            major, minor = capability
            raise DeviceError(f"bfloat16 needs a CUDA GPU of compute capability 8.0 (Ampere) or newer; "
                              f"{name} is sm_{major}{minor}", hint="use --dtype float16 or float32")


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU has native bf16 arithmetic, and the one-line reason (for doctor and start-up)."""

    native: bool
    reason: str


def cpu_flags(path: Path = _CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags as Linux names them (None where /proc/cpuinfo cannot be read: other OSes)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_support(flags: frozenset[str] | None = None, capability: str | None = None) -> CpuBf16:
    """Native bf16 on this CPU: AMX-BF16 (Intel Sapphire Rapids and newer) or AVX512-BF16 (AMD Zen 4/5,
    Intel Cooper Lake) in the CPU flags, with torch's vector kernels built for AVX-512 (its CPU capability)
    so the elementwise ops between the convolutions run in bf16 as well. `flags`/`capability`: None reads
    this machine (tests pass both)."""
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if not flags:
        return CpuBf16(False, "CPU flags unreadable here (pass --dtype bfloat16 if the CPU has "
                              "AVX512-BF16 or AMX)")
    found = [label for flag, label in _CPU_BF16_FLAGS if flag in flags]
    if not found:
        return CpuBf16(False, "no native bf16 on this CPU (neither AMX-BF16 nor AVX512-BF16)")
    if not capability.upper().startswith("AVX512"):
        return CpuBf16(False, f"CPU has {' + '.join(found)} but torch runs {capability} kernels")
    return CpuBf16(True, f"native bf16 on this CPU: {' + '.join(found)}")


def _device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The generator's dtype for the config word `name` on the resolved `device`.

    "auto": bfloat16 on CUDA GPUs of compute capability 8.0 or newer (same range as float32, so no
    overflow guard can fail, at 2-4x float32's speed) and on CPUs with native bf16 (`cpu_bf16_support`:
    about 2x float32 there), float32 everywhere else (other CPUs convert bf16 to float32 and back; older
    GPUs have no bf16 tensor cores; MPS). An explicit word is taken as is; bf16 on a too-old GPU is
    refused by `resolve_device`."""
    return getattr(torch, name) if name != "auto" else _auto_dtype(device)[0]


def _auto_dtype(device: str) -> tuple[torch.dtype, str]:
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(_device_index(device))
        if (major, 0) >= _BF16_MIN_CAPABILITY:
            return torch.bfloat16, f"bf16 tensor cores (sm_{major}{minor})"
        return torch.float32, f"no bf16 tensor cores before sm_80 (this GPU is sm_{major}{minor})"
    if device == "cpu":
        support = cpu_bf16_support()
        return (torch.bfloat16 if support.native else torch.float32), support.reason
    return torch.float32, f"no bf16 choice made for {device}"


def describe_dtype(name: str, device: str) -> str:
    """The start-up line's account of the generator dtype: which, and why ("auto" gives its reason)."""
    if name != "auto":
        return f"{name} (as asked)"
    dtype, reason = _auto_dtype(device)
    return f"{str(dtype).removeprefix('torch.')} (auto: {reason})"


def resolve_device_and_dtype(device_name: str, dtype_name: str) -> tuple[str, torch.dtype]:
    """Both config words checked together, before any checkpoint is read (the device first: "auto"
    dtype depends on which GPU it is)."""
    explicit = None if dtype_name == "auto" else getattr(torch, dtype_name)
    device = resolve_device(device_name, explicit)
    return device, resolve_dtype(dtype_name, device)


def configure_cudnn(device: str) -> bool:
    """Set `torch.backends.cudnn.benchmark` ourselves: True on CUDA (the render shapes are a few fixed
    batch buckets, autotuned during `warm_up` before the clock starts), False elsewhere. Call it after
    anything that sets it behind our back (importing face_alignment turns it on for the whole process)
    and before the warm-up. Returns the value set."""
    enabled = device.startswith("cuda")
    torch.backends.cudnn.benchmark = enabled
    return enabled
