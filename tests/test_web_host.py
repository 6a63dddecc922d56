"""`WebHost`, what the viewer and studio servers compose: binding, the token, the loop thread and its
stop, JSON request bodies. Exercised here on a bare app of its own (the servers' own tests cover their
routes on top of it)."""
from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp
import pytest
from aiohttp import web

from stream.studio import StudioServer
from stream.webrtc import WebRTCServer
from stream.webrtc.host import MAX_OFFER_BYTES, ServerError, WebHost, error_response


def start_echo(**kwargs) -> WebHost:
    """A host whose POST /echo answers the JSON body it read (or read_json's refusal)."""
    host = WebHost(port=0, label="echo server", **kwargs)

    async def echo(request: web.Request) -> web.Response:
        body = await host.read_json(request, "{anything}", empty={"empty": True} if "empty" in request.query else None)
        if isinstance(body, web.Response):
            return body
        return web.json_response(body)

    async def page(request: web.Request) -> web.StreamResponse:
        return host.page_response()

    async def make_app() -> web.Application:
        app = web.Application()
        app.router.add_post("/echo", echo)
        app.router.add_get("/", page)
        return app

    async def nothing() -> None:
        pass

    host.start(make_app, nothing)
    return host


async def post(url: str, data, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.post(url, data=data, headers=headers or {"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json(content_type=None)


async def pieces(parts: list[bytes], pause: float = 0.05):
    """A chunked body arriving in several pieces, with pauses between them."""
    for part in parts:
        await asyncio.sleep(pause)
        yield part


@pytest.fixture
def echo():
    host = start_echo()
    yield host
    host.stop()


def test_a_body_arriving_in_pieces_is_read_whole(echo):
    status, body = asyncio.run(post(echo.base_url + "echo", pieces([b'{"sdp": "v=0', b'\\r\\n", "n"', b": 3}"])))
    assert (status, body) == (200, {"sdp": "v=0\r\n", "n": 3})


@pytest.mark.parametrize("data, query, status, needle", [
    (lambda: pieces([b" " * 8192] * (MAX_OFFER_BYTES // 8192 + 2), 0.0), "", 413, "64 KiB"),
    (b"[1, 2]", "", 400, "must be a JSON object {anything}"),
    (b"", "", 400, "not JSON"),
    (b"", "?empty", 200, None),
    (b"{", "", 400, "not JSON"),
])
def test_bodies_are_capped_parsed_and_refused_in_one_line(echo, data, query, status, needle):
    body = data() if callable(data) else data
    got, answer = asyncio.run(post(echo.base_url + "echo" + query, body))
    assert got == status, answer
    if needle is None:
        assert answer == {"empty": True}
    else:
        assert needle in answer["error"] and "\n" not in answer["error"]


def test_off_loopback_a_token_is_made_and_checked():
    host = WebHost(host="0.0.0.0", port=0)
    assert host.token_generated and host.token and len(host.token) >= 16
    assert host.authorised(host.token) and not host.authorised("wrong") and not host.authorised(None)
    assert not host.authorised(["not", "a", "string"])
    assert WebHost(host="127.0.0.1").token is None and WebHost(host="127.0.0.1").authorised(None)
    assert WebHost(host="0.0.0.0", token="mine").token == "mine"


def test_a_taken_port_is_one_line_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        host = WebHost(port=port, label="echo server")
        with pytest.raises(ServerError, match=f"port {port} .* already in use.*--port"):
            host.start(lambda: None, lambda: None)
    assert not host.running


def test_a_missing_page_is_named(tmp_path):
    with pytest.raises(ServerError, match="studio server page .*nothing.html is missing"):
        WebHost(port=0, web_root=tmp_path, page="nothing.html", label="studio server").start(None, None)


def test_stop_runs_the_servers_shutdown_and_ends_the_loop_thread():
    calls = []
    host = WebHost(port=0, label="shutdown probe")

    async def make_app() -> web.Application:
        return web.Application()

    async def shutdown() -> None:
        calls.append(threading.current_thread().name)

    host.start(make_app, shutdown)
    assert host.running and host.loop is not None
    host.stop()
    assert calls == ["shutdown-probe"]                    # on the host's own (named) loop thread
    assert not host.running and host.loop is None
    assert "shutdown-probe" not in [t.name for t in threading.enumerate()]
    host.stop()                                            # idempotent


def test_both_servers_compose_a_host_and_neither_derives_from_the_other():
    assert not issubclass(StudioServer, WebRTCServer) and not issubclass(WebRTCServer, StudioServer)
    assert isinstance(WebRTCServer(port=0).web, WebHost)
    assert isinstance(StudioServer(factory=None, port=0).web, WebHost)
    assert error_response(404, "x").status == 404
