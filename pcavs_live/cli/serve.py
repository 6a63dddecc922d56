"""`run_live.py serve`: the studio server (many browser sessions sharing one batched generator).

    python run_live.py serve                      # loopback, prints the URL
    python run_live.py serve --host 0.0.0.0 --token SECRET --max-sessions 16
    python run_live.py serve --cluster HEAD:6379 --host 0.0.0.0 --token SECRET   # workers on a Ray cluster

Options override configs/default.toml (and --config FILE); `main(argv)` is the whole command, so any
shell (run_live.py, a console script) can dispatch to it.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from pcavs_live.cli.config import config_to_toml, dotted_overrides, load_config
from pcavs_live.cli.errors import run_with_user_errors
from pcavs_live.cli.logging_setup import setup_logging

# The keys that matter to the studio, each with its own option (the rest: --set SECTION.KEY=VALUE).
OPTIONS = (("--host", "server.host", str), ("--port", "server.port", int), ("--token", "server.token", str),
           ("--max-sessions", "server.max_sessions", int), ("--device", "model.device", str),
           ("--dtype", "model.dtype", str), ("--checkpoints", "model.checkpoint_dir", str),
           ("--cluster", "cluster.address", str))


def build_parser(prog: str = "run_live.py serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, key, typ in OPTIONS:
        p.add_argument(flag, dest=key.replace(".", "__"), type=typ, metavar=key.split(".")[1].upper(),
                       help=f"sets {key}")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see configs/default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None, prog: str = "run_live.py serve") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)

    def body() -> int:
        overrides = dotted_overrides(args.set)
        for _, key, _ in OPTIONS:
            value = getattr(args, key.replace(".", "__"))
            if value is not None:
                overrides[key] = value
        config = load_config(args.config, overrides)
        if args.print_config:
            sys.stdout.write(config_to_toml(config))
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if config.cluster.address:  # the front door for a Ray cluster's render workers (pcavs-live[cluster])
            from pcavs_live.cluster.frontdoor import serve_cluster
            return serve_cluster(config, config.cluster.address, stop=stop)
        from pcavs_live.pipeline.studio import serve
        return serve(config, stop=stop)

    return run_with_user_errors(body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
