"""fp8_linear and linear_softcap_cross_entropy: the public ops against the reference,
every error path, compile tracing and backend routing; the Triton FP8 GEMM and e5m2
CE-gradient kernels in the interpreter; the CUDA extension's SASS (QGMMA, no spills);
and, on a GPU, the hand-written CUDA GEMM against torch._scaled_mm.

On the CPU "auto" and "reference" run the reference (bitwise); "cuda" on CPU tensors
raises (the extension needs CUDA tensors) or, without the extension, falls back to the
reference; "triton" runs the Triton kernels in the interpreter.  The reference itself is
checked in tests/test_reference.py.
"""
import os
import re
import subprocess

import pytest
import torch
import triton

import kernels
from kernels import _backend, fp8_head, reference
from tests.conftest import HAS_GPU
from tests.helpers import BACKENDS, assert_identical, forward_backward, rel_err

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EXTENSION = _backend.extension()
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# The interpreter stores fp32 -> bf16 by truncation (DESIGN.md §4): up to one bf16 ulp
# (2**-8..2**-7 relative) per element of y and dx against the reference's rounding: ~4e-3 in
# norm measured, 1e-2 allowed.  On a GPU the same bound covers one rounding each.
BF16_STORE_TOL = 1e-2


def cpu_behaviour(backend):
    """What a backend setting does with CPU tensors here: "reference", "triton" or "raises"."""
    if backend in ("auto", "reference"):
        return "reference"
    if backend == "triton":
        return "triton" if _backend.interpreter_enabled() else "raises"
    # cuda: CPU tensors are refused, and an unbuilt extension is named: both raise.
    return "raises"


def head_inputs(n=37, k=72, v=101, w_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen).bfloat16()
    weight = (torch.randn(v, k, generator=gen) * 0.05).to(w_dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[1] = -100
    # Logit gradients of a mean over n rows are ~1/n: scaled down like the record's mean over
    # ~50k tokens, so grad * 2**19 stays inside e5m2's range.
    upstream = (torch.randn(n, v, generator=gen) * 1e-4).bfloat16()
    return x, weight, targets, upstream


# ---- the public ops are the reference on the CPU ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_under_every_backend(backend, w_dtype):
    x, weight, _, upstream = head_inputs(w_dtype=w_dtype)
    expected = forward_backward(reference.fp8_linear, [x, weight], upstream)
    behaviour = cpu_behaviour(backend)
    with kernels.use_backend(backend):
        if behaviour == "raises":
            with pytest.raises(RuntimeError, match="backend"):
                kernels.fp8_linear(x, weight)
            return
        result = forward_backward(kernels.fp8_linear, [x, weight], upstream)
    assert result[0].dtype == torch.bfloat16 and result[2].dtype == w_dtype
    if behaviour == "reference":
        assert_identical(result, expected)
    else:
        # y and dx: the interpreter's truncating bf16 store; dW: fp32 sums of exact fp8
        # products in another order (and a bf16 weight's rounding of them).
        assert rel_err(result[0], expected[0]) < BF16_STORE_TOL
        assert rel_err(result[1], expected[1]) < BF16_STORE_TOL
        assert rel_err(result[2], expected[2]) < (4e-3 if w_dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8,x_dtype", [(True, torch.bfloat16), (False, torch.float32),
                                         (False, torch.float16)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_softcap_ce_under_every_backend(backend, fp8, x_dtype, reduction):
    x, weight, targets, _ = head_inputs()
    x = x.to(x_dtype)
    upstream = torch.full((37,) if reduction == "none" else (), 1e-3)
    kwargs = dict(targets=targets, fp8=fp8, reduction=reduction, kind="tanh", cap=15.0)
    expected = forward_backward(reference.linear_softcap_cross_entropy, [x, weight], upstream, **kwargs)
    behaviour = cpu_behaviour(backend)
    with kernels.use_backend(backend):
        if behaviour == "raises":
            with pytest.raises(RuntimeError, match="backend"):
                kernels.linear_softcap_cross_entropy(x, weight, **kwargs)
            return
        result = forward_backward(kernels.linear_softcap_cross_entropy, [x, weight], upstream, **kwargs)
    assert all(torch.isfinite(t).all() for t in result)
    if behaviour == "reference":
        assert_identical(result, expected)
    elif fp8:
        # Loss: bf16 logits truncated instead of rounded (interpreter) move it by < 1e-3.
        assert rel_err(result[0], expected[0]) < 1e-3
        # Gradients go through e5m2 (2 mantissa bits): a bf16 ulp of difference upstream
        # flips an e5m2 rounding now and then (~25 % on that element): a few % in norm.
        assert rel_err(result[1], expected[1]) < 5e-2 and rel_err(result[2], expected[2]) < 5e-2
    else:
        # fp32/fp16 matmul + the Triton softcap CE: fp32 sums in another order; fp16 logits
        # and gradients rounded at other points than the reference's (2**-11 each): 3e-3 seen.
        tol = 1e-5 if x_dtype == torch.float32 else 6e-3
        for a, e in zip(result, expected):
            assert rel_err(a, e) < tol


def test_scales_are_passed_through():
    x, weight, _, upstream = head_inputs()
    scales = dict(x_scale=4.0, w_scale=2.0**7, grad_scale=2.0**17)
    assert_identical(forward_backward(kernels.fp8_linear, [x, weight], upstream, **scales),
                     forward_backward(reference.fp8_linear, [x, weight], upstream, **scales))
    assert not torch.equal(kernels.fp8_linear(x, weight, **scales), kernels.fp8_linear(x, weight))


def test_backend_report_lists_cuda_and_triton():
    for op in ("fp8_linear", "linear_softcap_cross_entropy"):
        report = kernels.backends()["ops"][op]
        assert report["kernels"] == ["cuda", "triton"]
        with kernels.use_backend("auto"):
            assert kernels.backends()["ops"][op]["on_cpu_tensors"] == "reference"


def test_meta_tensors_at_the_speedrun_shapes():
    # Checks read only shapes, dtypes and devices, so they pass on data-less tensors.
    x = torch.empty(48 * 1024, 768, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(50304, 768, device="meta")
    y = kernels.fp8_linear(x, weight)
    assert y.shape == (48 * 1024, 50304) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    targets = torch.empty(48 * 1024, dtype=torch.int64, device="meta")
    loss = kernels.linear_softcap_cross_entropy(x, weight, targets)
    assert loss.shape == () and loss.dtype == torch.float32


# ---- torch.compile -----------------------------------------------------------------------

# aot_eager runs the same ATen ops as eager, so traced and eager results are bitwise equal.

def test_fp8_linear_compiles_with_fullgraph_and_matches_eager():
    x, weight, _, upstream = head_inputs()

    def head(a, b):
        return kernels.fp8_linear(a, b) * 2.0

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    assert_identical(forward_backward(compiled, [x, weight], upstream),
                     forward_backward(head, [x, weight], upstream))


def test_linear_softcap_ce_compiles_with_fullgraph_and_matches_eager():
    x, weight, targets, _ = head_inputs()

    def loss_fn(a, b):
        return kernels.linear_softcap_cross_entropy(a, b, targets) * 1e-3

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    one = torch.tensor(1.0)
    assert_identical(forward_backward(compiled, [x, weight], one),
                     forward_backward(loss_fn, [x, weight], one))


# ---- errors ------------------------------------------------------------------------------

def _valid():
    x, weight, targets, _ = head_inputs(n=4, k=8, v=10)
    return x, weight, targets


@pytest.mark.parametrize("make_args,exc,match", [
    (lambda x, w: (x.float(), w), TypeError, "x must have dtype"),
    (lambda x, w: (x.half(), w), TypeError, "x must have dtype"),
    (lambda x, w: (x.tolist(), w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: (x, w.half()), TypeError, "weight must have dtype"),
    (lambda x, w: (x, w.double()), TypeError, "weight must have dtype"),
    (lambda x, w: (x[None], w), ValueError, "x must be 2-D"),
    (lambda x, w: (x, w[0]), ValueError, "weight must be 2-D"),
    (lambda x, w: (x, w[:, :5]), ValueError, r"weight.shape\[1\]"),
    (lambda x, w: (x[:0], w), ValueError, "x must not be empty"),
    (lambda x, w: (x, w[:0]), ValueError, "weight must not be empty"),
    (lambda x, w: (x, w.to("meta")), ValueError, "weight is on meta"),
    (lambda x, w: (torch.randn(8, 4).bfloat16().t(), w), ValueError, "x must have unit stride"),
    (lambda x, w: (x, torch.randn(8, 10).t()), ValueError, "weight must have unit stride"),
])
def test_fp8_linear_bad_tensors_raise_naming_the_argument(make_args, exc, match):
    x, weight, _ = _valid()
    with pytest.raises(exc, match=match):
        kernels.fp8_linear(*make_args(x, weight))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"x_scale": 0.0}, ValueError, "x_scale"),
    ({"w_scale": -2.0}, ValueError, "w_scale"),
    ({"grad_scale": "2**19"}, TypeError, "grad_scale"),
    ({"x_scale": True}, TypeError, "x_scale"),
])
def test_fp8_linear_bad_scales_raise_naming_the_argument(kwargs, exc, match):
    x, weight, _ = _valid()
    with pytest.raises(exc, match=match):
        kernels.fp8_linear(x, weight, **kwargs)


