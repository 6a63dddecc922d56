#!/usr/bin/env python3
"""pcavs-live: animate one photo with your voice, live, out to a virtual webcam, a browser, or an mp4.

    python run_live.py                                   # bundled sample → browser viewer (prints the URL)
    python run_live.py --out out/sample.mp4              # bundled sample → mp4 file
    python run_live.py --identity me.jpg --audio mic --pose webcam --out vcam --out webrtc
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

from cli.config import OUTPUT_TARGETS, cli_options, config_to_toml, dotted_overrides, load_config
from cli.errors import run_with_user_errors
from cli.logging_setup import setup_logging

log = logging.getLogger("run_live")

LIVE_TARGETS = tuple(t for t in OUTPUT_TARGETS if t != "file")  # --out words; anything else is a file


def build_parser() -> argparse.ArgumentParser:
    """The command line. Options that set one config key come from the config schema (`cli_options`:
    flag, help, and the allowed words from the key's type), so a key's values are never restated here."""
    p = argparse.ArgumentParser(prog="run_live.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = p.add_argument_group("configuration", "each of these sets one key of configs/default.toml "
                                                 "(and overrides --config FILE and --set)")
    for option in cli_options():
        keys.add_argument(option.flag, dest=option.dest, metavar=option.metavar, choices=option.choices,
                          type=option.type, help=option.help)
    keys.add_argument("--out", action="append", metavar="|".join(LIVE_TARGETS) + "|FILE.mp4",
                      help="output; repeat for several (default: webrtc). Sets output.targets and output.file")
    run = p.add_argument_group("run")
    run.add_argument("--list-devices", action="store_true", help="list microphones and exit")
    run.add_argument("--fetch-checkpoints", action="store_true", help="download the demo checkpoints and exit")
    speed = run.add_mutually_exclusive_group()
    speed.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                       help="pace file input in real time (default unless every output is a file)")
    speed.add_argument("--fast", dest="realtime", action="store_false",
                       help="render file input as fast as possible, every frame")
    run.add_argument("--max-seconds", type=float, metavar="SECONDS", help="stop after this many seconds of output")
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see configs/default.toml)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")
    run.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    run.add_argument("-q", "--quiet", action="store_true")
    run.add_argument("-v", "--verbose", action="count", default=0)
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line options → {"section.key": value} overrides (None = not given); an option beats --set."""
    o: dict[str, Any] = dotted_overrides(args.set)
    for option in cli_options():
        value = getattr(args, option.dest)
        if value is not None:
            o[option.key] = value
    if args.out:
        targets = []
        for out in args.out:
            if out in LIVE_TARGETS:
                targets.append(out)
            else:
                targets.append("file")
                o["output.file"] = out
        o["output.targets"] = list(dict.fromkeys(targets))
    return o


def install_stop_handlers(live: threading.Event) -> threading.Event:
    """Ctrl-C and SIGTERM stop the session. Once its loop runs (`live` set) the first one asks it to
    stop (the loop sees it within a fraction of a second, after at most the render in progress) so
    the outputs close cleanly; before that (networks still loading) and on a second request there is
    nothing to finish, so they interrupt at once (exit code 130)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set() or not live.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


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
        with LiveSession(config, RunOptions(realtime=args.realtime, max_seconds=args.max_seconds,
                                            status_interval_s=0 if args.quiet else 1.0)) as session:
            stop = install_stop_handlers(session.live)
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
    exit_code = main()
    # Everything the session opened is closed by now. The interpreter's own teardown (torch, codecs)
    # takes seconds more, which a Ctrl-C or SIGTERM should not have to wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
