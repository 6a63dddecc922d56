"""What WHIP (RFC 9725, publishing) and WHEP (draft-ietf-wish-whep, watching) clients share.

Both protocols are the same HTTP exchange in opposite media directions: POST the SDP offer
(`Content-Type: application/sdp`, optional `Authorization: Bearer TOKEN`) to the endpoint, get
`201 Created` with the SDP answer and a `Location` naming the session's resource, DELETE that
resource to leave. `WhipSink` (stream/whip.py) and `WhepClient` (stream/whep.py) differ only in
which transceivers they offer and what they do with the connection, so the exchange, the wait for
the media connection and the one-line wording of a refusal are here, once.

aiortc gathers every ICE candidate before `createOffer` resolves, so neither client trickles
(PATCH); every WHIP/WHEP server must accept a complete offer.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)

SDP = "application/sdp"


class WishRefused(Exception):
    """The server answered the offer with an error status (kept apart from network errors)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}{': ' + reason if reason else ''}")
        self.status = status


def one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def is_http_url(url: str | None) -> bool:
    parts = urlsplit(url or "")
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def headers(token: str | None, content_type: str | None = None) -> dict[str, str]:
    """The request headers: the bearer token when there is one, the body's type when there is one."""
    out = {}
    if token:
        out["Authorization"] = f"Bearer {token}"
    if content_type:
        out["Content-Type"] = content_type
    return out


async def post_offer(http: aiohttp.ClientSession, endpoint: str, sdp: str, token: str | None) -> tuple[str, str]:
    """POST `sdp` to `endpoint`: (the answer's SDP, the resource's absolute URL). A status other
    than 201 or an answer without `Location` is a `WishRefused`; network errors pass through."""
    async with http.post(endpoint, data=sdp, headers=headers(token, SDP)) as response:
        body = await response.text()
        if response.status != 201:
            reason = body
            if response.content_type == "application/json":   # our own servers: {"error": one line}
                try:
                    reason = str((await response.json()).get("error", body))
                except (ValueError, AttributeError):
                    pass
            raise WishRefused(response.status, one_line(reason))
        location = response.headers.get("Location")
        if not location:
            raise WishRefused(response.status, "the answer has no Location header")
    return body, urljoin(endpoint, location)


async def delete_resource(http: aiohttp.ClientSession | None, resource: str | None, token: str | None,
                          protocol: str) -> None:
    """DELETE the session's resource, best effort (the server may already have forgotten it)."""
    if resource is None or http is None:
        return
    try:
        async with http.delete(resource, headers=headers(token),
                               timeout=aiohttp.ClientTimeout(total=3.0)) as response:
            if response.status >= 300 and response.status != 404:
                log.info("%s: DELETE %s answered %d", protocol, resource, response.status)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        log.info("%s: DELETE %s failed: %s", protocol, resource, exc)


async def wait_connected(pc: RTCPeerConnection, timeout_s: float) -> None:
    """Until `pc` is connected; a `ConnectionError` saying why when it fails, closes or times out.
    Call before `setRemoteDescription` can have connected it (the state is checked first)."""
    done = asyncio.Event()

    def check() -> None:
        if pc.connectionState in ("connected", "failed", "closed"):
            done.set()

    pc.on("connectionstatechange", check)
    try:
        check()
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionError(f"the server answered, but no media connection (ICE) came up within "
                                  f"{timeout_s:g} s") from None
    finally:
        pc.remove_listener("connectionstatechange", check)
    if pc.connectionState != "connected":
        raise ConnectionError(f"the media connection {pc.connectionState}")


def refusal_message(protocol: str, endpoint: str, exc: WishRefused, verb: str) -> str:
    """A refused offer as one line: the token, a missing endpoint, or the server's own reason."""
    if exc.status in (401, 403) and "in use" not in str(exc):
        return f"{protocol} endpoint {endpoint} refused the token ({exc})"
    if exc.status == 404:
        return f"{protocol} endpoint {endpoint} does not exist ({exc})"
    return f"{protocol} endpoint {endpoint} refused to {verb} ({exc})"


def unreachable_message(protocol: str, endpoint: str, exc: BaseException) -> str:
    return f"cannot reach {protocol} endpoint {endpoint} ({one_line(str(exc) or type(exc).__name__)})"


async def receive(track, on_video: Callable[[Any], None], on_audio: Callable[[Any], None]) -> None:
    """Hand every frame of a received track to `on_video` or `on_audio` (by the track's kind) until the
    track ends: the reading loop of every receiving peer (`stream.whep.WhepClient` and the tests' peers)."""
    handle = on_video if track.kind == "video" else on_audio
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        handle(frame)