@pytest.mark.parametrize("make_args,kwargs,exc,match", [
    (lambda x, w, t: (x, w, t.float()), {}, TypeError, "targets must have dtype"),
    (lambda x, w, t: (x, w, t[:3]), {}, ValueError, r"targets.shape\[0\]"),
    (lambda x, w, t: (x, w, t[:, None]), {}, ValueError, "targets must be 1-D"),
    (lambda x, w, t: (x, w, t.to("meta")), {}, ValueError, "targets is on meta"),
    (lambda x, w, t: (x.float(), w, t), {}, TypeError, "x must have dtype"),
    (lambda x, w, t: (x.double(), w, t), {"fp8": False}, TypeError, "x must have dtype"),
    (lambda x, w, t: (x, w.half(), t), {}, TypeError, "weight must have dtype"),
    (lambda x, w, t: (x, w[:, 1:], t), {"fp8": False}, ValueError, r"weight.shape\[1\]"),
    (lambda x, w, t: (x, w, t), {"fp8": 1}, TypeError, "fp8 must be a bool"),
    (lambda x, w, t: (x, w, t), {"kind": "relu"}, ValueError, "kind"),
    (lambda x, w, t: (x, w, t), {"reduction": "avg"}, ValueError, "reduction"),
    (lambda x, w, t: (x, w, t), {"cap": 0}, ValueError, "cap"),
    (lambda x, w, t: (x, w, t), {"scale": -7.5}, ValueError, "scale"),
    (lambda x, w, t: (x, w, t), {"ignore_index": -100.0}, TypeError, "ignore_index"),
    (lambda x, w, t: (x, w, t), {"grad_scale": 0.0}, ValueError, "grad_scale"),
])
def test_linear_softcap_ce_bad_arguments_raise_naming_them(make_args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kernels.linear_softcap_cross_entropy(*make_args(*_valid()), **kwargs)


def test_fp8_false_accepts_other_float_dtypes():
    x, weight, targets = _valid()
    loss = kernels.linear_softcap_cross_entropy(x.half(), weight.bfloat16(), targets, fp8=False)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- Triton kernels in the interpreter (or on a GPU) ----------------------------------------

def random_fp8(rows, cols, dtype, device, seed, pad=0):
    """fp8 [rows, cols + pad] of random normal values; the pad columns hold NaN (must be unread)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols + pad, generator=gen) * 4
    values[:, cols:] = float("nan")
    return values.to(dtype).to(device)


def gemm_oracle(a, b, k, alpha):
    return (a[:, :k].double() @ b[:, :k].double().T) * alpha


# ---- FP8 accumulation on Hopper: the error model the GPU tolerances come from ---------------
# Model (stated, not measured here): wgmma with fp8 operands keeps its running fp32
# accumulator with only 14 significant bits (e8m13: the DeepSeek-V3 technical report,
# arXiv:2412.19437 §3.3.2, measures "around 14 bits" on H800; third-party H100
# measurements describe it as e8m13 with truncation).  Each k32 wgmma adds its 32
# exact fp8 products to the accumulator and the sum is truncated (rounded toward zero) to
# 14 significant bits; the within-group alignment loss is folded into that truncation.
# One truncation loses less than one unit of the 14th bit: relative error < 2^-13.
#
# "Fast" accumulation (one wgmma chain over all of K, as use_fast_accum=True and Triton's
# default on sm_90) truncates ceil(K/32) times, each time relative to the running sum:
# up to ceil(K/32) * 2^-13 of the result (the errors are biased toward zero, so they add
# up rather than cancel): 24 * 2^-13 = 2.9e-3 at K = 768, but ~0.19 at K = 49152.
# "Promoted" accumulation (DeepGEMM's scheme, our dx/dW and use_fast_accum=False): each
# 128 of K is a fresh wgmma chain of 4 truncations, whose result (exact in fp32) is added
# to fp32 registers: a chunk carries at most 4 * 2^-13 of its partial sums, and the fp32
# sum of the K/128 chunks adds (K/128) * 2^-24.  Normwise, for the zero-mean data of the
# tests (chunk errors of random sign, partial sums no larger than the chunk in norm) this
# is PROMOTED_TOL = 4 * 2^-13 = 2^-11, independent of K; the emulation below measures
# ~1.1e-4 there, 4x inside it.
ACC_TRUNC = 2.0**-13      # one truncation of the 14-significant-bit accumulator
PROMOTE_K = fp8_head.PROMOTE_K  # 128: K per promoted chunk (csrc/fp8_head.cu kBK, Triton's max_num_imprecise_acc)
PROMOTED_TOL = PROMOTE_K // 32 * ACC_TRUNC
BF16_ROUND = 2.0**-9      # round-to-nearest to bf16's 8 significant bits, relative


def fast_acc_tol(k):
    """Worst-case relative error of one wgmma chain over k without promotion (model above)."""
    return -(-k // 32) * ACC_TRUNC


def truncate_to_14_bits(v):
    """v (float64) rounded toward zero to 14 significant bits: the modelled accumulator."""
    mantissa, exponent = torch.frexp(v)  # mantissa in [0.5, 1)
    return torch.ldexp(torch.trunc(mantissa * 2.0**14), exponent - 14)


def k32_group_sums(a, b, k):
    """[M, N, ceil(k/32)] exact (fp64) sums of the 32 fp8 products one wgmma k32 step adds."""
    a, b = a[:, :k].double(), b[:, :k].double()
    pad = -k % 32
    a, b = torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, pad))
    return torch.einsum("mjk,njk->mnj", a.view(a.shape[0], -1, 32), b.view(b.shape[0], -1, 32))


def emulate_wgmma_accumulation(groups, promote_k):
    """The model's result for groups = k32_group_sums(...): one chain over all of K if
    promote_k is None, else a fresh chain per promote_k of K added into fp32."""
    steps = groups.shape[-1]
    per_chunk = steps if promote_k is None else promote_k // 32
    total = torch.zeros(groups.shape[:2], dtype=torch.float32)
    chain = torch.zeros(groups.shape[:2], dtype=torch.float64)
    for j in range(steps):
        chain = truncate_to_14_bits(groups[..., j] if j % per_chunk == 0 else chain + groups[..., j])
        if (j + 1) % per_chunk == 0 or j == steps - 1:
            total = total + chain.float()  # the chain's 14 bits are exact in fp32
    return total.double()


def test_accumulator_truncation_model():
    one = torch.tensor([1 + 2**-13 + 2**-14, -(1 + 2**-13 + 2**-14), 3 * 2.0**-20, 0.0], dtype=torch.float64)
    assert truncate_to_14_bits(one).tolist() == [1 + 2**-13, -(1 + 2**-13), 3 * 2.0**-20, 0.0]
    v = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = truncate_to_14_bits(v)
    assert torch.equal(truncate_to_14_bits(t), t) and (t.abs() <= v.abs()).all()
    assert ((v - t).abs() < ACC_TRUNC * v.abs()).all()


@pytest.mark.parametrize("k", [768, 50304, 49152])  # the y, dx and dW reductions
@pytest.mark.parametrize("mean", [0.0, 0.5])  # zero-mean like the tests, and sums that grow
def test_promotion_every_128_bounds_the_emulated_fp8_accumulation(k, mean):
    gen = torch.Generator().manual_seed(k)
    a = ((torch.randn(16, k, generator=gen) + mean) * 4).to(E5M2)
    b = ((torch.randn(16, k, generator=gen) + mean) * 4).to(E4M3)
    groups = k32_group_sums(a, b, k)
    exact = groups.sum(-1)
    assert torch.allclose(exact, gemm_oracle(a, b, k, 1.0), rtol=1e-12, atol=0)
    promoted = emulate_wgmma_accumulation(groups, PROMOTE_K)
    fast = emulate_wgmma_accumulation(groups, None)
    # Element-wise, the derivation's form: < 2^-13 of every partial sum of a chain, plus
    # the fp32 additions of the chunks.
    chunks = -(-k // PROMOTE_K)
    partials = torch.stack([groups[..., c * 4:(c + 1) * 4].cumsum(-1).abs().sum(-1) for c in range(chunks)], -1)
    bound = ACC_TRUNC * partials.sum(-1) * (1 + 2**-10) + chunks * 2.0**-24 * (groups.abs().sum(-1))
    assert ((promoted - exact).abs() <= bound).all()
    # Normwise: inside the tolerance the GPU tests use, for every K.
    assert rel_err(promoted, exact) < PROMOTED_TOL
    # Without promotion: inside the fast-accumulation bound, and at the backward's K far
    # outside PROMOTED_TOL: why dx and dW promote (and the record runs them unfast).
    assert rel_err(fast, exact) < fast_acc_tol(k)
    if k > 10_000:
        assert rel_err(fast, exact) > 20 * PROMOTED_TOL


def gemm_tol(k, out_fp32, promote):
    """Relative error allowed against fp64 for a GEMM over k on this device: the CPU
    interpreter sums exact fp8 products in fp32 (1e-6: summation order only) and stores
    bf16 by truncation (BF16_STORE_TOL); a GPU accumulates as modelled above, then rounds
    to bf16 once (BF16_ROUND) unless the output is fp32."""
    if not HAS_GPU:
        return 1e-6 if out_fp32 else BF16_STORE_TOL
    acc = PROMOTED_TOL if promote else fast_acc_tol(k)
    return acc if out_fp32 else acc + BF16_ROUND


@pytest.mark.parametrize("m,n,k,pad", [(37, 45, 70, 0), (65, 33, 100, 13), (1, 1, 1, 3)])
@pytest.mark.parametrize("a_dtype,out_fp32,promote", [(E4M3, False, False), (E5M2, False, True), (E5M2, True, True),
                                                      (E5M2, True, False)])
def test_triton_fp8_gemm_matches_fp64(m, n, k, pad, a_dtype, out_fp32, promote, interpreter_device):
    a = random_fp8(m, k, a_dtype, interpreter_device, 1, pad)
    b = random_fp8(n, k, E4M3, interpreter_device, 2, pad)
    c = fp8_head._gemm_triton(a, b, k, 0.125, out_fp32, promote)
    assert c.shape == (m, n) and c.dtype == (torch.float32 if out_fp32 else torch.bfloat16)
    assert rel_err(c.cpu(), gemm_oracle(a.cpu(), b.cpu(), k, 0.125)) < gemm_tol(k, out_fp32, promote)


def ce_grad_oracle(logits, targets, row_loss, factor, cap, kind, scale, ignore_index, grad_scale):
    """The e5m2 gradient computed in torch, rounding like the kernels: g -> logits dtype,
    * grad_scale -> logits dtype -> e5m2."""
    z = logits.double()
    if kind == "tanh":
        s = cap * torch.tanh(z / cap)
        ds = 1 - (s / cap) ** 2
    else:
        s = cap * torch.sigmoid(z / scale)
        ds = s * (1 - s / cap) / scale
    n, v = z.shape
    kept = targets != ignore_index
    in_range = (targets >= 0) & (targets < v)
    lse = torch.logsumexp(s, dim=1)
    onehot = torch.zeros_like(z)
    onehot[in_range.nonzero()[:, 0], targets[in_range]] = 1.0
    f = factor.double().expand(n)
    f = torch.where(kept, torch.where(in_range, f, torch.nan), 0.0)
    g = ((torch.exp(s - lse[:, None]) - onehot) * ds * f[:, None]).to(logits.dtype)
    return g.mul(grad_scale).to(E5M2)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
@pytest.mark.parametrize("per_row", [False, True])
def test_triton_ce_grad_e5m2_matches_torch(kind, per_row, interpreter_device):
    n, v, cap, scale, ignore_index, grad_scale = 19, 75, 30.0, 7.5, -100, 2.0**12
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(n, v, generator=gen) * 4).half()  # fp16: the interpreter's bf16 is wrong
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[2] = ignore_index
    targets[5] = v + 3  # out of range: NaN row, never an address
    factor = torch.rand(n if per_row else 1, generator=gen) + 0.5
    s = reference.softcap_cross_entropy(logits.float(), targets, cap=cap, kind=kind, scale=scale,
                                        ignore_index=ignore_index, reduction="none")
    dev = interpreter_device
    g8, g8t = fp8_head._ce_grad_triton(logits.to(dev), targets.to(dev), s.to(dev), factor.to(dev), cap, kind,
                                       scale, ignore_index, grad_scale)
    expected = ce_grad_oracle(logits, targets, s, factor, cap, kind, scale, ignore_index, grad_scale).float()
    g8, g8t = g8.cpu().float(), g8t.cpu().float()
    assert torch.equal(g8.t(), g8t.nan_to_num(7.0).t().nan_to_num(7.0)) or torch.equal(
        g8.nan_to_num(7.0).t(), g8t.nan_to_num(7.0))
    assert g8[5].isnan().all() and (g8[2] == 0).all()
    keep = torch.ones(n, dtype=torch.bool)
    keep[5] = False
    # Same formula and rounding chain; exp/sigmoid differ from fp64 by a few fp32 ulps, which
    # may flip a rare e5m2 rounding (25 % on that element): 2 % in norm.
    assert rel_err(g8[keep], expected[keep]) < 2e-2
    assert (g8[keep] == expected[keep]).float().mean() > 0.98


def softcapped(z, cap, kind, scale):
    return cap * torch.tanh(z / cap) if kind == "tanh" else cap * torch.sigmoid(z / scale)


@pytest.mark.parametrize("kind,cap", [("sigmoid", 30.0), ("tanh", 15.0)])
@pytest.mark.parametrize("m,n,k,pad", [(37, 101, 72, 0), (65, 33, 100, 13)])
def test_triton_gemm_row_stats_match_fp64(kind, cap, m, n, k, pad, interpreter_device):
    a = random_fp8(m, k, E4M3, interpreter_device, 4, pad)
    b = random_fp8(n, k, E4M3, interpreter_device, 5, pad)
    y, stats = fp8_head._gemm_triton(a, b, k, 0.125, False, False, softcap=(cap, kind, 7.5))
    block_n = 32  # the CPU tile width of _gemm_triton
    assert stats.shape == (m, triton.cdiv(n, block_n)) and stats.dtype == torch.float32
    # Partials of the logits as stored (bf16), per tile of columns, against fp64: exp and the
    # 32-term fp32 sum are good to a few fp32 ulps (1e-6 seen); a capped term never
    # underflows (exp(-2 cap) >= 1e-26 is a normal fp32).
    e = torch.exp(softcapped(y.cpu().double(), cap, kind, 7.5) - cap)
    expected = torch.stack([e[:, j:j + block_n].sum(1) for j in range(0, n, block_n)], dim=1)
    assert rel_err(stats.cpu(), expected) < 1e-5
    assert (stats.cpu() > 0).all()


@pytest.mark.parametrize("kind,cap", [("sigmoid", 30.0), ("tanh", 15.0)])
def test_loss_from_row_stats_matches_the_softcap_ce_reference(kind, cap, interpreter_device):
    n, v, ignore_index = 41, 157, -100
    a = random_fp8(n, 48, E4M3, interpreter_device, 6, 0)
    b = random_fp8(v, 48, E4M3, interpreter_device, 7, 0)
    y, stats = fp8_head._gemm_triton(a, b, 48, 0.25, False, False, softcap=(cap, kind, 7.5))
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(8))
    targets[3], targets[7] = ignore_index, v  # ignored: 0; out of range: NaN, never an address
    row_loss = fp8_head._loss_from_row_stats(stats, y, targets.to(interpreter_device), cap, kind, 7.5,
                                             ignore_index).cpu()
    expected = reference.softcap_cross_entropy(y.cpu().double(), targets, cap=cap, kind=kind, scale=7.5,
                                               ignore_index=ignore_index, reduction="none")
    assert row_loss[3] == 0 and row_loss[7].isnan()
    keep = torch.ones(n, dtype=torch.bool)
    keep[7] = False
    # fp32 lse (sum of partials, log) against fp64 on the same bf16 logits: ulps of lse ~ 1e-6.
    assert rel_err(row_loss[keep], expected[keep]) < 1e-5


@pytest.mark.parametrize("kind,uses_the_loss_kernel", [("sigmoid", False), ("tanh", False), (None, True)])
def test_triton_fused_head_takes_its_loss_from_the_gemm_epilogue(kind, uses_the_loss_kernel, monkeypatch,
                                                                 interpreter_device):
    """With a capped kind the forward never reads y (no softcap CE pass); kind=None has no
    fixed reference and keeps the loss pass."""
    calls = []
    original = fp8_head.softcap_ce.softcap_cross_entropy
    monkeypatch.setattr(fp8_head.softcap_ce, "softcap_cross_entropy",
                        lambda *args, **kw: calls.append(1) or original(*args, **kw))
    x, weight, targets, _ = head_inputs(n=21, k=40, v=67)
    x, weight = x.to(interpreter_device).requires_grad_(), weight.to(interpreter_device).requires_grad_()
    with kernels.use_backend("triton"):
        loss = kernels.linear_softcap_cross_entropy(x, weight, targets.to(interpreter_device), kind=kind, cap=30.0)
        loss.backward()
    assert bool(calls) == uses_the_loss_kernel
    expected = reference.linear_softcap_cross_entropy(x.detach().cpu(), weight.detach().cpu(), targets, kind=kind,
                                                      cap=30.0)
    assert rel_err(loss.detach().cpu(), expected) < 1e-3  # bf16 logits, truncated in the interpreter
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()


def test_fake_impls_give_the_real_shapes(interpreter_device):
    x, weight, targets, _ = head_inputs()
    for backend in ("cuda", "triton"):
        with torch._subclasses.fake_tensor.FakeTensorMode():
            fx = torch.empty(37, 72, dtype=torch.bfloat16, device=interpreter_device)
            fw = torch.empty(101, 72, device=interpreter_device)
            ft = torch.empty(37, dtype=torch.int64, device=interpreter_device)
            y, x8t, w8t = torch.ops.kernels.fp8_linear_fwd(fx, fw, 2.0, 512.0, 2.0**19, True, backend)
            pad = 48 if backend == "cuda" else 37
            assert y.shape == (37, 101) and x8t.shape == (72, pad) and w8t.dtype == E4M3
            assert w8t.shape == (72, 112 if backend == "cuda" else 101)
            outs = torch.ops.kernels.fp8_head_ce_fwd(fx, fw, ft, 2.0, 512.0, 2.0**19, 30.0, "sigmoid", 7.5, -100,
                                                     "mean", True, backend)
            assert outs[0].shape == () and outs[2].shape == (37, 101) and outs[5].numel() == 0
            # V % 8 == 0: the cuda forward writes g8 [N, pad16(V)] and g8^T [V, pad16(N)], no logits.
            outs = torch.ops.kernels.fp8_head_ce_fwd(fx, torch.empty(104, 72, device=interpreter_device), ft, 2.0,
                                                     512.0, 2.0**19, 30.0, "sigmoid", 7.5, -100, "mean", True, backend)
            if backend == "cuda":
                assert outs[2].numel() == 0 and outs[5].shape == (37, 112) and outs[6].shape == (104, 48)
                assert outs[5].dtype == outs[6].dtype == E5M2
            else:
                assert outs[2].shape == (37, 104) and outs[5].numel() == 0
    if _backend.interpreter_enabled() or HAS_GPU:
        y, x8t, w8t = torch.ops.kernels.fp8_linear_fwd(x.to(interpreter_device), weight.to(interpreter_device),
                                                       2.0, 512.0, 2.0**19, True, "triton")
        assert x8t.shape == (72, 37) and w8t.shape == (72, 101)


@pytest.mark.parametrize("args,fused", [
    (("cuda", True, "mean", 30.0, "sigmoid", 50304), True),
    (("cuda", True, "sum", 15.0, "tanh", 8), True),
    (("cuda", True, "none", 30.0, "sigmoid", 50304), False),  # per-row upstream: the backward's pass
    (("cuda", False, "mean", 30.0, "sigmoid", 50304), False),  # no backward to follow
    (("triton", True, "mean", 30.0, "sigmoid", 50304), False),  # the GEMM epilogue's statistics
    (("cuda", True, "mean", 30.0, None, 50304), False),  # no fixed softmax reference
    (("cuda", True, "mean", 90.0, "sigmoid", 50304), False),
    (("cuda", True, "mean", 30.0, "sigmoid", 50303), False),  # rows not 16-byte aligned
    (("cuda", True, "mean", 30.0, "sigmoid", fp8_head.STAGED_MAX_COLS + 8), False),  # row past shared memory
])
def test_the_cuda_forward_writes_the_gradient_only_where_the_staged_kernel_applies(args, fused):
    assert fp8_head._grad_in_forward(*args) == fused


def test_the_cuda_loss_pass_e5m2_rounding_is_torchs_cast_for_every_fp16_value():
    """csrc/softcap_ce.cu rounds to e5m2 from fp16 bits: e5m2_of_f16 (integer RNE on the
    magnitude, overflow carrying into inf, NaN kept) where a pack reaches kE5M2Overflow, the
    hardware's saturating f16x2 -> e5m2x2 below it.  Both, written out here as that code
    does, against torch's cast over all 65536 fp16 bit patterns (GPU-free: the hardware
    conversion itself is checked by the GPU tests)."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    magnitude = bits & 0x7FFF
    ours = torch.where(magnitude > 0x7C00, 0x7F, (magnitude + 0x7F + ((magnitude >> 8) & 1)) >> 8)
    ours = ours | ((bits >> 8) & 0x80)
    values = bits.to(torch.int16).view(torch.float16)
    torchs = values.to(E5M2).view(torch.uint8).to(torch.int32)
    nan = values.isnan()
    assert torch.equal(ours[~nan], torchs[~nan])
    assert ours[nan].to(torch.uint8).view(E5M2).float().isnan().all()
    # Below the overflow threshold, a saturating conversion is the same cast: finite stays
    # finite and the largest finite e5m2 (57344) is reached only by rounding, not clamping.
    finite = values.float().abs() < 61440.0
    assert torch.isfinite(values[finite].to(E5M2).float()).all()
    assert torch.isinf(values[~finite & ~nan].to(E5M2).float()).all()


