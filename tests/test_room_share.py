"""The studio's "share to room": a session also published by WHIP, through its own sinks (`RoomShare`).

Against `tests/whip_server.py` (a minimal WHIP server on 127.0.0.1; no Janus, no root): what the page
is told (`GET /room`), one presenter per room (409), a refused token as the session's one-line share
state while its own viewer keeps receiving, and the WHIP resource DELETEd when the session stops; the
share switched on, off and on again on a running session (POST, DELETE, POST at the WHIP server; its own
viewer loses no slot at the toggles; the room rules and owner-only switch; the page's checkbox in
Chromium; `FanOutSink.add`/`remove` under a writing thread). Through a real Janus (a test-made netns,
tests/janus_support.py): the same toggles seen by VideoRoom subscribers; a session shared from its
start is in tests/test_whip.py.
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


async def _share(srv, session: dict, on: bool, secret: str | None = None) -> tuple[int, dict]:
    return await http("POST", base(srv) + f"sessions/{session['id']}/share",
                      json={"secret": session["secret"] if secret is None else secret, "on": on})


async def _watch_view(srv, session: dict):
    """A light view-only peer of the session (its share link's key): slots counted from RTP timestamps
    (bench.slot_truth.RtpSlots, nothing decoded), the session's own viewer as its owner sees it."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from bench.slot_truth import RtpSlots
    from stream.webrtc import use_host_addresses
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    slots = RtpSlots(stamped=False)
    slots.attach(pc)
    use_host_addresses(pc, ["127.0.0.1"])
    await pc.setLocalDescription(await pc.createOffer())
    status, answer = await http("POST", base(srv) + f"sessions/{session['id']}/view",
                                json={"sdp": pc.localDescription.sdp, "type": "offer", "view": session["view"]})
    assert status == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc, slots


def _slot_at(slots, instant: float) -> int | None:
    """The video slot whose first packet arrived nearest `instant` (time.monotonic())."""
    best = min(slots.video, key=lambda p: abs(p[3] - instant), default=None)
    return None if best is None else slots.video_slot(best[1])


def test_sharing_goes_on_and_off_the_air_on_a_running_session_without_a_gap_for_its_viewer(fake_whip):
    """On, off, on while the session runs: the WHIP server sees POST, DELETE, POST (a new resource), the
    room is free while off, the share's counters start again per share (`share_count` carries), and
    the session's own view-only viewer gets every slot in order throughout, the toggles included."""
    srv, _, renderer = _studio(fake_whip)
    try:
        async def body():
            owner = Client(srv)
            status, created = await owner.create()
            assert status == 201 and "room" not in created
            await owner.connect()
            await owner.wait_frames()
            pc, slots = await _watch_view(srv, created)
            try:
                await _until(lambda: _async(len(slots.video_slots()) >= 25), 30, "the viewer's first second")
                toggles = []
                status, reply = await _share(srv, created, True)
                toggles.append(time.monotonic())
                assert status == 200 and reply == {"share": True, "room": {"viewer_url": VIEWER_URL}}
                assert (await http("GET", base(srv) + "room"))[1]["presenter"] == created["id"]
                await _until(lambda: _async(len(fake_whip.slots) >= 25), 30, "25 shared frames")
                stats = await _stats(srv, owner)
                assert stats["share_state"] == "publishing" and stats["share_count"] == 1

                status, reply = await _share(srv, created, False)
                toggles.append(time.monotonic())
                assert status == 200 and reply == {"share": False}
                assert fake_whip.deleted == ["/whip/resource/1"] and fake_whip.sessions == 0
                assert (await http("GET", base(srv) + "room"))[1]["presenter"] is None
                stats = await _stats(srv, owner)
                assert stats["share_state"] == "off" and stats["share_count"] == 1
                assert (await _share(srv, created, False))[0] == 200      # idempotent
                await asyncio.sleep(0.5)      # a frame the fake server was still decoding at the DELETE
                shared_before = len(fake_whip.slots)
                await asyncio.sleep(1.0)
                assert len(fake_whip.slots) == shared_before               # nothing goes out while off
                assert [r[:2] for r in fake_whip.requests] == [("POST", "/whip"), ("DELETE", "/whip/resource/1")]

                status, reply = await _share(srv, created, True)
                toggles.append(time.monotonic())
                assert status == 200 and reply["share"] is True
                await _until(lambda: _async(len(fake_whip.slots) >= shared_before + 25), 30,
                             "25 frames of the second share")
                stats = await _stats(srv, owner)
                assert stats["share_state"] == "publishing" and stats["share_count"] == 2
                assert stats["share_connects"] == 1                         # the new share's own count
                await asyncio.sleep(1.0)                                   # a second past the last toggle
            finally:
                await pc.close()
            status, _ = await http("POST", base(srv) + f"sessions/{created['id']}/stop",
                                   json={"secret": created["secret"]})
            assert status == 200
            await owner.close()
            return slots, toggles
        slots, toggles = run(body())
    finally:
        srv.stop()
        renderer.stop()
    assert [r[:2] for r in fake_whip.requests] == [
        ("POST", "/whip"), ("DELETE", "/whip/resource/1"), ("POST", "/whip"),
        ("DELETE", "/whip/resource/2")]
    assert fake_whip.deleted == ["/whip/resource/1", "/whip/resource/2"] and fake_whip.sessions == 0
    got = slots.video_slots()
    assert got == sorted(set(got)), "the viewer's slots went out of order"
    missing = sorted(set(range(got[0], got[-1] + 1)) - set(got))
    assert len(got) >= 100, len(got)
    for instant in toggles:       # no slot lost within half a second either side of a toggle
        k = _slot_at(slots, instant)
        assert k is not None and not [m for m in missing if abs(m - k) <= 12], (k, missing)
    if len(missing) > 0.01 * len(got):   # far from every toggle: the box's load, not the switch
        pytest.skip(f"machine too busy to judge coverage: {len(missing)} of {len(got) + len(missing)} slots "
                    f"missing at the viewer, none within 12 slots of a toggle")


def test_the_share_switch_follows_the_room_rules_and_is_the_owners(fake_whip):
    """One presenter: another session's switch is 409 naming it; only the owner's secret turns it (a
    view key or a wrong secret: 403, as for the other owner routes); a malformed body is 400."""
    srv, _, renderer = _studio(fake_whip)
    try:
        async def body():
            status, first = await Client(srv).create(share=True)
            assert status == 201
            status, second = await Client(srv).create()
            assert status == 201
            status, refused = await _share(srv, second, True)
            assert status == 409
            assert refused["error"].startswith(f"the room already has a presenter: session {first['id']}")
            assert (await _share(srv, first, False, secret=first["view"]))[0] == 403
            assert (await _share(srv, first, False, secret="wrong"))[0] == 403
            status, reply = await http("POST", base(srv) + f"sessions/{first['id']}/share",
                                       json={"secret": first["secret"], "on": "yes"})
            assert status == 400 and "on" in reply["error"]
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] == first["id"]
            # a session not connected yet: the switch is remembered for its start; off frees the room
            assert (await _share(srv, first, False)) == (200, {"share": False})
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] is None
            status, reply = await _share(srv, second, True)
            assert status == 200 and reply["share"] is True
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] == second["id"]
        run(body())
    finally:
        srv.stop()
        renderer.stop()
    assert not fake_whip.requests        # neither session ever ran: nothing was published


