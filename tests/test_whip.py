"""Publishing by WHIP into a real Janus (VideoRoom) behind Debian's simple-whip-server, on this machine.

The stack (tests/janus_support.py) is started once for the module with a generated config; each slot
is identified by its index drawn in the frame's pixels, so a subscriber can tell which slots reached
it, in which order. Waits are bounded; nothing here asserts a duration (bench/whip.py measures them).
"""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from stream.whip import WhipError, WhipSink, whip_sink_from_config
from tests.janus_support import (JanusStack, PatternFeeder, VideoRoomSubscriber, coverage, draw_slot, frame_slot,
                                 missing_reason, read_slot)

SUBSCRIBERS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    janus = JanusStack(tmp_path_factory.mktemp("janus"))
    janus.start()          # stops what it started (namespace included) if it fails
    try:
        yield janus
    finally:
        janus.stop()       # processes, then the namespace and its veth pair


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _publish(stack: JanusStack) -> tuple[WhipSink, PatternFeeder]:
    sink = WhipSink(stack.whip_url, stack.token, ice_host_addresses=[stack.host_address])
    sink.open(224, 224, 25, 16000)
    return sink, PatternFeeder(sink).start()


async def _watch(stack: JanusStack, n: int, seconds: float, keep=frame_slot) -> list[VideoRoomSubscriber]:
    """`n` subscribers for `seconds`; each keeps `keep(frame)` per video frame (the slot drawn in its pixels)."""
    subscribers = [VideoRoomSubscriber(stack.janus_url, (stack.host_address,), keep=keep) for _ in range(n)]
    try:
        await asyncio.gather(*(s.start() for s in subscribers))
        await asyncio.sleep(seconds)
    finally:
        await asyncio.gather(*(s.stop() for s in subscribers), return_exceptions=True)
    return subscribers


# ---------------------------------------------------------------------------- no server needed
def test_slot_index_survives_the_round_trip_through_pixels():
    for k in (0, 1, 77, 4095, 65535):
        assert read_slot(draw_slot(k)) == k


def test_endpoint_must_be_an_http_url():
    with pytest.raises(WhipError) as err:
        WhipSink("janus:1234")
    assert "not an http(s) URL" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as sock:       # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = WhipSink(f"http://127.0.0.1:{port}/whip/endpoint/x", "t", connect_timeout_s=3)
    with pytest.raises(WhipError) as err:
        sink.open(224, 224, 25, 16000)
    message = str(err.value)
    assert "cannot reach WHIP endpoint" in message and str(port) in message and "\n" not in message
    assert sink._thread is None         # the publisher's thread was stopped with the error


def test_out_whip_without_an_endpoint_says_which_key():
    class Whip:
        endpoint, token = None, None

    class Server:
        stun_url = turn_url = turn_username = turn_credential = None
        ice_host_addresses = ()

    with pytest.raises(WhipError) as err:
        whip_sink_from_config(Whip(), Server())
    assert "whip.endpoint" in err.value.hint


def test_without_network_namespaces_the_janus_tests_skip_with_the_reason(monkeypatch):
    import tests.janus_support as support

    def refused(*args, check=True):
        raise RuntimeError("ip netns add failed: mount --make-shared /run/netns failed: Operation not permitted")
    monkeypatch.setattr(support, "_ip", refused)
    reason = support.netns_missing_reason()
    assert reason.startswith("cannot create a network namespace with a veth pair for Janus (needs root)")
    assert "Operation not permitted" in reason and "\n" not in reason


def _netns_or_skip():
    from tests.janus_support import netns_missing_reason
    reason = netns_missing_reason()
    if reason:
        pytest.skip(reason)


