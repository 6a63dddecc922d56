"""Publishing by WHIP into Janus versus serving viewers directly: what each costs this process.

One process publishes a 25 fps test pattern (the slot index drawn in the pixels, a tone as the voice)
either by WHIP (`WhipSink` → simple-whip-server → Janus VideoRoom; tests/janus_support.py starts both in
a network namespace of their own, joined to ours by a veth pair, and every ICE agent of ours gathers on
our end of that pair only; needs root) or to the built-in viewer (`WebRTCServer` + `WebRTCSink`). Viewers run in child
processes (at most `--per-process` each), so their decoding is not counted as the publisher's: they
are aiortc subscribers through Janus's VideoRoom HTTP API, or aiortc direct viewers (`POST /offer`, what
our own page does), or `stream.whep.WhepClient` viewers of the same server (`POST /whep`).
For every audience size it prints one row: the publisher's CPU (this process, % of one core, over the
measured window), Janus's CPU, slots each viewer received (min / median, % of the slots between its
first and last), and the latency from `write` to the decoded frame in the viewer (p50 / p95 over
every received frame; both processes read the same monotonic clock), and the A/V offset one more,
light viewer of the same path measures (bench/slot_truth.py: each slot's video minus audio time on the
sender's clock, from RTCP sender reports, as a browser syncs; median and range over its slots). Last, it restarts Janus
`--restarts` times and prints how long the publisher took to be back in the room each time.

Usage: python bench/whip.py [--seconds 10] [--whip 1,4,8,25] [--direct 1,4,8] [--whep 1,4,8] [--per-process 5]
                           [--restarts 3]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.webrtc import WebRTCServer, WebRTCSink  # noqa: E402
from stream.whep import WhepClient  # noqa: E402
from stream.whip import WhipSink  # noqa: E402
from bench.slot_truth import read_stamp, watch_direct  # noqa: E402
from tests.janus_support import (JanusStack, LightSubscriber, PatternFeeder, VideoRoomSubscriber,  # noqa: E402
                                 coverage, missing_reason)

CLK_TCK = 100


def frame_record(frame) -> tuple[int, int | None, float]:
    """(RTP slot number, the stamped slot or None when its check row did not read back, arrival). The
    feeder stamps every slot (`PatternFeeder(stamped=True)`); a lossy frame's stamp may not read, so
    slots are counted by media timestamp and the stamps only anchor them (`slots_of`)."""
    stamp = read_stamp(frame.to_ndarray(format="rgb24"))
    return round(frame.pts / 3600), None if stamp is None else stamp[0], time.monotonic()


def slots_of(records: list[tuple[int, int | None, float]]) -> list[tuple[int, float]]:
    """(slot, arrival) per received frame: RTP slot numbers anchored by the stamps' majority."""
    votes = [k - n for n, k, _ in records if k is not None]
    if not votes:
        return []
    base = statistics.mode(votes)
    return [(n + base, t) for n, _, t in records]


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------------------- viewers (child processes)
class _DirectViewer:
    """An aiortc viewer of the built-in server (`POST /offer`), recording (slot, arrival time)."""

    def __init__(self, url: str) -> None:
        self.url, self.frames, self.pc, self._tasks = url, [], None, []

    async def start(self) -> None:
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        from stream.webrtc.ice import use_host_addresses
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))   # no STUN (aiortc's default is Google's)
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "video":
                self._tasks.append(asyncio.ensure_future(self._read(track)))

        use_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(self.url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(**answer))

    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return
            self.frames.append(frame_record(frame))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


def _viewer_process(kind: str, url: str, n: int, seconds: float, conn, host_address: str = "",
                    probe: bool = False) -> None:
    """`n` decoding viewers (and with `probe` one light A/V viewer more); sends (their frames, the
    probe's A/V offsets in ms or None)."""
    async def main():
        if kind == "whip":
            viewers = [VideoRoomSubscriber(url, (host_address,),
                                           keep=frame_record) for _ in range(n)]
        elif kind == "whep":
            viewers = [WhepClient(url + "whep", ice_host_addresses=["127.0.0.1"],
                                  keep=frame_record) for _ in range(n)]
        else:
            viewers = [_DirectViewer(url) for _ in range(n)]
        await asyncio.gather(*(v.start() for v in viewers))
        light = light_pc = None
        if probe and kind == "whip":
            light = LightSubscriber(url, (host_address,))
            await light.start()
        elif probe:
            light_pc, light = await watch_direct(url, ["127.0.0.1"])
        await asyncio.sleep(1.0)                 # first key frame, jitter buffers settle
        for v in viewers:
            v.frames.clear()
        conn.send("ready")
        await asyncio.sleep(seconds)
        result = [slots_of(v.frames) for v in viewers]
        await asyncio.gather(*(v.stop() for v in viewers), return_exceptions=True)
        offsets = None
        if isinstance(light, LightSubscriber):
            await light.stop()
            offsets = light.slots.av_offsets_ms()
        elif light is not None:
            await light_pc.close()
            offsets = light.av_offsets_ms()
        return result, offsets

    conn.send(asyncio.run(main()))


