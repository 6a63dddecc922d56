"""Soak: a live WebRTC session watched by one viewer that stays and one that keeps reconnecting.

Runs a live session (the one `run_live.py --out webrtc` runs: looped sample, real scheduler, real
server) in a child process, and two aiortc viewers on 127.0.0.1 in this one: "steady" stays
connected for the whole run, "cycling" reconnects every --cycle-s seconds. Prints one table: the
child's RSS slope (MB/min), open fds and threads, latency, the share of the video and audio slots
each viewer received, stalls over 1 s, output fps against the wall clock, and how long SIGTERM took.

How slots are counted: the child wraps its outputs so that every 40 ms slot carries its own index,
drawn into the video frame (with the instant it went out) and played as two tones in its audio
(k mod 16 and k/16 mod 16). A viewer reads the index from every decoded frame, and for audio anchors
its RTP timestamps (pts/1920 at 48 kHz = one slot) with the tones. A connection is expected to
receive the slots emitted while it was connected (from the server's own `frames_out` just before
connecting and when it stops reading), less a connect grace at the start and an in-flight allowance
at the end; its share is the distinct slots it received among those.

Per-slot truth, per viewer connection (the stamps, the RTP → sender clock mapping and the sender
reports: bench/slot_truth.py, shared with bench/whip.py and the WHIP tests): the slots received by media timestamp (RTP timestamps, anchored
by the stamps), the gaps among the expected slots (runs of missing slots, per track), and the A/V
offset of the same slot as a browser would derive it: each stream's RTP timestamp of slot k mapped to
the sender's wall clock through that stream's RTCP sender reports (aiortc pairs each report's NTP time
with the RTP timestamp of the packet sent at that instant); video minus audio, in ms (positive: the
picture of slot k is later than its sound).

    python bench/soak.py --minutes 5 --renderer-delay-s 0.5          # cheap stand-in generator, 2 fps
    python bench/soak.py --minutes 20 --set model.checkpoint_dir=checkpoints/parity_seed0   # real one

`--renderer-delay-s S` replaces the generator with a stand-in that sleeps S seconds and draws a frame
(no networks are loaded); without it the session loads the configured checkpoints.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.slot_truth import (StampingSink, read_stamp, read_tones, record_sender_reports,  # noqa: E402,F401
                               sender_wall, stamp_audio, stamp_frame)
from pcavs.constants import FPS  # noqa: E402

STALL_S = 1.0
CONNECT_GRACE_S = 2.0       # slots emitted this soon after a viewer asked to connect are not expected
IN_FLIGHT_S = 0.5           # nor those emitted this soon before it stopped reading
RESOURCE_PERIOD_S = 5.0

class SleepyRenderer:
    """Stand-in generator: sleeps, then draws a frame that changes with the mel energy (a moving bar),
    so the video encoder has real work."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def render(self, mel_windows, pose_codes=None, times=None):
        time.sleep(self.delay_s)
        self.calls += 1
        frames = []
        for mel in np.asarray(mel_windows):
            f = np.zeros((224, 224, 3), np.uint8)
            f[:, :, 0] = np.linspace(40, 200, 224, dtype=np.uint8)[None, :]
            f[:, :, 2] = 90
            level = int(np.clip(float(np.mean(mel)) * 20 + 112, 0, 223))
            f[64:, max(0, level - 10):level + 10] = (240, 220, 60)
            y = 64 + (self.calls * 7) % 150
            f[y:y + 10, :] = 255
            frames.append(f)
        return np.stack(frames)


