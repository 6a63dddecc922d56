"""The studio's "share to room" switched on and off on a running session: what a toggle costs.

A studio (tests/studio_support.py: the cheap painting renderer, an aiortc "browser" sending a tone) runs
one session and a light view-only viewer of it (bench/slot_truth.py `RtpSlots`: slots from RTP
timestamps). The session is then switched on air and off `--cycles` times (`POST /sessions/ID/share`)
against tests/whip_server.py's WHIP server on 127.0.0.1, or with `--janus` the real Janus +
simple-whip-server (tests/janus_support.py, needs root). Per cycle it prints: the on request's round
trip (ms), the time from it until the share is "publishing" (the WHIP POST answered and ICE connected),
until the first shared frame arrived at the fake server (not measured with Janus), the off request's
round trip (it returns once the WHIP resource is DELETEd), and the viewer's slots missing within half
a second (12 slots) of either toggle. Last, the viewer's totals over the whole run.

Usage: python bench/room_toggle.py [--cycles 5] [--on-s 3] [--off-s 2] [--janus]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.studio_support import Client, base, http, start_studio  # noqa: E402
from tests.test_room_share import _share, _slot_at, _stats, _watch_view  # noqa: E402
from tests.whip_server import FakeWhipServer  # noqa: E402

VIEWER_URL = "http://127.0.0.1:8080/static/room.html?janus=http://127.0.0.1:8088/janus&room=1234"


async def _until(condition, timeout: float) -> float | None:
    """Seconds until `condition()` (polled every 10 ms), None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await condition():
            return time.monotonic() - t0
        await asyncio.sleep(0.01)
    return None


async def _bench(srv, fake: FakeWhipServer | None, cycles: int, on_s: float, off_s: float):
    owner = Client(srv)
    status, created = await owner.create()
    assert status == 201, created
    await owner.connect()
    await owner.wait_frames()
    pc, slots = await _watch_view(srv, created)
    rows, toggles = [], []
    try:
        await asyncio.sleep(2.0)
        for _ in range(cycles):
            before = len(fake.slots) if fake is not None else 0
            t0 = time.monotonic()
            status, _ = await _share(srv, created, True)
            on_ms = 1000 * (time.monotonic() - t0)
            toggles.append(t0)
            assert status == 200

            async def publishing():
                return (await _stats(srv, owner)).get("share_state") == "publishing"

            async def first_frame():
                return len(fake.slots) > before
            live = await _until(publishing, 30)
            first = await _until(first_frame, 30) if fake is not None else None
            await asyncio.sleep(on_s)
            t1 = time.monotonic()
            status, _ = await _share(srv, created, False)
            off_ms = 1000 * (time.monotonic() - t1)
            toggles.append(t1)
            assert status == 200
            rows.append({"on_ms": on_ms, "publishing_ms": None if live is None else 1000 * live + on_ms,
                         "first_frame_ms": None if first is None else 1000 * first + on_ms, "off_ms": off_ms})
            await asyncio.sleep(off_s)
    finally:
        await pc.close()
        await http("POST", base(srv) + f"sessions/{created['id']}/stop", json={"secret": created["secret"]})
        await owner.close()
    got = slots.video_slots()
    missing = sorted(set(range(got[0], got[-1] + 1)) - set(got)) if got else []
    for i, row in enumerate(rows):
        near = 0
        for instant in toggles[2 * i: 2 * i + 2]:
            k = _slot_at(slots, instant)
            near += 0 if k is None else sum(1 for m in missing if abs(m - k) <= 12)
        row["missing_near"] = near
    return rows, got, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--on-s", type=float, default=3.0)
    parser.add_argument("--off-s", type=float, default=2.0)
    parser.add_argument("--janus", action="store_true", help="the real Janus + simple-whip-server (root)")
    args = parser.parse_args()
    stack = fake = None
    if args.janus:
        import tempfile

        from tests.janus_support import JanusStack, missing_reason
        reason = missing_reason()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 1
        stack = JanusStack(Path(tempfile.mkdtemp(prefix="room-toggle-")))
        stack.start()
        overrides = {"whip.endpoint": stack.whip_url, "whip.token": stack.token,
                     "server.ice_host_addresses": [stack.host_address]}
    else:
        fake = FakeWhipServer().start()
        overrides = {"whip.endpoint": fake.url, "whip.token": "good", "server.ice_host_addresses": ["127.0.0.1"]}
    overrides["whip.viewer_url"] = VIEWER_URL
    srv, _, renderer = start_studio(overrides=overrides, lost_timeout_s=20.0)
    try:
        rows, got, missing = asyncio.run(_bench(srv, fake, args.cycles, args.on_s, args.off_s))
    finally:
        srv.stop()
        renderer.stop()
        if fake is not None:
            fake.stop()
        if stack is not None:
            stack.stop()
    print(f"share to room on a running session, {args.cycles} cycles against "
          f"{'Janus + simple-whip-server' if args.janus else 'the fake WHIP server'} (times from the request)")
    print(f"{'cycle':>5}{'on ms':>9}{'publishing ms':>15}{'1st frame ms':>14}{'off ms':>9}{'missing near':>14}")

    def cell(v, w):
        return f"{'-' if v is None else f'{v:.0f}':>{w}}"
    for i, r in enumerate(rows, 1):
        print(f"{i:>5}{cell(r['on_ms'], 9)}{cell(r['publishing_ms'], 15)}{cell(r['first_frame_ms'], 14)}"
              f"{cell(r['off_ms'], 9)}{r['missing_near']:>14}")
    med = {k: statistics.median(r[k] for r in rows if r[k] is not None) if any(r[k] is not None for r in rows)
           else None for k in ("on_ms", "publishing_ms", "first_frame_ms", "off_ms")}
    print(f"{'med':>5}{cell(med['on_ms'], 9)}{cell(med['publishing_ms'], 15)}{cell(med['first_frame_ms'], 14)}"
          f"{cell(med['off_ms'], 9)}{sum(r['missing_near'] for r in rows):>14}")
    span = (got[-1] - got[0] + 1) if got else 0
    print(f"viewer: {len(got)} of {span} slots received in order={got == sorted(set(got))}, "
          f"{len(missing)} missing over the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
