"""`--out FILE.mp4` (output.targets "file", output.file): an H.264 + AAC recording (`stream.recorder`).
Not live: a run whose only output is a file renders every frame as fast as it can."""
from __future__ import annotations

from pathlib import Path

from pcavs_live.pipeline.outputs.base import Output, OutputContext


def _build(ctx: OutputContext):
    from stream.recorder import Mp4Recorder
    path = Path(ctx.config.output.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Mp4Recorder(path)


OUTPUT = Output(name="file", live=False, auto_size=None, build=_build)
