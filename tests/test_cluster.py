"""The studio across a Ray cluster (pcavs_live/cluster): a two-node local cluster on loopback
(`ray.cluster_utils.Cluster`, one `render_slot` per node), workers with the paint renderer, aiortc
clients through the front door. Skips when Ray is not installed (`pip install "pcavs-live[cluster]"`)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time

import cv2
import numpy as np
import pytest

# Before Ray is imported: no usage reporting, and every Ray address on loopback (Ray otherwise
# replaces 127.0.0.1 with the default route's address).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "pcavs-live[cluster]")')

from pcavs_live.cli.config import load_config  # noqa: E402
from pcavs_live.cluster.frontdoor import WORKER_GONE, FrontDoor  # noqa: E402
from pcavs_live.cluster.pool import WorkerPool, connect  # noqa: E402
from tests.cluster_support import paint_backend  # noqa: E402
from tests.studio_support import Client, base, http, run  # noqa: E402
from tests.test_browser_viewer import REPO  # noqa: E402

NODE = {"num_cpus": 1, "resources": {"render_slot": 1}, "node_ip_address": "127.0.0.1"}
OVERRIDES = {"server.max_sessions": 1, "pose.smoothing": 0.0, "server.ice_host_addresses": ["127.0.0.1"]}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")  # workers import tests.*
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    c.add_node(**NODE)
    connect(c.address, "127.0.0.1")
    pool = WorkerPool(load_config(None, OVERRIDES), backend=paint_backend)
    door = FrontDoor(pool, port=0).start()
    try:
        run(_wait_workers(door, 2), timeout=150)
        yield c, pool, door
    finally:
        door.stop()
        pool.shutdown()
        ray.shutdown()
        c.shutdown()


async def _wait_workers(door: FrontDoor, n: int, timeout: float = 140.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = await door.infos()
        if len(infos) >= n and all(i["free"] == i["max_sessions"] for i in infos):
            return infos
        await asyncio.sleep(0.5)
    raise AssertionError(f"{n} idle workers did not come up: {await door.infos()}")


def _photo(bgr: tuple[int, int, int]) -> bytes:
    img = np.zeros((256, 256, 3), np.uint8)
    img[:] = bgr
    img[96:160, 96:160] = 60          # not flat: the anchor detector finds a "face"
    return cv2.imencode(".png", img)[1].tobytes()


async def _stop(door: FrontDoor, *clients: Client) -> None:
    for c in clients:
        if c.session is not None:
            await http("POST", base(door) + f"sessions/{c.session['id']}/stop", json={"secret": c.session["secret"]})
        await c.close()


def test_two_clients_on_different_workers_each_its_own_face_then_full(cluster):
    _, _, door = cluster

    async def body():
        a, b = Client(door), Client(door)
        try:
            assert (await a.create())[0] == 201
            assert (await b.create(_photo((30, 30, 220))))[0] == 201     # red in RGB
            assert a.session["worker"] != b.session["worker"]           # most free slots first
            status, refusal = await Client(door).create()
            assert status == 503 and "the cluster is full: 2 of 2" in refusal["error"]
            await a.connect()
            await b.connect()
            fa, fb = await a.wait_frames(40), await b.wait_frames(40)
            ca, cb = fa.reshape(-1, 3).mean(0), fb.reshape(-1, 3).mean(0)
            assert cb[0] > 150 and cb[2] < 80, cb                       # b: its red photo
            assert np.abs(ca - cb).max() > 60, (ca, cb)                 # a: the sample's colour
            st, stats = await http("GET", base(door) + f"sessions/{a.session['id']}/stats?secret="
                                   + a.session["secret"])
            assert st == 200 and stats["worker"] == a.session["worker"] and stats["connected"]
            st, _ = await http("GET", base(door) + f"sessions/{a.session['id']}/stats?secret=" + b.session["secret"])
            assert st == 403                                            # keys are checked across the hop
        finally:
            await _stop(door, a, b)
        await _wait_workers(door, 2, timeout=30)

    run(body(), timeout=120)


def test_worker_accepts_no_session_without_the_front_doors_token(cluster):
    _, pool, _ = cluster
    actor = next(iter(pool.workers.values()))
    status, body = ray.get(actor.call.remote("POST", "/sessions", {"sample": "1"}, b""), timeout=30)
    assert status == 403, body


def test_killed_worker_ends_its_session_new_one_lands_on_the_other_and_it_rejoins(cluster):
    _, _, door = cluster

    async def body():
        a = Client(door)
        try:
            assert (await a.create())[0] == 201
            await a.connect()
            await a.wait_frames(40)
            victim = next(i for i in await door.infos() if i["name"] == a.session["worker"])
            os.kill(victim["pid"], signal.SIGKILL)
            # The page's next stats poll says why the session ended.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st, gone = await http("GET", base(door) + f"sessions/{a.session['id']}/stats?secret="
                                      + a.session["secret"])
                if st == 410:
                    break
                await asyncio.sleep(0.2)
            assert st == 410 and gone["error"] == WORKER_GONE
            # A new session lands on the live worker within 5 s of the kill.
            b = Client(door)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and b.session is None:
                await b.create()
                await asyncio.sleep(0.1)
            assert b.session is not None, "no worker took the new session within 5 s"
            assert b.session["worker"] != victim["name"]
            await b.connect()
            await b.wait_frames(40)
            await _stop(door, b)
            # Ray restarts the killed worker (a new process, a new boot) and it rejoins the pool.
            infos = await _wait_workers(door, 2, timeout=120)
            back = next(i for i in infos if i["name"] == victim["name"])
            assert back["pid"] != victim["pid"] and back["boot"] != victim["boot"]
        finally:
            await a.close()

    run(body(), timeout=240)


def test_front_door_restart_loses_no_worker_nor_session(cluster):
    _, pool, door = cluster

    async def body():
        a = Client(door)
        assert (await a.create())[0] == 201
        second = FrontDoor(WorkerPool(load_config(None, OVERRIDES), backend=paint_backend), port=0).start()   # finds them by name
        try:
            assert sorted(second.pool.workers) == sorted(pool.workers)
            st, stats = await http("GET", base(second) + f"sessions/{a.session['id']}/stats?secret="
                                   + a.session["secret"])
            assert st == 200 and stats["worker"] == a.session["worker"]
            st, _ = await http("POST", base(second) + f"sessions/{a.session['id']}/stop",
                               json={"secret": a.session["secret"]})
            assert st == 200
        finally:
            second.stop()
        await _wait_workers(door, 2, timeout=30)

    run(body(), timeout=120)


def test_a_whep_viewer_watches_a_session_through_the_door(cluster):
    """WHEP through the door across Ray: raw SDP there and back, the Location rewritten to the door's
    path (its DELETE routed to the worker), media straight from the worker's peer."""
    from stream.whep import WhepClient
    _, _, door = cluster

    async def body():
        a = Client(door)
        try:
            assert (await a.create())[0] == 201
            await a.connect()
            await a.wait_frames(40)
            endpoint = base(door) + a.session["whep"].lstrip("/")
            async with WhepClient(endpoint, a.session["view"], ice_host_addresses=["127.0.0.1"],
                                  connect_timeout_s=20) as viewer:
                assert viewer.resource.startswith(endpoint + "/")
                deadline = time.monotonic() + 30
                while viewer.video_frames < 10 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert viewer.video_frames >= 10 and viewer.audio_frames > 0
            st, stats = await http("GET", base(door) + f"sessions/{a.session['id']}/stats?view=" + a.session["view"])
            assert st == 200 and stats["viewers"] == 0                  # the DELETE reached the worker
        finally:
            await _stop(door, a)
        await _wait_workers(door, 2, timeout=30)

    run(body(), timeout=150)