# ---------------------------------------------------------------------------- the child: one session
def serve(args: argparse.Namespace) -> int:
    from pcavs_live.cli.config import dotted_overrides, load_config
    from pcavs_live.cli.errors import run_with_user_errors
    from pcavs_live.cli.logging_setup import setup_logging
    from pcavs_live.pipeline.session import RunOptions, SessionBuilder
    from run_live import install_stop_handlers

    setup_logging(0)

    def body() -> int:
        overrides = dotted_overrides(args.set)
        overrides.update({"server.host": "127.0.0.1", "server.port": args.port, "output.targets": ["webrtc"],
                          "server.token": ""})
        config = load_config(args.config, overrides)
        avatar = None
        if args.renderer_delay_s is not None:
            avatar = (SleepyRenderer(args.renderer_delay_s), np.full((224, 224, 3), 80, np.uint8))
        builder = SessionBuilder(config, RunOptions(realtime=True, status_interval_s=0), avatar=avatar,
                                 ice_host_addresses=("127.0.0.1",), wrap_sink=StampingSink)
        stop = install_stop_handlers(builder.live)
        with builder, builder.build() as session:
            summary = session.run(stop)
            dropped = session.server.dropped if session.server is not None else None
        print(json.dumps({"frames_out": summary.frames_out, "frames_generated": summary.frames_generated,
                          "server_buffer_dropped": dropped}), flush=True)
        return 0

    code = run_with_user_errors(body, debug=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is closed: skip the interpreter's teardown of torch and friends (seconds)


# ---------------------------------------------------------------------------- the viewers
@dataclass
class Connection:
    started: float                     # time.monotonic() when it asked to connect
    first_slot: int                    # frames_out just before connecting: the next slot to go out
    last_slot: int = -1                # frames_out - 1 when it stopped reading
    # video: (RTP slot number, stamped slot or None, arrived, emitted or None); the RTP slot number is
    # pts/3600 counted from the connection's first frame, the stamp says which slot that was.
    video: list[tuple[int, int | None, float, float | None]] = field(default_factory=list)
    audio: list[tuple[int, int, float]] = field(default_factory=list)     # (RTP slot number, k mod 256, arrived)
    unread: int = 0                    # video frames whose stamp did not read back (codec left it stale)
    packets_lost: int = 0              # RTP packets the viewer's receivers counted as lost
    # each entry's media timestamp as aiortc gives it: the RTP timestamp less the stream's first one
    rtp_video: list[int] = field(default_factory=list)
    rtp_audio: list[int] = field(default_factory=list)
    rtp_origin: dict[str, int] = field(default_factory=dict)   # that first RTP timestamp, per kind
    # RTCP sender reports per kind: (NTP time in s, RTP timestamp), in arrival order
    sender_reports: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {"video": [], "audio": []})

    def video_base(self) -> int | None:
        """Slot index of RTP slot number 0: what the stamps say, by majority."""
        votes = [k - pts for pts, k, _, _ in self.video if k is not None]
        return statistics.mode(votes) if votes else None

    def video_slots(self) -> set[int]:
        base = self.video_base()
        return set() if base is None else {pts + base for pts, _, _, _ in self.video}

    def audio_slots(self) -> set[int]:
        base = self.audio_base()
        return set() if base is None else {pts + base for pts, _, _ in self.audio}

    def audio_base(self) -> int | None:
        """Slot index of audio RTP slot number 0: the RTP slot numbers anchored by the tones (mod 256),
        the wrap resolved by the video slots arriving at the same time."""
        if not self.audio:
            return None
        offsets = [(code - pts) % 256 for pts, code, _ in self.audio]
        offset = statistics.mode(offsets)
        pts0, _, arrived0 = self.audio[0]
        base_v = self.video_base()
        if base_v is not None:
            nearest = base_v + min(self.video, key=lambda v: abs(v[2] - arrived0))[0]
        else:
            nearest = self.first_slot + round((arrived0 - self.started) * FPS)
        base = nearest - pts0
        base += (offset - base) % 256
        if base - (nearest - pts0) > 128:
            base -= 256
        return base

    def expected(self) -> range:
        return range(self.first_slot + round(CONNECT_GRACE_S * FPS), self.last_slot + 1 - round(IN_FLIGHT_S * FPS))

    def gaps(self, kind: str) -> list[tuple[int, int]]:
        """(first missing slot, counted from the first expected one; length) of every run of expected
        slots this connection did not receive on one track."""
        want = self.expected()
        got = self.video_slots() if kind == "video" else self.audio_slots()
        runs: list[tuple[int, int]] = []
        for k in want:
            if k in got:
                continue
            if runs and runs[-1][0] + runs[-1][1] == k - want.start:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((k - want.start, 1))
        return runs

    def av_offsets_ms(self) -> list[float]:
        """For every slot received on both tracks: (video time − audio time) of that slot on the sender's
        clock, each from its own stream's nearest RTCP sender report (the mapping a browser syncs by)."""
        vb, ab = self.video_base(), self.audio_base()
        if vb is None or ab is None or not all(self.sender_reports.values()) or len(self.rtp_origin) < 2:
            return []

        def wall(kind: str, pts: int, rate: int) -> float:
            return sender_wall((pts + self.rtp_origin[kind]) % (1 << 32), self.sender_reports[kind], rate)

        video = {pts + vb: rtp for (pts, _, _, _), rtp in zip(self.video, self.rtp_video)}
        audio = {pts + ab: rtp for (pts, _, _), rtp in zip(self.audio, self.rtp_audio)}
        return [1000 * (wall("video", video[k], 90_000) - wall("audio", audio[k], 48_000))
                for k in sorted(video.keys() & audio.keys())]

    def stalls(self) -> list[tuple[str, float, float]]:
        """(track, when it began, how long) for every gap over STALL_S between arrivals."""
        found = []
        for kind, arrivals in (("video", [a for _, _, a, _ in self.video]), ("audio", [a for _, _, a in self.audio])):
            found += [(kind, a, b - a) for a, b in zip(arrivals, arrivals[1:]) if b - a > STALL_S]
        return found


