"""ModulatedGenerator (G): exact parity with the upstream oracle, and the shared-weight formulation's equivalence.

Parity weights come from shared/parity/make_weights.py through our checkpoint loader; G's file is
359 MB, so it is loaded once per seed (module-scoped fixture). The oracle's own float noise is ~2e-6
(README), so the 1e-4 bound leaves 50x headroom: a failure is a bug in our code, never a reason to
loosen it. Run with `-s` to see the max |Δ| per seed.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import PARITY_DIR, load_case, parity_weights_dir
from pcavs.checkpoints import IGNORABLE_PREFIXES, NETWORK_FILES, load_network
from pcavs.constants import ID_DIM
from pcavs.networks.generator import IdentityStyle, ModulatedGenerator

PARITY_ATOL = 1e-4
FORMULATION_ATOL = 1e-5
NOISE_SIZES = (7, 14, 14, 28, 28, 56, 56, 112, 112, 224, 224)
# bf16 keeps 8 mantissa bits (relative rounding ≤ 2^-9 ≈ 0.2 %); demodulation renormalises every layer,
# so the error stays of that relative size: ~3e-3 rms on images of std 0.25-0.4, i.e. ~50 dB PSNR
# (peak-to-peak 2; measured 50.3 dB on a full-size random G). 35 dB (rms error ~0.036, ~4.5 grey
# levels of 255) is where it would start to be visible, and far above what a real bug gives (a wrong
# layer or dtype mix-up drops PSNR to ~10-20 dB). fp16 (11 mantissa bits) must clear it easily too.
HALF_MIN_PSNR_DB = 35.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual [0, 1] PSNR)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Upstream tensor2im: (x+1)/2·255, clip, truncating cast, HWC."""
    x = ((images.numpy().astype(np.float32) + 1.0) / 2.0 * 255.0).clip(0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------ parity fixtures
@pytest.fixture(scope="module")
def case(parity_seed: int) -> dict[str, np.ndarray]:
    return load_case(parity_seed)


@pytest.fixture(scope="module")
def generator(parity_seed: int) -> ModulatedGenerator:
    net = ModulatedGenerator()
    path = parity_weights_dir(parity_seed) / NETWORK_FILES["G"]
    return load_network(net, path, IGNORABLE_PREFIXES["G"]).eval()


@pytest.fixture(scope="module")
def stored_noise(case) -> list[torch.Tensor]:
    return [torch.from_numpy(case[f"noise_{i}"].astype(np.float32)) for i in range(11)]


@pytest.fixture(scope="module")
def driven(case, generator, stored_noise) -> torch.Tensor:
    """G on style_driven with the default (shared-weight) formulation, shared by several tests."""
    with torch.inference_mode():
        return generator(torch.from_numpy(case["style_driven"]), torch.from_numpy(case["id_map"]), stored_noise)


def _max_diff(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.numpy().astype(np.float64) - expected).max())


# --------------------------------------------------------------------------------------- structure
def test_state_dict_matches_manifest() -> None:
    """Same keys, order, shapes and param/buffer kinds as the upstream module: the released file
    loads with load_state_dict(strict=True)."""
    manifest = json.loads((PARITY_DIR / "manifest.json").read_text())["networks"]["G"]["keys"]
    with torch.device("meta"):
        net = ModulatedGenerator()
    buffers = {name for name, _ in net.named_buffers()}
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch."), "buffer" if k in buffers else "param"]
            for k, v in net.state_dict().items()]
    assert ours == manifest


def test_noise_shapes() -> None:
    with torch.device("meta"):
        net = ModulatedGenerator()
    assert net.noise_shapes() == [(1, 1, s, s) for s in NOISE_SIZES]


def test_mapping_mlp_is_never_run() -> None:
    with torch.device("meta"):
        net = ModulatedGenerator()
    with pytest.raises(RuntimeError, match="never run"):
        net.style(torch.zeros(1, 2560, device="meta"))


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.slow
def test_driven_matches_oracle(parity_seed: int, case, driven, record_property) -> None:
    diff = _max_diff(driven, case["out_driven"])
    record_property(f"max_abs_diff_seed{parity_seed}_out_driven", diff)
    print(f"\nseed{parity_seed} out_driven   shared  max|diff| {diff:.3e}")
    assert diff < PARITY_ATOL