@pytest.mark.skipif(not (_backend.interpreter_enabled() or HAS_GPU), reason="needs the interpreter or a GPU")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_fused_head_scales_dx_and_dw_by_the_upstream_after_the_gemms(reduction, interpreter_device):
    x, weight, targets, _ = head_inputs(n=21, k=40, v=33)
    x, weight, targets = x.to(interpreter_device), weight.to(interpreter_device), targets.to(interpreter_device)
    # grad_scale 2**12: the upstream-1 gradient of a 20-row mean (or a sum) stays in e5m2's range.
    kwargs = dict(targets=targets, reduction=reduction, grad_scale=2.0**12, kind="tanh", cap=15.0)
    u = torch.tensor(0.37, device=interpreter_device)
    with kernels.use_backend("triton"):
        loss, dx, dw = forward_backward(kernels.linear_softcap_cross_entropy, [x, weight], u, **kwargs)
        _, dx_1, dw_1 = forward_backward(kernels.linear_softcap_cross_entropy, [x, weight], torch.ones_like(u),
                                         **kwargs)
    # The same e5m2 gradient and GEMMs, then one rounding of each product: dW (fp32) bitwise;
    # dx within one bf16 ulp (the interpreter's fp32 -> bf16 store truncates, DESIGN.md §4).
    assert torch.equal(dw, dw_1 * u)
    assert ((dx.float() - (dx_1.float() * u)).abs() <= (dx_1.float() * u).abs() * 2.0**-7).all()
    assert not torch.equal(dx, dx_1) and (dx != 0).any()
    expected = forward_backward(reference.linear_softcap_cross_entropy, [x.cpu(), weight.cpu()], u.cpu(),
                                **{**kwargs, "targets": targets.cpu()})
    assert rel_err(loss.cpu(), expected[0]) < 1e-3  # bf16 logits truncated in the interpreter
    # e5m2 (2 mantissa bits) after bf16 logits that differ by an ulp: rare rounding flips.
    assert rel_err(dx.cpu(), expected[1]) < 5e-2 and rel_err(dw.cpu(), expected[2]) < 5e-2