def test_without_a_whip_endpoint_the_share_switch_is_400_with_the_reason():
    srv, _, renderer = _studio(None)
    try:
        async def body():
            status, created = await Client(srv).create()
            assert status == 201
            status, reply = await _share(srv, created, True)
            assert status == 400 and reply["error"].startswith("cannot share to the room: ")
            assert "whip.endpoint" in reply["error"] and "\n" not in reply["error"]
        run(body())
    finally:
        srv.stop()
        renderer.stop()


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


@pytest.mark.integration
def test_the_studio_pages_checkbox_takes_a_running_session_on_and_off_the_air(fake_whip):
    """In headless Chromium (fake microphone): Start without sharing, then tick the checkbox: the session
    publishes (the WHIP server gets its frames), the page shows the room's viewer URL line and the
    share's state; untick it: the resource is DELETEd, the line hidden, the state "off", and the
    session's own video goes on."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser_viewer import CHROMIUM, CHROMIUM_ARGS
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt install chromium)")
    args = CHROMIUM_ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    srv, _, renderer = _studio(fake_whip)

    def wait(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert condition(), f"timed out waiting for {what}"

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, timeout=20_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{srv.port}/")
                page.wait_for_function("() => !document.getElementById('room').disabled")
                page.click("#start")
                page.wait_for_function("() => Number(document.querySelector("
                                       "'#stats td[data-key=\"frames_out\"]').textContent) > 0")
                assert page.is_hidden("#room-line") and not fake_whip.requests

                page.click("#room")                                  # on air
                page.wait_for_selector("#room-line:not([hidden])")
                assert page.text_content("#room-link") == VIEWER_URL and page.is_checked("#room")
                page.wait_for_function(
                    "() => document.querySelector('#stats td[data-key=\"share_state\"]').textContent === 'publishing'")
                wait(lambda: len(fake_whip.slots) >= 25, 30, "25 shared frames at the WHIP server")

                page.click("#room")                                  # off the air
                page.wait_for_selector("#room-line", state="hidden")
                assert fake_whip.deleted == ["/whip/resource/1"] and not page.is_checked("#room")
                page.wait_for_function(
                    "() => document.querySelector('#stats td[data-key=\"share_state\"]').textContent === 'off'")
                frames = int(page.text_content('#stats td[data-key="frames_out"]'))
                page.wait_for_function("n => Number(document.querySelector("
                                       "'#stats td[data-key=\"frames_out\"]').textContent) > n + 25", arg=frames)
                page.click("#stop")
            finally:
                browser.close()
    finally:
        srv.stop()
        renderer.stop()
    assert [r[:2] for r in fake_whip.requests] == [("POST", "/whip"), ("DELETE", "/whip/resource/1")]



@pytest.mark.integration
def test_a_running_session_goes_on_off_and_on_the_air_through_janus(janus_stack):
    """Through the real stack: a running studio session switched on appears in the VideoRoom and a
    subscriber gets its slots in order; switched off, the room loses its publisher (the WHIP resource
    was DELETEd); switched on again, a re-joining subscriber sees it anew."""
    from tests.janus_support import LightSubscriber, coverage
    stack = janus_stack
    srv, _, renderer = start_studio(overrides={
        "whip.endpoint": stack.whip_url, "whip.token": stack.token, "whip.viewer_url": VIEWER_URL,
        "server.ice_host_addresses": [stack.host_address]}, lost_timeout_s=20.0)
    owner = Client(srv)

    async def publishers(want: bool) -> None:
        loop = asyncio.get_running_loop()

        async def seen():
            return bool(await loop.run_in_executor(None, stack.publishers)) == want
        await _until(seen, 20, "the room to " + ("have" if want else "lose") + " its publisher")

    async def watch(seconds: float):
        subscriber = LightSubscriber(stack.janus_url, (stack.host_address,), stamped=False)
        try:
            await subscriber.start()
            await asyncio.sleep(seconds)
        finally:
            await subscriber.stop()
        return subscriber.slots

    async def body():
        status, created = await owner.create()
        assert status == 201
        await owner.connect()
        await owner.wait_frames()
        runs = []
        for on in (True, False, True):
            status, reply = await _share(srv, created, on)
            assert status == 200 and reply["share"] is on
            await publishers(on)
            if on:
                runs.append(await watch(4.0))
        stats = await _stats(srv, owner)
        assert stats["share_state"] == "publishing" and stats["share_count"] == 2
        status, _ = await http("POST", base(srv) + f"sessions/{created['id']}/stop",
                               json={"secret": created["secret"]})
        assert status == 200
        await owner.close()
        await publishers(False)
        return runs

    try:
        runs = run(body(), timeout=150)
    finally:
        srv.stop()
        renderer.stop()
    for slots in runs:            # each share, as a subscriber that joined it sees it
        got = slots.video_slots()
        share, span = coverage(got)
        assert span >= 50 and share >= 0.99 and got == sorted(set(got)), (share, span, got[:10], got[-10:])


def test_fan_out_sinks_come_and_go_while_another_thread_writes():
    """FanOutSink.add/remove from one thread while another writes 400 slots: the sink that stays gets
    every slot once, in order; a sink added gets a contiguous run from the next slot on; after
    `remove` returns, it gets no write."""
    import threading

    import numpy as np

    from stream.sinks import FanOutSink

    class Recorder:
        def __init__(self) -> None:
            self.got: list[int] = []
            self.opened = self.closed = 0
            self.removed = False

        def open(self, *args) -> None:
            self.opened += 1

        def write(self, frame, audio, k: int) -> None:
            assert not self.removed, "a write after remove returned"
            self.got.append(k)
            time.sleep(0.0005)

        def close(self) -> None:
            self.closed += 1

    stays = Recorder()
    fan = FanOutSink([stays])
    fan.open(8, 8, 25, 16000)
    frame, audio = np.zeros((8, 8, 3), np.uint8), np.zeros(640, np.float32)
    done = threading.Event()

    def writer() -> None:
        for k in range(400):
            fan.write(frame, audio, k)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    visitors = []
    while not done.is_set():
        visitor = Recorder()
        assert fan.add(visitor) and visitor.opened == 1
        time.sleep(0.005)
        assert fan.remove(visitor)
        visitor.removed = True
        visitors.append(visitor)
    thread.join(10)
    fan.close()
    assert stays.got == list(range(400)) and stays.closed == 1
    assert len(visitors) >= 3
    for v in visitors:
        assert v.got == list(range(v.got[0], v.got[0] + len(v.got))) if v.got else True
        assert v.closed == 0                   # remove does not close: its caller does
    late = Recorder()
    assert not fan.add(late) and late.closed == 1   # added after close: closed at once


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


def test_a_share_switched_on_while_its_session_stops_leaves_the_room_free(fake_whip):
    """Review finding: POST …/share {on: true} whose body is still arriving when the session is stopped
    took the room for the ended session (the presenter was set after the lookup's await), so every other
    session's share was 409 until the server restarted. Now it is a 404 and the room stays free."""
    srv, _, renderer = _studio(fake_whip)
    try:
        async def body():
            status, first = await Client(srv).create()
            assert status == 201
            status, second = await Client(srv).create()
            assert status == 201
            sent_head, stopped = asyncio.Event(), asyncio.Event()

            async def slow_body():
                yield b'{"secret": "' + first["secret"].encode()
                sent_head.set()
                await stopped.wait()
                yield b'", "on": true}'

            share = asyncio.ensure_future(http("POST", base(srv) + f"sessions/{first['id']}/share",
                                               data=slow_body(), headers={"Content-Type": "application/json"}))
            await asyncio.wait_for(sent_head.wait(), 10)
            await asyncio.sleep(0.3)          # the server is inside the body read
            status, _ = await http("POST", base(srv) + f"sessions/{first['id']}/stop",
                                   json={"secret": first["secret"]})
            assert status == 200
            stopped.set()
            status, reply = await asyncio.wait_for(share, 10)
            assert status == 404 and "\n" not in reply["error"]
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] is None
            status, reply = await _share(srv, second, True)
            assert status == 200 and reply["share"] is True
        run(body())
    finally:
        srv.stop()
        renderer.stop()


