"""The studio across a Ray cluster: placement, offer→answer latency through the front door, failover.

For each worker count W (default 2 and 4) it starts a local loopback cluster of two nodes with W/2
`render_slot`s each (or joins `--address` once, with the workers its nodes already offer), a
`FrontDoor` on 127.0.0.1, and prints:

* placed: sessions created per worker when W × max_sessions sessions are asked for (then one more: 503),
* offer→answer: median / p95 ms of an aiortc offer POSTed through the front door (create + offer,
  each offer a fresh session) vs the same on one single-process studio in this process (direct),
* WHEP POST→201: median / p95 ms of a WHEP viewer's raw-SDP POST through the front door (its DELETE
  then sent to the rewritten Location) vs the same on the single-process studio,
* failover: from kill -9 of a worker hosting a session to a new session created on a live worker
  (ms), and until Ray's restart of the killed worker answers again (s).

Workers use the paint renderer (tests/cluster_support.py) unless `--networks`: the networks then load in
each worker from its node's config (`--set model.checkpoint_dir=…`), as on real GPU nodes.

Usage (this box):   python bench/cluster.py [--workers 2,4] [--offers 8]
On N GPU nodes:     ray start --head --port 6379 --num-gpus 1   (first node)
                    ray start --address HEAD:6379 --num-gpus 1  (every other node)
                    python bench/cluster.py --address HEAD:6379 --networks
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def _offer_ms(door, runs: int) -> list[float]:
    from aiortc import RTCConfiguration, RTCPeerConnection
    from stream.webrtc import use_host_addresses
    from tests.studio_support import LOOPBACK, ToneTrack, base, http

    out = []
    for _ in range(runs):
        status, sess = await http("POST", base(door) + "sessions?sample=1")
        if status != 201:
            raise SystemExit(f"error: create refused: {sess}")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(ToneTrack())
        pc.addTransceiver("video", direction="recvonly")
        use_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createOffer())
        t0 = time.perf_counter()
        status, answer = await http("POST", base(door) + f"sessions/{sess['id']}/offer",
                                    json={"sdp": pc.localDescription.sdp, "type": "offer", "secret": sess["secret"]})
        out.append((time.perf_counter() - t0) * 1e3)
        await pc.close()
        await http("POST", base(door) + f"sessions/{sess['id']}/stop", json={"secret": sess["secret"]})
        if status != 200:
            raise SystemExit(f"error: offer refused: {answer}")
    return out


async def _whep_ms(door, runs: int) -> list[float]:
    """WHEP POST (raw SDP, bearer view key) → 201 + answer, each on a fresh session; the resource is
    DELETEd through the Location it came with (through the door: its rewritten path)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection
    from stream.webrtc import use_host_addresses
    from tests.studio_support import LOOPBACK, base, http

    out = []
    async with aiohttp.ClientSession() as client:
        for _ in range(runs):
            status, sess = await http("POST", base(door) + "sessions?sample=1")
            if status != 201:
                raise SystemExit(f"error: create refused: {sess}")
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            use_host_addresses(pc, LOOPBACK)
            await pc.setLocalDescription(await pc.createOffer())
            auth = {"Authorization": f"Bearer {sess['view']}"}
            t0 = time.perf_counter()
            async with client.post(base(door) + f"sessions/{sess['id']}/whep", data=pc.localDescription.sdp,
                                   headers={**auth, "Content-Type": "application/sdp"}) as r:
                status, location, text = r.status, r.headers.get("Location"), await r.text()
            out.append((time.perf_counter() - t0) * 1e3)
            if status != 201:
                raise SystemExit(f"error: WHEP offer refused: {status} {text}")
            async with client.delete(base(door) + location.lstrip("/"), headers=auth) as r:
                if r.status != 200:
                    raise SystemExit(f"error: WHEP DELETE of {location}: {r.status}")
            await pc.close()
            await http("POST", base(door) + f"sessions/{sess['id']}/stop", json={"secret": sess["secret"]})
    return out


