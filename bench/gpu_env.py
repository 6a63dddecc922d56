"""Device-check stage: what the machine is — Python, torch and its CUDA build, the GPU, the driver — and
which of the project's imports are missing there (the device image has its own torch and packages; a
missing pure-Python package can be carried as a wheel, see README "GPU check").

    python bench/gpu_env.py [--json PATH]
"""
from __future__ import annotations

import importlib
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage import Report, stage_args  # noqa: E402

# What the program imports (requirements.txt's packages by import name) and the project modules the
# device check itself needs.
THIRD_PARTY = ("numpy", "scipy", "torch", "torchvision", "cv2", "librosa", "soundfile", "soxr", "face_alignment",
               "skimage", "aiohttp", "aiortc", "av", "sounddevice", "pyvirtualcam", "PIL", "pytest")
PROJECT = ("pcavs.engine", "pcavs.runtime", "pcavs.alignment.tracking", "capture.pose_rate", "pcavs_live.pipeline.session")


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__).parse_args(argv)
    report = Report("env", args.json, args.deadline_s)
    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,temperature.gpu",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable ({exc})"
    try:  # optional: the generator's fused tail (pcavs/kernels/styled_tail.py) runs eagerly without it
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure means "no fused tail"
        info["triton"] = f"missing ({type(exc).__name__})"
    report.set("info", info)
    missing = {}
    for name in THIRD_PARTY + PROJECT:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is what we report
            missing[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    report.set("missing_imports", missing)
    for key, value in info.items():
        print(f"{key:>14}: {value}")
    print(f"missing imports: {', '.join(f'{k} ({v})' for k, v in missing.items()) or 'none'}")
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