class _ToggleRuntime:
    """A started session's runtime whose `set_share` calls each block until their gate is set (a WHIP
    open or DELETE taking seconds); `applied` lists what each call set."""

    def __init__(self) -> None:
        import threading
        self.gates = [threading.Event(), threading.Event()]
        self.entered = [threading.Event(), threading.Event()]
        self.applied: list[bool] = []
        self._calls = 0

    def start(self, *args, **kwargs) -> None:
        pass

    def set_share(self, on: bool) -> bool:
        call, self._calls = self._calls, self._calls + 1
        if call < len(self.gates):
            self.entered[call].set()
            self.gates[call].wait(10)
        self.applied.append(on)
        return on

    def idle_s(self) -> float:
        return 0.0

    def stats(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


class _ToggleFactory:
    def __init__(self) -> None:
        self.runtime = _ToggleRuntime()

    def create(self, photo, name):
        return self.runtime

    def stats(self) -> dict:
        return {}

    def room(self) -> dict:
        return {"enabled": True, "reason": None, "viewer_url": VIEWER_URL}


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_two_share_switches_at_once_end_in_the_last_ones_state(first, second):
    """Review finding: a switch that arrived while the previous one was still applying (a WHIP open or
    DELETE takes seconds) was lost — on then off left the session on the air and the room taken, with
    the off answered {"share": true}; off then on was 409 naming the session itself as the presenter.
    Now the second switch wins, in its reply, in the runtime and in the room."""
    from stream.studio.server import StudioServer

    factory = _ToggleFactory()
    srv = StudioServer(factory, port=0, ice_host_addresses=["127.0.0.1"], connect_timeout_s=60)
    srv.start()
    try:
        async def body():
            status, created = await Client(srv).create()
            assert status == 201
            srv._sessions[created["id"]].started = True          # as after its offer
            srv._sessions[created["id"]].share = not first
            if not first:
                srv._presenter = created["id"]
            one = asyncio.ensure_future(_share(srv, created, first))
            loop, rt = asyncio.get_running_loop(), factory.runtime
            assert await loop.run_in_executor(None, rt.entered[0].wait, 10)
            two = asyncio.ensure_future(_share(srv, created, second))
            await asyncio.sleep(0.3)                              # the second waits for the first
            rt.gates[0].set()
            await asyncio.wait_for(one, 10)
            assert await loop.run_in_executor(None, rt.entered[1].wait, 10)
            # between the two: the session is on the air (first: on) or its off is not done yet, or
            # it is going on again (second: on): either way the room is still its
            assert (await http("GET", base(srv) + "room"))[1]["presenter"] == created["id"]
            rt.gates[1].set()
            status, reply = await asyncio.wait_for(two, 10)
            assert status == 200 and reply["share"] is second
            assert rt.applied == [first, second]
            room = (await http("GET", base(srv) + "room"))[1]
            assert room["presenter"] == (created["id"] if second else None)
        run(body())
    finally:
        srv.stop()