@pytest.mark.slow
def test_ref_pose_matches_oracle(parity_seed: int, case, generator, stored_noise, record_property) -> None:
    with torch.inference_mode():
        out = generator(torch.from_numpy(case["style_ref"]), torch.from_numpy(case["id_map"]), stored_noise)
    diff = _max_diff(out, case["out_ref_pose"])
    record_property(f"max_abs_diff_seed{parity_seed}_out_ref_pose", diff)
    print(f"\nseed{parity_seed} out_ref_pose shared  max|diff| {diff:.3e}")
    assert diff < PARITY_ATOL


@pytest.mark.slow
def test_driven_uint8_matches_oracle(parity_seed: int, case, driven, record_property) -> None:
    """Truncating uint8 conversion: a value flips only where the exact result sits within float error
    (~1e-6·127.5) of an integer boundary: expect tens of ±1 differences among 451,584 values (seen:
    19 and 29). A real bug changes most of them; the bound (0.05 %) only absorbs float-order noise."""
    ours = to_uint8(driven).astype(np.int16)
    ref = case["out_driven_uint8"].astype(np.int16)
    delta = np.abs(ours - ref)
    n_diff = int((delta > 0).sum())
    record_property(f"uint8_values_differing_seed{parity_seed}", n_diff)
    print(f"\nseed{parity_seed} out_driven_uint8: {n_diff} of {delta.size} values differ, max {int(delta.max())}")
    assert delta.max() <= 1
    assert n_diff <= 200


@pytest.mark.slow
def test_grouped_reference_matches_oracle(parity_seed: int, case, generator, stored_noise,
                                          record_property) -> None:
    generator.shared_weight, generator.max_batch = False, None  # upstream: one grouped conv, groups=B
    try:
        with torch.inference_mode():
            out = generator(torch.from_numpy(case["style_driven"]), torch.from_numpy(case["id_map"]), stored_noise)
    finally:
        generator.shared_weight, generator.max_batch = True, "auto"
    diff = _max_diff(out, case["out_driven"])
    record_property(f"max_abs_diff_seed{parity_seed}_out_driven_grouped", diff)
    print(f"\nseed{parity_seed} out_driven   grouped max|diff| {diff:.3e}")
    assert diff < PARITY_ATOL


@pytest.mark.slow
def test_cached_identity_style_matches_oracle(parity_seed: int, case, generator, stored_noise) -> None:
    """The per-identity cache (computed from ONE identity row, broadcast over the batch, as the engine
    uses it) gives the oracle's images."""
    style = torch.from_numpy(case["style_driven"])
    with torch.inference_mode():
        cache = generator.precompute_style(style[:1, :ID_DIM])
        out = generator.forward_cached(cache, style[:, ID_DIM:], torch.from_numpy(case["id_map"]), stored_noise)
    diff = _max_diff(out, case["out_driven"])
    print(f"\nseed{parity_seed} out_driven   cached  max|diff| {diff:.3e}")
    assert diff < PARITY_ATOL


@pytest.mark.slow
def test_noise_path_is_live(case, generator, driven) -> None:
    """Zero noise must change the image (noise weights are 0.02-0.1): proves the stored noise is used."""
    with torch.inference_mode():
        zero = generator(torch.from_numpy(case["style_driven"]), torch.from_numpy(case["id_map"]), None)
    mean_delta = float((zero - driven).abs().mean())
    print(f"\nzero vs stored noise: mean |Δ| {mean_delta:.4f}")
    assert mean_delta > 1e-3  # ~100x the parity bound on the max


