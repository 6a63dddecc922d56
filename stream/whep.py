"""Watching a WHEP endpoint (draft-ietf-wish-whep) from Python: the egress twin of stream/whip.py.

Why: a WHEP viewer needs no page of ours and no server-specific API. Our own servers offer WHEP
(`POST /whep` on the viewer server, `POST /sessions/{id}/whep` on the studio; stream/webrtc/whep.py),
and so do LiveKit, Cloudflare Stream and OvenMediaEngine, so one client watches any of them; tests
and benches use it to receive the avatar the way OBS's WHEP source or any WHEP player would.

The exchange (POST the recvonly offer with the bearer token → 201 + answer + `Location`; DELETE the
resource to leave) and the wait for the media connection are stream/wish.py's, shared with WHIP.
`WhepClient` runs on the caller's asyncio loop (no thread of its own); every refusal is a `WhepError`
with one line.

Command line (prints what arrived; `error:` + `hint:` lines on a refusal, exit code 2):
    python -m stream.whep URL [--token T] [--seconds 5] [--host-address 127.0.0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from typing import Any, Callable, Sequence

import aiohttp
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from pcavs_live.common.errors import UserError
from stream.webrtc.ice import unusable_host_address, use_host_addresses
from stream.wish import (WishRefused, delete_resource, is_http_url, one_line, post_offer, receive,
                         refusal_message, unreachable_message, wait_connected)


class WhepError(UserError):
    """The WHEP endpoint cannot be watched (wrong URL, token refused, full, unreachable); one line."""


class _UnusableAnswer(Exception):
    """The server's 201 carried a body aiortc cannot use as an SDP answer."""


class WhepClient:
    """One WHEP viewer: video + audio received, each video frame kept as `keep(frame)` (default: its
    pts) in `frames` (the newest `max_frames`; `video_frames` counts all), audio frames counted.

    `endpoint`: the WHEP URL (http or https); `token`: its bearer token (None: none).
    `ice_host_addresses`: gather host candidates on exactly these addresses (["127.0.0.1"] for a
    server on this machine); `ice_servers`: STUN/TURN (none by default: aiortc's default is Google's).
    `connect_timeout_s` bounds the POST and the ICE/DTLS connection each."""

    def __init__(self, endpoint: str, token: str | None = None, *,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 ice_host_addresses: Sequence[str] | None = None, connect_timeout_s: float = 10.0,
                 keep: Callable[[Any], Any] | None = None, max_frames: int = 30_000) -> None:
        if not is_http_url(endpoint):
            raise WhepError(f"WHEP endpoint {endpoint!r} is not an http(s) URL",
                            hint="pass the server's WHEP URL, e.g. http://127.0.0.1:8080/whep")
        for address in ice_host_addresses or []:
            reason = unusable_host_address(address)
            if reason:
                raise WhepError(reason)
        self.endpoint, self.token = endpoint, token or None
        self.ice_servers = [s if isinstance(s, RTCIceServer) else RTCIceServer(urls=s) for s in ice_servers or []]
        self.ice_host_addresses = list(ice_host_addresses) if ice_host_addresses else None
        self.connect_timeout_s = connect_timeout_s
        self.keep = keep
        self.frames: collections.deque = collections.deque(maxlen=max_frames)
        self.video_frames = 0
        self.audio_frames = 0
        self.pc: RTCPeerConnection | None = None
        self.resource: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._readers: list[asyncio.Task] = []

    async def __aenter__(self) -> "WhepClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self.pc is not None and self.pc.connectionState == "connected"

    async def start(self) -> None:
        """Offer, answer, connect; a `WhepError` (and nothing left open) when any step fails."""
        if self.pc is not None:
            raise RuntimeError("WhepClient.start called twice")
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.connect_timeout_s))
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.on("track", lambda track: self._readers.append(
            asyncio.ensure_future(receive(track, self._on_video, self._on_audio))))
        if self.ice_host_addresses:
            use_host_addresses(pc, self.ice_host_addresses)
        try:
            await pc.setLocalDescription(await pc.createOffer())     # gathers every candidate
            answer, self.resource = await post_offer(self._http, self.endpoint, pc.localDescription.sdp, self.token)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            except Exception as bad:  # noqa: BLE001 - whatever aiortc raises on an unusable answer
                raise _UnusableAnswer(one_line(str(bad) or type(bad).__name__)) from None
            await wait_connected(pc, self.connect_timeout_s)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, WishRefused):
                raise WhepError(refusal_message("WHEP", self.endpoint, exc, "serve this viewer"),
                                hint=_refusal_hint(exc)) from None
            if isinstance(exc, _UnusableAnswer):
                raise WhepError(f"WHEP endpoint {self.endpoint} answered 201 without a usable SDP answer ({exc})",
                                hint="is this URL a WHEP endpoint?") from None
            if isinstance(exc, asyncio.TimeoutError):
                raise WhepError(f"WHEP endpoint {self.endpoint} did not answer within {self.connect_timeout_s:g} s",
                                hint="start the server or fix the URL") from None
            if isinstance(exc, (aiohttp.ClientError, OSError)):    # ConnectionError (no ICE) included
                raise WhepError(unreachable_message("WHEP", self.endpoint, exc),
                                hint="start the server or fix the URL; behind NAT pass a STUN/TURN server") from None
            raise

    def _on_video(self, frame) -> None:
        self.video_frames += 1
        self.frames.append(frame.pts if self.keep is None else self.keep(frame))

    def _on_audio(self, frame) -> None:
        self.audio_frames += 1

    async def stop(self) -> None:
        """DELETE the resource (best effort), close the connection and the readers. Idempotent."""
        resource, self.resource = self.resource, None
        await delete_resource(self._http, resource, self.token, "WHEP")
        if self.pc is not None:
            await self.pc.close()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []
        if self._http is not None:
            await self._http.close()
            self._http = None


def _refusal_hint(exc: WishRefused) -> str:
    if exc.status in (401, 403):
        return "pass the server's token (--token; for a studio session its share link's view key)"
    if exc.status == 404:
        return "check the WHEP URL (ours: /whep, or /sessions/ID/whep on the studio)"
    if exc.status == 503:
        return "wait for a viewer to leave, or raise the server's viewer limit"
    return "check the server's log"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream.whep", description="Watch a WHEP endpoint for a while "
                                 "and print how many video and audio frames arrived.")
    ap.add_argument("url", help="the WHEP endpoint URL")
    ap.add_argument("--token", help="bearer token")
    ap.add_argument("--seconds", type=float, default=5.0, help="how long to watch")
    ap.add_argument("--host-address", action="append", help="gather ICE candidates on this address only")
    args = ap.parse_args(argv)

    async def watch() -> WhepClient:
        client = WhepClient(args.url, args.token, ice_host_addresses=args.host_address)
        async with client:
            await asyncio.sleep(args.seconds)
        return client

    try:
        client = asyncio.run(watch())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    print(f"{client.video_frames} video frames, {client.audio_frames} audio frames in {args.seconds:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