def test_twenty_create_stop_cycles_leave_rss_flat(cluster):
    _, pool, door = cluster

    def rss() -> list[int]:
        """Each worker's, then the front door's (this process)."""
        with open("/proc/self/statm") as f:
            door_rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return ray.get([a.rss_bytes.remote() for a in pool.workers.values()], timeout=30) + [door_rss]

    async def cycles(n: int) -> None:
        for _ in range(n):
            c = Client(door)
            status, body = await c.create()
            assert status == 201, body
            await _stop(door, c)

    run(cycles(4), timeout=120)            # warm-up: first-use allocations
    before = rss()
    run(cycles(20), timeout=240)
    after = rss()
    growth = [(b - a) / 2**20 for a, b in zip(before, after)]
    assert max(growth) < 25, f"RSS (workers, front door) grew by {growth} MiB over 20 cycles"
    run(_wait_workers(door, 2, timeout=30))


def test_doctor_cluster_report_lists_workers_and_free_capacity(cluster):
    c, pool, door = cluster
    from pcavs_live.cluster.pool import cluster_report
    run(_wait_workers(door, 2, timeout=60))
    text, code = cluster_report(c.address)
    assert code == 0
    for name in pool.workers:
        assert f"worker {name}: 0 of 1 sessions, 1 free" in text, text
    assert text.count("1 render slots") == 2, text


