"""`RenderWorker`: one device slot's studio, as a Ray actor.

A worker is the single-process studio minus the public door: the networks (or an injected backend),
its `SharedRenderer` + `StudioSessions`, and a `stream.studio.StudioServer` bound to 127.0.0.1 behind a
random token that only this actor knows. The front door reaches it through `call` (an actor method,
so only a process in the Ray cluster can send an offer); the WebRTC peers live in this process, so media
flows browser ↔ worker directly, with ICE from the same `[server]` keys.

Why an HTTP server on loopback instead of calling the studio's handlers: the studio server is the one
place that owns a session's life (admission, keys, peers, watchdog); going through its public API keeps
one code path for a session, whatever hosts it.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from pcavs_live.pipeline.options import Config

# Config → (the studio's SessionFactory, a close function). Default: the real networks.
Backend = Callable[[Config], tuple[object, Callable[[], None]]]

CALL_TIMEOUT_S = 40.0


def network_backend(config: Config) -> tuple[object, Callable[[], None]]:
    """The real studio pieces, wired as the single-process studio wires them (`studio_parts`): networks
    loaded once and warmed, one shared landmark model and renderer, sessions built by `StudioSessions`."""
    from pcavs_live.pipeline.studio import studio_parts
    factory, load = studio_parts(config)
    load()
    return factory, factory.renderer.stop


class RenderWorker:
    """The actor's class (wrapped by `ray.remote` in `WorkerPool`, so this module imports without Ray).

    `boot` changes with every (re)start: a session id carries the boot it was made in, so the front door
    knows a restarted worker no longer has it."""

    def __init__(self, name: str, config: Config, backend: Backend | None = None,
                 lost_timeout_s: float = 5.0) -> None:
        from pcavs_live.pipeline.outputs.webrtc import ice_servers_for
        from stream.studio import StudioServer

        self.name = name
        self.boot = secrets.token_hex(3)
        s = config.server
        self.factory, self._close = (backend or network_backend)(config)
        self._token = secrets.token_urlsafe(24)
        self.server = StudioServer(self.factory, host="127.0.0.1", port=0, token=self._token,
                                   max_sessions=s.max_sessions, ice_servers=ice_servers_for(s),
                                   ice_host_addresses=s.ice_host_addresses,
                                   lost_timeout_s=lost_timeout_s)
        self.server.start()

    def info(self) -> dict:
        """Capacity as placement sees it (a slot being created or torn down is not free)."""
        used = self.server.session_count
        return {"name": self.name, "boot": self.boot, "node": socket.gethostname(), "pid": os.getpid(),
                "sessions": used, "max_sessions": self.server.max_sessions,
                "free": max(0, self.server.max_sessions - used), "room": self.server.room()}

    def call(self, method: str, path: str, query: dict | None = None, body: bytes = b"",
             content_type: str = "application/json", token: bool = False) -> tuple[int, dict]:
        """One studio API request on this worker's loopback server; `token`: with its private token
        (creating a session, the worker's stats), else the request's own session keys decide."""
        query = dict(query or {})
        url = f"http://127.0.0.1:{self.server.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Content-Type": content_type}
        if token:
            headers["X-Token"] = self._token
        req = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as resp:
                return resp.status, _json_of(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json_of(exc.read())

    def forward(self, method: str, path: str, query: dict | None = None, body: bytes = b"",
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        """Any session request the front door passes on as it came (method, path, query, body bytes,
        the headers that matter): (status, response headers, body bytes), whatever the route or the
        content type, so a new studio route works through the door without an edit here or there."""
        url = f"http://127.0.0.1:{self.server.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, data=body if body or method in ("POST", "PUT", "PATCH") else None,
                                     method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read()

    def rss_bytes(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        """Ends the sessions and the renderer (the pool calls it before killing the actor)."""
        self.server.stop()
        self._close()


def _json_of(raw: bytes) -> dict:
    try:
        value = json.loads(raw.decode("utf-8") or "{}")
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:200]}
    return value if isinstance(value, dict) else {"value": value}
