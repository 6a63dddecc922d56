"""The generator's pointwise tail as one Triton kernel: what follows a styled conv, in one read and one
write of its output (in place).

Eager PyTorch runs the tail of every `StyledConv` as separate full passes over the activations (×demod,
+ weight·noise, + bias, leaky ReLU, ×√2: five reads and five writes); on a GPU the generator is bound by
that memory traffic, not by its convs. This kernel computes, per element of the conv output
x (B, C, H, W):

    y = leaky_relu(x · d[b, c] + w_noise · noise[b or 0, 0, h, w] + bias[c], 0.2) · √2

in float32 registers, stored back in x's dtype (float32, bfloat16 or float16). d (the demodulation
coefficients, float32) and the noise are optional: at batch 1 the generator folds d into the weight, and
"no noise" skips it. Both dense layouts are handled (contiguous NCHW and channels_last NHWC, the
generator's default), each with its own indexing so no per-element integer division is needed in NCHW.

Fused: ×demod, +noise·weight, +bias, leaky ReLU 0.2, ×√2. Left eager, and why:
* the next layer's input modulation ×s — half of the styled convs' outputs also feed a ToRGB, which
  needs them unscaled (it would mean writing two outputs), and at batch 1 the scales go on the weights
  anyway (see `ModulatedConv2d.forward_shared_weight`);
* the blur after the ×2 transposed conv — a 4×4 stencil, not pointwise (cuDNN's depthwise conv);
* the ToRGB tail (+bias + upsampled skip) — 3 channels, a tiny share of the traffic.

The kernel runs where Triton can run it: CUDA tensors with `triton` importable, or CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1 set before the first call: the tests use it, far too slow for
anything else). The kernels are built lazily on the first call, so importing this module never imports
triton and the program runs without it. A launch is capturable by a CUDA graph; the first launch of each
dtype/layout compiles, which the render runtime's warm-up (eager passes before capture) absorbs.
No autograd: the generator uses the eager tail whenever gradients are wanted. If a launch fails (no
compiler for the GPU, say), that call runs the eager ops, a warning says why once, and `available` is
False from then on: a broken triton slows the generator down, it never stops it.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # elements per program: 16 per thread at 8 warps, enough in flight for a memory-bound pass
# Under the interpreter every program costs milliseconds of Python whatever its size: far fewer, bigger ones.
_INTERPRETER_TILE = 1 << 18


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is asked for (TRITON_INTERPRET=1, read when the kernels are built)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _kernels() -> SimpleNamespace | None:
    """The jitted kernels, or None when triton cannot be imported. Built once per process: whether they
    are interpreted is decided here, by TRITON_INTERPRET at this first call."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - any import failure (missing, broken install) means "not available"
        return None

    # R and P (rows = batch × C or batch × H·W) change with every batch bucket: not specialised on, so
    # a new bucket does not compile new variants (C and H·W, the per-layer sizes, are).
    @triton.jit(do_not_specialize=["R", "noise_bstride"])
    def tail_nchw(x_ptr, d_ptr, n_ptr, nw_ptr, bias_ptr, C, HW, R, noise_bstride,
                  HAS_DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
        # One program: a BLOCK_R planes × BLOCK_HW pixels tile of the (B·C, H·W) matrix; a plane's d
        # and bias are one value per row of the tile (no per-element division).
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)   # b·C + c
        hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        rm = r < R
        mask = rm[:, None] & (hw < HW)[None, :]
        ptrs = x_ptr + r.to(tl.int64)[:, None] * HW + hw[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DEMOD:
            v = v * tl.load(d_ptr + r, mask=rm, other=0.0)[:, None]
        if HAS_NOISE:
            b = r // C
            nz = tl.load(n_ptr + b.to(tl.int64)[:, None] * noise_bstride + hw[None, :], mask=mask, other=0.0)
            v = v + tl.load(nw_ptr).to(tl.float32) * nz.to(tl.float32)
        v = v + tl.load(bias_ptr + r % C, mask=rm, other=0.0).to(tl.float32)[:, None]
        v = tl.where(v > 0.0, v, v * 0.2) * 1.4142135623730951
        tl.store(ptrs, v.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["P", "noise_bstride"])
    def tail_nhwc(x_ptr, d_ptr, n_ptr, nw_ptr, bias_ptr, C, HW, P, noise_bstride,
                  HAS_DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program: a BLOCK_P pixels × BLOCK_C channels tile of the (B·H·W, C) matrix.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < P
        cm = c < C
        mask = pm[:, None] & cm[None, :]
        ptrs = x_ptr + p.to(tl.int64)[:, None] * C + c[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        b = p // HW
        if HAS_DEMOD:
            v = v * tl.load(d_ptr + b[:, None] * C + c[None, :], mask=mask, other=0.0)
        if HAS_NOISE:
            nz = tl.load(n_ptr + b.to(tl.int64) * noise_bstride + (p - b * HW), mask=pm, other=0.0)
            v = v + tl.load(nw_ptr).to(tl.float32) * nz.to(tl.float32)[:, None]
        v = v + tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        v = tl.where(v > 0.0, v, v * 0.2) * 1.4142135623730951
        tl.store(ptrs, v.to(x_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(triton=triton, nchw=tail_nchw, nhwc=tail_nhwc, interpreted=interpreting(),
                           failure=None)


def _layout(x: torch.Tensor) -> str | None:
    """"nchw", "nhwc" or None (any other striding)."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def available(x: torch.Tensor) -> bool:
    """Whether `styled_tail_` can run on tensors like x: 4-D float32/bf16/fp16, on CUDA with triton
    importable, or on the CPU under Triton's interpreter. Never raises (False means: run eager)."""
    if x.dim() != 4 or x.dtype not in DTYPES:
        return False
    if x.device.type == "cpu":
        if not interpreting():
            return False
    elif x.device.type != "cuda":
        return False
    k = _kernels()
    return k is not None and k.failure is None and (k.interpreted or x.device.type == "cuda")


def styled_tail_(x: torch.Tensor, demod: torch.Tensor | None, noise: torch.Tensor | None,
                 noise_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """In place on x (B, C, H, W): x ← leaky_relu(x·demod + noise_weight·noise + bias, 0.2)·√2; returns x
    (a contiguous copy, written and returned, if x is in neither dense layout: conv outputs always are).

    demod (B, C) (cast to float32) or None; noise (B or 1, 1, H, W) or None; noise_weight: 1 element
    (read on the device: no host sync, so it can be captured); bias: C elements. Call only where
    `available(x)`."""
    k = _kernels()
    if k is None:
        raise RuntimeError("styled_tail_ needs triton (check available() first)")
    layout = _layout(x)
    if layout is None:
        x, layout = x.contiguous(), "nchw"
    b, c, h, w = x.shape
    hw = h * w
    dev = x.device
    d = demod.to(device=dev, dtype=torch.float32).reshape(b, c).contiguous() if demod is not None else x
    if noise is not None:
        if noise.shape[0] not in (1, b) or tuple(noise.shape[1:]) != (1, h, w):
            raise ValueError(f"noise must be ({b} or 1,1,{h},{w}), got {tuple(noise.shape)}")
        n = noise.contiguous()
        n_stride = 0 if n.shape[0] == 1 else hw
    else:
        n, n_stride = x, 0
    bias = bias.reshape(-1)
    if bias.numel() != c:
        raise ValueError(f"bias must have {c} elements, got {bias.numel()}")
    bias = bias.contiguous()
    nw = noise_weight.reshape(-1)[:1]
    if x.numel() == 0:
        return x
    try:
        _launch(k, x, layout, d, n, n_stride, nw, bias, demod is not None, noise is not None)
    except Exception as exc:  # noqa: BLE001 - e.g. no compiler for this GPU: the eager ops still work
        # A compile or launch failure happens before the kernel writes anything: x is still the conv
        # output. Say so once, run the eager tail, and report the kernel unavailable from now on.
        k.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("the fused generator tail (Triton) failed (%s); the eager ops run instead", k.failure)
        x.copy_(reference(x, demod, noise, noise_weight, bias))
    return x


def _launch(k: SimpleNamespace, x: torch.Tensor, layout: str, d: torch.Tensor, n: torch.Tensor, n_stride: int,
            nw: torch.Tensor, bias: torch.Tensor, has_demod: bool, has_noise: bool) -> None:
    b, c, h, w = x.shape
    hw = h * w
    tile = _INTERPRETER_TILE if k.interpreted else _TILE
    if layout == "nchw":
        block_hw = min(1024, max(16, k.triton.next_power_of_2(hw)))
        block_r = max(1, tile // block_hw)
        grid = (k.triton.cdiv(b * c, block_r), k.triton.cdiv(hw, block_hw))
        k.nchw[grid](x, d, n, nw, bias, c, hw, b * c, n_stride, HAS_DEMOD=has_demod, HAS_NOISE=has_noise,
                     BLOCK_R=block_r, BLOCK_HW=block_hw, num_warps=8)
    else:
        block_c = min(128, max(16, k.triton.next_power_of_2(c)))
        block_p = max(1, tile // block_c)
        p = b * hw
        grid = (k.triton.cdiv(p, block_p), k.triton.cdiv(c, block_c))
        k.nhwc[grid](x, d, n, nw, bias, c, hw, p, n_stride, HAS_DEMOD=has_demod, HAS_NOISE=has_noise,
                     BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)


def reference(x: torch.Tensor, demod: torch.Tensor | None, noise: torch.Tensor | None,
              noise_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same tail with eager ops in x's dtype, in the generator's order (what the kernel replaces)."""
    b, c = x.shape[:2]
    out = x if demod is None else x * demod.to(x.dtype).reshape(b, c, 1, 1)
    if noise is not None:
        out = out + noise_weight.to(x.dtype) * noise.to(x.dtype)
    return torch.nn.functional.leaky_relu(out + bias.to(x.dtype).reshape(1, c, 1, 1), LRELU_SLOPE).mul_(LRELU_GAIN)
