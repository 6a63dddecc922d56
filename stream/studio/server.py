"""The studio server: each browser drives its own avatar session; many sessions on one process.

HTTP API (JSON; errors are `{"error": one line}` with a status, never a traceback):

* `POST /sessions[?sample=1]` — body: the photo's bytes (or nothing with `sample=1`). Admission
  (`max_sessions`, counting sessions being created and being torn down: 503 with the reason), upload
  checks (stream/studio/uploads.py: 413/400), then the backend encodes the identity (a photo without a
  face: 400 with its one-line reason). Answers 201 `{id, secret, view, share, whep}`: `secret` is the
  owner's key to every endpoint below, `view` the share link's separate view-only key.
* `POST /sessions?share=1` — the same, and the session also publishes its avatar (video + its voice,
  every slot in order) to the room: the `[whip]` endpoint, through the session's own sinks (a
  `stream.whip.RoomShare`). The room has one presenter: while a live session shares, another's
  `share=1` is 409 "the room already has a presenter: session ID"; without a `[whip]` endpoint it is
  400 with the reason. A WHIP failure is the session's `share_state` ("error: ONE LINE") in its stats,
  never its end; ending the session DELETEs the WHIP resource. `GET /room` says whether sharing is
  enabled (else why not), the room's `viewer_url` and the presenting session's id.
* `POST /sessions/{id}/share` `{secret, on}` — the owner takes a running (or not yet connected)
  session on or off the air: the same rules as `share=1` (409 naming the presenter, 400 without an
  endpoint); on adds a new `RoomShare` to its sinks (a new WHIP resource), off takes it out and
  DELETEs the resource, then frees the room. Answers `{share, room}`. Idempotent.
* `POST /sessions/{id}/offer` `{sdp, type, secret}` — the owner's peer connection: the browser's
  microphone (and camera) in, this session's avatar video + audio out on the same connection. The
  backend then starts the session (browser tracks as its sources, `SessionOutput` as its sink).
* `POST /sessions/{id}/view` `{sdp, type, view}` — a view-only peer (the share link) of that session.
* `POST /sessions/{id}/whep` — the same view-only peer by WHEP (stream/webrtc/whep.py): the SDP offer
  as `application/sdp`, the share link's view key (or the owner's secret) as the bearer token; 201 with
  the answer and `Location: /sessions/{id}/whep/{resource}`, which the viewer DELETEs to leave.
* `GET /sessions/{id}/stats?secret=…|view=…` — the session's live stats; `POST /sessions/{id}/stop`.
* `GET /stats?token=…` — the process's sessions and the shared renderer's batching numbers.

Binding, the token, ICE checks, the loop thread, JSON bodies and negotiation are a `WebHost`'s
(stream/webrtc/host.py), the same as the viewer server's; this class composes one.

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
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from aiohttp import web
from aiortc import RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from pcavs_live.common.errors import UserError
from stream.sinks import FrameSink
from stream.studio.output import SessionOutput
from stream.studio.uploads import MAX_PHOTO_SIDE, MAX_UPLOAD_BYTES, UploadError, decode_photo
from stream.webrtc import whep
from stream.webrtc.host import (DEFAULT_WEB_ROOT, HostAttributes, WebHost, describe_failure, discard_body,
                                error_response, json_response, keys_match, offer_sdp, request_token)

log = logging.getLogger(__name__)


class SessionRuntime(Protocol):
    """One session's pipeline (pcavs_live/pipeline/studio.py), as the server drives it."""

    def start(self, audio: MediaStreamTrack, video: MediaStreamTrack | None, loop: asyncio.AbstractEventLoop,
              sink: FrameSink, on_end: Callable[[str], None]) -> None: ...   # + share=True when it shares
    # optional: `set_share(on: bool) -> bool` takes a started session on/off the room (POST …/share)
    def idle_s(self) -> float: ...          # seconds since the last browser audio arrived (or since start)
    def stats(self) -> dict: ...
    def stop(self) -> None: ...             # blocking, idempotent: threads joined, memory returned