def test_the_namespace_reaches_only_our_veth_address_and_is_removed():
    """What the Janus fixture's namespace is: lo and one veth end, a /30 route, no default route, the
    host side answering; gone (with the pair) after delete; stale ones of dead runs are cleaned up."""
    import subprocess
    import sys

    from tests.janus_support import TestNetns
    _netns_or_skip()
    ns = TestNetns().create()
    try:
        inside = lambda *a: subprocess.run(ns.command(*a), capture_output=True, text=True, timeout=10)  # noqa: E731
        links = inside("ip", "-o", "link", "show").stdout
        assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == ["lo", ns.ns_if]
        routes = inside("ip", "-4", "route", "show").stdout
        assert "default" not in routes and routes.strip().startswith(ns.ns_address.rsplit(".", 1)[0])
        with socket.socket() as server:          # our side answers from inside (TCP connect)
            server.bind((ns.host_address, 0))
            server.listen(1)
            probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()"
            assert inside(sys.executable, "-c", probe, ns.host_address, str(server.getsockname()[1])).returncode == 0
        # anything else has no route from inside (the kernel refuses before a packet exists)
        probe = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('192.0.2.1', 9))"
        unreachable = inside(sys.executable, "-c", probe)
        assert unreachable.returncode != 0 and "Network is unreachable" in unreachable.stderr
    finally:
        ns.delete()
    assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", ns.host_if], capture_output=True).returncode != 0

    stale = TestNetns()
    stale.name = f"{TestNetns.PREFIX}999999999-dead"     # no such pid
    subprocess.run(["ip", "netns", "add", stale.name], check=True, timeout=10)
    assert stale.name in TestNetns.remove_stale()
    assert stale.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# ---------------------------------------------------------------------------- a minimal WHIP server (no Janus)
@pytest.fixture
def fake_whip():
    from tests.whip_server import FakeWhipServer
    server = FakeWhipServer().start()
    yield server
    server.stop()


def test_publishes_with_the_token_and_deletes_its_resource_on_close(fake_whip):
    sink = WhipSink(fake_whip.url, "good", ice_host_addresses=["127.0.0.1"])
    sink.open(224, 224, 25, 16000)
    feeder = PatternFeeder(sink).start()
    try:
        _wait(lambda: len(fake_whip.slots) >= 75, 30, "75 frames at the server")
    finally:
        feeder.stop()
        sink.close()
    method, path, headers = fake_whip.requests[0]
    assert (method, path) == ("POST", "/whip")
    assert headers["Authorization"] == "Bearer good" and headers["Content-Type"] == "application/sdp"
    assert sink.resource is None and fake_whip.deleted == ["/whip/resource/1"] and fake_whip.sessions == 0
    share, span = coverage(fake_whip.slots)
    assert fake_whip.slots[0] <= 5 and share >= 0.99, (fake_whip.slots[:5], share, span)
    assert fake_whip.audio_frames >= 0.95 * len(fake_whip.slots)


def test_a_refused_token_is_one_line(fake_whip):
    sink = WhipSink(fake_whip.url, "bad", ice_host_addresses=["127.0.0.1"])
    with pytest.raises(WhipError) as err:
        sink.open(224, 224, 25, 16000)
    assert "refused the token (HTTP 401: Unauthorized)" in str(err.value) and "\n" not in str(err.value)


def test_reconnects_when_the_server_forgets_the_session(fake_whip):
    sink = WhipSink(fake_whip.url, "good", ice_host_addresses=["127.0.0.1"])
    sink.open(224, 224, 25, 16000)
    feeder = PatternFeeder(sink).start()
    try:
        _wait(lambda: len(fake_whip.slots) >= 10, 30, "the first frames")
        fake_whip.drop_all()
        _wait(lambda: sink.connects == 2 and sink.connected, 30, "the publisher to reconnect")
        before = len(fake_whip.slots)
        _wait(lambda: len(fake_whip.slots) >= before + 25, 30, "frames on the new connection")
    finally:
        feeder.stop()
        sink.close()
    posts = [r for r in fake_whip.requests if r[0] == "POST"]
    assert len(posts) == 2 and all(r[2]["Authorization"] == "Bearer good" for r in posts)
    assert ("DELETE", "/whip/resource/1") in [r[:2] for r in fake_whip.requests]   # the forgotten one, best effort
    assert fake_whip.deleted == ["/whip/resource/2"]                                 # the live one, on close
    assert fake_whip.slots[-1] > fake_whip.slots[0]                                  # the slots went on in order


