"""`pcavs-live fetch`: every file the program loads at run time, downloaded once and verified, so that later
runs need no network.

Two kinds of files:
* the PC-AVS checkpoints `latest_net_{G,V,E,A_sync}.pth` (the authors' demo.zip; `pcavs_live.cli.fetch_checkpoints`
  downloads, unpacks and verifies them by loading them into the networks);
* face_alignment's face detector (SFD) and landmark network (2D-FAN-4), which the program otherwise
  downloads on the first run that needs a face detector (a photo without a landmark sidecar, a webcam or a
  video pose). They go into the folder `pcavs.alignment` reads them from (torch.hub's cache,
  $TORCH_HOME/hub/checkpoints, unless --landmark-dir says otherwise), checked against the SHA-256 in the
  registry `pcavs_live/common/weights.txt` (pooch does the download and the check).

Everything is attempted even when one file fails; each file that is still missing afterwards gets one line
with the URL to download it from by hand and the exact path to put it at, then one `error:` line.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pcavs_live.cli.fetch_checkpoints import (DRIVE_VIEW_URL, INFERENCE_NETS, USABLE, CheckpointFetchError,
                                   fetch_checkpoints, install_zip)
from pcavs_live.common.download import Weight, download, verify
from pcavs_live.common.errors import UserError

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
def landmark_files() -> dict[str, Weight]:
    """{file name: registry entry} of face_alignment's weights, as `pcavs.alignment` names them."""
    from pcavs.alignment import LANDMARK_WEIGHTS
    return dict(LANDMARK_WEIGHTS)


def default_landmark_dir() -> Path:
    from pcavs.alignment import default_landmark_model_dir
    return Path(default_landmark_model_dir())


def landmark_status(folder: Path, files: Mapping[str, Weight] | None = None) -> dict[str, str]:
    """{file name: "ok" | "missing" | "invalid (...)"} for the face_alignment weights in `folder`."""
    files = files if files is not None else landmark_files()
    return {name: verify(Path(folder) / name, weight.sha256) for name, weight in files.items()}


def manual_line(url: str, dest: Path) -> str:
    return f"download {url} and save it as {dest}"


def fetch_weight_file(weight: Weight, folder: Path, progress: bool) -> Outcome:
    """Download one weight file into `folder` (unless it verifies already); pooch checks its SHA-256 and
    moves it into place only then, so a failed or wrong download leaves nothing under its name."""
    dest = Path(folder) / weight.name
    if verify(dest, weight.sha256) == "ok":
        return Outcome(weight.name, True, f"{dest} (already there, verified)")
    if progress:
        print(f"downloading {weight.url}", file=sys.stderr, flush=True)
    try:
        download(weight.url, dest, sha256=weight.sha256, progress=progress)
    except UserError as exc:
        return Outcome(weight.name, False, str(exc), manual_line(weight.url, dest))
    return Outcome(weight.name, True, f"{dest} (downloaded, verified)")


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
              files: Mapping[str, Weight] | None = None, describe: Describe | None = None) -> list[Outcome]:
    """Fetch and verify the checkpoints and the face_alignment weights; one Outcome per file (checkpoints:
    one for the zip). Never raises for a failed download: the caller reports the outcomes."""
    outcomes = [fetch_checkpoint_files(checkpoint_url, checkpoint_dir, progress, prog, force, zip_path, describe)]
    folder = Path(landmark_dir) if landmark_dir is not None else default_landmark_dir()
    for weight in (files if files is not None else landmark_files()).values():
        outcomes.append(fetch_weight_file(weight, folder, progress))
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