async def _wait_idle(door, n: int, timeout: float = 180.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = await door.infos()
        if len(infos) >= n and all(i["free"] == i["max_sessions"] for i in infos):
            return infos
        await asyncio.sleep(0.25)
    raise SystemExit(f"error: {n} idle workers did not come up within {timeout:.0f} s")


async def _measure(door, n: int, offers: int) -> dict:
    from tests.studio_support import base, http

    infos = await _wait_idle(door, n)
    capacity = sum(i["max_sessions"] for i in infos)
    made = []
    for _ in range(capacity):
        status, sess = await http("POST", base(door) + "sessions?sample=1")
        if status == 201:
            made.append(sess)
    full, _ = await http("POST", base(door) + "sessions?sample=1")
    placed = Counter(s["worker"] for s in made)
    for s in made:
        await http("POST", base(door) + f"sessions/{s['id']}/stop", json={"secret": s["secret"]})
    await _wait_idle(door, n)
    via_door = await _offer_ms(door, offers)
    whep_door = await _whep_ms(door, offers)
    # failover
    status, sess = await http("POST", base(door) + "sessions?sample=1")
    victim = next(i for i in await door.infos() if i["name"] == sess["worker"])
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.perf_counter()
    while True:
        status, again = await http("POST", base(door) + "sessions?sample=1")
        if status == 201:
            break
        await asyncio.sleep(0.05)
    failover_ms = (time.perf_counter() - t0) * 1e3
    await http("POST", base(door) + f"sessions/{again['id']}/stop", json={"secret": again["secret"]})
    while not any(i["name"] == victim["name"] and i["boot"] != victim["boot"] for i in await door.infos()):
        await asyncio.sleep(0.2)
    rejoin_s = time.perf_counter() - t0
    return {"placed": placed, "capacity": capacity, "full": full, "door": via_door, "whep": whep_door,
            "failover_ms": failover_ms, "rejoin_s": rejoin_s}


def _direct_ms(offers: int) -> tuple[list[float], list[float]]:
    from tests.studio_support import start_studio
    srv, _, renderer = start_studio(max_sessions=2)
    try:
        return asyncio.run(_offer_ms(srv, offers)), asyncio.run(_whep_ms(srv, offers))
    finally:
        srv.stop()
        renderer.stop()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="2,4", help="comma-separated worker counts for local clusters")
    ap.add_argument("--address", help="an existing Ray cluster (its workers are used as they are)")
    ap.add_argument("--networks", action="store_true", help="real networks in the workers (else the paint renderer)")
    ap.add_argument("--max-sessions", type=int, default=2, help="sessions per worker")
    ap.add_argument("--offers", type=int, default=8, help="offers timed per setting")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="workers' config keys")
    args = ap.parse_args()
    if not args.address:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"       # everything on 127.0.0.1
        os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    import ray
    from pcavs_live.cli.config import dotted_overrides, load_config
    from pcavs_live.cluster.frontdoor import FrontDoor
    from pcavs_live.cluster.pool import WorkerPool, connect, node_slots
    from tests.cluster_support import paint_backend

    overrides = {"server.max_sessions": args.max_sessions, "pose.smoothing": 0.0, **dotted_overrides(args.set)}
    backend = None if args.networks else paint_backend
    direct, whep_direct = _direct_ms(args.offers)
    rows = []
    for n in ([None] if args.address else [int(x) for x in args.workers.split(",")]):
        cluster = None
        if args.address:
            connect(args.address)
            n = sum(node_slots(x) for x in ray.nodes() if x.get("Alive"))
        else:
            from ray.cluster_utils import Cluster
            node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
            cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False,
                                                                    "resources": {"render_slot": n - n // 2}})
            cluster.add_node(**node, resources={"render_slot": n // 2})
            connect(cluster.address, "127.0.0.1")
        pool = WorkerPool(load_config(None, overrides), backend=backend)
        door = FrontDoor(pool, port=0).start()
        try:
            rows.append((n, asyncio.run(_measure(door, n, args.offers))))
        finally:
            door.stop()
            pool.shutdown()
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()

    print(f"\noffer→answer, single-process studio (direct): median {statistics.median(direct):.0f} ms, "
          f"p95 {_pct(direct, 0.95):.0f} ms over {len(direct)}; WHEP POST→201 median "
          f"{statistics.median(whep_direct):.0f} ms, p95 {_pct(whep_direct, 0.95):.0f} ms")
    print("| workers | sessions placed per worker | full → | offer→answer via door (median / p95) "
          "| vs direct | WHEP POST→201 via door (median / p95) | vs direct | failover (new session) "
          "| killed worker rejoins |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in rows:
        placed = ", ".join(str(v) for _, v in sorted(r["placed"].items()))
        d = r["door"]
        print(f"| {n} | {placed} (of {r['capacity']}) | {r['full']} | {statistics.median(d):.0f} / "
              f"{_pct(d, 0.95):.0f} ms | +{statistics.median(d) - statistics.median(direct):.0f} ms "
              f"| {statistics.median(r['whep']):.0f} / {_pct(r['whep'], 0.95):.0f} ms "
              f"| +{statistics.median(r['whep']) - statistics.median(whep_direct):.0f} ms "
              f"| {r['failover_ms']:.0f} ms | {r['rejoin_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
