"""relu2_mlp and linear_relu2: the Triton kernels (interpreter on CPU, real Triton on a GPU)
against the float64 reference, both kernel variants (TMA descriptors and plain pointers)
with poisoned outputs, the custom-op plumbing (autograd, fake impls, compile), backend
routing, every error path, and the ahead-of-time Hopper compile of every kernel.

Tolerances, relative (Frobenius) error against the float64 reference.  The kernels
accumulate in fp32 and round once per stored tensor; the forward rounds the
pre-activation, h and y, the backward dpre and each gradient, so an output carries a few
half-ulps of its dtype: fp16 (2**-11 ~ 4.9e-4) -> 3e-3; fp32 (the dots run in exact fp32,
~1e-7 per rounding) -> 2e-5.  bf16 is checked on a GPU only (the interpreter's bf16
arithmetic is wrong, DESIGN.md §4): 2**-8 ~ 3.9e-3 -> 2.5e-2.
"""
import importlib
import json
import re

import pytest
import torch

import kernels
from kernels import reference
from tests.helpers import BACKENDS, assert_identical, forward_backward, rel_err
from tests.hopper_aot import compile_for_hopper

mlp = importlib.import_module("kernels.relu2_mlp")  # the module: kernels.relu2_mlp is the function

TOL = {torch.float16: 3e-3, torch.float32: 2e-5, torch.bfloat16: 2.5e-2}


def mlp_inputs(lead=(3, 13), d=45, h=83, dtype=torch.bfloat16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    w_fc = (torch.randn(h, d, generator=gen) * d**-0.5).to(dtype)
    w_proj = (torch.randn(d, h, generator=gen) * h**-0.5).to(dtype)
    return x.to(device), w_fc.to(device), w_proj.to(device)


def upstream_for(op, inputs, seed=1):
    """A fixed standard-normal dL/d(out) in the inputs' dtype, drawn on the CPU (the same
    values as tests.helpers.forward_backward's default) and moved to the inputs' device."""
    shape = getattr(reference, op)(*[t.detach().to("meta") for t in inputs]).shape
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(inputs[0].dtype)
    return upstream.to(inputs[0].device)


def fwd_bwd(fn, op, inputs, seed=1):
    """(out, *grads) of fn (which computes op) on any device."""
    return forward_backward(fn, inputs, upstream_for(op, inputs, seed))


def float64_oracle(op, inputs, seed=1):
    """(out, *grads) of the reference on float64 copies, from the same upstream gradient."""
    upstream = upstream_for(op, inputs, seed).double()
    return forward_backward(getattr(reference, op), [t.detach().double() for t in inputs], upstream)


def assert_close_to_oracle(fn, inputs, backend="triton", seed=1):
    with kernels.use_backend(backend):
        result = fwd_bwd(fn, fn.__name__, inputs, seed=seed)
    expected = float64_oracle(fn.__name__, inputs, seed=seed)
    names = ["out"] + [f"grad{i}" for i in range(len(inputs))]
    for name, got, want, given in zip(names, result, expected, [None, *inputs]):
        assert got.dtype == inputs[0].dtype and got.shape == want.shape, name
        if given is not None:
            assert got.shape == given.shape, name
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < TOL[inputs[0].dtype], name
    return result


# ---- routing on the CPU: auto, cuda (no CUDA kernel: falls back to auto) and reference ----

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead", [(37,), (3, 13), ()])
def test_relu2_mlp_on_cpu_is_the_reference_unless_triton_is_asked_for(backend, dtype, lead):
    x, w_fc, w_proj = mlp_inputs(lead, dtype=dtype)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.relu2_mlp, [x, w_fc, w_proj], seed=1)
    assert_identical(result, forward_backward(reference.relu2_mlp, [x, w_fc, w_proj], seed=1))
    assert result[0].shape == x.shape


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_linear_relu2_on_cpu_is_the_reference_unless_triton_is_asked_for(backend):
    x, w, _ = mlp_inputs(dtype=torch.float16)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.linear_relu2, [x, w], seed=1)
    assert_identical(result, forward_backward(reference.linear_relu2, [x, w], seed=1))
    assert result[0].shape == (3, 13, 83)


def test_backend_report():
    for op in ("relu2_mlp", "linear_relu2"):
        entry = kernels.backends()["ops"][op]
        assert entry["kernels"] == ["triton"]
        assert entry["on_cuda_tensors"] == "triton" and entry["on_cpu_tensors"] == "reference"


def test_meta_tensors_at_the_speedrun_shapes():
    x = torch.empty(1, 48 * 1024, 768, dtype=torch.bfloat16, device="meta")
    w_fc = torch.empty(3072, 768, dtype=torch.bfloat16, device="meta")
    w_proj = torch.empty(768, 3072, dtype=torch.bfloat16, device="meta")
    assert kernels.relu2_mlp(x, w_fc, w_proj).shape == x.shape
    assert kernels.linear_relu2(x, w_fc).shape == (1, 48 * 1024, 3072)


# ---- the Triton kernels through the public ops, against float64 -------------------------
# (37,) x D=48 x H=80: no dim a multiple of the interpreter's 16 x 32 tiles in M or N,
# TMA-aligned rows; (3, 13) x 45 x 83: odd everything, 3-D input as the GPT passes it.

