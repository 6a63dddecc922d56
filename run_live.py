#!/usr/bin/env python3
"""pcavs-live: animate one photo with your voice, live, out to a virtual webcam, a browser, or an mp4.

    python run_live.py                                   # bundled sample → browser viewer (prints the URL)
    python run_live.py --out out/sample.mp4              # bundled sample → mp4 file
    python run_live.py --identity me.jpg --audio mic --pose webcam --out vcam --out webrtc
    python run_live.py --identity me.jpg --audio mic --out vcam --out vmic   # a video call, lips in step
    python run_live.py --fetch-checkpoints               # download the authors' demo checkpoints

Options override configs/default.toml (and --config FILE); --print-config shows the result.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from cli.config import config_to_toml, dotted_overrides, load_config
from cli.errors import run_with_user_errors
from cli.logging_setup import setup_logging

log = logging.getLogger("run_live")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_live.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identity", metavar="PHOTO", help="photo of the face to animate")
    p.add_argument("--audio", metavar="mic|sample|FILE", help="what drives the mouth")
    p.add_argument("--audio-device", metavar="NAME|INDEX", help="microphone (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list microphones and exit")
    p.add_argument("--pose", metavar="webcam|still|none|VIDEO", help="what drives the head pose")
    p.add_argument("--webcam-index", type=int, metavar="N")
    p.add_argument("--out", action="append", metavar="webrtc|vcam|vmic|FILE.mp4",
                   help="output; repeat for several (default: webrtc). vmic: a virtual microphone carrying the "
                        "avatar's voice in step with vcam")
    p.add_argument("--size", metavar="auto|native|WxH", help="picture size, e.g. 640x480 or 1280x720")
    p.add_argument("--framing", choices=["paste", "fit"],
                   help="paste: the face back into the photo; fit: the face crop scaled to the size")
    p.add_argument("--checkpoints", metavar="DIR", help="folder with latest_net_{G,V,E,A_sync}.pth")
    p.add_argument("--fetch-checkpoints", action="store_true", help="download the demo checkpoints and exit")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--noise", choices=["fixed", "random", "zero"])
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--token", help="viewer token (required when --host is not loopback)")
    p.add_argument("--vcam-device")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                       help="pace file input in real time (default unless every output is a file)")
    speed.add_argument("--fast", dest="realtime", action="store_false",
                       help="render file input as fast as possible, every frame")
    p.add_argument("--max-seconds", type=float, help="stop after this many seconds of output")
    p.add_argument("--config", type=Path, help="TOML config file (see configs/default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line options → {"section.key": value} overrides (None = not given)."""
    o: dict[str, Any] = dotted_overrides(args.set)
    direct = {"identity.photo": args.identity, "audio.source": args.audio, "audio.device": args.audio_device,
              "pose.source": args.pose, "pose.webcam_index": args.webcam_index,
              "model.checkpoint_dir": args.checkpoints, "model.device": args.device, "model.dtype": args.dtype,
              "model.noise": args.noise, "server.host": args.host, "server.port": args.port,
              "server.token": args.token, "vcam.device": args.vcam_device, "output.size": args.size,
              "output.framing": args.framing}
    o.update({k: v for k, v in direct.items() if v is not None})
    if args.out:
        targets = []
        for out in args.out:
            if out in ("webrtc", "vcam", "vmic"):
                targets.append(out)
            else:
                targets.append("file")
                o["output.file"] = out
        o["output.targets"] = list(dict.fromkeys(targets))
    return o


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # OpenCV prints its own ERROR lines when a camera index is absent; our one-line CameraError says it
    # better. Set before cv2 is first imported (this process only; an explicit user setting wins).
    os.environ.setdefault("OPENCV_LOG_LEVEL", "FATAL")
    setup_logging(-1 if args.quiet else args.verbose)

    def body() -> int:
        config = load_config(args.config, overrides_from_args(args))
        if args.print_config:
            sys.stdout.write(config_to_toml(config))
            return 0
        if args.list_devices:
            from capture.audio_sources import list_input_devices
            devices = list_input_devices()
            print("\n".join(devices) if devices else "no audio input devices found")
            return 0
        if args.fetch_checkpoints:  # skips the download when the checkpoints already verify
            from cli.fetch_checkpoints import main as fetch_main
            return fetch_main(["--url", config.model.checkpoint_url, "--dest", str(config.model.checkpoint_dir)]
                              + (["-q"] if args.quiet else []) + (["--debug"] if args.debug else []))

        from pipeline.session import LiveSession, RunOptions
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with LiveSession(config, RunOptions(realtime=args.realtime, max_seconds=args.max_seconds,
                                            status_interval_s=0 if args.quiet else 1.0)) as session:
            summary = session.run(stop)
            snap = session.metrics.snapshot()
        print(f"\n{summary.frames_out} frames out ({summary.frames_generated} generated, "
              f"{summary.frames_dropped} repeated) in {summary.wall_s:.1f} s", file=sys.stderr)
        if snap.get("latency_ms_median") is not None:
            print(f"capture→frame latency median {snap['latency_ms_median']} ms (max {snap['latency_ms_max']} ms), "
                  f"generator {snap['generator_ms_median']} ms, {snap['generated_fps']} generated fps",
                  file=sys.stderr)
        if "file" in config.output.targets:
            print(f"wrote {config.output.file}", file=sys.stderr)
        return 0

    return run_with_user_errors(body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
