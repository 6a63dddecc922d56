"""Rendering rows of any mix of sessions in one pass: what every `Avatar` of one `PcavsNetworks` shares.

A row is one frame of one session: its identity slot, its mel window, its pose code, its mouth weight
and whether its noise is fresh every frame. Rendering N rows costs the same Python work for 1 session
or 256:

* `IdentityBank` keeps every registered identity's per-photo tensors on the device, one row per slot
  (the cached identity part of each layer's style, the generator's start map, the fixed noise), so a
  batch is assembled with one `index_select` per tensor — 29 launches whatever the number of
  sessions — instead of per-session copies and concatenations;
* one audio-encoder pass over all rows' mel windows (the mouth weight is a per-row factor);
* one generator pass, converted to uint8 and checked for non-finite rows on the device, and one
  download, waited for with an event by `PendingRender.result()`.

On CUDA the two passes are replayed from CUDA graphs, captured once per batch bucket (1, 2, 4, ...,
256 rows; a batch is padded up to its bucket and only the requested rows come back): a batch-1 frame is
~500 kernels, which eager Python launches far slower than the GPU runs them. A tick's host work is one
pack, one upload and two replays: the rows' host data packed into one pinned byte buffer per bucket
(double-buffered) and copied with one non-blocking copy into the device buffer whose typed views are
the graphs' static inputs (`_Inputs`); the gathers of the bank by the `slots` view, and the random rows'
noise draw, are captured inside the generator graph. A graph binds the bank's tensors at capture, so
`warm_up(capacity=...)` sizes the bank first; a growth beyond that re-captures the graphs (one
warning, `RenderStats.bank_regrowths`). Capture happens in `warm_up` (or, with a warning, on first use
of a bucket) and a failed capture falls back to the eager path for that bucket.

`submit` returns once a render is queued and `PendingRender.result()` waits for its download's event,
so the host can prepare tick t+1 while the device renders tick t (`render` is the two back to back).

Everything runs under one lock (the device runs one render at a time anyway) on the runtime's own
high-priority stream (`pcavs.gpu`), which waits only for what a render reads: a new identity is
encoded on the runtime's identity stream (`identity_scope`, lowest priority) and the render stream
waits for that one event before copying it into the bank; nothing on the caller's (default) stream
holds a render up.

Ownership: whoever builds sessions makes one `RenderRuntime(networks)` from the loaded networks and
gives it to every `pcavs.engine.Avatar`; the networks (`pcavs.checkpoints.PcavsNetworks`) know nothing
of it (imports go runtime → checkpoints only).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from pcavs.checkpoints import PcavsNetworks
from pcavs.constants import N_MELS, POSE_DIM, WINDOW_ROWS
from pcavs.gpu import (StageClock, WorkerStream, download_async, is_cuda, record_event, render_stream,
                       restore_current_stream, stream_scope, wait_events)
from pcavs.networks.generator import IdentityStyle

log = logging.getLogger(__name__)

# Batch sizes a render is padded up to (and on CUDA, captured once each). Between powers of two from 16
# up, steps of a quarter to a half: 100 sessions pad to 112, not 128 (a padded row costs a full row).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_MIN_BANK_CAPACITY = 4


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `n` rows, or None when `n` exceeds the largest."""
    return next((b for b in sorted(buckets) if b >= n), None)


@dataclass
class RowBatch:
    """Host-side inputs of N rows (one frame each)."""

    slots: np.ndarray          # (N,) int64 identity-bank slots
    mels: np.ndarray           # (N,1,80,20) float32 mel windows
    poses: np.ndarray          # (N,12) float32 pose codes (the reference pose already filled in)
    mouth_weights: np.ndarray  # (N,) float32
    random_noise: np.ndarray   # (N,) bool: fresh noise for this row (noise mode "random")

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def rows(self, sl: slice) -> "RowBatch":
        return RowBatch(self.slots[sl], self.mels[sl], self.poses[sl], self.mouth_weights[sl], self.random_noise[sl])


@dataclass
class Rendered:
    """What `RenderRuntime.render` returns."""

    frames: np.ndarray               # (N,H,W,3) uint8
    finite: np.ndarray               # (N,) bool: the row had no NaN/inf (else its frame is arbitrary)
    stage_ms: dict[str, float]       # "audio", "generator", "convert" (CUDA: GPU time between events)


