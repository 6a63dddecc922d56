"""`FrontDoor`: the studio page and API for a whole Ray cluster of `RenderWorker`s.

The browser sees the same page and endpoints as one studio (`stream.studio.StudioServer`). The front
door keeps no session state: a session id is `WORKER.BOOT.ID` (the worker's actor name, the boot it was
made in, the worker's own id), so any front door — a restarted one too — routes stop/view/stats/offer
to the worker that holds it, and knows a restarted worker no longer does (410 with the reason).

Placement: each new session goes to the worker with the most free slots among those that answer
`info` within `info_timeout_s` (a dead or restarting worker does not answer and is left out); a worker
that turns out full (a race with another create) passes the request to the next one. No worker with a
free slot: 503 with the reason, as one studio answers. The Ray address never leaves this process.

Forwarding: every request under `/sessions/{id}/` — any method, path, query, body bytes and content
type, `Authorization` — goes to the worker named in the id as it came (`RenderWorker.forward`), and the
worker's status, body and headers come back unchanged, except a `Location` under the worker's session
path, rewritten to the door's (so a WHEP viewer's `DELETE` returns here and is routed the same way).
So offer/view/stop/stats, WHEP (`application/sdp`, bearer view key, 201 + Location, its 415/401) and
any later studio route work without an edit here. Added by the door: CORS preflights (`OPTIONS`)
answered here, JSON bodies checked as a studio checks them, 410 for a worker gone or restarted, 503
when none can take a session, `worker` in a session's stats.

Share to room: `POST /sessions?share=1` is forwarded with `share`; the room's one presenter is
cluster-wide. That state lives with the workers, not here: each worker's `info` carries its studio's
`room()` (its presenting session, if any), `GET /room` reports the cluster's (presenter as
`WORKER.BOOT.ID`), and a share create checks every answering worker under a lock of this door before
placing it, so a second share on another worker is 409 too; so does a share switch turned on
(`POST /sessions/{id}/share {"on": true}`) before it is forwarded. Nothing is left locked: a dead worker's
sessions (and presenter) went with its process and it is no longer asked, a restarted worker has none,
and a restarted door asks again. Limits: a presenter on a worker that does not answer `info` in time
is not seen (the studio's own 409 still holds on that worker), and two doors on one cluster do not
share the lock.

Binding, the token, ICE checks, the loop thread and JSON bodies are a `WebHost`'s
(stream/webrtc/host.py), as for the viewer and studio servers; this class composes one.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from aiohttp import web
from aiortc import RTCIceServer

from pcavs_live.cluster.pool import WorkerPool, connect
from stream.webrtc import whep
from stream.webrtc.host import (DEFAULT_WEB_ROOT, HostAttributes, WebHost, discard_body, error_response,
                                json_response, request_token)

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = 64 * 1024
# What a forwarded request carries to the worker, and what of the worker's answer comes back.
FORWARD_HEADERS = ("Content-Type", "Authorization", "X-Token", "Accept")
PASS_HEADERS = frozenset({"content-type", "location", "cache-control", "allow", "access-control-allow-origin",
                          "access-control-expose-headers", "access-control-allow-methods",
                          "access-control-allow-headers", "access-control-max-age"})
WORKER_GONE = "the render worker hosting this session stopped (its process ended); press Start for a new session"


class FrontDoor(HostAttributes):
    """The front door's routes on the thread + event loop of its `WebHost` (binding, token, ICE checks,
    JSON bodies: the same host as the viewer and studio servers); `start()` / `stop()`. A port in use or
    a bad host is the host's `ServerError` line."""

    def __init__(self, pool: WorkerPool, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 ice_servers: Sequence[str | RTCIceServer] | None = None, web_root: str | Path | None = None,
                 info_timeout_s: float = 1.0, reconcile_s: float = 2.0, call_timeout_s: float = 45.0) -> None:
        self.web = WebHost(host, port, token, ice_servers, None, web_root or DEFAULT_WEB_ROOT,
                           page="studio.html", label="front door")
        self.pool = pool
        self.info_timeout_s, self.reconcile_s, self.call_timeout_s = info_timeout_s, reconcile_s, call_timeout_s
        self.sessions_created = 0
        self.sessions_refused = 0
        self._tasks: list[asyncio.Task] = []
        self._share_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 15.0) -> "FrontDoor":
        self.pool.reconcile()
        self.web.start(self._make_app, self._shutdown, timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stops the door only: the workers (detached actors) and their sessions go on. Idempotent."""
        self.web.stop(timeout)

    async def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 1)
        app.router.add_get("/", self._page)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ice", self._ice)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/room", self._room)
        app.router.add_post("/sessions", self._create)
        app.router.add_route("*", "/sessions/{id}/{tail:.+}", self._forward)
        self._tasks.append(asyncio.ensure_future(self._reconcile_forever()))
        self._share_lock = asyncio.Lock()          # made on the loop that uses it
        return app

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _reconcile_forever(self) -> None:
        """New nodes get their workers without a restart of anything."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.reconcile_s)
            try:
                await loop.run_in_executor(None, self.pool.reconcile)
            except Exception as exc:  # noqa: BLE001 - the cluster may be briefly unreachable
                log.warning("cluster: reconcile failed: %s", exc)

    # ------------------------------------------------------------------ Ray calls
    async def _await(self, ref, timeout: float):
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)

    async def infos(self) -> list[dict]:
        """The workers that answer now, with their free capacity."""
        async def one(name, actor):
            try:
                return await self._await(actor.info.remote(), self.info_timeout_s)
            except Exception:  # noqa: BLE001 - dead, restarting or busy: not placeable now
                return None
        found = await asyncio.gather(*(one(n, a) for n, a in list(self.pool.workers.items())))
        return [i for i in found if i is not None]

    async def _call(self, name: str, method: str, path: str, query: dict, body: bytes,
                    token: bool = False, content_type: str = "application/json") -> tuple[int, dict]:
        """(status, body) from worker `name`; a worker that died answers 410 with the reason."""
        from ray.exceptions import RayActorError
        actor = self.pool.get(name)
        if actor is None:
            return 410, {"error": WORKER_GONE}
        try:
            return await self._await(actor.call.remote(method, path, query, body, content_type, token),
                                     self.call_timeout_s)
        except RayActorError:
            return 410, {"error": WORKER_GONE}
        except asyncio.TimeoutError:
            return 504, {"error": "the render worker did not answer in time; try again"}

    # ------------------------------------------------------------------ handlers
    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self.web.page_response()

    async def _health(self, request: web.Request) -> web.Response:
        infos = await self.infos()
        return web.json_response({"ok": True, "workers": len(infos),
                                  "sessions": sum(i["sessions"] for i in infos)})

    def _authorised(self, request: web.Request) -> bool:
        return self.web.authorised(request_token(request))

    async def _stats(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return error_response(403, "missing or wrong token")
        infos = sorted(await self.infos(), key=lambda i: i["name"])
        return json_response({"workers": infos, "workers_known": len(self.pool.workers),
                              "sessions": sum(i["sessions"] for i in infos),
                              "max_sessions": sum(i["max_sessions"] for i in infos),
                              "sessions_created": self.sessions_created,
                              "sessions_refused": self.sessions_refused})

    async def _ice(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        if self._authorised(request):
            return self.web.ice_response()
        where = _split_id(q.get("s", ""))
        if where is None:
            return error_response(403, "missing or wrong token")
        q["s"] = where[2]
        q.pop("token", None)
        status, body = await self._call(where[0], "GET", "/ice", q, b"")
        return json_response(body, status)

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return error_response(403, "missing or wrong token: open the URL with ?token=… printed by the server")
        if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
            return error_response(413, f"the photo is larger than {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the photo is larger than {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
        query = {k: v for k, v in request.query.items() if k in ("sample", "share")}
        if query.get("share", "") not in ("1", "true", "yes"):
            return await self._place(request, query, data)
        # The room's one presenter is cluster-wide: whether a worker's session presents is that worker's
        # own state (its `info`), so nothing here outlives a worker or is lost with a door restart; the
        # lock makes this door's check-then-create one step across workers.
        async with self._share_lock:
            infos = await self.infos()
            presenter = self.room_of(infos)["presenter"]
            if presenter:
                return error_response(409, f"the room already has a presenter: session {presenter}; stop it "
                                           "first, or start without sharing")
            return await self._place(request, query, data, infos)

    async def _place(self, request: web.Request, query: dict, data: bytes,
                     infos: list[dict] | None = None) -> web.Response:
        """Create the session on the worker with the most free slots (the next one when that one is full)."""
        infos = await self.infos() if infos is None else infos
        ranked = sorted((i for i in infos if i["free"] > 0), key=lambda i: (-i["free"], i["sessions"], i["name"]))
        last = None
        for info in ranked:
            status, body = await self._call(info["name"], "POST", "/sessions", query, data, token=True,
                                            content_type=request.content_type or "application/octet-stream")
            if status == 201:
                sid = f"{info['name']}.{info['boot']}.{body['id']}"
                self.sessions_created += 1
                log.info("session %s placed on %s", sid, info["name"])
                reply = {"id": sid, "secret": body["secret"], "view": body["view"],
                         "share": f"/?s={sid}&v={body['view']}", "whep": f"/sessions/{sid}/whep",
                         "worker": info["name"]}
                if "room" in body:
                    reply["room"] = body["room"]
                return web.json_response(reply, status=201)
            if status not in (503, 410, 504):
                return web.json_response(body, status=status)   # the photo's own problem: one line
            last = body.get("error")
        self.sessions_refused += 1
        total = sum(i["max_sessions"] for i in infos)
        if not infos:
            return error_response(503, f"no render worker is ready ({len(self.pool.workers)} starting or restarting); "
                               "try again in a few seconds")
        return error_response(503, f"the cluster is full: {total - sum(i['free'] for i in infos)} of {total} sessions "
                           f"are in use on {len(infos)} workers; try again when one ends"
                      + (f" (last worker: {last})" if last and ranked else ""))

    async def _route(self, request: web.Request):
        where = _split_id(request.match_info["id"])
        if where is None:
            return error_response(404, "no such session (it has ended); press Start for a new one")
        return where

    async def _worker_restarted(self, where: tuple[str, str, str]) -> bool:
        """A 404 from a worker whose boot changed (or that is gone) means the session went with it."""
        actor = self.pool.get(where[0])
        try:
            info = await self._await(actor.info.remote(), self.info_timeout_s) if actor else None
        except Exception:  # noqa: BLE001
            info = None
        return info is None or info["boot"] != where[1]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Any request under /sessions/{id}/ to the worker holding that session, generically: method,
        path, query, body bytes and the headers in `FORWARD_HEADERS`; the worker's status, body and the
        headers in `PASS_HEADERS` come back unchanged, but a `Location` under the worker's session path
        is rewritten to the door's (so a WHEP viewer's DELETE comes back here and is routed the same
        way). The door adds: CORS preflights answered here (no worker round trip, so a player's
        preflight works even while a worker restarts), JSON bodies checked as a studio checks them
        before they travel, a 404 from a restarted worker made 410, and `worker` in a session's stats."""
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=whep.PREFLIGHT)
        where = await self._route(request)
        if isinstance(where, web.Response):
            await discard_body(request)
            return _cors(where)
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return _cors(body)
        tail = request.match_info["tail"]
        if any(part in ("", ".", "..") for part in tail.split("/")):   # stays under this session's path
            await discard_body(request)
            return _cors(error_response(404, "no such session route"))
        headers = {k: request.headers[k] for k in FORWARD_HEADERS if k in request.headers}
        if body and "Content-Type" not in headers:
            headers["Content-Type"] = "application/octet-stream"
        # the share switch turned on is judged cluster-wide, as `?share=1` is (`_create`): the session's
        # own worker sees only its own presenter
        switch_on = tail == "share" and request.method == "POST" and _turns_on(body)
        async with self._share_lock if switch_on else contextlib.nullcontext():
            if switch_on:
                presenter = self.room_of(await self.infos())["presenter"]
                if presenter and presenter != request.match_info["id"]:
                    return _cors(error_response(409, f"the room already has a presenter: session {presenter}; "
                                                     "stop it first, or start without sharing"))
            status, answer_headers, answer = await self._forward_call(
                where[0], request.method, f"/sessions/{quote(where[2], safe='')}/{quote(tail)}",
                dict(request.query), body, headers)
        if status == 404 and await self._worker_restarted(where):
            status, answer_headers, answer = 410, {}, json.dumps({"error": WORKER_GONE}).encode()
        out = {k: v for k, v in answer_headers.items() if k.lower() in PASS_HEADERS}
        local = f"/sessions/{where[2]}/"
        for key in [k for k in out if k.lower() == "location"]:
            if out[key].startswith(local):
                out[key] = f"/sessions/{request.match_info['id']}/" + out[key][len(local):]
        if tail == "stats" and request.method == "GET" and status == 200:
            try:
                snap = json.loads(answer)
                snap["worker"] = where[0]
                answer = json.dumps(snap).encode()
            except ValueError:
                pass
        if not answer_headers:                  # a refusal made here (410, 504): JSON, readable cross-origin
            out.update({"Content-Type": "application/json", **whep.CORS})
        return web.Response(status=status, body=answer, headers=out)

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The body to pass on: a JSON one checked (size, charset, syntax) as a studio checks it, so
        a bad one is refused with the studio's words before it travels; any other kind as raw bytes
        up to `MAX_BODY_BYTES` (the worker judges its content type: a WHEP offer's, or its 415)."""
        if request.method in ("GET", "HEAD", "DELETE"):
            await discard_body(request)
            return b""
        if request.content_type == "application/json":
            body = await self.web.read_json(request, "{secret, ...}", MAX_BODY_BYTES, empty={})
            return body if isinstance(body, web.Response) else json.dumps(body).encode()
        too_large = error_response(413, f"request body is larger than {MAX_BODY_BYTES // 1024} KiB")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return too_large
        raw = bytearray()
        try:
            while chunk := await request.content.read(65536):
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    return too_large
        except Exception:  # noqa: BLE001 - a client that went away mid-body
            return error_response(400, "the request body could not be read")
        return bytes(raw)

    async def _forward_call(self, name: str, method: str, path: str, query: dict, body: bytes,
                            headers: dict) -> tuple[int, dict, bytes]:
        """(status, headers, body) from worker `name`'s `forward`; a dead worker: 410 with the reason."""
        from ray.exceptions import RayActorError
        actor = self.pool.get(name)
        gone = (410, {}, json.dumps({"error": WORKER_GONE}).encode())
        if actor is None:
            return gone
        try:
            return await self._await(actor.forward.remote(method, path, query, body, headers), self.call_timeout_s)
        except RayActorError:
            return gone
        except asyncio.TimeoutError:
            return 504, {}, json.dumps({"error": "the render worker did not answer in time; try again"}).encode()
        except Exception as exc:  # noqa: BLE001 - e.g. a request the worker's HTTP client refuses: one line
            log.warning("forwarding %s %s to %s failed: %s", method, path, name, exc)
            return 502, {}, json.dumps({"error": "the render worker could not take this request"}).encode()

    async def _room(self, request: web.Request) -> web.Response:
        return json_response(self.room_of(await self.infos()))

    @staticmethod
    def room_of(infos: list[dict]) -> dict:
        """The cluster's room as one studio's `GET /room` says it: the workers' (common) setting and the
        presenter, named by its cluster-wide session id, found among the workers that answer now."""
        rooms = [(i, i["room"]) for i in infos if isinstance(i.get("room"), dict)]
        if not rooms:
            return {"enabled": False, "reason": "no render worker is ready; try again in a few seconds",
                    "viewer_url": None, "presenter": None}
        room = dict(rooms[0][1])
        room["presenter"] = next((f"{i['name']}.{i['boot']}.{r['presenter']}" for i, r in rooms
                                  if r.get("presenter")), None)
        return room


def _cors(response: web.Response) -> web.Response:
    """A refusal made here for a forwarded route: readable by a cross-origin WHEP player too."""
    response.headers.update(whep.CORS)
    return response


def _turns_on(body: bytes) -> bool:
    """Whether a share switch's (JSON) body asks to go on the air."""
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("on") is True


def _split_id(sid: str) -> tuple[str, str, str] | None:
    parts = sid.split(".")
    if len(parts) != 3 or not all(parts) or not parts[0].startswith("render-"):
        return None
    return parts[0], parts[1], parts[2]


def serve_cluster(config, address: str, stop: threading.Event | None = None, ready=None) -> int:
    """`serve --cluster ADDRESS`: join the cluster, start (or find) the workers, serve until `stop`."""
    from pcavs_live.pipeline.outputs.webrtc import ice_servers_for
    stop = stop or threading.Event()
    connect(address)
    s = config.server
    door = FrontDoor(WorkerPool(config), host=s.host,
                     port=s.port, token=s.token, ice_servers=ice_servers_for(s)).start()
    print(f"studio (cluster): open {door.url}  ({len(door.pool.workers)} workers)", file=sys.stderr, flush=True)
    try:
        if ready is not None:
            ready(door)
        stop.wait()
    finally:
        door.stop()
    return 0