# ---------------------------------------------------------------------- formulations on random weights
def _random_generator(seed: int, size: int = 224) -> ModulatedGenerator:
    """Weights drawn like make_weights.py (its scales keep activations O(1) and tanh unsaturated)."""
    torch.manual_seed(seed)
    net = ModulatedGenerator(size=size)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("style.", "input.")):
                continue
            if name.endswith("modulation.bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("noise.weight"):
                p.uniform_(0.02, 0.1)
            elif name.endswith("conv.weight"):
                p.normal_().mul_(0.25 if name.startswith("to_rgb") else 1.0)
            elif name.endswith("bias"):
                p.normal_().mul_(0.05)
            else:
                p.normal_()
    return net.eval()


@pytest.fixture(scope="module")
def random_setup():
    net = _random_generator(0)
    g = torch.Generator().manual_seed(1)
    b = 3
    style = torch.randn(b, 2560, generator=g)
    start = torch.randn(b, 512, 7, 7, generator=g)
    # per-sample noise for some slots, shared (batch 1) for others: both shapes are legal
    noise = [torch.randn((b if i % 2 else 1, 1, s, s), generator=g) for i, s in enumerate(NOISE_SIZES)]
    net.shared_weight, net.max_batch = False, None  # the upstream formulation: groups = B = 3
    with torch.inference_mode():
        grouped = net(style, start, noise)
    net.shared_weight, net.max_batch = True, "auto"
    assert float((grouped.abs() > 0.99).float().mean()) < 0.01, "tanh saturated: comparison would be vacuous"
    assert float(grouped.std()) > 0.1
    return net, style, start, noise, grouped


def test_shared_weight_equals_grouped_batched(random_setup) -> None:
    """One pass over the whole batch: style on the activations, shared-weight conv, demodulation after."""
    net, style, start, noise, grouped = random_setup
    net.max_batch = None
    try:
        with torch.inference_mode():
            shared = net(style, start, noise)
    finally:
        net.max_batch = "auto"
    diff = float((shared - grouped).abs().max())
    print(f"\nshared-weight vs grouped, B=3, random weights: max|diff| {diff:.2e}")
    assert diff < FORMULATION_ATOL


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_shared_weight_batch1_chunks_equal_grouped(random_setup, channels_last: bool) -> None:
    """The CPU default runs the batch one sample at a time (max_batch "auto"), which scales the weights
    instead of the activations on the large layers and slices per-sample vs shared noise."""
    net, style, start, noise, grouped = random_setup
    net.channels_last = channels_last
    try:
        with torch.inference_mode():
            out = net(style, start, noise)
    finally:
        net.channels_last = True
    diff = float((out - grouped).abs().max())
    assert diff < FORMULATION_ATOL


def test_weight_cache_follows_load_state_dict(random_setup) -> None:
    """Weight-derived tensors are cached; loading new weights in place must invalidate them."""
    net, style, start, noise, _ = random_setup
    small = _random_generator(1, size=14)
    with torch.inference_mode():
        small(style[:1], start[:1])  # fills the caches
    small.load_state_dict(_random_generator(2, size=14).state_dict())
    with torch.inference_mode():
        shared = small(style[:1], start[:1], [n[:1] for n in noise[:3]])
        small.shared_weight = False
        grouped = small(style[:1], start[:1], [n[:1] for n in noise[:3]])
    assert float((shared - grouped).abs().max()) < FORMULATION_ATOL


@pytest.fixture(scope="module")
def small_net() -> ModulatedGenerator:
    """The same architecture stopped at 28² (5 noise slots): for behaviour that does not need 224²."""
    return _random_generator(3, size=28)


def test_one_start_map_broadcasts_over_styles(small_net) -> None:
    style, start = torch.randn(2, 2560), torch.randn(1, 512, 7, 7)
    with torch.inference_mode():
        shared = small_net(style, start)
        tiled = small_net(style, start.expand(2, -1, -1, -1))
    assert shared.shape == (2, 3, 28, 28)
    assert float((shared - tiled).abs().max()) == 0.0


def test_zero_noise_equals_none(small_net) -> None:
    style, start = torch.randn(1, 2560), torch.randn(1, 512, 7, 7)
    with torch.inference_mode():
        a = small_net(style, start, None)
        b = small_net(style, start, [torch.zeros(shape) for shape in small_net.noise_shapes()])
    assert float((a - b).abs().max()) < 1e-6


def test_cached_style_equals_full(random_setup) -> None:
    net, style, _, _, _ = random_setup
    with torch.inference_mode():
        full = net.modulations(style)
        cached = net.modulations_from_cache(net.precompute_style(style[:, :ID_DIM]), style[:, ID_DIM:])
    assert max(float((a - b).abs().max()) for a, b in zip(full, cached)) < 1e-5


def test_stacked_identity_styles_equal_full(random_setup) -> None:
    """Each identity cached on its own (one per session), stacked into one batch: row i keeps its own
    identity (what cross-session rendering relies on)."""
    net, style, _, _, _ = random_setup
    with torch.inference_mode():
        full = net.modulations(style)
        stacked = IdentityStyle.stack([net.precompute_style(style[i:i + 1, :ID_DIM]) for i in range(len(style))])
        cached = net.modulations_from_cache(stacked, style[:, ID_DIM:])
    assert all(t.shape[0] == len(style) for t in stacked.terms)
    assert max(float((a - b).abs().max()) for a, b in zip(full, cached)) < 1e-5


def _configured(net: ModulatedGenerator, branch: str) -> ModulatedGenerator:
    """batch1: one sample per pass (scales on the weights where they are smaller); batched: the whole
    batch in one pass (scales on the activations); grouped: upstream's per-sample weights."""
    net.shared_weight = branch != "grouped"
    net.max_batch = 1 if branch == "batch1" else None
    return net


@pytest.fixture(scope="module")
def small_half_setup():
    """The same architecture stopped at 28² (5 of the 11 layers, every layer kind): CPU half-precision
    convs run on slow reference kernels here (~35 s for one full 224² frame); bench/device_check.sh
    reports the full-size PSNR on the parity weights on a GPU."""
    net = _random_generator(0, size=28)
    g = torch.Generator().manual_seed(2)
    style, start = torch.randn(3, 2560, generator=g), torch.randn(3, 512, 7, 7, generator=g)
    noise = [torch.randn(shape, generator=g) for shape in net.noise_shapes()]
    with torch.inference_mode():
        ref = _configured(net, "grouped")(style, start, noise)
        cache = net.precompute_style(style[:, :ID_DIM])
        ref_cached = net.forward_cached(cache, style[:, ID_DIM:], start, noise)
    assert float(ref.std()) > 0.1
    return net, style, start, noise, ref, ref_cached


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("branch", ["batch1", "batched", "grouped", "cached"])
def test_half_precision_close_to_float32(small_half_setup, dtype: torch.dtype, branch: str) -> None:
    """Every formulation the engine can run, cast to bf16/fp16, against float32."""
    net32, style, start, noise, ref, ref_cached = small_half_setup
    net = _random_generator(0, size=28)
    net.load_state_dict(net32.state_dict())
    net = _configured(net.to(dtype), "batched" if branch == "cached" else branch)
    with torch.inference_mode():
        if branch == "cached":
            half = net.forward_cached(net.precompute_style(style[:, :ID_DIM]), style[:, ID_DIM:], start, noise)
            want = ref_cached
        else:
            half = net(style, start, noise)
            want = ref
    assert half.dtype == dtype and half.shape == want.shape == (3, 3, 28, 28)
    value = psnr(half.float(), want)
    print(f"\n{dtype} {branch} vs float32 PSNR {value:.1f} dB (28² generator)")
    assert value > HALF_MIN_PSNR_DB


def test_batch1_and_batched_agree_in_half_precision(small_half_setup) -> None:
    """One formulation for every batch size: in fp16, per-sample passes and one batched pass differ only
    by rounding (before the pre-normalisation only the batched one could overflow)."""
    net32, style, start, noise, _, _ = small_half_setup
    net = _random_generator(0, size=28)
    net.load_state_dict(net32.state_dict())
    net.to(torch.float16)
    with torch.inference_mode():
        one = _configured(net, "batch1")(style, start, noise).float()
        many = _configured(net, "batched")(style, start, noise).float()
    assert psnr(one, many) > 45.0


def test_fp16_guard_keeps_large_styles_in_range() -> None:
    """Style scales near the fp16 maximum: without pre-normalisation the batched fp16 intermediate
    conv(x·s, W) exceeds the fp16 range (checked in float32); with it every branch stays finite and
    equal to float32, because demodulation cancels the style's scale."""
    layer32 = _random_generator(6, size=14).conv1.conv
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 512, 7, 7, generator=g) * 2.0
    s = (torch.randn(2, 512, generator=g) * 30000.0).clamp(-60000.0, 60000.0)
    with torch.inference_mode():
        raw = torch.nn.functional.conv2d(x * (s * layer32.scale)[:, :, None, None], layer32.weight[0], padding=1)
        assert float(raw.abs().max()) > torch.finfo(torch.float16).max  # the hazard is real
        ref = layer32.forward_grouped(x, s)
        layer = _random_generator(6, size=14).conv1.conv.to(torch.float16)
        for name, out in (("batch1", torch.cat([layer(x[i:i + 1].half(), s[i:i + 1].half()) for i in range(2)])),
                          ("batched", layer(x.half(), s.half())),
                          ("grouped", layer(x.half(), s.half(), shared_weight=False))):
            assert torch.isfinite(out).all(), name
            assert psnr(out.float() / 4, ref / 4) > HALF_MIN_PSNR_DB, name  # activations of std ~1: /4 ≈ [-1,1]


