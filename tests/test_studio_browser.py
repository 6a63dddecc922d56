"""The studio page in a real headless Chromium with a fake microphone (speech wav) and camera (y4m):
upload → mic + camera out → its avatar back (size, advancing time, audio energy on the return track),
while an aiortc client runs a second session with another photo; the share link plays the first
session; Stop and Start again (leave/rejoin); a closed tab ends the session. Paint renderer: each
session's frames are its own photo's colour, so a crossed stream would show."""
from __future__ import annotations

import asyncio
import fractions
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from tests.studio_support import SAMPLE, Client, encode_colour, start_studio
from tests.test_browser_viewer import CHROMIUM, CHROMIUM_ARGS, REPO
from tests.test_studio_server import BLUE, RED, close_to, png, tinted

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt install chromium)")]

SPEECH = REPO / "assets" / "sample" / "speech.wav"
INBOUND_AUDIO = """async () => {
  const report = await window.studio.pc.getStats();
  for (const s of report.values()) if (s.type === 'inbound-rtp' && s.kind === 'audio') return s;
  return null;
}"""
VIDEO_MEAN = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas'); c.width = 32; c.height = 32;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0, 32, 32);
  const d = g.getImageData(0, 0, 32, 32).data; const m = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { m[0] += d[i]; m[1] += d[i + 1]; m[2] += d[i + 2]; }
  return m.map((x) => x / (d.length / 4));
}"""


def write_y4m(path: Path, frames: int = 50) -> None:
    """A 'camera': the sample photo drifting a few pixels (Chromium loops the file)."""
    rgb = np.asarray(av.open(str(SAMPLE)).decode(video=0).__next__().to_ndarray(format="rgb24"))[:480, :480]
    with av.open(str(path), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for k in range(frames):
            shift = int(4 * np.sin(k / 8))
            img = np.ascontiguousarray(np.roll(rgb, shift, axis=1)[::2, ::2][:240, :320])
            img = np.pad(img, ((0, 240 - img.shape[0]), (0, 320 - img.shape[1]), (0, 0)))
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = k, fractions.Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_a_whole_session_from_the_page_beside_a_second_session(tmp_path):
    from playwright.sync_api import sync_playwright

    camera = tmp_path / "camera.y4m"
    write_y4m(camera)
    photo = tmp_path / "me.png"
    photo.write_bytes(png(tinted(RED, 7)))
    sample_colour = encode_colour(None, "sample")[0].colour
    srv, paint, renderer = start_studio(max_sessions=4)
    other = Client(srv)
    other_loop = asyncio.new_event_loop()
    threading.Thread(target=other_loop.run_forever, daemon=True).start()
    call = lambda coro: asyncio.run_coroutine_threadsafe(coro, other_loop).result(30)  # noqa: E731
    args = CHROMIUM_ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                            f"--use-file-for-fake-audio-capture={SPEECH}",
                            f"--use-file-for-fake-video-capture={camera}"]
    try:
        # The second session: an aiortc peer with a blue photo, sending a tone.
        call(other.create(png(tinted(BLUE, 8))))
        call(other.connect())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, timeout=20_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(20_000)
                page.goto(f"http://127.0.0.1:{srv.port}/")
                page.check("#camera")
                page.set_input_files("#file", str(photo))
                page.click("#start")
                page.wait_for_function("() => document.getElementById('video').videoWidth === 224")
                t0 = page.evaluate("document.getElementById('video').currentTime")
                page.wait_for_function(f"() => document.getElementById('video').currentTime > {t0} + 1.0")
                assert page.evaluate("document.getElementById('video').muted") is True   # no double voice
                assert close_to(np.array(page.evaluate(VIDEO_MEAN)), RED, 25)          # its own face
                # Its voice comes back (the fake mic's speech): energy on the return track.
                # (The element is muted, so Chrome's own audioLevel stays 0; WebAudio reads the track.)
                # Both counted until both are reached: at load 10 the level was there after 19 packets.
                deadline, webaudio, packets = time.monotonic() + 30, 0.0, 0
                while (webaudio <= 0.005 or packets <= 25) and time.monotonic() < deadline:
                    page.wait_for_timeout(250)
                    webaudio = max(webaudio, float(page.evaluate("window.returnAudioLevel()")))
                    packets = int((page.evaluate(INBOUND_AUDIO) or {}).get("packetsReceived") or 0)
                print(f"\nreturn audio: WebAudio RMS {webaudio:.4f}, {packets} packets received")
                assert webaudio > 0.005 and packets > 25
                session = page.evaluate("window.studio.session")
                stats_row = '#stats td[data-key="frames_out"]'
                page.wait_for_function(f"() => Number(document.querySelector('{stats_row}').textContent) > 0")
                # The camera went to the pose worker.
                owner = next(s for s in srv._sessions.values() if s.id == session["id"])
                assert owner.runtime.stats().get("pose_frames_processed", 0) > 0

                # The share link: view only, this session's avatar.
                viewer = browser.new_page()
                viewer.set_default_timeout(20_000)
                viewer.goto(page.locator("#share-link").get_attribute("href"))
                viewer.wait_for_function("() => document.getElementById('video').videoWidth === 224")
                viewer.wait_for_function("() => document.getElementById('video').currentTime > 0.5")
                assert close_to(np.array(viewer.evaluate(VIDEO_MEAN)), RED, 25)
                assert viewer.is_hidden("#controls")
                viewer.close()

                # Meanwhile the aiortc session kept its own (blue) face.
                assert close_to(other.frames[-1], BLUE)

                # Leave and rejoin twice, with the sample this time.
                page.check("input[value=sample]")
                for _ in range(2):
                    page.click("#stop")
                    page.wait_for_function("() => !document.getElementById('start').disabled")
                    _wait(lambda: srv.session_count == 1)           # only the aiortc session is left
                    page.click("#start")
                    page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
                    page.wait_for_function(
                        "() => { const v = document.getElementById('video'); return v.videoWidth === 224 && v.currentTime > 0.5; }")
                    page.wait_for_timeout(500)
                    assert close_to(np.array(page.evaluate(VIDEO_MEAN)), sample_colour, 25)
                assert srv.session_count == 2
                page.close(run_before_unload=True)                  # the tab goes away
                _wait(lambda: srv.session_count == 1, 10)
            finally:
                browser.close()
        assert close_to(other.frames[-1], BLUE)
        assert srv.sessions_created == 4
    finally:
        call(other.close())
        other_loop.call_soon_threadsafe(other_loop.stop)
        srv.stop()
        renderer.stop()


def test_a_full_studio_shows_its_refusal_on_the_page():
    from playwright.sync_api import sync_playwright

    srv, _, renderer = start_studio(max_sessions=1)
    args = CHROMIUM_ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    try:
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{srv.port}/sessions?sample=1",
                                                      method="POST", data=b""), timeout=10)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, timeout=20_000)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{srv.port}/")
                page.click("#start")
                page.wait_for_selector("#error:not([hidden])", timeout=15_000)
                assert "studio is full" in page.text_content("#error")
            finally:
                browser.close()
    finally:
        srv.stop()
        renderer.stop()


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
