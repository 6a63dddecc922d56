"""The viewer page in a real (headless) Chromium: it connects over WebRTC on loopback, plays the
224x224 video, offers the unmute button for the audio, and shows the stats table."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.webrtc import WebRTCServer, WebRTCSink

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "assets" / "sample" / "astronaut.png"
CHROMIUM_ARGS = ['--no-sandbox', '--headless=new', '--disable-gpu', '--allow-loopback-in-peer-connection',
                 '--disable-features=WebRtcHideLocalIpsWithMdns', '--autoplay-policy=no-user-gesture-required',
                 '--no-first-run', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--disable-quic']
INBOUND_AUDIO = """async () => {
  const report = await pc.getStats();
  for (const s of report.values()) if (s.type === 'inbound-rtp' && s.kind === 'audio') return s;
  return null;
}"""
STATS = {"latency_ms_median": 187.5, "generator_ms_median": 31.2, "output_fps": 25.0, "frames_dropped": 3}


def base_image() -> np.ndarray:
    """The sample portrait cropped to the face when available (a nicer README picture), else a
    synthetic gradient."""
    img = cv2.imread(str(PHOTO))
    if img is not None and img.shape[:2] == (512, 512):
        return cv2.resize(cv2.cvtColor(img[0:240, 104:344], cv2.COLOR_BGR2RGB), (224, 224),
                          interpolation=cv2.INTER_AREA)
    y, x = np.mgrid[0:224, 0:224]
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


class Feeder(threading.Thread):
    """25 fps of the base image with a moving progress bar (so the picture visibly changes), and a
    quiet tone, from its own thread like the scheduler."""

    def __init__(self, sink: WebRTCSink) -> None:
        super().__init__(name="browser-feeder", daemon=True)
        self.sink, self.stop_event, self.base = sink, threading.Event(), base_image()

    def run(self) -> None:
        t0, k = time.monotonic(), 0
        while not self.stop_event.is_set():
            frame = self.base.copy()
            frame[212:220, : 8 + (k * 4) % 208] = (80, 200, 255)
            t = (k * 640 + np.arange(640)) / 16000
            self.sink.write(frame, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), k)
            k += 1
            self.stop_event.wait(max(0.0, t0 + k / 25 - time.monotonic()))


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt install chromium)")
def test_page_plays_the_stream_and_shows_stats(tmp_path):
    from playwright.sync_api import sync_playwright

    srv = WebRTCServer(port=0, stats=lambda: dict(STATS), ice_host_addresses=["127.0.0.1"])
    srv.start()
    sink = WebRTCSink(srv)
    sink.open(224, 224, 25, 16000)
    feeder = Feeder(sink)
    feeder.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=20_000)
            try:
                page = browser.new_page(viewport={"width": 720, "height": 900})
                page.set_default_timeout(15_000)
                page.goto(srv.url)
                page.wait_for_function("() => document.getElementById('video').videoWidth === 224")
                assert page.evaluate("document.getElementById('video').videoHeight") == 224
                t0 = page.evaluate("document.getElementById('video').currentTime")
                page.wait_for_function(f"() => document.getElementById('video').currentTime > {t0} + 0.5")
                assert page.evaluate("document.getElementById('video').srcObject.getAudioTracks().length") == 1
                assert page.evaluate("document.getElementById('status').textContent") == "live"
                page.wait_for_function(
                    "() => document.querySelector('#stats td[data-key=\"latency_ms_median\"]')?.textContent === '187.5'")
                assert page.locator('#stats td[data-key="frames_dropped"]').text_content() == "3"
                # issue 21.4: this viewer's own row: what it was sent and what its queue lost
                page.wait_for_function(
                    "() => /^video [1-9][0-9]* sent, 0 dropped · audio [1-9][0-9]* sent, 0 dropped$/"
                    ".test(document.querySelector('#stats td[data-key=\"viewer_1\"]')?.textContent || '')")
                assert srv.peer_count == 1

                # The picture is really there: the video element's pixels are not a flat colour.
                shot = tmp_path / "viewer.png"
                page.screenshot(path=str(shot))
                box = page.locator("#video").bounding_box()
                img = cv2.imread(str(shot))
                region = img[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"] + box["width"])]
                assert region.size and float(region.std()) > 20.0

                # Sound: the unmute button is offered and turns the sound on.
                page.click("#unmute")
                assert page.evaluate("document.getElementById('video').muted") is False
                # ... and the tone is really being played (Chrome's own receive statistics).
                deadline, level = time.monotonic() + 8, 0.0
                while level < 0.02 and time.monotonic() < deadline:
                    page.wait_for_timeout(200)
                    stats = page.evaluate(INBOUND_AUDIO) or {}
                    assert stats.get("packetsLost", 0) == 0
                    level = float(stats.get("audioLevel") or 0.0)
                assert level == pytest.approx(0.1, abs=0.05)   # the feeder's 0.1-amplitude tone
                page.close(run_before_unload=True)    # the tab goes away: the page closes its peer
            finally:
                browser.close()
        deadline = time.monotonic() + 15      # the browser went away: its peer is dropped
        while srv.peer_count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.peer_count == 0
        if os.environ.get("PCAVS_SAVE_SCREENSHOT"):   # refresh the README picture from a passing run
            shutil.copyfile(shot, REPO / "docs" / "viewer.png")
    finally:
        feeder.stop_event.set()
        feeder.join(5)
        sink.close()
        srv.stop()