@pytest.mark.parametrize("shared_weight", [True, False], ids=["shared", "grouped"])
def test_zero_style_stays_finite_in_fp16(shared_weight: bool) -> None:
    """A zero style makes the demodulation's sum of squares 0: only its epsilon keeps rsqrt finite, and
    1e-8 is 0 in fp16, so the epsilon is added in float32."""
    layer = _random_generator(7, size=14).conv1.conv.to(torch.float16)
    x = torch.randn(2, 512, 7, 7).half()
    with torch.inference_mode():
        out = layer(x, torch.zeros(2, 512, dtype=torch.float16), shared_weight)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shared_weight", [True, False], ids=["shared", "grouped"])
def test_gradients_flow_through_both_formulations(shared_weight: bool) -> None:
    """The in-place elementwise steps must not break autograd (inference is not the only user of a module)."""
    net = _random_generator(4, size=14)
    net.shared_weight = shared_weight
    net.requires_grad_(True)
    out = net(torch.randn(2, 2560), torch.randn(2, 512, 7, 7), [torch.randn(shape) for shape in net.noise_shapes()])
    out.square().mean().backward()
    for layer in (net.conv1.activate.bias, net.conv1.noise.weight, net.convs[0].conv.weight, net.to_rgbs[0].bias):
        assert layer.grad is not None and float(layer.grad.abs().sum()) > 0


