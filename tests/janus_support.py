"""A real Janus + simple-whip-server in a network namespace of their own, for the WHIP tests and bench/whip.py.

Janus's ICE (libnice) never gathers candidates on loopback, so on the machine's own namespace its media
would use the machine's outward address. Instead `TestNetns` (root, `ip netns`) creates a namespace with
a unique name, a veth pair with a random /30 inside 10.213.0.0/16 (host side `.1` in the root namespace,
`.2` inside), `lo` up and no default route: from inside, only our own host-side address is reachable.
`JanusStack` writes a generated Janus configuration (the VideoRoom plugin with one room, the HTTP API
on the namespace's veth address, the WebSocket API on the namespace's loopback for simple-whip-server,
`nat.ice_enforce_list` = the veth address, no STUN server) into a temporary folder, starts `janus` and
Debian's simple-whip-server (node) inside the namespace (`ip netns exec`), waits until both answer
(bounded), creates one WHIP endpoint mapped to the room, and stops both and deletes the namespace (and
with it the veth pair) on `stop`. `restart_janus` stops and starts Janus alone, which is what a
publisher must survive. Our publisher and subscribers gather ICE candidates on `host_address` only
(`ice_host_addresses`), so every packet of a test is addressed to loopback or to our veth pair.

`VideoRoomSubscriber` is one viewer through Janus's VideoRoom HTTP API (create session → attach →
join as subscriber → answer Janus's offer with aiortc → start), receiving the published video and audio.

Debian's simple-whip-server lives in /usr/share/simple-whip-server and has no launcher; its config is
`src/config.js`. Where apt cannot install it (a non-Debian nodejs), `scripts/setup.sh --dev` unpacks the
package into `.deps/simple-whip-server` and installs its Node dependencies there; that copy is used
first. SIMPLE_WHIP_SERVER_DIR overrides both. We copy its two source files next to a generated
config.js and bind its HTTP API to the namespace's address (upstream listens on every interface).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WHIP_DIRS = [PROJECT_ROOT / ".deps" / "simple-whip-server", Path("/usr/share/simple-whip-server")]
ROOM = 1234
READY_TIMEOUT_S = 20.0
JANUS_HTTP_PORT, JANUS_WS_PORT, WHIP_PORT = 8088, 8188, 7080     # inside the namespace: always free
RTP_RANGE = (20000, 20999)


def whip_dir() -> Path:
    """Where simple-whip-server's `src/server.js` is: $SIMPLE_WHIP_SERVER_DIR, else .deps/, else /usr/share."""
    if os.environ.get("SIMPLE_WHIP_SERVER_DIR"):
        return Path(os.environ["SIMPLE_WHIP_SERVER_DIR"])
    for candidate in WHIP_DIRS:      # the local copy only once setup.sh finished it (its stamp)
        if (candidate / "src" / "server.js").is_file() and (candidate.parent.name != ".deps"
                                                             or (candidate / ".setup.sha256").is_file()):
            return candidate
    return WHIP_DIRS[-1]


def missing_reason() -> str | None:
    """Why the stack cannot run here (one line), or None."""
    if shutil.which("janus") is None:
        return "janus is not installed (Debian package 'janus'; scripts/setup.sh --dev installs it)"
    lib = _janus_lib()
    if lib is None or not (lib / "plugins" / "libjanus_videoroom.so").exists():
        return "the Janus VideoRoom plugin is missing (Debian package 'janus')"
    where = whip_dir()
    if not (where / "src" / "server.js").is_file():
        return (f"simple-whip-server is not installed in {where} (Debian package 'simple-whip-server'; "
                "scripts/setup.sh --dev installs it)")
    if shutil.which("node") is None:
        return "node is not installed (simple-whip-server runs on Node.js)"
    return netns_missing_reason()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def netns_missing_reason() -> str | None:
    """Why this process cannot create a network namespace with a veth pair (one line), or None."""
    if shutil.which("ip") is None:
        return "the 'ip' command is missing (Debian package 'iproute2'); Janus runs in a network namespace"
    probe = TestNetns()
    try:
        probe.create()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace with a veth pair for Janus (needs root): {exc}"
    finally:
        probe.delete()
    return None


def _disable_ipv6(interface: str) -> None:
    try:
        Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6").write_text("1")
    except OSError:
        pass             # no IPv6 on this kernel: nothing to disable


