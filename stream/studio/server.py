"""The studio server: each browser drives its own avatar session; many sessions on one process.

HTTP API (JSON; errors are `{"error": one line}` with a status, never a traceback):

* `POST /sessions[?sample=1]` — body: the photo's bytes (or nothing with `sample=1`). Admission
  (`max_sessions`, counting sessions being created and being torn down: 503 with the reason), upload
  checks (stream/studio/uploads.py: 413/400), then the backend encodes the identity (a photo without a
  face: 400 with its one-line reason). Answers 201 `{id, secret, view, share}`: `secret` is the
  owner's key to every endpoint below, `view` the share link's separate view-only key.
* `POST /sessions/{id}/offer` `{sdp, type, secret}` — the owner's peer connection: the browser's
  microphone (and camera) in, this session's avatar video + audio out on the same connection. The
  backend then starts the session (browser tracks as its sources, `SessionOutput` as its sink).
* `POST /sessions/{id}/view` `{sdp, type, view}` — a view-only peer (the share link) of that session.
* `GET /sessions/{id}/stats?secret=…|view=…` — the session's live stats; `POST /sessions/{id}/stop`.
* `GET /stats?token=…` — the process's sessions and the shared renderer's batching numbers.

Isolation: every session endpoint compares the presented key with that session's own (constant time);
a peer only ever gets proxies of its session's tracks (`SessionOutput`). Off loopback the server token
(as for `WebRTCServer`) is needed to create a session.

Lifecycle: Stop, the owner's peer connection failing or closing (a closed tab), no audio from the
browser for `lost_timeout_s` (a lost network), a session never connected within `connect_timeout_s`,
or its scheduler ending — each ends the session within seconds: peers closed, tracks stopped, and the
backend's `stop` (threads joined, references dropped, device memory returned) run off the loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from aiohttp import web
from aiortc import RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from pcavs_live.common.errors import UserError
from stream.sinks import FrameSink
from stream.studio.output import SessionOutput
from stream.studio.uploads import MAX_PHOTO_SIDE, MAX_UPLOAD_BYTES, UploadError, decode_photo
from stream.webrtc.ice import ice_server_as_json, use_host_addresses
from stream.webrtc.server import DEFAULT_WEB_ROOT, MAX_OFFER_BYTES, WebRTCServer, _error, _jsonable

log = logging.getLogger(__name__)


class SessionRuntime(Protocol):
    """One session's pipeline (pcavs_live/pipeline/studio.py), as the server drives it."""

    def start(self, audio: MediaStreamTrack, video: MediaStreamTrack | None, loop: asyncio.AbstractEventLoop,
              sink: FrameSink, on_end: Callable[[str], None]) -> None: ...
    def idle_s(self) -> float: ...          # seconds since the last browser audio arrived (or since start)
    def stats(self) -> dict: ...
    def stop(self) -> None: ...             # blocking, idempotent: threads joined, memory returned


class SessionFactory(Protocol):
    def create(self, photo: np.ndarray | None, name: str) -> SessionRuntime: ...   # None: the sample photo
    def stats(self) -> dict: ...


@dataclass(eq=False)
class _Session:
    id: str
    secret: str
    view: str
    runtime: SessionRuntime
    output: SessionOutput
    created_at: float = field(default_factory=time.monotonic)
    owner: RTCPeerConnection | None = None
    started: bool = False
    viewers: set = field(default_factory=set)
    ending: bool = False
    end_reason: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def _key_matches(presented: object, expected: str) -> bool:
    return isinstance(presented, str) and secrets.compare_digest(presented.encode(), expected.encode())


