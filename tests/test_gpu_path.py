"""The render path the GPU runs, checked on the CPU (and on CUDA when present: tests marked `cuda`).

The vectorised path (identity bank gathers, one audio and one generator pass over rows of any mix of
sessions, bucket padding) runs on the CPU exactly as on the GPU, minus CUDA graphs and streams, so it is
compared here with the straightforward per-session computation. Networks: the real architectures with
random weights, the generator stopped at 28² (every layer kind, a fraction of the cost).
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pytest
import torch

from pcavs.checkpoints import PcavsNetworks
from pcavs.engine import (Avatar, EngineOptions, SessionRequest, StageTimes, encode_poses, render_sessions,
                          to_uint8_frames, warm_up)
from pcavs.networks.audio_encoder import AudioEncoder
from pcavs.networks.identity_encoder import IdentityEncoder
from pcavs.networks.pose_encoder import PoseEncoder
from pcavs.runtime import DEFAULT_BUCKETS, RenderRuntime, bucket_for
from bench.gpu_parity import ENC_ATOL, ENC_RTOL
from tests.test_generator import _random_generator

CUDA = torch.cuda.is_available()


def make_networks(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                  like: PcavsNetworks | None = None) -> PcavsNetworks:
    """Random-weight networks (generator at 28²); `like`: the same weights on another device/dtype."""
    if like is None:
        torch.manual_seed(seed)
        parts = [IdentityEncoder(), PoseEncoder(), AudioEncoder(), _random_generator(seed + 5, size=28)]
    else:
        parts = []
        for src, cls in ((like.identity, IdentityEncoder), (like.pose, PoseEncoder), (like.audio, AudioEncoder)):
            net = cls()
            net.load_state_dict(src.state_dict())
            parts.append(net)
        g = _random_generator(0, size=28)
        g.load_state_dict(like.generator.state_dict())
        parts.append(g)
    for i, net in enumerate(parts):
        net.to(device=device, dtype=dtype if i == 3 else torch.float32).eval().requires_grad_(False)
    return PcavsNetworks(*parts)


def photo(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, 224, 224), generator=g) * 2 - 1


def mels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 80, 20)).astype(np.float32)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def nets() -> PcavsNetworks:
    return make_networks()


@pytest.fixture(scope="module")
def rt(nets) -> RenderRuntime:
    """The networks' one render runtime, which every avatar of the module joins."""
    return RenderRuntime(nets)


@pytest.fixture(scope="module")
def avatars(rt):
    """Three sessions: fixed noise, zero noise with a livelier mouth, random noise."""
    return [Avatar(rt, photo(1), EngineOptions(noise="fixed", noise_seed=3)),
            Avatar(rt, photo(2), EngineOptions(noise="zero", mouth_weight=2.0)),
            Avatar(rt, photo(3), EngineOptions(noise="random"))]


def reference_frame(avatar: Avatar, mel: np.ndarray, pose: np.ndarray | None) -> np.ndarray:
    """The straightforward per-session computation: this avatar alone, eager, no bank."""
    with torch.inference_mode():
        rest = avatar.frame_style(avatar.mouth_codes(mel[None]), None if pose is None else pose[None])
        images = avatar.networks.generator.forward_cached(avatar.identity_style, rest, avatar.id_map[None],
                                                          avatar.noise.for_batch(1))
    return to_uint8_frames(images)[0]


