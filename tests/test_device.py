"""Device choice: every unusable --device/--dtype is one DeviceError line, raised before any checkpoint
is read. torch.cuda is monkeypatched so every branch runs on this CPU-only machine (and on a GPU one)."""
from __future__ import annotations

import warnings

import pytest
import torch

import run_live
from pcavs_live.common.errors import UserError
import pcavs.device
from pcavs.device import (DeviceError, configure_cudnn, cpu_bf16_support, cpu_flags, describe_dtype, resolve_device,
                          resolve_device_and_dtype, resolve_dtype)


def fake_gpus(monkeypatch, count: int, capability: tuple[int, int] = (9, 0)) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)


def test_device_error_is_a_user_error():
    assert issubclass(DeviceError, UserError)


def test_cpu_always_resolves(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("cpu", torch.bfloat16) == "cpu"


@pytest.mark.parametrize("count,expected", [(0, "cpu"), (2, "cuda")])
def test_auto_picks_cuda_only_when_usable(monkeypatch, count, expected):
    fake_gpus(monkeypatch, count)
    assert resolve_device("auto") == expected


def test_cuda_without_a_usable_gpu_names_the_driver_requirement(monkeypatch):
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(DeviceError, match="no usable CUDA GPU") as err:
        resolve_device("cuda")
    assert "CUDA 13" in err.value.hint and "--device cpu" in err.value.hint


def test_torch_driver_warning_becomes_the_reason(monkeypatch):
    """torch reports a too-old driver as a warning from is_available(); it must end up in our one line,
    not be printed on its own."""
    def old_driver() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).\n"
                      "Please update your GPU driver.", UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        with pytest.raises(DeviceError, match=r"driver on your system is too old \(found version 11040\)"):
            resolve_device("cuda:0")
    assert not leaked


def test_cpu_only_torch_build_says_so(monkeypatch):
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="no CUDA support"):
        resolve_device("cuda")


def test_cuda_index_beyond_the_device_count(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match=r"'cuda:2'.*only 2 CUDA GPU\(s\).*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_bfloat16_needs_sm80(monkeypatch, name):
    fake_gpus(monkeypatch, 2, capability=(7, 5))
    with pytest.raises(DeviceError, match="sm_75") as err:
        resolve_device(name, torch.bfloat16)
    assert "--dtype" in err.value.hint
    assert resolve_device(name, torch.float16) == name  # fp16 runs on Turing
    fake_gpus(monkeypatch, 2, capability=(8, 0))
    assert resolve_device(name, torch.bfloat16) == name


def test_bfloat16_check_applies_to_auto(monkeypatch):
    fake_gpus(monkeypatch, 1, capability=(7, 0))
    with pytest.raises(DeviceError, match="bfloat16"):
        resolve_device("auto", torch.bfloat16)


def test_mps_when_not_available(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "tpu", ""])
def test_unknown_device_string(name):
    with pytest.raises(DeviceError, match="unknown device") as err:
        resolve_device(name)
    assert "cuda:N" in err.value.hint


def test_cli_device_error_is_one_line_before_any_checkpoint(monkeypatch, tmp_path, capsys):
    """run_live with --device cuda and no usable GPU: exit 2, one `error:` line, no traceback, and the
    checkpoint folder (which does not exist, so reading it would be a different error) is never read."""
    fake_gpus(monkeypatch, 0)
    import pcavs_live.cli.main
    monkeypatch.setattr(pcavs_live.cli.main, "setup_logging", lambda *a, **k: None)  # leave pytest's logging alone
    monkeypatch.setattr(pcavs_live.cli.main.signal, "signal", lambda *a, **k: None)  # and its Ctrl-C handler
    loaded = []
    monkeypatch.setattr("pcavs_live.pipeline.builders.load_networks", lambda *a, **k: loaded.append(a))
    out = tmp_path / "never.mp4"
    code = run_live.main(["--device", "cuda", "--checkpoints", str(tmp_path / "nothing"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "device 'cuda' requested" in error_lines[0]
    assert "checkpoint" not in err
    assert not loaded and not out.exists()


# ------------------------------------------------------------------------------------------ dtype "auto"

@pytest.mark.parametrize("capability,expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                 ((7, 5), torch.float32)])
def test_auto_dtype_is_bf16_from_sm80_only(monkeypatch, capability, expected):
    fake_gpus(monkeypatch, 1, capability)
    assert resolve_dtype("auto", "cuda:0") == expected
    assert resolve_device_and_dtype("auto", "auto") == ("cuda", expected)


def fake_cpu(monkeypatch, flags: set[str] | None, capability: str = "AVX512") -> None:
    monkeypatch.setattr(pcavs.device, "cpu_flags", lambda path=None: None if flags is None else frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.mark.parametrize("flags,capability,expected,why", [
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AVX512", torch.bfloat16, "AMX-BF16 + AVX512-BF16"),
    ({"avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16, ": AVX512-BF16"),   # Zen 4, Cooper Lake
    ({"avx512f", "avx512_vnni", "avx2"}, "AVX512", torch.float32, "no native bf16"),  # Ice Lake, Cascade Lake
    ({"avx2", "fma"}, "AVX2", torch.float32, "no native bf16"),
    ({"avx512_bf16", "amx_bf16"}, "AVX2", torch.float32, "torch runs AVX2 kernels"),  # ATEN_CPU_CAPABILITY=avx2
    (None, "AVX512", torch.float32, "unreadable"),                             # no /proc/cpuinfo (macOS, Windows)
])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, flags, capability, expected, why):
    fake_gpus(monkeypatch, 0)
    fake_cpu(monkeypatch, flags, capability)
    assert resolve_device_and_dtype("auto", "auto") == ("cpu", expected)
    assert resolve_dtype("auto", "cpu") == expected
    support = cpu_bf16_support()
    assert support.native == (expected == torch.bfloat16) and why in support.reason
    line = describe_dtype("auto", "cpu")
    assert line.startswith(str(expected).removeprefix("torch.")) and why in line


@pytest.mark.parametrize("flags", [{"avx512_bf16", "amx_bf16"}, {"avx2"}])
def test_explicit_words_are_kept_on_cpu(monkeypatch, flags):
    fake_gpus(monkeypatch, 0)
    fake_cpu(monkeypatch, flags)
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_device_and_dtype("cpu", "float32") == ("cpu", torch.float32)
    assert resolve_device_and_dtype("cpu", "bfloat16") == ("cpu", torch.bfloat16)
    assert describe_dtype("float32", "cpu") == "float32 (as asked)"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu sse avx512_bf16 amx_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") is None
    assert cpu_bf16_support(cpu_flags(info), "AVX512").native


def test_auto_dtype_on_cuda_gives_its_reason(monkeypatch):
    fake_gpus(monkeypatch, 1, (7, 5))
    assert describe_dtype("auto", "cuda") == "float32 (auto: no bf16 tensor cores before sm_80 (this GPU is sm_75))"


def test_explicit_bf16_on_an_old_gpu_is_still_refused(monkeypatch):
    fake_gpus(monkeypatch, 1, (7, 5))
    with pytest.raises(DeviceError, match="bfloat16"):
        resolve_device_and_dtype("cuda", "bfloat16")


def test_cudnn_benchmark_is_set_by_us(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as face_alignment leaves it
    assert configure_cudnn("cpu") is False and torch.backends.cudnn.benchmark is False
    assert configure_cudnn("cuda:0") is True and torch.backends.cudnn.benchmark is True
