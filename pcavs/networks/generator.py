"""PC-AVS generator G: the StyleGAN2-style modulated generator (spec §3.4), parity-exact and fast.

Two formulations of every modulated convolution are kept, selected by `shared_weight`:

* grouped (`False`): the upstream one, and rosinality's `fused=True` — build a per-sample modulated
  (and demodulated) weight and run one grouped conv with groups = B. It is the formulation the oracle
  ran, so it is the yardstick.
* shared-weight (`True`, default; rosinality's `fused=False`): scale the input channels by the style,
  run ONE conv with the shared weight over the whole batch, scale the output channels by the
  demodulation coefficients, which come from the style alone as rsqrt(s² · Σ_k W² + eps).
  Mathematically identical, but it never builds B weight copies and it runs on the dense (not
  grouped) conv kernels, which stay fast as the batch grows.

Other inference-only levers (each timed by bench/generator.py):
* the identity part of every layer's modulation is computed once per identity (`precompute_style` →
  `forward_cached`, what `pcavs.engine.Avatar` runs); per frame only the 512 mouth/pose columns remain;
* `channels_last` memory format (default on: oneDNN's transposed conv and the depthwise blur are
  faster in NHWC on CPU);
* weight-derived tensors (Σ_k W², the NHWC and transposed up-conv weights) are cached per weight
  version (the NHWC copies roughly double the conv weights' memory);
* `max_batch` ("auto" = 1 on CPU): on small CPUs batch-1 passes beat big batches per frame (the
  elementwise work is memory-bound, and at batch 1 the style scales go on the weights, which are
  smaller than the activations from 56² up). GPUs get the whole batch in one pass.
bf16/fp16 work (the caller casts the module; `pcavs.checkpoints.load_networks` casts only this network):
demodulated layers are pre-normalised as in StyleGAN2-ADA (`ModulatedConv2d._input_scales`), so the
shared-weight intermediate conv(x·s, W) cannot overflow float16 whatever the style's size, and batch 1
and larger batches compute the same thing. On CPUs without native half-precision convolutions PyTorch
falls back to slow reference kernels, so half precision is for GPUs.

The 8-layer mapping MLP `style.*`, the learned constant `input.input` and the `noises.*` buffers exist
only so the upstream checkpoint loads with identical keys; inference never runs them (`input_is_latent`,
`--input_id_feature`, randomize_noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pcavs.constants import CROP_SIZE, ID_DIM, STYLE_DIM
from pcavs.kernels import styled_tail

SIZE = CROP_SIZE
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)
_DEMOD_EPS = 1e-8


def _channels(channel_multiplier: int) -> dict[int, int]:
    """Width per resolution (rosinality's table, keyed by the 224-pixel PC-AVS resolutions)."""
    return {7: 512, 14: 512, 28: 512, 56: 256 * channel_multiplier, 112: 128 * channel_multiplier,
            224: 64 * channel_multiplier}


def make_blur_kernel(taps: Sequence[float] = BLUR_TAPS, gain: float = 1.0) -> torch.Tensor:
    """2-D FIR kernel outer(taps, taps), normalised to sum 1, times `gain` (4 when it follows a ×2 up)."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[:, None] * k[None, :]
    return k / k.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (pad0 before, pad1 after, both axes), convolve with the flipped
    kernel (a true convolution) — the pure-PyTorch 'native' upfirdn2d of the rosinality port (down = 1)."""
    b, c, h, w = x.shape
    out = x.reshape(b * c, 1, h, 1, w, 1)
    if up > 1:
        out = F.pad(out, (0, up - 1, 0, 0, 0, up - 1))
    out = out.reshape(b * c, 1, h * up, w * up)
    out = F.pad(out, (pad[0], pad[1], pad[0], pad[1]))
    k = torch.flip(kernel, (0, 1)).to(out.dtype).reshape(1, 1, *kernel.shape)
    out = F.conv2d(out, k)
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


class _PixelNorm(nn.Module):
    """Slot 0 of the mapping MLP (kept so the keys are `style.1..8`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: the stored weight is scaled by lr_mul/sqrt(in) at run
    time (so checkpoints hold unscaled values), the bias by lr_mul."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class _MappingNetworkWeights(nn.Sequential):
    """The upstream 8-layer mapping MLP, present only so its checkpoint keys load. PC-AVS feeds the style
    directly as w (`input_is_latent=True`); running this would be a bug, so it refuses."""

    def __init__(self, style_dim: int, n_mlp: int = 8, lr_mul: float = 0.01) -> None:
        super().__init__(_PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mul) for _ in range(n_mlp)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        raise RuntimeError("the mapping MLP G.style is never run in PC-AVS (the style is used directly as w)")


class _ConstantInput(nn.Module):
    """Upstream learned 7x7 start tensor; unused because PC-AVS starts from the identity map."""

    def __init__(self, channel: int, size: int) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))


class Blur(nn.Module):
    """FIR low-pass after the stride-2 transposed conv (kernel gain 4, pad (1,1): output exactly 2x).

    The symmetric padding it is built with makes upfirdn2d(up 1) a plain depthwise conv, which keeps
    the NHWC layout instead of reshaping to one channel (same filter, same result)."""

    def __init__(self, pad: tuple[int, int], gain: float) -> None:
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(gain=gain))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad[0] != self.pad[1]:
            return upfirdn2d(x, self.kernel, pad=self.pad)
        c = x.shape[1]
        k = torch.flip(self.kernel, (0, 1)).to(x.dtype).expand(c, 1, *self.kernel.shape)
        return F.conv2d(x, k, padding=self.pad[0], groups=c)


class Upsample(nn.Module):
    """×2 FIR upsampling of the RGB skip branch: upfirdn2d(up 2, pad (2,1)) with the gain-4 kernel."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(gain=factor**2))
        self.factor = factor
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated conv. It takes the per-sample input scales s (B, in) already computed from its
    `modulation` layer, so the generator can produce s either from the full style or from a cached
    identity term (`ModulatedGenerator.precompute_style`)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False) -> None:
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:  # registered before `modulation`: the upstream state_dict order
            factor = 2
            p = (len(BLUR_TAPS) - factor) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + factor - 1, p // 2 + 1), gain=factor**2)
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)
        self._derived: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    # --------------------------------------------------------------------- weight-derived tensors
    def _cached(self, name: str, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`build(weight)`, recomputed only when the weight changes. The entry keeps an alias of the
        weight storage alive, so a new storage can never reuse its address and be mistaken for it;
        in-place updates (load_state_dict, optimisers) bump `_version` and invalidate it. (Weights
        created inside torch.inference_mode have no version counter: there only a new storage
        invalidates, so do not modify such weights in place.)"""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return build(w)
        version = -1 if w.is_inference() else w._version
        hit = self._derived.get(name)
        if (hit is not None and hit[0].data_ptr() == w.data_ptr() and hit[1] == version
                and hit[0].dtype == w.dtype and hit[0].device == w.device):
            return hit[2]
        alias = w.detach()
        value = build(alias)
        self._derived[name] = (alias, version, value)
        return value

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._derived.clear()  # device/dtype moves replace the weight storage
        return super()._apply(fn, recurse)

    def _weight_gain(self) -> torch.Tensor:
        """Per-output-channel max |W| (out,) in float32: the pre-normalisation of demodulated layers
        (1 for the un-demodulated ToRGB, whose scale matters)."""
        def build(w: torch.Tensor) -> torch.Tensor:
            if not self.demodulate:
                return torch.ones(self.out_channel, dtype=torch.float32, device=w.device)
            return w[0].float().abs().amax(dim=(1, 2, 3)).clamp_min(torch.finfo(torch.float32).tiny)
        return self._cached("gain", build)

    def _unit_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W / max|W| per output channel, in float32 (W itself without demodulation)."""
        return w[0].float() / self._weight_gain()[:, None, None, None]

    def _weight_sq(self) -> torch.Tensor:
        """Σ_{kh,kw} of the unit weight squared, (out, in) in float32 (the demodulation needs it at full
        precision)."""
        return self._cached("wsq", lambda w: self._unit_weight(w).pow(2).sum(dim=(2, 3)))

    def _dense_weight(self, channels_last: bool) -> torch.Tensor:
        """(out, in, k, k) unit conv weight in the module dtype; cached (the NHWC copy: else oneDNN
        re-lays it out every call)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return self._cached(f"w_{channels_last}",
                            lambda w: self._unit_weight(w).to(w.dtype).contiguous(memory_format=fmt))

    def _transposed_weight(self, channels_last: bool) -> torch.Tensor:
        """(in, out, k, k) unit weight for conv_transpose2d, cached: the transposing copy is a full pass
        over the weight, paid once instead of every frame."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return self._cached(f"wT_{channels_last}",
                            lambda w: self._unit_weight(w).to(w.dtype).transpose(0, 1).contiguous(memory_format=fmt))

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, s: torch.Tensor, shared_weight: bool = True) -> torch.Tensor:
        """Modulated conv of x (B, in, H, W) with per-sample input scales s (B, in)."""
        return self.forward_shared_weight(x, s) if shared_weight else self.forward_grouped(x, s)

    def forward_grouped(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The upstream formulation: per-sample weights, grouped conv (groups = B). The demodulation's
        sum of squares and epsilon are taken in float32 (1e-8 is 0 in float16)."""
        b, cin, h, w = x.shape
        k, cout = self.kernel_size, self.out_channel
        weight = self.scale * self.weight * s.view(b, 1, cin, 1, 1)
        if self.demodulate:
            demod = torch.rsqrt(weight.float().pow(2).sum(dim=(2, 3, 4)) + _DEMOD_EPS).to(weight.dtype)
            weight = weight * demod.view(b, cout, 1, 1, 1)
        x = x.reshape(1, b * cin, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * cin, cout, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
            out = out.view(b, cout, out.shape[-2], out.shape[-1])
            return self.blur(out)
        out = F.conv2d(x, weight.view(b * cout, cin, k, k), padding=self.padding, groups=b)
        return out.view(b, cout, out.shape[-2], out.shape[-1])

    def _input_scales(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input scales, demodulation coefficients), both float32, of the pre-normalised formulation.

        Demodulated layers run on s' = s·c / max|s·c| (per sample) and W' = W / max|W| (per output
        channel), as StyleGAN2-ADA does for float16: every factor of conv(x ⊙ s', W') is at most 1 in
        magnitude, so the intermediate stays within the range of x whatever the style's size. The
        demodulation is invariant to both scales; only its epsilon moves, to eps / (max|s·c|·max|W|)²,
        which keeps the result exactly the upstream one. Batch 1 (scales on the weight) and larger
        batches (scales on the activations) use the same s' and d, so they agree in every dtype.
        """
        s = s.float() * self.scale
        if not self.demodulate:
            return s, None
        s_max = s.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        s = s / s_max
        eps = _DEMOD_EPS / (s_max * self._weight_gain()[None, :]).square()
        return s, torch.rsqrt(F.linear(s.square(), self._weight_sq()) + eps)

    def forward_shared_weight(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """d ⊙ conv(x ⊙ s, W) with the shared weight W, d = rsqrt(Σ_in s²·Σ_k W² + eps) (1 without
        demodulation), pre-normalised (`_input_scales`): equal to the grouped formulation.

        Where a sample's weight is smaller than its activations (batch 1 at 56² and above) the scales
        go on the weight instead: same maths, two fewer passes over the activations.
        """
        out, d32 = self.forward_undemodulated(x, s)
        return out if d32 is None else out.mul_(d32.to(out.dtype)[:, :, None, None])

    def forward_undemodulated(self, x: torch.Tensor, s: torch.Tensor,
                              shared_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conv output, demodulation coefficients (B, out) float32 still to multiply, or None when
        none are left): `forward` with the ×d left to the caller, for the fused tail
        (`pcavs.kernels.styled_tail`), which applies it in the same pass as noise, bias and activation.
        d is None where it is already in the weights (grouped; shared-weight batch 1) or the layer is
        not demodulated."""
        if not shared_weight:
            return self.forward_grouped(x, s), None
        b = x.shape[0]
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        s32, d32 = self._input_scales(s)
        s = s32.to(x.dtype)
        out_numel = x.numel() * self.out_channel // self.in_channel * (4 if self.upsample else 1)
        if b == 1 and self.weight.numel() < x.numel() + out_numel:
            if self.upsample:  # (in, out, k, k): in-scale on dim 0, out-scale on dim 1
                scale = s32[0][:, None] if d32 is None else s32[0][:, None] * d32[0][None, :]
                w = self._transposed_weight(cl) * scale.to(x.dtype)[:, :, None, None]
                return self.blur(F.conv_transpose2d(x, w, stride=2, padding=0)), None
            scale = s32[0][None, :] if d32 is None else d32[0][:, None] * s32[0][None, :]
            w = self._dense_weight(cl) * scale.to(x.dtype)[:, :, None, None]
            return F.conv2d(x, w, padding=self.padding), None
        x = x * s[:, :, None, None]
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, self._transposed_weight(cl), stride=2, padding=0))
        else:
            out = F.conv2d(x, self._dense_weight(cl), padding=self.padding)
        return out, d32


class NoiseInjection(nn.Module):
    """out + weight·noise, noise (B or 1, 1, H, W) broadcast over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            return x
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) · √2 (the 'native' fallback of the rosinality CUDA op)."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channel, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upstream's order of operations (so the grouped path stays bit-equal to the oracle); the gain
        # goes in place on leaky_relu's fresh output, which its backward does not need.
        return F.leaky_relu(x + self.bias, _LRELU_SLOPE).mul_(_LRELU_GAIN)


class StyledConv(nn.Module):
    """Modulated conv → noise injection → biased leaky ReLU (rosinality's StyledConv)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None,
                shared_weight: bool = True, fused_tail: bool = False) -> torch.Tensor:
        """`fused_tail`: ×demod, noise, bias and activation in one Triton pass over the conv output
        (`pcavs.kernels.styled_tail`); the caller checks it can run (`ModulatedGenerator`)."""
        if not fused_tail:
            return self.activate(self.noise(self.conv(x, s, shared_weight), noise))
        out, demod = self.conv.forward_undemodulated(x, s, shared_weight)
        return styled_tail.styled_tail_(out, demod, noise, self.noise.weight, self.activate.bias)


class ToRGB(nn.Module):
    """Un-demodulated 1x1 modulated conv to RGB plus bias, added to the upsampled skip image."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        if upsample:  # registered before `conv`: the upstream state_dict order
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, s: torch.Tensor, skip: torch.Tensor | None,
                shared_weight: bool = True) -> torch.Tensor:
        out = self.conv(x, s, shared_weight) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