# ---------------------------------------------------------------------------- through Janus
@pytest.mark.integration
def test_subscribers_receive_every_slot_in_order(stack):
    sink, feeder = _publish(stack)
    try:
        _wait(lambda: stack.publishers(), 10, "the publisher to appear in the room")
        subscribers = asyncio.run(_watch(stack, SUBSCRIBERS, 5.0))
    finally:
        feeder.stop()
        sink.close()
    for sub in subscribers:
        share, span = coverage(sub.frames)
        assert span >= 60, f"a subscriber saw only {span} slots"
        assert share >= 0.99, f"a subscriber received {share:.1%} of {span} slots"
        assert sub.frames == sorted(set(sub.frames))           # in order, none twice
        assert sub.audio_frames >= 0.95 * len(sub.frames)       # one 40 ms audio frame per slot
    assert sink.connects == 1 and sink.dropped <= 2
    # close() DELETEd the WHIP resource: Janus drops the publisher from the room
    _wait(lambda: not stack.publishers(), 10, "the publisher to leave the room after close")


@pytest.mark.integration
def test_wrong_token_is_one_line(stack):
    sink = WhipSink(stack.whip_url, "not-" + stack.token, ice_host_addresses=[stack.host_address])
    with pytest.raises(WhipError) as err:
        sink.open(224, 224, 25, 16000)
    message = str(err.value)
    assert "refused the token" in message and "\n" not in message
    assert "whip.token" in err.value.hint
    assert not stack.publishers()


@pytest.mark.integration
def test_wrong_endpoint_is_one_line(stack):
    sink = WhipSink(stack.whip_url.replace("/avatar", "/nobody"), stack.token, ice_host_addresses=[stack.host_address])
    with pytest.raises(WhipError) as err:
        sink.open(224, 224, 25, 16000)
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.integration
def test_publisher_comes_back_after_a_janus_restart(stack):
    sink, feeder = _publish(stack)
    try:
        _wait(lambda: stack.publishers(), 10, "the publisher to appear in the room")
        stack.restart_janus()
        _wait(lambda: sink.connects >= 2 and sink.connected, 30, "the publisher to reconnect")
        _wait(lambda: stack.publishers(), 10, "the publisher to be back in the room")
        subscribers = asyncio.run(_watch(stack, 1, 3.0))   # a viewer re-joining after the restart
    finally:
        feeder.stop()
        sink.close()
    share, span = coverage(subscribers[0].frames)
    assert span >= 30 and share >= 0.95, (share, span)


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.integration
def test_room_page_plays_the_published_stream_with_stats(stack):
    """stream/web/room.html in headless Chromium joins the VideoRoom through Janus's HTTP API (CORS,
    plain fetch + SDP), plays the avatar and shows the session's stats with its own received numbers."""
    import os
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt install chromium)")
    from playwright.sync_api import sync_playwright

    from stream.webrtc import WebRTCServer
    from tests.test_browser_viewer import CHROMIUM_ARGS

    srv = WebRTCServer(port=0, stats=lambda: {"latency_ms_median": 187.5})
    srv.start()
    sink, feeder = _publish(stack)
    try:
        _wait(lambda: stack.publishers(), 10, "the publisher to appear in the room")
        with sync_playwright() as pw:
            # no name lookups at all (Chromium's background services ask for google.com names otherwise):
            # the page and Janus are addressed by IP
            args = CHROMIUM_ARGS + [f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, "
                                    f"EXCLUDE {stack.janus_url.split('/')[2].split(':')[0]}"]
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, timeout=20_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(15_000)
                page.goto(f"http://127.0.0.1:{srv.port}/static/room.html?janus={stack.janus_url}&room=1234")
                page.wait_for_function("() => document.getElementById('video').videoWidth === 224")
                t0 = page.evaluate("document.getElementById('video').currentTime")
                page.wait_for_function(f"() => document.getElementById('video').currentTime > {t0} + 0.5")
                assert page.evaluate("document.getElementById('video').srcObject.getAudioTracks().length") == 1
                assert page.evaluate("document.getElementById('status').textContent").startswith("live")
                page.wait_for_function(
                    "() => document.querySelector('#stats td[data-key=\"latency_ms_median\"]')?.textContent === '187.5'")
                page.wait_for_function(
                    "() => Number(document.querySelector('#stats td[data-key=\"viewer_frames_decoded\"]')?.textContent) > 10")
            finally:
                browser.close()
    finally:
        feeder.stop()
        sink.close()
        srv.stop()



