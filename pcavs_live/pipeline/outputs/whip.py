"""`--out whip`: publish the avatar's video and voice to an SFU (Janus, LiveKit ingress, Cloudflare Stream…)
by WHIP (`stream.whip`), which fans it out to any number of viewers. Live: the endpoint expects real time."""
from __future__ import annotations

import sys

from pcavs_live.pipeline.outputs.base import Output, OutputContext


def _build(ctx: OutputContext):
    from stream.whip import whip_sink_from_config
    return whip_sink_from_config(ctx.config.whip, ctx.config.server)


def _prepare(ctx: OutputContext) -> None:
    """A start-up line with the URL the room's viewers open (`whip.viewer_url`), when it is set."""
    url = ctx.config.whip.viewer_url
    if url:
        print(f"whip: publishing to {ctx.config.whip.endpoint}; room viewers open {url}", file=sys.stderr, flush=True)


OUTPUT = Output(name="whip", live=True, auto_size=None, build=_build, prepare=_prepare)
