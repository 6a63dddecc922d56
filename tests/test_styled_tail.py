"""The generator's fused pointwise tail (`pcavs.kernels.styled_tail`, `ModulatedGenerator.fused_tail`).

The Triton kernel itself runs here on the CPU through Triton's interpreter, in a subprocess
(tests/styled_tail_support.py says why); the test process checks the fallbacks: with triton missing, on
CPU tensors, with the switch off, or when a launch fails, the generator runs its eager tail with no error;
and both kernels compile ahead of time for sm_90/sm_80 (no GPU needed). The interpreter is slow: the cases
are small (two subprocesses; ~45 s for the file here). Tests marked `cuda` run the compiled kernel and a
CUDA-graph capture on a GPU (bench/device_check.sh's tests stage).

Bounds:
* kernel vs float32 maths on the same inputs: the kernel computes the whole tail in float32 and rounds
  once, so it is within one unit of the dtype's rounding (eps·|y|) of it (float32: 0 in the interpreter,
  which has no FMA). One, not half: the interpreter converts float32 → bfloat16 by truncation where
  GPUs round to nearest (triton's `_convert_float` without a rounding mode).
* kernel vs the eager ops in the dtype: the eager ops round after each of their ~5 steps, each within
  eps/2 of the terms' size, so the two differ by at most 2·eps·(Σ|terms| + |y|) (measured ≤ 1.0).
* generator: the parity bound of tests/test_generator.py (1e-4 against the oracle, unchanged) and the
  formulations' bound (1e-5) between fused and eager.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pcavs.kernels import styled_tail
from pcavs.networks.generator import ModulatedGenerator
from tests.conftest import CASES_DIR, REPO_ROOT, parity_weights_dir
from tests.styled_tail_support import DTYPES, KERNEL_CASES, case_id, check_kernel
from tests.test_generator import FORMULATION_ATOL, PARITY_ATOL

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-dev.txt)")


def _interpreted(check: str, *args: str) -> dict:
    """Run one check of tests/styled_tail_support.py under TRITON_INTERPRET=1; its JSON result."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-m", "tests.styled_tail_support", check, *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick_results() -> dict:
    """The kernel cases and the 28² generator checks (one subprocess for both)."""
    return _interpreted("quick")