def _watch(kind: str, url: str, n: int, seconds: float, per_process: int, on_ready,
           host_address: str = "") -> tuple[list[list[tuple[int, float]]], list[float] | None]:
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for start in range(0, n, per_process):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_viewer_process, args=(kind, url, min(per_process, n - start), seconds, child,
                                                              host_address, start == 0))
        p.start()
        procs.append(p)
        pipes.append(parent)
    try:
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a viewer process did not start within 60 s")
        on_ready()
        results, offsets = [], None
        for pipe in pipes:
            if not pipe.poll(seconds + 60):
                raise RuntimeError("a viewer process did not report")
            frames, probe = pipe.recv()
            results.extend(frames)
            offsets = probe if probe is not None else offsets
        return results, offsets
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------------------- one row
def _row(kind: str, n: int, watched, sent_at, cpu_s: float, janus_s: float | None, window: float) -> list[str]:
    results, offsets = watched
    shares = [coverage([s for s, _ in frames])[0] for frames in results]
    latencies = sorted((t - sent_at[s]) * 1000 for frames in results for s, t in frames if s in sent_at)
    p50 = statistics.median(latencies) if latencies else float("nan")
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")
    return [kind, str(n), f"{100 * cpu_s / window:.0f}", "–" if janus_s is None else f"{100 * janus_s / window:.0f}",
            f"{100 * min(shares):.1f} / {100 * statistics.median(shares):.1f}" if shares else "–",
            f"{p50:.0f} / {p95:.0f}",
            f"{statistics.median(offsets):+.1f} ({min(offsets):+.1f} … {max(offsets):+.1f})" if offsets else "–"]


def bench_whip(stack: JanusStack, n: int, seconds: float, per_process: int) -> list[str]:
    sink = WhipSink(stack.whip_url, stack.token, ice_host_addresses=[stack.host_address])
    sink.open(224, 224, 25, 16000)
    feeder = PatternFeeder(sink, stamped=True).start()
    marks: dict[str, float] = {}

    def ready() -> None:
        marks.update(t=time.monotonic(), cpu=time.process_time(), janus=_proc_cpu_s(stack.janus.pid))

    try:
        while not stack.publishers():
            time.sleep(0.1)
        results = _watch("whip", stack.janus_url, n, seconds, per_process, ready, stack.host_address)
        window = time.monotonic() - marks["t"]
        cpu, janus = time.process_time() - marks["cpu"], _proc_cpu_s(stack.janus.pid) - marks["janus"]
    finally:
        feeder.stop()
        sink.close()
    return _row("whip → Janus", n, results, feeder.sent_at, cpu, janus, window)


def bench_restart(stack: JanusStack, times: int) -> list[float]:
    """Seconds from a Janus restart (stop + start, the stop included) until the publisher is connected
    again and listed in the room, `times` times."""
    sink = WhipSink(stack.whip_url, stack.token, ice_host_addresses=[stack.host_address])
    sink.open(224, 224, 25, 16000)
    feeder = PatternFeeder(sink).start()
    backs = []
    try:
        for _ in range(times):
            while not (sink.connected and stack.publishers()):
                time.sleep(0.05)
            connects, t0 = sink.connects, time.monotonic()
            stack.restart_janus()
            while not (sink.connects > connects and sink.connected and stack.publishers()):
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("the publisher did not come back within 60 s")
                time.sleep(0.05)
            backs.append(time.monotonic() - t0)
    finally:
        feeder.stop()
        sink.close()
    return backs


def bench_direct(n: int, seconds: float, per_process: int, kind: str = "direct") -> list[str]:
    """`n` viewers of the built-in server: our page's way (`POST /offer`) or WHEP (`kind` "whep")."""
    srv = WebRTCServer(port=0, ice_host_addresses=["127.0.0.1"], max_viewers=max(8, n + 1))   # + the A/V probe
    srv.start()
    sink = WebRTCSink(srv)
    sink.open(224, 224, 25, 16000)
    feeder = PatternFeeder(sink, stamped=True).start()
    marks: dict[str, float] = {}

    def ready() -> None:
        marks.update(t=time.monotonic(), cpu=time.process_time())

    try:
        results = _watch(kind, srv.web.base_url, n, seconds, per_process, ready)
        window = time.monotonic() - marks["t"]
        cpu = time.process_time() - marks["cpu"]
    finally:
        feeder.stop()
        sink.close()
        srv.stop()
    return _row("WHEP viewers" if kind == "whep" else "direct viewers", n, results, feeder.sent_at, cpu, None, window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per row")
    ap.add_argument("--whip", default="1,4,8,25", help="subscriber counts through Janus ('' = none)")
    ap.add_argument("--direct", default="1,4,8", help="direct viewer counts ('' = none)")
    ap.add_argument("--whep", default="1,4,8", help="WHEP viewer counts of the built-in server ('' = none)")
    ap.add_argument("--per-process", type=int, default=5, help="viewers per child process")
    ap.add_argument("--restarts", type=int, default=3, help="Janus restarts to time the publisher's return")
    args = ap.parse_args()
    counts = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    rows = []
    for n in counts(args.direct):
        rows.append(bench_direct(n, args.seconds, args.per_process))
        print("  ".join(rows[-1]), flush=True)
    for n in counts(args.whep):
        rows.append(bench_direct(n, args.seconds, args.per_process, kind="whep"))
        print("  ".join(rows[-1]), flush=True)
    backs: list[float] = []
    if counts(args.whip) or args.restarts:
        reason = missing_reason()
        if reason:
            sys.exit(f"bench/whip.py: {reason}")
        with tempfile.TemporaryDirectory() as tmp:
            stack = JanusStack(Path(tmp))
            stack.start()                # stops what it started if it fails
            try:
                for n in counts(args.whip):
                    rows.append(bench_whip(stack, n, args.seconds, args.per_process))
                    print("  ".join(rows[-1]), flush=True)
                if args.restarts:
                    backs = bench_restart(stack, args.restarts)
            finally:
                stack.stop()
    head = ["publish to", "viewers", "publisher CPU %", "Janus CPU %", "slots received min / median %",
            "latency p50 / p95 ms", "A/V offset ms (probe)"]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    if backs:
        print(f"\npublisher back after a Janus restart (stop + start included): "
              + ", ".join(f"{b:.1f}" for b in backs) + " s")


if __name__ == "__main__":
    main()
