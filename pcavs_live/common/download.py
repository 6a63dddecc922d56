"""Fetch one URL into one file, so that a failed or interrupted fetch never leaves a file that looks done.

Two things download at run time: the PC-AVS demo checkpoints (`pcavs_live/cli/fetch_checkpoints.py`) and the face
landmark weights (`pcavs/alignment/detector.py`). Both need the same care, kept here once:

* a timeout on every socket operation, so a dead server cannot hang the program;
* the body streams into a `.part` file next to the destination (same disk, so the final rename is atomic
  and a crash leaves nothing under the real name), which is removed on any failure;
* a body shorter than its Content-Length is a failure, not a file;
* an HTML answer is never the file: it is handed to `follow_html` (a sign-in or "download anyway" page
  that links to the real file), at most once, and is otherwise refused;
* every failure is one `DownloadError` line naming the URL; callers re-raise it as their own error type
  with their own hint.
"""
from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pcavs_live.common.errors import UserError

USER_AGENT = "pcavs-live/1.0 (+python urllib)"
CHUNK = 1 << 20
HTML_LIMIT = 4 << 20  # an interstitial page is small; never buffer a mislabelled multi-GB body

# (page text, page URL) → the URL the page points to, or None when it is not a page to follow.
FollowHtml = Callable[[str, str], "str | None"]


class DownloadError(UserError):
    """A download failed. `url` is the address that failed and `reason` the cause in a few words."""

    def __init__(self, url: str, reason: str, hint: str | None = None) -> None:
        reason = " ".join(reason.split())  # foreign errors sometimes carry several lines
        super().__init__(f"could not download {url}: {reason}", hint)
        self.url = url
        self.reason = reason


def _open(url: str, timeout_s: float):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout_s)  # follows HTTP redirects


def _copy(response, out: BinaryIO, url: str, progress: bool) -> int:
    """Stream the body into `out`; with `progress`, a byte count on stderr (redrawn on a terminal,
    every few seconds otherwise)."""
    total = int(response.headers.get("Content-Length") or 0)
    done, last = 0, 0.0
    tty = sys.stderr.isatty()
    while chunk := response.read(CHUNK):
        out.write(chunk)
        done += len(chunk)
        now = time.monotonic()
        if progress and (now - last >= (0.2 if tty else 5.0)):
            last = now
            share = f" ({100 * done / total:.0f}% of {total / 1e6:.0f} MB)" if total else ""
            print(f"\r  {done / 1e6:.1f} MB{share}", end="" if tty else "\n", file=sys.stderr, flush=True)
    if progress:
        print(f"\r  {done / 1e6:.1f} MB downloaded", file=sys.stderr, flush=True)
    if total and done != total:
        raise DownloadError(url, f"the transfer was cut short ({done} of {total} bytes)")
    return done


def download(url: str, dest: str | os.PathLike, *, timeout_s: float = 60.0, progress: bool = False,
             what: str = "file", follow_html: FollowHtml | None = None) -> int:
    """Fetch `url` into `dest` (replacing it only once the whole body has arrived); returns its size.

    `what` names the expected file in the message for an HTML answer ("… a web page instead of the zip").
    Raises DownloadError on network and HTTP errors, timeouts, a short body, a full disk, or an HTML
    answer that `follow_html` does not turn into a next URL.
    """
    dest = Path(dest)
    part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")  # unique: two fetches never share it
    attempts = 2 if follow_html is not None else 1
    try:
        for _attempt in range(attempts):
            with _open(url, timeout_s) as response:
                if not response.headers.get("Content-Type", "").startswith("text/html"):
                    with open(part, "xb") as out:
                        size = _copy(response, out, url, progress)
                    part.replace(dest)
                    return size
                page = response.read(HTML_LIMIT).decode("utf-8", "replace")
                next_url = follow_html(page, response.url) if follow_html is not None else None
            if next_url is None:
                break
            url = next_url
    except urllib.error.HTTPError as exc:
        raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(url, str(exc.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # timeouts, resets, full disk, bad URL
        raise DownloadError(url, str(exc) or type(exc).__name__) from None
    finally:
        part.unlink(missing_ok=True)
    passed = " (a sign-in, quota or confirmation page it could not pass)" if follow_html is not None else ""
    raise DownloadError(url, f"the server sent a web page instead of the {what}{passed}")