@dataclass(frozen=True)
class IdentityStyle:
    """Per-identity part of every modulated layer's style: W_id·id·scale + bias, one (B_id, in) tensor
    per layer in `ModulatedGenerator.modulated_convs()` order. B_id is 1 (broadcast) or the batch."""

    terms: tuple[torch.Tensor, ...]

    @staticmethod
    def stack(styles: Sequence["IdentityStyle"]) -> "IdentityStyle":
        """Several identities' terms as one batch (row i of the result = styles[i]), so frames of
        different identities share one generator pass."""
        return IdentityStyle(tuple(torch.cat(layer) for layer in zip(*(st.terms for st in styles), strict=True)))


class ModulatedGenerator(nn.Module):
    """PC-AVS G: (style (B,2560), identity map (B,512,7,7), noise) → image (B,3,224,224) in (-1,1).

    State-dict keys and shapes equal the upstream `ModulateGenerator` file exactly.
    Attributes `shared_weight`, `channels_last` and `max_batch` select the formulation, memory format
    and largest batch per pass at run time (none changes the result beyond float rounding, ~1e-6).
    `fused_tail` picks how each styled conv's pointwise tail runs: "auto" (default) fuses it into one
    Triton kernel (`pcavs.kernels.styled_tail`) on CUDA tensors when triton imports, True also under
    Triton's CPU interpreter (tests), False always runs the eager ops. Wherever the kernel cannot run
    (CPU, no triton, gradients wanted) the eager ops run, with no error.
    """

    checkpoint_role = "generator"

    def __init__(self, size: int = SIZE, style_dim: int = STYLE_DIM, channel_multiplier: int = 2,
                 shared_weight: bool = True, channels_last: bool = True,
                 max_batch: int | Literal["auto"] | None = "auto",
                 fused_tail: bool | Literal["auto"] = "auto") -> None:
        super().__init__()
        self.size, self.style_dim = size, style_dim
        self.shared_weight = shared_weight
        self.fused_tail = fused_tail
        self.channels_last = channels_last
        self.max_batch = max_batch
        init = 7
        ch = _channels(channel_multiplier)
        if size not in ch or size == init:
            raise ValueError(f"size must be one of {sorted(ch)[1:]} (7·2^k), got {size}")
        log_size = int(math.log2(size // init))
        self.init_size = init
        self.style = _MappingNetworkWeights(style_dim)
        self.input = _ConstantInput(ch[init], init)
        self.conv1 = StyledConv(ch[init], ch[init], 3, style_dim)
        self.to_rgb1 = ToRGB(ch[init], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        self.num_layers = 2 * log_size + 1
        self._noise_sizes = [init * 2 ** ((i + 1) // 2) for i in range(self.num_layers)]
        for i, s in enumerate(self._noise_sizes):
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, s, s))
        in_ch = ch[init]
        for i in range(1, log_size + 1):
            out_ch = ch[init * 2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch

    # -------------------------------------------------------------------------------- helpers
    def noise_shapes(self) -> list[tuple[int, int, int, int]]:
        """The 11 noise shapes (1,1,s,s), s = 7,14,14,28,...,224 (slot 0 = conv1, then convs[0..9])."""
        return [(1, 1, s, s) for s in self._noise_sizes]

    def modulated_convs(self) -> list[ModulatedConv2d]:
        """Every modulated conv in execution order: conv1, to_rgb1, then per resolution two convs and a ToRGB."""
        layers = [self.conv1.conv, self.to_rgb1.conv]
        for i, to_rgb in enumerate(self.to_rgbs):
            layers += [self.convs[2 * i].conv, self.convs[2 * i + 1].conv, to_rgb.conv]
        return layers

    def _chunk_size(self, device: torch.device) -> int | None:
        """Largest batch run in one pass. "auto": 1 on CPU, unlimited elsewhere. On a CPU, batch-1
        passes cost less per frame than one big pass (the activations stay in cache, the elementwise
        passes are memory-bound, and batch 1 allows scaling the weights instead of the activations;
        bench/generator.py compares them); GPUs need the batch to fill up."""
        if self.max_batch == "auto":
            return 1 if device.type == "cpu" else None
        return self.max_batch

    def uses_fused_tail(self, x: torch.Tensor) -> bool:
        """Whether a pass over activations like x runs the fused tail (see `fused_tail`). Off where
        autograd would need the eager ops' backward."""
        if self.fused_tail is False or (self.fused_tail == "auto" and x.device.type != "cuda"):
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.conv1.parameters()):
            return False
        return styled_tail.available(x)

    def _param_dtype(self) -> torch.dtype:
        return self.conv1.conv.weight.dtype

    # ------------------------------------------------------------------------------ modulations
    def modulations(self, style: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer s vectors from the full (B,2560) style (one w for all 12 latent slots)."""
        if style.dim() != 2 or style.shape[1] != self.style_dim:
            raise ValueError(f"style must be (B,{self.style_dim}), got {tuple(style.shape)}")
        style = style.to(self._param_dtype())
        return [layer.modulation(style) for layer in self.modulated_convs()]

    def precompute_style(self, identity_part: torch.Tensor) -> IdentityStyle:
        """The identity-dependent part of every layer's modulation, computed once per identity.

        s = W[:, :2048]·id·c + W[:, 2048:]·rest·c + b: the first term plus the bias is cached here; the
        per-frame call then reads only the 512 mouth/pose columns (1/5 of the 73 MB of modulation weights).
        """
        if identity_part.dim() != 2 or identity_part.shape[1] != ID_DIM:
            raise ValueError(f"identity_part must be (B,{ID_DIM}), got {tuple(identity_part.shape)}")
        identity_part = identity_part.to(self._param_dtype())
        terms = []
        for layer in self.modulated_convs():
            m = layer.modulation
            terms.append(F.linear(identity_part, m.weight[:, :ID_DIM]) * m.scale + m.bias * m.lr_mul)
        return IdentityStyle(tuple(terms))

    def modulations_from_cache(self, cache: IdentityStyle, rest: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer s vectors from a cached identity term and the (B, 512) mouth+pose part of the style."""
        rest_dim = self.style_dim - ID_DIM
        if rest.dim() != 2 or rest.shape[1] != rest_dim:
            raise ValueError(f"rest (mouth+pose style) must be (B,{rest_dim}), got {tuple(rest.shape)}")
        rest = rest.to(self._param_dtype())
        out = []
        for layer, term in zip(self.modulated_convs(), cache.terms, strict=True):
            m = layer.modulation
            out.append(torch.addmm(term, rest, m.weight[:, ID_DIM:].t(), alpha=m.scale)
                       if term.shape[0] == rest.shape[0]
                       else F.linear(rest, m.weight[:, ID_DIM:]) * m.scale + term)
        return out

    # ---------------------------------------------------------------------------------- forward
    def forward(self, style: torch.Tensor, start: torch.Tensor,
                noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Image (B,3,224,224) in (-1,1). `noise`: 11 tensors (B or 1,1,s,s) or None for zero noise."""
        return self.synthesize(self.modulations(style), start, noise)

    def forward_cached(self, cache: IdentityStyle, rest: torch.Tensor, start: torch.Tensor,
                       noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """`forward` with the identity part of the style precomputed by `precompute_style`; `rest` is
        style[:, 2048:] (mouth 500 ‖ pose 12)."""
        return self.synthesize(self.modulations_from_cache(cache, rest), start, noise)

    def _check_noise(self, noise: Sequence[torch.Tensor | None] | None, batch: int,
                     like: torch.Tensor) -> list[torch.Tensor | None]:
        if noise is None:
            return [None] * self.num_layers
        if len(noise) != self.num_layers:
            raise ValueError(f"noise must be a list of {self.num_layers} tensors, got {len(noise)}")
        out: list[torch.Tensor | None] = []
        for i, (n, size) in enumerate(zip(noise, self._noise_sizes)):
            if n is None:
                out.append(None)
                continue
            if n.dim() != 4 or n.shape[0] not in (1, batch) or tuple(n.shape[1:]) != (1, size, size):
                raise ValueError(f"noise[{i}] must be ({batch} or 1,1,{size},{size}), got {tuple(n.shape)}")
            out.append(n.to(device=like.device, dtype=like.dtype))
        return out

    def synthesize(self, mods: Sequence[torch.Tensor], start: torch.Tensor,
                   noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Run the synthesis network from per-layer modulations (`modulations*` output) and the start map.
        A batch of 1 in either broadcasts against the other (one identity map for many frames)."""
        expect = (self.conv1.conv.in_channel, self.init_size, self.init_size)
        if start.dim() != 4 or tuple(start.shape[1:]) != expect:
            raise ValueError(f"start (identity map) must be (B,{','.join(map(str, expect))}), got {tuple(start.shape)}")
        b = max(start.shape[0], mods[0].shape[0])
        if start.shape[0] not in (1, b) or any(m.shape[0] not in (1, b) for m in mods):
            raise ValueError(f"style batch {mods[0].shape[0]} does not match start batch {start.shape[0]}")
        mods = [m.expand(b, -1) for m in mods]
        x = start.to(self._param_dtype()).expand(b, -1, -1, -1)
        noise_list = self._check_noise(noise, b, x)
        chunk = self._chunk_size(x.device)
        if chunk is None or b <= chunk:
            return self._synthesize(mods, x, noise_list)
        outs = []
        for i in range(0, b, chunk):
            sl = slice(i, i + chunk)
            outs.append(self._synthesize([m[sl] for m in mods], x[sl],
                                         [n if n is None or n.shape[0] == 1 else n[sl] for n in noise_list]))
        return torch.cat(outs)

    def _synthesize(self, mods: Sequence[torch.Tensor], x: torch.Tensor,
                    noise_list: Sequence[torch.Tensor | None]) -> torch.Tensor:
        shared = self.shared_weight
        if shared and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fused = self.uses_fused_tail(x)
        it = iter(mods)
        x = self.conv1(x, next(it), noise_list[0], shared, fused)
        skip = self.to_rgb1(x, next(it), None, shared)
        for i, to_rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * i](x, next(it), noise_list[2 * i + 1], shared, fused)
            x = self.convs[2 * i + 1](x, next(it), noise_list[2 * i + 2], shared, fused)
            skip = to_rgb(x, next(it), skip, shared)
        return torch.tanh(skip).contiguous()
