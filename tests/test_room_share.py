"""The studio's "share to room": a session also published by WHIP, through its own sinks (`RoomShare`).

Against `tests/whip_server.py` (a minimal WHIP server on 127.0.0.1; no Janus, no root): what the page
is told (`GET /room`), one presenter per room (409), a refused token as the session's one-line share
state while its own viewer keeps receiving, and the WHIP resource DELETEd when the session stops. The
same through a real Janus is in tests/test_whip.py.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.studio_support import Client, base, http, run, start_studio
from tests.whip_server import FakeWhipServer

VIEWER_URL = "http://127.0.0.1:8080/static/room.html?janus=http://10.213.0.2:8088/janus&room=1234"


@pytest.fixture
def fake_whip():
    server = FakeWhipServer().start()
    yield server
    server.stop()


def _studio(fake_whip: FakeWhipServer | None, token: str = "good"):
    overrides = {"server.ice_host_addresses": ["127.0.0.1"]}
    if fake_whip is not None:
        overrides.update({"whip.endpoint": fake_whip.url, "whip.token": token, "whip.viewer_url": VIEWER_URL})
    # lost_timeout_s: a process's first session imports librosa (numba) on its first mel, seconds on a
    # busy machine, during which its audio is not read; what is tested here is not that watchdog
    return start_studio(overrides=overrides, lost_timeout_s=20.0)


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


async def _stats(srv, client: Client) -> dict:
    s = client.session
    return (await http("GET", base(srv) + f"sessions/{s['id']}/stats?secret={s['secret']}"))[1]


def test_without_a_whip_endpoint_sharing_is_disabled_with_the_reason():
    srv, _, renderer = _studio(None)
    try:
        async def body():
            status, room = await http("GET", base(srv) + "room")
            assert status == 200 and room["enabled"] is False and "whip.endpoint" in room["reason"]
            status, reply = await Client(srv).create(share=True)
            assert status == 400 and reply["error"].startswith("cannot share to the room: ")
            assert "whip.endpoint" in reply["error"] and "\n" not in reply["error"]
            status, _ = await Client(srv).create()          # without sharing: a session as before
            assert status == 201
        run(body())
    finally:
        srv.stop()
        renderer.stop()


def test_a_shared_session_publishes_its_slots_and_its_stop_deletes_the_resource(fake_whip):
    srv, _, renderer = _studio(fake_whip)
    try:
        async def body():
            status, room = await http("GET", base(srv) + "room")
            assert room == {"enabled": True, "reason": None, "viewer_url": VIEWER_URL, "presenter": None}
            owner = Client(srv)
            status, created = await owner.create(share=True)
            assert status == 201 and created["room"] == {"viewer_url": VIEWER_URL}
            # one presenter per room: a second sharing session is refused, naming the first
            status, refused = await Client(srv).create(share=True)
            assert status == 409
            assert refused["error"].startswith(f"the room already has a presenter: session {created['id']}")
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] == created["id"]
            await owner.connect()
            await owner.wait_frames()                     # the owner's own avatar comes back
            await _until(lambda: _async(len(fake_whip.slots) >= 50), 30, "50 shared frames at the WHIP server")
            stats = await _stats(srv, owner)
            assert stats["share_state"] == "publishing" and stats["share_viewer_url"] == VIEWER_URL
            assert stats["share_connects"] == 1
            status, _ = await http("POST", base(srv) + f"sessions/{created['id']}/stop",
                                   json={"secret": created["secret"]})
            assert status == 200
            await owner.close()
            # the room is free again
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] is None
        run(body())
    finally:
        srv.stop()
        renderer.stop()
    posts = [r for r in fake_whip.requests if r[0] == "POST"]
    assert len(posts) == 1 and posts[0][2]["Authorization"] == "Bearer good"
    assert fake_whip.deleted == ["/whip/resource/1"] and fake_whip.sessions == 0
    assert fake_whip.audio_frames >= 0.9 * len(fake_whip.slots)


def test_a_refused_token_is_a_one_line_share_state_and_the_session_goes_on(fake_whip):
    srv, _, renderer = _studio(fake_whip, token="bad")
    try:
        async def body():
            owner = Client(srv)
            status, created = await owner.create(share=True)
            assert status == 201
            await owner.connect()
            await owner.wait_frames()

            async def failed():
                return (await _stats(srv, owner)).get("share_state", "").startswith("error: ")
            await _until(failed, 30, "the share to fail")
            state = (await _stats(srv, owner))["share_state"]
            assert "refused the token" in state and "\n" not in state
            before = (await _stats(srv, owner))["frames_out"]
            owner.frames.clear()
            await owner.wait_frames()                     # its own viewer still gets the avatar
            await _until(lambda: _async_stats_above(srv, owner, before + 10), 20, "the session to go on")
            await owner.close()
        run(body())
    finally:
        srv.stop()
        renderer.stop()
    assert not fake_whip.slots and fake_whip.sessions == 0


async def _async(value):
    return value


async def _async_stats_above(srv, owner: Client, n: int) -> bool:
    return (await _stats(srv, owner)).get("frames_out", 0) > n


def test_out_whip_prints_the_room_viewer_url_at_start_up(capsys):
    """`--out whip` runs name the room's viewer URL among the start-up lines (the output's prepare step)."""
    import contextlib

    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.metrics import LiveMetrics
    from pcavs_live.pipeline.outputs import OUTPUTS, OutputContext, prepare_outputs
    config = load_config(None, {"output.targets": ["whip"], "whip.endpoint": "http://127.0.0.1:7080/whip/endpoint/a",
                                "whip.viewer_url": VIEWER_URL})
    with contextlib.ExitStack() as stack:
        prepare_outputs(OutputContext(config, LiveMetrics(), stack, OUTPUTS))
    assert capsys.readouterr().err.splitlines() == [
        f"whip: publishing to http://127.0.0.1:7080/whip/endpoint/a; room viewers open {VIEWER_URL}"]


@pytest.mark.integration
def test_the_studio_page_shares_to_the_room_and_shows_the_viewer_url(fake_whip):
    """In headless Chromium (fake microphone): without an endpoint the checkbox is disabled with the
    reason; with one, ticking it and pressing Start publishes the session, the page shows the room's
    viewer URL and the share's state, and Stop DELETEs the WHIP resource."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser_viewer import CHROMIUM, CHROMIUM_ARGS
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt install chromium)")
    args = CHROMIUM_ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    plain, _, plain_renderer = _studio(None)
    srv, _, renderer = _studio(fake_whip)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, timeout=20_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(20_000)
                page.goto(f"http://127.0.0.1:{plain.port}/")
                page.wait_for_function("() => document.getElementById('room-why').textContent.length > 0")
                assert page.is_disabled("#room") and "whip.endpoint" in page.text_content("#room-why")

                page.goto(f"http://127.0.0.1:{srv.port}/")
                page.wait_for_function("() => !document.getElementById('room').disabled")
                page.check("#room")
                page.click("#start")
                page.wait_for_selector("#room-line:not([hidden])")
                assert page.text_content("#room-link") == VIEWER_URL
                page.wait_for_function(
                    "() => document.querySelector('#stats td[data-key=\"share_state\"]').textContent === 'publishing'")
                deadline = time.monotonic() + 30
                while len(fake_whip.slots) < 25 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert len(fake_whip.slots) >= 25, "the shared session sent no frames to the WHIP server"
                page.click("#stop")
                deadline = time.monotonic() + 20
                while not fake_whip.deleted and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                browser.close()
    finally:
        srv.stop()
        renderer.stop()
        plain.stop()
        plain_renderer.stop()
    assert fake_whip.deleted == ["/whip/resource/1"] and fake_whip.sessions == 0


