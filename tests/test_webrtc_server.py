"""The viewer server at its edges: the viewer limit under concurrent offers, hostile request bodies,
ICE settings from the config file reaching the peer connections, and a busy port reported before
the networks are loaded. Real aiohttp clients and aiortc peers on loopback; a STUN/TURN stand-in on
loopback where an ICE server is needed."""
from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest
from aioice import stun
from aioice.turn import make_integrity_key
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from pcavs_live.cli.config import load_config
from pcavs_live.pipeline.session import SessionBuilder
from stream.webrtc import ServerError, WebRTCServer, use_host_addresses
from tests.test_run_live import run_cli
from tests.test_webrtc import LOOPBACK, base_url, get_json, post_json, run

MAX_BODY = 64 * 1024


async def probe_offer() -> str:
    """A browser-like receive-only offer (video + audio); the peer that made it is closed again."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    use_host_addresses(pc, LOOPBACK)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def candidates(sdp: str) -> list[tuple[str, str]]:
    """(address, type) of every ICE candidate line."""
    return [(line.split()[4], line.split()[7]) for line in sdp.splitlines() if line.startswith("a=candidate:")]


@pytest.fixture
def started():
    """started(**kwargs) → a running WebRTCServer on a free loopback port, stopped at the end."""
    servers = []

    def start(**kwargs) -> WebRTCServer:
        srv = WebRTCServer(port=0, ice_host_addresses=LOOPBACK, **kwargs)
        srv.start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.stop()


# ---------------------------------------------------------------------------------- viewer limit
def test_viewer_limit_holds_under_50_concurrent_offers(started):
    srv = started(max_viewers=8)

    async def main():
        sdp = await probe_offer()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async def offer():
                async with session.post(base_url(srv) + "offer", json={"sdp": sdp, "type": "offer"}) as r:
                    return r.status, await r.json(content_type=None)
            return await asyncio.gather(*(offer() for _ in range(50)))

    results = run(main())
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 8 and statuses.count(503) == 42, statuses
    assert all(body["error"] == "too many viewers (max 8)" for status, body in results if status == 503)
    assert srv.peer_count == 8       # answered, not yet connected: each holds its slot


def test_connected_viewers_never_exceed_the_limit(started):
    srv = started(max_viewers=2)

    async def main():
        peers = []
        for _ in range(4):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            use_host_addresses(pc, LOOPBACK)
            peers.append(pc)
        for pc in peers:
            await pc.setLocalDescription(await pc.createOffer())
        most = 0
        sampling = True

        async def sample():
            nonlocal most
            while sampling:
                most = max(most, srv.peer_count)
                await asyncio.sleep(0.005)
        sampler = asyncio.ensure_future(sample())
        try:
            results = await asyncio.gather(*(post_json(base_url(srv) + "offer", {
                "sdp": pc.localDescription.sdp, "type": "offer"}) for pc in peers))
            answered = [pc for pc, (status, _) in zip(peers, results) if status == 200]
            assert sorted(status for status, _ in results) == [200, 200, 503, 503], results
            for pc, (status, body) in zip(peers, results):
                if status == 200:
                    await pc.setRemoteDescription(RTCSessionDescription(**body))
            for _ in range(200):
                if all(pc.connectionState == "connected" for pc in answered):
                    break
                await asyncio.sleep(0.05)
            assert [pc.connectionState for pc in answered] == ["connected", "connected"]
            await asyncio.sleep(0.3)
        finally:
            sampling = False
            await sampler
            await asyncio.gather(*(pc.close() for pc in peers))
        assert most == 2

    run(main())


def test_a_slot_is_freed_by_a_failed_offer_and_by_a_peer_that_never_connects(started):
    srv = started(max_viewers=1, connect_timeout_s=1.0)

    async def main():
        sdp = await probe_offer()
        offer = base_url(srv) + "offer"
        for _ in range(3):                                   # failed negotiations keep no slot
            assert (await post_json(offer, {"sdp": "v=0\r\ngarbage\r\n", "type": "offer"}))[0] == 400
        assert (await post_json(offer, {"sdp": sdp, "type": "offer"}))[0] == 200
        assert (await post_json(offer, {"sdp": sdp, "type": "offer"}))[0] == 503
        for _ in range(100):                                 # its peer never connects: dropped after 1 s
            if srv.peer_count == 0:
                break
            await asyncio.sleep(0.05)
        assert (await post_json(offer, {"sdp": sdp, "type": "offer"}))[0] == 200

    run(main())


# ---------------------------------------------------------------------------------- hostile bodies
async def post_raw(url: str, data, headers: dict[str, str]) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def chunks(total: int):
    """A body without Content-Length (chunked), so the size is only known while reading it."""
    for _ in range(total // 8192):
        yield b" " * 8192


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("data, headers, status, needle", [
    (b'{"sdp": "v=0", "type": "offer"}', {"Content-Type": "application/json; charset=bogus"}, 400, "charset"),
    (b"[" * 30_000 + b"]" * 30_000, JSON, 400, "nested"),
    (b"[" * 100_000 + b"]" * 100_000, JSON, 413, "64 KiB"),
    (lambda: chunks(4 * MAX_BODY), JSON, 413, "64 KiB"),
    (b"\xff\xfe{}", JSON, 400, "UTF-8"),
], ids=["bogus-charset", "nested-30k", "nested-100k", "chunked-256k", "not-utf8"])
def test_hostile_bodies_get_a_one_line_reason_and_no_traceback(started, caplog, data, headers, status, needle):
    caplog.set_level(logging.INFO)
    srv = started()

    async def main():
        got, body = await post_raw(base_url(srv) + "offer", data() if callable(data) else data, headers)
        assert (got, needle in body.get("error", "")) == (status, True), body
        assert "\n" not in body["error"]
        assert (await get_json(base_url(srv) + "health"))[0] == 200       # still serving

    run(main())
    assert srv.peer_count == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


# ---------------------------------------------------------------------------------- ICE settings
class StunTurnStandIn(asyncio.DatagramProtocol):
    """A loopback STUN + TURN server: Binding requests get a made-up public address; Allocate runs
    the long-term-credential exchange (401 with realm and nonce, then a signed request) and succeeds
    only when the request is signed with the configured username and password."""

    REALM, NONCE = "pcavs-test", b"nonce-1"
    MAPPED, RELAYED = ("203.0.113.7", 40000), ("198.51.100.9", 50000)

    def __init__(self, username: str, password: str) -> None:
        self.username, self.key = username, make_integrity_key(username, self.REALM, password)
        self.bindings = self.allocations = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        if request.message_class != stun.Class.REQUEST:
            return
        reply = stun.Message(request.message_method, stun.Class.RESPONSE, request.transaction_id)
        if request.message_method == stun.Method.BINDING:
            self.bindings += 1
            reply.attributes["XOR-MAPPED-ADDRESS"] = self.MAPPED
            self.transport.sendto(bytes(reply), addr)
            return
        if request.attributes.get("USERNAME") != self.username or not request.check_message_integrity(self.key):
            reply = stun.Message(request.message_method, stun.Class.ERROR, request.transaction_id)
            reply.attributes.update({"ERROR-CODE": (401, "Unauthorized"), "REALM": self.REALM,
                                     "NONCE": self.NONCE})
            self.transport.sendto(bytes(reply), addr)
            return
        if request.message_method == stun.Method.ALLOCATE:
            self.allocations += 1
            reply.attributes.update({"XOR-RELAYED-ADDRESS": self.RELAYED, "XOR-MAPPED-ADDRESS": self.MAPPED})
        reply.attributes["LIFETIME"] = request.attributes.get("LIFETIME", 600)
        reply.add_message_integrity(self.key)
        self.transport.sendto(bytes(reply), addr)


def test_ice_keys_from_the_config_reach_the_peer_connections():
    """server.ice_host_addresses, stun_url and turn_* set in the config → the session's server gathers
    host candidates on 127.0.0.1 only, a server-reflexive one through the STUN server and a relayed
    one through the TURN server (which accepted the configured credentials); the page is given the
    same ICE servers."""
    async def main():
        loop = asyncio.get_running_loop()
        transport, stand_in = await loop.create_datagram_endpoint(
            lambda: StunTurnStandIn("viewer", "s3cret"), local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        config = load_config(None, {
            "server.port": "0", "output.targets": "webrtc", "server.ice_host_addresses": "127.0.0.1",
            "server.stun_url": f"stun:127.0.0.1:{port}", "server.turn_url": f"turn:127.0.0.1:{port}",
            "server.turn_username": "viewer", "server.turn_credential": "s3cret"})
        session = SessionBuilder(config)
        try:
            await loop.run_in_executor(None, session.prepare)
            base = base_url(session.server)
            status, answer = await post_json(base + "offer", {"sdp": await probe_offer(), "type": "offer"})
            assert status == 200, answer
            found = set(candidates(answer["sdp"]))
            assert {addr for addr, kind in found if kind == "host"} == {"127.0.0.1"}
            assert (StunTurnStandIn.MAPPED[0], "srflx") in found
            assert (StunTurnStandIn.RELAYED[0], "relay") in found
            assert stand_in.bindings >= 1 and stand_in.allocations >= 1
            status, ice = await get_json(base + "ice")
            assert status == 200 and ice == {"iceServers": [
                {"urls": [f"stun:127.0.0.1:{port}"]},
                {"urls": [f"turn:127.0.0.1:{port}"], "username": "viewer", "credential": "s3cret"}]}
        finally:
            await loop.run_in_executor(None, session.close)
            transport.close()

    run(main())


def test_ice_defaults_are_no_servers_and_every_non_loopback_interface():
    config = load_config()
    s = config.server
    assert (s.ice_host_addresses, s.stun_url, s.turn_url, s.turn_username, s.turn_credential) == ((), None, None, None, None)


@pytest.mark.parametrize("kwargs, needle", [
    ({"ice_host_addresses": ["localhost"]}, "not an IP address"),
    ({"ice_host_addresses": ["192.0.2.55"]}, "not an address of this machine"),
    ({"ice_servers": ["stun:"]}, "stun:"),
    ({"ice_servers": ["turn:127.0.0.1:3478"]}, "username"),
    ({"ice_servers": ["turn:127.0.0.1:3478?transport=sctp"]}, "transport"),
    ({"ice_servers": ["http://example.org"]}, "stun:"),
])
def test_unusable_ice_settings_are_one_line_server_errors(kwargs, needle):
    with pytest.raises(ServerError) as info:
        srv = WebRTCServer(port=0, **kwargs)
        srv.start()
        srv.stop()
    assert needle in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- busy port
def test_busy_port_is_reported_before_the_networks_are_loaded(tmp_path):
    """The checkpoint folder does not exist either: the port error is the one reported, so the port
    was bound before anything looked at the networks."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli("--checkpoints", str(tmp_path / "nothing"), "--out", "webrtc", "--port", str(port),
                    "--max-seconds", "1", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "--port" in errors[0], r.stderr