class _Instant:
    """Stand-in generator (no networks): a grey frame per mel window, instantly."""

    def render(self, mel_windows, pose_codes=None, times=None):
        import numpy as np
        return np.full((len(mel_windows), 224, 224, 3), 96, np.uint8)


class _SlotStamp:
    """Wraps the session's outputs: each slot's index drawn into its frame (tests.janus_support.draw_slot)."""

    written = 0      # slots written by the newest instance (the tests run one session at a time)

    def __init__(self, inner) -> None:
        self.inner = inner
        _SlotStamp.written = 0

    def open(self, width, height, fps, sample_rate):
        self.inner.open(width, height, fps, sample_rate)

    def write(self, frame, audio, frame_index):
        self.inner.write(draw_slot(frame_index, frame.shape[0]), audio, frame_index)
        _SlotStamp.written += 1

    def close(self):
        self.inner.close()


def _session(stack: JanusStack, token: str, seconds: float):
    import numpy as np

    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.session import RunOptions, SessionBuilder
    config = load_config(None, {"output.targets": ["whip"], "whip.endpoint": stack.whip_url, "whip.token": token,
                                "server.ice_host_addresses": [stack.host_address], "pose.source": "still"})
    run = RunOptions(realtime=True, max_seconds=seconds, status_interval_s=0)
    return SessionBuilder(config, run, wrap_sink=_SlotStamp,
                          avatar=(_Instant(), np.full((224, 224, 3), 96, np.uint8))).build()


@pytest.mark.integration
def test_a_session_with_out_whip_reaches_a_subscriber(stack):
    """The config → session → sink path: `output.targets = ["whip"]` and [whip] keys publish the run."""
    import threading
    box: dict = {}

    def run() -> None:
        # 9 s of session, 4.5 s watched: room for a subscriber's slow join on a busy machine (the
        # bounds below are unchanged)
        with _session(stack, stack.token, 9.0) as session:
            box["summary"] = session.run()

    runner = threading.Thread(target=run)
    runner.start()
    try:
        _wait(lambda: _SlotStamp.written > 0 or not runner.is_alive(), 60, "the session to write its first slot")
        subscribers = asyncio.run(_watch(stack, 1, 4.5))
    finally:
        runner.join(30)
    assert box["summary"].frames_out >= 120
    share, span = coverage(subscribers[0].frames)
    assert span >= 50 and share >= 0.99, (share, span)
    _wait(lambda: not stack.publishers(), 10, "the session's publisher to leave the room")


@pytest.mark.integration
def test_a_session_with_a_wrong_token_is_one_error_line(stack):
    """What the entry point prints for it: one `error:` line and a `hint:`, exit code 2."""
    import io

    from pcavs_live.cli.errors import run_with_user_errors

    def body() -> int:
        with _session(stack, "wrong", 2.0) as session:
            session.run()
        return 0

    err = io.StringIO()
    assert run_with_user_errors(body, debug=False, stderr=err) == 2
    lines = err.getvalue().splitlines()
    assert [line[:6] for line in lines] == ["error:", "hint: "], lines
    assert "refused the token" in lines[0] and stack.whip_url in lines[0] and "whip.token" in lines[1]


