"""`WebHost`: what every WebRTC web server of this project needs, owned once and used by composition.

The viewer server (`stream.webrtc.server.WebRTCServer`: one stream, many viewers) and the studio server
(`stream.studio.server.StudioServer`: one session per browser) differ in their routes and in what a
peer receives; everything else is here:

* binding the listening socket before the thread starts (a taken port or a bad host is a `ServerError`
  with the flag to change, not a traceback from the loop), and the ICE settings checked at start;
* the token (required off loopback: generated and logged with the URL when not given) and its
  constant-time check;
* the thread and asyncio loop that run aiohttp and every peer, as a `Worker`; `stop` closes the
  server's peers (its `on_shutdown`), the app, then the loop, each with a bounded wait;
* reading a JSON request body with a size cap (also for chunked bodies), its charset and syntax
  checked, every refusal a status and a one-line `{"error": ...}`;
* `negotiate`: our two sending transceivers made before the offer is applied (so the offer's m-lines
  bind to them; Opus only, since the tracks send ready-made Opus packets), the browser's tracks
  collected, loopback-only host candidates when configured; `watch_peer`: a peer that fails, closes
  or never connects is handed back to its server once.
"""
from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import errno
import ipaddress
import json
import logging
import secrets
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from pcavs_live.common.errors import UserError
from pcavs_live.common.workers import Worker
from stream.webrtc.ice import ice_server_as_json, unusable_host_address, unusable_ice_server, use_host_addresses

log = logging.getLogger(__name__)

DEFAULT_WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
# An SDP offer with its candidates is a few KiB; anything far larger is not an offer.
MAX_OFFER_BYTES = 64 * 1024
NEGOTIATE_TIMEOUT_S = 20.0


