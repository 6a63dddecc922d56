"""What one output is (`Output`), what building it may use (`OutputContext`), and its doctor check.

An output is a word of `output.targets` / `--out`: how to build its `FrameSink`, whether it is live (a
live output makes the run real time), the picture size it gets under `output.size = "auto"`, and the
check `pcavs-live doctor` runs for it. The registry of all of them is `pcavs_live.pipeline.outputs.OUTPUTS`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pcavs_live.pipeline.metrics import LiveMetrics
    from pcavs_live.pipeline.options import Config
    from stream.framing import Size
    from stream.sinks import FrameSink


@dataclass(frozen=True)
class DoctorCheck:
    """One row of `pcavs-live doctor` for an output. The looking itself is one of the doctor's injectable
    probes (`pcavs_live.cli.doctor.Probes`, named by `probe`), so tests decide what the machine has."""

    title: str                                    # the row's name, e.g. "virtual camera"
    probe: str                                    # the Probes field that looks, e.g. "virtual_camera"
    args: Callable[["Config", str], tuple]        # (config, OS name) → the probe's arguments
    fix: Callable[["Config", str], str]           # (config, OS name) → the exact step that makes it ok


@dataclass(frozen=True)
class Output:
    """One entry of the output registry."""

    name: str                                     # the --out word and the output.targets entry
    live: bool                                    # True: the run goes at real time (a file alone renders fast)
    auto_size: "Size | None"                      # picture size for output.size = "auto"; None: the 224² crop
    build: Callable[["OutputContext"], "FrameSink"]
    video: bool = True                            # False: audio only, never framed
    prepare: Callable[["OutputContext"], None] | None = None  # before the networks load (bind a port)
    doctor: DoctorCheck | None = None


class OutputContext:
    """What outputs are built from: the config, the run's metrics, the session's resource stack (what an
    output opens is closed with the session) and each other (`sink`: the camera waits for the microphone's
    playout delay). `server` is the viewer server once the webrtc output has prepared it."""

    def __init__(self, config: "Config", metrics: "LiveMetrics", stack: contextlib.ExitStack,
                 registry: dict[str, Output], ice_host_addresses: tuple[str, ...] | None = None) -> None:
        self.config, self.metrics, self.stack = config, metrics, stack
        self.ice_host_addresses = ice_host_addresses
        self.server: Any = None
        self._registry = registry
        self._built: dict[str, FrameSink] = {}

    def wants(self, name: str) -> bool:
        return name in self.config.output.targets

    def built(self, name: str) -> "FrameSink | None":
        """The output `name`'s sink if it was built (the file output's recorder for the "wrote" line)."""
        return self._built.get(name)

    def sink(self, name: str) -> "FrameSink":
        """The output `name`'s sink, built once (another output may ask for it first)."""
        if name not in self._built:
            self._built[name] = self._registry[name].build(self)
        return self._built[name]
