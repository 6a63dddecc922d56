"""`FrontDoor`: the studio page and API for a whole Ray cluster of `RenderWorker`s.

The browser sees the same page and endpoints as one studio (`stream.studio.StudioServer`). The front
door keeps no session state: a session id is `WORKER.BOOT.ID` (the worker's actor name, the boot it was
made in, the worker's own id), so any front door — a restarted one too — routes stop/view/stats/offer
to the worker that holds it, and knows a restarted worker no longer does (410 with the reason).

Placement: each new session goes to the worker with the most free slots among those that answer
`info` within `info_timeout_s` (a dead or restarting worker does not answer and is left out); a worker
that turns out full (a race with another create) passes the request to the next one. No worker with a
free slot: 503 with the reason, as one studio answers. The Ray address never leaves this process.

Binding, the token, ICE checks, the loop thread and JSON bodies are a `WebHost`'s
(stream/webrtc/host.py), as for the viewer and studio servers; this class composes one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Sequence

from aiohttp import web
from aiortc import RTCIceServer

from pcavs_live.cluster.pool import WorkerPool, connect
from stream.webrtc.host import (DEFAULT_WEB_ROOT, HostAttributes, WebHost, error_response, json_response,
                                request_token)

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = 64 * 1024
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
        app.router.add_post("/sessions", self._create)
        for verb in ("offer", "view", "stop"):
            app.router.add_post("/sessions/{id}/" + verb, self._forward_post)
        app.router.add_get("/sessions/{id}/stats", self._forward_stats)
        self._tasks.append(asyncio.ensure_future(self._reconcile_forever()))
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
        query = {k: v for k, v in request.query.items() if k == "sample"}
        infos = await self.infos()
        ranked = sorted((i for i in infos if i["free"] > 0), key=lambda i: (-i["free"], i["sessions"], i["name"]))
        last = None
        for info in ranked:
            status, body = await self._call(info["name"], "POST", "/sessions", query, data, token=True,
                                            content_type=request.content_type or "application/octet-stream")
            if status == 201:
                sid = f"{info['name']}.{info['boot']}.{body['id']}"
                self.sessions_created += 1
                log.info("session %s placed on %s", sid, info["name"])
                return web.json_response({"id": sid, "secret": body["secret"], "view": body["view"],
                                          "share": f"/?s={sid}&v={body['view']}", "worker": info["name"]},
                                         status=201)
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

    async def _gone_or(self, where: tuple[str, str, str], status: int, body: dict) -> web.Response:
        """A 404 from a worker whose boot changed means it restarted: say so (410)."""
        if status == 404:
            actor = self.pool.get(where[0])
            try:
                info = await self._await(actor.info.remote(), self.info_timeout_s) if actor else None
            except Exception:  # noqa: BLE001
                info = None
            if info is None or info["boot"] != where[1]:
                status, body = 410, {"error": WORKER_GONE}
        return json_response(body, status)

    async def _forward_post(self, request: web.Request) -> web.Response:
        where = await self._route(request)
        if isinstance(where, web.Response):
            return where
        body = await self.web.read_json(request, "{secret, ...}", MAX_BODY_BYTES, empty={})
        if isinstance(body, web.Response):       # size, charset or syntax: refused here, as a studio would
            return body
        verb = request.path.rsplit("/", 1)[1]
        status, answer = await self._call(where[0], "POST", f"/sessions/{where[2]}/{verb}", {},
                                          json.dumps(body).encode())
        return await self._gone_or(where, status, answer)

    async def _forward_stats(self, request: web.Request) -> web.Response:
        where = await self._route(request)
        if isinstance(where, web.Response):
            return where
        q = {k: v for k, v in request.query.items() if k in ("secret", "view")}
        status, answer = await self._call(where[0], "GET", f"/sessions/{where[2]}/stats", q, b"")
        if status == 200:
            answer["worker"] = where[0]
        return await self._gone_or(where, status, answer)


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
