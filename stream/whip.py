"""Publishing the avatar by WHIP (RFC 9725) into an SFU (Janus, LiveKit ingress, Cloudflare, OME).

Why WHIP and not more viewers of our own: every direct viewer costs its own VP8 encode in this
process; a publisher costs one encode whatever the audience, and the SFU fans the packets out to
viewers on other machines. WHIP is the standard ingest every such server accepts: POST the SDP offer
(with `Authorization: Bearer TOKEN`) to the endpoint, get 201 + the answer + a `Location` naming the
session's resource, DELETE that resource to stop. We gather ICE fully before the POST (aiortc does
not trickle), which every WHIP server must accept.

Shape: `WhipSink` is a `FrameSink` that owns one thread running one asyncio loop (like
`WebRTCServer`). `write` only drops the frame and its slot's audio into two bounded buffers
(`LatestBuffer`, drops counted) and returns, so a slow or absent server never holds up the render loop.
The buffers feed the same source tracks as the browser viewer (stream/webrtc/tracks.py: frame-index
timestamps, audio Opus-encoded once per 40 ms slot), and each connection to the server gets
`ViewerRelay` proxies of them, so a reconnect is a new peer connection on the same sources.

Reconnecting: a server that restarts forgets our session without telling us (WHIP has no
notification). The supervisor counts a connection dead when its state is failed/closed, or when the
server's RTCP receiver reports, once seen, stop for `liveness_s` (an SFU sends them every second or so
while it receives our media; a server that never sends any is judged by the connection state alone). It then DELETEs the old resource (best effort), and POSTs a new offer with
back-off (`backoff_s`: first and longest wait) until one is answered or the sink is closed.

The first connection is made in `open`, so a wrong token or endpoint is a `WhipError` (one line)
before the session starts; later failures only log and retry.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Callable, Sequence

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from pcavs_live.common.errors import UserError
from pcavs_live.common.workers import Worker
from stream.webrtc.buffer import LatestBuffer
from stream.webrtc.ice import unusable_host_address, unusable_ice_server, use_host_addresses
from stream.webrtc.tracks import OPUS_RATES, VIDEO_CLOCK, LiveAudioTrack, LiveVideoTrack, ViewerRelay
from stream.wish import (WishRefused, delete_resource, is_http_url, one_line, post_offer, refusal_message,
                         unreachable_message, wait_connected)

log = logging.getLogger(__name__)


class WhipError(UserError):
    """The WHIP endpoint cannot be published to (wrong URL, token refused, unreachable); one line."""


class WhipSink:
    """FrameSink that publishes each slot's frame and audio to a WHIP endpoint (see the module notes).

    `endpoint`: the WHIP endpoint URL (http or https); `token`: its bearer token ("" or None: none).
    `ice_servers`: STUN/TURN for the publisher's side (aiortc RTCIceServer or URL strings);
    `ice_host_addresses`: gather host candidates on exactly these addresses (["127.0.0.1"] for a
    server on the same machine). `connect_timeout_s` bounds one POST + ICE/DTLS connection.
    Counters for status displays: `connects` (answered offers), `unsent` (slots written while not
    connected, e.g. during a reconnect), `dropped` (frames the hand-over buffer discarded).
    """

    def __init__(self, endpoint: str, token: str | None = None, *,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 ice_host_addresses: Sequence[str] | None = None, connect_timeout_s: float = 10.0,
                 backoff_s: tuple[float, float] = (0.25, 1.0), liveness_s: float = 3.0,
                 buffer_frames: int = 25) -> None:
        if not is_http_url(endpoint):
            raise WhipError(f"WHIP endpoint {endpoint!r} is not an http(s) URL",
                            hint="set whip.endpoint, e.g. http://127.0.0.1:7080/whip/endpoint/avatar")
        self.endpoint = endpoint
        self.token = token or None
        self._ice_servers = [s if isinstance(s, RTCIceServer) else RTCIceServer(urls=s) for s in ice_servers or []]
        self.ice_host_addresses = list(ice_host_addresses) if ice_host_addresses else None
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s = backoff_s
        self.liveness_s = liveness_s
        self.buffer_frames = buffer_frames
        self.connects = 0
        self.unsent = 0
        self._thread: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: aiohttp.ClientSession | None = None
        self._relay: ViewerRelay | None = None
        self._video_buf: LatestBuffer | None = None
        self._audio_buf: LatestBuffer | None = None
        self._video: LiveVideoTrack | None = None
        self._audio: LiveAudioTrack | None = None
        self._pc: RTCPeerConnection | None = None
        self._proxies: list = []          # the current connection's ViewerRelay proxies
        self._resource: str | None = None
        self._supervisor: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ FrameSink (scheduler's thread)
    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        if self._thread is not None:
            raise RuntimeError("WhipSink.open called twice")
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"WHIP audio must be one of {OPUS_RATES} Hz, got {sample_rate}")
        if VIDEO_CLOCK % fps:
            raise ValueError(f"WHIP video needs a frame rate dividing 90000, got {fps}")
        for address in self.ice_host_addresses or []:
            reason = unusable_host_address(address)
            if reason:
                raise WhipError(reason)
        for server in self._ice_servers:
            reason = unusable_ice_server(server)
            if reason:
                raise WhipError(reason)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = Worker(loop.run_forever, "whip-publisher", wake=lambda: loop.call_soon_threadsafe(loop.stop))
        self._thread.start()
        try:
            self._call(self._start(fps, sample_rate), 2 * self.connect_timeout_s + 5)
        except BaseException:
            self.close()
            raise

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        if self._video_buf is None or self._audio_buf is None:
            raise RuntimeError("WhipSink.write called before open()")
        if not self.connected:      # reconnecting: the slot goes nowhere, and is counted
            self.unsent += 1
        self._video_buf.put((frame_index, np.array(frame, dtype=np.uint8, order="C", copy=True)))
        self._audio_buf.put((frame_index, np.array(audio, dtype=np.float32, copy=True).reshape(-1)))

    def close(self) -> None:
        """DELETE the resource, close the connection, stop the loop and join the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if loop.is_running():
                self._call(self._stop(), 15.0)
        except Exception as exc:  # closing must not fail the session's shutdown
            log.warning("WHIP: stopping the publisher failed: %s", exc)
        finally:
            if thread.stop(15.0):    # a stuck loop is named in the log, never waited on forever
                loop.close()
            self._loop = self._thread = None

    # ------------------------------------------------------------------ status (any thread)
    @property
    def connected(self) -> bool:
        pc = self._pc
        return pc is not None and pc.connectionState == "connected"

    @property
    def dropped(self) -> int:
        """Frames the hand-over buffer discarded because the publisher could not keep up."""
        return 0 if self._video_buf is None else self._video_buf.dropped

    @property
    def resource(self) -> str | None:
        """The URL of the current WHIP session (the answer's Location), None while not published."""
        return self._resource

    # ------------------------------------------------------------------ the loop's side
    def _call(self, coro, timeout: float):
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise WhipError(f"WHIP endpoint {self.endpoint} did not answer within {timeout:g} s") from None

    async def _start(self, fps: int, sample_rate: int) -> None:
        loop = asyncio.get_running_loop()
        self._video_buf = LatestBuffer(loop, self.buffer_frames)
        self._audio_buf = LatestBuffer(loop, self.buffer_frames)
        self._video, self._audio = LiveVideoTrack(self._video_buf), LiveAudioTrack(self._audio_buf)
        self._video.fps = fps
        self._audio.fps, self._audio.sample_rate = fps, sample_rate
        self._relay = ViewerRelay()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.connect_timeout_s))
        try:
            await self._connect()
        except WishRefused as exc:
            raise WhipError(refusal_message("WHIP", self.endpoint, exc, "publish"),
                            hint=self._refusal_hint(exc)) from None
        except asyncio.TimeoutError:
            raise WhipError(f"WHIP endpoint {self.endpoint} did not answer within {self.connect_timeout_s:g} s",
                            hint="start the WHIP server or fix whip.endpoint") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WhipError(unreachable_message("WHIP", self.endpoint, exc),
                            hint="start the WHIP server or fix whip.endpoint; behind NAT set server.stun_url "
                            "/ server.turn_url") from None
        self._supervisor = asyncio.ensure_future(self._supervise())

    def _refusal_hint(self, exc: WishRefused) -> str:
        if exc.status in (401, 403) and "in use" not in str(exc):
            return "set whip.token to the endpoint's bearer token"
        if exc.status == 404:
            return "check whip.endpoint (the server's endpoint URL, e.g. .../whip/endpoint/ID)"
        return "check the WHIP server's log"

    async def _connect(self) -> None:
        """One offer → answer → ICE/DTLS connection; raises on any failure (leaving nothing open)."""
        assert self._relay is not None and self._video is not None and self._audio is not None
        assert self._http is not None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self._ice_servers)))
        proxies = [self._relay.subscribe(self._video), self._relay.subscribe(self._audio)]
        try:
            pc.addTransceiver(proxies[0], direction="sendonly")
            audio_t = pc.addTransceiver(proxies[1], direction="sendonly")
            # We send ready-made Opus packets (tracks.py), so Opus is the only audio codec we can offer.
            audio_t.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                         if c.mimeType.lower() == "audio/opus"])
            if self.ice_host_addresses:
                use_host_addresses(pc, self.ice_host_addresses)
            await pc.setLocalDescription(await pc.createOffer())   # gathers every candidate
            answer, self._resource = await post_offer(self._http, self.endpoint, pc.localDescription.sdp, self.token)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_connected(pc, self.connect_timeout_s)
        except BaseException:
            await self._delete_resource()
            await self._close_pc(pc, proxies)
            raise
        self._pc, self._proxies = pc, proxies
        self.connects += 1
        log.info("WHIP: publishing to %s (resource %s)", self.endpoint, self._resource)

    @staticmethod
    async def _close_pc(pc: RTCPeerConnection, proxies: list) -> None:
        await pc.close()
        for proxy in proxies:  # leaves the relay, which would otherwise keep queueing for it
            proxy.stop()

    async def _delete_resource(self) -> None:
        resource, self._resource = self._resource, None
        await delete_resource(self._http, resource, self.token, "WHIP")

    async def _alive(self, pc: RTCPeerConnection) -> bool:
        """False once the connection has failed or the server's receiver reports stopped coming."""
        if pc.connectionState in ("failed", "closed"):
            return False
        newest = None
        for sender in pc.getSenders():
            for stats in (await sender.getStats()).values():
                if stats.type == "remote-inbound-rtp":
                    stamp = stats.timestamp.timestamp()
                    newest = stamp if newest is None else max(newest, stamp)
        if newest is None:  # a server that sends no receiver reports: its connection state decides
            return True
        return time.time() - newest < self.liveness_s

    async def _supervise(self) -> None:
        first, longest = self.backoff_s
        while not self._closing:
            pc = self._pc
            if pc is not None and await self._alive(pc):
                await asyncio.sleep(0.25)
                continue
            if pc is not None:
                log.warning("WHIP: lost the connection to %s; reconnecting", self.endpoint)
                self._pc, proxies, self._proxies = None, self._proxies, []
                await self._delete_resource()
                await self._close_pc(pc, proxies)
            delay = first
            while not self._closing:
                try:
                    await self._connect()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the server is away or restarting: wait and try again
                    log.info("WHIP: reconnect to %s failed (%s); next try in %.2g s",
                             self.endpoint, one_line(str(exc) or type(exc).__name__), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, longest)

    async def _stop(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._delete_resource()
        if self._pc is not None:
            await self._close_pc(self._pc, self._proxies)
            self._pc, self._proxies = None, []
        for track in (self._video, self._audio):
            if track is not None:
                track.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None


class RoomShare:
    """FrameSink: another output of a running session (the studio's "share to room"), built and opened on
    a thread of its own, whose failure is a status line of the session instead of its end.

    Why not a plain sink in the session's `FanOutSink`: that one opens in the scheduler's thread and an
    open failure ends the session (right for `--out whip`, where publishing is the point). A studio
    session's own viewers must not wait for, nor die with, the room: `open` returns at once, slots
    written before the publisher is up are counted in `unsent`, and a build, open or write failure
    leaves `state` = "error: ONE LINE" (logged once) while the session goes on. `make` builds the sink
    (the outputs registry's "whip" entry, framed, through `SessionBuilder`); `close` joins the opening
    thread (bounded) and closes the sink, which DELETEs the WHIP resource.
    """

    def __init__(self, make: Callable[[], object], viewer_url: str | None = None,
                 open_timeout_s: float = 30.0) -> None:
        self._make = make
        self.viewer_url = viewer_url or None
        self.open_timeout_s = open_timeout_s
        self.state = "idle"
        self.unsent = 0
        self._sink = None
        self._lock = threading.Lock()
        self._closing = False
        self._worker: Worker | None = None

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        if self._worker is not None:
            raise RuntimeError("RoomShare.open called twice")
        self.state = "connecting"
        self._worker = Worker(lambda: self._open(width, height, fps, sample_rate), "room-share")
        self._worker.start()

    def _open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        try:
            sink = self._make()
            sink.open(width, height, fps, sample_rate)
        except Exception as exc:  # noqa: BLE001 - a status line; the session and its viewers go on
            self._fail("cannot share to the room", exc)
            return
        with self._lock:
            if not self._closing:
                self._sink, sink = sink, None
                self.state = "publishing"
        if sink is not None:     # closed while opening: nothing may stay published
            sink.close()

    def _fail(self, what: str, exc: BaseException) -> None:
        self.state = f"error: {one_line(str(exc) or type(exc).__name__, 200)}"
        log.warning("%s: %s", what, self.state[len("error: "):])

    @property
    def publisher(self):
        """The sink under any framing (`FramedSink.sink`): the `WhipSink` whose counters the status shows."""
        sink = self._sink
        while sink is not None and hasattr(sink, "sink"):
            sink = sink.sink
        return sink

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        sink = self._sink
        if sink is None or not getattr(self.publisher, "connected", True):
            self.unsent += 1
            if sink is None:
                return
        try:
            sink.write(frame, audio, frame_index)
        except Exception as exc:  # noqa: BLE001 - the share stops; the session goes on
            with self._lock:
                self._sink = None
            self._fail("sharing to the room stopped", exc)
            try:
                sink.close()
            except Exception as close_exc:  # noqa: BLE001
                log.warning("closing the room share failed: %s", one_line(str(close_exc)))

    def close(self) -> None:
        """Stop publishing (the WHIP resource is DELETEd); idempotent."""
        with self._lock:
            self._closing = True
            sink, self._sink = self._sink, None
        if self._worker is not None:
            self._worker.join(self.open_timeout_s)
        if sink is not None:
            sink.close()
        if not self.state.startswith("error"):
            self.state = "stopped"

    def status(self) -> dict:
        """The share's row for the session's stats: state, viewer URL, slots not sent, reconnects."""
        sink = self.publisher
        state = self.state
        if state == "publishing" and sink is not None and not getattr(sink, "connected", True):
            state = "reconnecting"
        out = {"share_state": state, "share_unsent": self.unsent}
        if self.viewer_url:
            out["share_viewer_url"] = self.viewer_url
        if sink is not None:
            out["share_connects"] = getattr(sink, "connects", None)
            out["share_dropped"] = getattr(sink, "dropped", None)
        return out


def whip_sink_from_config(whip, server) -> WhipSink:
    """The `--out whip` output from the config's [whip] section (endpoint, token) and the [server]
    section's ICE settings (this machine's network: host addresses, STUN/TURN). Duck-typed so that
    stream/ does not import the CLI's config types."""
    if not whip.endpoint:
        raise WhipError("--out whip needs a WHIP endpoint URL",
                        hint="set whip.endpoint in your config, or --set whip.endpoint=http://HOST:PORT/whip/endpoint/ID")
    from stream.webrtc.ice import ice_servers
    return WhipSink(whip.endpoint, whip.token,
                    ice_servers=ice_servers(server.stun_url, server.turn_url, server.turn_username,
                                            server.turn_credential),
                    ice_host_addresses=server.ice_host_addresses or None)