class SessionFactory(Protocol):
    def create(self, photo: np.ndarray | None, name: str) -> SessionRuntime: ...   # None: the sample photo
    def stats(self) -> dict: ...
    # optional: `room() -> {enabled, reason, viewer_url}` for "share to room" (absent: sharing disabled)


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
    whep: dict = field(default_factory=dict)        # WHEP viewers' peers by resource id
    ending: bool = False
    share: bool = False                  # also published to the room ([whip]): what the owner asked for
    share_lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # one share change at a time
    end_reason: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class StudioServer(HostAttributes):
    """The studio page and API on the thread + event loop of its `WebHost` (which also does the binding,
    ICE checks and token, as for the viewer server)."""

    def __init__(self, factory: SessionFactory, host: str = "127.0.0.1", port: int = 8080,
                 token: str | None = None, max_sessions: int = 8,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 ice_host_addresses: Sequence[str] | None = None, web_root: str | Path = DEFAULT_WEB_ROOT,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_photo_side: int = MAX_PHOTO_SIDE,
                 connect_timeout_s: float = 30.0, lost_timeout_s: float = 5.0, max_viewers: int = 4) -> None:
        self.web = WebHost(host, port, token, ice_servers, ice_host_addresses, web_root,
                           page="studio.html", label="studio server")
        self.max_viewers, self.connect_timeout_s = max_viewers, connect_timeout_s
        self.factory = factory
        self.max_sessions = max_sessions
        self.max_upload_bytes, self.max_photo_side = max_upload_bytes, max_photo_side
        self.lost_timeout_s = lost_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._creating = 0
        self._ending = 0
        self._presenter: str | None = None   # the session sharing to the room (or "" while one is created)
        self._watchdog: asyncio.Task | None = None
        self.sessions_created = 0
        self.sessions_ended: dict[str, int] = {}


    def start(self, timeout: float = 15.0) -> None:
        self.web.start(self._make_app, self._shutdown, timeout)
        if self.web.token_generated:         # else the caller prints the URL (pcavs_live.pipeline.studio.serve)
            self.web.log_url("studio")

    def stop(self, timeout: float = 15.0) -> None:
        """Every session ended (peers closed, backends stopped), the app and the loop stopped. Idempotent."""
        self.web.stop(timeout)

    @property
    def session_count(self) -> int:
        """Sessions holding a slot: live, being created, or being torn down."""
        return len(self._sessions) + self._creating + self._ending

    def share_url(self, session_id: str, view: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?s={session_id}&v={view}"

    # ------------------------------------------------------------------ loop thread: app
    async def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_upload_bytes + 1)
        app.router.add_get("/", self._handle_page)
        app.router.add_get("/ice", self._handle_ice)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/stats", self._handle_server_stats)
        app.router.add_get("/room", self._handle_room)
        app.router.add_post("/sessions", self._handle_create)
        app.router.add_post("/sessions/{id}/offer", self._handle_offer)
        app.router.add_post("/sessions/{id}/view", self._handle_view)
        app.router.add_post("/sessions/{id}/whep", self._handle_whep)
        app.router.add_delete("/sessions/{id}/whep/{resource}", self._handle_whep_delete)
        for path in ("/sessions/{id}/whep", "/sessions/{id}/whep/{resource}"):
            app.router.add_route("OPTIONS", path, whep.preflight)
        app.router.add_post("/sessions/{id}/stop", self._handle_stop)
        app.router.add_post("/sessions/{id}/share", self._handle_share)
        app.router.add_get("/sessions/{id}/stats", self._handle_stats)
        self._watchdog = asyncio.ensure_future(self._watch_sessions())
        return app

    async def _shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self._end(s, "server stopping") for s in list(self._sessions.values())),
                             return_exceptions=True)

    # ------------------------------------------------------------------ sessions
    def _lookup(self, request: web.Request) -> _Session | web.Response:
        sess = self._sessions.get(request.match_info["id"])
        if sess is None or sess.ending:
            return error_response(404, "no such session (it has ended); press Start for a new one")
        return sess

    async def _session_request(self, request: web.Request, view_key_too: bool = False
                          ) -> tuple[_Session, dict] | web.Response:
        """The session named in the path and the request's JSON body, when the body carries that
        session's own key (or, with `view_key_too`, its share link's view key); else the refusal."""
        sess = self._lookup(request)
        if isinstance(sess, web.Response):
            return sess
        body = await self.web.read_json(request, "{secret, ...}", empty={})
        if isinstance(body, web.Response):
            return body
        if keys_match(body.get("secret"), sess.secret):
            return sess, body
        if view_key_too and keys_match(body.get("view"), sess.view):
            return sess, body
        return error_response(403, "wrong share link" if view_key_too else "wrong session key")

    async def _end(self, sess: _Session, reason: str) -> None:
        """End a session (idempotent): peers closed, tracks stopped, backend stopped off the loop."""
        if sess.ending:
            await sess.ended.wait()
            return
        sess.ending, sess.end_reason = True, reason
        self._sessions.pop(sess.id, None)
        if self._presenter == sess.id:
            self._presenter = None
        self._ending += 1
        try:
            peers = ([sess.owner] if sess.owner is not None else []) + list(sess.viewers)
            sess.owner, sess.viewers, sess.whep = None, set(), {}
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
        loop = self.web.loop
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
        return self.web.page_response()

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "sessions": len(self._sessions)})

    async def _handle_ice(self, request: web.Request) -> web.Response:
        q = request.query
        sess = self._sessions.get(q.get("s", ""))
        ok = self.web.authorised(request_token(request)) or (
            sess is not None and (keys_match(q.get("secret"), sess.secret) or keys_match(q.get("v"), sess.view)))
        if not ok:
            return error_response(403, "missing or wrong token")
        return self.web.ice_response()

    async def _handle_server_stats(self, request: web.Request) -> web.Response:
        if not self.web.authorised(request_token(request)):
            return error_response(403, "missing or wrong token")
        try:
            renderer = dict(self.factory.stats())
        except Exception as exc:  # noqa: BLE001
            renderer = {"error": str(exc)}
        return json_response({"sessions": len(self._sessions), "max_sessions": self.max_sessions,
                      "sessions_created": self.sessions_created, "sessions_ended": dict(self.sessions_ended),
                      "renderer": renderer})

    def room(self) -> dict:
        """Whether sessions may share to the room (else why not), its viewer URL, the presenting session."""
        room = getattr(self.factory, "room", None)
        info = dict(room()) if room is not None else {
            "enabled": False, "reason": "this server cannot share to a room", "viewer_url": None}
        info["presenter"] = self._presenter or None
        return info

    async def _handle_room(self, request: web.Request) -> web.Response:
        return json_response(self.room())

    def _refuse_share(self) -> web.Response | None:
        room = self.room()
        if not room["enabled"]:
            return error_response(400, f"cannot share to the room: {room['reason']}")
        if self._presenter is not None:
            who = f"session {self._presenter}" if self._presenter else "a session being created"
            return error_response(409, f"the room already has a presenter: {who}; stop it first, or start "
                                  "without sharing")
        return None

    async def _handle_create(self, request: web.Request) -> web.Response:
        if not self.web.authorised(request_token(request)):
            return error_response(403, "missing or wrong token: open the URL with ?token=… printed by the server")
        if self.session_count >= self.max_sessions:
            await discard_body(request)
            return error_response(503, f"the studio is full: {self.max_sessions} of {self.max_sessions} sessions are "
                               "in use; try again when one ends")
        share = request.query.get("share", "") in ("1", "true", "yes")
        if share:
            refused = self._refuse_share()
            if refused is not None:
                await discard_body(request)
                return refused
            self._presenter = ""          # held from here (no await since the check)
        self._creating += 1             # the slot is held from here (no await before this line)
        sess = None
        try:
            sample = request.query.get("sample", "") in ("1", "true", "yes")
            data = b""
            if request.content_length is not None and request.content_length > self.max_upload_bytes:
                return error_response(413, f"the photo is larger than {self.max_upload_bytes / 2**20:.0f} MB")
            try:
                data = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return error_response(413, f"the photo is larger than {self.max_upload_bytes / 2**20:.0f} MB")
            loop = asyncio.get_running_loop()
            try:
                photo = None if sample else await loop.run_in_executor(
                    None, decode_photo, data, self.max_upload_bytes, self.max_photo_side)
                runtime = await loop.run_in_executor(None, self.factory.create, photo,
                                                     "the sample photo" if sample else "your photo")
            except UploadError as exc:
                return error_response(exc.status, str(exc))
            except UserError as exc:
                return error_response(400, str(exc))
            sess = _Session(secrets.token_urlsafe(9), secrets.token_urlsafe(24), secrets.token_urlsafe(24),
                            runtime, SessionOutput(loop), share=share)
            self._sessions[sess.id] = sess
            self.sessions_created += 1
        finally:
            self._creating -= 1
            if share and self._presenter == "":
                self._presenter = sess.id if sess is not None else None
        log.info("session %s created%s; %d live", sess.id, " (shares to the room)" if share else "",
                 len(self._sessions))
        reply = {"id": sess.id, "secret": sess.secret, "view": sess.view, "share": f"/?s={sess.id}&v={sess.view}",
                 "whep": f"/sessions/{sess.id}/whep"}
        if share:
            reply["room"] = {k: v for k, v in self.room().items() if k in ("viewer_url",)}
        return web.json_response(reply, status=201)

    async def _handle_stop(self, request: web.Request) -> web.Response:
        found = await self._session_request(request)
        if isinstance(found, web.Response):
            return found
        sess, _ = found
        await self._end(sess, "stopped")
        return web.json_response({"ok": True, "ended": sess.end_reason})

    async def _handle_share(self, request: web.Request) -> web.Response:
        """The owner's "share to room" switch on a session (see the module docstring)."""
        found = await self._session_request(request)
        if isinstance(found, web.Response):
            return found
        sess, body = found
        if sess.ending:       # stopped while its body arrived: it must not take the room
            return error_response(404, "no such session (it has ended); press Start for a new one")
        on = body.get("on")
        if not isinstance(on, bool):
            return error_response(400, 'the body needs "on": true or false')
        if on and not sess.share and self._presenter != sess.id:   # (its own off may still be applying)
            refused = self._refuse_share()
            if refused is not None:
                return refused
            self._presenter = sess.id        # held from here (no await since the check)
        sess.share = on
        try:
            await self._apply_share(sess)
        except Exception as exc:  # noqa: BLE001 - one line to the page
            return error_response(500, f"cannot change sharing: {describe_failure(exc)}")
        reply: dict = {"share": sess.share}
        if sess.share:
            reply["room"] = {"viewer_url": self.room().get("viewer_url")}
        return web.json_response(reply)

    async def _apply_share(self, sess: _Session) -> None:
        """Bring a started session's share in line with `sess.share` (one change at a time per session);
        once it is off (the WHIP resource DELETEd) the room is free. A session not started yet is
        started with it (`_handle_offer` calls this again once it has started)."""
        async with sess.share_lock:
            off = not sess.share
            if sess.started and not sess.ending:
                set_share = getattr(sess.runtime, "set_share", None)
                if set_share is not None:   # False when it could not go on air (its run has just ended)
                    want = sess.share
                    done = bool(await asyncio.get_running_loop().run_in_executor(None, set_share, want))
                    if sess.share == want:  # else a newer switch came meanwhile: it applies its own next
                        sess.share = done
                    off = not done
            if off and not sess.share and self._presenter == sess.id:
                self._presenter = None

    async def _handle_stats(self, request: web.Request) -> web.Response:
        sess = self._lookup(request)
        if isinstance(sess, web.Response):
            return sess
        q = request.query
        if not (keys_match(q.get("secret"), sess.secret) or keys_match(q.get("view"), sess.view)):
            return error_response(403, "wrong session key")
        try:
            snap = dict(sess.runtime.stats())
        except Exception as exc:  # noqa: BLE001
            return error_response(500, f"stats unavailable: {exc}")
        snap.update(viewers=len(sess.viewers), connected=sess.started,
                    output_dropped=sess.output.dropped)
        return json_response(snap)

    async def _handle_offer(self, request: web.Request) -> web.Response:
        found = await self._session_request(request)
        if isinstance(found, web.Response):
            return found
        sess, body = found
        sdp = offer_sdp(body)
        if isinstance(sdp, web.Response):
            return sdp
        if sess.owner is not None:
            return error_response(409, "this session is already connected; press Stop, then Start again")
        pc = RTCPeerConnection(self.rtc_configuration())
        sess.owner = pc
        try:
            answer, tracks = await self.web.negotiate(pc, sdp, *sess.output.subscribe(), direction="sendrecv")
            audio = next((t for t in tracks if t.kind == "audio"), None)
            video = next((t for t in tracks if t.kind == "video"), None)
            if audio is None:
                raise ValueError("the offer sends no microphone audio (allow the microphone and try again)")
            if sess.ending:
                raise ValueError("the session ended while connecting")
            extra = {"share": True} if sess.share else {}
            await asyncio.get_running_loop().run_in_executor(None, functools.partial(
                sess.runtime.start, audio, video, asyncio.get_running_loop(), sess.output,
                lambda reason: self._end_soon(sess, reason), **extra))
            sess.started = True
        except Exception as exc:  # noqa: BLE001 - one line to the page; the session stays for a retry
            sess.owner = None
            await pc.close()
            reason = describe_failure(exc)
            log.info("session %s: offer refused: %s", sess.id, reason)
            return error_response(400, f"cannot use this offer: {reason}")
        self._watch_peer(sess, pc, owner=True)
        if sess.share != bool(extra):            # turned on or off while it was starting
            try:
                await self._apply_share(sess)
            except Exception as exc:  # noqa: BLE001 - the session runs; its stats say whether it shares
                log.warning("session %s: changing its share failed: %s", sess.id, describe_failure(exc))
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    async def _handle_view(self, request: web.Request) -> web.Response:
        found = await self._session_request(request, view_key_too=True)
        if isinstance(found, web.Response):
            return found
        sess, body = found
        sdp = offer_sdp(body)
        if isinstance(sdp, web.Response):
            return sdp
        added = await self._add_viewer(sess, sdp)
        if isinstance(added, web.Response):
            return added
        return web.json_response({"sdp": added[1].sdp, "type": added[1].type})

    async def _handle_whep(self, request: web.Request) -> web.Response:
        """A share-link viewer by WHEP: the view key (or the owner's secret) as the bearer token."""
        sess = self._lookup(request)
        if isinstance(sess, web.Response):
            await discard_body(request)
            sess.headers.update(whep.CORS)
            return sess
        key = whep.bearer_token(request)
        if not (keys_match(key, sess.view) or keys_match(key, sess.secret)):
            await discard_body(request)
            return whep.refusal(401, "wrong share link (send its view key as Authorization: Bearer KEY)")
        return await whep.answer_offer(request, lambda sdp: self._add_viewer(sess, sdp), sess.whep,
                                       f"/sessions/{sess.id}/whep")

    async def _handle_whep_delete(self, request: web.Request) -> web.Response:
        sess = self._sessions.get(request.match_info["id"])
        pc = None if sess is None else sess.whep.pop(request.match_info["resource"], None)
        if sess is None or pc is None:
            return whep.refusal(404, "no such WHEP viewer (it has left, or the session has ended)")
        sess.viewers.discard(pc)
        await pc.close()
        return whep.deleted_response()

    async def _add_viewer(self, sess: _Session, sdp: str
                          ) -> tuple[RTCPeerConnection, RTCSessionDescription] | web.Response:
        """A view-only peer of `sess` (share link or WHEP) within its viewer limit; watched until it goes."""
        if len(sess.viewers) >= self.max_viewers:
            return error_response(503, f"this session has its maximum of {self.max_viewers} viewers")
        pc = RTCPeerConnection(self.rtc_configuration())
        sess.viewers.add(pc)
        try:
            answer, _ = await self.web.negotiate(pc, sdp, *sess.output.subscribe(), direction="sendonly")
        except Exception as exc:  # noqa: BLE001
            sess.viewers.discard(pc)
            await pc.close()
            return error_response(400, f"cannot use this offer: {describe_failure(exc)}")
        if sess.ending:
            sess.viewers.discard(pc)
            await pc.close()
            return error_response(404, "the session has ended")
        self._watch_peer(sess, pc, owner=False)
        return pc, answer

    def _watch_peer(self, sess: _Session, pc: RTCPeerConnection, owner: bool) -> None:
        """The owner's connection failing or closing ends the session; a viewer's only drops the viewer."""

        async def gone(state: str) -> None:
            if owner:
                await self._end(sess, f"the browser's connection {state}")
            else:
                sess.viewers.discard(pc)
                for resource in [r for r, p in sess.whep.items() if p is pc]:
                    del sess.whep[resource]
                await pc.close()

        self.web.watch_peer(pc, self.connect_timeout_s, gone)