@dataclass
class RenderStats:
    """Counters of how rows were rendered (benches and tests read them)."""

    graph_rows: int = 0
    eager_rows: int = 0
    padded_rows: int = 0
    graph_captures: int = 0
    graph_failures: int = 0
    captured_buckets: list[int] = field(default_factory=list)
    # The identity bank had to grow while graphs existed (more identities than warm_up's capacity): the
    # graphs read the old tensors, so they were dropped and re-captured (one warning each time).
    bank_regrowths: int = 0


class IdentityBank:
    """Per-identity tensors of every registered avatar, one row per slot, on the device.

    `terms[l]` (capacity, in_l): the identity part of layer l's style (`precompute_style`); `starts`
    (capacity, 512, 7, 7): the generator's start map; `noise[l]` (capacity, 1, s, s): the slot's fixed
    noise (zeros for noise "zero" and "random": random rows get fresh noise per frame). Capacity doubles
    when full (or is set once by `reserve`); released slots are reused. A growth moves every tensor,
    which `generation` counts: graphs that gather from the bank must be re-captured after one. Callers
    hold the runtime's lock."""

    def __init__(self, generator, device: torch.device, dtype: torch.dtype) -> None:
        self._layer_dims = [layer.in_channel for layer in generator.modulated_convs()]
        self._start_shape = (generator.conv1.conv.in_channel, generator.init_size, generator.init_size)
        self._noise_shapes = [tuple(s[1:]) for s in generator.noise_shapes()]
        self.device, self.dtype = device, dtype
        self.capacity = 0
        self.generation = 0
        self._free: list[int] = []
        self._used = 0
        self.terms: list[torch.Tensor] = []
        self.starts = torch.empty(0)
        self.noise: list[torch.Tensor] = []
        self._grow(_MIN_BANK_CAPACITY)

    def _grow(self, capacity: int) -> None:
        def grown(old: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
            new = torch.zeros((capacity, *shape), device=self.device, dtype=self.dtype)
            if old is not None and old.shape[0]:
                new[: old.shape[0]].copy_(old)
            return new

        first = self.capacity == 0
        self.terms = [grown(None if first else t, (d,)) for t, d in
                      zip(self.terms or [None] * len(self._layer_dims), self._layer_dims)]
        self.starts = grown(None if first else self.starts, self._start_shape)
        self.noise = [grown(None if first else n, s) for n, s in
                      zip(self.noise or [None] * len(self._noise_shapes), self._noise_shapes)]
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self._free.sort(reverse=True)  # lowest slot first
        self.capacity = capacity
        self.generation += 1

    def reserve(self, capacity: int) -> bool:
        """At least `capacity` slots from now on; True when the tensors moved."""
        if capacity <= self.capacity:
            return False
        self._grow(int(capacity))
        return True

    def tensors(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, tuple[torch.Tensor, ...]]:
        """(terms, starts, noise) as they are now: what a graph binds at capture."""
        return tuple(self.terms), self.starts, tuple(self.noise)

    @property
    def in_use(self) -> int:
        return self._used

    def add(self, style: IdentityStyle, start: torch.Tensor, noise: Sequence[torch.Tensor] | None) -> int:
        """Store one identity; returns its slot. `style` terms (1, in_l), `start` (512,7,7), `noise`
        11 tensors (1,1,s,s) or None for zeros."""
        if not self._free:
            self._grow(self.capacity * 2)
        slot = self._free.pop()
        for dst, term in zip(self.terms, style.terms, strict=True):
            dst[slot].copy_(term.reshape(-1))
        self.starts[slot].copy_(start.reshape(self._start_shape))
        for i, dst in enumerate(self.noise):
            if noise is None or noise[i] is None:
                dst[slot].zero_()
            else:
                dst[slot].copy_(noise[i].reshape(dst.shape[1:]))
        self._used += 1
        return slot

    def release(self, slot: int) -> None:
        if 0 <= slot < self.capacity and slot not in self._free:
            self._free.append(slot)
            self._used -= 1


class _Inputs:
    """One batch's per-tick inputs (b rows) as ONE byte buffer on the device, whose typed views are what
    the audio and generator passes read (a CUDA graph keeps one set as its static inputs; the eager path
    makes a set per call). Layout, each field at an offset aligned to its dtype, packed as raw bytes so
    the int64 slots travel losslessly beside the float32 rows:

        slots int64 (b) | mels float32 (b,1,80,20) | poses float32 (b,12) | mouth float32 (b,1) | random bool (b)

    The host side is `sides` pinned byte buffers of the same layout (two for a graph: double-buffered, so
    packing tick t+1 never overwrites bytes tick t's copy has not read yet; each side's last copy is
    guarded by an event). A tick is `pack` (numpy writes into a pinned buffer, nothing allocated) and
    `upload` (one non-blocking H2D copy of the whole buffer on the current stream). The device buffer
    itself needs no second copy: its next upload is queued on the same stream after the replays that
    read it. Padding rows (past len(rows)) keep earlier valid data; their random flag is cleared."""

    def __init__(self, b: int, device: torch.device, sides: int = 2) -> None:
        self.b = b
        layout, off = {}, 0
        for name, dtype, shape in (("slots", torch.int64, (b,)), ("mels", torch.float32, (b, 1, N_MELS, WINDOW_ROWS)),
                                   ("poses", torch.float32, (b, POSE_DIM)), ("mouth_weights", torch.float32, (b, 1)),
                                   ("random", torch.bool, (b,))):
            size = torch.empty((), dtype=dtype).element_size()
            off = -(-off // size) * size
            layout[name] = (off, dtype, shape)
            off += size * int(np.prod(shape))
        self.layout = layout
        self.nbytes = -(-off // 8) * 8
        self.device = device
        self.buffer = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        views = self.views(self.buffer)
        self.slots, self.mels, self.poses = views["slots"], views["mels"], views["poses"]
        self.mouth_weights, self.random = views["mouth_weights"], views["random"]
        pin = is_cuda(device)
        self._hosts = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(sides)]
        self._host_views = [{k: v.numpy() for k, v in self.views(h).items()} for h in self._hosts]
        self._copied: list["torch.cuda.Event | None"] = [None] * sides
        self._side = 0

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The typed fields of a byte buffer of this layout (views: writing one writes the buffer)."""
        out = {}
        for name, (off, dtype, shape) in self.layout.items():
            size = torch.empty((), dtype=dtype).element_size()
            out[name] = buffer[off: off + size * int(np.prod(shape))].view(dtype).view(shape)
        return out

    def pack(self, rows: RowBatch) -> None:
        """Write the rows into the next host side (after that side's previous copy has been read)."""
        n = len(rows)
        if n > self.b:
            raise ValueError(f"{n} rows do not fit a batch buffer of {self.b}")
        self._side = (self._side + 1) % len(self._hosts)
        if self._copied[self._side] is not None:
            self._copied[self._side].synchronize()  # normally long done: two ticks ago
            self._copied[self._side] = None
        v = self._host_views[self._side]
        v["slots"][:n] = rows.slots
        v["mels"][:n] = rows.mels
        v["poses"][:n] = rows.poses
        v["mouth_weights"][:n, 0] = rows.mouth_weights
        v["random"][:n] = rows.random_noise
        v["random"][n:] = False

    def upload(self) -> None:
        """One copy of the packed side into the device buffer: pinned and non-blocking on CUDA, on the
        current stream; an event marks when the host side may be packed again."""
        host = self._hosts[self._side]
        if self.buffer.is_cuda:
            self.buffer.copy_(host, non_blocking=True)
            self._copied[self._side] = record_event()
        else:
            self.buffer.copy_(host)

    def host_view(self, name: str) -> np.ndarray:
        """The last packed side's field (tests read it back)."""
        return self._host_views[self._side][name]


class _EmulatedGraph:
    """CPU stand-in for a captured CUDA graph: runs `fn` once at "capture" and again at every replay,
    writing the results into the tensors the capture returned (a real graph's static outputs)."""

    def __init__(self, fn) -> None:
        self._fn = fn
        self.outputs = fn()

    def replay(self) -> None:
        new = self._fn()
        pairs = zip(self.outputs, new) if isinstance(self.outputs, tuple) else [(self.outputs, new)]
        for static, value in pairs:
            static.copy_(value)


@dataclass
class _BucketGraphs:
    inputs: _Inputs
    audio: "torch.cuda.CUDAGraph | _EmulatedGraph"
    generator: "torch.cuda.CUDAGraph | _EmulatedGraph"
    rest: torch.Tensor
    frames: torch.Tensor
    finite: torch.Tensor


class RenderRuntime:
    """Per-networks render state (see the module doc): one per loaded `PcavsNetworks`, made by whoever
    builds sessions and shared by every Avatar of those networks."""

    def __init__(self, networks: PcavsNetworks) -> None:
        self.networks = networks
        self.device = networks.device
        self.dtype = networks.generator_dtype
        self.cuda = is_cuda(self.device)
        self.lock = threading.RLock()
        self.stats = RenderStats()
        self.use_graphs = self.cuda
        self.pad_to_buckets = self.cuda
        self.buckets: tuple[int, ...] = DEFAULT_BUCKETS
        self._graphs: dict[int, _BucketGraphs | None] = {}
        self._pool = None
        self._warming = False
        self.emulate_graphs = False
        if self.cuda:
            # Once, at set-up: the weights were copied on the loading thread's stream; every stream
            # (render, pose worker) must see them. The render path itself never syncs the device.
            torch.cuda.synchronize(self.device)
        self.stream = render_stream(self.device)
        self.identity_stream = WorkerStream(self.device)
        with torch.inference_mode(), stream_scope(self.stream):  # the bank lives on the render stream
            self.bank = IdentityBank(networks.generator, self.device, self.dtype)
        self._rng = torch.Generator(device=self.device).manual_seed(0)

    def identity_scope(self) -> contextlib.AbstractContextManager:
        """Enter around encoding a new identity (Avatar.__init__): its CUDA work runs on the runtime's
        identity stream, at the lowest priority, not on the default stream a render would wait for."""
        return self.identity_stream.scope()

    # ------------------------------------------------------------------ configuration
    def configure(self, graphs: bool | None = None, buckets: Sequence[int] | None = None,
                  pad_to_buckets: bool | None = None, emulate_graphs: bool | None = None) -> None:
        """Change how rows are run. Graphs need CUDA (ignored elsewhere) unless `emulate_graphs`: a CPU
        stand-in with the graphs' semantics (fixed input buffers filled per call, outputs overwritten
        by every replay), so the CPU tests run the graphed flow. Padding to buckets is implied by graphs
        and can be asked for alone."""
        with self.lock:
            if buckets is not None:
                if not buckets or min(buckets) < 1:
                    raise ValueError("buckets must be positive batch sizes")
                self.buckets = tuple(sorted(set(int(b) for b in buckets)))
                self._graphs.clear()
            if emulate_graphs is not None:
                self.emulate_graphs = bool(emulate_graphs)
                self._graphs.clear()
            if graphs is not None or emulate_graphs is not None:
                self.use_graphs = bool(graphs if graphs is not None else self.use_graphs) and (
                    self.cuda or self.emulate_graphs)
                if not self.use_graphs:
                    self._graphs.clear()
            if pad_to_buckets is not None:
                self.pad_to_buckets = bool(pad_to_buckets)
            self.pad_to_buckets = self.pad_to_buckets or self.use_graphs

    # ------------------------------------------------------------------ identities
    @torch.inference_mode()
    def add_identity(self, style: IdentityStyle, start: torch.Tensor,
                     noise: Sequence[torch.Tensor] | None) -> int:
        """Store an identity's tensors (computed on the caller's current stream, normally the identity
        stream) in the bank; returns its slot. The copy runs on the render stream after one event of
        the caller's stream: no host wait, and the render stream waits for nothing else. The graphs
        gather from the bank, so a new slot is seen by the next replay; should the bank have to grow
        (more identities than `reserve` planned for) the graphs are re-captured (`_bank_moved`)."""
        ready = record_event() if self.cuda else None
        with self.lock, stream_scope(self.stream, after_caller=False):
            if ready is not None:
                wait_events(self.stream, [ready])
                for t in (*style.terms, start, *(noise or ())):
                    if t is not None and t.is_cuda:
                        t.record_stream(self.stream)  # read here: not reused before this copy ran
            generation = self.bank.generation
            slot = self.bank.add(style, start, noise)
            if self.bank.generation != generation:
                self._bank_moved()
            return slot

    def release(self, slot: int) -> None:
        with self.lock:
            self.bank.release(slot)

    @torch.inference_mode()
    def reserve(self, capacity: int) -> None:
        """Size the identity bank for `capacity` identities before graphs are captured (warm_up does),
        so its tensors never move while graphs that gather from them exist."""
        with self.lock, stream_scope(self.stream, after_caller=False):
            if self.bank.reserve(max(int(capacity), _MIN_BANK_CAPACITY)):
                self._bank_moved()

    def _bank_moved(self) -> None:
        """The bank's tensors were reallocated: every captured graph still gathers from the old ones.
        Drop them and capture the same buckets again now (lock held), with one warning line."""
        captured = sorted((b for b, g in self._graphs.items() if g is not None), reverse=True)
        self._graphs = {b: g for b, g in self._graphs.items() if g is None}  # eager buckets stay eager
        if not captured:
            return
        self.stats.bank_regrowths += 1
        log.warning("identity bank grew to %d slots while render graphs existed (more identities than "
                    "planned: raise server.max_sessions); re-capturing batches %s", self.bank.capacity,
                    sorted(captured))
        warming, self._warming = self._warming, True
        try:
            for b in captured:
                self._graphs[b] = self._capture(b)
        finally:
            self._warming = warming

    # ------------------------------------------------------------------ the two passes
    def _rest(self, inputs: _Inputs) -> torch.Tensor:
        """Audio encoder → ×mouth weight → mouth code, next to the pose code: (b, 512) float32."""
        nets = self.networks
        mouth = nets.pose.mouth_code(nets.audio(inputs.mels) * inputs.mouth_weights)
        return torch.cat([mouth.float(), inputs.poses], dim=1)

    def _generate(self, bank: tuple, inputs: _Inputs, rest: torch.Tensor, fresh: bool,
                  noise: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator pass with its gathers: every row's identity tensors picked from `bank` (the
        tensors bound at capture, `IdentityBank.tensors`) by the `slots` view, then the generator and
        the uint8 conversion. `fresh`: rows flagged random get a new noise draw (a graph always draws,
        its flags decide per replay; the runtime's generator is registered with the graph so each replay
        draws anew). `noise` overrides every row's noise (the oracle's)."""
        terms, starts, bank_noise = bank
        slots = inputs.slots
        gathered = [t.index_select(0, slots) for t in terms]
        start = starts.index_select(0, slots)
        if noise is None:
            noise = [n.index_select(0, slots) for n in bank_noise]
            if fresh:  # rows in "random" mode: a fresh draw (padding rows have the flag cleared)
                flags = inputs.random[:, None, None, None]
                noise = [torch.where(flags, torch.randn(n.shape, generator=self._rng, device=n.device,
                                                        dtype=torch.float32).to(n.dtype), n) for n in noise]
        return self._frames(gathered, rest, start, noise)

    def _frames(self, terms: Sequence[torch.Tensor], rest: torch.Tensor, start: torch.Tensor,
                noise: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        with self._whole_batches():
            images = self.networks.generator.forward_cached(IdentityStyle(tuple(terms)), rest, start, noise)
        return frames_on_device(images)

    @contextlib.contextmanager
    def _whole_batches(self) -> Iterator[None]:
        """With emulated graphs on the CPU, run the generator's whole batch in one pass as CUDA does
        (its "auto" chunking would run batch-1 passes there), so the CPU tests exercise the batched
        path that CUDA captures. Only the runtime runs the generator's synthesis, under its lock."""
        generator = self.networks.generator
        if self.cuda or not self.emulate_graphs or getattr(generator, "max_batch", None) != "auto":
            yield
            return
        generator.max_batch = None
        try:
            yield
        finally:
            generator.max_batch = "auto"

    # ------------------------------------------------------------------ rendering
    @torch.inference_mode()
    def render(self, rows: RowBatch, noise: Sequence[torch.Tensor] | None = None) -> Rendered:
        """(N,224,224,3) uint8 frames, (N,) bool "row was finite" and the stage times for the rows.
        `noise` (11 tensors, N or 1 rows) overrides every row's noise (the oracle's recorded noise) and
        runs eagerly. Blocks until the frames are on the host: `submit(rows).result()`."""
        return self.submit(rows, noise).result()

    @torch.inference_mode()
    def submit(self, rows: RowBatch, noise: Sequence[torch.Tensor] | None = None) -> "PendingRender":
        """Queue the rows' render and return once it is queued (on CUDA: packed, uploaded, replayed and
        its download queued; the host is free to prepare the next tick while the device works). The
        frames come from `PendingRender.result()`. Off CUDA the render runs here and result() only
        hands it over. Same arguments as `render`."""
        n = len(rows)
        if n == 0:
            size = self.networks.generator.size
            empty = Rendered(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool), {})
            return PendingRender([], None, None, empty)
        # The rows come from the host: the render stream waits for nothing on the caller's stream,
        # except for the caller's own noise tensors (the oracle's), which may be CUDA tensors.
        with self.lock, stream_scope(self.stream, after_caller=noise is not None):
            clock = StageClock(self.device)
            parts: list[list[np.ndarray]] = []
            done = None
            step = max(self.buckets) if self.pad_to_buckets and noise is None else n
            for i in range(0, n, step):
                frames, finite = self._render_part(rows.rows(slice(i, i + step)), clock, noise)
                # Queued behind this part's replay and before any later one: a later replay of the same
                # graph cannot overwrite the static outputs before they are copied.
                hosts, done = download_async([frames, finite])
                parts.append(hosts)
            clock.split("convert")
            return PendingRender(parts, done, clock)

    def _render_part(self, rows: RowBatch, clock: StageClock,
                     noise: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over at most one bucket of rows: the first n rows of the outputs (on a graph, views
        of its static outputs, valid until its next replay is queued)."""
        n = len(rows)
        b = n
        if self.pad_to_buckets and noise is None:
            b = bucket_for(n, self.buckets) or n
        graphs = self._graph_set(b) if self.use_graphs and noise is None else None
        if graphs is not None:
            graphs.inputs.pack(rows)
            graphs.inputs.upload()           # the tick's one host→device copy; gathers are in the graph
            graphs.audio.replay()
            clock.split("audio")
            graphs.generator.replay()
            clock.split("generator")
            self.stats.graph_rows += n
            self.stats.padded_rows += b - n
            return graphs.frames[:n], graphs.finite[:n]
        inputs = _Inputs(b, self.device, sides=1)
        inputs.pack(rows)
        inputs.upload()
        rest = self._rest(inputs)
        clock.split("audio")
        if noise is not None:
            noise = [torch.as_tensor(t).to(self.device, self.dtype) for t in noise]
        frames, finite = self._generate(self.bank.tensors(), inputs, rest, bool(rows.random_noise.any()), noise)
        clock.split("generator")
        self.stats.eager_rows += n
        self.stats.padded_rows += b - n
        return frames[:n], finite[:n]

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_set(self, b: int) -> _BucketGraphs | None:
        if b not in self._graphs:
            if not self._warming:
                log.warning("capturing the render graphs for batch %d on first use (warm_up keeps this "
                            "off a live clock)", b)
            self._graphs[b] = self._capture(b)
        return self._graphs[b]

    def _capture(self, b: int) -> _BucketGraphs | None:
        """Both passes for b rows captured as CUDA graphs after eager warm-up runs on a side stream
        (cuDNN autotuning and the weight-derived caches happen there, outside the graphs)."""
        try:
            if self.emulate_graphs:
                graphs = self._emulated_graphs(b)
            else:
                with restore_current_stream(self.device):  # a failed capture_end leaves the capture stream
                    graphs = self._cuda_graphs(b)
        except Exception as exc:  # noqa: BLE001 - a capture problem must not stop rendering
            self.stats.graph_failures += 1
            log.warning("CUDA graph capture for batch %d failed (%s: %s); that batch size runs eagerly",
                        b, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        self.stats.graph_captures += 1
        self.stats.captured_buckets.append(b)
        return graphs

    def _emulated_graphs(self, b: int) -> _BucketGraphs:
        """The same captured functions as `_cuda_graphs`, bank tensors bound the same way (at capture):
        a replay after the bank moved would read the old tensors, as a CUDA graph would."""
        inputs = _Inputs(b, self.device)
        bank = self.bank.tensors()
        audio = _EmulatedGraph(lambda: self._rest(inputs))
        rest = audio.outputs
        generator = _EmulatedGraph(lambda: self._generate(bank, inputs, rest, True))
        frames, finite = generator.outputs
        return _BucketGraphs(inputs, audio, generator, rest, frames, finite)

    def _cuda_graphs(self, b: int) -> _BucketGraphs:
        """The capture itself (see `_capture`); raises whatever the capture raises. The generator graph
        gathers from the bank's current tensors and draws random rows' noise with the runtime's
        generator, registered with the graph (graph-safe RNG: every replay advances its offset)."""
        inputs = _Inputs(b, self.device)
        bank = self.bank.tensors()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._generate(bank, inputs, self._rest(inputs), True)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        audio = torch.cuda.CUDAGraph()
        with torch.cuda.graph(audio, pool=self._pool, capture_error_mode="thread_local"):
            rest = self._rest(inputs)
        generator = torch.cuda.CUDAGraph()
        generator.register_generator_state(self._rng)
        with torch.cuda.graph(generator, pool=self._pool, capture_error_mode="thread_local"):
            frames, finite = self._generate(bank, inputs, rest, True)
        return _BucketGraphs(inputs, audio, generator, rest, frames, finite)

    # ------------------------------------------------------------------ warm-up
    @torch.inference_mode()
    def warm_up(self, batch_sizes: Sequence[int], slot: int = 0, force: bool = False,
                capacity: int | None = None) -> list[int]:
        """Run (and on CUDA capture) every batch shape that `batch_sizes` will use, before a live clock
        starts: cuDNN autotuning, lazy CUDA initialisation, weight-derived caches and graph capture all
        happen here instead of in the first seconds live. `capacity`: the identities the caller plans
        for (the studio's max_sessions); the bank is sized for them first, so the graphs never have to
        be re-captured for a growth. Off CUDA it does nothing unless `force` (no autotuning or graphs to
        prepare there). Returns the batch shapes prepared."""
        if not (self.cuda or self.emulate_graphs or force):
            return []
        if capacity is not None:
            self.reserve(capacity)
        shapes: list[int] = []
        for n in sorted(set(int(x) for x in batch_sizes if int(x) > 0), reverse=True):
            b = bucket_for(n, self.buckets) if self.pad_to_buckets else n
            b = b or max(self.buckets)
            if b not in shapes:
                shapes.append(b)
        with self.lock:
            self._warming = True
            try:
                for b in shapes:  # the largest first: smaller graphs then fit in the shared pool
                    rows = RowBatch(np.full(b, slot, np.int64),
                                    np.full((b, 1, N_MELS, WINDOW_ROWS), 0.5, np.float32),
                                    np.zeros((b, POSE_DIM), np.float32), np.ones(b, np.float32), np.zeros(b, bool))
                    self.render(rows)
            finally:
                self._warming = False
        return sorted(shapes)


class PendingRender:
    """A render queued by `RenderRuntime.submit`: `result()` waits for its one event (the download's)
    and returns the `Rendered`. The host arrays are this render's own (fresh pinned memory on CUDA,
    copies on the CPU), so a later submit never overwrites them. Idempotent."""

    def __init__(self, parts: list[list[np.ndarray]], done: "torch.cuda.Event | None",
                 clock: StageClock | None, rendered: Rendered | None = None) -> None:
        self._parts, self._done, self._clock, self._rendered = parts, done, clock, rendered

    def ready(self) -> bool:
        """True once result() would not wait."""
        return self._rendered is not None or self._done is None or bool(self._done.query())

    def result(self) -> Rendered:
        if self._rendered is None:
            if self._done is not None:
                self._done.synchronize()
            frames = [p[0] for p in self._parts]
            finite = [p[1] for p in self._parts]
            self._rendered = Rendered(frames[0] if len(frames) == 1 else np.concatenate(frames),
                                      finite[0] if len(finite) == 1 else np.concatenate(finite),
                                      self._clock.totals_ms() if self._clock is not None else {})
            self._parts = []
        return self._rendered


def frames_on_device(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,3,H,W) in [-1,1] → ((B,H,W,3) uint8, (B,) bool finite), on the images' device. uint8 like
    upstream `tensor2im` (truncating; spec §6), so frames stay bit-comparable with the original's; a
    NaN row would become an arbitrary picture, hence the flag."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    x = (images.float() + 1.0) / 2.0 * 255.0
    frames = x.clamp_(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return frames, finite
