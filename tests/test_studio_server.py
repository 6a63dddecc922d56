"""The studio server over HTTP and WebRTC on loopback, with aiortc clients sending a tone as their
microphone and the paint renderer (each avatar in its photo's colour): own face per session, keys,
share link, admission, upload checks, every way a session ends, and RSS over 100 create/stop cycles."""
from __future__ import annotations

import asyncio
import gc
import io
import os
import time

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from PIL import Image

from stream.webrtc import use_host_addresses
from tests.studio_support import LOOPBACK, Client, base, http, run, start_studio

pytestmark = pytest.mark.integration


def png(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def tinted(colour, seed: int = 0, size: int = 256) -> np.ndarray:
    """A photo in one dominant colour with texture (the stand-in detector 'finds' a face in it)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, (size, size, 3))
    return np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RED, BLUE = (200, 40, 40), (40, 60, 200)


@pytest.fixture
def studio():
    started = []

    def start(**kwargs):
        srv, paint, renderer = start_studio(**kwargs)
        started.append((srv, renderer))
        return srv, paint, renderer
    yield start
    for srv, renderer in started:
        srv.stop()
        renderer.stop()


def close_to(frame: np.ndarray, colour, tol: float = 20.0) -> bool:
    return bool(np.abs(frame.reshape(-1, 3).mean(0) - np.array(colour, float)).max() < tol)


async def wait_until(predicate, timeout: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_two_sessions_each_receive_their_own_face_and_keys_keep_them_apart(studio):
    srv, paint, renderer = studio(delay_s=0.06)   # two 60 ms renders do not fit one 40 ms slot: they batch

    async def main():
        a, b = Client(srv), Client(srv)
        assert (await a.create(png(tinted(RED, 1))))[0] == 201
        assert (await b.create(png(tinted(BLUE, 2))))[0] == 201
        await asyncio.gather(a.connect(), b.connect())
        await asyncio.gather(a.wait_frames(), b.wait_frames())
        # The first frames out can be the placeholder repeated until a render lands (at load 15 on 2
        # cores neither session had generated a frame 1 s after its first came back): wait (bounded)
        # for both sessions' own count of generated frames, then for the newest frames to arrive.
        deadline = time.monotonic() + 60
        for c in (a, b):
            while time.monotonic() < deadline:
                status, stats = await http("GET", base(srv) + f"sessions/{c.session['id']}/stats"
                                           f"?secret={c.session['secret']}")
                if status != 200 or stats["frames_generated"] > 0:
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert close_to(a.frames[-1], RED) and close_to(b.frames[-1], BLUE)
        assert a.audio_frames > 0 and b.audio_frames > 0       # each gets its own voice back
        sa, sb = a.session, b.session
        # B's key opens nothing of A's (and a share key is view-only).
        for path, method, payload in ((f"sessions/{sa['id']}/stop", "POST", {"secret": sb["secret"]}),
                                      (f"sessions/{sa['id']}/stop", "POST", {"secret": sa["view"]}),
                                      (f"sessions/{sa['id']}/offer", "POST", {"secret": sb["secret"], "sdp": "x"}),
                                      (f"sessions/{sa['id']}/view", "POST", {"view": sb["view"], "sdp": "x"})):
            status, body = await http(method, base(srv) + path, json=payload)
            assert status == 403, (path, body)
        status, _ = await http("GET", base(srv) + f"sessions/{sa['id']}/stats?secret={sb['secret']}")
        assert status == 403
        status, stats = await http("GET", base(srv) + f"sessions/{sa['id']}/stats?secret={sa['secret']}")
        assert status == 200 and stats["frames_generated"] > 0 and stats["batch_wait_ms_median"] is not None
        status, _ = await http("GET", base(srv) + "sessions/nope/stats?secret=x")
        assert status == 404
        status, srv_stats = await http("GET", base(srv) + "stats")
        assert srv_stats["sessions"] == 2 and srv_stats["renderer"]["batches"] > 0
        await asyncio.gather(a.close(), b.close())

    run(main())
    assert max(paint.calls) == 2          # the two sessions' frames did share render calls


def test_share_link_viewer_gets_that_sessions_avatar_and_voice(studio):
    srv, paint, renderer = studio()

    async def main():
        owner, other = Client(srv), Client(srv)
        await owner.create(png(tinted(RED, 3)))
        await other.create(png(tinted(BLUE, 4)))
        await asyncio.gather(owner.connect(), other.connect())
        viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        viewer.addTransceiver("video", direction="recvonly")
        viewer.addTransceiver("audio", direction="recvonly")
        got = {"video": [], "audio": 0}

        @viewer.on("track")
        def on_track(track):
            async def drain():
                while True:
                    frame = await track.recv()
                    if track.kind == "video":
                        got["video"].append(frame.to_ndarray(format="rgb24"))
                    else:
                        got["audio"] += 1
            asyncio.ensure_future(drain())

        use_host_addresses(viewer, LOOPBACK)
        await viewer.setLocalDescription(await viewer.createOffer())
        status, answer = await http("POST", base(srv) + f"sessions/{owner.session['id']}/view",
                                    json={"sdp": viewer.localDescription.sdp, "type": "offer",
                                          "view": owner.session["view"]})
        assert status == 200, answer
        await viewer.setRemoteDescription(RTCSessionDescription(**answer))
        await wait_until(lambda: len(got["video"]) > 5 and got["audio"] > 5, 20)
        assert close_to(got["video"][-1], RED)                 # the owner's face, not the other's
        _, stats = await http("GET", base(srv) + f"sessions/{owner.session['id']}/stats?view={owner.session['view']}")
        assert stats["viewers"] == 1
        await viewer.close()
        await asyncio.gather(owner.close(), other.close())

    run(main())


def test_admission_refuses_a_session_beyond_the_limit_with_the_reason(studio):
    srv, _, _ = studio(max_sessions=2)

    async def main():
        made = [await http("POST", base(srv) + "sessions?sample=1") for _ in range(3)]
        assert [s for s, _ in made] == [201, 201, 503]
        assert "studio is full" in made[2][1]["error"] and "2 of 2" in made[2][1]["error"]
        first = made[0][1]
        assert (await http("POST", base(srv) + f"sessions/{first['id']}/stop", json={"secret": first["secret"]}))[0] == 200
        assert (await http("POST", base(srv) + "sessions?sample=1"))[0] == 201   # its slot is free again

    run(main())


def test_a_studio_with_a_token_refuses_requests_without_it(studio):
    """The token guards creating sessions and the studio's own stats (sessions then use their own keys)."""
    srv, _, _ = studio(token="t0k")

    async def main():
        assert (await http("POST", base(srv) + "sessions?sample=1"))[0] == 403
        assert (await http("POST", base(srv) + "sessions?sample=1&token=wrong"))[0] == 403
        assert (await http("GET", base(srv) + "stats"))[0] == 403
        assert (await http("POST", base(srv) + "sessions?sample=1&token=t0k"))[0] == 201
        assert (await http("GET", base(srv) + "stats?token=t0k"))[0] == 200

    run(main())


@pytest.mark.parametrize("data, status, needle", [
    (b"\x89PNG" + bytes(11 * 2**20), 413, "larger than 10 MB"),
    (b"not an image at all", 400, "not an image"),
    (png(np.zeros((64, 64, 3), np.uint8) + 128), 400, "no face found"),
    (png(tinted(RED))[:300], 400, "damaged"),
    (png(np.zeros((10, 5000, 3), np.uint8)), 400, "limit is 4096x4096"),
    (b"", 400, "no photo"),
])
def test_uploads_are_checked_and_refused_with_one_line(studio, data, status, needle):
    srv, _, _ = studio()
    got, body = run(http("POST", base(srv) + "sessions", data=data))
    assert got == status and needle in body["error"] and "\n" not in body["error"], body
    assert srv.session_count == 0


def test_a_session_ends_on_stop_closed_peer_lost_audio_or_no_connection(studio):
    srv, _, renderer = studio(lost_timeout_s=1.5, connect_timeout_s=1.5)

    async def main():
        # Stop: ends at once.
        c = Client(srv)
        await c.create()
        await c.connect()
        await c.wait_frames()
        status, body = await http("POST", base(srv) + f"sessions/{c.session['id']}/stop",
                                  json={"secret": c.session["secret"]})
        assert status == 200 and body["ended"] == "stopped" and srv.session_count == 0
        await c.close()
        # A closed tab: the peer goes away.
        c = Client(srv)
        await c.create()
        await c.connect()
        await c.wait_frames()
        await c.close()
        print(f"\nclosed peer → session ended in {await wait_until(lambda: srv.session_count == 0, 10):.2f} s")
        # A lost network: the audio stops coming, the connection is not closed.
        c = Client(srv)
        await c.create()
        await c.connect()
        await c.wait_frames()
        c.tone.paused = True
        print(f"lost audio → session ended in {await wait_until(lambda: srv.session_count == 0, 10):.2f} s")
        await c.close()
        # Created, never connected.
        await http("POST", base(srv) + "sessions?sample=1")
        await wait_until(lambda: srv.session_count == 0, 10)

    run(main())
    assert renderer.sessions == 0          # every handle detached
    ended = set(srv.sessions_ended)
    assert {"stopped", "connection lost", "the browser did not connect in time"} <= ended
    # a closed peer is seen as its connection closing or its audio track ending, whichever comes first
    assert ended & {"the browser's connection closed", "the browser's audio ended"}


def test_leave_and_rejoin_cycles(studio):
    srv, _, renderer = studio()

    async def main():
        for i in range(3):
            c = Client(srv)
            await c.create(png(tinted(RED if i % 2 else BLUE, i)))
            await c.connect()
            frame = await c.wait_frames()
            assert close_to(frame, RED if i % 2 else BLUE)
            await c.close()
            await wait_until(lambda: srv.session_count == 0, 10)

    run(main())
    assert renderer.sessions == 0 and srv.sessions_created == 3


def test_100_create_stop_cycles_leave_rss_flat(studio):
    srv, _, _ = studio()
    photo = png(tinted(RED, 5))

    async def cycles(n: int):
        for _ in range(n):
            status, s = await http("POST", base(srv) + "sessions", data=photo)
            assert status == 201
            status, _ = await http("POST", base(srv) + f"sessions/{s['id']}/stop", json={"secret": s["secret"]})
            assert status == 200

    run(cycles(10))                        # warm-up: first-use allocations, caches
    gc.collect()
    before = rss_bytes()
    run(cycles(100))
    gc.collect()
    after = rss_bytes()
    print(f"\nRSS before {before / 2**20:.1f} MiB, after 100 create/stop cycles {after / 2**20:.1f} MiB "
          f"(growth {(after - before) / 2**20:+.1f} MiB)")
    assert srv.session_count == 0
    assert after - before < 20 * 2**20


def test_serve_wires_the_studio_from_the_config_with_real_networks(capsys):
    """`run_live.py serve`'s body: stand-in weights loaded once, the sample session encoded by the real
    identity encoder, admission from server.max_sessions, the room's viewer URL among the start-up
    lines ([whip]), and a clean stop."""
    import threading

    from pcavs_live.cli.config import load_config
    from pcavs_live.pipeline.studio import ServeOptions, serve
    from tests.conftest import parity_weights_dir

    room = "http://127.0.0.1:8080/static/room.html?janus=http://127.0.0.1:8088/janus&room=1234"
    config = load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)), "model.device": "cpu",
                                "server.port": 0, "server.max_sessions": 1,
                                "whip.endpoint": "http://127.0.0.1:7080/whip/endpoint/avatar", "whip.viewer_url": room})
    stop, ready = threading.Event(), []
    th = threading.Thread(target=serve, args=(config, ServeOptions(ice_host_addresses=tuple(LOOPBACK)), stop),
                          kwargs={"ready": ready.append}, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 120
        while not ready and time.monotonic() < deadline:
            time.sleep(0.1)
        srv = ready[0]
        status, body = run(http("POST", base(srv) + "sessions?sample=1"))
        assert status == 201, body
        session = srv._sessions[body["id"]].runtime
        assert session.avatar.id_map.shape == (512, 7, 7)             # a real Avatar on the loaded networks
        assert run(http("POST", base(srv) + "sessions?sample=1"))[0] == 503
        assert run(http("GET", base(srv) + "room"))[1]["viewer_url"] == room
    finally:
        stop.set()
        th.join(30)
    assert not th.is_alive()
    assert ("studio: a session can share to the room at http://127.0.0.1:7080/whip/endpoint/avatar; "
            f"room viewers open {room}") in capsys.readouterr().err.splitlines()