class ServerError(UserError):
    """A web server cannot start (port taken, bad host, bad ICE settings); one line saying what to pass instead."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_response(status: int, message: str) -> web.Response:
    """Every refusal: a status and one line."""
    return web.json_response({"error": message}, status=status)


def _jsonable(value: object) -> object:
    """numpy scalars and the like, as they come out of metrics."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def json_response(obj: dict, status: int = 200) -> web.Response:
    """Stats and the like: numpy values allowed, never cached."""
    return web.Response(text=json.dumps(obj, default=_jsonable), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def request_token(request: web.Request) -> str | None:
    return request.query.get("token") or request.headers.get("X-Token")


def keys_match(presented: object, expected: str) -> bool:
    """Constant-time comparison of a key a client sent (any JSON value) with ours."""
    return isinstance(presented, str) and secrets.compare_digest(presented.encode(), expected.encode())


def offer_sdp(body: dict) -> str | web.Response:
    """The SDP of an offer body `{sdp, type}`, or the refusal saying what is wrong with it."""
    sdp, kind = body.get("sdp"), body.get("type", "offer")
    if not isinstance(sdp, str) or not sdp.strip():
        return error_response(400, "'sdp' (the offer's SDP text) is missing")
    if kind != "offer":
        return error_response(400, f"'type' must be \"offer\", got {kind!r}")
    return sdp


async def discard_body(request: web.Request) -> None:
    """Read and drop a body we refuse, so the client sees the answer instead of a reset connection."""
    try:
        while await request.content.readany():
            pass
    except Exception:  # noqa: BLE001 - the refusal is sent anyway
        pass


class WebHost:
    """One web server's socket, token, ICE settings and the thread + loop that run it (see module doc).

    `label` names the server in log lines and errors ("viewer server", "studio server"); `page` is the
    file under `web_root` its "/" serves, checked at start. The server that composes a host gives
    `start` an async `make_app` (run on the loop: its routes; static files under /static/ are added
    here) and an async `on_shutdown` (run on the loop first thing in `stop`: close its peers)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 ice_host_addresses: Sequence[str] | None = None, web_root: str | Path = DEFAULT_WEB_ROOT,
                 page: str = "index.html", label: str = "viewer server") -> None:
        self.host, self._requested_port = host, port
        token = token or None               # "" (the config file's "no token") means none
        self.token_generated = token is None and not is_loopback(host)
        self.token = secrets.token_urlsafe(16) if self.token_generated else token
        self.ice_servers = [u if isinstance(u, RTCIceServer) else RTCIceServer(urls=u) for u in ice_servers or []]
        self.ice_host_addresses = list(ice_host_addresses) if ice_host_addresses else None
        self.web_root = Path(web_root)
        self.page, self.label = page, label
        self._port: int | None = None
        self._worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._on_shutdown: Callable[[], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ lifecycle (owner's thread)
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"the {self.label} is not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        return self.base_url + (f"?token={self.token}" if self.token else "")

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.alive

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's loop while it runs (for handing work to it from other threads)."""
        return self._loop

    def start(self, make_app: Callable[[], Awaitable[web.Application]],
              on_shutdown: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
        if self._worker is not None:
            raise RuntimeError(f"the {self.label} was started twice")
        if not (self.web_root / self.page).is_file():
            raise ServerError(f"{self.label} page {self.web_root / self.page} is missing; reinstall pcavs-live")
        self._check_ice_settings()
        sock = self._bind()
        self._port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop, self._on_shutdown = loop, on_shutdown
        self._worker = Worker(lambda: self._run(loop, sock, make_app, ready), self.label.replace(" ", "-"))
        self._worker.start()
        try:
            ready.result(timeout)
        except BaseException:
            self.stop()
            raise

    def log_url(self, what: str) -> None:
        """One line with the URL to open (a warning when the server is reachable from the network)."""
        if self.token_generated:
            anywhere = " with this machine's address for the host" if self.host in ("0.0.0.0", "::") else ""
            log.warning("%s is reachable from the network; open %s%s (token generated for this session; "
                        "pass --token to choose one)", self.label, self.url, anywhere)
        else:
            log.info("%s: open %s", what, self.url)

    def _check_ice_settings(self) -> None:
        for address in self.ice_host_addresses or []:
            reason = unusable_host_address(address)
            if reason:
                raise ServerError(reason, hint="set server.ice_host_addresses to addresses of this machine, "
                                  'e.g. ["127.0.0.1"], or to [] for every non-loopback interface')
        for server in self.ice_servers:
            reason = unusable_ice_server(server)
            if reason:
                raise ServerError(reason, hint="fix server.stun_url / server.turn_url in your config")
        for scheme in ("stun", "turn"):
            urls = [u for s in self.ice_servers for u in ice_server_as_json(s)["urls"] if u.startswith(scheme)]
            if len(urls) > 1:
                raise ServerError(f"aiortc uses one {scheme.upper()} server, got {len(urls)}: {', '.join(urls)}")

    def _bind(self) -> socket.socket:
        port = self._requested_port
        try:
            infos = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ServerError(f"cannot resolve server host '{self.host}' ({exc.strerror}); pass --host "
                              "with an address of this machine, e.g. 127.0.0.1") from None
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart despite TIME_WAIT
            sock.bind(addr)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {self.host} is already in use (another pcavs-live?); "
                                  f"pass --port with a free port, e.g. --port {port + 1}") from None
            if exc.errno == errno.EACCES:
                raise ServerError(f"not allowed to listen on port {port}; pass --port 1024 or higher") from None
            raise ServerError(f"cannot listen on {self.host}:{port} ({exc.strerror}); pass --host/--port "
                              "with an address and port of this machine") from None
        return sock

    def stop(self, timeout: float = 15.0) -> None:
        """The server's peers closed (`on_shutdown`), the app, the loop, the thread joined. Idempotent."""
        worker, loop = self._worker, self._loop
        if worker is None or loop is None:
            return
        if worker.alive and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except Exception as exc:  # noqa: BLE001 - the loop is stopped below either way
                log.warning("%s shutdown was not clean: %s", self.label, exc)
            loop.call_soon_threadsafe(loop.stop)
        worker.join(timeout)         # a stuck loop thread is named in the log, not waited on forever
        self._worker = None
        self._loop = None

    # ------------------------------------------------------------------ the loop thread
    def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
             make_app: Callable[[], Awaitable[web.Application]], ready: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._startup(sock, make_app))
            except BaseException as exc:
                sock.close()
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
        finally:
            # Whatever is still pending (aiortc's per-peer tasks, aiohttp handlers) gets cancelled
            # and awaited, and aiortc's encoders running in the default executor are joined.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    async def _startup(self, sock: socket.socket, make_app: Callable[[], Awaitable[web.Application]]) -> None:
        app = await make_app()
        app.router.add_static("/static/", self.web_root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        if self._on_shutdown is not None:
            await self._on_shutdown()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ requests (loop thread)
    def authorised(self, presented: object) -> bool:
        """The server token matches (always true without one)."""
        return self.token is None or keys_match(presented, self.token)

    def page_response(self, page: str | None = None) -> web.StreamResponse:
        return web.FileResponse(self.web_root / (page or self.page), headers={"Cache-Control": "no-cache"})

    def ice_response(self) -> web.Response:
        """The STUN/TURN servers for the page's own peer connection (TURN credentials: as private as the stream)."""
        return web.json_response({"iceServers": [ice_server_as_json(s) for s in self.ice_servers]},
                                 headers={"Cache-Control": "no-store"})

    async def read_json(self, request: web.Request, shape: str, max_bytes: int = MAX_OFFER_BYTES,
                        empty: dict | None = None) -> dict | web.Response:
        """The request body as a JSON object, or the refusal saying why not (size, charset, syntax, not an
        object). `shape` describes the expected object in the messages, e.g. "{sdp, type, token}";
        `empty`: what an empty body means (None: an error)."""
        too_large = error_response(413, f"request body is larger than {max_bytes // 1024} KiB; "
                                        f"send a JSON object {shape} of a few KiB")
        if request.content_length is not None and request.content_length > max_bytes:
            return too_large
        raw = bytearray()
        try:
            while chunk := await request.content.read(65536):   # also a chunked body: stopped at the cap
                raw += chunk
                if len(raw) > max_bytes:
                    return too_large
        except Exception:  # noqa: BLE001 - a client that went away mid-body
            return error_response(400, "request body could not be read")
        charset = request.charset or "utf-8"
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            codec = None
        if codec not in ("utf-8", "ascii"):
            return error_response(400, f"unsupported charset {charset[:40]!r} in Content-Type; send UTF-8 JSON")
        if not raw.strip() and empty is not None:
            return dict(empty)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return error_response(400, "request body is not UTF-8 text")
        except RecursionError:
            return error_response(400, f"request body is JSON nested too deeply; send {shape}")
        except ValueError as exc:
            return error_response(400, f"request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return error_response(400, f"request body must be a JSON object {shape}")
        return body

    # ------------------------------------------------------------------ peers (loop thread)
    def rtc_configuration(self) -> RTCConfiguration:
        """What every peer connection is made with (the configured STUN/TURN servers)."""
        return RTCConfiguration(iceServers=list(self.ice_servers))

    async def negotiate(self, pc: RTCPeerConnection, sdp: str, video: MediaStreamTrack, audio: MediaStreamTrack,
                        direction: str = "sendonly", video_codecs: Sequence[str] | None = None,
                        on_video_sender: Callable[[Any], None] | None = None,
                        ) -> tuple[RTCSessionDescription, list[MediaStreamTrack]]:
        """Answer `sdp` on `pc`, sending `video` and `audio`; with `direction` "sendrecv" also take the
        browser's tracks, which are returned with the answer (at most NEGOTIATE_TIMEOUT_S).
        `video_codecs`: the only video MIME types to offer (a pre-encoded stream); `on_video_sender`:
        called with the video sender (to route its key-frame requests)."""
        received: list[MediaStreamTrack] = []
        pc.on("track", received.append)
        video_t = pc.addTransceiver(video, direction=direction)
        audio_t = pc.addTransceiver(audio, direction=direction)
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        audio_t.setCodecPreferences(opus)
        if video_codecs is not None:
            wanted = {c.lower() for c in video_codecs}
            video_t.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                         if c.mimeType.lower() in wanted])
        if on_video_sender is not None:
            on_video_sender(video_t.sender)

        async def answer() -> RTCSessionDescription:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if video_t.mid is None and audio_t.mid is None:
                raise ValueError("the offer asks for neither video nor audio")
            if self.ice_host_addresses:
                use_host_addresses(pc, self.ice_host_addresses)
            await pc.setLocalDescription(await pc.createAnswer())
            return pc.localDescription

        return await asyncio.wait_for(answer(), NEGOTIATE_TIMEOUT_S), received

    @staticmethod
    def watch_peer(pc: RTCPeerConnection, connect_timeout_s: float, gone: Callable[[str], Awaitable[None]],
                   connected: Callable[[], None] | None = None) -> None:
        """Call `gone(reason)` once when `pc` fails or closes ("failed", "closed"), or has not connected
        within `connect_timeout_s` ("did not connect in time"); `connected()` when it connects."""
        loop = asyncio.get_running_loop()
        done = False

        async def once(reason: str) -> None:
            nonlocal done
            if done:
                return
            done = True
            expiry.cancel()
            await gone(reason)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected" and connected is not None:
                connected()
            elif state in ("failed", "closed"):
                await once(state)

        def expire() -> None:
            if pc.connectionState != "connected":
                asyncio.ensure_future(once("did not connect in time"))

        expiry = loop.call_later(connect_timeout_s, expire)


class HostAttributes:
    """A server's read-only view of the `WebHost` it composes (`self.web`): the same names on both
    servers without either deriving from the other."""

    web: WebHost
    host = property(lambda self: self.web.host)
    token = property(lambda self: self.web.token)
    port = property(lambda self: self.web.port)
    url = property(lambda self: self.web.url)
    running = property(lambda self: self.web.running)
    ice_host_addresses = property(lambda self: self.web.ice_host_addresses)
    web_root = property(lambda self: self.web.web_root)

    def rtc_configuration(self) -> RTCConfiguration:
        """What every peer connection is made with (the configured STUN/TURN servers)."""
        return self.web.rtc_configuration()


def describe_failure(exc: BaseException) -> str:
    """An exception from negotiation as one line for the client."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if "send parameters" in reason:   # aiortc's words for "no codec in common"
        reason += " (this server sends VP8 or H.264 video and Opus audio)"
    return reason
