"""The graphed render's per-tick input path, checked on the CPU (pcavs/runtime.py).

A tick is one packed host buffer, one host→device copy and two graph replays; the identity gathers run
inside the captured generator function, which binds the identity bank's tensors at capture. So: the
packed views must read back what was packed; a slot added (or released and reused) after capture must
be seen by the next replay; a bank growth must re-capture the graphs; `submit` / `PendingRender` must
give what `render` gives. The graphs are the runtime's CPU emulation (same captured functions) and, for
the CUDA bookkeeping (RNG registration, capture stream), torch.cuda patched as in test_gpu_path.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

import pcavs.runtime as runtime_module
from pcavs.engine import Avatar, EngineOptions, SessionRequest, render_sessions, submit_sessions
from pcavs.runtime import RenderRuntime, RowBatch, _Inputs
from tests.test_gpu_path import (FakeStream, assert_frames_close, fake_cuda, make_networks, mels,  # noqa: F401
                                 photo, reference_frame)


@pytest.fixture(scope="module")
def nets():
    return make_networks(seed=3)


def graphed(nets, buckets=(1, 2, 4), capacity: int | None = None) -> RenderRuntime:
    runtime = RenderRuntime(nets)
    runtime.configure(graphs=True, emulate_graphs=True, buckets=buckets)
    if capacity is not None:
        runtime.reserve(capacity)
    return runtime


def rows_of(n: int, seed: int, slots=None) -> RowBatch:
    rng = np.random.default_rng(seed)
    return RowBatch(np.asarray(slots if slots is not None else rng.integers(0, 1000, n), np.int64),
                    rng.uniform(0, 1, (n, 1, 80, 20)).astype(np.float32),
                    rng.normal(0, 1, (n, 12)).astype(np.float32), rng.uniform(0.5, 2, n).astype(np.float32),
                    rng.integers(0, 2, n).astype(bool))


@pytest.mark.parametrize("b,n", [(1, 1), (4, 3), (24, 24), (24, 17), (112, 100)])
def test_packed_views_read_back_what_was_packed(b, n):
    """One byte buffer, typed views at aligned offsets: slots (int64, lossless past 2**24), mels, poses,
    mouth weights, random flags. Padding rows keep their earlier (valid) data, with the random flag off."""
    inputs = _Inputs(b, torch.device("cpu"))
    full = rows_of(b, 1, slots=np.arange(b) + 2**40)      # a tick with every row, then one with n
    inputs.pack(full)
    inputs.upload()
    inputs.pack(full)                                     # the other host side holds it too
    inputs.upload()
    part = rows_of(n, 2)
    inputs.pack(part)
    inputs.upload()
    np.testing.assert_array_equal(inputs.slots[:n].numpy(), part.slots)
    np.testing.assert_array_equal(inputs.mels[:n].numpy(), part.mels)
    np.testing.assert_array_equal(inputs.poses[:n].numpy(), part.poses)
    np.testing.assert_array_equal(inputs.mouth_weights[:n, 0].numpy(), part.mouth_weights)
    np.testing.assert_array_equal(inputs.random[:n].numpy(), part.random_noise)
    np.testing.assert_array_equal(inputs.slots[n:].numpy(), full.slots[n:])   # padding: earlier data
    np.testing.assert_array_equal(inputs.mels[n:].numpy(), full.mels[n:])
    assert not inputs.random[n:].any()
    base = inputs.buffer.untyped_storage().data_ptr()
    for view in (inputs.slots, inputs.mels, inputs.poses, inputs.mouth_weights, inputs.random):
        assert view.untyped_storage().data_ptr() == base   # views of the one uploaded buffer
    assert inputs.buffer.dtype == torch.uint8 and inputs.buffer.numel() == inputs.nbytes


def test_host_sides_alternate_so_a_pack_never_overwrites_the_previous_tick():
    inputs = _Inputs(4, torch.device("cpu"))
    first, second = rows_of(4, 3), rows_of(4, 4)
    inputs.pack(first)
    kept = inputs.host_view("mels")
    inputs.pack(second)
    np.testing.assert_array_equal(kept, first.mels)       # tick t's side untouched by tick t+1's pack
    np.testing.assert_array_equal(inputs.host_view("mels"), second.mels)
    with pytest.raises(ValueError):
        inputs.pack(rows_of(5, 5))


def test_a_host_side_is_packed_again_only_after_its_copy_was_read():
    """On CUDA each upload records an event; packing that side again waits for it (two ticks later,
    normally long done), so a queued non-blocking copy never reads half-overwritten rows."""
    waited: list[int] = []

    class CopyEvent:  # what upload() records on CUDA
        def __init__(self, tick: int) -> None:
            self.tick = tick

        def synchronize(self) -> None:
            waited.append(self.tick)

    inputs = _Inputs(2, torch.device("cpu"))
    for tick in range(4):
        inputs.pack(rows_of(2, tick))
        assert waited == list(range(max(0, tick - 1)))   # only the side packed two ticks ago
        inputs._copied[inputs._side] = CopyEvent(tick)


def test_a_tick_is_one_upload_and_two_replays(nets, monkeypatch):
    """The gathers are in the captured generator function: per tick the host packs, copies once and
    replays twice, whatever the number of rows or identities."""
    runtime = graphed(nets, capacity=4)
    avatars = [Avatar(runtime, photo(80 + i), EngineOptions(noise="zero")) for i in range(3)]
    runtime.warm_up([1, 3])
    calls = {"upload": 0, "replay": 0, "generate": 0}
    real_upload, real_replay, real_generate = _Inputs.upload, runtime_module._EmulatedGraph.replay, runtime._generate

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(_Inputs, "upload", count("upload", real_upload))
    monkeypatch.setattr(runtime_module._EmulatedGraph, "replay", count("replay", real_replay))
    monkeypatch.setattr(runtime, "_generate", count("generate", real_generate))
    m = mels(3, 30)
    render_sessions([SessionRequest(a, m[i]) for i, a in enumerate(avatars)])
    # The generator replay is the only place the gathers ran; the eager path would call _generate
    # directly (and be counted without a replay).
    assert calls == {"upload": 1, "replay": 2, "generate": 1}


def test_identities_added_or_reused_after_capture_are_seen_by_the_next_replay(nets):
    runtime = graphed(nets, capacity=4)
    first = Avatar(runtime, photo(90), EngineOptions(noise="zero"))
    assert runtime.warm_up([1, 2, 4]) == [1, 2, 4]
    captures = runtime.stats.graph_captures
    late = Avatar(runtime, photo(91), EngineOptions(noise="zero"))       # after capture
    m = mels(2, 31)
    got = render_sessions([SessionRequest(first, m[0]), SessionRequest(late, m[1])])
    assert_frames_close(got[0], reference_frame(first, m[0], None))
    assert_frames_close(got[1], reference_frame(late, m[1], None))
    slot = late.slot
    late.close()
    reuse = Avatar(runtime, photo(92), EngineOptions(noise="zero", mouth_weight=1.7))
    assert reuse.slot == slot                                            # the released slot, reused
    again = render_sessions([SessionRequest(first, m[0]), SessionRequest(reuse, m[1])])
    assert_frames_close(again[1], reference_frame(reuse, m[1], None))
    assert np.any(again[1] != got[1])
    assert runtime.stats.graph_captures == captures and runtime.stats.bank_regrowths == 0
    assert runtime.stats.eager_rows == 0


def test_bank_growth_recaptures_the_graphs_with_one_warning(nets, caplog):
    """More identities than planned: the bank's tensors move, so the graphs bound to the old ones are
    dropped and captured again (one warning, counted), and the new identities render correctly."""
    runtime = graphed(nets, capacity=4)
    assert runtime.bank.capacity == 4
    avatars = [Avatar(runtime, photo(100 + i), EngineOptions(noise="zero")) for i in range(4)]
    runtime.warm_up([1, 2])
    captures = runtime.stats.graph_captures
    old_graphs = dict(runtime._graphs)
    caplog.set_level(logging.WARNING, logger="pcavs.runtime")
    extra = Avatar(runtime, photo(104), EngineOptions(noise="zero"))   # a fifth: the bank grows
    assert runtime.bank.capacity == 8 and extra.slot == 4
    assert runtime.stats.bank_regrowths == 1
    assert runtime.stats.graph_captures == captures + 2
    assert all(runtime._graphs[b] is not old_graphs[b] for b in (1, 2))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "grew to 8 slots" in warnings[0].getMessage()
    m = mels(2, 32)
    got = render_sessions([SessionRequest(avatars[1], m[0]), SessionRequest(extra, m[1])])
    assert_frames_close(got[0], reference_frame(avatars[1], m[0], None))
    assert_frames_close(got[1], reference_frame(extra, m[1], None))
    more = [Avatar(runtime, photo(105 + i), EngineOptions(noise="zero")) for i in range(3)]  # fits: no growth
    assert runtime.stats.bank_regrowths == 1 and len(more) == 3


def test_warm_up_sizes_the_bank_before_capturing(nets):
    runtime = graphed(nets)
    runtime.warm_up([1, 2], capacity=10)
    assert runtime.bank.capacity == 10 and runtime.stats.bank_regrowths == 0
    for i in range(10):
        runtime.add_identity(*_identity_parts(runtime, i))
    assert runtime.bank.capacity == 10 and runtime.stats.bank_regrowths == 0


def _identity_parts(runtime: RenderRuntime, seed: int):
    g = runtime.networks.generator
    torch.manual_seed(seed)
    with torch.inference_mode():
        style = g.precompute_style(torch.rand(1, 2048))
        start = torch.rand(512, g.init_size, g.init_size)
    return style, start, None


def test_submit_then_result_gives_what_render_gives(nets):
    """Two ticks of one bucket queued before either result is read: each gets its own frames (the
    second's replay does not overwrite the first's), the same as blocking renders; and the random row
    still draws fresh noise per tick inside the graph while the fixed row does not."""
    runtime = graphed(nets, capacity=4)
    fixed = Avatar(runtime, photo(110), EngineOptions(noise="fixed", noise_seed=2))
    rnd = Avatar(runtime, photo(111), EngineOptions(noise="random"))
    runtime.warm_up([2])
    m = mels(2, 33)
    first = submit_sessions([SessionRequest(fixed, m[0]), SessionRequest(rnd, m[0])])
    second = submit_sessions([SessionRequest(fixed, m[1]), SessionRequest(rnd, m[1])])
    assert first.ready() and second.ready()              # the CPU: already rendered at submit
    a, b = first.result(), second.result()
    assert first.result() is a                           # idempotent
    blocking = render_sessions([SessionRequest(fixed, m[0]), SessionRequest(rnd, m[0])])
    np.testing.assert_array_equal(a[0], blocking[0])
    assert np.any(a[0] != b[0])                          # different mels: different frames
    assert np.any(a[1] != blocking[1])                   # the random row: fresh noise each tick
    pending = runtime.submit(RowBatch(np.full(1, fixed.slot), m[:1], np.zeros((1, 12), np.float32),
                                      np.ones(1, np.float32), np.zeros(1, bool)))
    out = pending.result()
    assert out.frames.shape == (1, 28, 28, 3) and out.finite.all() and "generator" in out.stage_ms
    assert len(runtime.submit(RowBatch(*(np.zeros((0, *s)) for s in ((), (1, 80, 20), (12,), ())),
                                       np.zeros(0, bool))).result().frames) == 0


class _RecordingGraph:
    """torch.cuda.CUDAGraph's bookkeeping: the generators registered with it; replay does nothing."""

    made: list["_RecordingGraph"] = []

    def __init__(self) -> None:
        self.generators: list[object] = []
        _RecordingGraph.made.append(self)

    def register_generator_state(self, generator) -> None:
        self.generators.append(generator)

    def replay(self) -> None:
        pass


