"""A minimal WHIP server for tests that must run without Janus: aiohttp + one aiortc receiver per
publisher, on its own thread and loop, loopback only.

It does what RFC 9725 asks of a server and nothing more: POST with `Authorization: Bearer TOKEN` and an
SDP offer → 201, answer, `Location: /whip/resource/N`; DELETE of that resource closes it. It records
what it saw (requests, the slots decoded from each received frame) and can `drop_all` its sessions
without a word, the way a restarting server forgets them.
"""
from __future__ import annotations

import asyncio
import itertools
import threading

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from stream.webrtc.ice import use_host_addresses
from stream.wish import receive
from tests.janus_support import read_slot


class FakeWhipServer:
    def __init__(self, token: str = "good") -> None:
        self.token = token
        self.requests: list[tuple[str, str, dict]] = []    # (method, path, headers)
        self.slots: list[int] = []                          # every received frame's slot, in arrival order
        self.audio_frames = 0
        self.deleted: list[str] = []
        self._pcs: dict[str, RTCPeerConnection] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-whip", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/whip"

    def start(self) -> "FakeWhipServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/whip", self._post)
        app.router.add_delete("/whip/resource/{id}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _post(self, request: web.Request) -> web.Response:
        self.requests.append(("POST", request.path, dict(request.headers)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="Unauthorized")
        if request.content_type != "application/sdp":
            return web.Response(status=415, text="expected application/sdp")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))     # no STUN: aiortc's default is Google's

        @pc.on("track")
        def on_track(track) -> None:
            asyncio.ensure_future(self._read(track))

        await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
        use_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createAnswer())
        resource = f"/whip/resource/{next(self._ids)}"
        self._pcs[resource] = pc
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": resource})

    async def _read(self, track) -> None:
        await receive(track, lambda f: self.slots.append(read_slot(f.to_ndarray(format="rgb24"))), self._count_audio)

    def _count_audio(self, frame) -> None:
        self.audio_frames += 1

    async def _delete(self, request: web.Request) -> web.Response:
        self.requests.append(("DELETE", request.path, dict(request.headers)))
        pc = self._pcs.pop(request.path, None)
        if pc is None:
            return web.Response(status=404)
        self.deleted.append(request.path)
        await pc.close()
        return web.Response(status=200)

    def drop_all(self) -> None:
        """Forget every session without telling the publishers (a server restart)."""
        async def drop() -> None:
            pcs, self._pcs = list(self._pcs.values()), {}
            for pc in pcs:
                await pc.close()
        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    @property
    def sessions(self) -> int:
        return len(self._pcs)

    def stop(self) -> None:
        async def stop() -> None:
            for pc in list(self._pcs.values()):
                await pc.close()
            if self._runner is not None:
                await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