SHAPES = [((37,), 48, 80), ((3, 13), 45, 83), ((1,), 16, 32)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,d,h", SHAPES)
def test_triton_relu2_mlp_matches_float64(dtype, lead, d, h, interpreter_device):
    inputs = mlp_inputs(lead, d, h, dtype=dtype, device=interpreter_device)
    assert_close_to_oracle(kernels.relu2_mlp, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_relu2_mlp_with_triton_plain_products(dtype, interpreter_device):
    inputs = mlp_inputs((37,), 48, 80, dtype=dtype, device=interpreter_device)
    with mlp.plain_gemm("triton"):
        assert_close_to_oracle(kernels.relu2_mlp, inputs)
    assert mlp._plain_gemm == "cublas"  # restored
    with pytest.raises(ValueError, match="name must be one of"):
        with mlp.plain_gemm("cutlass"):
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,d,h", SHAPES[:2])
def test_triton_linear_relu2_matches_float64(dtype, lead, d, h, interpreter_device):
    x, w, _ = mlp_inputs(lead, d, h, dtype=dtype, device=interpreter_device)
    assert_close_to_oracle(kernels.linear_relu2, [x, w])


def test_triton_strided_rows(interpreter_device):
    x, w_fc, w_proj = mlp_inputs((6, 13), 48, 80, dtype=torch.float16, device=interpreter_device)
    x = x[::2]  # strided leading dim, unit stride along D
    assert not x.is_contiguous()
    assert_close_to_oracle(kernels.relu2_mlp, [x, w_fc, w_proj])


def test_triton_negative_preactivations_pass_no_gradient(interpreter_device):
    # Every pre-activation <= 0: h = 0, y = 0, and no gradient reaches x or w_fc.
    x, w_fc, w_proj = mlp_inputs((37,), 48, 80, dtype=torch.float16, device=interpreter_device)
    x, w_fc = x.abs(), -w_fc.abs()
    with kernels.use_backend("triton"):
        out, dx, dw_fc, dw_proj = fwd_bwd(kernels.relu2_mlp, "relu2_mlp", [x, w_fc, w_proj])
    assert (out == 0).all() and (dx == 0).all() and (dw_fc == 0).all() and (dw_proj == 0).all()


def test_triton_weights_only_and_no_grad(interpreter_device):
    x, w_fc, w_proj = mlp_inputs((37,), 48, 80, dtype=torch.float32, device=interpreter_device)
    w_fc, w_proj = w_fc.clone().requires_grad_(), w_proj.clone().requires_grad_()
    with kernels.use_backend("triton"):
        kernels.relu2_mlp(x, w_fc, w_proj).square().sum().backward()
        with torch.no_grad():
            y = kernels.relu2_mlp(x, w_fc, w_proj)
    x64 = x.double()
    w_fc64, w_proj64 = w_fc.detach().double().requires_grad_(), w_proj.detach().double().requires_grad_()
    y64 = reference.relu2_mlp(x64, w_fc64, w_proj64)
    y64.square().sum().backward()
    assert not y.requires_grad and rel_err(y, y64) < TOL[torch.float32]
    assert rel_err(w_fc.grad, w_fc64.grad) < TOL[torch.float32]
    assert rel_err(w_proj.grad, w_proj64.grad) < TOL[torch.float32]


# ---- the GEMM kernel itself: both variants, every epilogue, poisoned outputs -------------

def gemm_oracle(a, b, epilogue, aux):
    """float64 of what each epilogue computes (EPI_RELU2 rounds the product first, as eager)."""
    product = a.double() @ b.double().T
    if epilogue == mlp.EPI_RELU2:
        return product.to(a.dtype).double().clamp_min(0).square()
    if epilogue == mlp.EPI_RELU2_BWD:
        return 2 * product * aux.double().sqrt()
    return product


# (M, N, K): none a multiple of the 16 x 32 interpreter tiles; K = 40 is not a multiple of
# BLOCK_K = 16 (masked K tail); 45 and 33 make rows unaligned, so only the pointer variant.
GEMM_SHAPES = [(37, 80, 48), (37, 80, 40), (5, 33, 45)]


@pytest.mark.parametrize("epilogue", [mlp.EPI_NONE, mlp.EPI_RELU2, mlp.EPI_RELU2_BWD])
@pytest.mark.parametrize("variant,m,n,k", [("pointer", *shape) for shape in GEMM_SHAPES]
                         + [("tma", *shape) for shape in GEMM_SHAPES[:2]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemm_variants_write_every_element(variant, epilogue, m, n, k, dtype, interpreter_device):
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=gen).to(dtype).to(interpreter_device)
    b = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(interpreter_device)
    aux = torch.randn(m, n, generator=gen).clamp_min(0).square().to(dtype).to(interpreter_device)
    aux = aux if epilogue == mlp.EPI_RELU2_BWD else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=interpreter_device)
    assert mlp.choose_variant([a, b, out], interpreter_device) == "pointer" or a.is_cuda  # interpreter: pointer
    if variant == "tma":  # forced, as on a GPU where the operands are 16-byte aligned
        assert all(mlp._tma_aligned(t) for t in (a, b, out))
    result = mlp.gemm_nt(a, b, epilogue, aux, variant=variant, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "an output element was not written"
    assert rel_err(out, gemm_oracle(a, b, epilogue, aux)) < TOL[dtype]


def test_tile_config_overrides_and_restores(interpreter_device):
    a = torch.randn(37, 40, dtype=torch.float32, device=interpreter_device)
    b = torch.randn(50, 40, dtype=torch.float32, device=interpreter_device)
    default = mlp.kernel_config(a.dtype, a.device)
    with mlp.tile_config(BLOCK_M=32, BLOCK_N=16, GROUP_M=1):
        assert mlp.kernel_config(a.dtype, a.device)["BLOCK_M"] == 32
        c = mlp.gemm_nt(a, b, mlp.EPI_RELU2)
    assert mlp.kernel_config(a.dtype, a.device) == default
    assert rel_err(c, gemm_oracle(a, b, mlp.EPI_RELU2, None)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="unknown tile_config keys"):
        with mlp.tile_config(BLOCK_Q=1):
            pass


def test_variant_choice_by_feature_detection(interpreter_device):
    a = torch.randn(8, 48, dtype=torch.float16)
    assert not mlp.tma_available(torch.device("cpu"))
    assert mlp.choose_variant([a], torch.device("cpu")) == "pointer"  # the interpreter's path
    assert mlp._tma_aligned(a)
    assert not mlp._tma_aligned(torch.randn(8, 45, dtype=torch.float16))      # 90-byte rows
    assert not mlp._tma_aligned(torch.randn(8, 49, dtype=torch.float16)[:, 1:])  # base off 16 B
    assert not mlp._tma_aligned(torch.randn(1, 48, dtype=torch.float16).expand(8, 48))  # stride 0
    with pytest.raises(ValueError, match="variant must be one of"):
        mlp.gemm_nt(a, a, variant="wgmma")


# ---- custom ops: compile, fake impls ---------------------------------------------------

def test_relu2_mlp_compiles_with_fullgraph_and_matches_eager(interpreter_device):
    # aot_eager runs the same kernels as eager, so traced and eager results are bitwise equal.
    compiled = torch.compile(kernels.relu2_mlp, backend="aot_eager", fullgraph=True)
    inputs = mlp_inputs((3, 13), 48, 80, dtype=torch.float16, device=interpreter_device)
    with kernels.use_backend("triton"):
        assert_identical(fwd_bwd(compiled, "relu2_mlp", inputs), fwd_bwd(kernels.relu2_mlp, "relu2_mlp", inputs))


def test_linear_relu2_compiles_with_fullgraph_and_matches_eager(interpreter_device):
    compiled = torch.compile(kernels.linear_relu2, backend="aot_eager", fullgraph=True)
    x, w, _ = mlp_inputs((37,), 48, 80, dtype=torch.float16, device=interpreter_device)
    with kernels.use_backend("triton"):
        assert_identical(fwd_bwd(compiled, "linear_relu2", [x, w]),
                         fwd_bwd(kernels.linear_relu2, "linear_relu2", [x, w]))


def test_reference_path_compiles_too():
    compiled = torch.compile(kernels.relu2_mlp, backend="aot_eager", fullgraph=True)
    inputs = mlp_inputs()
    assert_identical(forward_backward(compiled, inputs, seed=1),
                     forward_backward(kernels.relu2_mlp, inputs, seed=1))


def test_fake_impls_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4096, 768, dtype=torch.bfloat16)
        w_fc = torch.empty(3072, 768, dtype=torch.bfloat16)
        w_proj = torch.empty(768, 3072, dtype=torch.bfloat16)
        y, h = torch.ops.kernels.relu2_mlp_forward(x, w_fc, w_proj, "cublas")
        dx, dw_fc, dw_proj = torch.ops.kernels.relu2_mlp_backward(y, x, w_fc, w_proj, h, "triton")
        h1 = torch.ops.kernels.linear_relu2_forward(x, w_fc)
        dx1, dw1 = torch.ops.kernels.linear_relu2_backward(h1, x, w_fc, h1)
    assert y.shape == (4096, 768) and h.shape == h1.shape == (4096, 3072) and y.dtype == torch.bfloat16
    assert dx.shape == dx1.shape == x.shape and dw_fc.shape == dw1.shape == w_fc.shape
    assert dw_proj.shape == w_proj.shape


# ---- relu2_mlp_fp8: the e4m3 forward variant --------------------------------------------
# Two separate checks.  (1) The kernels against the float64 spec of the *quantized* op
# (reference.relu2_mlp_fp8 on float64 copies): both sides quantize x and w_fc to the same
# e4m3 values (the spec's fp64 quotient and the op's fp32 one round alike but for
# boundary ties, about 2**-20 of the elements, one e4m3 step each), so what remains is
# the dtype's rounding and TOL applies as for relu2_mlp.  (2) The quantized op against
# the unquantized MLP: e4m3 keeps 3 mantissa bits, unit roundoff u = 2**-4; the rounding
# error of one operand has rms ~ u/sqrt(3), so pre carries ~ sqrt(2/3) u ~ 0.8u, the
# outputs computed from relu(pre) (dx, dw_fc) at most u, and h = pre^2 doubles the
# relative error (y, dw_proj: 2u).  It must also be visibly larger than bf16 rounding
# (2**-8), or nothing was quantized.

E4M3_U = 2.0 ** -4
FP8_BOUND = {"out": 2 * E4M3_U, "grad0": E4M3_U, "grad1": E4M3_U, "grad2": 2 * E4M3_U}


def fp8_oracle(inputs, seed=1, **scales):
    upstream = upstream_for("relu2_mlp", inputs, seed).double()
    return forward_backward(lambda *t: reference.relu2_mlp_fp8(*t, **scales),
                            [t.detach().double() for t in inputs], upstream)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,d,h", SHAPES)
def test_triton_relu2_mlp_fp8_matches_float64(dtype, lead, d, h, interpreter_device):
    inputs = mlp_inputs(lead, d, h, dtype=dtype, device=interpreter_device)
    with kernels.use_backend("triton"):
        result = fwd_bwd(kernels.relu2_mlp_fp8, "relu2_mlp", inputs)
    names = ["out", "grad0", "grad1", "grad2"]
    for name, got, want, given in zip(names, result, fp8_oracle(inputs), [inputs[0], *inputs]):
        assert got.dtype == dtype and got.shape == given.shape, name
        assert rel_err(got, want) < TOL[dtype], name
    if dtype == torch.float32:  # (2): e4m3-sized, not bf16-sized, error against no quantization
        for name, got, want in zip(names, result, float64_oracle("relu2_mlp", inputs)):
            assert 2.0 ** -8 < rel_err(got, want) < FP8_BOUND[name], name


def test_triton_relu2_mlp_fp8_with_given_scales(interpreter_device):
    # Fixed scales (floats and device tensors) instead of amax / 448: the same values as the
    # spec with those scales; a scale too small saturates x / scale at +-448 instead of NaN.
    inputs = mlp_inputs((37,), 48, 80, dtype=torch.float32, device=interpreter_device)
    for x_scale, w_scale in ((0.01, 2.0 ** -9), (torch.tensor(0.02), torch.tensor([0.001])), (1e-4, 1e-4)):
        with kernels.use_backend("triton"):
            result = fwd_bwd(lambda *t: kernels.relu2_mlp_fp8(*t, x_scale=x_scale, w_scale=w_scale),
                             "relu2_mlp", inputs)
        scales = {"x_scale": float(x_scale), "w_scale": float(w_scale)}
        for got, want in zip(result, fp8_oracle(inputs, **scales)):
            assert torch.isfinite(got).all() and rel_err(got, want) < TOL[torch.float32]
    # 1e-4: |x| / 1e-4 is far past 448 for most of x, so x8 = +-448 there (saturated, finite).
    assert (reference.quantize_e4m3(inputs[0], 1e-4).float().abs() == 448).float().mean() > 0.5


@pytest.mark.parametrize("variant", ["pointer", "tma"])
def test_gemm_fp8_operands_scale_and_bf16_sized_output(variant, interpreter_device):
    # e4m3 operands, an fp32 device scale, a 16-bit output: every element written.
    m, n, k = 37, 80, 48
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(m, k, generator=gen).to(mlp.FP8).to(interpreter_device)
    b = torch.randn(n, k, generator=gen).to(mlp.FP8).to(interpreter_device)
    scale = torch.tensor([0.0625], device=interpreter_device)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=interpreter_device)
    mlp.gemm_nt(a, b, mlp.EPI_RELU2, variant=variant, out=out, scale=scale, out_dtype=torch.float16)
    product = (a.double() @ b.double().T * 0.0625).to(torch.float16).double().clamp_min(0).square()
    assert torch.isfinite(out).all() and rel_err(out, product) < TOL[torch.float16]


def test_relu2_mlp_fp8_on_cpu_is_the_reference_and_compiles():
    inputs = mlp_inputs((3, 13), 45, 83, dtype=torch.bfloat16)
    expected = forward_backward(lambda *t: reference.relu2_mlp_fp8(*t), inputs, seed=1)
    assert_identical(forward_backward(kernels.relu2_mlp_fp8, inputs, seed=1), expected)
    compiled = torch.compile(kernels.relu2_mlp_fp8, backend="aot_eager", fullgraph=True)
    assert_identical(forward_backward(compiled, inputs, seed=1), expected)


def test_reference_relu2_mlp_fp8_in_fp32_matches_float64_and_zero_input_gives_zeros():
    inputs = mlp_inputs((37,), 48, 80, dtype=torch.float32)
    for name, got, want in zip(["out", "grad0", "grad1", "grad2"],
                               forward_backward(lambda *t: reference.relu2_mlp_fp8(*t), inputs, seed=1),
                               fp8_oracle(inputs)):
        assert rel_err(got, want) < TOL[torch.float32], name
    # amax = 0: the scale is clamped to the smallest normal, not 0, so 0 / scale is 0, not NaN.
    x, w_fc, w_proj = inputs
    out, dx, dw_fc, dw_proj = forward_backward(lambda *t: reference.relu2_mlp_fp8(*t), [x * 0, w_fc, w_proj])
    assert (out == 0).all() and (dx == 0).all() and (dw_fc == 0).all() and (dw_proj == 0).all()


def test_triton_relu2_mlp_fp8_compiles_with_fullgraph_and_matches_eager(interpreter_device):
    compiled = torch.compile(kernels.relu2_mlp_fp8, backend="aot_eager", fullgraph=True)
    inputs = mlp_inputs((3, 13), 48, 80, dtype=torch.float16, device=interpreter_device)
    with kernels.use_backend("triton"):
        assert_identical(fwd_bwd(compiled, "relu2_mlp", inputs), fwd_bwd(kernels.relu2_mlp_fp8, "relu2_mlp", inputs))


def test_relu2_mlp_fp8_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4096, 768, dtype=torch.bfloat16)
        w_fc = torch.empty(3072, 768, dtype=torch.bfloat16)
        w_proj = torch.empty(768, 3072, dtype=torch.bfloat16)
        scale = torch.empty((), dtype=torch.float32)
        y, h = torch.ops.kernels.relu2_mlp_fp8_forward(x, w_fc, w_proj, scale, scale, "cublas")
    assert y.shape == (4096, 768) and h.shape == (4096, 3072) and y.dtype == h.dtype == torch.bfloat16