class TestNetns:
    """A network namespace with a unique name, joined to the root namespace by a veth pair on a random
    /30 in 10.213.0.0/16 (`host_address` here, `ns_address` inside); `lo` up, no default route."""

    __test__ = False     # not a pytest class

    PREFIX = "pcavs-whip-"

    def __init__(self) -> None:
        tag = secrets.token_hex(4)
        self.name = f"{self.PREFIX}{os.getpid()}-{tag}"          # the creator's pid: see remove_stale
        self.host_if, self.ns_if = f"pw{tag}h", f"pw{tag}n"       # ≤ 15 characters
        self.host_address = self.ns_address = ""
        self.created = False

    @classmethod
    def remove_stale(cls) -> list[str]:
        """Delete the namespaces (and with them their veth pairs) left by runs whose process is gone
        (killed before its finalizer ran); those of live processes are left alone. Returns their names."""
        removed = []
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            pid = name[len(cls.PREFIX):].split("-")[0]
            if name.startswith(cls.PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _ip("netns", "del", name, check=False)
                removed.append(name)
        return removed

    def _pick_subnet(self) -> tuple[str, str]:
        used = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
        for _ in range(100):
            third, fourth = secrets.randbelow(256), 4 * secrets.randbelow(64)
            prefix = f"10.213.{third}."
            if f"{prefix}{fourth + 1}" not in used and f"{prefix}{fourth}/30" not in used:
                return f"{prefix}{fourth + 1}", f"{prefix}{fourth + 2}"
        raise RuntimeError("no free /30 in 10.213.0.0/16")

    def create(self) -> "TestNetns":
        self.remove_stale()
        self.host_address, self.ns_address = self._pick_subnet()
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        # IPv4 only on the pair: no IPv6 link-local chatter (router solicitations) on it
        _disable_ipv6(self.host_if)
        subprocess.run(self.command("sysctl", "-qw", f"net.ipv6.conf.{self.ns_if}.disable_ipv6=1"),
                       capture_output=True, timeout=10)
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (("link", "set", "lo", "up"), ("addr", "add", f"{self.ns_address}/30", "dev", self.ns_if),
                     ("link", "set", self.ns_if, "up")):
            _ip("-n", self.name, *args)
        return self

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace (ip netns exec execs it: the Popen's pid is the program's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        """Kill what is still running inside (bounded), delete the namespace and the veth pair."""
        if not self.created:
            return
        pids = _ip("netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", self.name, check=False)
        _ip("link", "del", self.host_if, check=False)    # gone with the namespace already, normally
        self.created = False


def _janus_lib() -> Path | None:
    for base in (JANUS_LIB, Path("/usr/lib/janus"), Path("/usr/local/lib/janus"), Path("/opt/janus/lib/janus")):
        if (base / "plugins").is_dir():
            return base
    return None


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class JanusStack:
    """Janus + simple-whip-server in `workdir`, inside their own network namespace (see the module notes)."""

    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    endpoint_id: str = "avatar"
    janus_http_port: int = JANUS_HTTP_PORT
    janus_ws_port: int = JANUS_WS_PORT
    whip_port: int = WHIP_PORT
    rtp_range: tuple[int, int] = RTP_RANGE
    netns: TestNetns = field(default_factory=TestNetns)
    janus: subprocess.Popen | None = None
    whip: subprocess.Popen | None = None

    @property
    def host_address(self) -> str:
        """Our end of the veth pair: the only address our publisher and subscribers gather ICE on."""
        return self.netns.host_address

    @property
    def janus_url(self) -> str:
        return f"http://{self.netns.ns_address}:{self.janus_http_port}/janus"

    @property
    def whip_url(self) -> str:
        return f"http://{self.netns.ns_address}:{self.whip_port}/whip/endpoint/{self.endpoint_id}"

    # ------------------------------------------------------------------ configuration
    def write_config(self) -> None:
        lib = _janus_lib()
        assert lib is not None
        conf = self.workdir / "janus"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "janus.jcfg").write_text(f"""general: {{
    configs_folder = "{conf}"
    plugins_folder = "{lib / 'plugins'}"
    transports_folder = "{lib / 'transports'}"
    events_folder = "{lib / 'events'}"
    loggers_folder = "{lib / 'loggers'}"
    debug_level = 3
    session_timeout = 60
}}
media: {{
    ipv6 = false
    rtp_port_range = "{self.rtp_range[0]}-{self.rtp_range[1]}"
}}
nat: {{
    nice_debug = false
    ice_enforce_list = "{self.netns.ns_address}"
    ignore_mdns = true
}}
loggers: {{
    disable = "libjanus_jsonlog.so"
}}
plugins: {{
    disable = "libjanus_audiobridge.so,libjanus_echotest.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so,libjanus_duktape.so,libjanus_lua.so"
}}
transports: {{
    disable = "libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so"
}}
events: {{
    broadcast = false
}}
""")
        (conf / "janus.transport.http.jcfg").write_text(f"""general: {{
    base_path = "/janus"
    http = true
    port = {self.janus_http_port}
    ip = "{self.netns.ns_address}"
    https = false
}}
admin: {{
    admin_http = false
}}
""")
        (conf / "janus.transport.websockets.jcfg").write_text(f"""general: {{
    ws = true
    ws_port = {self.janus_ws_port}
    ws_ip = "127.0.0.1"
    wss = false
}}
admin: {{
    admin_ws = false
}}
""")
        (conf / "janus.plugin.videoroom.jcfg").write_text(f"""general: {{
}}
room-{ROOM}: {{
    description = "pcavs-live test room"
    publishers = 2
    bitrate = 1000000
    fir_freq = 2
    audiocodec = "opus"
    videocodec = "vp8"
    record = false
}}
""")
        whip = self.workdir / "whip"
        (whip / "src").mkdir(parents=True, exist_ok=True)
        source = whip_dir()
        for name in ("server.js", "whip-janus.js"):
            text = (source / "src" / name).read_text()
            if name == "server.js":  # upstream listens on every interface; only the namespace's veth address here
                text = text.replace("http.listen(config.port, function",
                                    f"http.listen(config.port, '{self.netns.ns_address}', function")
            (whip / "src" / name).write_text(text)
        (whip / "src" / "config.js").write_text(
            "module.exports = " + json.dumps({"janus": {"address": f"ws://127.0.0.1:{self.janus_ws_port}"},
                                              "port": self.whip_port, "rest": "/whip", "allowTrickle": True,
                                              "strictETags": False, "iceServers": []}) + ";\n")
        (whip / "web").mkdir(exist_ok=True)

    # ------------------------------------------------------------------ processes
    def start(self) -> None:
        """Create the namespace, write the configuration, start Janus and simple-whip-server in it. On a
        failure everything started so far is stopped again before the error propagates."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.netns.create()
        self.write_config()
        self.start_janus()
        env = dict(os.environ, NODE_ENV="production", DEBUG="whip:*,-whip:debug")
        node_path = [str(whip_dir() / "node_modules"), "/usr/share/nodejs", "/usr/lib/nodejs"]
        env["NODE_PATH"] = os.pathsep.join(node_path + ([env["NODE_PATH"]] if env.get("NODE_PATH") else []))
        self.whip = subprocess.Popen(self.netns.command("node", "src/server.js"), cwd=self.workdir / "whip", env=env,
                                     stdout=open(self.workdir / "whip.log", "ab"), stderr=subprocess.STDOUT)
        base = f"http://{self.netns.ns_address}:{self.whip_port}/whip"
        self._wait(lambda: _http("GET", f"{base}/healthcheck", timeout=1)[0] == 200,
                   "simple-whip-server", self.whip, self.workdir / "whip.log")
        status, body = _http("POST", f"{base}/create",
                             {"id": self.endpoint_id, "room": ROOM, "token": self.token, "label": "pcavs-live"})
        if status != 200:
            raise RuntimeError(f"simple-whip-server refused the endpoint: {status} {body}")

    def start_janus(self) -> None:
        self.janus = subprocess.Popen(self.netns.command("janus", "-F", str(self.workdir / "janus"), "-C",
                                       str(self.workdir / "janus" / "janus.jcfg"), "-o"),
                                      stdout=open(self.workdir / "janus.log", "ab"), stderr=subprocess.STDOUT)
        self._wait(lambda: _http("GET", f"{self.janus_url}/info", timeout=1)[0] == 200,
                   "janus", self.janus, self.workdir / "janus.log")

    def stop_janus(self) -> None:
        _stop(self.janus)
        self.janus = None

    def restart_janus(self) -> None:
        self.stop_janus()
        self.start_janus()

    def stop(self) -> None:
        _stop(self.whip)
        self.whip = None
        self.stop_janus()
        self.netns.delete()

    def _wait(self, ready, name: str, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not come up within {READY_TIMEOUT_S:g} s: {log.read_text()[-2000:]}")

    # ------------------------------------------------------------------ the room
    def publishers(self) -> list[dict]:
        """The room's publishers (Janus VideoRoom `listparticipants`)."""
        session = _janus_post(self.janus_url, {"janus": "create"})["data"]["id"]
        try:
            handle = _janus_post(f"{self.janus_url}/{session}",
                                 {"janus": "attach", "plugin": "janus.plugin.videoroom"})["data"]["id"]
            reply = _janus_post(f"{self.janus_url}/{session}/{handle}",
                                {"janus": "message", "body": {"request": "listparticipants", "room": ROOM}})
            return [p for p in reply["plugindata"]["data"].get("participants", []) if p.get("publisher")]
        finally:
            _janus_post(f"{self.janus_url}/{session}", {"janus": "destroy"})


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _janus_post(url: str, body: dict) -> dict:
    body = dict(body, transaction=secrets.token_hex(6))
    status, text = _http("POST", url, body)
    reply = json.loads(text)
    if status != 200 or reply.get("janus") == "error":
        raise RuntimeError(f"Janus {body['janus']} failed: {text[:300]}")
    return reply


# ---------------------------------------------------------------------------- a subscriber (asyncio)
class VideoRoomSubscriber:
    """One aiortc viewer of the room's first publisher through Janus's HTTP API; `frames` and
    `audio_frames` collect what arrives (video frames as `keep(frame)` when given, else the pts). It
    gathers ICE candidates on `host_addresses` only (`JanusStack.host_address`)."""

    def __init__(self, janus_url: str, host_addresses: tuple[str, ...], room: int = ROOM, keep=None) -> None:
        self.janus_url, self.room = janus_url, room
        self.host_addresses = host_addresses
        self.keep = keep            # frame → what to store (None: store the pts)
        self.frames: list = []
        self.audio_frames = 0
        self.pc = None
        self._session: int | None = None
        self._handle: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._http = None

    async def _post(self, path: str, body: dict) -> dict:
        body = dict(body, transaction=secrets.token_hex(6))
        async with self._http.post(self.janus_url + path, json=body) as response:
            reply = await response.json(content_type=None)
        if reply.get("janus") == "error":
            raise RuntimeError(f"Janus {body['janus']} failed: {reply}")
        return reply

    async def _event(self, timeout: float = 10.0) -> dict:
        """The next asynchronous event of our handle (long poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self._http.get(f"{self.janus_url}/{self._session}?maxev=1") as response:
                event = await response.json(content_type=None)
            if event.get("janus") == "event" and event.get("sender") == self._handle:
                return event
        raise TimeoutError("Janus sent no event")

    async def start(self, feed: int | None = None) -> None:
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        from stream.webrtc.ice import use_host_addresses
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40))
        self._session = (await self._post("", {"janus": "create"}))["data"]["id"]
        self._handle = (await self._post(f"/{self._session}", {"janus": "attach",
                                                                "plugin": "janus.plugin.videoroom"}))["data"]["id"]
        base = f"/{self._session}/{self._handle}"
        if feed is None:
            reply = await self._post(base, {"janus": "message", "body": {"request": "listparticipants",
                                                                          "room": self.room}})
            publishers = [p for p in reply["plugindata"]["data"]["participants"] if p.get("publisher")]
            if not publishers:
                raise RuntimeError("the room has no publisher")
            feed = publishers[0]["id"]
        await self._post(base, {"janus": "message", "body": {"request": "join", "ptype": "subscriber",
                                                              "room": self.room, "streams": [{"feed": feed}]}})
        event = await self._event()
        offer = event["jsep"]
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))   # no STUN (aiortc's default is Google's)

        @pc.on("track")
        def on_track(track) -> None:
            self._tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
        self._prepare(pc)
        use_host_addresses(pc, self.host_addresses)
        await pc.setLocalDescription(await pc.createAnswer())
        await self._post(base, {"janus": "message", "body": {"request": "start", "room": self.room},
                                "jsep": {"type": "answer", "sdp": pc.localDescription.sdp}})
        self._tasks.append(asyncio.ensure_future(self._keepalive()))

    def _prepare(self, pc) -> None:
        """Called once the connection's receivers exist (after Janus's offer is applied)."""

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(20)
            await self._post(f"/{self._session}", {"janus": "keepalive"})

    async def _read(self, track) -> None:
        from stream.wish import receive
        await receive(track, lambda f: self.frames.append(f.pts if self.keep is None else self.keep(f)),
                      self._count_audio)

    def _count_audio(self, frame) -> None:
        self.audio_frames += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pc is not None:
            await self.pc.close()
        if self._http is not None:
            try:
                await self._post(f"/{self._session}", {"janus": "destroy"})
            except Exception:
                pass
            await self._http.close()


class LightSubscriber(VideoRoomSubscriber):
    """A subscriber that joins the VideoRoom exactly as `VideoRoomSubscriber` does but decodes nothing
    past its anchor: `slots` (bench.slot_truth.RtpSlots) counts the slots from RTP timestamps and marker
    bits and keeps the RTCP sender reports for the A/V offset. 25 of them fit two cores; 25 decoders do
    not. A publisher that stamps its slots (`PatternFeeder(stamped=True)`, bench.slot_truth) gets slot
    indices and A/V offsets; with `stamped=False` slots are counted from the first frame received."""

    def __init__(self, janus_url: str, host_addresses: tuple[str, ...], room: int = ROOM,
                 stamped: bool = True) -> None:
        super().__init__(janus_url, host_addresses, room)
        from bench.slot_truth import RtpSlots
        self.slots = RtpSlots(stamped)

    def _prepare(self, pc) -> None:
        self.slots.attach(pc)

    async def _read(self, track) -> None:
        return           # nothing reaches the tracks: the RTP path is the recorder's


# ---------------------------------------------------------------------------- slots drawn in pixels
BITS = 16
CELL = 14            # 16 cells of 14 px: one row across a 224-px frame, coarse enough for VP8


def draw_slot(index: int, size: int = 224) -> np.ndarray:
    """A test frame whose top row of cells spells `index` in binary (white = 1); grey elsewhere."""
    frame = np.full((size, size, 3), 96, np.uint8)
    for bit in range(BITS):
        frame[:CELL, bit * CELL:(bit + 1) * CELL] = 255 if (index >> bit) & 1 else 0
    return frame


def read_slot(rgb: np.ndarray) -> int:
    """The index `draw_slot` drew, read back from a decoded (lossy) frame."""
    index = 0
    for bit in range(BITS):
        cell = rgb[3:CELL - 3, bit * CELL + 3:(bit + 1) * CELL - 3]
        if cell.mean() > 128:
            index |= 1 << bit
    return index


def frame_slot(frame) -> int:
    """For `VideoRoomSubscriber(keep=...)`: a received av.VideoFrame → its slot index."""
    return read_slot(frame.to_ndarray(format="rgb24"))


def coverage(slots: list[int]) -> tuple[float, int]:
    """(share of the slots from the first to the last received that arrived, that span). Out-of-order
    or repeated slots count against it."""
    if not slots:
        return 0.0, 0
    span = slots[-1] - slots[0] + 1
    in_order = sum(1 for a, b in zip(slots, slots[1:]) if b > a) + 1
    return in_order / span, span


class PatternFeeder:
    """Writes `draw_slot(k)` frames and a 440 Hz tone to a sink at 25 fps from its own thread (real
    time, like the scheduler's output clock); `stop` joins it. `sent_at[k]` is slot k's monotonic
    write time (for latency). `stamped`: bench.slot_truth's stamps instead (index, emit time and check
    rows in the picture, the index as two tones in the audio), for per-slot truth from RTP."""

    def __init__(self, sink, fps: int = 25, sample_rate: int = 16000, stamped: bool = False) -> None:
        self.sink, self.fps, self.sample_rate = sink, fps, sample_rate
        self.stamped = stamped
        self.sent_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pattern-feeder", daemon=True)
        self.written = 0

    def start(self) -> "PatternFeeder":
        self._thread.start()
        return self

    def _run(self) -> None:
        spf = self.sample_rate // self.fps
        t = np.arange(spf) / self.sample_rate
        grey = np.full((224, 224, 3), 96, np.uint8)
        next_at = time.monotonic()
        k = 0
        while not self._stop.is_set():
            self.sent_at[k] = time.monotonic()
            if self.stamped:
                from bench.slot_truth import stamp_audio, stamp_frame
                self.sink.write(stamp_frame(grey, k, int(self.sent_at[k] * 1000)), stamp_audio(k), k)
            else:
                audio = (0.2 * np.sin(2 * np.pi * 440 * (t + k * spf / self.sample_rate))).astype(np.float32)
                self.sink.write(draw_slot(k), audio, k)
            self.written = k = k + 1
            next_at += 1 / self.fps
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