@pytest.mark.skipif(not (_backend.interpreter_enabled() or HAS_GPU), reason="needs the interpreter or a GPU")
def test_triton_backend_compiles_with_fullgraph(interpreter_device):
    x, weight, targets, _ = head_inputs(n=9, k=40, v=33)
    x, weight, targets = x.to(interpreter_device), weight.to(interpreter_device), targets.to(interpreter_device)

    # The e5m2 gradient is quantized at upstream 1 (the upstream multiplies dx and dW after):
    # a mean over 9 rows needs a smaller grad_scale than the record's 2**19 to stay finite.
    def loss_fn(a, b):
        return kernels.linear_softcap_cross_entropy(a, b, targets, grad_scale=2.0**12) * 1e-3

    with kernels.use_backend("triton"):
        compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
        one = torch.tensor(1.0, device=interpreter_device)
        assert_identical(forward_backward(compiled, [x, weight], one), forward_backward(loss_fn, [x, weight], one))


# ---- the CUDA extension: built for sm_90a, QGMMA in the GEMM, no spills --------------------

needs_extension = pytest.mark.skipif(EXTENSION is None, reason=f"kernels._C not built: {_backend.extension_error()}")


@needs_extension
@pytest.mark.parametrize("name,schema", [
    ("fp8_cast", "fp8_cast(Tensor src, float scale, bool e5m2, bool transpose) -> (Tensor, Tensor)"),
    ("fp8_gemm", "fp8_gemm(Tensor a, Tensor b, int k, float alpha, bool out_fp32, bool promote) -> Tensor"),
    ("fp8_ce_grad_e5m2", "fp8_ce_grad_e5m2(Tensor logits, Tensor targets, Tensor row_loss, Tensor row_factor, "
                         "float cap, int kind, float scale, int ignore_index, float grad_scale) -> (Tensor, Tensor)"),
    ("softcap_ce_forward_e5m2", "softcap_ce_forward_e5m2(Tensor logits, Tensor targets, Tensor factor, float cap, "
                                "int kind, float scale, int ignore_index, float grad_scale) -> (Tensor, Tensor)"),
    ("fp8_transpose", "fp8_transpose(Tensor q, int cols) -> Tensor"),
])
def test_extension_ops_are_registered(name, schema):
    assert str(getattr(torch.ops.speedrun_cuda, name).default._schema) == f"speedrun_cuda::{schema}"