@pytest.mark.parametrize("scales,exc,match", [
    ({"x_scale": 0.0}, ValueError, "x_scale must be a positive finite float"),
    ({"w_scale": -1.0}, ValueError, "w_scale must be a positive finite float"),
    ({"x_scale": float("nan")}, ValueError, "x_scale must be a positive finite float"),
    ({"w_scale": float("inf")}, ValueError, "w_scale must be a positive finite float"),
    ({"x_scale": "2"}, ValueError, "x_scale must be a positive finite float"),
    ({"x_scale": True}, ValueError, "x_scale must be a positive finite float"),
    ({"x_scale": torch.ones(2)}, ValueError, r"x_scale must be .* one-element float tensor; got .* \(2,\)"),
    ({"w_scale": torch.ones((), dtype=torch.int32)}, ValueError, "w_scale must be .* one-element float tensor"),
    ({"w_scale": torch.ones((), device="meta")}, ValueError, "w_scale is on meta"),
])
def test_relu2_mlp_fp8_bad_scales_raise_naming_them(scales, exc, match):
    with pytest.raises(exc, match=match):
        kernels.relu2_mlp_fp8(*mlp_inputs(), **scales)


def test_relu2_mlp_fp8_checks_its_tensors_like_relu2_mlp():
    x, w_fc, w_proj = mlp_inputs()
    with pytest.raises(ValueError, match=r"w_proj.shape\[1\] must equal w_fc.shape\[0\]"):
        kernels.relu2_mlp_fp8(x, w_fc, w_proj[:, 1:])
    with pytest.raises(TypeError, match="w_fc has dtype torch.bfloat16 but x has torch.float32"):
        kernels.relu2_mlp_fp8(x.float(), w_fc, w_proj)


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("make_args,exc,match", [
    (lambda x, a, b: (x.tolist(), a, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, a, b: (x.double(), a.double(), b.double()), TypeError, "x must have dtype"),
    (lambda x, a, b: (x.int(), a, b), TypeError, "x must have dtype"),
    (lambda x, a, b: (x.float(), a, b), TypeError, "w_fc has dtype torch.bfloat16 but x has torch.float32"),
    (lambda x, a, b: (x, a, b.half()), TypeError, "w_proj has dtype"),
    (lambda x, a, b: (x, a, None), TypeError, "w_proj must be a torch.Tensor"),
    (lambda x, a, b: (x[0, 0, 0], a, b), ValueError, "x must have at least 1 dims"),
    (lambda x, a, b: (x, a[None], b), ValueError, "w_fc must be 2-D"),
    (lambda x, a, b: (x, a, b[0]), ValueError, "w_proj must be 2-D"),
    (lambda x, a, b: (x[..., 1:], a, b), ValueError, r"w_fc.shape\[1\] must equal x.shape\[-1\]"),
    (lambda x, a, b: (x, a, b[1:]), ValueError, r"w_proj.shape\[0\] must equal x.shape\[-1\]"),
    (lambda x, a, b: (x, a, b[:, 1:]), ValueError, r"w_proj.shape\[1\] must equal w_fc.shape\[0\]"),
    (lambda x, a, b: (x[:0], a, b), ValueError, "x must not be empty"),
    (lambda x, a, b: (x, a[:0], b[:, :0]), ValueError, "w_fc must not be empty"),
    (lambda x, a, b: (x, a.to("meta"), b), ValueError, "w_fc is on meta"),
    (lambda x, a, b: (x, a, b.to("meta")), ValueError, "w_proj is on meta"),
    (lambda x, a, b: (x.mT.contiguous().mT, a, b), ValueError, "x must have unit stride"),
    (lambda x, a, b: (x, a.t().contiguous().t(), b), ValueError, "w_fc must have unit stride"),
    (lambda x, a, b: (x, a, b.t().contiguous().t()), ValueError, "w_proj must have unit stride"),
])
def test_relu2_mlp_bad_arguments_raise_naming_them(make_args, exc, match):
    with pytest.raises(exc, match=match):
        kernels.relu2_mlp(*make_args(*mlp_inputs()))


@pytest.mark.parametrize("make_args,exc,match", [
    (lambda x, w: (x, w.tolist()), TypeError, "w must be a torch.Tensor"),
    (lambda x, w: (x, w.float()), TypeError, "w has dtype torch.float32 but x has torch.bfloat16"),
    (lambda x, w: (x.long(), w), TypeError, "x must have dtype"),
    (lambda x, w: (x, w[0]), ValueError, "w must be 2-D"),
    (lambda x, w: (x, w[:, 2:]), ValueError, r"w.shape\[1\] must equal x.shape\[-1\]"),
    (lambda x, w: (x, w.to("meta")), ValueError, "w is on meta"),
    (lambda x, w: (x, w.t().contiguous().t()), ValueError, "w must have unit stride"),
])
def test_linear_relu2_bad_arguments_raise_naming_them(make_args, exc, match):
    x, w, _ = mlp_inputs()
    with pytest.raises(exc, match=match):
        kernels.linear_relu2(*make_args(x, w))


# ---- ahead-of-time compilation for Hopper ------------------------------------------------

def _hopper_specs():
    """Every kernel x epilogue in bf16 at the GPU config, plus fp16, fp32 (exact dots) and the
    e4m3 forward of relu2_mlp_fp8."""
    specs = []
    for dtype, torch_dtype, epilogues in (("bf16", torch.bfloat16, (0, 1, 2)), ("fp16", torch.float16, (1, 2)),
                                          ("fp32", torch.float32, (1,))):
        for epilogue in epilogues:
            config = mlp.kernel_config(torch_dtype, torch.device("cuda"), epilogue)
            bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
            shared = {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "HAS_SCALE": False, "BLOCK_M": bm,
                      "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": config["GROUP_M"], "NUM_PROGRAMS": 132,
                      "FLATTEN": config["FLATTEN"]}
            specs.append({"module": "kernels.relu2_mlp", "kernel": "_gemm_nt_pointer_kernel", "signature": {
                "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "aux_ptr": f"*{dtype}",
                "scale_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32",
                "stride_cm": "i32", "stride_auxm": "i32"},
                "constexprs": {"EPILOGUE": epilogue, "EVEN_K": True, **shared}, "num_warps": config["num_warps"],
                "num_stages": config["num_stages"],
                "divisible_by_16": ["a_ptr", "b_ptr", "c_ptr", "aux_ptr", "N", "K", "stride_am", "stride_bn",
                                    "stride_cm", "stride_auxm"]})
            specs.append({"module": "kernels.relu2_mlp", "kernel": "_gemm_nt_tma_kernel", "signature": {
                "a_desc": f"tensordesc<{dtype}[{bm}, {bk}]>", "b_desc": f"tensordesc<{dtype}[{bn}, {bk}]>",
                "c_desc": f"tensordesc<{dtype}[{bm}, {bn // 2}]>", "aux_desc": f"tensordesc<{dtype}[{bm}, {bn // 2}]>",
                "aux_ptr": f"*{dtype}", "scale_ptr": "*fp32", "stride_auxm": "i32", "M": "i32", "N": "i32",
                "K": "i32"},
                "constexprs": {"EPILOGUE": epilogue, "WARP_SPECIALIZE": config["WARP_SPECIALIZE"],
                               "PREFETCH_AUX": epilogue == mlp.EPI_RELU2_BWD, **shared},
                "num_warps": config["num_warps"], "num_stages": config["num_stages"],
                "divisible_by_16": ["aux_ptr", "stride_auxm", "N", "K"]})
    # relu2_mlp_fp8's forward: e4m3 operands, bf16 out, the dequant scale read from memory.
    config = mlp.kernel_config(mlp.FP8, torch.device("cuda"), mlp.EPI_RELU2)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    fp8 = {"EPILOGUE": mlp.EPI_RELU2, "DOT_PRECISION": "tf32", "HAS_SCALE": True, "BLOCK_M": bm, "BLOCK_N": bn,
           "BLOCK_K": bk, "GROUP_M": config["GROUP_M"], "NUM_PROGRAMS": 132, "FLATTEN": config["FLATTEN"]}
    specs.append({"module": "kernels.relu2_mlp", "kernel": "_gemm_nt_tma_kernel", "signature": {
        "a_desc": f"tensordesc<fp8e4nv[{bm}, {bk}]>", "b_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>",
        "c_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>", "aux_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>",
        "aux_ptr": "*bf16", "scale_ptr": "*fp32", "stride_auxm": "i32", "M": "i32", "N": "i32", "K": "i32"},
        "constexprs": {**fp8, "WARP_SPECIALIZE": False, "PREFETCH_AUX": False},
        "num_warps": config["num_warps"], "num_stages": config["num_stages"],
        "divisible_by_16": ["aux_ptr", "scale_ptr", "stride_auxm", "N", "K"]})
    specs.append({"module": "kernels.relu2_mlp", "kernel": "_gemm_nt_pointer_kernel", "signature": {
        "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "aux_ptr": "*bf16", "scale_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32",
        "stride_auxm": "i32"},
        "constexprs": {**fp8, "EVEN_K": True}, "num_warps": config["num_warps"], "num_stages": config["num_stages"],
        "divisible_by_16": ["a_ptr", "b_ptr", "c_ptr", "aux_ptr", "scale_ptr", "N", "K", "stride_am", "stride_bn",
                            "stride_cm", "stride_auxm"]})
    # The alternative schedule of the sweep: warp-specialized (a TMA producer warp), unflattened.
    base = next(spec for spec in specs if spec["kernel"] == "_gemm_nt_tma_kernel"
                and spec["constexprs"]["EPILOGUE"] == 2 and spec["signature"]["M"] == "i32")  # bf16 comes first
    ws = dict(base, constexprs={**base["constexprs"], "FLATTEN": False, "WARP_SPECIALIZE": True})
    return specs + [ws]


def test_every_kernel_compiles_for_sm90_with_wgmma():
    specs = _hopper_specs()
    for spec, compiled in zip(specs, compile_for_hopper(specs)):
        ptx = compiled["ptx"]
        assert compiled["cubin_bytes"] > 0 and ".target sm_90" in ptx, spec
        if spec["constexprs"]["DOT_PRECISION"] == "ieee":
            continue  # exact fp32 dots are FMA loops by design: no tensor-core instruction to find
        assert "wgmma.mma_async" in ptx, spec  # Hopper warpgroup MMA, not the mma.sync fallback
        if "fp8e4nv" in json.dumps(spec):  # relu2_mlp_fp8: the MMA takes e4m3 operands, not upcast ones
            assert re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx), spec
        if spec["kernel"] == "_gemm_nt_tma_kernel":
            assert "cp.async.bulk.tensor" in ptx, spec  # TMA loads/stores
            # The dpre epilogue's aux tile is prefetched into L2 before the K loop (issue 18).
            assert ("prefetch.global.L2" in ptx) == (spec["constexprs"]["EPILOGUE"] == mlp.EPI_RELU2_BWD), spec
        else:
            # 16-byte asynchronous global -> shared copies (cp.async, size operand 0x10)
            assert re.search(r"cp\.async\.cg\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x10", ptx), spec


