"""The cluster front door's HTTP side without Ray (a pool with no workers): it is a `WebHost` like the
viewer and studio servers, so a taken port, the token, the page and its scripts, and JSON bodies behave
as theirs do; then generic forwarding (share to room across workers, `/room`, WHEP) to real
`RenderWorker`s called in-process as actors. Placement across a real Ray cluster: tests/test_cluster.py."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import types
import urllib.error
import urllib.request

import pytest

from pcavs_live.cli.config import load_config
from pcavs_live.cluster.frontdoor import WORKER_GONE, FrontDoor
from pcavs_live.cluster.worker import RenderWorker
from stream.whep import WhepClient
from stream.webrtc.host import ServerError
from tests.cluster_support import paint_backend


class NoWorkers:
    """What the front door uses of a `WorkerPool`, with no worker (started, restarting or known)."""

    def __init__(self) -> None:
        self.workers: dict = {}
        self.reconciled = 0

    def reconcile(self) -> None:
        self.reconciled += 1

    def get(self, name: str):
        return None


def fetch(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def door():
    started: list[FrontDoor] = []

    def start(**kwargs) -> FrontDoor:
        d = FrontDoor(NoWorkers(), port=0, reconcile_s=0.05, **kwargs).start()
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()


def test_a_taken_port_is_one_line_naming_the_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ServerError) as err:
            FrontDoor(NoWorkers(), port=port).start()
    message = str(err.value)
    assert "\n" not in message and f"port {port}" in message and "--port" in message


def test_serves_the_studio_page_and_its_scripts_and_refuses_as_a_studio_does(door):
    d = door()
    base = f"http://127.0.0.1:{d.port}/"
    status, page = fetch(base)
    assert status == 200 and b'src="static/rtc.js"' in page and b'src="static/studio.js"' in page
    for script in ("rtc.js", "studio.js"):
        assert fetch(base + "static/" + script)[0] == 200
    # A body that is not JSON is refused here, with the studio's own words; a good one reaches the
    # (missing) worker, which the door reports as gone.
    status, body = fetch(base + "sessions/render-0.boot.abc/stop", b"{nope", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"].startswith("request body is not JSON")
    status, body = fetch(base + "sessions/render-0.boot.abc/stop", b'{"secret": "x"}',
                         {"Content-Type": "application/json"})
    assert status == 410 and json.loads(body)["error"] == WORKER_GONE
    status, body = fetch(base + "sessions/render-0.boot.abc/stop", b"x" * (65 * 1024))
    assert status == 413 and "KiB" in json.loads(body)["error"]
    status, body = fetch(base + "sessions?sample=1", b"")
    assert status == 503 and "no render worker is ready" in json.loads(body)["error"]
    # The page's "share to room" checkbox asks /room: here it says why it cannot share.
    status, body = fetch(base + "room")
    assert status == 200 and json.loads(body)["enabled"] is False
    assert "no render worker is ready" in json.loads(body)["reason"]
    assert d.pool.reconciled >= 1


def test_off_loopback_a_token_is_generated_and_required(door):
    d = door(host="0.0.0.0")
    assert d.token and d.url.endswith(f"?token={d.token}")
    base = f"http://127.0.0.1:{d.port}/"
    assert fetch(base + "stats")[0] == 403
    assert fetch(base + "stats?token=wrong")[0] == 403
    status, body = fetch(base + f"stats?token={d.token}")
    assert status == 200 and json.loads(body)["workers_known"] == 0
    status, body = fetch(base + f"ice?token={d.token}")
    assert status == 200 and json.loads(body) == {"iceServers": []}


def test_stop_ends_the_thread_and_is_idempotent():
    d = FrontDoor(NoWorkers(), port=0).start()
    assert d.running
    d.stop()
    d.stop()
    assert not d.running


# ---------------------------------------------------------------------------------------------------
# Forwarding to real `RenderWorker`s (paint renderer) in this process: the door's generic forwarding,
# the cluster-wide room and WHEP through the door, still without Ray (actor calls run in a thread pool).

VIEWER_URL = "http://127.0.0.1:8080/static/room.html?janus=http://127.0.0.1:8088/janus&room=1234"


class _Ref:
    """What the door uses of a Ray ObjectRef: `future()`."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future

    def future(self) -> concurrent.futures.Future:
        return self._future