async def get_json(base: str, path: str) -> dict:
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(base + path) as resp:
            return await resp.json(content_type=None)


async def frames_out(base: str) -> int:
    return int((await get_json(base, "stats"))["frames_out"])


async def watch(base: str, seconds: float, stop: asyncio.Event) -> Connection:
    """One viewer connection: connect, read every video frame and audio packet for `seconds`, leave."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from stream.webrtc import use_host_addresses

    conn = Connection(started=time.monotonic(), first_slot=await frames_out(base))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    tracks: dict = {}
    pc.on("track", lambda track: tracks.__setitem__(track.kind, track))
    use_host_addresses(pc, ["127.0.0.1"])
    record_sender_reports(pc, conn.sender_reports)
    readers: list[asyncio.Task] = []
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async with session.post(base + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    raise RuntimeError(f"offer refused: {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

        async def read_video() -> None:
            while True:
                frame = await tracks["video"].recv()
                arrived = time.monotonic()
                pts = round(frame.pts / 3600)
                conn.rtp_video.append(frame.pts)
                stamp = read_stamp(frame.to_ndarray(format="rgb24"))
                if stamp is None:
                    conn.unread += 1
                    conn.video.append((pts, None, arrived, None))
                    continue
                k16, emit16 = stamp
                k = conn.first_slot + ((k16 - conn.first_slot) % 65536)      # unwrap near the connect slot
                now_ms = int(arrived * 1000)
                emitted = (now_ms - ((now_ms - emit16) % 65536)) / 1000
                conn.video.append((pts, k, arrived, emitted))

        async def read_audio() -> None:
            while True:
                frame = await tracks["audio"].recv()
                arrived = time.monotonic()
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32)
                conn.audio.append((round(frame.pts / frame.samples), read_tones(pcm, frame.sample_rate), arrived))
                conn.rtp_audio.append(frame.pts)

        readers = [asyncio.ensure_future(read_video()), asyncio.ensure_future(read_audio())]
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        for task in readers:
            if task.done() and task.exception() is not None:
                raise task.exception()
        conn.last_slot = await frames_out(base) - 1
        for transceiver in pc.getTransceivers():   # aiortc's frame.pts = RTP timestamp − this origin
            mapper = getattr(transceiver.receiver, "_RTCRtpReceiver__timestamp_mapper", None)
            if getattr(mapper, "_origin", None) is not None:
                conn.rtp_origin[transceiver.kind] = mapper._origin
        stats = await pc.getStats()
        conn.packets_lost = sum(getattr(r, "packetsLost", 0) or 0 for r in stats.values()
                                if getattr(r, "type", "") == "inbound-rtp")
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await pc.close()
    return conn


# ---------------------------------------------------------------------------- the child's resources
def proc_sample(pid: int) -> tuple[float, int, int]:
    """(RSS MB, open fds, threads) of a process, from /proc."""
    rss_kb = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")), threads


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    t = np.array([s[0] for s in samples])
    y = np.array([s[1] for s in samples])
    return float(np.polyfit(t / 60, y, 1)[0])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------------- the run
async def soak(base: str, pid: int, minutes: float, cycle_s: float) -> dict:
    stop = asyncio.Event()
    resources: list[tuple[float, float, int, int]] = []
    pipeline_latency: list[tuple[float, float]] = []
    server_viewers: dict[int, dict] = {}
    t_start = time.monotonic()
    f_start = await frames_out(base)

    async def sample_resources() -> None:
        while not stop.is_set():
            rss, fds, threads = proc_sample(pid)
            resources.append((time.monotonic() - t_start, rss, fds, threads))
            stats = await get_json(base, "stats")
            for v in stats.get("viewer_streams", []):     # the server's own per-viewer counts (latest)
                server_viewers[v["viewer"]] = v
            if stats.get("latency_ms_median") is not None:
                pipeline_latency.append((stats["latency_ms_median"], stats["latency_ms_max"]))
            try:
                await asyncio.wait_for(stop.wait(), RESOURCE_PERIOD_S)
            except asyncio.TimeoutError:
                pass

    async def cycling() -> list[Connection]:
        done = []
        while not stop.is_set():
            left = minutes * 60 - (time.monotonic() - t_start)
            if left < CONNECT_GRACE_S + 3:
                break
            done.append(await watch(base, min(cycle_s, left), stop))
            await asyncio.sleep(0.5)
        return done

    sampler = asyncio.ensure_future(sample_resources())
    steady_task = asyncio.ensure_future(watch(base, minutes * 60, stop))
    cycling_task = asyncio.ensure_future(cycling())
    steady = await steady_task
    stop.set()
    cycles = await cycling_task
    await sampler
    t_end = time.monotonic()
    f_end = await frames_out(base)
    return {"steady": steady, "cycles": cycles, "resources": resources, "pipeline_latency": pipeline_latency,
            "stats_fps": (f_end - f_start) / (t_end - t_start), "wall_s": t_end - t_start, "t_start": t_start,
            "server_viewers": [server_viewers[k] for k in sorted(server_viewers)]}


def summarise(result: dict) -> dict:
    out: dict = {}
    for name, conns in (("steady", [result["steady"]]), ("cycling", result["cycles"])):
        expected = video = audio = 0
        latency: list[float] = []
        stalls: list[tuple[str, float, float]] = []
        unread = lost = 0
        for c in conns:
            want = set(c.expected())
            expected += len(want)
            video += len(c.video_slots() & want)
            audio += len(c.audio_slots() & want)
            latency += [(arrived - emitted) * 1e3 for _, _, arrived, emitted in c.video if emitted is not None]
            stalls += [(kind, at - result["t_start"], gap) for kind, at, gap in c.stalls()]
            unread += c.unread
            lost += c.packets_lost
        detail = []
        offsets: list[float] = []
        for c in conns:
            want = c.expected()
            got_v, got_a = c.video_slots() & set(want), c.audio_slots() & set(want)
            av = c.av_offsets_ms()
            offsets += av
            gaps_v, gaps_a = c.gaps("video"), c.gaps("audio")
            detail.append({"expected": [want.start, want.stop], "slots_expected": len(want),
                           "video_share": len(got_v) / len(want) if len(want) else float("nan"),
                           "audio_share": len(got_a) / len(want) if len(want) else float("nan"),
                           "av_offset_ms_median": statistics.median(av) if av else None,
                           "av_offset_ms_p99_abs": pct([abs(x) for x in av], 99) if av else None,
                           "sender_reports": {k: len(v) for k, v in c.sender_reports.items()},
                           "video_gaps": gaps_v[:30], "audio_gaps": gaps_a[:30],
                           "unread_stamps": c.unread, "packets_lost": c.packets_lost})
        out[name + "_connections"] = detail
        out[name] = {"connections": len(conns), "slots_expected": expected,
                     "video_share": video / expected if expected else float("nan"),
                     "audio_share": audio / expected if expected else float("nan"),
                     "latency_ms_p50": pct(latency, 50), "latency_ms_p99": pct(latency, 99),
                     "stalls": len(stalls), "stall_list": [(k, round(a, 1), round(g, 2)) for k, a, g in stalls],
                     "unread_stamps": unread, "packets_lost": lost,
                     "av_offset_ms_median": statistics.median(offsets) if offsets else None,
                     "av_offset_ms_p99_abs": pct([abs(x) for x in offsets], 99) if offsets else None,
                     "video_gaps": sum(len(d["video_gaps"]) for d in detail),
                     "audio_gaps": sum(len(d["audio_gaps"]) for d in detail),
                     "longest_gap": max([n for d in detail for _, n in d["video_gaps"] + d["audio_gaps"]],
                                        default=0)}
    steady = result["steady"]
    stamped = np.array([(k, e) for _, k, _, e in steady.video if k is not None], dtype=np.float64)
    if len(stamped) >= 10:
        # A stamp row the codec left stale pairs a slot with another slot's instant: leave those out.
        residual = stamped[:, 1] - stamped[:, 0] / FPS
        fit = stamped[np.abs(residual - np.median(residual)) < 0.1]
        out["output_fps_stamped"] = 1.0 / np.polyfit(fit[:, 0], fit[:, 1], 1)[0]
        out["stamp_outliers"] = int(len(stamped) - len(fit))
    out["output_fps_stats"] = result["stats_fps"]
    res = result["resources"]
    settled = [r for r in res if r[0] >= min(60.0, 0.25 * result["wall_s"])]
    out["rss_mb_start"], out["rss_mb_end"] = (res[0][1], res[-1][1]) if res else (float("nan"),) * 2
    out["rss_mb_per_min"] = slope_per_min([(r[0], r[1]) for r in settled])
    out["rss_series"] = [(round(r[0]), round(r[1], 1)) for r in res]      # (s, MB), every few seconds
    out["fds"] = (min(r[2] for r in res), max(r[2] for r in res)) if res else None
    out["threads"] = (min(r[3] for r in res), max(r[3] for r in res)) if res else None
    lat = result["pipeline_latency"]
    out["pipeline_latency_ms_median"] = statistics.median(m for m, _ in lat) if lat else None
    out["pipeline_latency_ms_max"] = max(x for _, x in lat) if lat else None
    out["wall_s"] = result["wall_s"]
    out["server_viewers"] = result["server_viewers"]
    out["server_viewer_dropped"] = sum(v["video_dropped"] + v["audio_dropped"] for v in result["server_viewers"])
    return out


def print_table(s: dict, args: argparse.Namespace) -> None:
    gen = f"stand-in generator sleeping {args.renderer_delay_s} s" if args.renderer_delay_s is not None \
        else "configured generator"
    print(f"\nsoak — {s['wall_s'] / 60:.1f} min, {gen}, cycling viewer reconnects every {args.cycle_s:g} s")
    print(f"{'viewer':<10}{'conns':>6}{'slots':>8}{'video %':>9}{'audio %':>9}{'lat p50':>9}{'lat p99':>9}"
          f"{'stalls':>7}{'lost pkt':>9}{'unread':>7}")
    for name in ("steady", "cycling"):
        v = s[name]
        print(f"{name:<10}{v['connections']:>6}{v['slots_expected']:>8}{100 * v['video_share']:>9.2f}"
              f"{100 * v['audio_share']:>9.2f}{v['latency_ms_p50']:>9.1f}{v['latency_ms_p99']:>9.1f}"
              f"{v['stalls']:>7}{v['packets_lost']:>9}{v['unread_stamps']:>7}")
    print(f"\nper connection (slots by media timestamp; A/V offset of the same slot from RTCP sender reports)")
    print(f"{'viewer':<10}{'#':>3}{'slots':>7}{'video %':>9}{'audio %':>9}{'A/V ms':>8}{'|A/V| p99':>10}"
          f"{'v gaps':>7}{'a gaps':>7}{'longest':>8}")
    for name in ("steady", "cycling"):
        for i, d in enumerate(s[name + "_connections"]):
            longest = max([n for _, n in d["video_gaps"] + d["audio_gaps"]], default=0)
            med, p99 = d["av_offset_ms_median"], d["av_offset_ms_p99_abs"]
            print(f"{name:<10}{i + 1:>3}{d['slots_expected']:>7}{100 * d['video_share']:>9.2f}"
                  f"{100 * d['audio_share']:>9.2f}{'-' if med is None else f'{med:+.1f}':>8}"
                  f"{'-' if p99 is None else f'{p99:.1f}':>10}{len(d['video_gaps']):>7}{len(d['audio_gaps']):>7}"
                  f"{longest:>8}")
    print("(A/V ms: median of video − audio time of the same slot, + = picture late; gaps: runs of missing "
          "expected slots; longest: in slots)")
    for name in ("steady", "cycling"):
        if s[name]["stall_list"]:
            print(f"  {name} stalls (track, at s, gap s): {s[name]['stall_list'][:10]}")
    print("(slots: expected while connected, less "
          f"{CONNECT_GRACE_S:g} s connect grace and {IN_FLIGHT_S:g} s in flight; lat: sink → viewer, ms; stalls: "
          f"gaps > {STALL_S:g} s; lost pkt: RTP packets lost; unread: frames whose stamp the codec left stale)")
    fps = s.get("output_fps_stamped")
    print(f"output fps (sink clock): {fps:.4f}" if fps else "output fps (sink clock): -",
          f"| (server frames_out / wall): {s['output_fps_stats']:.4f}")
    print(f"pipeline latency voice → sink: median {s['pipeline_latency_ms_median']} ms, max "
          f"{s['pipeline_latency_ms_max']} ms")
    print(f"child RSS {s['rss_mb_start']:.0f} → {s['rss_mb_end']:.0f} MB, slope {s['rss_mb_per_min']:+.2f} MB/min | "
          f"fds {s['fds']} | threads {s['threads']}")
    print(f"server's per-viewer queues (/stats, last seen every {RESOURCE_PERIOD_S:g} s): "
          f"{len(s['server_viewers'])} viewers, {s['server_viewer_dropped']} items dropped")
    print(f"SIGTERM → exit: {s['exit_s']:.2f} s, exit code {s['exit_code']}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--cycle-s", type=float, default=20.0, help="the cycling viewer stays this long per connection")
    ap.add_argument("--renderer-delay-s", type=float, default=None,
                    help="use a stand-in generator that sleeps this long per frame (no networks)")
    ap.add_argument("--config", type=Path, help="TOML config for the session")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--log", type=Path, help="the session's log (default: a temporary file)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args)

    port = free_port()
    log_path = args.log or Path(tempfile.mkstemp(prefix="soak-", suffix=".log")[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(port)]
    if args.renderer_delay_s is not None:
        cmd += ["--renderer-delay-s", str(args.renderer_delay_s)]
    if args.config:
        cmd += ["--config", str(args.config)]
    for item in args.set:
        cmd += ["--set", item]
    base = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=Path(__file__).resolve().parent.parent)
        try:
            deadline = time.monotonic() + 300
            while True:
                if child.poll() is not None:
                    raise SystemExit(f"the session exited ({child.returncode}) before serving; see {log_path}")
                try:
                    if asyncio.run(get_json(base, "stats")).get("frames_out", 0) > 0:
                        break               # warmed up, and slots are going out
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the session did not come up in 300 s; see {log_path}")
                time.sleep(0.5)
            result = asyncio.run(soak(base, child.pid, args.minutes, args.cycle_s))
            summary = summarise(result)
            t = time.monotonic()
            child.send_signal(signal.SIGTERM)
            summary["exit_code"] = child.wait(60)
            summary["exit_s"] = time.monotonic() - t
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    print_table(summary, args)
    print(f"session log: {log_path}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