# ---- GPU: bf16 at model-like shapes (skipped without a GPU) ------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("plain", mlp.PLAIN_GEMMS)
@pytest.mark.parametrize("lead,d,h", [((4, 1024 + 17), 768, 3072), ((999,), 200, 328), ((77,), 45, 83)])
def test_gpu_bf16_relu2_mlp_matches_float64(plain, lead, d, h):
    inputs = mlp_inputs(lead, d, h, dtype=torch.bfloat16, device="cuda")
    with mlp.plain_gemm(plain):
        ours = assert_close_to_oracle(kernels.relu2_mlp, inputs)
    # And no less accurate than eager bf16 (the record's formulation), up to 10 %.
    eager = fwd_bwd(reference.relu2_mlp, "relu2_mlp", inputs)
    oracle = float64_oracle("relu2_mlp", inputs)
    for got, base, want in zip(ours, eager, oracle):
        assert rel_err(got, want) <= 1.1 * rel_err(base, want) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("variant", mlp.VARIANTS)
@pytest.mark.parametrize("epilogue", [mlp.EPI_NONE, mlp.EPI_RELU2, mlp.EPI_RELU2_BWD])
def test_gpu_bf16_gemm_variants(variant, epilogue):
    if variant == "tma" and not mlp.tma_available(torch.device("cuda")):
        pytest.skip("no TMA descriptors on this GPU/Triton")
    m, n, k = 1000, 776, 776  # partial tiles in M and N, a K tail past BLOCK_K = 64
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).bfloat16().cuda()
    b = (torch.randn(n, k, generator=gen) * k**-0.5).bfloat16().cuda()
    aux = torch.randn(m, n, generator=gen).clamp_min(0).square().bfloat16().cuda()
    aux = aux if epilogue == mlp.EPI_RELU2_BWD else None
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    mlp.gemm_nt(a, b, epilogue, aux, variant=variant, out=out)
    assert torch.isfinite(out).all()
    assert rel_err(out, gemm_oracle(a, b, epilogue, aux)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("lead,d,h", [((4, 1024 + 17), 768, 3072), ((77,), 45, 83)])
def test_gpu_bf16_relu2_mlp_fp8_matches_float64(lead, d, h):
    # CPU twin: test_triton_relu2_mlp_fp8_matches_float64 (fp16/fp32 in the interpreter).
    inputs = mlp_inputs(lead, d, h, dtype=torch.bfloat16, device="cuda")
    result = fwd_bwd(kernels.relu2_mlp_fp8, "relu2_mlp", inputs)
    for name, got, want in zip(["out", "grad0", "grad1", "grad2"], result, fp8_oracle(inputs)):
        assert got.dtype == torch.bfloat16 and rel_err(got, want) < TOL[torch.bfloat16], name


@pytest.mark.gpu
def test_gpu_auto_picks_tma_for_the_speedrun_shapes():
    x, w_fc, w_proj = mlp_inputs((2, 64), 768, 3072, dtype=torch.bfloat16, device="cuda")
    expected = "tma" if mlp.tma_available(x.device) else "pointer"
    assert mlp.choose_variant([x.reshape(-1, 768), w_fc, w_proj], x.device) == expected
    assert kernels.backends()["ops"]["relu2_mlp"]["on_cuda_tensors"] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["relu2_mlp", "relu2_mlp_fp8"])
