"""`pcavs-live doctor`: one table of what this machine has for the configured run, each row `ok` or `missing`
with the exact fix, and an exit code that is non-zero when something the run needs is missing.

Rows: Python; torch and the device the run would use; the checkpoints (present and loadable); the
face_alignment weights (present, SHA-256 checked); microphones; then one row per output that has a doctor
check in the output registry (`pcavs_live.pipeline.outputs.OUTPUTS`: the viewer's port, the virtual
camera, the virtual microphone), in the registry's order. Whether a row is *needed* follows the
configuration: an output's row only when output.targets has it, the microphone only for an audio input
that is a device (`pcavs_live.pipeline.inputs.AUDIO_INPUTS`), the face_alignment weights only when a face
detector will run (a photo without a landmark sidecar, or a webcam/video pose), and so on. A missing row
that is not needed is still shown (with its fix) but does not fail the command.

Each check is a small function of a probe's result and the config; the probes (`Probes`, defaults in
`pcavs_live.cli.machine`) are parameters, so tests decide what the machine looks like.
"""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pcavs_live.cli.machine import (PythonInfo, TorchInfo, probe_microphones, probe_port, probe_python, probe_torch,
                                    probe_virtual_camera, probe_virtual_microphone)
from pcavs_live.common.errors import UserError
from pcavs_live.pipeline.inputs import audio_input, pose_input
from pcavs_live.pipeline.options import Config
from pcavs_live.pipeline.outputs import OUTPUTS, Output

EXIT_MISSING = 1
MIN_PYTHON = (3, 11)
# The torch builds pyproject.toml pins (tests/test_install.py keeps the two equal) and the wheel indexes of
# its CPU and CUDA builds (PyPI's Linux build is the CUDA one, its Windows build CPU-only).
TORCH_PINS = "torch==2.14.1 torchvision==0.29.1"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Row:
    check: str
    ok: bool
    detail: str         # what was found (or what is wrong)
    fix: str = ""       # the exact step that makes it ok
    needed: bool = True  # the configured run cannot work without it

    @property
    def status(self) -> str:
        return "ok" if self.ok else "missing"

    @property
    def blocking(self) -> bool:
        return self.needed and not self.ok


def _describe_checkpoints(folder: Path) -> dict[str, str]:
    from pcavs.checkpoints import describe_checkpoints  # loads each file into its network: torch
    return describe_checkpoints(folder)


def _landmark_dir() -> Path:
    from pcavs_live.cli.fetch import default_landmark_dir
    return default_landmark_dir()


def _landmark_status(folder: Path) -> dict[str, str]:
    from pcavs_live.cli.fetch import landmark_status
    return landmark_status(folder)


@dataclass(frozen=True)
class Probes:
    """How doctor looks at the machine; each field replaceable (tests pass fakes). An output's doctor
    check (`pcavs_live.pipeline.outputs.DoctorCheck`) names the field that looks for it."""

    system: str = field(default_factory=platform.system)                            # "Linux", "Windows", "Darwin"
    python: Callable[[], PythonInfo] = probe_python
    torch: Callable[[], TorchInfo] = probe_torch
    checkpoints: Callable[[Path], dict[str, str]] = _describe_checkpoints           # {net: "present"|...}
    landmark_dir: Callable[[], Path] = _landmark_dir
    landmarks: Callable[[Path], dict[str, str]] = _landmark_status                  # {file: "ok"|...}
    microphones: Callable[[], list[str]] = probe_microphones
    virtual_camera: Callable[[str | None, str | None], str] = probe_virtual_camera
    virtual_microphone: Callable[[str], str] = probe_virtual_microphone
    port: Callable[[str, int], str] = probe_port


# --------------------------------------------------------------------------- what the run needs
def needs_face_detector(config: Config) -> bool:
    """A detector runs for a pose video or webcam, or for a photo without its landmark sidecar."""
    from pcavs.alignment import sidecar_path
    return pose_input(config.pose).needs_detector or not sidecar_path(config.identity.photo).is_file()


# --------------------------------------------------------------------------- the checks
def torch_install_fix(system: str, cuda: bool) -> str:
    if system == "Darwin":
        return f"pip install {TORCH_PINS}"
    index = TORCH_CUDA_INDEX if cuda else TORCH_CPU_INDEX
    return f"pip install {TORCH_PINS} --index-url {index}"


def check_python(info: PythonInfo) -> Row:
    version = ".".join(map(str, info.version))
    ok = tuple(info.version[:2]) >= MIN_PYTHON
    return Row("python", ok, f"{version} ({info.executable})" if ok else f"{version} is too old",
               "" if ok else "install Python 3.11 or newer (https://www.python.org/downloads/) and reinstall "
                             "pcavs-live with it")


def check_torch(probe: Callable[[], TorchInfo], device: str, system: str) -> Row:
    try:
        info = probe()
    except UserError as exc:
        return Row("torch", False, str(exc), torch_install_fix(system, cuda=False))
    build = f"torch {info.version}" + (f" (CUDA {info.cuda_build} build)" if info.cuda_build else "")
    gpus = "; ".join(info.cuda_devices)
    if device.startswith("cuda"):
        if not info.cuda_devices:
            why = "this torch has no CUDA support" if not info.cuda_build else "no CUDA GPU visible"
            return Row("torch", False, f"{build}; --device {device} but {why}",
                       f"{torch_install_fix(system, cuda=True)} (needs an NVIDIA driver), or use --device cpu")
        return Row("torch", True, f"{build}; runs on {device}: {gpus}")
    if device == "mps":
        if not info.mps:
            return Row("torch", False, f"{build}; --device mps but MPS is not available",
                       "use --device cpu (MPS needs an Apple-silicon Mac with macOS 12.3 or newer)")
        return Row("torch", True, f"{build}; runs on mps (Apple GPU)")
    if device == "auto" and info.cuda_devices:
        return Row("torch", True, f"{build}; runs on cuda: {gpus}")
    note = "MPS available: --device mps" if info.mps else "no CUDA GPU visible; real time needs one"
    precision = f"; generator in {info.cpu_dtype}" if info.cpu_dtype else ""
    return Row("torch", True, f"{build}; runs on cpu ({note}){precision}")