def test_bad_inputs_raise_clear_errors(random_setup) -> None:
    net, style, start, noise, _ = random_setup
    with pytest.raises(ValueError, match="style must be"):
        net(style[:, :100], start)
    with pytest.raises(ValueError, match="start"):
        net(style, start[:, :, :6])
    with pytest.raises(ValueError, match="does not match"):
        net(style, start[:2])
    with pytest.raises(ValueError, match="list of 11"):
        net(style, start, noise[:5])
    with pytest.raises(ValueError, match=r"noise\[3\]"):
        net(style, start, noise[:3] + [torch.zeros(3, 1, 27, 27)] + noise[4:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("branch", ["batch1", "batched", "grouped"])
def test_cuda_matches_cpu(random_setup, dtype: torch.dtype, branch: str) -> None:
    """Every formulation on CUDA against the CPU's grouped float32 (TF32 off for float32)."""
    net, style, start, noise, grouped = random_setup
    gpu = _configured(_random_generator(0).to("cuda", dtype), branch)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = gpu(style.cuda(), start.cuda(), [n.cuda() for n in noise]).float().cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    if dtype == torch.float32:
        assert float((out - grouped).abs().max()) < 1e-4
    else:
        assert psnr(out, grouped) > HALF_MIN_PSNR_DB