@pytest.fixture(scope="module")
def kernel_results(quick_results) -> dict:
    return quick_results["kernel"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel_equals_eager_ops(kernel_results, case, dtype: str) -> None:
    r = kernel_results[f"{case_id(case)}/{dtype}"]
    assert r["shape_ok"]
    assert r["in_place"] == (case[1] != "strided")  # dense layouts are written in place
    assert r["ulps_vs_exact"] <= 1.0, r
    assert r["eps_vs_eager"] <= 2.0, r
    if dtype == "float32":
        assert r["max_abs_vs_exact"] <= 1e-6, r


@pytest.mark.slow
def test_fused_generator_matches_oracle() -> None:
    """Full 224² G on the parity weights (seed 0, frame 0: batch 1, the shared-weight default with the
    demodulation on the weights), the fused tail forced on: every styled conv (11) ran the kernel, and the
    images equal the oracle's and the eager tail's at the parity bound."""
    weights = parity_weights_dir(0) / "latest_net_G.pth"
    r = _interpreted("generator_oracle", str(weights), str(CASES_DIR / "case_seed0.npz"))
    print(f"\nfused tail, seed0 frame 0: max|Δ| vs oracle {r['oracle_max_abs']:.3e} "
          f"(eager {r['eager_oracle_max_abs']:.3e}), vs eager {r['fused_vs_eager_max_abs']:.3e}")
    assert r["launches"] == 11
    assert r["oracle_max_abs"] < PARITY_ATOL
    assert r["fused_vs_eager_max_abs"] < PARITY_ATOL


def test_fused_generator_formulations_and_autograd(quick_results) -> None:
    """28² G, batch 3: the batched shared-weight pass (×demod in the kernel), the grouped and the NCHW
    formulations, fused equal to eager; with gradients wanted the eager tail runs and backpropagates."""
    r = quick_results["formulations"]
    for name in ("batched", "grouped", "nchw"):
        assert r[f"{name}/launches"] == 5, r  # conv1 + two styled convs at 14² and at 28²
        assert r[f"{name}/std"] > 0.1
        assert r[f"{name}/max_abs"] < FORMULATION_ATOL, (name, r)
    assert r["autograd/available_without_grad"] is True
    assert r["autograd/launches"] == 0
    assert r["autograd/grad_finite"]


# ------------------------------------------------------------------ fallbacks, in this process
def _small_generator() -> ModulatedGenerator:
    torch.manual_seed(0)
    return ModulatedGenerator(size=14).eval()


def _run(net: ModulatedGenerator) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        return net(torch.randn(2, 2560, generator=g), torch.randn(2, 512, 7, 7, generator=g))


def test_cpu_tensors_fall_back_to_eager(monkeypatch) -> None:
    """On CPU tensors (no interpreter) the switch, even forced on, runs the eager tail without error."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    net = _small_generator()
    x = torch.zeros(1, 512, 7, 7)
    assert not styled_tail.available(x)
    for switch in ("auto", True):
        net.fused_tail = switch
        assert not net.uses_fused_tail(x)
    net.fused_tail = True
    fused_requested = _run(net)
    net.fused_tail = False
    assert torch.equal(fused_requested, _run(net))


def test_missing_triton_falls_back_to_eager(monkeypatch) -> None:
    """With `import triton` failing (not installed, or a broken install) nothing is available, even where
    the interpreter is asked for, and the generator runs eagerly."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    styled_tail._kernels.cache_clear()
    try:
        x = torch.zeros(1, 512, 7, 7)
        assert styled_tail._kernels() is None
        assert not styled_tail.available(x)
        net = _small_generator()
        net.fused_tail = True
        assert not net.uses_fused_tail(x)
        out = _run(net)
        net.fused_tail = False
        assert torch.equal(out, _run(net))
        with pytest.raises(RuntimeError, match="needs triton"):
            styled_tail.styled_tail_(x, None, None, torch.zeros(1), torch.zeros(512))
    finally:
        styled_tail._kernels.cache_clear()  # the next user builds the kernels with triton back


def test_switch_defaults_and_unsupported_tensors() -> None:
    """"auto" by default (on only for CUDA tensors); never for other dtypes or shapes."""
    assert ModulatedGenerator(size=14).fused_tail == "auto"
    assert not styled_tail.available(torch.zeros(1, 4, 7, 7, dtype=torch.float64))
    assert not styled_tail.available(torch.zeros(4, 7, 7))


class _FailingKernel:
    """A jitted kernel whose launch fails as a compile error would (before writing anything)."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("PTXAS error: no ptxas for this GPU")
        return launch


def test_failed_launch_runs_the_eager_tail_and_disables_the_kernel(monkeypatch, caplog) -> None:
    """A kernel that cannot compile on the machine (a GPU host's own triton without a compiler for it,
    say) costs one warning: that call's result is the eager tail's and the kernel is off from then on."""
    fake = SimpleNamespace(triton=SimpleNamespace(next_power_of_2=lambda n: 1 << (n - 1).bit_length(),
                                                  cdiv=lambda a, b: -(-a // b)),
                           nchw=_FailingKernel(), nhwc=_FailingKernel(), interpreted=True, failure=None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(styled_tail, "_kernels", lambda: fake)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    d, noise = torch.rand(2, 8, generator=g) + 0.5, torch.randn(2, 1, 5, 5, generator=g)
    nw, bias = torch.tensor([0.4]), torch.randn(8, generator=g)
    assert styled_tail.available(x)
    want = styled_tail.reference(x, d, noise, nw, bias)
    with caplog.at_level("WARNING", logger="pcavs.kernels.styled_tail"):
        got = styled_tail.styled_tail_(x, d, noise, nw, bias)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, want)
    assert [r.getMessage() for r in caplog.records if "eager ops run instead" in r.getMessage()] != []
    assert "no ptxas" in fake.failure
    assert not styled_tail.available(x)


# ------------------------------------------------------------------ on a GPU (bench/device_check.sh)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
def test_kernel_on_cuda_equals_eager_ops() -> None:
    """The compiled kernel, every case and dtype, at the interpreter's bounds (float32 within one
    rounding too: a GPU contracts to FMA)."""
    results = check_kernel("cuda")
    for key, r in results.items():
        assert r["shape_ok"] and r["ulps_vs_exact"] <= 1.0 and r["eps_vs_eager"] <= 2.0, (key, r)


@pytest.mark.cuda
@needs_cuda
def test_fused_generator_captures_in_a_cuda_graph() -> None:
    """The runtime's flow: eager passes on a side stream (Triton compiles there), then a CUDA graph
    captured with the fused kernels, replayed on new inputs: equal to the eager tail (float32, TF32 off)."""
    torch.manual_seed(0)
    net = ModulatedGenerator(size=28).cuda().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("noise.weight", "activate.bias")):
                p.normal_(0.0, 0.3)
    g = torch.Generator(device="cuda").manual_seed(1)
    b = 4

    def draw():
        return (torch.randn(b, 2560, device="cuda", generator=g), torch.randn(b, 512, 7, 7, device="cuda", generator=g),
                [torch.randn(b, *s[1:], device="cuda", generator=g) for s in net.noise_shapes()])

    style, start, noise = draw()
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            net.fused_tail = True
            assert net.uses_fused_tail(start)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    net(style, start, noise)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = net(style, start, noise)
            new_style, new_start, new_noise = draw()
            for dst, src in zip([style, start, *noise], [new_style, new_start, *new_noise]):
                dst.copy_(src)
            graph.replay()
            net.fused_tail = False
            want = net(new_style, new_start, new_noise)
            torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.allow_tf32 = prev
        net.fused_tail = "auto"
    assert float(want.std()) > 0.1
    assert float((out - want).abs().max()) < FORMULATION_ATOL


def test_kernels_compile_for_the_gpu(monkeypatch, tmp_path) -> None:
    """The interpreter accepts code the compiler may not: compile both kernels ahead of time for an H100
    (sm_90, every dtype) and an A100 (sm_80) through triton's full pipeline (ptxas included), no GPU
    needed. With the specialisations the JIT makes at run time (16-byte aligned pointers, C and H·W
    multiples of 16) the stores must be 128-bit vectors, and bfloat16 must round to nearest."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernels = styled_tail._kernels()
    if kernels is None or kernels.interpreted:
        pytest.skip("the kernels were built for Triton's interpreter in this process")
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    builds = [(90, dt, layout) for dt in names for layout in ("nchw", "nhwc")] + [(80, "bfloat16", "nhwc")]
    for arch, dtype, layout in builds:
        t = names[dtype]
        fn = kernels.nchw if layout == "nchw" else kernels.nhwc
        rows = "R" if layout == "nchw" else "P"
        sig = {"x_ptr": f"*{t}", "d_ptr": "*fp32", "n_ptr": f"*{t}", "nw_ptr": f"*{t}", "bias_ptr": f"*{t}",
               "C": "i32", "HW": "i32", rows: "i32", "noise_bstride": "i32"}
        blocks = {"BLOCK_R": 4, "BLOCK_HW": 1024} if layout == "nchw" else {"BLOCK_P": 32, "BLOCK_C": 128}
        const = {"HAS_DEMOD": True, "HAS_NOISE": True, **blocks}
        sig.update(dict.fromkeys(const, "constexpr"))
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
        built = compiler.compile(compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                 target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        ptx = built.asm["ptx"]
        assert "st.global.v4.b32" in ptx, (arch, dtype, layout)
        if dtype == "bfloat16":  # cvt.rn (nearest), scalar or packed pairs; never .rz (truncation)
            assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx) and not re.search(r"cvt\.rz\.bf16", ptx)
