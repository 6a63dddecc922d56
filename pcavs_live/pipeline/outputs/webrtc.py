"""`--out webrtc`: the browser viewer (`stream.webrtc`). Its server binds before the networks load, so a
port in use is reported at once."""
from __future__ import annotations

from pcavs_live.pipeline.options import ServerConfig
from pcavs_live.pipeline.outputs.base import DoctorCheck, Output, OutputContext


def ice_servers_for(server: ServerConfig) -> list:
    """The `[server]` STUN/TURN keys as aiortc ICE servers (the viewer and the studio alike)."""
    from stream.webrtc import ice_servers
    return ice_servers(server.stun_url, server.turn_url, server.turn_username, server.turn_credential)


def _prepare(ctx: OutputContext) -> None:
    if ctx.server is not None:
        return
    from stream.webrtc import WebRTCServer
    s, hosts = ctx.config.server, ctx.ice_host_addresses
    server = WebRTCServer(host=s.host, port=s.port, token=s.token, stats=ctx.metrics.snapshot,
                          ice_servers=ice_servers_for(s),
                          ice_host_addresses=s.ice_host_addresses if hosts is None else hosts)
    server.start()
    ctx.stack.callback(server.stop)
    ctx.server = server


def _build(ctx: OutputContext):
    from stream.webrtc import WebRTCSink
    _prepare(ctx)
    return WebRTCSink(ctx.server)


def _port_fix(config, system: str) -> str:
    port = config.server.port
    return f"stop the program that uses it, or pick another port: --port {port + 1 if port < 65535 else 8080}"


OUTPUT = Output(name="webrtc", live=True, auto_size=None, build=_build, prepare=_prepare,
                doctor=DoctorCheck("viewer port", "port", lambda config, system: (config.server.host, config.server.port),
                                   _port_fix))
