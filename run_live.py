#!/usr/bin/env python3
"""pcavs-live: animate one photo with your voice, live, out to a virtual webcam, a browser, or an mp4.

    python run_live.py                                   # bundled sample → browser viewer (prints the URL)
    python run_live.py --out out/sample.mp4              # bundled sample → mp4 file
    python run_live.py --identity me.jpg --audio mic --pose webcam --out vcam --out webrtc
    python run_live.py --identity me.jpg --audio mic --out vcam --out vmic   # a video call, lips in step
    python run_live.py --fetch-checkpoints               # download the authors' demo checkpoints
    python run_live.py serve                             # the studio: each browser drives its own avatar
    python run_live.py doctor                            # what this machine lacks, and how to get it

The entry point from a source checkout; an installed package runs the same program as `pcavs-live`
(`pcavs_live.cli.main`, which holds the command line: run is the default command, then serve, fetch, devices, doctor).
"""
from __future__ import annotations

import argparse
import sys

from pcavs_live.cli.main import LIVE_TARGETS, build_run_parser, exit_now, install_stop_handlers, overrides_from_args  # noqa: F401
from pcavs_live.cli.main import main as _main

__all__ = ["LIVE_TARGETS", "build_parser", "install_stop_handlers", "main", "overrides_from_args", "parse_args"]

PROG = "run_live.py"


def build_parser() -> argparse.ArgumentParser:
    """The `run` command line (what `python run_live.py [options]` parses)."""
    return build_run_parser(PROG)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return _main(sys.argv[1:] if argv is None else argv, prog=PROG)


if __name__ == "__main__":
    exit_now(main())
