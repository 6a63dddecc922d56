"""Checks of the fused styled-conv tail that must run under Triton's CPU interpreter, in a process of their
own: triton decides at kernel-definition time whether a kernel is interpreted (TRITON_INTERPRET, read when
`pcavs.kernels.styled_tail` first builds its kernels), so the test process, which may already have built
them for real, cannot switch. tests/test_styled_tail.py runs

    TRITON_INTERPRET=1 python -m tests.styled_tail_support CHECK [ARGS...]

and asserts on the JSON it prints on its last line. Each check measures; the test states the bounds.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from pcavs.kernels import styled_tail

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (shape, layout, demod, noise rows (0 = none)): batch > 1, odd sizes, 7×7 and 224×224 maps, both layouts.
KERNEL_CASES = [
    ((3, 512, 7, 7), "nhwc", True, 3),
    ((2, 37, 13, 11), "nchw", True, 1),
    ((2, 37, 13, 11), "nhwc", False, 0),
    ((1, 8, 224, 224), "nchw", False, 1),
    ((1, 8, 224, 224), "nhwc", True, 1),
    ((2, 9, 7, 7), "strided", True, 2),      # neither dense layout: a contiguous copy is written
]


def case_id(case) -> str:
    shape, layout, demod, noise = case
    return f"{'x'.join(map(str, shape))}-{layout}-{'demod' if demod else 'nodemod'}-noise{noise}"


def _inputs(case, dtype: torch.dtype, seed: int):
    (b, c, h, w), layout, demod, noise_rows = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=g) * 2.0).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # (b, c, h, w) with h and w strides swapped
    d = torch.empty(b, c).uniform_(0.2, 2.0, generator=g) if demod else None
    noise = torch.randn(noise_rows, 1, h, w, generator=g).to(dtype) if noise_rows else None
    nw = torch.tensor([0.7]).to(dtype)
    bias = (torch.randn(c, generator=g) * 0.5).to(dtype)
    return x, d, noise, nw, bias


def _to(device: str, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def check_kernel(device: str = "cpu") -> dict:
    """Every case × dtype: the kernel's error against float32 maths on the same (rounded) inputs, relative
    to the dtype's rounding, and its difference from the eager ops in the dtype, relative to the eager
    ops' own rounding (see the test for the bounds). On the CPU under the interpreter; on CUDA for real."""
    out = {}
    for i, case in enumerate(KERNEL_CASES):
        for name, dtype in DTYPES.items():
            x, d, noise, nw, bias = _to(device, *_inputs(case, dtype, seed=i))
            assert styled_tail.available(x), "the interpreter must make the kernel available on the CPU"
            before = x.clone()
            y = styled_tail.styled_tail_(x, d, noise, nw, bias)
            f = lambda t: None if t is None else t.float()  # noqa: E731
            exact = styled_tail.reference(before.float(), d, f(noise), nw.float(), bias.float())
            eager = styled_tail.reference(before, d, noise, nw, bias).float()
            # The size of the terms summed before the activation: the eager ops round each of them.
            terms = before.float().abs() * (1.0 if d is None else d[:, :, None, None])
            if noise is not None:
                terms = terms + 0.7 * noise.float().abs()
            terms = (terms + bias.float().abs()[None, :, None, None]) * math.sqrt(2.0)
            eps = torch.finfo(dtype).eps
            # 2^-22 of the terms: float32 contraction (FMA) on a GPU where the sum cancels to near 0.
            slack = terms * 2.0**-22 + torch.finfo(dtype).tiny
            err_exact = ((y.float() - exact).abs() / (exact.abs() * eps + slack)).max()
            err_eager = ((y.float() - eager).abs() / ((terms + y.float().abs()) * eps)).max()
            out[f"{case_id(case)}/{name}"] = {
                "shape_ok": tuple(y.shape) == tuple(before.shape) and y.dtype == dtype,
                "in_place": y.data_ptr() == x.data_ptr(),
                "ulps_vs_exact": float(err_exact), "eps_vs_eager": float(err_eager),
                "max_abs_vs_exact": float((y.float() - exact).abs().max())}
    return out