def test_worker_with_the_real_networks_on_stand_in_weights():
    """The worker's default backend (network_backend: networks loaded in the worker, one shared renderer,
    the studio's sessions), run in this process: the sample session is a real Avatar; admission holds."""
    from pcavs_live.cluster.worker import RenderWorker
    from tests.conftest import parity_weights_dir

    worker = RenderWorker("render-smoke-0", load_config(None, {"model.checkpoint_dir": str(parity_weights_dir(0)),
                                                               "model.device": "cpu", "server.max_sessions": 1}))
    try:
        status, body = worker.call("POST", "/sessions", {"sample": "1"}, b"", token=True)
        assert status == 201, body
        session = worker.server._sessions[body["id"]].runtime
        assert session.avatar.id_map.shape == (512, 7, 7)
        assert worker.info()["free"] == 0
        assert worker.call("POST", "/sessions", {"sample": "1"}, b"", token=True)[0] == 503
        status, _ = worker.call("POST", f"/sessions/{body['id']}/stop", {}, json.dumps(
            {"secret": body["secret"]}).encode())
        assert status == 200
    finally:
        worker.stop()


@pytest.mark.parametrize("address, says", [("127.0.0.1:1", "cannot reach the Ray cluster at '127.0.0.1:1'"),
                                           ("nonsense", "--cluster 'nonsense' is not HOST:PORT")])
def test_serve_cluster_with_a_wrong_address_is_one_error_line(address, says, capsys):
    from pcavs_live.cli.serve import main
    assert main(["--cluster", address, "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + says), err


STATUS_LOG = """() => { window.statusLog = []; const el = document.getElementById('status');
  new MutationObserver(() => window.statusLog.push(el.textContent)).observe(el, {childList: true, characterData: true, subtree: true}); }"""


@pytest.mark.integration
def test_page_shows_why_and_starts_anew_on_a_live_worker_when_its_worker_dies(cluster):
    """The studio page through the front door (headless Chromium, fake microphone): its worker is
    killed; the page says why and starts a new session by itself, on the other worker."""
    from tests.test_browser_viewer import CHROMIUM, CHROMIUM_ARGS
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt install chromium)")
    from playwright.sync_api import sync_playwright
    _, _, door = cluster
    run(_wait_workers(door, 2, timeout=60))
    speech = REPO / "assets" / "sample" / "speech.wav"
    args = CHROMIUM_ARGS + ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                            f"--use-file-for-fake-audio-capture={speech}"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, timeout=20_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(base(door))
            page.check("input[value=sample]")
            page.click("#start")
            page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
            first = page.evaluate("window.studio.session.id")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:     # Playwright's loop runs in this thread
                infos = pool.submit(run, door.infos()).result(30)
            victim = next(i for i in infos if first.startswith(i["name"] + "."))
            page.evaluate(STATUS_LOG)
            os.kill(victim["pid"], signal.SIGKILL)
            page.wait_for_function(f"() => window.studio.session && window.studio.session.id !== '{first}' "
                                   "&& document.getElementById('status').textContent === 'live'")
            second = page.evaluate("window.studio.session.id")
            assert not second.startswith(victim["name"] + "."), (first, second)
            assert any(WORKER_GONE in text for text in page.evaluate("window.statusLog")), \
                page.evaluate("window.statusLog")
            page.click("#stop")
            page.wait_for_function("() => !document.getElementById('start').disabled")
        finally:
            browser.close()
    run(_wait_workers(door, 2, timeout=120))


def test_a_node_that_joins_later_adds_its_worker_and_leaving_removes_it(cluster):
    c, pool, door = cluster
    node = c.add_node(**NODE)
    try:
        infos = run(_wait_workers(door, 3, timeout=120), timeout=150)    # the door's reconcile found it
        assert len({i["name"] for i in infos}) == 3
        status, body = run(http("GET", base(door) + "stats"))
        assert status == 200 and body["max_sessions"] == 3
    finally:
        c.remove_node(node)
    deadline = time.monotonic() + 60
    while len(pool.workers) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(pool.workers) == 2