def test_gpu_compiled_model_mlp_with_inductor(op):
    # CPU twins: the aot_eager compile tests above (the same custom ops traced).
    inputs = mlp_inputs((2, 512), 768, 3072, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(getattr(kernels, op), fullgraph=True)
    assert_identical(fwd_bwd(compiled, "relu2_mlp", inputs), fwd_bwd(getattr(kernels, op), "relu2_mlp", inputs))


# ---- bench/bench_relu2_mlp.py: the parts that run without a GPU ---------------------------

def test_bench_flops_and_cli():
    from bench import bench_relu2_mlp as b
    assert b.flops(49152, 768, 3072, "fwd+bwd") == 12 * 49152 * 768 * 3072 == 1_391_569_403_904
    assert b.flops(65536, 768, 3072, "fwd") == 4 * 65536 * 768 * 3072
    with pytest.raises(ValueError):
        b.flops(1, 1, 1, "bwd")
    args = b.parse_args([])
    assert (args.m, args.d, args.h, args.modes) == ([49152, 65536], 768, 3072, ["fwd+bwd", "fwd"])
    assert args.impls == list(b.IMPLEMENTATIONS)
    with pytest.raises(SystemExit):
        b.parse_args(["--m", "0"])


def test_bench_run_shape_checks_times_and_records(tmp_path, monkeypatch):
    from bench import bench_relu2_mlp as b
    from bench import harness

    def wrong(x, w_fc, w_proj):
        return b.record_mlp(x, w_fc, w_proj) * 1.5

    monkeypatch.setattr(b, "mlp_functions", lambda impls: {
        "torch-eager": b.record_mlp, "wrong": wrong, "missing": "triton is not installed"})
    timed = []

    def fake_timer(step):
        step()
        timed.append(step)
        return 4.0  # ms, made up

    ceilings = {harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0)}
    run = harness.BenchRun("relu2_mlp", title="t", out_root=tmp_path,
                           metadata={"device_slug": "fake"}, ceilings=ceilings)
    monkeypatch.setattr(harness, "render_png", lambda data, path: path.write_bytes(b""))
    b.run_shape(run, m=37, d=48, h=80, modes=b.MODES, impls=["torch-eager", "wrong", "missing"],
                timer=fake_timer, device="cpu")
    entries = {(e.params.get("mode"), e.impl): e for e in run.entries}
    assert len(run.entries) == 6 and len(timed) == 4
    for mode in b.MODES:
        eager = entries[mode, "torch-eager"]
        assert eager.checks["ok"] and eager.checks["y_rel_err"] == 0.0
        assert ("dw_proj_rel_err" in eager.checks) == (mode == "fwd+bwd")
        assert eager.value == pytest.approx(b.flops(37, 48, 80, mode) / 4e-3 / 1e12)
        assert eager.fraction_of_ceiling == pytest.approx(eager.value / 800.0)
        assert entries[mode, "wrong"].checks["ok"] is False
        assert entries[mode, "missing"].error == "triton is not installed"


