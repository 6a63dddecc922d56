"""The `pcavs-live` command (and `python run_live.py`, the same program): argument parsing for its commands.

    pcavs-live [run] [options]    animate the photo and stream it; `run` is the default command
    pcavs-live serve [options]    the studio: each browser drives its own avatar (many sessions, one generator)
    pcavs-live fetch              download and verify everything the program loads (then it runs offline)
    pcavs-live devices            microphones, cameras and audio outputs
    pcavs-live doctor [options]   what the configured run needs that this machine lacks, and the fix

The command, when given, comes first. Options that set a config key are derived from the config schema
(`pcavs_live.cli.config.cli_options`), so run, serve and doctor accept the same ones and a key is never restated here.
The work itself lives elsewhere: `pcavs_live.pipeline.session` (run), `pcavs_live.cli.fetch`, `pcavs_live.cli.machine`, `pcavs_live.cli.doctor`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcavs_live.cli.config import cli_options, config_to_toml, dotted_overrides, load_config
from pcavs_live.cli.errors import run_with_user_errors
from pcavs_live.common.errors import UserError
from pcavs_live.cli.logging_setup import setup_logging
from pcavs_live.pipeline.outputs import live_words, parse_out

log = logging.getLogger("run_live")

LIVE_TARGETS = live_words()  # --out words that name an output (the output registry); anything else is a file

COMMANDS: dict[str, str] = {
    "run": "animate the photo and stream it (the default: `{cmd} [options]` is `{cmd} run [options]`)",
    "serve": "the studio: a web page where each browser drives its own avatar (many sessions, one generator)",
    "fetch": "download and verify the checkpoints and the face-alignment weights; later runs need no network",
    "devices": "list microphones, cameras and audio outputs",
    "doctor": "check this machine for what the configured run needs; each missing thing comes with its fix",
}

RUN_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("", "bundled sample → browser viewer (prints the URL)"),
    ("--out out/sample.mp4", "bundled sample → mp4 file"),
    ("--identity me.jpg --audio mic --pose webcam --out vcam --out webrtc", ""),
    ("--fetch-checkpoints", "download the authors' demo checkpoints"),
    ("doctor", "what this machine lacks for a run, and how to get it"),
)
RUN_DESCRIPTION = """\
{prog}: animate one photo with your voice, live, out to a virtual webcam, a browser, or an mp4.

{examples}

Options override configs/default.toml (and --config FILE); --print-config shows the result.
"""


def _examples(cmd: str) -> str:
    width = max(len(cmd) + 1 + len(args) for args, comment in RUN_EXAMPLES if comment)
    lines = []
    for args, comment in RUN_EXAMPLES:
        line = f"{cmd} {args}".rstrip()
        lines.append(f"    {line:<{width}}  # {comment}" if comment else f"    {line}")
    return "\n".join(lines)


def command_line(prog: str) -> str:
    """What a user types to run this program again ("pcavs-live", or "python run_live.py")."""
    return f"python {prog}" if prog.endswith(".py") else prog


def _commands_epilog(cmd: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"commands (first on the command line; `{cmd} COMMAND --help` for each):"]
    lines += [f"  {name:<{width}}  {text.format(cmd=cmd)}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- shared option groups
def _add_config_keys(group: argparse._ArgumentGroup) -> None:
    """Each option that sets one config key (from the schema), and --out."""
    for option in cli_options():
        group.add_argument(option.flag, dest=option.dest, metavar=option.metavar, choices=option.choices,
                           type=option.type, help=option.help)
    group.add_argument("--out", action="append", metavar="|".join(LIVE_TARGETS) + "|FILE.mp4",
                       help="output; repeat for several (default: webrtc). Sets output.targets and output.file")


def _add_config_files(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see configs/default.toml)")
    group.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")


def _add_verbosity(group: argparse._ArgumentGroup) -> None:
    group.add_argument("-q", "--quiet", action="store_true")
    group.add_argument("-v", "--verbose", action="count", default=0)
    group.add_argument("--debug", action="store_true", help="show tracebacks")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line options → {"section.key": value} overrides (None = not given); an option beats --set."""
    o: dict[str, Any] = dotted_overrides(args.set)
    for option in cli_options():
        value = getattr(args, option.dest, None)
        if value is not None:
            o[option.key] = value
    if getattr(args, "out", None):
        targets, path = parse_out(args.out)  # the output registry's words, else a file path, else an error
        o["output.targets"] = targets
        if path is not None:
            o["output.file"] = path
    return o