def assert_frames_close(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 frames from the same maths in another order: a value may step by one where the float result
    sits on a level boundary; nothing more."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


# ------------------------------------------------------------------------------------- vectorised rows
def test_render_sessions_equals_the_per_session_reference(avatars):
    """Mixed identities, poses (given / the photo's own), mouth weights and noise modes in one batch."""
    fixed, zero, _ = avatars
    pose = np.random.default_rng(0).normal(0, 0.05, 12).astype(np.float32)
    m = mels(4, 1)
    reqs = [SessionRequest(fixed, m[0]), SessionRequest(zero, m[1], pose), SessionRequest(fixed, m[2], pose),
            SessionRequest(zero, m[3])]
    out = render_sessions(reqs)
    assert len(out) == 4 and all(r.result is f for r, f in zip(reqs, out))
    for r, frame in zip(reqs, out):
        assert_frames_close(frame, reference_frame(r.avatar, r.mel_window, r.pose_code))
    assert np.any(out[0] != out[1])


def test_avatar_batch_equals_sessions_of_the_same_avatar(avatars):
    fixed = avatars[0]
    m = mels(3, 2)
    alone = fixed.render(m)
    together = render_sessions([SessionRequest(fixed, w) for w in m])
    np.testing.assert_array_equal(alone, np.stack(together))


def test_random_noise_rows_get_fresh_noise_and_others_keep_theirs(avatars):
    fixed, _, rnd = avatars
    m = mels(1, 3)[0]
    a = render_sessions([SessionRequest(fixed, m), SessionRequest(rnd, m)])
    b = render_sessions([SessionRequest(fixed, m), SessionRequest(rnd, m)])
    np.testing.assert_array_equal(a[0], b[0])
    assert np.any(a[1] != b[1])


def test_bucket_padding_returns_exactly_the_requested_rows(rt, avatars):
    runtime = rt
    fixed, zero, _ = avatars
    m = mels(6, 4)
    reqs = lambda: [SessionRequest(fixed if i % 2 else zero, m[i]) for i in range(6)]  # noqa: E731
    plain = [render_sessions(reqs()[:n]) for n in (3, 6)]
    padded_before = runtime.stats.padded_rows
    runtime.configure(pad_to_buckets=True, buckets=(1, 2, 4))
    try:
        three = render_sessions(reqs()[:3])    # padded to 4
        six = render_sessions(reqs())          # 4 + 2: more rows than the largest bucket
    finally:
        runtime.configure(pad_to_buckets=False, buckets=DEFAULT_BUCKETS)
    assert len(three) == 3 and len(six) == 6
    assert runtime.stats.padded_rows - padded_before == 1
    np.testing.assert_array_equal(np.stack(three), np.stack(plain[0]))
    np.testing.assert_array_equal(np.stack(six), np.stack(plain[1]))


def test_graphed_flow_reuses_static_buffers_correctly(rt, avatars):
    """The CUDA-graph flow with its semantics emulated on the CPU (fixed input buffers refilled per call,
    outputs overwritten by every replay): any number of rows, repeated buckets within one call (9 rows =
    4 + 4 + 1), random noise and bucket padding give exactly the eager frames."""
    runtime = rt
    fixed, zero, rnd = avatars
    m = mels(9, 15)
    reqs = lambda k: [SessionRequest((fixed, zero)[i % 2], m[i]) for i in range(k)]  # noqa: E731
    eager = {k: np.stack(render_sessions(reqs(k))) for k in (1, 3, 9)}
    fixed_alone = render_sessions([SessionRequest(fixed, m[1])])[0]
    runtime.configure(graphs=True, emulate_graphs=True, buckets=(1, 2, 4))
    before = (runtime.stats.graph_rows, runtime.stats.graph_captures)
    try:
        assert runtime.warm_up([1, 3]) == [1, 4]
        graphed = {k: np.stack(render_sessions(reqs(k))) for k in (1, 3, 9, 3)}
        mixed = [render_sessions([SessionRequest(rnd, m[0]), SessionRequest(fixed, m[1])]) for _ in range(2)]
    finally:
        runtime.configure(graphs=False, emulate_graphs=False, pad_to_buckets=False,
                          buckets=DEFAULT_BUCKETS)
    for k, frames in graphed.items():
        np.testing.assert_array_equal(frames, eager[k])
    assert runtime.stats.graph_rows - before[0] == (4 + 1) + 1 + 3 + 9 + 3 + 2 + 2  # warm-up rows first
    assert runtime.stats.graph_captures - before[1] == 3  # 4, 1 at warm-up, then 2 for the mixed pair
    assert np.any(mixed[0][0] != mixed[1][0])                  # the random row got fresh noise
    np.testing.assert_array_equal(mixed[0][1], mixed[1][1])   # the fixed row did not
    np.testing.assert_array_equal(mixed[0][1], fixed_alone)


def test_bucket_for():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_warm_up_prepares_each_bucket_once(rt):
    runtime = rt
    assert warm_up(rt, [1, 3]) == [] or CUDA  # nothing to prepare on a CPU unless forced
    runtime.configure(pad_to_buckets=True, buckets=(1, 2, 4))
    calls = []
    real = runtime.render
    runtime.render = lambda rows, *a, **k: calls.append(len(rows)) or real(rows, *a, **k)  # type: ignore
    try:
        assert runtime.warm_up([1, 3, 4], force=True) == [1, 4]
    finally:
        del runtime.render
        runtime.configure(pad_to_buckets=False, buckets=DEFAULT_BUCKETS)
    assert calls == [4, 1]  # the largest first


def test_stage_times_are_recorded(avatars):
    times = StageTimes()
    avatars[0].render(mels(1, 5), times=times)
    assert times.audio_ms > 0 and times.generator_ms > 0 and times.convert_ms >= 0


def test_identity_bank_grows_and_reuses_released_slots(rt, avatars):
    fixed, zero = avatars[0], avatars[1]
    runtime = rt
    m = mels(1, 6)
    before = fixed.render(m)
    capacity = runtime.bank.capacity
    filler = [runtime.add_identity(zero.identity_style, zero.id_map, None) for _ in range(capacity)]
    assert runtime.bank.capacity > capacity
    np.testing.assert_array_equal(fixed.render(m), before)  # rows survive the growth
    runtime.release(filler[0])
    assert runtime.add_identity(zero.identity_style, zero.id_map, None) == filler[0]
    for slot in filler:
        runtime.release(slot)
    extra = Avatar(rt, photo(2), EngineOptions(noise="zero", mouth_weight=2.0))  # zero's photo and options
    assert extra.slot in filler
    np.testing.assert_array_equal(extra.render(m), zero.render(m))
    slot = extra.slot
    del extra  # garbage collection releases the slot too
    assert runtime.add_identity(zero.identity_style, zero.id_map, None) == slot


@contextlib.contextmanager
def poisoned(runtime: RenderRuntime, slot: int, value: float, layer: int = 3):
    """One identity's style term set to a non-finite value (what an overflow upstream would produce)."""
    terms = runtime.bank.terms[layer]
    with torch.inference_mode():
        saved = terms[slot].clone()
        terms[slot] = value
    try:
        yield
    finally:
        with torch.inference_mode():
            terms[slot] = saved


def test_nonfinite_frame_is_held_and_counted(rt):
    a = Avatar(rt, photo(20), EngineOptions(noise="zero"))
    b = Avatar(rt, photo(21), EngineOptions(noise="zero"))
    m = mels(2, 7)
    first = render_sessions([SessionRequest(a, m[0]), SessionRequest(b, m[0])])
    with poisoned(rt, a.slot, float("nan")):
        held = render_sessions([SessionRequest(a, m[1]), SessionRequest(b, m[1])])
    np.testing.assert_array_equal(held[0], first[0])          # the last good frame, not garbage
    assert a.frames_nonfinite == 1 and b.frames_nonfinite == 0
    assert np.any(held[1] != first[1])                        # the other session rendered normally
    # Before any good frame: the photo as the networks saw it (scaled to the generator's 28² here).
    with poisoned(rt, b.slot, float("nan")):
        fresh = Avatar(rt, photo(22), EngineOptions(noise="zero"))
        with poisoned(rt, fresh.slot, float("nan")):
            photo_frame = fresh.render(m[:1])[0]
    assert fresh.frames_nonfinite == 1
    np.testing.assert_array_equal(photo_frame, fresh.placeholder)
    assert photo_frame.shape == (28, 28, 3)


def test_encode_poses_batches_any_sessions_frames(nets):
    crops = np.random.default_rng(8).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    together = encode_poses(nets, crops)
    alone = np.concatenate([encode_poses(nets, crops[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 12) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def nets_bf16(nets) -> PcavsNetworks:
    return make_networks(dtype=torch.bfloat16, like=nets)


def test_bf16_keeps_encoders_float32(nets_bf16):
    assert nets_bf16.generator_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for net in (nets_bf16.identity, nets_bf16.pose, nets_bf16.audio)
               for p in net.parameters())


def test_bf16_avatar_and_sessions_close_to_float32(rt, nets_bf16):
    m = mels(2, 9)
    pose = np.random.default_rng(1).normal(0, 0.05, (2, 12)).astype(np.float32)
    ref = [Avatar(rt, photo(i), EngineOptions(noise="zero")) for i in (30, 31)]
    rt_bf16 = RenderRuntime(nets_bf16)
    half = [Avatar(rt_bf16, photo(i), EngineOptions(noise="zero", dtype=torch.bfloat16)) for i in (30, 31)]
    np.testing.assert_allclose(half[0].id_feature.numpy(), ref[0].id_feature.numpy())  # float32 encoders
    batch_ref, batch_half = ref[0].render(m, pose), half[0].render(m, pose)
    sess_ref = np.stack(render_sessions([SessionRequest(a, w) for a, w in zip(ref, m)]))
    sess_half = np.stack(render_sessions([SessionRequest(a, w) for a, w in zip(half, m)]))
    for x, y in ((batch_half, batch_ref), (sess_half, sess_ref)):
        value = psnr_uint8(x, y)
        print(f"\nbf16 vs float32 frames: PSNR {value:.1f} dB, max |Δ| {np.abs(x.astype(int) - y).max()}")
        assert value > 40.0


# --------------------------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def cuda_nets(nets):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    return {dtype: RenderRuntime(make_networks("cuda", dtype, like=nets)) for dtype in (torch.float32, torch.bfloat16)}


@pytest.fixture()
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("net_name", ["identity", "pose", "audio"])
@pytest.mark.parametrize("batch", [1, 5])
def test_cuda_encoders_match_cpu(nets, cuda_nets, no_tf32, net_name, batch):
    shape = (batch, 1, 80, 20) if net_name == "audio" else (batch, 3, 224, 224)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(batch)) * (1 if net_name == "audio" else 2) - (
        0 if net_name == "audio" else 1)
    with torch.inference_mode():
        ref = getattr(nets, net_name)(x)
        out = getattr(cuda_nets[torch.float32].networks, net_name)(x.cuda())
    ref, out = (ref if isinstance(ref, tuple) else (ref,)), (out if isinstance(out, tuple) else (out,))
    for r, o in zip(ref, out):
        # The one device bound, justified where it is defined (bench/gpu_parity.py).
        np.testing.assert_allclose(o.cpu().numpy(), r.numpy(), rtol=ENC_RTOL, atol=ENC_ATOL)



@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("n", [1, 3])
def test_cuda_sessions_match_cpu(rt, cuda_nets, no_tf32, dtype, graphs, n):
    """Batch 1 and a padded batch (3 → bucket 4), eager and CUDA-graphed, against the CPU float32 path."""
    cnets = cuda_nets[dtype]
    cnets.configure(graphs=graphs)
    graph_rows = cnets.stats.graph_rows
    m = mels(n, 11)
    pose = np.random.default_rng(2).normal(0, 0.05, (n, 12)).astype(np.float32)
    cpu = [Avatar(rt, photo(40 + i), EngineOptions(noise="zero")) for i in range(n)]
    gpu = [Avatar(cnets, photo(40 + i), EngineOptions(device="cuda", noise="zero")) for i in range(n)]
    ref = np.stack(render_sessions([SessionRequest(a, m[i], pose[i]) for i, a in enumerate(cpu)]))
    out = np.stack(render_sessions([SessionRequest(a, m[i], pose[i]) for i, a in enumerate(gpu)]))
    if dtype == torch.float32:
        assert_frames_close(out, ref)
    else:
        assert psnr_uint8(out, ref) > 40.0
    assert cnets.stats.graph_failures == 0
    assert (cnets.stats.graph_rows - graph_rows == n) == graphs


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_avatar_render_path_never_syncs_the_device(cuda_nets, monkeypatch):
    cnets = cuda_nets[torch.bfloat16]
    cnets.configure(graphs=True)
    avatar = Avatar(cnets, photo(50), EngineOptions(device="cuda", dtype=torch.bfloat16))
    assert avatar.warm_up([1, 4]) == [1, 4]
    assert {1, 4} <= set(cnets.stats.captured_buckets)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize on the render path")
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    times = StageTimes()
    frames = avatar.render(mels(4, 12), times=times)
    assert frames.shape == (4, 28, 28, 3) and times.generator_ms > 0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_pose_worker_stream_runs_beside_rendering(cuda_nets):
    """A worker thread encoding poses on its own low-priority stream while the render thread renders:
    both give what they give alone."""
    from pcavs.gpu import WorkerStream
    cnets = cuda_nets[torch.float32]
    avatar = Avatar(cnets, photo(51), EngineOptions(device="cuda", noise="zero"))
    crops = np.random.default_rng(3).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    m = mels(2, 13)
    want_codes, want_frames = encode_poses(cnets.networks, crops), avatar.render(m)
    stream, got = WorkerStream("cuda"), []
    worker = threading.Thread(target=lambda: got.extend(stream.wrap(encode_poses)(cnets.networks, crops) for _ in range(5)))
    worker.start()
    frames = [avatar.render(m) for _ in range(5)]
    worker.join()
    for c in got:
        np.testing.assert_allclose(c, want_codes, rtol=1e-5, atol=1e-6)
    for f in frames:
        np.testing.assert_array_equal(f, want_frames)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_nonfinite_rows_are_held_on_the_graph_path(cuda_nets):
    cnets = cuda_nets[torch.bfloat16]
    cnets.configure(graphs=True)
    a = Avatar(cnets, photo(52), EngineOptions(device="cuda", noise="zero"))
    m = mels(2, 14)
    good = a.render(m[:1])
    with poisoned(cnets, a.slot, float("inf"), layer=2):
        held = a.render(m[1:])
    np.testing.assert_array_equal(held, good)
    assert a.frames_nonfinite == 1


def test_runtime_is_shared_by_every_avatar_of_the_networks(nets, rt, avatars):
    assert all(a.runtime is rt and a.networks is nets for a in avatars)
    assert not hasattr(nets, "runtime")  # plain networks: the runtime is made (once) by whoever builds sessions
    with pytest.raises(TypeError, match="RenderRuntime"):
        Avatar(nets, photo(1))  # type: ignore[arg-type]
    other = Avatar(RenderRuntime(nets), photo(1))
    with pytest.raises(ValueError, match="one RenderRuntime"):
        render_sessions([SessionRequest(avatars[0], mels(1, 0)[0]), SessionRequest(other, mels(1, 0)[0])])


def test_checkpoints_never_import_the_runtime():
    """One-way: pcavs.runtime imports pcavs.checkpoints, never the reverse (not even lazily)."""
    import subprocess
    import sys
    code = ("import sys, pcavs.checkpoints as c; assert 'pcavs.runtime' not in sys.modules; "
            "import inspect; src = inspect.getsource(c); assert 'pcavs.runtime import' not in src and "
            "'import pcavs.runtime' not in src; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_prepare_engine_sets_cudnn_warms_up_and_watches_nonfinite(avatars, monkeypatch):
    from pcavs_live.pipeline.engine_setup import prepare_engine
    from pcavs_live.pipeline.metrics import LiveMetrics
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as face_alignment leaves it
    metrics = LiveMetrics()
    assert prepare_engine(avatars[0], (1,), metrics) == []  # nothing to prepare on a CPU
    assert torch.backends.cudnn.benchmark is False
    assert metrics.snapshot()["frames_nonfinite"] == avatars[0].frames_nonfinite


# ------------------------------------------------------------------ CUDA's stream rules, emulated on the CPU
class FakeStream:
    """A CUDA stream's bookkeeping: what it was told to wait for."""

    device = torch.device("cpu")

    def __init__(self, name: str) -> None:
        self.name, self.waits = name, []

    def wait_stream(self, other) -> None:
        self.waits.append(("stream", other.name))

    def wait_event(self, event) -> None:
        self.waits.append(("event", event))

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch.cuda's current-stream machinery for one thread, as torch implements it: `torch.cuda.stream`
    switches and restores, `set_stream` switches. The tensors stay on the CPU."""
    state = {"current": FakeStream("caller")}

    @contextlib.contextmanager
    def stream(s):
        saved, state["current"] = state["current"], s
        try:
            yield
        finally:
            state["current"] = saved

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    return state


def test_failed_capture_falls_back_eagerly_on_the_callers_stream(nets, fake_cuda, monkeypatch):
    """`torch.cuda.graph` enters its capture stream and leaves it only after `capture_end` succeeded. A
    capture that fails there must not leave the render thread on the capture stream: the eager fallback
    runs on the stream the render was on, the bucket stays eager, and the frames are the eager ones."""
    state = fake_cuda

    class FailingGraph:  # torch.cuda.graph with capture_end forced to fail (exit raises before restoring)
        def __init__(self, graph, pool=None, capture_error_mode=None) -> None:
            pass

        def __enter__(self) -> None:
            state["current"] = FakeStream("capture")

        def __exit__(self, *exc) -> None:
            raise RuntimeError("capture_end: operation not permitted when stream is capturing (forced)")

    runtime = RenderRuntime(nets)
    avatar = Avatar(runtime, photo(60), EngineOptions(noise="zero"))
    m = mels(3, 16)
    want = avatar.render(m)
    monkeypatch.setattr(torch.cuda, "graph", FailingGraph)
    runtime.use_graphs = runtime.pad_to_buckets = True  # the CUDA configuration (configure() needs CUDA)
    seen = []
    real = runtime._frames
    monkeypatch.setattr(runtime, "_frames", lambda *a: seen.append(state["current"].name) or real(*a))
    got = [avatar.render(m) for _ in range(2)]
    assert runtime.stats.graph_failures == 1 and runtime.stats.graph_rows == 0 and runtime.stats.graph_captures == 0
    assert seen == ["side", "side", "caller", "caller"]  # capture warm-ups on the side stream, then eager
    assert state["current"].name == "caller"
    for frames in got:
        np.testing.assert_array_equal(frames, want)


def test_render_stream_waits_only_for_the_events_it_needs(nets, fake_cuda, monkeypatch):
    """A joining session's identity encoding runs on the identity stream; the render stream waits for
    that one event (no host wait) and never for the caller's (default) stream, where anything may be
    queued. Only caller-supplied CUDA tensors (the oracle's noise) make a render wait for the caller."""
    import pcavs.runtime as runtime_module

    events: list[object] = []
    monkeypatch.setattr(runtime_module, "record_event", lambda: events.append(object()) or events[-1])
    runtime = RenderRuntime(nets)
    runtime.stream, runtime.cuda = FakeStream("render"), True  # the CUDA bookkeeping on CPU tensors
    avatar = Avatar(runtime, photo(61), EngineOptions(noise="zero"))
    assert runtime.stream.waits == [("event", events[0])]
    avatar.render(mels(2, 17))
    render_sessions([SessionRequest(avatar, mels(1, 18)[0])])
    assert runtime.stream.waits == [("event", events[0])]
    noise = [torch.zeros(s) for s in nets.generator.noise_shapes()]
    avatar.render(mels(1, 19), noise=noise)
    assert runtime.stream.waits[-1] == ("stream", "caller")


def test_emulated_graphs_run_the_generators_whole_batch(rt, avatars, monkeypatch):
    """On the CPU the generator runs batch-1 passes ("auto"); CUDA runs the bucket's whole batch in one
    pass and captures that. The emulated graphs must exercise the batched path, not the per-sample one."""
    g = rt.networks.generator
    sizes: list[int] = []
    real = g._synthesize
    monkeypatch.setattr(g, "_synthesize", lambda mods, x, noise: sizes.append(x.shape[0]) or real(mods, x, noise))
    fixed, zero, _ = avatars
    m = mels(3, 18)
    reqs = [SessionRequest((fixed, zero)[i % 2], m[i]) for i in range(3)]
    eager = np.stack(render_sessions(reqs))
    assert sizes == [1, 1, 1]  # the plain CPU path
    sizes.clear()
    rt.configure(graphs=True, emulate_graphs=True, buckets=(1, 2, 4))
    try:
        graphed = np.stack(render_sessions(reqs))
    finally:
        rt.configure(graphs=False, emulate_graphs=False, pad_to_buckets=False, buckets=DEFAULT_BUCKETS)
    assert sizes == [4, 4]  # capture, then replay: the bucket of 4 in one pass each
    assert g.max_batch == "auto"
    assert_frames_close(graphed, eager)


def test_buckets_between_powers_of_two():
    """100 sessions pad to 112, not 128; every bucket up to 256 is still there."""
    assert bucket_for(100, DEFAULT_BUCKETS) == 112 and bucket_for(20, DEFAULT_BUCKETS) == 24
    assert {1, 2, 4, 8, 16, 32, 64, 128, 256} <= set(DEFAULT_BUCKETS) and max(DEFAULT_BUCKETS) == 256
    assert all(b / a <= 2 for a, b in zip(DEFAULT_BUCKETS, DEFAULT_BUCKETS[1:]))


# ------------------------------------------------------------------------------------ the studio on a GPU
def test_studio_warm_up_prepares_every_bucket_up_to_max_sessions(nets):
    """Every bucket a tick of 1 .. max_sessions sessions pads to is captured before the first session;
    sessions joining later capture nothing."""
    from pcavs_live.pipeline.engine_setup import prepare_runtime
    runtime = RenderRuntime(nets)
    assert prepare_runtime(runtime, 5) == []  # a CPU: nothing to prepare
    runtime.configure(graphs=True, emulate_graphs=True, buckets=(1, 2, 4, 8, 16))
    assert prepare_runtime(runtime, 5) == [1, 2, 4, 8]
    assert sorted(runtime.stats.captured_buckets) == [1, 2, 4, 8]
    avatars = [Avatar(runtime, photo(70 + i), EngineOptions(noise="zero")) for i in range(5)]
    m = mels(5, 20)
    for k in range(1, 6):
        render_sessions([SessionRequest(a, m[i]) for i, a in enumerate(avatars[:k])])
    assert runtime.stats.graph_captures == 4 and runtime.stats.graph_rows > 0


def test_studio_accepts_offers_only_after_the_warm_up(monkeypatch, tmp_path):
    """serve(): the server is up first (a port in use is reported at once), but identities are encoded,
    so offers accepted, only once the runtime has been warmed up for server.max_sessions."""
    from types import SimpleNamespace

    import pcavs_live.pipeline.builders as builders
    import pcavs_live.pipeline.engine_setup as engine_setup
    import stream.studio as studio_pkg
    from pcavs_live.pipeline import studio

    events: list[tuple] = []
    fake_runtime = object()

    class FakeServer:
        url = "http://127.0.0.1:0/"

        def __init__(self, factory, **kwargs) -> None:
            self.factory, self.max_sessions = factory, kwargs["max_sessions"]

        def start(self) -> None:
            events.append(("server started", self.factory.encode.runtime))

        def stop(self) -> None:
            events.append(("server stopped",))

    monkeypatch.setattr(studio_pkg, "StudioServer", FakeServer)
    monkeypatch.setattr(builders, "make_runtime", lambda checkpoint_dir, opts: fake_runtime)
    servers: list[FakeServer] = []
    monkeypatch.setattr(engine_setup, "prepare_runtime",
                        lambda runtime, n: events.append(("warm", runtime, n, servers[0].factory.encode.runtime)))
    stop = threading.Event()

    def ready(server) -> None:
        events.append(("ready", server.factory.encode.runtime))
        stop.set()

    config = SimpleNamespace(
        server=SimpleNamespace(host="127.0.0.1", port=0, token=None, max_sessions=6, stun_url=None, turn_url=None,
                               turn_username=None, turn_credential=None, ice_host_addresses=()),
        model=SimpleNamespace(device="cpu", dtype="float32", noise="fixed", noise_seed=0, mouth_weight=1.2,
                              checkpoint_dir=tmp_path),
        identity=SimpleNamespace(photo=tmp_path / "photo.png"),
        pose=SimpleNamespace(smoothing=0.5, rate_hz=12.5),
        whip=SimpleNamespace(endpoint=None, token=None, viewer_url=None))
    real_init = FakeServer.__init__

    def init(self, factory, **kwargs):
        real_init(self, factory, **kwargs)
        servers.append(self)
    monkeypatch.setattr(FakeServer, "__init__", init)
    assert studio.serve(config, stop=stop, ready=ready) == 0
    assert events == [("server started", None), ("warm", fake_runtime, 6, None), ("ready", fake_runtime),
                      ("server stopped",)]


def test_studio_pose_detector_tracks_through_the_shared_model():
    """Each session's pose worker gets the shared model's two stages, so it tracks (the box detector
    runs once, then only when the face is lost); the model is loaded once for all sessions."""
    from pcavs.alignment.tracking import TrackingDetector, tracking_detector
    from pcavs_live.pipeline.studio import SharedLandmarkModel

    class Model:
        loads = 0

        def __init__(self, max_side=None) -> None:
            self.max_side, self.boxes, self.fan = max_side, 0, 0

        def with_detect_max_side(self, max_side):
            sibling = Model(max_side)
            sibling.parent = self
            return sibling

        def face_boxes(self, rgb):
            self.parent.boxes += 1
            return [np.array([10.0, 10.0, 60.0, 60.0, 0.99])]

        def landmarks_in_boxes(self, rgb, boxes):
            self.parent.fan += 1
            x1, y1, x2, y2 = boxes[0][:4]
            grid = np.stack(np.meshgrid(np.linspace(x1 + 5, x2 - 5, 17), np.linspace(y1 + 5, y2 - 5, 4)), -1)
            return [(grid.reshape(-1, 2)[:68].astype(np.float32), 0.9)]

    def load():
        Model.loads += 1
        return Model()

    shared = SharedLandmarkModel(load)
    sessions = [tracking_detector(shared(320)) for _ in range(3)]
    assert all(isinstance(t, TrackingDetector) for t in sessions) and Model.loads == 1
    rgb = np.zeros((120, 160, 3), np.uint8)
    for _ in range(4):
        for t in sessions:
            assert len(t.detect(rgb)) == 1
    model = sessions[0].model.parent
    assert model.boxes == 3 and model.fan == 3 * 4   # one box detection per session, then tracking
    assert [t.counters.tracked for t in sessions] == [3, 3, 3]


def test_studio_session_stop_frees_its_slot_without_device_wide_syncs(monkeypatch):
    """A stop releases the session's identity slot and its references; no gc.collect() (GIL held for the
    whole heap) and no torch.cuda.empty_cache() (device-wide sync, unsafe beside a capture)."""
    import gc

    from pcavs_live.pipeline.studio import StudioSession

    def forbidden(*args, **kwargs):
        raise AssertionError("device-wide or process-wide cleanup on a session stop")
    monkeypatch.setattr(gc, "collect", forbidden)
    monkeypatch.setattr(torch.cuda, "empty_cache", forbidden)

    class Closable:
        closed = 0

        def close(self) -> None:
            Closable.closed += 1

    from pcavs_live.cli.config import load_config
    session = StudioSession(Closable(), np.zeros((4, 4, 3), np.uint8), renderer=None, pose_detector=None,
                            config=load_config(None, {}), device="cuda")
    session.stop()
    session.stop()
    assert Closable.closed == 1 and session.avatar is None


def test_pose_batcher_encodes_waiting_sessions_crops_in_one_pass(nets):
    """While one pass runs, the other sessions' crops wait and go through the next pass together; every
    caller gets its own crop's code (the same as encode_poses alone), and a failing pass reaches each
    of its callers."""
    from pcavs_live.pipeline.engine_setup import PoseBatcher

    crops = np.random.default_rng(9).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    alone = encode_poses(nets, crops)
    inside, release = threading.Event(), threading.Event()
    passes: list[int] = []

    def encode_many(networks, batch):
        passes.append(len(batch))
        if len(passes) == 1:
            inside.set()
            release.wait(30)
        return encode_poses(networks, batch)

    batcher = PoseBatcher(encode_many)
    got: dict[int, np.ndarray] = {}
    first = threading.Thread(target=lambda: got.__setitem__(0, batcher.encode(nets, crops[0])))
    first.start()
    assert inside.wait(30)
    rest = [threading.Thread(target=lambda i=i: got.__setitem__(i, batcher.encode(nets, crops[i])))
            for i in range(1, 5)]
    for t in rest:
        t.start()
    deadline = threading.Event()
    for _ in range(300):  # every other session's crop is waiting for the pass in flight
        with batcher._cond:
            if len(batcher._pending) == 4:
                break
        deadline.wait(0.1)
    release.set()
    for t in [first, *rest]:
        t.join(60)
    assert passes == [1, 4] and batcher.passes == 2 and batcher.crops == 5
    for i in range(5):
        np.testing.assert_allclose(got[i], alone[i], rtol=1e-4, atol=1e-5)

    def broken(networks, batch):
        raise RuntimeError("pose encoder failed")
    with pytest.raises(RuntimeError, match="pose encoder failed"):
        PoseBatcher(broken).encode(nets, crops[0])
