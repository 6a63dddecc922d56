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
        np.testing.assert_allclose(o.cpu().numpy(), r.numpy(), rtol=1e-3, atol=1e-4)



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