@pytest.mark.integration
def test_a_studio_session_shared_to_the_room_reaches_a_subscriber_and_its_stop_unpublishes(stack):
    """The studio's "share to room" through the real stack: the session's slots reach a VideoRoom
    subscriber in order (by media timestamp: one 3600-tick step per 40 ms slot), and stopping the
    session DELETEs its WHIP resource, so the room loses its publisher."""
    from tests.studio_support import Client, base, http, start_studio

    srv, _, renderer = start_studio(overrides={
        "whip.endpoint": stack.whip_url, "whip.token": stack.token,
        "whip.viewer_url": f"http://127.0.0.1:8080/static/room.html?janus={stack.janus_url}&room=1234",
        "server.ice_host_addresses": [stack.host_address]})
    owner = Client(srv)

    async def share_and_watch() -> list[VideoRoomSubscriber]:
        status, created = await owner.create(share=True)
        assert status == 201, created
        await owner.connect()
        await owner.wait_frames()
        deadline = time.monotonic() + 20
        while not stack.publishers() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert stack.publishers(), "the shared session did not appear in the room"
        subscribers = await _watch(stack, 1, 4.5, keep=lambda frame: round(frame.pts / 3600))
        s = owner.session
        stats = (await http("GET", base(srv) + f"sessions/{s['id']}/stats?secret={s['secret']}"))[1]
        assert stats["share_state"] == "publishing" and stats["share_connects"] == 1
        status, _ = await http("POST", base(srv) + f"sessions/{s['id']}/stop", json={"secret": s["secret"]})
        assert status == 200
        await owner.close()
        return subscribers

    try:
        subscribers = asyncio.run(asyncio.wait_for(share_and_watch(), 90))
    finally:
        srv.stop()
        renderer.stop()
    slots = subscribers[0].frames            # the slot by media timestamp: one 3600-tick step per 40 ms slot
    share, span = coverage(slots)
    assert span >= 50 and share >= 0.99, (share, span, slots[:20], slots[-20:])
    assert slots == sorted(set(slots))
    assert subscribers[0].audio_frames >= 0.95 * len(slots)
    _wait(lambda: not stack.publishers(), 10, "the shared session's publisher to leave the room")


AUDIENCE = 25
WATCH_S = 12.0


async def _watch_light(stack: JanusStack, direct_url: str, n: int, seconds: float):
    """`n` light subscribers through Janus and one light direct viewer, all for the same `seconds`."""
    from bench.slot_truth import watch_direct
    from tests.janus_support import LightSubscriber
    subscribers = [LightSubscriber(stack.janus_url, (stack.host_address,)) for _ in range(n)]
    direct_pc = None
    try:
        await asyncio.gather(*(s.start() for s in subscribers))
        direct_pc, direct = await watch_direct(direct_url, ["127.0.0.1"])
        await asyncio.sleep(seconds)
    finally:
        await asyncio.gather(*(s.stop() for s in subscribers), return_exceptions=True)
        if direct_pc is not None:
            await direct_pc.close()
    return subscribers, direct


@pytest.mark.integration
def test_an_audience_of_25_receives_every_slot_with_av_in_step_as_the_direct_viewer(stack):
    import os
    import statistics

    from stream.sinks import FanOutSink
    from stream.webrtc import WebRTCServer, WebRTCSink

    srv = WebRTCServer(port=0, ice_host_addresses=["127.0.0.1"])
    srv.start()
    whip = WhipSink(stack.whip_url, stack.token, ice_host_addresses=[stack.host_address])
    out = FanOutSink([WebRTCSink(srv), whip])
    out.open(224, 224, 25, 16000)
    feeder = PatternFeeder(out, stamped=True).start()
    load_before = os.getloadavg()[0]
    try:
        _wait(lambda: stack.publishers(), 10, "the publisher to appear in the room")
        subscribers, direct = asyncio.run(_watch_light(stack, srv.url, AUDIENCE, WATCH_S))
    finally:
        feeder.stop()
        out.close()
        srv.stop()
    rows = []
    for s in [direct] + [sub.slots for sub in subscribers]:
        share, span = coverage(s.video_slots())
        offsets = s.av_offsets_ms()
        rows.append((share, span, len(s.audio_slots()), statistics.median(offsets) if offsets else None,
                     (min(offsets), max(offsets)) if offsets else None))
    print(f"\nload {load_before:.1f} → {os.getloadavg()[0]:.1f}")
    for r in rows:
        print(r)
    assert 0