class LocalActor:
    """A `RenderWorker` called as an actor: `actor.method.remote(...)` runs in a thread pool."""

    def __init__(self, worker: RenderWorker, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.worker, self._pool = worker, pool

    def __getattr__(self, name: str):
        method = getattr(self.worker, name)
        return types.SimpleNamespace(remote=lambda *a, **k: _Ref(self._pool.submit(method, *a, **k)))


class LocalWorkers(NoWorkers):
    """Two render workers in this process; `kill(name)` is a worker whose process ended."""

    def __init__(self, n: int = 2, whip_endpoint: str = "http://127.0.0.1:9/whip") -> None:
        super().__init__()
        self._threads = concurrent.futures.ThreadPoolExecutor(8)
        config = load_config(None, {"pose.smoothing": 0.0, "server.max_sessions": 2,
                                    "server.ice_host_addresses": ["127.0.0.1"],
                                    "whip.endpoint": whip_endpoint, "whip.token": "good",
                                    "whip.viewer_url": VIEWER_URL})
        # lost_timeout_s: a process's first session imports librosa on its first mel (seconds on a busy box)
        self.workers = {f"render-w{i}-0": LocalActor(RenderWorker(f"render-w{i}-0", config, paint_backend,
                                                                  lost_timeout_s=20.0), self._threads)
                        for i in range(n)}

    def get(self, name: str):
        return self.workers.get(name)

    def kill(self, name: str) -> None:
        self.workers.pop(name).worker.stop()

    def shutdown(self) -> None:
        for actor in self.workers.values():
            actor.worker.stop()
        self._threads.shutdown()


@pytest.fixture
def two_workers():
    pool = LocalWorkers()
    d = FrontDoor(pool, port=0, reconcile_s=60).start()
    yield d, pool, f"http://127.0.0.1:{d.port}/"
    d.stop()
    pool.shutdown()


def request(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def create(base: str, share: bool = False) -> tuple[int, dict]:
    status, _, body = request("POST", base + "sessions?sample=1" + ("&share=1" if share else ""), b"")
    return status, json.loads(body)


def test_share_to_room_has_one_presenter_across_workers_and_a_dead_worker_frees_the_room(two_workers):
    d, pool, base = two_workers
    status, _, room = request("GET", base + "room")
    assert status == 200 and json.loads(room) == {"enabled": True, "reason": None, "viewer_url": VIEWER_URL,
                                                  "presenter": None}
    status, first = create(base, share=True)
    assert status == 201 and first["room"] == {"viewer_url": VIEWER_URL}
    assert first["whep"] == f"/sessions/{first['id']}/whep"
    assert json.loads(request("GET", base + "room")[2])["presenter"] == first["id"]
    # The second share is placed (most free slots) on the OTHER worker, yet refused: one presenter per room.
    status, refused = create(base, share=True)
    assert status == 409 and refused["error"].startswith(f"the room already has a presenter: session {first['id']}")
    status, plain = create(base)                              # without sharing: placed as before
    assert status == 201 and plain["worker"] != first["worker"]
    # The presenter stops: the room is free again, from any worker.
    status, _, _ = request("POST", base + f"sessions/{first['id']}/stop",
                           json.dumps({"secret": first["secret"]}).encode(), {"Content-Type": "application/json"})
    assert status == 200 and json.loads(request("GET", base + "room")[2])["presenter"] is None
    status, second = create(base, share=True)
    assert status == 201 and second["worker"] == first["worker"]   # the other worker has a session
    # Its worker dies: the room is not left locked (the state went with the worker), and its session is 410.
    pool.kill(second["worker"])
    assert json.loads(request("GET", base + "room")[2])["presenter"] is None
    status, _, body = request("GET", base + f"sessions/{second['id']}/stats?secret={second['secret']}")
    assert status == 410 and json.loads(body)["error"] == WORKER_GONE
    status, third = create(base, share=True)
    assert status == 201 and third["worker"] == plain["worker"]


def test_whep_through_the_door_location_rewritten_delete_routed_refusals_passed_through(two_workers):
    d, pool, base = two_workers
    status, sess = create(base)
    assert status == 201
    endpoint = base + sess["whep"].lstrip("/")
    # CORS preflight: answered by the door.
    status, headers, _ = request("OPTIONS", endpoint, headers={"Origin": "http://elsewhere",
                                                                 "Access-Control-Request-Method": "POST"})
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Origin"] == "*"
    # The worker's own refusals, status and line unchanged: a wrong content type (415), a wrong key (401).
    status, headers, body = request("POST", endpoint, b"v=0\r\n", {"Content-Type": "text/plain",
                                                                   "Authorization": f"Bearer {sess['view']}"})
    assert status == 415 and "application/sdp" in json.loads(body)["error"] and "\n" not in json.loads(body)["error"]
    assert headers["Access-Control-Allow-Origin"] == "*"
    status, _, body = request("POST", endpoint, b"v=0\r\n", {"Content-Type": "application/sdp",
                                                             "Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(body)["error"].startswith("wrong share link")

    async def watch() -> str:
        client = WhepClient(endpoint, sess["view"], ice_host_addresses=["127.0.0.1"], connect_timeout_s=15)
        await client.start()
        try:
            assert client.connected                       # ICE straight to the worker's peer
            resource = client.resource
            assert resource.startswith(endpoint + "/")     # the door's path, not the worker's
            status, _, body = request("GET", base + f"sessions/{sess['id']}/stats?view={sess['view']}")
            assert status == 200 and json.loads(body)["viewers"] == 1
            return resource
        finally:
            await client.stop()                           # DELETEs the resource through the door

    resource = asyncio.run(asyncio.wait_for(watch(), 60))
    status, _, body = request("GET", base + f"sessions/{sess['id']}/stats?view={sess['view']}")
    assert status == 200 and json.loads(body)["viewers"] == 0 and json.loads(body)["worker"] == sess["worker"]
    status, _, body = request("DELETE", resource)                 # gone already: the worker's 404, unchanged
    assert status == 404 and json.loads(body)["error"].startswith("no such WHEP viewer")
    # A route is forwarded under its session only: no way up to the worker's own paths.
    status, _, body = request("GET", base + f"sessions/{sess['id']}/%2e%2e/%2e%2e/stats")
    assert status == 404 and "\n" not in json.loads(body)["error"]
    # A worker that died: the door's 410, readable cross-origin.
    pool.kill(sess["worker"])
    status, headers, body = request("DELETE", resource)
    assert status == 410 and json.loads(body)["error"] == WORKER_GONE and headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.integration
def test_the_studio_page_on_the_door_shares_to_the_room():
    """Headless Chromium (fake microphone) on the door: the "share to room" checkbox is enabled (the
    door answers /room), ticking it and pressing Start publishes the session from its worker to the
    WHIP server, the page shows the room's viewer URL and the share's state (stats through the door)."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser_viewer import CHROMIUM, CHROMIUM_ARGS
    from tests.whip_server import FakeWhipServer
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt install chromium)")
    whip_server = FakeWhipServer().start()
    pool = LocalWorkers(1, whip_endpoint=whip_server.url)
    d = FrontDoor(pool, port=0, reconcile_s=60).start()
    args = CHROMIUM_ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, timeout=20_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{d.port}/")
                page.wait_for_function("() => !document.getElementById('room').disabled")
                page.check("#room")
                page.click("#start")
                page.wait_for_selector("#room-line:not([hidden])")
                assert page.text_content("#room-link") == VIEWER_URL
                page.wait_for_function(
                    "() => document.querySelector('#stats td[data-key=\"share_state\"]').textContent === 'publishing'")
                assert page.evaluate("window.studio.session.id").startswith("render-w0-0.")
                page.click("#stop")
                page.wait_for_function("() => !document.getElementById('start').disabled")
            finally:
                browser.close()
    finally:
        d.stop()
        pool.shutdown()
        whip_server.stop()
    assert whip_server.deleted == ["/whip/resource/1"] and whip_server.sessions == 0


def test_a_session_id_with_url_syntax_in_it_is_forwarded_quoted_under_its_session_path(door):
    """Review finding: the id's session part went into the worker's path unquoted, so an id holding a
    `?` or `#` (sent percent-encoded) was forwarded as another path (`/sessions/abc?x/stats`: the query
    started inside it). Now it is quoted like the tail: the worker sees one path segment."""
    import http.client

    forwarded = []

    class Recorder:
        def __getattr__(self, name):
            def remote(*args, **kwargs):
                future = concurrent.futures.Future()
                if name == "info":
                    future.set_result({"name": "render-w0-0", "boot": "boot"})
                    return _Ref(future)
                forwarded.append(args)
                future.set_result((404, {"Content-Type": "application/json"}, b'{"error": "no such session"}'))
                return _Ref(future)
            return types.SimpleNamespace(remote=remote)

    class OneWorker(NoWorkers):
        def get(self, name):
            return Recorder()

    d = FrontDoor(OneWorker(), port=0, reconcile_s=60).start()
    try:
        for raw, path in (("abc%3Fx", "/sessions/abc%3Fx/stats"), ("a%23b", "/sessions/a%23b/stats")):
            forwarded.clear()
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            conn.request("GET", f"/sessions/render-w0-0.boot.{raw}/stats")
            conn.getresponse().read()
            conn.close()
            calls = [a for a in forwarded if a and a[0] == "GET"]
            assert calls and calls[0][1] == path
    finally:
        d.stop()


def _switch(base: str, session: dict, on: bool):
    status, _, body = request("POST", base + f"sessions/{session['id']}/share",
                              json.dumps({"secret": session["secret"], "on": on}).encode(),
                              {"Content-Type": "application/json"})
    return status, json.loads(body)


def test_the_share_switch_through_the_door_keeps_one_presenter_across_workers(two_workers):
    """Review finding: `POST /sessions/{id}/share {on: true}` was forwarded generically, so only the
    session's own worker judged it: a session on another worker than the presenter went on the air too
    (two presenters in one room). The door now checks the switch as it checks `?share=1`."""
    d, pool, base = two_workers
    status, first = create(base, share=True)
    assert status == 201
    status, other = create(base)
    assert status == 201 and other["worker"] != first["worker"]
    status, refused = _switch(base, other, True)
    assert status == 409 and refused["error"].startswith(f"the room already has a presenter: session {first['id']}")
    assert json.loads(request("GET", base + "room")[2])["presenter"] == first["id"]
    assert _switch(base, first, True) == (200, {"share": True, "room": {"viewer_url": VIEWER_URL}})  # its own
    assert _switch(base, first, False) == (200, {"share": False})
    status, reply = _switch(base, other, True)
    assert status == 200 and reply["share"] is True
    assert json.loads(request("GET", base + "room")[2])["presenter"] == other["id"]
