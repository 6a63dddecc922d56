"""ICE settings: which addresses the server offers viewers, and which STUN/TURN servers it uses.

aioice leaves 127.0.0.1 out of its host candidates, so a viewer on the same machine can only connect
through the LAN address, and on a machine with no LAN address not at all. The server's
`ice_host_addresses` (e.g. ["127.0.0.1"]) makes it gather host candidates on exactly those addresses;
`use_host_addresses` applies that to one RTCPeerConnection at a time (nothing global).

Viewers behind NAT need a STUN server (a public address for each side) and, behind symmetric NATs or
firewalls, a TURN relay. aiortc uses at most one of each and skips, without a word, any URL it cannot
use (a `stuns:` URL, a TURN URL without credentials or with an unknown transport), so
`unusable_ice_server` names the reason up front and the server refuses to start with it.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Sequence

from aiortc import RTCIceServer, RTCPeerConnection
from aiortc.rtcicetransport import connection_kwargs, parse_stun_turn_uri


def ice_servers(stun_url: str | None = None, turn_url: str | None = None, turn_username: str | None = None,
                turn_credential: str | None = None) -> list[RTCIceServer]:
    """The config file's `server.stun_url` / `server.turn_*` keys as aiortc ICE servers (None = none)."""
    servers = []
    if stun_url:
        servers.append(RTCIceServer(urls=stun_url))
    if turn_url:
        servers.append(RTCIceServer(urls=turn_url, username=turn_username or None,
                                    credential=turn_credential or None))
    return servers


def _urls(server: RTCIceServer) -> list[str]:
    return list(server.urls) if isinstance(server.urls, (list, tuple)) else [server.urls]


def unusable_ice_server(server: RTCIceServer) -> str | None:
    """Why aiortc would silently skip `server` (one line naming the URL), or None when it uses it."""
    for url in _urls(server):
        try:
            parsed = parse_stun_turn_uri(url)
        except ValueError:
            return (f"ICE server URL {url!r} is malformed; expected 'stun:HOST[:PORT]' or "
                    "'turn:HOST[:PORT][?transport=udp|tcp]' (or 'turns:HOST[:PORT]')")
        if parsed["scheme"] in ("turn", "turns") and not (server.username and server.credential):
            return f"TURN server {url!r} needs a username and a credential (server.turn_username, server.turn_credential)"
        if not connection_kwargs([RTCIceServer(urls=url, username=server.username,
                                                credential=server.credential)]):
            if parsed["scheme"] == "stuns":
                return f"STUN over TLS ({url!r}) is not supported; use a 'stun:' URL"
            return f"TURN server {url!r}: unsupported transport; use transport=udp or tcp ('turns:' needs tcp)"
    return None


def ice_server_as_json(server: RTCIceServer) -> dict:
    """One server as a browser's RTCPeerConnection takes it (what the viewer page is given)."""
    entry: dict = {"urls": _urls(server)}
    if server.username:
        entry["username"] = server.username
    if server.credential:
        entry["credential"] = server.credential
    return entry


def unusable_host_address(address: str) -> str | None:
    """Why ICE could not gather a host candidate on `address` (one line), or None when it can."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ICE host address {address!r} is not an IP address"
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            return f"ICE host address {address} is not an address of this machine ({exc.strerror})"
    return None


def use_host_addresses(pc: RTCPeerConnection, addresses: Sequence[str]) -> None:
    """Make `pc` gather ICE host candidates on exactly `addresses` instead of aioice's choice
    (every interface except loopback).

    Call it after the transceivers exist (after `addTransceiver`/`setRemoteDescription`) and before
    `setLocalDescription`, which is when aiortc gathers; it covers the ICE transports of the
    transceivers present at the call, not ones added later. The hook is the narrowest one aioice offers:
    `Connection.gather_candidates` asks its own `get_component_candidates(component, addresses)` for
    the sockets to open, so we wrap that method *on this pc's Connection objects only*, substituting
    the address list. No module attribute is touched, so other peer connections in the process,
    and other threads, are unaffected. The one private name used is aiortc's
    `RTCIceGatherer._connection` (the aioice Connection), present since aiortc 1.0.
    """
    fixed = [str(a) for a in addresses]
    seen: set[int] = set()
    gatherers = [t.receiver.transport.transport.iceGatherer for t in pc.getTransceivers()]
    if pc.sctp is not None:
        gatherers.append(pc.sctp.transport.transport.iceGatherer)
    for gatherer in gatherers:
        if id(gatherer) in seen:
            continue
        seen.add(id(gatherer))
        if gatherer.state != "new":
            raise RuntimeError("use_host_addresses must be called before ICE gathering starts")
        connection = gatherer._connection
        original = connection.get_component_candidates

        async def on_fixed_addresses(component: int, addresses: list[str], timeout: int = 5,
                                     _original=original) -> list:
            return await _original(component=component, addresses=list(fixed), timeout=timeout)

        connection.get_component_candidates = on_fixed_addresses
