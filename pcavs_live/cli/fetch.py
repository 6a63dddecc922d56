"""`pcavs-live fetch`: every file the program loads at run time, downloaded once and verified, so that later
runs need no network.

Two kinds of files:
* the PC-AVS checkpoints `latest_net_{G,V,E,A_sync}.pth` (the authors' demo.zip; `pcavs_live.cli.fetch_checkpoints`
  downloads, unpacks and verifies them by loading them into the networks);
* face_alignment's face detector (SFD) and landmark network (2D-FAN-4), which the program otherwise
  downloads on the first run that needs a face detector (a photo without a landmark sidecar, a webcam or a
  video pose). They go into the folder `pcavs.alignment` reads them from (torch.hub's cache,
  $TORCH_HOME/hub/checkpoints, unless --landmark-dir says otherwise). Their names carry the first hex
  digits of their SHA-256, torch.hub's convention, which is how a download is verified here.

Everything is attempted even when one file fails; each file that is still missing afterwards gets one line
with the URL to download it from by hand and the exact path to put it at, then one `error:` line.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pcavs_live.cli.fetch_checkpoints import (DRIVE_VIEW_URL, INFERENCE_NETS, USABLE, CheckpointFetchError,
                                   fetch_checkpoints, install_zip)
from pcavs_live.common.download import download as download_file
from pcavs_live.common.errors import UserError

HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's check_hash convention: name-<sha256 prefix>.ext
# Full SHA-256 of the face_alignment 1.5.0 weight files (their names carry the first ten digits); a file
# not listed here is checked against the digits in its name only.
KNOWN_SHA256 = {
    "s3fd-619a316812.pth": "619a31681264d3f7f7fc7a16a42cbbe8b23f31a256f75a366e5a1bcd59b33543",
    "2DFAN4-11f355bf06.pth.tar": "11f355bf0693120222f5955ce3f9dc8fb5763ebb30a47d7906e509490d32e4aa",
}
CHUNK = 1 << 20

Download = Callable[[str, Path, bool], None]      # (url, destination, progress), raises UserError


def download(url: str, dest: Path, progress: bool) -> None:
    """The project's one downloader (pcavs_live.common.download) in the shape `fetch_weight_file` injects."""
    download_file(url, dest, progress=progress, what=dest.name)
Describe = Callable[[Path], dict[str, str]]           # checkpoint folder → {network: "present"|"missing"|...}


class FetchError(UserError):
    """Some files could not be fetched; the lines printed before it say where to put each one by hand."""


@dataclass(frozen=True)
class Outcome:
    """What one fetch step left behind: `ok`, what is there (`detail`), and, when not ok, the manual way."""

    what: str
    ok: bool
    detail: str
    manual: str = ""  # "download URL and save it as PATH": one line per missing file


# --------------------------------------------------------------------------- face_alignment weights
def landmark_files() -> dict[str, str]:
    """{file name: download URL} of face_alignment's weights, as `pcavs.alignment` names them."""
    from pcavs.alignment import LANDMARK_MODEL_FILES
    return dict(LANDMARK_MODEL_FILES)


def default_landmark_dir() -> Path:
    from pcavs.alignment import default_landmark_model_dir
    return Path(default_landmark_model_dir())


