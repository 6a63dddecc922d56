"""Download the authors' PC-AVS demo checkpoints (demo.zip) and install them into checkpoints/demo.

    .venv/bin/python -m pcavs_live.cli.fetch_checkpoints            # URL and folder from configs/default.toml
    .venv/bin/python -m pcavs_live.cli.fetch_checkpoints --zip ~/Downloads/demo.zip   # a zip fetched by hand

Why the extra care: the file comes from Google Drive, which answers large downloads with an HTML
"can't scan this file for viruses" page instead of the file. gdown passes that page (through
`pcavs_live.common.download`); if Drive still refuses (quota, changed page), the user gets one line saying
how to download it by hand, and `--zip` installs that file. The archive is untrusted input, so entries with absolute paths or `..` are
rejected before anything is written, and only `latest_net_*.pth` files are taken out of it (wherever they
sit inside: the upstream zip has a `demo/` top folder). The result is checked with
`pcavs.checkpoints.describe_checkpoints` so a truncated or wrong file is reported now, not at start-up.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pcavs_live.common.download import DownloadError, download, load_registry
from pcavs_live.common.errors import UserError
from pcavs_live.cli.errors import run_with_user_errors

INFERENCE_NETS = ("G", "V", "E", "A_sync")
CHECKPOINT_NAME = re.compile(r"latest_net_[A-Za-z0-9_]+\.pth")
DRIVE_VIEW_URL = "https://drive.google.com/file/d/1Zehr3JLIpzdg2S5zZrhIbpYPKF-4gKU_/view"
ZIP_NAME = "demo.zip"  # its registry entry (pcavs_live/common/weights.txt)
CHUNK = 1 << 20

Describe = Callable[[Path], dict[str, str]]


class CheckpointFetchError(UserError):
    """Downloading or unpacking the checkpoints failed; the hint says how to do it by hand."""


def manual_hint(dest: Path) -> str:
    return (f"download demo.zip by hand from {DRIVE_VIEW_URL} and run "
            f"`python -m pcavs_live.cli.fetch_checkpoints --zip PATH/TO/demo.zip` (or unzip it so that "
            f"{dest}/latest_net_G.pth exists)")


# --------------------------------------------------------------------------- unpack
def _unsafe_member(name: str) -> bool:
    """Absolute paths, drive letters and `..` components: the classic zip-slip entries."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"[A-Za-z]:", normalised):
        return True
    return ".." in PurePosixPath(normalised).parts


def extract_checkpoints(zip_path: Path, dest: Path) -> list[str]:
    """Copy every `latest_net_*.pth` in the archive (any folder depth) into `dest`; returns their names.

    The whole archive is refused if any entry is unsafe: an archive built to escape its folder is not one
    to take model weights from either. Files are written under a temporary name and renamed, so an
    interrupted install never leaves a half-written checkpoint that looks complete.
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointFetchError(f"{zip_path} is not a readable zip archive ({exc})") from None
    with archive:
        members = archive.infolist()
        bad = [m.filename for m in members if _unsafe_member(m.filename)]
        if bad:
            raise CheckpointFetchError(f"refusing {zip_path}: unsafe path {bad[0]!r} in the archive")
        chosen: dict[str, zipfile.ZipInfo] = {}
        for member in members:
            parts = PurePosixPath(member.filename.replace("\\", "/")).parts
            if member.is_dir() or not parts or "__MACOSX" in parts or not CHECKPOINT_NAME.fullmatch(parts[-1]):
                continue
            if parts[-1] in chosen:
                raise CheckpointFetchError(f"{zip_path} holds two copies of {parts[-1]} "
                                           f"({chosen[parts[-1]].filename}, {member.filename})")
            chosen[parts[-1]] = member
        if not chosen:
            raise CheckpointFetchError(f"{zip_path} contains no latest_net_*.pth files; is it the PC-AVS demo.zip?")
        dest.mkdir(parents=True, exist_ok=True)
        for name, member in sorted(chosen.items()):
            tmp = dest / f".{name}.part"
            try:
                with archive.open(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                os.replace(tmp, dest / name)
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise CheckpointFetchError(f"could not extract {member.filename} from {zip_path} into {dest}: "
                                           f"{exc}") from None
            finally:
                tmp.unlink(missing_ok=True)
    return sorted(chosen)


# --------------------------------------------------------------------------- verify
def _describe(dest: Path) -> dict[str, str]:
    # Imported here: it pulls in torch, which `--help` and argument errors should not wait for.
    from pcavs.checkpoints import describe_checkpoints
    return describe_checkpoints(dest)


def report(status: dict[str, str]) -> str:
    return "\n".join(f"  {name:7s} {state}" for name, state in status.items())


def install_zip(zip_path: Path, dest: Path, describe: Describe | None = None) -> dict[str, str]:
    """Install from an already downloaded demo.zip; returns describe_checkpoints' verdict per network."""
    extract_checkpoints(Path(zip_path), Path(dest))
    return (describe or _describe)(Path(dest))