def check_generator_oracle(weights: str, case_path: str) -> dict:
    """The full 224² generator on the parity weights, frame 0 of the oracle case, with the fused tail
    forced on (batch 1, the shared-weight default), against the oracle and against the eager tail."""
    from pcavs.checkpoints import IGNORABLE_PREFIXES, load_network
    from pcavs.networks.generator import ModulatedGenerator

    net = load_network(ModulatedGenerator(), Path(weights), IGNORABLE_PREFIXES["G"]).eval()
    with np.load(case_path) as data:
        case = {k: data[k] for k in data.files}
    style = torch.from_numpy(case["style_driven"][:1])
    start = torch.from_numpy(case["id_map"][:1])
    noise = [torch.from_numpy(case[f"noise_{i}"][:1].astype(np.float32)) for i in range(11)]
    launches = _count_launches()
    with torch.inference_mode():
        net.fused_tail = True
        fused = net(style, start, noise)
        net.fused_tail = False
        eager = net(style, start, noise)
    want = case["out_driven"][:1].astype(np.float64)
    return {"launches": launches[0],
            "oracle_max_abs": float(np.abs(fused.numpy().astype(np.float64) - want).max()),
            "eager_oracle_max_abs": float(np.abs(eager.numpy().astype(np.float64) - want).max()),
            "fused_vs_eager_max_abs": float((fused - eager).abs().max())}


def _count_launches() -> list[int]:
    """Counts calls of the kernel launcher made through the module (as the generator calls it)."""
    count = [0]
    real = styled_tail.styled_tail_

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    styled_tail.styled_tail_ = counted
    return count


def _random_generator(size: int, seed: int):
    from pcavs.networks.generator import ModulatedGenerator

    torch.manual_seed(seed)
    net = ModulatedGenerator(size=size).eval()
    with torch.no_grad():  # non-zero noise weights and biases, so those terms are exercised
        for mod in net.modules():
            if type(mod).__name__ == "NoiseInjection":
                mod.weight.fill_(0.3)
            if type(mod).__name__ == "FusedLeakyReLU":
                mod.bias.normal_(0.0, 0.2)
    return net


def check_generator_formulations() -> dict:
    """A 28² generator (every layer kind), batch 3, float32: fused vs eager in the batched formulations
    (shared-weight: ×demod in the kernel; grouped; NCHW; batch 1 is the oracle check's), and with
    gradients wanted (the kernel has no backward: the eager tail must run, even when forced on)."""
    net = _random_generator(28, seed=0)
    g = torch.Generator().manual_seed(1)
    style, start = torch.randn(3, 2560, generator=g), torch.randn(3, 512, 7, 7, generator=g)
    noise = [torch.randn(3, *shape[1:], generator=g) for shape in net.noise_shapes()]
    configs = {"batched": dict(max_batch=None), "grouped": dict(shared_weight=False, max_batch=None),
               "nchw": dict(channels_last=False, max_batch=None)}
    out: dict = {}
    launches = _count_launches()
    with torch.inference_mode():
        for name, cfg in configs.items():
            for key, value in cfg.items():
                setattr(net, key, value)
            before = launches[0]
            net.fused_tail = True
            fused = net(style, start, noise)
            out[f"{name}/launches"] = launches[0] - before
            net.fused_tail = False
            eager = net(style, start, noise)
            out[f"{name}/max_abs"] = float((fused - eager).abs().max())
            out[f"{name}/std"] = float(eager.std())
            net.shared_weight, net.channels_last, net.max_batch = True, True, "auto"
        net.fused_tail = True
        out["autograd/available_without_grad"] = net.uses_fused_tail(start)
    small = _random_generator(14, seed=0)
    small.fused_tail = True
    before = launches[0]
    image = small(style[:1], start[:1])
    image.square().mean().backward()
    out["autograd/launches"] = launches[0] - before
    out["autograd/grad_finite"] = bool(torch.isfinite(small.conv1.conv.weight.grad).all())
    return out


def check_quick() -> dict:
    """The kernel and formulation checks in one process (one interpreter start-up instead of two)."""
    return {"kernel": check_kernel(), "formulations": check_generator_formulations()}


CHECKS = {"kernel": check_kernel, "generator_oracle": check_generator_oracle,
          "generator_formulations": check_generator_formulations, "quick": check_quick}

if __name__ == "__main__":
    result = CHECKS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(result))