@needs_extension
def test_extension_ops_refuse_cpu_tensors_before_launch():
    a = torch.zeros(16, 32, dtype=E4M3)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.ops.speedrun_cuda.fp8_gemm(a, a, 32, 1.0, False, True)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.ops.speedrun_cuda.fp8_cast(torch.zeros(4, 4), 1.0, False, True)


def _sass_by_function():
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("cuobjdump not shipped with this triton")
    text = subprocess.run([CUOBJDUMP, "-sass", EXTENSION.__file__], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", text, flags=re.S))


@needs_extension
def test_gemm_sass_has_qgmma_for_each_operand_type_and_no_local_memory():
    sass = {name: body for name, body in _sass_by_function().items() if "fp8_gemm_kernel" in name}
    assert len(sass) == 8, sorted(sass)  # (A e4m3 | e5m2) x (bf16 | fp32 out) x (fast | promoted)
    for name, body in sass.items():
        a_type = "E5M2" if "ILb1E" in name else "E4M3"
        n = 128 if "Lb1EEEv" in name else 256  # promoted: 128 x 128 tiles (csrc/fp8_head.cu)
        assert re.search(rf"QGMMA\.64x{n}x32\.F32\.{a_type}\.E4M3", body), name
        assert "UTMALDG" in body and "SETMAXREG" in body, name  # TMA loads, register handoff
        # y's instances (fast, bf16 out) store through shared memory by TMA (csrc header).
        assert ("UTMASTG" in body) == (n == 256 and "13__nv_bfloat16" in name), name
        assert not re.search(r"\b(LDL|STL)\b", body), f"local memory in {name}"


@needs_extension
def test_fp8_head_kernels_have_no_spills():
    text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", EXTENSION.__file__], capture_output=True,
                          text=True, check=True).stdout if os.path.exists(CUOBJDUMP) else pytest.skip("no cuobjdump")
    usage = {name: line for name, line in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text)
             if "fp8" in name or "ce_grad_e5m2" in name}
    assert len(usage) == 8 + 6 + 1 + 1  # GEMMs, casts, ce_grad_e5m2, transpose_bytes (in fp8_head.cu)
    spilled = {name: line for name, line in usage.items() if "STACK:0" not in line or "LOCAL:0" not in line}
    assert not spilled, spilled


