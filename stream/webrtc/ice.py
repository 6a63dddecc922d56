"""ICE on loopback: gather host candidates on exactly the addresses we name.

aioice leaves 127.0.0.1 out of its host candidates, so a viewer on the same machine can only connect
through the LAN address, and on a machine with no LAN address not at all. The server's
`ice_host_addresses` (e.g. ["127.0.0.1"]) makes it gather host candidates on exactly those addresses;
`use_host_addresses` applies that to one RTCPeerConnection at a time (nothing global).
"""
from __future__ import annotations

from typing import Sequence

from aiortc import RTCPeerConnection


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
