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
    return start_studio(overrides=overrides)


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