def fetch_checkpoints(url: str, dest: Path, progress: bool, describe: Describe | None = None) -> dict[str, str]:
    """Download demo.zip from `url`, install its `latest_net_*.pth` files into `dest` and verify them.

    Returns {network: "ok" (or "present") | "missing" | "invalid..."} from `pcavs.checkpoints.describe_checkpoints`
    (`describe` replaces it in tests). Raises CheckpointFetchError (one line + a how-to-do-it-by-hand hint).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"downloading {url}", file=sys.stderr, flush=True)
    # The temporary zip sits next to the destination: same disk, and no 700 MB left in /tmp on a crash.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", suffix=".part", dir=dest.parent))
    try:
        zip_path = tmp / ZIP_NAME
        entry = load_registry()[ZIP_NAME]
        download(url, zip_path, sha256=entry.sha256 if url == entry.url else None, progress=progress)
        status = install_zip(zip_path, dest, describe)
    except DownloadError as exc:
        raise CheckpointFetchError(str(exc), hint=manual_hint(dest)) from None
    except CheckpointFetchError as exc:
        exc.hint = exc.hint or manual_hint(dest)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"installed into {dest}:\n{report(status)}", file=sys.stderr, flush=True)
    return status


# --------------------------------------------------------------------------- command line
USABLE = ("ok", "present")  # describe_checkpoints' word for a verified file (either spelling)


def _missing(status: dict[str, str]) -> list[str]:
    """Inference networks that are not usable (missing, invalid, or not reported at all)."""
    return [net for net in INFERENCE_NETS if status.get(net) not in USABLE]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcavs_live.cli.fetch_checkpoints", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="config file (default: configs/default.toml)")
    parser.add_argument("--url", help="download URL (default: model.checkpoint_url)")
    parser.add_argument("--dest", type=Path, help="checkpoint folder (default: model.checkpoint_dir)")
    parser.add_argument("--zip", type=Path, help="install from a demo.zip downloaded by hand instead")
    parser.add_argument("--force", action="store_true", help="download even if the checkpoints verify already")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def run() -> int:
        from pcavs_live.cli.config import load_config

        config = load_config(args.config, {"model.checkpoint_url": args.url, "model.checkpoint_dir": args.dest})
        dest = config.model.checkpoint_dir
        if args.zip is not None:
            status = install_zip(args.zip, dest)
        else:
            if not args.force and dest.is_dir() and not _missing(_describe(dest)):
                print(f"checkpoints in {dest} are already complete (use --force to download again)")
                return 0
            status = fetch_checkpoints(config.model.checkpoint_url, dest, progress=not args.quiet)
        print(f"checkpoints in {dest}:\n{report(status)}")
        missing = _missing(status)
        if missing:
            raise CheckpointFetchError(f"{dest} lacks usable {', '.join(missing)} after installing",
                                       hint=manual_hint(dest))
        return 0

    return run_with_user_errors(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