# ---- GPU: the CUDA kernels against torch._scaled_mm and the reference --------------------------

def _scaled_mm(a, b, alpha, out_dtype, fast_accum):
    one = torch.ones((), device=a.device)
    return torch._scaled_mm(a, b.t(), scale_a=one * alpha, scale_b=one, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("a_dtype,out_dtype,promote", [(E4M3, torch.bfloat16, False), (E4M3, torch.bfloat16, True),
                                                       (E5M2, torch.bfloat16, True), (E5M2, torch.float32, True),
                                                       (E5M2, torch.float32, False)])
@pytest.mark.parametrize("m,n,k", [(256, 512, 256), (4096, 2048, 768), (1024, 768, 8192)])
def test_cuda_gemm_matches_scaled_mm(a_dtype, out_dtype, promote, m, n, k):
    # Aligned shapes (cuBLASLt's rules), several k-blocks and more tiles than SMs (persistent
    # loop, barrier phases across tiles).  Any swizzle/descriptor/fragment-layout error
    # scrambles whole 8x16 blocks and shows up as O(1) relative error.
    a = random_fp8(m, k, a_dtype, "cuda", 1)
    b = random_fp8(n, k, E4M3, "cuda", 2)
    fp32 = out_dtype == torch.float32
    ours = torch.ops.speedrun_cuda.fp8_gemm(a, b, k, 0.25, fp32, promote)
    # Each within its accumulation's bound of fp64 (the model above): ours, and cuBLASLt
    # in the same mode (use_fast_accum = not promote), so at most the sum apart.
    tol = gemm_tol(k, fp32, promote)
    assert rel_err(ours, gemm_oracle(a, b, k, 0.25)) < tol
    assert rel_err(ours, _scaled_mm(a, b, 0.25, out_dtype, fast_accum=not promote)) < 2 * tol


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("m,n,k,pad", [(1, 1, 1, 15), (37, 300, 70, 10), (4133, 2053, 777, 11), (129, 257, 129, 0),
                                       (6500, 768, 2100, 5)])
@pytest.mark.parametrize("a_dtype,out_fp32,promote", [(E4M3, False, False), (E4M3, False, True), (E5M2, True, True)])
def test_cuda_gemm_ragged_shapes_match_fp64(m, n, k, pad, a_dtype, out_fp32, promote):
    # Ragged M, N, K (TMA zero fill, predicated stores), pads full of NaN that must stay unread.
    # Promoted, the tiles go to 2-CTA clusters on row-tile pairs (csrc/fp8_head.cu,
    # "Clusters"): odd row-tile counts (1, 1, 33 and 51 here) leave a phantom tile in the
    # last pair; 300, 2053 and 257 put the second B slice of the last column tile past N;
    # 4133 x 2053 and 6500 x 768 (dx-like N, 17 k-blocks) have more cluster tiles than
    # clusters, so phantom tiles come after real ones in the persistent loop.
    k_row = (k + pad + 15) // 16 * 16
    a = random_fp8(m, k_row - k, a_dtype, "cuda", 1, 0)
    a = torch.cat([random_fp8(m, k, a_dtype, "cuda", 3), a], 1)[:, :k_row].contiguous()
    a[:, k:] = float("nan")
    b = torch.cat([random_fp8(n, k, E4M3, "cuda", 4), torch.full((n, k_row - k), float("nan"), device="cuda").to(E4M3)],
                  1).contiguous()
    c = torch.ops.speedrun_cuda.fp8_gemm(a, b, k, 0.5, out_fp32, promote)
    assert c.shape == (m, n)
    assert rel_err(c, gemm_oracle(a, b, k, 0.5)) < gemm_tol(k, out_fp32, promote)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("n", [8200, 8195])  # N % 8 == 0: TMA-store epilogue; else the register stores
def test_cuda_gemm_both_y_epilogues_match_fp64(n):
    # Fast bf16: more tiles than SMs, so every warpgroup reuses its staging area while the
    # previous tile's TMA store may still be reading it; ragged M and the half-empty last
    # column tile (boxes past N are clipped by TMA).
    m, k = 4133, 768
    a = random_fp8(m, k, E4M3, "cuda", 5)
    b = random_fp8(n, k, E4M3, "cuda", 6)
    c = torch.ops.speedrun_cuda.fp8_gemm(a, b, k, 0.5, False, False)
    assert rel_err(c, gemm_oracle(a, b, k, 0.5)) < gemm_tol(k, False, False)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("src_dtype,scale,e5m2", [(torch.bfloat16, 2.0, False), (torch.float32, 2.0**9, False),
                                                  (torch.bfloat16, 2.0**19 * 3, True)])
def test_cuda_cast_and_transpose_match_torch(src_dtype, scale, e5m2):
    src = (torch.randn(1000, 333, device="cuda") * 1e-3 if e5m2 else torch.randn(1000, 333, device="cuda")).to(src_dtype)
    q, qt = torch.ops.speedrun_cuda.fp8_cast(src, scale, e5m2, True)
    expected = src.mul(scale).to(E5M2 if e5m2 else E4M3)
    assert q.shape == (1000, 336) and qt.shape == (333, 1008)
    assert torch.equal(q[:, :333].view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(qt[:, :1000].view(torch.uint8), expected.t().contiguous().view(torch.uint8))


@pytest.mark.gpu
@needs_extension
def test_cuda_ce_grad_matches_the_triton_kernel():
    n, v = 300, 5003
    logits = (torch.randn(n, v, device="cuda") * 4).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[0], targets[1] = -100, v
    row_loss = reference.softcap_cross_entropy(logits.float(), targets, reduction="none")
    factor = torch.rand(n, device="cuda") * 1e-4
    args = (logits, targets, row_loss, factor, 30.0, "sigmoid", 7.5, -100, 2.0**19)
    g8, g8t = fp8_head._ce_grad_cuda(*args)
    t8, t8t = fp8_head._ce_grad_triton(*args)
    assert g8.shape == (n, 5008) and g8t.shape == (v, 304)
    ours, theirs = g8[:, :v].float(), t8.float()
    assert torch.equal(g8t[:, :n].float().nan_to_num(9.0), ours.t().nan_to_num(9.0))
    keep = torch.ones(n, dtype=torch.bool, device="cuda")
    keep[1] = False
    assert ours[1].isnan().all() and (ours[0] == 0).all()
    # Same math; __expf vs Triton's exp may flip a rare e5m2 rounding.
    assert (ours[keep] == theirs[keep]).float().mean() > 0.995


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("n,k,v", [(2053, 768, 5003), (512, 256, 50304)])
def test_cuda_fp8_linear_matches_reference(n, k, v):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(v, k, device="cuda", generator=gen) * 0.05
    upstream = (torch.randn(n, v, device="cuda", generator=gen) * 1e-4).bfloat16()
    expected = forward_backward(reference.fp8_linear, [x, weight], upstream)
    with kernels.use_backend("cuda"):
        result = forward_backward(kernels.fp8_linear, [x, weight], upstream)
    # The reference accumulates in fp32 and rounds y and dx to bf16 once (BF16_ROUND from
    # fp64); ours: y unpromoted over K (unless PROMOTE_Y), dx and dW promoted (gemm_tol).
    tols = {"y": gemm_tol(k, False, fp8_head.PROMOTE_Y) + BF16_ROUND, "dx": gemm_tol(v, False, True) + BF16_ROUND,
            "dW": gemm_tol(n, True, True)}
    for name, a, e in zip(("y", "dx", "dW"), result, expected):
        assert a.dtype == e.dtype and rel_err(a, e) < tols[name], name


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("kind,cap", [("sigmoid", 30.0), ("tanh", 15.0)])
@pytest.mark.parametrize("n,v", [(300, 5000), (129, 50304), (64, 16)])
def test_cuda_loss_pass_writes_the_e5m2_gradient_of_the_backward_kernels(kind, cap, n, v):
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, v, device="cuda", generator=gen) * 4).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[0], targets[1] = -100, v
    factor = (1.0 / (targets != -100).sum(dtype=torch.float32)).reshape(1)
    row_loss, g8 = torch.ops.speedrun_cuda.softcap_ce_forward_e5m2(logits, targets, factor, cap,
                                                                   {"tanh": 1, "sigmoid": 2}[kind], 7.5, -100, 2.0**19)
    expected_loss = reference.softcap_cross_entropy(logits.float(), targets, cap=cap, kind=kind, reduction="none")
    keep = torch.ones(n, dtype=torch.bool, device="cuda")
    keep[1] = False
    assert row_loss[1].isnan() and row_loss[0] == 0
    assert rel_err(row_loss[keep], expected_loss[keep]) < 1e-5  # hardware ex2/rcp: ~2^-22 per op
    assert g8.shape == (n, (v + 15) // 16 * 16) and g8.dtype == E5M2
    ours = g8[:, :v].float()
    assert ours[1].isnan().all() and (ours[0] == 0).all()
    # The backward's kernels (Triton here: same chain, exact exp) from the same logits and loss.
    theirs, _ = fp8_head._ce_grad_triton(logits, targets, expected_loss, factor, cap, kind, 7.5, -100, 2.0**19)
    theirs = theirs.float()
    # The staged kernel's g is within 2.3e-4 relative of the exact one (its fixed-point a):
    # a twentieth of a bf16 ulp, so after bf16 and e5m2 rounding nearly every byte agrees,
    # and one that differs is one e5m2 step (25 %) apart.
    agree = (ours[keep] == theirs[keep]).float().mean()
    assert agree > 0.99, agree
    assert rel_err(ours[keep], theirs[keep]) < 2e-2
    g8t = torch.ops.speedrun_cuda.fp8_transpose(g8, v)
    assert g8t.shape == (v, (n + 15) // 16 * 16)
    assert torch.equal(g8t[:, :n].view(torch.uint8), g8[:, :v].view(torch.uint8).t())


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 300), (4133, 2053), (64, 64), (129, 16)])
def test_cuda_byte_transpose_matches_torch(rows, cols):
    q = torch.randint(0, 256, (rows, (cols + 15) // 16 * 16), device="cuda", dtype=torch.uint8).view(E5M2)
    qt = torch.ops.speedrun_cuda.fp8_transpose(q, cols)
    assert qt.shape == (cols, (rows + 15) // 16 * 16) and qt.dtype == E5M2
    assert torch.equal(qt[:, :rows].view(torch.uint8), q[:, :cols].view(torch.uint8).t())


@pytest.mark.gpu
@needs_extension
def test_cuda_loss_pass_refuses_what_the_staged_kernel_cannot_hold():
    logits = torch.zeros(4, 50303, device="cuda", dtype=torch.bfloat16)
    targets = torch.zeros(4, device="cuda", dtype=torch.long)
    one = torch.ones(1, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.speedrun_cuda.softcap_ce_forward_e5m2(logits, targets, one, 30.0, 2, 7.5, -100, 2.0**19)
    with pytest.raises(RuntimeError, match="needs kind"):
        torch.ops.speedrun_cuda.softcap_ce_forward_e5m2(logits[:, :64], targets, one, 30.0, 0, 7.5, -100, 2.0**19)
    wide = torch.zeros(2, 2 * fp8_head.STAGED_MAX_COLS, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="shared memory"):
        torch.ops.speedrun_cuda.softcap_ce_forward_e5m2(wide, targets[:2], one, 30.0, 2, 7.5, -100, 2.0**19)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_fused_head_matches_reference(reduction):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, k, v = 1031, 768, 50304
    x = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(v, k, device="cuda", generator=gen) * 0.05
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::7] = -100
    upstream = torch.rand((n,) if reduction == "none" else (), device="cuda", generator=gen) + 0.5
    # A sum's upstream-1 gradient (up to cap/scale/4 = 1 per logit) needs a smaller grad_scale
    # than the mean's (1/count) to stay inside e5m2's range.
    kwargs = dict(targets=targets, reduction=reduction, grad_scale=2.0**12 if reduction == "sum" else 2.0**19)
    expected = forward_backward(reference.linear_softcap_cross_entropy, [x, weight], upstream, **kwargs)
    with kernels.use_backend("cuda"):
        result = forward_backward(kernels.linear_softcap_cross_entropy, [x, weight], upstream, **kwargs)
        # The scalar reductions take the loss pass that writes g8 (V = 50304 fits the staged kernel).
        assert fp8_head._grad_in_forward("cuda", True, reduction, 30.0, "sigmoid", v) == (reduction != "none")
        with kernels.use_backend("triton"):
            triton_result = forward_backward(kernels.linear_softcap_cross_entropy, [x, weight], upstream, **kwargs)
    # The loss: the staged kernel's hardware ex2/rcp (~2^-22 per op) against fp32 library math.
    assert rel_err(result[0], expected[0]) < 1e-5
    # e5m2 gradients: rare rounding flips from a different rounding order of the factor (and
    # the staged kernel's fixed-point a, 2.3e-4 relative in g, for the scalar reductions).
    for ours, other in ((result, expected), (result, triton_result)):
        assert rel_err(ours[1], other[1]) < 2e-2 and rel_err(ours[2], other[2]) < 2e-2


# ---- the bench's baselines (bench/bench_fp8_head.py), on CPU tensors ------------------------

@pytest.mark.skipif(not _backend.interpreter_enabled(), reason="runs the Triton GEMM in the interpreter")
@pytest.mark.parametrize("promote_y", [False, True])
def test_bench_compares_each_gemm_with_scaled_mm_in_ours_and_the_records_mode(monkeypatch, promote_y):
    from bench import bench_fp8_head as bench, harness
    monkeypatch.setattr(bench, "V", 40)
    monkeypatch.setattr(bench, "K", 24)
    monkeypatch.setattr(fp8_head, "PROMOTE_Y", promote_y)
    entries, timed = [], []

    class Run:
        ceilings = {}

        def add(self, entry):
            entries.append(entry)

    def timer(fn):
        timed.append(fn)
        return 1.0 + len(timed)  # a distinct made-up time per timing

    bench.run_gemms(Run(), 24, ["ours-triton", "scaled_mm-same", "scaled_mm-record"], timer, "cpu")
    by = {(e.params["gemm"], e.impl): e for e in entries}
    assert len(by) == 9 and all(e.error is None for e in entries)
    for gemm in ("y", "dx", "dW"):
        ours_mode = "promoted" if gemm != "y" or promote_y else "fast"
        record_mode = "fast" if gemm == "y" else "promoted"
        assert by[gemm, "ours-triton"].params["accumulation"] == ours_mode
        assert by[gemm, "scaled_mm-same"].params["accumulation"] == ours_mode
        assert by[gemm, "scaled_mm-record"].params["accumulation"] == record_mode
        assert by[gemm, "scaled_mm-same"].ceiling == (harness.FP8_MATMUL_PROMOTED if ours_mode == "promoted"
                                                      else harness.FP8_MATMUL)
        # One _scaled_mm timing when the modes agree, shared by both rows; two otherwise.
        same = by[gemm, "scaled_mm-same"].ms == by[gemm, "scaled_mm-record"].ms
        assert same == (ours_mode == record_mode)
        assert by[gemm, "scaled_mm-record"].extra == ({"same_call_as_the_other_scaled_mm": True} if same else {})
        assert all(by[gemm, impl].checks["ok"] for impl in ("ours-triton", "scaled_mm-same", "scaled_mm-record"))
    assert len(timed) == 3 * 2 + (1 if promote_y else 0)