def expected_hash_prefix(name: str) -> str | None:
    match = HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weight_file(path: Path, name: str | None = None) -> str:
    """"ok", "missing", or "invalid (...)": the file's SHA-256 must be the known one, or else start with the
    digits in its name (`name`, when the file still has a temporary one)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    name = name or path.name
    want = KNOWN_SHA256.get(name) or expected_hash_prefix(name)
    if want is None:
        return "ok" if path.stat().st_size > 0 else "invalid (empty file)"
    got = sha256_of(path)
    return "ok" if got.startswith(want) else f"invalid (SHA-256 {got[:10]}…, expected {want[:10]}…)"


def landmark_status(folder: Path, files: Mapping[str, str] | None = None) -> dict[str, str]:
    """{file name: verify_weight_file verdict} for the face_alignment weights in `folder`."""
    return {name: verify_weight_file(Path(folder) / name) for name in (files if files is not None else landmark_files())}


def manual_line(url: str, dest: Path) -> str:
    return f"download {url} and save it as {dest}"


def fetch_weight_file(name: str, url: str, folder: Path, progress: bool, fetch: Download = download) -> Outcome:
    """Download one weight file into `folder` (unless it verifies already) and verify it. A failed or wrong
    download leaves nothing behind: it is written under a temporary name and renamed once verified."""
    dest = Path(folder) / name
    status = verify_weight_file(dest)
    if status == "ok":
        return Outcome(name, True, f"{dest} (already there, verified)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        os.close(fd)
    except OSError as exc:
        return Outcome(name, False, f"cannot write into {folder}: {exc.strerror or exc}", manual_line(url, dest))
    tmp = Path(tmp_name)
    try:
        if progress:
            print(f"downloading {url}", file=sys.stderr, flush=True)
        fetch(url, tmp, progress)
        verdict = verify_weight_file(tmp, name)
        if verdict != "ok":
            return Outcome(name, False, f"the download from {url} is {verdict}", manual_line(url, dest))
        os.replace(tmp, dest)
    except UserError as exc:
        return Outcome(name, False, str(exc), manual_line(url, dest))
    except OSError as exc:
        return Outcome(name, False, f"cannot write {dest}: {exc.strerror or exc}", manual_line(url, dest))
    finally:
        tmp.unlink(missing_ok=True)
    return Outcome(name, True, f"{dest} (downloaded, verified)")


# --------------------------------------------------------------------------- checkpoints
def _describe(dest: Path) -> dict[str, str]:
    from pcavs.checkpoints import describe_checkpoints  # imports torch: only when needed
    return describe_checkpoints(dest)


def _checkpoints_complete(status: Mapping[str, str]) -> bool:
    return all(status.get(net) in USABLE for net in INFERENCE_NETS)


def checkpoint_manual_line(dest: Path, prog: str) -> str:
    names = ", ".join(f"latest_net_{n}.pth" for n in INFERENCE_NETS)
    return (f"download demo.zip from {DRIVE_VIEW_URL} and run `{prog} fetch --zip PATH/TO/demo.zip` "
            f"(or unzip it so that {names} are in {dest})")


def fetch_checkpoint_files(url: str, dest: Path, progress: bool, prog: str, force: bool = False,
                           zip_path: Path | None = None, describe: Describe | None = None) -> Outcome:
    """The checkpoints in `dest`: kept when they verify (unless `force`), else from `zip_path` or `url`."""
    describe = describe or _describe
    dest = Path(dest)
    manual = checkpoint_manual_line(dest, prog)
    if zip_path is None and not force and dest.is_dir() and _checkpoints_complete(describe(dest)):
        return Outcome("checkpoints", True, f"{dest} (already there, verified)")
    try:
        if zip_path is not None:
            status = install_zip(Path(zip_path), dest, describe)
        else:
            status = fetch_checkpoints(url, dest, progress, describe)
    except CheckpointFetchError as exc:
        return Outcome("checkpoints", False, str(exc), manual)
    if not _checkpoints_complete(status):
        bad = ", ".join(f"{net} {status.get(net, 'missing')}" for net in INFERENCE_NETS if status.get(net) not in USABLE)
        return Outcome("checkpoints", False, f"{dest} lacks usable networks after installing: {bad}", manual)
    return Outcome("checkpoints", True, f"{dest} ({'installed' if zip_path else 'downloaded'}, verified)")


# --------------------------------------------------------------------------- everything
def fetch_all(checkpoint_url: str, checkpoint_dir: Path, landmark_dir: Path | None, *, prog: str = "pcavs-live",
              progress: bool = True, force: bool = False, zip_path: Path | None = None,
              files: Mapping[str, str] | None = None, fetch: Download = download,
              describe: Describe | None = None) -> list[Outcome]:
    """Fetch and verify the checkpoints and the face_alignment weights; one Outcome per file (checkpoints:
    one for the zip). Never raises for a failed download: the caller reports the outcomes."""
    outcomes = [fetch_checkpoint_files(checkpoint_url, checkpoint_dir, progress, prog, force, zip_path, describe)]
    folder = Path(landmark_dir) if landmark_dir is not None else default_landmark_dir()
    for name, url in (files if files is not None else landmark_files()).items():
        outcomes.append(fetch_weight_file(name, url, folder, progress, fetch))
    return outcomes


def report(outcomes: list[Outcome], prog: str, out=None) -> None:
    """One line per file; for each one still missing, one line with the URL and the destination; then a
    FetchError (one `error:` line) if anything is missing."""
    out = out if out is not None else sys.stdout
    width = max(len(o.what) for o in outcomes)
    for o in outcomes:
        print(f"  {o.what:<{width}}  {'ok' if o.ok else 'missing'}  {o.detail}", file=out)
    missing = [o for o in outcomes if not o.ok]
    if not missing:
        print("everything the program loads is here and verified; it runs without a network now", file=out)
        return
    print("to finish by hand:", file=out)
    for o in missing:
        print(f"  {o.manual}", file=out)
    raise FetchError(f"{len(missing)} of {len(outcomes)} downloads failed ({', '.join(o.what for o in missing)})",
                     hint=f"do what the 'to finish by hand' lines say, then run `{prog} fetch` again to verify")
