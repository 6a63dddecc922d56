"""What each WebRTC viewer costs the server: VP8 encoding per viewer at 1, 4 and 8 viewers, before and after.

aiortc gives every RTCRtpSender its own encoder, so a frame pushed once to `WebRTCServer` was VP8-encoded
once per viewer, in the event loop's thread pool ("per-viewer", `shared_video_encoder=False`); the audio
is Opus-encoded once (stream/webrtc/tracks.py) and only packetised per viewer. "shared" (the default) is
one `SharedVideoEncoder` per session whose packets every viewer's sender only packetises. This bench
measures how much of the server process's CPU the encoding is in each, with real aiortc peers on
127.0.0.1:

* the server (a `WebRTCServer` fed 224×224 frames and their audio at 25 fps, as a session's sink does)
  runs in this process; every `Vp8Encoder.encode` call is timed (thread CPU time) by wrapping it;
* N receive-only aiortc viewers run in a child process (so their decoding is not charged to the server)
  and count the frames they receive;
* over `--seconds` after a warm-up: encode calls per second, CPU ms per encode, encoding's share of one
  core and of the server process's CPU (utime + stime from /proc), and per viewer the frames sent and
  dropped by the server's per-viewer queues (`WebRTCServer.viewer_stats`) and received by the viewer.

    python bench/viewers.py                     # 1, 4 and 8 viewers, 10 s each
    python bench/viewers.py --viewers 1 2 --seconds 5

Timings depend on the machine and on what else runs on it: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pcavs.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402

SIZE = 224


# ---------------------------------------------------------------------------- the viewers (child)
async def viewers(url: str, n: int, seconds: float) -> list[int]:
    """N receive-only peers; the frames each decoded during `seconds` after all are connected."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from stream.webrtc import use_host_addresses

    counts = [0] * n
    pcs, readers = [], []
    counting = asyncio.Event()

    async def connect(i: int) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.append(pc)
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks: dict = {}
        pc.on("track", lambda track: tracks.__setitem__(track.kind, track))
        use_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    raise RuntimeError(f"offer refused: {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

        async def read(kind: str) -> None:
            while True:
                await tracks[kind].recv()
                if kind == "video" and counting.is_set():
                    counts[i] += 1
        readers.extend([asyncio.ensure_future(read("video")), asyncio.ensure_future(read("audio"))])

    try:
        await asyncio.gather(*(connect(i) for i in range(n)))
        print("connected", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # parent: "count"
        counting.set()
        await asyncio.sleep(seconds)
        counting.clear()
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
    return counts


# ---------------------------------------------------------------------------- the server (this process)
class EncodeClock:
    """Wraps every VP8 encode (aiortc's `Vp8Encoder.encode` in each viewer's sender, and the session's
    `SharedVideoEncoder`) and aiortc's `pack` (the pre-encoded path): calls and thread CPU time."""

    def __init__(self) -> None:
        from aiortc.codecs import vpx

        from stream.webrtc.tracks import SharedVideoEncoder

        self._lock = threading.Lock()
        self.calls = self.cpu_s = self.packs = 0
        self._vpx, self._shared = vpx, SharedVideoEncoder
        self._encode, self._pack = vpx.Vp8Encoder.encode, vpx.Vp8Encoder.pack
        self._shared_encode = SharedVideoEncoder._encode
        clock = self

        def timed(original):
            def call(*args):
                t = time.thread_time()
                try:
                    return original(*args)
                finally:
                    dt = time.thread_time() - t
                    with clock._lock:
                        clock.calls += 1
                        clock.cpu_s += dt
            return call
        encode = timed(self._encode)
        SharedVideoEncoder._encode = timed(self._shared_encode)

        def pack(encoder, packet):
            with clock._lock:
                clock.packs += 1
            return clock._pack(encoder, packet)

        vpx.Vp8Encoder.encode, vpx.Vp8Encoder.pack = encode, pack

    def read(self) -> tuple[int, float, int]:
        with self._lock:
            return self.calls, self.cpu_s, self.packs

    def restore(self) -> None:
        self._vpx.Vp8Encoder.encode, self._vpx.Vp8Encoder.pack = self._encode, self._pack
        self._shared._encode = self._shared_encode


def process_cpu_s() -> float:
    """This process's user + system CPU seconds (all threads)."""
    t = os.times()
    return t.user + t.system


def test_frame(k: int) -> np.ndarray:
    """A 224² frame with texture and motion, so VP8 has the work a face gives it."""
    rng = np.random.default_rng(k % 50)
    f = np.zeros((SIZE, SIZE, 3), np.uint8)
    f[..., 0] = np.linspace(30, 220, SIZE, dtype=np.uint8)[None, :]
    f[..., 1] = 90
    f[..., 2] = np.linspace(200, 40, SIZE, dtype=np.uint8)[:, None]
    y = (k * 5) % (SIZE - 60)
    f[y:y + 60, 60:160] = rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)
    return f


class Feeder:
    """The sink's side: one frame and its audio every 40 ms, on an absolute schedule."""

    def __init__(self, sink) -> None:
        self.sink, self._stop = sink, threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-feeder", daemon=True)

    def start(self) -> "Feeder":
        self.sink.open(SIZE, SIZE, FPS, SAMPLE_RATE)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0, k = time.monotonic(), 0
        t = np.arange(SAMPLES_PER_FRAME) / SAMPLE_RATE
        while not self._stop.is_set():
            audio = (0.2 * np.sin(2 * np.pi * (300 + 10 * (k % 20)) * t)).astype(np.float32)
            self.sink.write(test_frame(k), audio, k)
            k += 1
            self._stop.wait(max(0.0, t0 + k / FPS - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sink.close()


def measure(n: int, seconds: float, clock: EncodeClock, server_kwargs: dict) -> dict:
    from stream.webrtc import WebRTCServer, WebRTCSink

    srv = WebRTCServer(port=0, ice_host_addresses=["127.0.0.1"], max_viewers=max(8, n), **server_kwargs)
    srv.start()
    feeder = Feeder(WebRTCSink(srv)).start()
    child = subprocess.Popen([sys.executable, __file__, "--child", srv.url, str(n), str(seconds)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        if child.stdout.readline().strip() != "connected":
            raise SystemExit(f"viewers did not connect (exit {child.wait(10)})")
        time.sleep(3.0)                                    # warm-up: keyframes, bitrate settling
        before = srv_viewers(srv)
        c0, e0, p0 = clock.read()
        cpu0, t0 = process_cpu_s(), time.monotonic()
        child.stdin.write("count\n")
        child.stdin.flush()
        time.sleep(seconds)
        c1, e1, p1 = clock.read()
        cpu1, t1 = process_cpu_s(), time.monotonic()
        after = srv_viewers(srv)
        received = json.loads(child.stdout.readline())
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        feeder.stop()
        srv.stop()
    wall = t1 - t0
    sent = [a["video_sent"] - b["video_sent"] for a, b in zip(after, before)]
    dropped = [a["video_dropped"] + a["audio_dropped"] - b["video_dropped"] - b["audio_dropped"]
               for a, b in zip(after, before)]
    calls = c1 - c0
    return {"viewers": n, "encodes_per_s": calls / wall, "packs_per_s": (p1 - p0) / wall,
            "encode_ms": 1000 * (e1 - e0) / calls if calls else float("nan"),
            "encode_core_pct": 100 * (e1 - e0) / wall, "server_core_pct": 100 * (cpu1 - cpu0) / wall,
            "encode_share": (e1 - e0) / (cpu1 - cpu0) if cpu1 > cpu0 else float("nan"),
            "sent_per_s_min": min(sent) / wall if sent else 0.0, "dropped": sum(dropped),
            "received_per_s_min": min(received) / seconds if received else 0.0}


def srv_viewers(srv) -> list[dict]:
    """The server's per-viewer counts, read on its own loop."""
    async def read() -> list[dict]:
        return srv.viewer_stats()
    return asyncio.run_coroutine_threadsafe(read(), srv._loop).result(10)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'mode':<11}{'viewers':>8}{'enc/s':>8}{'pack/s':>8}{'enc ms':>8}{'enc %core':>10}"
          f"{'server %core':>13}{'enc share':>10}{'sent/s min':>11}{'recv/s min':>11}{'dropped':>8}")
    for r in rows:
        print(f"{r['mode']:<11}{r['viewers']:>8}{r['encodes_per_s']:>8.1f}{r['packs_per_s']:>8.1f}"
              f"{r['encode_ms']:>8.2f}{r['encode_core_pct']:>10.1f}{r['server_core_pct']:>13.1f}"
              f"{100 * r['encode_share']:>9.0f}%{r['sent_per_s_min']:>11.1f}{r['received_per_s_min']:>11.1f}"
              f"{r['dropped']:>8}")
    print("(enc: VP8 encodes in the server, thread CPU per call; pack: pre-encoded frames packetised; "
          "enc share: of the server process's CPU; sent/recv per s: the slowest viewer's video frames, "
          f"{FPS} is all of them; dropped: items lost from the server's per-viewer queues)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--modes", nargs="+", default=["per-viewer", "shared"], choices=["per-viewer", "shared"],
                    help="per-viewer: aiortc's encoder in every viewer's sender (before issue 21); shared: one "
                         "SharedVideoEncoder per session, its packets relayed to every viewer (the default)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", nargs=3, metavar=("URL", "N", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        url, n, seconds = args.child
        counts = asyncio.run(viewers(url.split("?")[0], int(n), float(seconds)))
        print(json.dumps(counts), flush=True)
        return 0

    clock = EncodeClock()
    rows = []
    try:
        for mode in args.modes:
            for n in args.viewers:
                row = measure(n, args.seconds, clock, {"shared_video_encoder": mode == "shared"})
                row["mode"] = mode
                rows.append(row)
                print(f"{mode} {n} viewers: {row}", file=sys.stderr, flush=True)
    finally:
        clock.restore()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