def test_a_room_share_that_cannot_open_is_a_status_line_and_never_raises():
    """RoomShare alone: the build/open failure happens on its own thread and becomes `share_state`;
    writes before and after it go nowhere (counted), and close is clean and idempotent."""
    import numpy as np

    from stream.whip import RoomShare, WhipError

    def make():
        raise WhipError("WHIP endpoint http://x/whip refused the token (HTTP 401: Unauthorized)", hint="set whip.token")

    share = RoomShare(make, viewer_url=VIEWER_URL)
    share.open(224, 224, 25, 16000)
    frame, audio = np.zeros((224, 224, 3), np.uint8), np.zeros(640, np.float32)
    deadline = time.monotonic() + 10
    while share.state == "connecting" and time.monotonic() < deadline:
        share.write(frame, audio, 0)
        time.sleep(0.01)
    share.write(frame, audio, 1)
    assert share.status()["share_state"] == "error: WHIP endpoint http://x/whip refused the token (HTTP 401: Unauthorized)"
    assert share.status()["share_viewer_url"] == VIEWER_URL and share.status()["share_unsent"] >= 1
    share.close()
    share.close()
    assert share.state.startswith("error: ")


def test_closing_a_room_share_while_it_opens_leaves_nothing_published():
    """A session stopped while its share is still connecting: the sink that opens late is closed at once."""
    import threading

    from stream.whip import RoomShare

    release, closed = threading.Event(), []

    class SlowSink:
        def open(self, *args):
            release.wait(5)

        def write(self, *args):
            raise AssertionError("nothing is written after close")

        def close(self):
            closed.append(True)

    share = RoomShare(SlowSink, open_timeout_s=10)
    share.open(224, 224, 25, 16000)
    closer = threading.Thread(target=share.close)
    closer.start()
    time.sleep(0.1)
    release.set()
    closer.join(10)
    assert closed == [True] and share.state == "stopped"