@pytest.mark.parametrize("mode", [[], ["--dw"]])
def test_bench_without_gpu_exits_0(mode):
    import os
    import subprocess
    import sys
    from bench import harness
    done = subprocess.run([sys.executable, "-m", "bench.bench_relu2_mlp", "--quick", *mode], cwd=harness.REPO_ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert harness.NO_GPU_MESSAGE in done.stdout


def test_bench_sweep_records_every_product_and_config(tmp_path, monkeypatch):
    from bench import bench_relu2_mlp as b
    from bench import harness
    ceilings = {harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0)}
    run = harness.BenchRun("relu2_mlp_sweep", title="t", out_root=tmp_path,
                           metadata={"device_slug": "fake"}, ceilings=ceilings)
    monkeypatch.setattr(harness, "render_png", lambda data, path: path.write_bytes(b""))
    configs = ({}, {"GROUP_M": 1}, {"BLOCK_Q": 3})  # the last one is refused: an error entry, not a crash
    b.run_sweep(run, m=37, d=48, h=80, timer=lambda step: (step(), 1.0)[1], device="cpu", configs=configs)
    assert len(run.entries) == 3 * (1 + len(configs) + 1)
    assert [e.impl for e in run.entries[:5]] == ["torch (cuBLAS + pointwise)", "ours default", "ours GROUP_M=1",
                                                 "ours BLOCK_Q=3", "ours default pointer"]
    assert {e.params["product"] for e in run.entries} == {"fwd relu2 GEMM", "bwd dpre GEMM", "plain y GEMM"}
    for entry in run.entries:
        assert (entry.error is None) == ("BLOCK_Q" not in entry.impl), entry
        assert entry.work == {"flops": 2 * 37 * 48 * 80}
        if entry.impl.startswith("torch"):
            assert entry.checks["ok"] and entry.checks["rel_err"] == 0.0


