"""`--out whip`: publish the avatar's video and voice to an SFU (Janus, LiveKit ingress, Cloudflare Stream…)
by WHIP (`stream.whip`), which fans it out to any number of viewers. Live: the endpoint expects real time."""
from __future__ import annotations

from pcavs_live.pipeline.outputs.base import Output, OutputContext


def _build(ctx: OutputContext):
    from stream.whip import whip_sink_from_config
    return whip_sink_from_config(ctx.config.whip, ctx.config.server)


OUTPUT = Output(name="whip", live=True, auto_size=None, build=_build)