# --------------------------------------------------------------------------- parsers
def build_run_parser(prog: str = "pcavs-live", description: str = RUN_DESCRIPTION) -> argparse.ArgumentParser:
    """The command line of `run` (and `serve`). Options that set one config key come from the config schema
    (`cli_options`: flag, help, and the allowed words from the key's type), so a key's values are never
    restated here."""
    cmd = command_line(prog.split(" ")[0])
    p = argparse.ArgumentParser(prog=prog, description=description.format(prog=prog, cmd=cmd, examples=_examples(cmd)),
                                epilog=_commands_epilog(cmd), formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = p.add_argument_group("configuration", "each of these sets one key of configs/default.toml "
                                                 "(and overrides --config FILE and --set)")
    _add_config_keys(keys)
    run = p.add_argument_group("run")
    run.add_argument("--list-devices", action="store_true", help="list microphones and exit")
    run.add_argument("--fetch-checkpoints", action="store_true",
                     help=f"download the demo checkpoints and exit (`{cmd} fetch` fetches every file)")
    speed = run.add_mutually_exclusive_group()
    speed.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                       help="pace file input in real time (default unless every output is a file)")
    speed.add_argument("--fast", dest="realtime", action="store_false",
                       help="render file input as fast as possible, every frame")
    run.add_argument("--max-seconds", type=output_seconds, metavar="SECONDS",
                     help="stop after this many seconds of output")
    _add_config_files(run)
    run.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    _add_verbosity(run)
    return p


def output_seconds(text: str) -> float:
    """--max-seconds: a finite length of at least one frame, refused at parse time (nan, inf, 0 and
    negative numbers once ran to a traceback or to an empty "recording")."""
    from pcavs.constants import FPS
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value * FPS < 1:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, at least {1 / FPS:g} (one frame); "
                                         f"got {text!r}")
    return value


def build_fetch_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=COMMANDS["fetch"].capitalize() + ": the PC-AVS checkpoints into --checkpoints "
        "DIR (model.checkpoint_dir), face-alignment's face detector and landmark weights into --landmark-dir. "
        "Files already there are verified, not downloaded again. A file that cannot be downloaded (offline, "
        "quota) gets one line with its URL and the path to save a hand-downloaded copy at.")
    checkpoints = next(o for o in cli_options() if o.key == "model.checkpoint_dir")
    p.add_argument(checkpoints.flag, dest=checkpoints.dest, metavar=checkpoints.metavar, help=checkpoints.help)
    p.add_argument("--landmark-dir", type=Path, metavar="DIR",
                   help="folder for the face-alignment weights (default: the one the program reads them from, "
                        "$TORCH_HOME/hub/checkpoints; set TORCH_HOME to move both)")
    p.add_argument("--zip", type=Path, metavar="FILE", help="install the checkpoints from a demo.zip downloaded by hand")
    p.add_argument("--force", action="store_true", help="download the checkpoints even if they verify already")
    _add_config_files(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_devices_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=COMMANDS["devices"].capitalize() + ".")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_doctor_parser(prog: str) -> argparse.ArgumentParser:
    cmd = command_line(prog.split(" ")[0])
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=COMMANDS["doctor"].capitalize() + ".\n\nGive it the options of the run you have in mind "
        f"(e.g. `{cmd} doctor --audio mic --out vcam`): what that run needs decides the exit code, 1 when "
        "something it needs is missing, else 0.")
    keys = p.add_argument_group("configuration", "the run to check, as for run")
    _add_config_keys(keys)
    _add_config_files(keys)
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="show a Ray cluster's render workers and their free capacity instead")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# --------------------------------------------------------------------------- commands
def _run(argv: list[str], prog: str) -> int:
    args = build_run_parser(prog).parse_args(argv)
    # --debug shows tracebacks, including those logged at debug level (an output that failed mid-run)
    setup_logging(-1 if args.quiet else max(args.verbose, int(args.debug)))

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
            from pcavs_live.cli.fetch_checkpoints import main as fetch_main
            return fetch_main(["--url", config.model.checkpoint_url, "--dest", str(config.model.checkpoint_dir)]
                              + (["-q"] if args.quiet else []) + (["--debug"] if args.debug else []))

        from pcavs_live.pipeline.session import RunOptions, SessionBuilder
        builder = SessionBuilder(config, RunOptions(realtime=args.realtime, max_seconds=args.max_seconds,
                                                    status_interval_s=0 if args.quiet else 1.0))
        stop = install_stop_handlers(builder.live)
        with builder, builder.build() as session:
            summary = session.run(stop)
            snap = session.metrics.snapshot()
        print(f"\n{summary.frames_out} frames out ({summary.frames_generated} generated, "
              f"{summary.frames_repeated} repeated) in {summary.wall_s:.1f} s", file=sys.stderr)
        if snap.get("latency_ms_median") is not None:
            print(f"capture→frame latency median {snap['latency_ms_median']} ms (max {snap['latency_ms_max']} ms), "
                  f"generator {snap['generator_ms_median']} ms, {snap['generated_fps']} generated fps",
                  file=sys.stderr)
        if session.recorder is not None:
            written = session.recorder.frames_written
            if not written:  # the recorder removed its empty file: say so instead of "wrote"
                raise UserError(f"nothing was written to {config.output.file}: the run ended before its "
                                "first frame")
            print(f"wrote {config.output.file} ({written} frames)", file=sys.stderr)
        return 0

    return run_with_user_errors(body, debug=args.debug)


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