def test_bench_dw_split_k_against_cublas(tmp_path, monkeypatch):
    from bench import bench_relu2_mlp as b
    from bench import harness
    ceilings = {harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0)}
    run = harness.BenchRun("relu2_mlp_dw", title="t", out_root=tmp_path,
                           metadata={"device_slug": "fake"}, ceilings=ceilings)
    monkeypatch.setattr(harness, "render_png", lambda data, path: path.write_bytes(b""))
    b.run_dw(run, m=40, d=48, h=80, timer=lambda step: (step(), 1.0)[1], device="cpu", splits=(2, 8, 3))
    assert len(run.entries) == 2 * 4
    assert {e.params["product"] for e in run.entries} == {"dW2 = g^T h", "dW1 = dpre^T x"}
    for entry in run.entries:
        assert entry.work == {"flops": 2 * 40 * 48 * 80}
        assert (entry.error is None) == ("split-K 3 " not in entry.impl), entry  # 40 % 3: refused, recorded
        if entry.error is None:
            assert entry.checks["ok"] and entry.checks["rel_err"] < 1e-2, entry
    a, g = torch.randn(40, 48), torch.randn(40, 80)
    assert rel_err(b.split_k_tn(a, g, 4), a.double().T @ g.double()) < 1e-6
    assert b.parse_args(["--dw"]).dw and not b.parse_args([]).dw
    with pytest.raises(SystemExit):
        b.parse_args(["--dw", "--sweep"])


