"""`pcavs-live doctor` against machine states the tests control: every probe is replaced by a fake, so each
row's verdict, its fix and the exit code follow from the state given here, not from this machine."""
from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from pcavs_live.cli import doctor
from pcavs_live.cli.config import load_config
from pcavs_live.cli.doctor import EXIT_MISSING, Probes, diagnose, exit_code, render
from pcavs_live.cli.machine import ProbeError, PythonInfo, TorchInfo, probe_port, probe_virtual_microphone
from pcavs.alignment import LANDMARK_MODEL_FILES

NETS = ("G", "V", "E", "A_sync")


def _raise(message: str):
    def probe(*_args):
        raise ProbeError(message)
    return probe


def healthy(tmp_path: Path, system: str = "Linux") -> Probes:
    """A machine with everything: a GPU, the checkpoints, the face weights, a microphone, v4l2loopback,
    PulseAudio, a free port."""
    return Probes(
        system=system,
        python=lambda: PythonInfo((3, 11, 7), "/opt/py/bin/python"),
        torch=lambda: TorchInfo("2.14.1+cu130", "13.0", ("NVIDIA H200, capability 9.0",), False),
        checkpoints=lambda folder: {net: "present" for net in NETS},
        landmark_dir=lambda: tmp_path / "torch" / "hub" / "checkpoints",
        landmarks=lambda folder: {name: "ok" for name in LANDMARK_MODEL_FILES},
        microphones=lambda: ["0: USB Mic (ALSA, 1 ch, 48000 Hz)", "1: pulse (ALSA, 32 ch, 44100 Hz)"],
        virtual_camera=lambda device, backend: "/dev/video10 (v4l2loopback)",
        virtual_microphone=lambda system: "PulseAudio (pactl)",
        port=lambda host, port: f"{host}:{port} is free",
    )


def config_for(tmp_path: Path, **overrides):
    return load_config(None, {"model.checkpoint_dir": str(tmp_path / "ckpt"), **overrides}, cwd=tmp_path)


def rows_by_check(rows):
    return {r.check: r for r in rows}


def line_of(table: str, check: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(check + " "))


def test_all_ok_exits_zero_and_every_row_says_ok(tmp_path):
    rows = diagnose(config_for(tmp_path), healthy(tmp_path))
    assert [r.check for r in rows] == ["python", "torch", "checkpoints", "face weights", "microphone",
                                       "viewer port", "virtual camera", "virtual mic"]  # outputs: registry order
    assert all(r.ok for r in rows), render(rows)
    assert exit_code(rows) == 0
    table = render(rows)
    assert table.splitlines()[-1] == "everything this configuration needs is here"
    assert "runs on cuda: NVIDIA H200, capability 9.0" in line_of(table, "torch")
    assert "fix:" not in table


def test_missing_checkpoints_name_the_fetch_command_and_fail(tmp_path):
    probes = replace(healthy(tmp_path), checkpoints=lambda folder: {"G": "missing", "V": "invalid", "E": "present",
                                                                     "A_sync": "present"})
    rows = diagnose(config_for(tmp_path), probes, fetch_command="pcavs-live fetch --checkpoints X")
    table = render(rows)
    line = line_of(table, "checkpoints")
    assert line.split()[1] == "missing"
    assert str(tmp_path / "ckpt") in line and "G missing" in line and "V invalid" in line and "E " not in line
    assert line.endswith("fix: pcavs-live fetch --checkpoints X")
    assert exit_code(rows) == EXIT_MISSING
    assert table.splitlines()[-1] == "missing for this configuration: checkpoints"