def test_cuda_capture_registers_the_rng_and_gathers_inside_the_generator_graph(nets, fake_cuda, monkeypatch):
    """On CUDA the generator graph's captured function holds the gathers and the random rows' draw, with
    the runtime's generator registered with that graph (graph-safe RNG: a fresh draw every replay)."""
    state = fake_cuda

    @contextlib.contextmanager
    def capture(graph, pool=None, capture_error_mode=None):
        saved, state["current"] = state["current"], FakeStream("capture")
        try:
            yield
        finally:
            state["current"] = saved

    _RecordingGraph.made = []
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordingGraph)
    runtime = RenderRuntime(nets)
    runtime.use_graphs = runtime.pad_to_buckets = True   # the CUDA configuration
    runtime.configure(buckets=(1, 2))
    avatar = Avatar(runtime, photo(120), EngineOptions(noise="random"))
    seen = []
    real = runtime._generate
    monkeypatch.setattr(runtime, "_generate", lambda *a, **k: seen.append(state["current"].name) or real(*a, **k))
    assert runtime.warm_up([2], force=True) == [2]
    avatar.render(mels(2, 34))
    assert runtime.stats.graph_captures == 1 and runtime.stats.graph_failures == 0
    audio, generator = _RecordingGraph.made
    assert audio.generators == [] and generator.generators == [runtime._rng]
    assert seen == ["side", "side", "capture"]           # warm-ups, then captured; replays call nothing