# ---- the GPT trainer's switch: --kernels mlp=ours-fp8 ----------------------------------------

def test_gpt_trainer_runs_the_fp8_mlp_in_training_and_bf16_in_validation(tmp_path, monkeypatch, capsys):
    from speedrun.gpt import train
    from tests.test_gpt import TINY
    calls = {"relu2_mlp_fp8": 0, "relu2_mlp": 0}

    def counted(name):
        original = getattr(kernels, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))
    run_dir = tmp_path / "run"
    assert train.main(["--preset", "smoke", *TINY, "--run-dir", str(run_dir), "--kernels", "mlp=ours-fp8",
                       "--steps", "2", "--val-every", "2"]) == 0
    assert "mlp=ours-fp8 (other)" in (run_dir / "log.txt").read_text()
    layers = 4
    # every training step runs all layers' MLPs in fp8; the validations (steps 0 and 2) in bf16
    assert calls["relu2_mlp_fp8"] >= 2 * layers and calls["relu2_mlp"] >= 2 * layers
    assert train.main(["--preset", "smoke", *TINY, "--run-dir", str(tmp_path / "bad"), "--kernels", "mlp=fp8"]) != 0
    assert "mlp can be ours, torch, ours-fp8" in capsys.readouterr().err


def test_bench_checks_ours_fp8_with_the_e4m3_tolerance(tmp_path, monkeypatch):
    from bench import bench_relu2_mlp as b
    from bench import harness

    def off_by_5_percent(x, w_fc, w_proj):  # an e4m3-sized difference from eager
        return b.record_mlp(x, w_fc, w_proj) * 1.05

    monkeypatch.setattr(b, "mlp_functions", lambda impls: {impl: off_by_5_percent for impl in impls})
    ceilings = {harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0)}
    run = harness.BenchRun("relu2_mlp", title="t", out_root=tmp_path, metadata={"device_slug": "fake"},
                           ceilings=ceilings)
    monkeypatch.setattr(harness, "render_png", lambda data, path: path.write_bytes(b""))
    b.run_shape(run, m=37, d=48, h=80, modes=("fwd",), impls=["ours-fp8", "ours-triton"],
                timer=lambda step: (step(), 1.0)[1], device="cpu")
    ok = {e.impl: e.checks["ok"] for e in run.entries}
    assert ok == {"ours-fp8": True, "ours-triton": False}
    assert "ours-fp8" in b.IMPLEMENTATIONS and b.FP8_TOL == 2 * 2.0 ** -4
