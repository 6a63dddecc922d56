"""Hash-checked downloads of the files the program loads at run time, on the libraries the field uses.

* **pooch** does the download itself: the body streams into a temporary file beside the destination, its
  SHA-256 is checked against the registry, and only then is it moved into place (a failed, cut-short or
  corrupted download leaves nothing under the real name); a failed attempt is retried once from the start.
* **gdown** handles Google Drive links (the "can't scan this file for viruses" page, its confirm form and
  the `drive.usercontent` flow), resuming a transfer cut short with a Range request; pooch still checks
  and moves its result.
* The registry `pcavs_live/common/weights.txt` (pooch's format: name, SHA-256, URL) lists every file.

Two callers: `pcavs_live.cli.fetch` (everything, once) and `pcavs.alignment` (the face weights, on the
first run that needs them). Every failure is one `DownloadError` line naming the URL.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pooch
import requests

from pcavs_live.common.errors import UserError

REGISTRY_FILE = Path(__file__).with_name("weights.txt")
UNKNOWN_HASH = "unknown"  # a registry entry whose digest is not recorded yet: downloaded without a check
USER_AGENT = "pcavs-live/1.0 (+python requests)"
DRIVE_HOSTS = ("drive.google.com", "docs.google.com")
RETRIES = 1  # one more attempt after a network failure or a wrong hash


class DownloadError(UserError):
    """A download failed. `url` is the address that failed and `reason` the cause in a few words."""

    def __init__(self, url: str, reason: str, hint: str | None = None) -> None:
        reason = " ".join(reason.split())  # foreign errors sometimes carry several lines
        super().__init__(f"could not download {url}: {reason}", hint)
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Weight:
    """One registry entry: the file name, its SHA-256 (None: not recorded) and where to download it."""

    name: str
    sha256: str | None
    url: str


def load_registry(path: str | os.PathLike = REGISTRY_FILE) -> dict[str, Weight]:
    """{name: Weight} from a pooch registry file (parsed by pooch itself)."""
    reader = pooch.Pooch(path=Path(path).parent, base_url="")
    reader.load_registry(path)
    out = {}
    for name, digest in reader.registry.items():
        if name not in reader.urls:
            raise ValueError(f"{path}: {name} has no URL")
        out[name] = Weight(name, None if digest == UNKNOWN_HASH else digest.removeprefix("sha256:"), reader.urls[name])
    return out


def verify(path: str | os.PathLike, sha256: str | None) -> str:
    """"ok", "missing", or "invalid (...)": the file's SHA-256 must be `sha256` (any non-empty file when None)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if sha256 is None:
        return "ok" if path.stat().st_size > 0 else "invalid (empty file)"
    got = pooch.file_hash(str(path))
    return "ok" if got == sha256.lower() else f"invalid (SHA-256 {got[:10]}…, expected {sha256[:10]}…)"


def is_drive_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).hostname in DRIVE_HOSTS


class DriveDownloader:
    """A pooch downloader that hands Google Drive links to gdown (pooch calls it with its temporary file)."""

    def __init__(self, timeout_s: float, progress: bool) -> None:
        self.timeout_s, self.progress = timeout_s, progress

    def __call__(self, url: str, output_file: str, _pooch: object) -> None:
        import gdown
        try:
            gdown.download(url, str(output_file), quiet=not self.progress, use_cookies=False,
                           timeout=self.timeout_s, retries=RETRIES)
        finally:  # gdown keeps a cut-short body (`<name>XXXXXXXX.part`) for a later resume; we start afresh
            for part in glob.glob(glob.escape(str(output_file)) + "?" * 8 + ".part"):
                Path(part).unlink(missing_ok=True)


@contextlib.contextmanager
def _pooch_quiet(quiet: bool):
    """pooch logs every download on its own handler; silence it for `--quiet`. (`disabled`, not setLevel:
    pooch's logger lives outside logging's manager, so a new level would not reach its cached check.)"""
    logger = pooch.get_logger()
    was = logger.disabled
    logger.disabled = was or quiet
    try:
        yield
    finally:
        logger.disabled = was


def _reason(exc: BaseException) -> str:
    """A few words for what went wrong, without the libraries' multi-line advice."""
    import gdown.exceptions
    if isinstance(exc, gdown.exceptions.DownloadError) and isinstance(exc.__cause__, Exception):
        return _reason(exc.__cause__)  # gdown's "failed after N retries" / "incomplete" around the real cause
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the transfer was cut short"
    if isinstance(exc, requests.ConnectionError):
        inner = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's MaxRetryError → its cause
        if type(inner).__name__ == "NameResolutionError":
            return "the host name does not resolve (offline?)"
        return "cannot connect to the server"
    if isinstance(exc, gdown.exceptions.FileURLRetrievalError):
        return "Google Drive would not hand out the file (quota, sign-in, or a page gdown could not pass)"
    if isinstance(exc, ValueError) and "hash" in str(exc).lower():
        return "its SHA-256 does not match the registry (corrupted or changed on the server); nothing was kept"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _looks_like_web_page(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(1024).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, timeout_s: float = 60.0,
             progress: bool = False) -> int:
    """Fetch `url` into `dest` unless `dest` is already there with the right SHA-256 (or is there at all,
    without a `sha256`); returns its size.

    Without a known `sha256` a web page (a sign-in or quota page) is refused rather than kept as the file.
    Raises DownloadError on network and HTTP errors, timeouts, a short body, a wrong hash or a full disk.
    """
    dest = Path(dest)
    fetcher = pooch.Pooch(path=dest.parent, base_url="", retry_if_failed=RETRIES,
                          registry={dest.name: f"sha256:{sha256}" if sha256 else None}, urls={dest.name: url})
    downloader = (DriveDownloader(timeout_s, progress) if is_drive_url(url) else
                  pooch.HTTPDownloader(progressbar=progress, timeout=timeout_s, headers={"User-Agent": USER_AGENT}))
    from gdown.exceptions import DownloadError as GdownError
    try:
        with _pooch_quiet(not progress):
            fetcher.fetch(dest.name, downloader=downloader)
    except (requests.RequestException, GdownError, ValueError, OSError) as exc:  # ValueError: pooch's wrong hash
        raise DownloadError(url, _reason(exc)) from None
    if sha256 is None and _looks_like_web_page(dest):
        dest.unlink(missing_ok=True)
        raise DownloadError(url, f"the server sent a web page instead of {dest.name} (a sign-in or quota page)")
    if sha256 is None and progress:  # so that the registry can pin it
        print(f"SHA-256 of {dest.name}: {pooch.file_hash(str(dest))} (no digest to check it against)",
              file=sys.stderr, flush=True)
    return dest.stat().st_size