def _fetch(argv: list[str], prog: str) -> int:
    args = build_fetch_parser(f"{prog} fetch").parse_args(argv)
    setup_logging(-1 if args.quiet else 0)

    def body() -> int:
        from pcavs_live.cli.fetch import fetch_all, report
        overrides = dotted_overrides(args.set)
        if args.checkpoints is not None:
            overrides["model.checkpoint_dir"] = args.checkpoints
        config = load_config(args.config, overrides)
        outcomes = fetch_all(config.model.checkpoint_url, config.model.checkpoint_dir, args.landmark_dir,
                             prog=command_line(prog), progress=not args.quiet, force=args.force, zip_path=args.zip)
        report(outcomes, command_line(prog))
        return 0

    return run_with_user_errors(body, debug=args.debug)


def _devices(argv: list[str], prog: str) -> int:
    args = build_devices_parser(f"{prog} devices").parse_args(argv)

    def body() -> int:
        from pcavs_live.cli.machine import probe_audio_outputs, probe_cameras, probe_microphones
        from pcavs_live.common.errors import UserError
        sections: list[tuple[str, Callable[[], list[str]]]] = [
            ("microphones (--audio mic --audio-device NAME|INDEX)", probe_microphones),
            ("cameras (--pose webcam --webcam-index N)", probe_cameras),
            ("audio outputs", probe_audio_outputs),
        ]
        for title, probe in sections:
            print(f"{title}:")
            try:
                found = probe()
            except UserError as exc:
                found = [f"none: {exc}"]
            print("\n".join(f"  {line}" for line in found) if found else "  none found")
        return 0

    return run_with_user_errors(body, debug=args.debug)


def _doctor(argv: list[str], prog: str) -> int:
    args = build_doctor_parser(f"{prog} doctor").parse_args(argv)
    setup_logging(-1)  # the table is the output; library warnings would only break it up

    def body() -> int:
        from pcavs_live.cli.config import DEFAULT_CONFIG_PATH
        from pcavs_live.cli.doctor import diagnose, exit_code, render
        if args.cluster:
            from pcavs_live.cluster.pool import cluster_report
            text, code = cluster_report(args.cluster)
            print(text)
            return code
        config = load_config(args.config, overrides_from_args(args))
        fetch = f"{command_line(prog)} fetch"
        if args.config is not None:
            fetch += f" --config {args.config}"
        if args.checkpoints is not None:
            fetch += f" --checkpoints {config.model.checkpoint_dir}"
        print(f"config: {DEFAULT_CONFIG_PATH}" + (f" + {args.config}" if args.config else ""))
        rows = diagnose(config, fetch_command=fetch)
        print(render(rows))
        return exit_code(rows)

    return run_with_user_errors(body, debug=args.debug)


def _serve(argv: list[str], prog: str) -> int:
    from pcavs_live.cli.serve import main as serve_main
    return serve_main(argv, prog=f"{prog} serve")


HANDLERS: dict[str, Callable[[list[str], str], int]] = {
    "run": _run,
    "serve": _serve,
    "fetch": _fetch,
    "devices": _devices,
    "doctor": _doctor,
}


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """("doctor", rest) when the first word names a command, else ("run", argv): run is the default."""
    if argv and argv[0] in HANDLERS:
        return argv[0], argv[1:]
    return "run", argv


def main(argv: list[str] | None = None, prog: str = "pcavs-live") -> int:
    """Entry point of the `pcavs-live` console command; run_live.py calls it with prog="run_live.py"."""
    command, rest = split_command(list(sys.argv[1:] if argv is None else argv))
    # OpenCV prints its own ERROR lines when a camera index is absent; our one-line CameraError says it
    # better. Set before cv2 is first imported (this process only; an explicit user setting wins).
    os.environ.setdefault("OPENCV_LOG_LEVEL", "FATAL")
    return HANDLERS[command](rest, prog)


def exit_now(code: int) -> None:
    """Leave without the interpreter's own teardown. Everything the command opened is closed by now;
    tearing down torch and the codecs takes seconds more, which a Ctrl-C or SIGTERM should not wait for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_main() -> None:
    """The `pcavs-live` console script."""
    exit_now(main())


if __name__ == "__main__":
    exit_now(main())