def check_checkpoints(probe: Callable[[Path], dict[str, str]], folder: Path, fetch_command: str) -> Row:
    try:
        status = probe(folder)
    except UserError as exc:
        return Row("checkpoints", False, f"{folder}: {exc}", fetch_command)
    except ImportError as exc:  # torch itself is missing: the torch row says how to fix that
        return Row("checkpoints", False, f"{folder}: cannot check without torch ({exc})", fetch_command)
    bad = {net: state for net, state in status.items() if state not in ("present", "ok")}
    if not bad and status:
        return Row("checkpoints", True, f"{folder}: {', '.join(status)} load and match the networks")
    return Row("checkpoints", False, f"{folder}: " + ", ".join(f"{n} {s}" for n, s in (bad or status).items()),
               fetch_command)


def check_landmarks(probe: Callable[[Path], dict[str, str]], locate: Callable[[], Path], needed: bool,
                    fetch_command: str) -> Row:
    try:
        folder = locate()  # torch.hub's cache folder: needs torch
    except ImportError as exc:
        return Row("face weights", False, f"cannot locate them without torch ({exc})", fetch_command, needed)
    status = probe(folder)
    if status and all(state == "ok" for state in status.values()):
        return Row("face weights", True, f"{folder}: {', '.join(status)} verified", needed=needed)
    bad = ", ".join(f"{name} {state}" for name, state in status.items() if state != "ok")
    return Row("face weights", False, f"{folder}: {bad}", fetch_command, needed)


def microphone_fix(system: str) -> str:
    if system == "Windows":
        return "connect a microphone and let apps use it: Settings > Privacy & security > Microphone"
    if system == "Darwin":
        return ("connect a microphone and let your terminal use it: System Settings > Privacy & Security > "
                "Microphone")
    return "sudo apt-get install libportaudio2, then connect a microphone (check: pactl list short sources)"


def _matching_device(labels: list[str], wanted: str) -> str | None:
    """The listed device --audio-device names, as the microphone source picks it: a number is an index,
    anything else part of a name. Labels read "index: name (host API, channels, rate)"."""
    w = wanted.strip().lower()
    for label in labels:
        index, _, rest = label.partition(": ")
        name = rest.rsplit(" (", 1)[0].lower()
        if (w.isdigit() and index == w) or (not w.isdigit() and w in name):
            return label
    return None


def check_microphones(probe: Callable[[], list[str]], config: Config, system: str) -> Row:
    needed = audio_input(config.audio).device
    try:
        devices = probe()
    except UserError as exc:
        return Row("microphone", False, str(exc), microphone_fix(system), needed)
    if not devices:
        return Row("microphone", False, "no audio input devices", microphone_fix(system), needed)
    wanted = config.audio.device
    if wanted is not None:
        match = _matching_device(devices, wanted)
        if match is None:
            return Row("microphone", False, f"no input device matches --audio-device {wanted!r} "
                                            f"({len(devices)} found)",
                       "pick one from `pcavs-live devices` for --audio-device", needed)
        return Row("microphone", True, match, needed=needed)
    more = f" (+{len(devices) - 1} more)" if len(devices) > 1 else ""
    return Row("microphone", True, f"{devices[0]}{more}", needed=needed)


def check_output(output: Output, probes: Probes, config: Config, system: str) -> Row:
    """An output's row, from its registry entry's doctor check: needed when output.targets has it."""
    check = output.doctor
    assert check is not None
    needed = output.name in config.output.targets
    try:
        found = getattr(probes, check.probe)(*check.args(config, system))
    except UserError as exc:
        return Row(check.title, False, str(exc), check.fix(config, system), needed)
    return Row(check.title, True, found, needed=needed)


# --------------------------------------------------------------------------- the table
def diagnose(config: Config, probes: Probes | None = None, fetch_command: str = "pcavs-live fetch") -> list[Row]:
    """Every row, in the order the table shows them."""
    p = probes or Probes()
    return [
        check_python(p.python()),
        check_torch(p.torch, config.model.device, p.system),
        check_checkpoints(p.checkpoints, config.model.checkpoint_dir, fetch_command),
        check_landmarks(p.landmarks, p.landmark_dir, needs_face_detector(config), fetch_command),
        check_microphones(p.microphones, config, p.system),
    ] + [check_output(output, p, config, p.system) for output in OUTPUTS.values() if output.doctor is not None]


def render(rows: list[Row]) -> str:
    """The table: check, ok/missing, what was found; a missing row ends with `fix: ...`."""
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  {'status':<7}  details"]
    for r in rows:
        detail = r.detail
        if not r.ok:
            if not r.needed:
                detail += "; not needed by this configuration"
            if r.fix:
                detail += f"; fix: {r.fix}"
        lines.append(f"{r.check:<{width}}  {r.status:<7}  {detail}")
    blocking = [r.check for r in rows if r.blocking]
    lines.append(f"missing for this configuration: {', '.join(blocking)}" if blocking
                 else "everything this configuration needs is here")
    return "\n".join(lines)


def exit_code(rows: list[Row]) -> int:
    return EXIT_MISSING if any(r.blocking for r in rows) else 0