def test_virtual_camera_fails_the_run_only_when_an_output_needs_it(tmp_path):
    probes = replace(healthy(tmp_path), virtual_camera=_raise("No v4l2 loopback device found"))
    plain = diagnose(config_for(tmp_path), probes)
    assert exit_code(plain) == 0
    row = rows_by_check(plain)["virtual camera"]
    assert not row.ok and not row.needed and "modprobe v4l2loopback" in row.fix
    assert "not needed by this configuration" in line_of(render(plain), "virtual camera")

    vcam = diagnose(config_for(tmp_path, **{"output.targets": "webrtc,vcam"}), probes)
    assert exit_code(vcam) == EXIT_MISSING
    line = line_of(render(vcam), "virtual camera")
    assert "No v4l2 loopback device found" in line and "not needed" not in line

    windows = diagnose(config_for(tmp_path, **{"output.targets": "vcam"}), replace(probes, system="Windows"))
    assert "OBS Studio" in rows_by_check(windows)["virtual camera"].fix


def test_microphone_is_needed_for_mic_audio_and_matches_the_configured_device(tmp_path):
    none = replace(healthy(tmp_path), microphones=lambda: [])
    assert exit_code(diagnose(config_for(tmp_path), none)) == 0
    mic_rows = diagnose(config_for(tmp_path, **{"audio.source": "mic"}), none)
    assert exit_code(mic_rows) == EXIT_MISSING
    assert "libportaudio2" in rows_by_check(mic_rows)["microphone"].fix
    mac = rows_by_check(diagnose(config_for(tmp_path, **{"audio.source": "mic"}), replace(none, system="Darwin")))
    assert "Privacy & Security" in mac["microphone"].fix

    usb = rows_by_check(diagnose(config_for(tmp_path, **{"audio.source": "mic", "audio.device": "usb"}),
                                 healthy(tmp_path)))["microphone"]
    assert usb.ok and usb.detail.startswith("0: USB Mic")
    by_index = rows_by_check(diagnose(config_for(tmp_path, **{"audio.source": "mic", "audio.device": "1"}),
                                      healthy(tmp_path)))["microphone"]
    assert by_index.ok and by_index.detail.startswith("1: pulse")
    wrong = diagnose(config_for(tmp_path, **{"audio.source": "mic", "audio.device": "Blue Yeti"}), healthy(tmp_path))
    assert exit_code(wrong) == EXIT_MISSING and "'Blue Yeti'" in rows_by_check(wrong)["microphone"].detail


def test_torch_rows_for_missing_gpu_and_missing_torch(tmp_path):
    cpu_only = replace(healthy(tmp_path), torch=lambda: TorchInfo("2.14.1+cpu", None, (), False))
    auto = rows_by_check(diagnose(config_for(tmp_path), cpu_only))["torch"]
    assert auto.ok and "runs on cpu" in auto.detail
    cuda = diagnose(config_for(tmp_path, **{"model.device": "cuda"}), cpu_only)
    row = rows_by_check(cuda)["torch"]
    assert not row.ok and "no CUDA support" in row.detail and exit_code(cuda) == EXIT_MISSING
    assert doctor.TORCH_CUDA_INDEX in row.fix and doctor.TORCH_PINS in row.fix

    mps = rows_by_check(diagnose(config_for(tmp_path, **{"model.device": "mps"}), cpu_only))["torch"]
    assert not mps.ok and "--device cpu" in mps.fix

    bf16 = replace(healthy(tmp_path), torch=lambda: TorchInfo("2.14.1+cpu", None, (), False,
                                                              "bfloat16 (auto: native bf16 on this CPU: AMX-BF16)"))
    row = rows_by_check(diagnose(config_for(tmp_path), bf16))["torch"]
    assert row.ok and "generator in bfloat16 (auto: native bf16 on this CPU: AMX-BF16)" in row.detail

    gone = replace(healthy(tmp_path, system="Windows"), torch=_raise("cannot import torch (No module named 'torch')"))
    row = rows_by_check(diagnose(config_for(tmp_path), gone))["torch"]
    assert not row.ok and row.fix == f"pip install {doctor.TORCH_PINS} --index-url {doctor.TORCH_CPU_INDEX}"
    assert doctor.torch_install_fix("Darwin", cuda=False) == f"pip install {doctor.TORCH_PINS}"


