"""What this machine has: Python, torch and its accelerator, audio devices, cameras, a virtual camera, a
virtual microphone, a free port.

Each probe is a small function that returns plain data, or raises `UserError` whose message says what is
wrong. `pcavs_live.cli.doctor` turns them into a table and `pcavs-live devices` prints the lists; tests replace the
probes (`pcavs_live.cli.doctor.Probes`) to control what the machine looks like. Heavy imports (torch, sounddevice,
pyvirtualcam, OpenCV) happen inside the probes, so a probe that is not called costs nothing.
"""
from __future__ import annotations

import errno
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pcavs_live.common.errors import UserError

# The virtual microphone each OS's call apps can pick: the device we play into and the name they see.
VB_CABLE_OUTPUT = "CABLE Input"      # Windows, VB-Audio Virtual Cable: we play into "CABLE Input"
BLACKHOLE = "BlackHole"              # macOS: "BlackHole 2ch" is both the output we play into and the mic


class ProbeError(UserError):
    """A probe found something missing or unusable; the message says what."""


@dataclass(frozen=True)
class PythonInfo:
    version: tuple[int, int, int]
    executable: str


@dataclass(frozen=True)
class TorchInfo:
    version: str
    cuda_build: str | None               # torch.version.cuda: None for a CPU-only (or macOS) build
    cuda_devices: tuple[str, ...] = ()   # "NVIDIA H200, capability 9.0" per visible GPU
    mps: bool = False                    # Apple-silicon GPU available
    cpu_dtype: str = ""                  # the CPU's "auto" generator dtype and why ("bfloat16 (auto: native ...)")


def probe_python() -> PythonInfo:
    return PythonInfo(tuple(sys.version_info[:3]), sys.executable)  # type: ignore[arg-type]


def probe_torch() -> TorchInfo:
    """torch's version and accelerators; raises ProbeError when torch cannot be imported."""
    try:
        import torch
    except ImportError as exc:  # not installed, or a broken build (missing CUDA libraries...)
        raise ProbeError(f"cannot import torch ({exc})") from None
    devices: list[str] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(f"{torch.cuda.get_device_name(i)}, capability {major}.{minor}")
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    from pcavs.device import describe_dtype
    return TorchInfo(torch.__version__, torch.version.cuda, tuple(devices), mps, describe_dtype("auto", "cpu"))


def probe_microphones() -> list[str]:
    """Input devices as `capture.audio_sources.list_input_devices` prints them (the names --audio-device takes)."""
    from capture.audio_sources import list_input_devices
    return list_input_devices()


def probe_audio_outputs() -> list[str]:
    """Output devices, "index: name (host API, channels)"; raises ProbeError without PortAudio."""
    from pcavs_live.common.audio_devices import AudioDevicesUnavailable, import_sounddevice, list_audio_devices
    try:
        sd = import_sounddevice()
    except AudioDevicesUnavailable:
        raise ProbeError("PortAudio is not installed (apt install libportaudio2)") from None
    try:
        devices = list_audio_devices(sd, "output")
    except AudioDevicesUnavailable as exc:
        raise ProbeError(str(exc)) from None
    return [f"{d.index}: {d.name} ({d.hostapi}, {d.max_channels} ch)" for d in devices]


def probe_cameras(system: str | None = None, max_index: int = 4) -> list[str]:
    """Cameras by the index --webcam-index takes. Linux: read from sysfs without opening them (virtual
    cameras marked); elsewhere: OpenCV opens indices 0..max_index (a second or two)."""
    system = system or platform.system()
    if system == "Linux":
        found = []
        for node in sorted(Path("/sys/class/video4linux").glob("video*"), key=lambda p: int(p.name[5:] or 0)):
            try:
                name = (node / "name").read_text().strip()
            except OSError:
                name = "?"
            virtual = "/virtual/" in str(node.resolve())  # v4l2loopback devices have no hardware parent
            found.append(f"{node.name[5:]}: /dev/{node.name} {name}{' (virtual)' if virtual else ''}")
        return found
    import cv2
    found = []
    for index in range(max_index + 1):
        cap = cv2.VideoCapture(index)
        try:
            if cap.isOpened():
                found.append(f"{index}: camera {index}")
        finally:
            cap.release()
    return found


def probe_virtual_camera(device: str | None, backend: str | None, width: int = 224, height: int = 224,
                         fps: int = 25) -> str:
    """Open the configured virtual camera as `--out vcam` does (pyvirtualcam) and close it again; returns
    the device's name. Raises ProbeError with pyvirtualcam's reason (the fix is the caller's to word)."""
    try:
        import pyvirtualcam
        from pyvirtualcam.camera import BACKENDS
    except ImportError as exc:
        raise ProbeError(f"cannot import pyvirtualcam ({exc})") from None
    if backend is not None and backend not in BACKENDS:
        raise ProbeError(f"backend '{backend}' is not available here (available: {', '.join(BACKENDS) or 'none'})")
    if not BACKENDS:
        raise ProbeError("pyvirtualcam has no backend on this system")
    try:
        cam = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device,
                                  backend=backend)
    except Exception as exc:  # pyvirtualcam reports every backend's failure as one RuntimeError
        reason = "; ".join(" ".join(line.split()).rstrip(" .;") for line in str(exc).splitlines() if line.strip())
        raise ProbeError(reason or type(exc).__name__) from None
    try:
        return f"{cam.device} ({cam.backend})"
    finally:
        cam.close()


def probe_virtual_microphone(system: str | None = None, outputs: list[str] | None = None) -> str:
    """The device a virtual microphone needs. Linux: a PulseAudio (or PipeWire-pulse) server that `pactl`
    reaches (the program makes its own null sink there). Windows: VB-CABLE's output device. macOS:
    BlackHole. Returns what was found; raises ProbeError otherwise."""
    system = system or platform.system()
    if system in ("Windows", "Darwin"):
        wanted = VB_CABLE_OUTPUT if system == "Windows" else BLACKHOLE
        names = probe_audio_outputs() if outputs is None else outputs
        match = next((n for n in names if wanted.lower() in n.lower()), None)
        if match is None:
            raise ProbeError(f"no '{wanted}' audio device")
        return match
    pactl = shutil.which("pactl")
    if pactl is None:
        raise ProbeError("pactl not found (PulseAudio tools)")
    try:
        info = subprocess.run([pactl, "info"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeError(f"pactl info failed ({exc})") from None
    if info.returncode != 0:
        raise ProbeError("no PulseAudio server running (pactl info: "
                         f"{' '.join((info.stderr or info.stdout).split()) or 'failed'})")
    server = next((line.split(":", 1)[1].strip() for line in info.stdout.splitlines()
                   if line.startswith("Server Name:")), "PulseAudio")
    return f"{server} (pactl)"


def probe_port(host: str, port: int) -> str:
    """Whether the viewer could listen on host:port (bound and released at once, as the server binds)."""
    if port == 0:
        return f"{host}: any free port"
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve host '{host}' ({exc.strerror})") from None
    with socket.socket(family, type_, proto) as sock:
        if platform.system() != "Windows":  # as the server does; on Windows it would hide a listening program
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ProbeError(f"port {port} on {host} is in use") from None
            raise ProbeError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return f"{host}:{port} is free"