class StudioServer(WebRTCServer):
    """The studio page and API on a thread + event loop this object owns (binding, ICE checks, token
    and the thread's life are `WebRTCServer`'s; the single shared stream of that class is not used)."""

    def __init__(self, factory: SessionFactory, host: str = "127.0.0.1", port: int = 8080,
                 token: str | None = None, max_sessions: int = 8,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 ice_host_addresses: Sequence[str] | None = None, web_root: str | Path = DEFAULT_WEB_ROOT,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_photo_side: int = MAX_PHOTO_SIDE,
                 connect_timeout_s: float = 30.0, lost_timeout_s: float = 5.0, max_viewers: int = 4) -> None:
        super().__init__(host=host, port=port, token=token, ice_servers=ice_servers, web_root=web_root,
                         ice_host_addresses=ice_host_addresses, max_viewers=max_viewers,
                         connect_timeout_s=connect_timeout_s)
        self.factory = factory
        self.max_sessions = max_sessions
        self.max_upload_bytes, self.max_photo_side = max_upload_bytes, max_photo_side
        self.lost_timeout_s = lost_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._creating = 0
        self._ending = 0
        self._watchdog: asyncio.Task | None = None
        self.sessions_created = 0
        self.sessions_ended: dict[str, int] = {}

    @property
    def session_count(self) -> int:
        """Sessions holding a slot: live, being created, or being torn down."""
        return len(self._sessions) + self._creating + self._ending

    def share_url(self, session_id: str, view: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?s={session_id}&v={view}"

    # ------------------------------------------------------------------ loop thread: app
    async def _startup(self, loop: asyncio.AbstractEventLoop, sock) -> None:
        app = web.Application(client_max_size=self.max_upload_bytes + 1)
        app.router.add_get("/", self._handle_page)
        app.router.add_get("/ice", self._handle_ice)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/stats", self._handle_server_stats)
        app.router.add_post("/sessions", self._handle_create)
        app.router.add_post("/sessions/{id}/offer", self._handle_offer)
        app.router.add_post("/sessions/{id}/view", self._handle_view)
        app.router.add_post("/sessions/{id}/stop", self._handle_stop)
        app.router.add_get("/sessions/{id}/stats", self._handle_stats)
        await self._serve_app(app, sock)
        self._watchdog = asyncio.ensure_future(self._watch_sessions())

    async def _shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self._end(s, "server stopping") for s in list(self._sessions.values())),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ sessions
    def _lookup(self, request: web.Request) -> _Session | web.Response:
        sess = self._sessions.get(request.match_info["id"])
        if sess is None or sess.ending:
            return _error(404, "no such session (it has ended); press Start for a new one")
        return sess

    async def _session_request(self, request: web.Request, view_key_too: bool = False
                          ) -> tuple[_Session, dict] | web.Response:
        """The session named in the path and the request's JSON body, when the body carries that
        session's own key (or, with `view_key_too`, its share link's view key); else the refusal."""
        sess = self._lookup(request)
        if isinstance(sess, web.Response):
            return sess
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        if _key_matches(body.get("secret"), sess.secret):
            return sess, body
        if view_key_too and _key_matches(body.get("view"), sess.view):
            return sess, body
        return _error(403, "wrong share link" if view_key_too else "wrong session key")

    async def _end(self, sess: _Session, reason: str) -> None:
        """End a session (idempotent): peers closed, tracks stopped, backend stopped off the loop."""
        if sess.ending:
            await sess.ended.wait()
            return
        sess.ending, sess.end_reason = True, reason
        self._sessions.pop(sess.id, None)
        self._ending += 1
        try:
            peers = ([sess.owner] if sess.owner is not None else []) + list(sess.viewers)
            sess.owner, sess.viewers = None, set()
            if peers:
                await asyncio.wait_for(asyncio.gather(*(pc.close() for pc in peers), return_exceptions=True), 10)
            sess.output.stop()
            await asyncio.get_running_loop().run_in_executor(None, sess.runtime.stop)
        except Exception as exc:  # noqa: BLE001 - the slot is given back whatever failed
            log.error("ending session %s was not clean: %s", sess.id, exc, exc_info=True)
        finally:
            self._ending -= 1
            sess.ended.set()
            key = reason.split(" (")[0]
            self.sessions_ended[key] = self.sessions_ended.get(key, 0) + 1
            log.info("session %s ended (%s); %d live", sess.id, reason, len(self._sessions))

    def _end_soon(self, sess: _Session, reason: str) -> None:
        """From any thread: schedule the end on the loop."""
        loop = self._loop
        if loop is None or sess.ending:
            return
        try:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._end(sess, reason)))
        except RuntimeError:
            pass

    async def _watch_sessions(self) -> None:
        """Ends sessions whose browser never connected, or whose audio stopped coming (network lost)."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for sess in list(self._sessions.values()):
                if sess.ending:
                    continue
                if not sess.started:
                    if now - sess.created_at > self.connect_timeout_s:
                        asyncio.ensure_future(self._end(sess, "the browser did not connect in time"))
                    continue
                try:
                    idle = sess.runtime.idle_s()
                except Exception:  # noqa: BLE001 - a runtime that cannot answer is not alive
                    idle = float("inf")
                if idle > self.lost_timeout_s:
                    asyncio.ensure_future(self._end(
                        sess, f"connection lost (no audio from the browser for {self.lost_timeout_s:g} s)"))

    # ------------------------------------------------------------------ HTTP handlers
    async def _handle_page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.web_root / "studio.html", headers={"Cache-Control": "no-cache"})

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "sessions": len(self._sessions)})

    async def _handle_ice(self, request: web.Request) -> web.Response:
        q = request.query
        sess = self._sessions.get(q.get("s", ""))
        ok = self._authorised(q.get("token") or request.headers.get("X-Token")) or (
            sess is not None and (_key_matches(q.get("secret"), sess.secret) or _key_matches(q.get("v"), sess.view)))
        if not ok:
            return _error(403, "missing or wrong token")
        return web.json_response({"iceServers": [ice_server_as_json(s) for s in self._ice_servers]},
                                 headers={"Cache-Control": "no-store"})

    async def _handle_server_stats(self, request: web.Request) -> web.Response:
        if not self._authorised(request.query.get("token") or request.headers.get("X-Token")):
            return _error(403, "missing or wrong token")
        try:
            renderer = dict(self.factory.stats())
        except Exception as exc:  # noqa: BLE001
            renderer = {"error": str(exc)}
        return _json({"sessions": len(self._sessions), "max_sessions": self.max_sessions,
                      "sessions_created": self.sessions_created, "sessions_ended": dict(self.sessions_ended),
                      "renderer": renderer})

    async def _handle_create(self, request: web.Request) -> web.Response:
        if not self._authorised(request.query.get("token") or request.headers.get("X-Token")):
            return _error(403, "missing or wrong token: open the URL with ?token=… printed by the server")
        if self.session_count >= self.max_sessions:
            await _discard_body(request)
            return _error(503, f"the studio is full: {self.max_sessions} of {self.max_sessions} sessions are "
                               "in use; try again when one ends")
        self._creating += 1             # the slot is held from here (no await before this line)
        try:
            sample = request.query.get("sample", "") in ("1", "true", "yes")
            data = b""
            if request.content_length is not None and request.content_length > self.max_upload_bytes:
                return _error(413, f"the photo is larger than {self.max_upload_bytes / 2**20:.0f} MB")
            try:
                data = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _error(413, f"the photo is larger than {self.max_upload_bytes / 2**20:.0f} MB")
            loop = asyncio.get_running_loop()
            try:
                photo = None if sample else await loop.run_in_executor(
                    None, decode_photo, data, self.max_upload_bytes, self.max_photo_side)
                runtime = await loop.run_in_executor(None, self.factory.create, photo,
                                                     "the sample photo" if sample else "your photo")
            except UploadError as exc:
                return _error(exc.status, str(exc))
            except UserError as exc:
                return _error(400, str(exc))
            sess = _Session(secrets.token_urlsafe(9), secrets.token_urlsafe(24), secrets.token_urlsafe(24),
                            runtime, SessionOutput(loop))
            self._sessions[sess.id] = sess
            self.sessions_created += 1
        finally:
            self._creating -= 1
        log.info("session %s created; %d live", sess.id, len(self._sessions))
        return web.json_response({"id": sess.id, "secret": sess.secret, "view": sess.view,
                                  "share": f"/?s={sess.id}&v={sess.view}"}, status=201)

    async def _read_body(self, request: web.Request) -> dict | web.Response:
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            return _error(413, f"request body is larger than {MAX_OFFER_BYTES // 1024} KiB")
        try:
            raw = await request.content.read(MAX_OFFER_BYTES + 1)
        except Exception:  # noqa: BLE001 - a client that went away mid-body
            return _error(400, "request body could not be read")
        if len(raw) > MAX_OFFER_BYTES:
            return _error(413, f"request body is larger than {MAX_OFFER_BYTES // 1024} KiB")
        try:
            body = json.loads(raw.decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _error(400, "request body is not UTF-8 JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        return body

    async def _handle_stop(self, request: web.Request) -> web.Response:
        found = await self._session_request(request)
        if isinstance(found, web.Response):
            return found
        sess, _ = found
        await self._end(sess, "stopped")
        return web.json_response({"ok": True, "ended": sess.end_reason})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        sess = self._lookup(request)
        if isinstance(sess, web.Response):
            return sess
        q = request.query
        if not (_key_matches(q.get("secret"), sess.secret) or _key_matches(q.get("view"), sess.view)):
            return _error(403, "wrong session key")
        try:
            snap = dict(sess.runtime.stats())
        except Exception as exc:  # noqa: BLE001
            return _error(500, f"stats unavailable: {exc}")
        snap.update(viewers=len(sess.viewers), connected=sess.started,
                    output_dropped=sess.output.dropped)
        return _json(snap)

    def _offer_of(self, body: dict) -> str | web.Response:
        sdp, kind = body.get("sdp"), body.get("type", "offer")
        if not isinstance(sdp, str) or not sdp.strip():
            return _error(400, "'sdp' (the offer's SDP text) is missing")
        if kind != "offer":
            return _error(400, f"'type' must be \"offer\", got {kind!r}")
        return sdp

    async def _negotiate_session(self, pc: RTCPeerConnection, sdp: str, output: SessionOutput,
                         direction: str) -> tuple[RTCSessionDescription, list[MediaStreamTrack]]:
        """Our two senders (this session's tracks) exist before the offer is applied, so the offer's
        m-lines bind to them; `direction` sendrecv also takes the browser's mic/camera."""
        received: list[MediaStreamTrack] = []
        pc.on("track", received.append)
        video, audio = output.subscribe()
        video_t = pc.addTransceiver(video, direction=direction)
        audio_t = pc.addTransceiver(audio, direction=direction)
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        audio_t.setCodecPreferences(opus)   # we send ready-made Opus packets
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if video_t.mid is None and audio_t.mid is None:
            raise ValueError("the offer asks for neither video nor audio")
        if self.ice_host_addresses:
            use_host_addresses(pc, self.ice_host_addresses)
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription, received

    async def _handle_offer(self, request: web.Request) -> web.Response:
        found = await self._session_request(request)
        if isinstance(found, web.Response):
            return found
        sess, body = found
        sdp = self._offer_of(body)
        if isinstance(sdp, web.Response):
            return sdp
        if sess.owner is not None:
            return _error(409, "this session is already connected; press Stop, then Start again")
        pc = RTCPeerConnection(self.rtc_configuration())
        sess.owner = pc
        try:
            answer, tracks = await asyncio.wait_for(self._negotiate_session(pc, sdp, sess.output, "sendrecv"), 20)
            audio = next((t for t in tracks if t.kind == "audio"), None)
            video = next((t for t in tracks if t.kind == "video"), None)
            if audio is None:
                raise ValueError("the offer sends no microphone audio (allow the microphone and try again)")
            if sess.ending:
                raise ValueError("the session ended while connecting")
            await asyncio.get_running_loop().run_in_executor(
                None, sess.runtime.start, audio, video, asyncio.get_running_loop(), sess.output,
                lambda reason: self._end_soon(sess, reason))
            sess.started = True
        except Exception as exc:  # noqa: BLE001 - one line to the page; the session stays for a retry
            sess.owner = None
            await pc.close()
            reason = " ".join(str(exc).split()) or type(exc).__name__
            log.info("session %s: offer refused: %s", sess.id, reason)
            return _error(400, f"cannot use this offer: {reason}")
        self._watch_peer(sess, pc, owner=True)
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    async def _handle_view(self, request: web.Request) -> web.Response:
        found = await self._session_request(request, view_key_too=True)
        if isinstance(found, web.Response):
            return found
        sess, body = found
        sdp = self._offer_of(body)
        if isinstance(sdp, web.Response):
            return sdp
        if len(sess.viewers) >= self.max_viewers:
            return _error(503, f"this session has its maximum of {self.max_viewers} viewers")
        pc = RTCPeerConnection(self.rtc_configuration())
        sess.viewers.add(pc)
        try:
            answer, _ = await asyncio.wait_for(self._negotiate_session(pc, sdp, sess.output, "sendonly"), 20)
        except Exception as exc:  # noqa: BLE001
            sess.viewers.discard(pc)
            await pc.close()
            return _error(400, f"cannot use this offer: {' '.join(str(exc).split()) or type(exc).__name__}")
        if sess.ending:
            sess.viewers.discard(pc)
            await pc.close()
            return _error(404, "the session has ended")
        self._watch_peer(sess, pc, owner=False)
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    def _watch_peer(self, sess: _Session, pc: RTCPeerConnection, owner: bool) -> None:
        """The owner's connection failing or closing ends the session; a viewer's only drops the viewer."""
        loop = asyncio.get_running_loop()

        async def gone(state: str) -> None:
            expiry.cancel()
            if owner:
                await self._end(sess, f"the browser's connection {state}")
            else:
                sess.viewers.discard(pc)
                await pc.close()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await gone(pc.connectionState)

        def expire() -> None:
            if pc.connectionState != "connected":
                asyncio.ensure_future(gone("did not connect in time"))

        expiry = loop.call_later(self.connect_timeout_s, expire)


async def _discard_body(request: web.Request) -> None:
    try:
        while await request.content.readany():
            pass
    except Exception:  # noqa: BLE001 - the refusal is sent anyway
        pass


def _json(obj: dict) -> web.Response:
    return web.Response(text=json.dumps(obj, default=_jsonable), content_type="application/json",
                        headers={"Cache-Control": "no-store"})
