"""The viewer server: one stream, many viewers, on the thread and event loop of a `WebHost` (host.py).

`WebRTCServer` composes a `WebHost` (binding, token, ICE checks, the loop thread, JSON bodies,
negotiation); on its loop aiohttp serves the page (`stream/web/`),
`POST /offer` (SDP offer in, answer out), `POST /whep` + `DELETE /whep/{id}` (the same viewer by
WHEP: whep.py), `GET /ice` (the STUN/TURN servers, for the page's own
peer connection), `GET /stats` and `GET /health` on it, and every viewer's RTCPeerConnection lives
there too. Frames come in from the sink's thread through `push`, which only
puts them into two small bounded buffers (buffer.py) and returns.

One source, many viewers: the buffers feed one video and one audio *source track* (tracks.py); every
viewer gets `ViewerRelay` proxies of them (tracks.py: each with its own bounded queue, so a slow
viewer loses its own frames instead of growing a queue). Nothing here can grow without bound: the
sink-side buffers drop their oldest item, viewers are capped by `max_viewers` (an offer takes its
slot before negotiating, so concurrent offers cannot overshoot), request bodies are capped at
`MAX_OFFER_BYTES`, and a peer that never connects is dropped after `connect_timeout_s`.

Whatever a client sends gets a status and a one-line reason (`{"error": ...}`), never a traceback.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from aiohttp import web
from aiortc import RTCIceServer, RTCPeerConnection, RTCSessionDescription

from stream.webrtc.buffer import LatestBuffer
from stream.webrtc.host import (DEFAULT_WEB_ROOT, MAX_OFFER_BYTES, HostAttributes, ServerError, WebHost,
                                describe_failure, discard_body, error_response, json_response, offer_sdp,
                                request_token)
from stream.webrtc import whep
from stream.webrtc.tracks import (OPUS_RATES, VIDEO_CLOCK, LiveAudioTrack, LiveVideoTrack, SharedVideoEncoder,
                                  ViewerRelay, ViewerTrack)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WEB_ROOT", "MAX_OFFER_BYTES", "ServerError", "WebRTCServer"]


class WebRTCServer(HostAttributes):
    """The viewer web server and its WebRTC peers, on the thread and event loop of its `WebHost`.

    `token`: shared secret a viewer must send with its offer (and /stats). Required for any
    non-loopback `host`: when missing there, one is generated and logged with the URL to open.
    `stats`: called (on the server thread) for `GET /stats`; should be cheap and thread-safe.
    `ice_servers`: STUN URLs (or aiortc RTCIceServer objects, for TURN credentials; see
    `ice.ice_servers`) for viewers behind NAT, at most one STUN and one TURN server (all aiortc uses);
    default none (LAN/loopback viewing, and no outgoing STUN queries on offline machines). The page
    is given the same servers (`GET /ice`) for its own side of the connection.
    `ice_host_addresses`: gather ICE host candidates on exactly these addresses (see
    `use_host_addresses`); ["127.0.0.1"] makes same-machine viewing work without any LAN interface.
    Unusable ICE settings are a `ServerError` from `start()`, not offers that fail later.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 stats: Callable[[], dict] | None = None,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 web_root: str | Path = DEFAULT_WEB_ROOT, ice_host_addresses: Sequence[str] | None = None,
                 max_viewers: int = 8, connect_timeout_s: float = 30.0, buffer_frames: int = 25,
                 shared_video_encoder: bool = True) -> None:
        self.web = WebHost(host, port, token, ice_servers, ice_host_addresses, web_root,
                           page="index.html", label="viewer server")
        self._stats = stats or (lambda: {})
        self.max_viewers = max_viewers
        self.connect_timeout_s = connect_timeout_s
        self.buffer_frames = buffer_frames
        self.shared_video_encoder = shared_video_encoder   # False: aiortc's encoder per viewer (bench)
        self._video_out: SharedVideoEncoder | None = None
        self._viewer_ids = 0        # numbers the viewers in /stats and the log, in order of arrival
        self._viewer_tracks: dict[RTCPeerConnection, tuple[int, ViewerTrack, ViewerTrack]] = {}
        self._peers: set[RTCPeerConnection] = set()
        self._whep: dict[str, RTCPeerConnection] = {}   # WHEP viewers by resource id (DELETE to leave)
        self._negotiating = 0       # offers holding a viewer slot while their answer is being made
        self._relay: ViewerRelay | None = None
        self._video_buf: LatestBuffer | None = None
        self._audio_buf: LatestBuffer | None = None
        self._video: LiveVideoTrack | None = None
        self._audio: LiveAudioTrack | None = None
        self._index_offset = 0      # added to the sink's frame_index: keeps pts increasing across sessions
        self._next_index = 0

    # ------------------------------------------------------------------ lifecycle (caller's thread)

    def start(self, timeout: float = 15.0) -> None:
        self.web.start(self._make_app, self._shutdown, timeout)
        self.web.log_url("viewer")
        log.info("WHEP players: %swhep%s", self.web.base_url, " (bearer: the token)" if self.token else "")

    def stop(self, timeout: float = 15.0) -> None:
        """Close every peer, stop the web server and the loop, join the thread. Idempotent."""
        self.web.stop(timeout)

    async def _make_app(self) -> web.Application:
        loop = asyncio.get_running_loop()
        self._video_buf = LatestBuffer(loop, self.buffer_frames)
        self._audio_buf = LatestBuffer(loop, self.buffer_frames)
        self._video = LiveVideoTrack(self._video_buf)
        self._audio = LiveAudioTrack(self._audio_buf)
        if self.shared_video_encoder:     # VP8 encoded once for every viewer (tracks.py)
            self._video_out = SharedVideoEncoder(self._video)
        self._relay = ViewerRelay()
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self._handle_index)
        app.router.add_post("/offer", self._handle_offer)
        app.router.add_post("/whep", self._handle_whep)
        app.router.add_delete("/whep/{id}", self._handle_whep_delete)
        for path in ("/whep", "/whep/{id}"):
            app.router.add_route("OPTIONS", path, whep.preflight)
        app.router.add_get("/ice", self._handle_ice)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/health", self._handle_health)
        return app

    async def _shutdown(self) -> None:
        for pc in list(self._viewer_tracks):  # what each viewer got, also when the server stops first
            self._log_viewer(pc, "server stopping")
        for track in (self._video_out, self._video, self._audio):
            if track is not None:
                track.stop()
        peers = list(self._peers)
        self._peers.clear()
        self._whep.clear()
        if peers:
            await asyncio.wait_for(asyncio.gather(*(pc.close() for pc in peers), return_exceptions=True), 10)

    # ------------------------------------------------------------------ frames (sink's thread)
    def configure(self, fps: int, sample_rate: int) -> None:
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"WebRTC audio must be one of {OPUS_RATES} Hz, got {sample_rate}")
        if VIDEO_CLOCK % fps:
            raise ValueError(f"WebRTC video needs a frame rate dividing 90000, got {fps}")
        if not self.running or self._video is None or self._audio is None:
            raise RuntimeError("start the WebRTCServer before opening its sink")
        self._video.fps = fps
        self._audio.fps, self._audio.sample_rate = fps, sample_rate
        # A new session restarts at frame 0; viewers that stay connected must see time go on, not
        # back (encoders and jitter buffers expect increasing timestamps), so continue after the last.
        self._index_offset = self._next_index

    def push(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        """Hand one frame and its slot's audio to the viewers (thread-safe, never blocks)."""
        if self._video_buf is None or self._audio_buf is None:
            return
        index = frame_index + self._index_offset
        self._next_index = index + 1
        self._video_buf.put((index, np.array(frame, dtype=np.uint8, order="C", copy=True)))
        self._audio_buf.put((index, np.array(audio, dtype=np.float32, copy=True).reshape(-1)))

    @property
    def dropped(self) -> int:
        """Frames the sink-side buffer discarded because nobody was reading (e.g. no viewer)."""
        return 0 if self._video_buf is None else self._video_buf.dropped

    def viewer_stats(self) -> list[dict[str, int]]:
        """Per viewer (in order of arrival): video and audio items sent, and lost from that viewer's own
        one-second queue (`ViewerTrack.dropped`) when it fell behind, e.g. when the loop was starved.
        Read on the server's loop (/stats, shutdown)."""
        return [_viewer_counts(*entry) for entry in self._viewer_tracks.values()]

    def _log_viewer(self, pc: RTCPeerConnection, why: str) -> None:
        entry = self._viewer_tracks.pop(pc, None)
        if entry is None:
            return
        c = _viewer_counts(*entry)
        lost = c["video_dropped"] + c["audio_dropped"]
        (log.warning if lost else log.info)(
            "viewer %d (%s): video %d sent, %d dropped; audio %d sent, %d dropped", c["viewer"], why,
            c["video_sent"], c["video_dropped"], c["audio_sent"], c["audio_dropped"])

    @property
    def peer_count(self) -> int:
        """Viewers answered and not yet gone (connected, or still connecting)."""
        return len(self._peers)

    # ------------------------------------------------------------------ HTTP
    async def _handle_index(self, request: web.Request) -> web.StreamResponse:
        return self.web.page_response()

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "viewers": len(self._peers)})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        if not self.web.authorised(request_token(request)):
            return error_response(403, "missing or wrong token")
        try:
            snap = dict(self._stats())
        except Exception as exc:
            log.warning("stats callback failed: %s", exc, exc_info=True)
            return error_response(500, f"stats unavailable: {exc}")
        snap.setdefault("viewers", len(self._peers))
        snap.setdefault("viewer_streams", self.viewer_stats())
        return json_response(snap)

    async def _handle_ice(self, request: web.Request) -> web.Response:
        if not self.web.authorised(request_token(request)):   # TURN credentials are as private as the stream
            return error_response(403, "missing or wrong token")
        return self.web.ice_response()

    async def _handle_offer(self, request: web.Request) -> web.Response:
        body = await self.web.read_json(request, "{sdp, type, token}")
        if isinstance(body, web.Response):
            return body
        if not self.web.authorised(body.get("token")):
            return error_response(403, "missing or wrong token")
        sdp = offer_sdp(body)
        if isinstance(sdp, web.Response):
            return sdp
        added = await self._add_viewer(sdp, request.remote)
        if isinstance(added, web.Response):
            return added
        return web.json_response({"sdp": added[1].sdp, "type": added[1].type})

    async def _handle_whep(self, request: web.Request) -> web.Response:
        """A WHEP viewer (whep.py): the same viewer as `/offer`, in WHEP's envelope."""
        if not self.web.authorised(whep.bearer_token(request)):
            await discard_body(request)
            return whep.refusal(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        return await whep.answer_offer(request, lambda sdp: self._add_viewer(sdp, request.remote), self._whep,
                                       "/whep")

    async def _handle_whep_delete(self, request: web.Request) -> web.Response:
        pc = self._whep.pop(request.match_info["id"], None)
        if pc is None:
            return whep.refusal(404, "no such WHEP viewer (it has left)")
        await self._drop(pc, "left (WHEP DELETE)")
        return whep.deleted_response()

    async def _add_viewer(self, sdp: str, remote: str | None
                          ) -> tuple[RTCPeerConnection, RTCSessionDescription] | web.Response:
        """Answer one viewer's offer (from `/offer` or WHEP) within the viewer limit; the peer is watched."""
        # The slot is taken before the first await and given back in `finally`; `_watch` counts the
        # peer in the same step (no await in between), so answered + negotiating never exceeds the cap.
        if len(self._peers) + self._negotiating >= self.max_viewers:
            return error_response(503, f"too many viewers (max {self.max_viewers})")
        assert self._relay is not None and self._video is not None and self._audio is not None
        self._negotiating += 1
        try:
            pc = RTCPeerConnection(self.rtc_configuration())
            shared = self._video_out
            video = self._relay.subscribe(shared if shared is not None else self._video)
            audio = self._relay.subscribe(self._audio)
            try:
                # The shared stream is VP8: offer nothing else, and let this viewer's picture-loss reports
                # (aiortc's sender would force a key frame in its own encoder, which it does not use here)
                # ask the shared encoder for one.
                answer, _ = await self.web.negotiate(
                    pc, sdp, video, audio, video_codecs=("video/vp8", "video/rtx") if shared is not None else None,
                    on_video_sender=None if shared is None else
                    (lambda sender: setattr(sender, "_send_keyframe", shared.request_keyframe)))
                self._viewer_ids += 1
                self._viewer_tracks[pc] = (self._viewer_ids, video, audio)
            except Exception as exc:
                await pc.close()
                reason = describe_failure(exc)
                if "send parameters" in reason and shared is not None:
                    reason = reason.replace("VP8 or H.264", "VP8")
                log.info("rejected offer from %s: %s", remote, reason)
                return error_response(400, f"cannot use this offer: {reason}")
            except BaseException:                 # cancelled (the server is stopping): no stray peer
                await pc.close()
                raise
        finally:
            self._negotiating -= 1
        self._watch(pc)
        return pc, answer

    def _watch(self, pc: RTCPeerConnection) -> None:
        """Track the peer until it closes or fails; also give up on one that never connects."""
        self._peers.add(pc)
        self.web.watch_peer(pc, self.connect_timeout_s, lambda reason: self._drop(pc, reason),
                            connected=lambda: log.info("viewer connected; %d watching", len(self._peers)))

    async def _drop(self, pc: RTCPeerConnection, reason: str) -> None:
        """A viewer gone (idempotent): uncounted at once, its WHEP resource forgotten, its peer closed."""
        if pc in self._peers:
            self._peers.discard(pc)
            log.info("viewer left (%s); %d watching", reason, len(self._peers))
        for resource in [r for r, p in self._whep.items() if p is pc]:
            del self._whep[resource]
        self._log_viewer(pc, f"left: {reason}")
        await pc.close()


def _viewer_counts(viewer: int, video: ViewerTrack, audio: ViewerTrack) -> dict[str, int]:
    return {"viewer": viewer, "video_sent": video.delivered, "video_dropped": video.dropped,
            "audio_sent": audio.delivered, "audio_dropped": audio.dropped}
