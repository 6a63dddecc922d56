"""The cluster front door's HTTP side without Ray (a pool with no workers): it is a `WebHost` like the
viewer and studio servers, so a taken port, the token, the page and its scripts, and JSON bodies behave
as theirs do. Placement and forwarding to real workers: tests/test_cluster.py (needs Ray)."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from pcavs_live.cluster.frontdoor import WORKER_GONE, FrontDoor
from stream.webrtc.host import ServerError


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