def test_face_weights_are_needed_for_a_photo_without_sidecar_or_a_moving_pose(tmp_path):
    missing = replace(healthy(tmp_path), landmarks=lambda folder: {name: "missing" for name in LANDMARK_MODEL_FILES})
    # The bundled sample photo has a landmark sidecar and the pose is still: no detector runs.
    assert exit_code(diagnose(config_for(tmp_path), missing)) == 0
    photo = tmp_path / "me.jpg"
    photo.write_bytes(b"not read by doctor")
    for overrides in ({"identity.photo": str(photo)}, {"pose.source": "webcam"}):
        rows = diagnose(config_for(tmp_path, **overrides), missing, fetch_command="pcavs-live fetch")
        row = rows_by_check(rows)["face weights"]
        assert not row.ok and row.needed and row.fix == "pcavs-live fetch", overrides
        assert str(tmp_path / "torch" / "hub" / "checkpoints") in row.detail
        assert exit_code(rows) == EXIT_MISSING


def test_port_in_use_fails_only_with_the_viewer(tmp_path):
    busy = replace(healthy(tmp_path), port=_raise("port 8080 on 127.0.0.1 is in use"))
    rows = diagnose(config_for(tmp_path), busy)  # default output: the viewer
    assert exit_code(rows) == EXIT_MISSING and "--port 8081" in rows_by_check(rows)["viewer port"].fix
    file_only = diagnose(config_for(tmp_path, **{"output.targets": "file"}), busy)
    assert exit_code(file_only) == 0


def test_virtual_microphone_row_follows_the_os(tmp_path):
    probes = replace(healthy(tmp_path, system="Windows"), virtual_microphone=_raise("no 'CABLE Input' audio device"))
    row = rows_by_check(diagnose(config_for(tmp_path), probes))["virtual mic"]
    assert not row.ok and not row.needed and "VB-CABLE" in row.fix and "CABLE Output" in row.fix
    mac = rows_by_check(diagnose(config_for(tmp_path), replace(probes, system="Darwin")))["virtual mic"]
    assert "blackhole-2ch" in mac.fix


def test_virtual_microphone_probe_finds_the_os_device():
    outputs = ["3: Speakers (Realtek) (MME, 2 ch)", "7: CABLE Input (VB-Audio Virtual Cable) (MME, 8 ch)"]
    assert probe_virtual_microphone("Windows", outputs).startswith("7: CABLE Input")
    with pytest.raises(ProbeError, match="BlackHole"):
        probe_virtual_microphone("Darwin", outputs)
    assert "BlackHole 2ch" in probe_virtual_microphone("Darwin", ["2: BlackHole 2ch (Core Audio, 2 ch)"])


def test_port_probe_sees_a_listening_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(ProbeError, match=f"port {port} on 127.0.0.1 is in use"):
            probe_port("127.0.0.1", port)
    assert probe_port("127.0.0.1", port) == f"127.0.0.1:{port} is free"
    assert "any free port" in probe_port("127.0.0.1", 0)


def test_doctor_command_prints_the_table_and_exit_code(tmp_path, monkeypatch, capsys):
    """The command-line path: options pick what is needed, the fix names the options' checkpoint folder."""
    from pcavs_live.cli.main import main

    state = {"probes": replace(healthy(tmp_path), checkpoints=lambda folder: {net: "missing" for net in NETS})}
    monkeypatch.setattr(doctor, "Probes", lambda: state["probes"])
    code = main(["doctor", "--checkpoints", str(tmp_path / "ck")], prog="pcavs-live")
    out = capsys.readouterr().out
    assert code == EXIT_MISSING
    assert out.splitlines()[0].startswith("config: ") and out.splitlines()[0].endswith("default.toml")
    assert line_of(out, "checkpoints").endswith(f"fix: pcavs-live fetch --checkpoints {tmp_path / 'ck'}")

    state["probes"] = healthy(tmp_path)
    assert main(["doctor", "--out", "vcam", "--audio", "mic"], prog="run_live.py") == 0
    state["probes"] = replace(healthy(tmp_path), virtual_camera=_raise("no OBS"))
    assert main(["doctor", "--out", "vcam"], prog="run_live.py") == EXIT_MISSING
    assert "missing for this configuration: virtual camera" in capsys.readouterr().out
