"""The output registry: every word of `--out` / `output.targets`, one module each.

`OUTPUTS` is the one table the session's sinks, the run's real-time rule, the picture sizes, the doctor's
output rows and the `--out` parsing all read. Adding an output is one new module here (an `Output`: how to
build its sink, its doctor check, whether it is live, its size rule) plus one line in `OUTPUTS` (and its
word in `pcavs_live.pipeline.options.OutputTarget`; tests/test_outputs.py keeps the two equal).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from pcavs_live.common.errors import UserError
from pcavs_live.pipeline.outputs import file, vcam, vmic, webrtc, whip
from pcavs_live.pipeline.outputs.base import DoctorCheck, Output, OutputContext

if TYPE_CHECKING:
    import numpy as np

    from pcavs.alignment import AlignedFace
    from pcavs_live.pipeline.options import Config

__all__ = ["DoctorCheck", "OUTPUTS", "Output", "OutputContext", "OutputError", "build_sinks", "is_live",
           "live_words", "parse_out", "build_sink"]

OUTPUTS: dict[str, Output] = {o.OUTPUT.name: o.OUTPUT for o in (webrtc, vcam, vmic, file, whip)}


class OutputError(UserError):
    """An --out word that is neither an output nor a file path (one line naming it)."""


def live_words() -> tuple[str, ...]:
    """The --out words that name an output; anything else given to --out is a file path."""
    return tuple(name for name in OUTPUTS if name != "file")


def _looks_like_file(word: str) -> bool:
    """A recording's path: a name with a suffix (out.mp4) or a folder in it, never a URL (rtmp://…)."""
    if "://" in word or not word.strip():
        return False
    return bool(Path(word).suffix) or os.sep in word or "/" in word


def parse_out(words: Iterable[str]) -> tuple[list[str], str | None]:
    """--out words → (output.targets, output.file or None). An output's name selects it ("file" alone keeps
    the configured output.file); anything else must be a file path, else `OutputError`."""
    targets: list[str] = []
    path: str | None = None
    for word in words:
        if word in OUTPUTS:
            targets.append(word)
        elif _looks_like_file(word):
            targets.append("file")
            path = word
        else:
            close = difflib.get_close_matches(word, list(OUTPUTS), n=1)
            raise OutputError(f"--out {word!r} is not an output ({', '.join(live_words())}) nor a file path "
                              "such as out/talk.mp4",
                              hint=f"did you mean --out {close[0]}?" if close else
                              "streaming to a URL is not an output here; --out webrtc serves a browser viewer")
    return list(dict.fromkeys(targets)), path


def is_live(config: "Config") -> bool:
    """Real time unless every output is a recording."""
    return any(OUTPUTS[t].live for t in config.output.targets)


def build_sinks(ctx: OutputContext, face: "AlignedFace | None", photo: "np.ndarray | None"):
    """Every configured output as one `FanOutSink`, each framed to its size (`face` and `photo`, None with
    an injected renderer, for paste framing). Outputs of one size share one framer."""
    from stream.sinks import FanOutSink
    framers: dict = {}
    return FanOutSink([build_sink(ctx, name, face, photo, framers) for name in ctx.config.output.targets])


def build_sink(ctx: OutputContext, name: str, face: "AlignedFace | None", photo: "np.ndarray | None",
               framers: dict | None = None):
    """One output's sink (built once per context), framed to its size; `framers` shares a framer among
    outputs of one size."""
    from stream.framing import FramedSink, SharedFramer, make_framer, size_for
    output = ctx.config.output
    framers = {} if framers is None else framers
    entry, sink = OUTPUTS[name], ctx.sink(name)
    size = size_for(output.size, entry.auto_size) if entry.video else None
    if size is not None:
        if size not in framers:
            paste = output.framing == "paste" and face is not None and photo is not None
            framers[size] = SharedFramer(make_framer("paste" if paste else "fit", size,
                                                     photo if paste else None,
                                                     face.matrix if paste else None))
        sink = FramedSink(sink, framers[size])  # framed here, in the scheduler's thread
    return sink


def prepare_outputs(ctx: OutputContext) -> None:
    """What outputs do before the networks load (the viewer binds its port: a port in use is said at once)."""
    for name in ctx.config.output.targets:
        if OUTPUTS[name].prepare is not None:
            OUTPUTS[name].prepare(ctx)
