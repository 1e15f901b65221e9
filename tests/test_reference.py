"""The spec itself: kernels/reference.py against float64 and against independent oracles.

The float64 oracle is the same reference function run on the low-precision inputs upcast
to float64, so a comparison measures only the arithmetic error of the low-precision run.
Errors are relative in the Frobenius norm, ||out - ref|| / ||ref||, and tolerances are
stated in units of the unit roundoff u of the dtype (bf16 2**-8, fp16 2**-11): one
rounding of every element gives about 0.6 u in that norm, so 2 u means "a rounding or
two", and larger factors are explained where they are used.  Shapes are deliberately not
multiples of 16/64/128.  Seeds are fixed so a failure reproduces.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from tests.helpers import forward_backward, rel_err

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
NS5 = (3.4445, -4.7750, 2.0315)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


def float64_oracle(fn, inputs, upstream, **kwargs):
    return forward_backward(fn, [t.double() for t in inputs], upstream.double(), **kwargs)


# ---- softcap cross-entropy -----------------------------------------------------------
# Loss: computed in fp32 (the half inputs are exact in fp32), so it agrees with fp64 to a
# few fp32 ulps of logsumexp: 1e-5.  Gradient: fp32, rounded once to the logits' dtype:
# 2 u for half types; for fp32 logits, a few fp32 ulps: 1e-6.

CE_GRAD_TOL = {torch.bfloat16: 2 * U[torch.bfloat16], torch.float16: 2 * U[torch.float16],
               torch.float32: 1e-6}


def ce_inputs(n, v, dtype, *, seed, n_ignored=2):
    gen = generator(seed)
    logits = randn(n, v, gen=gen, dtype=dtype, std=4.0)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[:n_ignored]] = -100
    return logits, targets


def ce(targets, **kwargs):
    return lambda logits: reference.softcap_cross_entropy(logits, targets, **kwargs)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_softcap_ce_matches_float64(kind, dtype):
    logits, targets = ce_inputs(37, 1001, dtype, seed=1)
    one = torch.tensor(1.0)
    loss, grad = forward_backward(ce(targets, kind=kind), [logits], one)
    loss64, grad64 = float64_oracle(ce(targets, kind=kind), [logits], one)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(loss, loss64) < 1e-5
    assert rel_err(grad, grad64) < CE_GRAD_TOL[dtype]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softcap_ce_kind_none_is_plain_cross_entropy(reduction):
    logits, targets = ce_inputs(29, 203, torch.float32, seed=2, n_ignored=3)
    upstream = torch.randn(29, generator=generator(3)) if reduction == "none" else torch.tensor(0.7)
    loss, grad = forward_backward(ce(targets, kind=None, reduction=reduction), [logits], upstream)
    expected, expected_grad = forward_backward(
        lambda z: F.cross_entropy(z, targets, ignore_index=-100, reduction=reduction), [logits], upstream)
    assert rel_err(loss, expected) < 1e-6
    assert rel_err(grad, expected_grad) < 1e-6


def test_softcap_ce_reductions_agree_and_int32_targets_are_the_same():
    logits, targets = ce_inputs(23, 77, torch.float32, seed=4, n_ignored=5)
    rows = reference.softcap_cross_entropy(logits, targets, reduction="none")
    total = reference.softcap_cross_entropy(logits, targets, reduction="sum")
    mean = reference.softcap_cross_entropy(logits, targets)
    kept = targets != -100
    assert rows.shape == (23,) and (rows[~kept] == 0).all()
    assert math.isclose(total.item(), rows.sum().item(), rel_tol=1e-6)
    assert math.isclose(mean.item(), total.item() / kept.sum().item(), rel_tol=1e-6)
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(reference.softcap_cross_entropy(logits, targets.int(), reduction=reduction),
                           reference.softcap_cross_entropy(logits, targets, reduction=reduction))


def test_softcap_ce_ignored_rows_have_exactly_zero_gradient():
    logits, targets = ce_inputs(16, 301, torch.bfloat16, seed=5, n_ignored=6)
    _, grad = forward_backward(ce(targets), [logits], torch.tensor(1.0))
    ignored = targets == -100
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any(dim=1).all()


def test_softcap_ce_custom_ignore_index():
    logits, _ = ce_inputs(8, 40, torch.float32, seed=6)
    targets = torch.tensor([10, 7, 11, 12, 7, 13, 14, 15])
    rows = reference.softcap_cross_entropy(logits, targets, ignore_index=7, reduction="none")
    assert rows[1] == 0 and rows[4] == 0 and (rows[[0, 2, 3, 5, 6, 7]] > 0).all()


def test_softcap_ce_all_ignored_mean_is_nan_with_zero_gradient():
    logits, _ = ce_inputs(4, 50, torch.float32, seed=7)
    targets = torch.full((4,), -100)
    loss, grad = forward_backward(ce(targets), [logits], torch.tensor(1.0))
    assert math.isnan(loss.item())
    assert (grad == 0).all()


@pytest.mark.parametrize("bad_target", [-1, 50, 10**12])
def test_softcap_ce_out_of_range_target_gives_nan_row_without_indexing(bad_target):
    logits, targets = ce_inputs(6, 50, torch.float32, seed=8, n_ignored=0)
    targets[2] = bad_target
    rows, grad = forward_backward(ce(targets, reduction="none"), [logits], torch.ones(6))
    others = torch.arange(6) != 2
    assert math.isnan(rows[2].item()) and torch.isnan(grad[2]).all()
    assert torch.isfinite(rows[others]).all() and torch.isfinite(grad[others]).all()
    assert math.isnan(reference.softcap_cross_entropy(logits, targets).item())


# ---- FP8 head --------------------------------------------------------------------------
# The hand computation quantizes with its own round-to-nearest-even onto the fp8 grid
# (not torch's casts), multiplies in float64 and scales the way torch._scaled_mm does:
# out = (a8 @ b8) * scale_a * scale_b with scale = 1/(quantization scale).  fp8 products
# are exact and sums of a few hundred of them are exact or nearly so in fp32, so the
# reference agrees with it up to the final rounding to bf16 (1e-3 covers an ulp flip).

E4M3 = (3, -6)   # mantissa bits, smallest normal exponent of float8_e4m3fn
E5M2 = (2, -14)  # ... of float8_e5m2
X_SCALE, W_SCALE, GRAD_SCALE = 2.0, 2.0**9, 2.0**19


def quantize(values, fmt):
    """Round-to-nearest-even of in-range values onto an fp8 grid, computed in float64."""
    mantissa_bits, min_exponent = fmt
    v = values.double()
    _, exponent = torch.frexp(v)  # v = m * 2**exponent with 0.5 <= |m| < 1
    step = torch.pow(2.0, (exponent - 1).clamp_min(min_exponent) - mantissa_bits)
    return torch.round(v / step) * step  # torch.round is half-to-even


def head_inputs(n, k, v, w_dtype, *, seed):
    """x, weight, upstream gradient in the record's ranges, spanning several binades."""
    gen = generator(seed)
    spread = torch.pow(2.0, torch.randint(-9, 3, (n, k), generator=gen).double())
    x = (randn(n, k, gen=gen) * spread).clamp(-200, 200).bfloat16()  # |x * 2| < 448: in range
    weight = randn(v, k, gen=gen, std=0.05).to(w_dtype)
    upstream = randn(n, v, gen=gen, dtype=torch.bfloat16, std=1e-4)
    return x, weight, upstream


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_fp8_quantizer_of_the_test_agrees_with_torch_casts(w_dtype):
    x, weight, upstream = head_inputs(37, 75, 101, w_dtype, seed=9)
    assert torch.equal(x.mul(X_SCALE).to(torch.float8_e4m3fn).double(),
                       quantize(x.double() * X_SCALE, E4M3))
    assert torch.equal(weight.mul(W_SCALE).to(torch.float8_e4m3fn).double(),
                       quantize(weight.mul(W_SCALE).double(), E4M3))
    assert torch.equal(upstream.mul(GRAD_SCALE).to(torch.float8_e5m2).double(),
                       quantize(upstream.double() * GRAD_SCALE, E5M2))


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_forward_is_the_scaled_mm_computation(w_dtype):
    x, weight, _ = head_inputs(37, 75, 101, w_dtype, seed=10)
    x8 = quantize(x.double() * X_SCALE, E4M3)
    w8 = quantize(weight.mul(W_SCALE).double(), E4M3)
    expected = ((x8 @ w8.T) * (1 / X_SCALE) * (1 / W_SCALE)).bfloat16()
    y = reference.fp8_linear(x, weight)
    assert y.dtype == torch.bfloat16 and y.shape == (37, 101)
    assert rel_err(y, expected) < 1e-3


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_backward_quantizes_the_gradient_to_e5m2(w_dtype):
    x, weight, upstream = head_inputs(37, 75, 101, w_dtype, seed=11)
    _, dx, dw = forward_backward(reference.fp8_linear, [x, weight], upstream)
    x8 = quantize(x.double() * X_SCALE, E4M3)
    w8 = quantize(weight.mul(W_SCALE).double(), E4M3)
    g8 = quantize(upstream.double() * GRAD_SCALE, E5M2)
    expected_dx = ((g8 @ w8) / (GRAD_SCALE * W_SCALE)).bfloat16()
    expected_dw = (g8.T @ x8) / (GRAD_SCALE * X_SCALE)
    assert dx.dtype == torch.bfloat16 and dw.dtype == w_dtype
    assert rel_err(dx, expected_dx) < 1e-3
    # dW accumulates in fp32 (1e-6); a bf16 weight adds one rounding (2 u).
    assert rel_err(dw, expected_dw) < (1e-6 if w_dtype == torch.float32 else 2 * U[torch.bfloat16])
    # Without the e5m2 step the gradient would be measurably different: the test can tell.
    unquantized_dw = (upstream.double().T @ x8) / X_SCALE
    assert rel_err(dw, unquantized_dw) > 10 * rel_err(dw, expected_dw)


def test_fp8_linear_is_close_to_the_exact_product():
    # Sanity against the unquantized float64 product: e4m3 keeps 4 significant bits
    # (u = 2**-4) on both operands, about 0.04 relative error in practice -> 0.08;
    # the gradients add e5m2 (u = 2**-3), about 0.06 -> 0.12.
    gen = generator(12)
    x = randn(37, 75, gen=gen, dtype=torch.bfloat16)
    weight = randn(101, 75, gen=gen, std=0.05)
    upstream = randn(37, 101, gen=gen, dtype=torch.bfloat16, std=1e-4)
    y, dx, dw = forward_backward(reference.fp8_linear, [x, weight], upstream)
    y64, dx64, dw64 = float64_oracle(lambda a, b: a @ b.T, [x, weight], upstream)
    assert rel_err(y, y64) < 0.08
    assert rel_err(dx, dx64) < 0.12 and rel_err(dw, dw64) < 0.12


def test_fp8_linear_out_of_range_follows_the_casts():
    # The record does not clamp.  On the CPU e4m3fn casts saturate at +-448 (inf too),
    # so a huge x gives a finite, saturated product; e5m2 overflows to inf, so a huge
    # gradient gives inf in dx and dW.  Either way: no error, no garbage elsewhere.
    x = torch.ones(3, 5, dtype=torch.bfloat16)
    x[1, 2] = 1e6
    weight = torch.full((4, 5), 2.0**-9)
    upstream = torch.full((3, 4), 1e-6, dtype=torch.bfloat16)
    upstream[2, 0] = 1.0  # * 2**19 > 57344, the largest e5m2
    y, dx, dw = forward_backward(reference.fp8_linear, [x, weight], upstream)
    assert torch.equal(y[1], torch.full((4,), (4 * 2.0 + 448.0) / 1024, dtype=torch.bfloat16))
    assert torch.equal(y[0], torch.full((4,), 5 * 2.0 / 1024, dtype=torch.bfloat16))
    assert torch.isinf(dx[2]).all() and torch.isfinite(dx[:2]).all()
    assert torch.isinf(dw[0]).all() and torch.isfinite(dw[1:]).all()


def test_linear_softcap_ce_with_fp8_is_the_composition_for_reduction_none():
    x, weight, _ = head_inputs(21, 64, 93, torch.float32, seed=14)
    targets = torch.randint(0, 93, (21,), generator=generator(15))
    targets[3] = -100
    # Per-row upstream gradients go into the e5m2 gradient, as plain autograd: sized down so
    # that grad * 2**19 stays inside e5m2's range (57344).
    upstream = torch.randn(21, generator=generator(16)) * 1e-4

    def composed(a, b):
        return reference.softcap_cross_entropy(reference.fp8_linear(a, b), targets, reduction="none")

    loss, *grads = forward_backward(reference.linear_softcap_cross_entropy, [x, weight], upstream,
                                   targets=targets, reduction="none")
    expected, *expected_grads = forward_backward(composed, [x, weight], upstream)
    assert torch.equal(loss, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    assert all(torch.isfinite(g).all() and (g != 0).any() for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_linear_softcap_ce_with_fp8_scalar_loss_applies_the_upstream_after_the_gemms(reduction, w_dtype):
    x, weight, _ = head_inputs(21, 64, 93, w_dtype, seed=14)
    targets = torch.randint(0, 93, (21,), generator=generator(15))
    targets[3] = -100
    # e5m2 quantizes the upstream-1 gradient (<= 1/20 per logit for the mean): 2**12 keeps it
    # inside e5m2's range, as 2**19 does for the record's mean over ~50k tokens.
    kwargs = dict(targets=targets, reduction=reduction, grad_scale=2.0**12)
    u = torch.tensor(0.37)
    loss, *grads = forward_backward(reference.linear_softcap_cross_entropy, [x, weight], u, **kwargs)
    loss_1, *grads_1 = forward_backward(reference.linear_softcap_cross_entropy, [x, weight], torch.tensor(1.0),
                                        **kwargs)
    assert torch.equal(loss, loss_1)
    # The contract: the gradients at upstream 1, times u, rounded once to their dtype ...
    for g, g1 in zip(grads, grads_1):
        assert g.dtype == g1.dtype and torch.equal(g, (g1 * u).to(g1.dtype))
    assert (grads[0][3] == 0).all() and all(torch.isfinite(g).all() and (g != 0).any() for g in grads)
    # ... which differs from quantizing u * dloss/dlogits (plain autograd): e5m2 rounds
    # the scaled values elsewhere.
    def composed(a, b, grad_scale=2.0**12):
        logits = reference.fp8_linear(a, b, grad_scale=grad_scale)
        return reference.softcap_cross_entropy(logits, targets, reduction=reduction)

    _, *plain_u = forward_backward(composed, [x, weight], u)
    assert not torch.equal(grads[1], plain_u[1])
    # At upstream 1 it is the plain composition up to the fp32 rounding order of
    # dloss/dlogits: through bf16 and e5m2 (2 mantissa bits) that flips a rare rounding.
    _, *plain_1 = forward_backward(composed, [x, weight], torch.tensor(1.0))
    assert rel_err(grads_1[0], plain_1[0]) < 2e-2 and rel_err(grads_1[1], plain_1[1]) < 2e-2
    # A target out of [0, V): NaN loss and NaN gradient on its row, as softcap_cross_entropy.
    bad = targets.clone()
    bad[5] = 93
    loss, dx, _ = forward_backward(reference.linear_softcap_cross_entropy, [x, weight], u,
                                   **{**kwargs, "targets": bad})
    assert loss.isnan() and dx[5].isnan().all() and torch.isfinite(dx[torch.arange(21) != 5]).all()


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", None])
def test_linear_softcap_ce_without_fp8_matches_float64(kind):
    # fp32 x and weight: matmul and loss in fp32, a few fp32 ulps of O(1) values -> 1e-5.
    gen = generator(17)
    x, weight = randn(19, 48, gen=gen), randn(77, 48, gen=gen, std=0.3)
    targets = torch.randint(0, 77, (19,), generator=gen).int()

    def head(a, b):
        return reference.linear_softcap_cross_entropy(a, b, targets, fp8=False, kind=kind)

    loss, *grads = forward_backward(head, [x, weight], torch.tensor(1.0))
    loss64, *grads64 = float64_oracle(head, [x, weight], torch.tensor(1.0))
    assert rel_err(loss, loss64) < 1e-5
    assert all(rel_err(g, g64) < 1e-5 for g, g64 in zip(grads, grads64))


# ---- Newton-Schulz ----------------------------------------------------------------------
# Five quintic steps, each with three matmuls whose results are rounded to the working
# dtype, and the polynomial amplifies small singular values by a = 3.44 per step: the
# output lands about 10 u from the fp64 run (measured: bf16 0.037, fp16 0.005), so 16 u.

NS_TOL = {dtype: 16 * u for dtype, u in U.items()}


def ns_polynomial(sigma, triples):
    """What the iteration does to each singular value of the normalized matrix."""
    for a, b, c in triples:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 101), (101, 37), (45, 45), (3, 2, 30, 61), (2, 70, 19)])
def test_newton_schulz_matches_float64(dtype, shape):
    G = randn(*shape, gen=generator(18))
    out = reference.newton_schulz(G, dtype=dtype)
    expected = reference.newton_schulz(G.to(dtype).double(), dtype=torch.float64)
    assert out.dtype == dtype and out.shape == G.shape
    assert rel_err(out, expected) < NS_TOL[dtype]


@pytest.mark.parametrize("shape", [(37, 101), (45, 45), (61, 30)])
def test_newton_schulz_acts_on_singular_values_as_the_polynomial(shape):
    # X = U S V^T  ->  U p(S) V^T: in float64 the output's singular values are exactly
    # p^5(sigma / (||G||_F + eps)), an oracle independent of how the iteration is coded.
    G = randn(*shape, gen=generator(19)).double()
    sigma = torch.linalg.svdvals(G) / (G.norm() + 1e-7)
    out = reference.newton_schulz(G, dtype=torch.float64)
    expected = ns_polynomial(sigma, [NS5] * 5).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(out), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_newton_schulz_orthogonalizes_well_conditioned_matrices(dtype):
    # p^5 maps every sigma in [0.0013, 1] into [0.68, 1.21], and a Gaussian matrix with
    # m <= n/2 has sigma_min/||G||_F >= ~0.06: every singular value lands in [0.68, 1.21],
    # the bf16 run drifting by ~0.01 (measured 0.671..1.141), hence [0.6, 1.25].
    for shape in [(3, 37, 101), (2, 80, 19)]:
        out = reference.newton_schulz(randn(*shape, gen=generator(20)), dtype=dtype)
        sigma = torch.linalg.svdvals(out.double())
        assert sigma.min() > 0.6 and sigma.max() < 1.25, (shape, sigma.min(), sigma.max())


def test_newton_schulz_per_step_coefficients_run_in_order():
    # Three NS5 steps then two cubic Newton-Schulz steps (1.5, -0.5, 0), which pull every
    # singular value towards 1: the result is the polynomials composed in that order.
    G = randn(31, 53, gen=generator(21)).double()
    triples = [NS5] * 3 + [(1.5, -0.5, 0.0)] * 2
    out = reference.newton_schulz(G, coefficients=triples, dtype=torch.float64)
    sigma = torch.linalg.svdvals(G) / (G.norm() + 1e-7)
    expected = ns_polynomial(sigma, triples).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(out), expected, rtol=0, atol=1e-10)
    reversed_order = ns_polynomial(sigma, triples[::-1]).sort(descending=True).values
    assert not torch.allclose(torch.linalg.svdvals(out), reversed_order, rtol=0, atol=1e-3)
    # One triple means that triple at every step.
    assert torch.equal(reference.newton_schulz(G, coefficients=[NS5] * 5, dtype=torch.float64),
                       reference.newton_schulz(G, dtype=torch.float64))


def test_newton_schulz_tall_is_the_transpose_of_wide():
    G = randn(2, 29, 67, gen=generator(22))
    assert torch.equal(reference.newton_schulz(G.mT), reference.newton_schulz(G).mT)


def test_newton_schulz_batch_is_each_matrix_on_its_own():
    G = randn(2, 3, 41, 23, gen=generator(23)).double()
    out = reference.newton_schulz(G, steps=3, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            single = reference.newton_schulz(G[i, j], steps=3, dtype=torch.float64)
            assert torch.allclose(out[i, j], single, rtol=0, atol=1e-12)


def test_newton_schulz_of_zero_is_zero():
    # eps keeps the normalization finite for an all-zero gradient.
    out = reference.newton_schulz(torch.zeros(3, 17, 9))
    assert (out == 0).all()


# ---- ReLU^2 MLP ------------------------------------------------------------------------
# In a half dtype every intermediate (matmul, square, matmul) is rounded, ~1.1 u measured
# on outputs and gradients -> 3 u.  fp32: the matmuls' fp32 accumulation over D and H,
# ~3e-7 measured -> 1e-5.

MLP_TOL = {torch.bfloat16: 3 * U[torch.bfloat16], torch.float16: 3 * U[torch.float16],
           torch.float32: 1e-5}


def mlp_inputs(lead, d, h, dtype, *, seed):
    gen = generator(seed)
    x = randn(*lead, d, gen=gen, dtype=dtype)
    w_fc = randn(h, d, gen=gen, dtype=dtype, std=d**-0.5)
    w_proj = randn(d, h, gen=gen, dtype=dtype, std=h**-0.5)
    return x, w_fc, w_proj


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead", [(37,), (3, 13)])
def test_relu2_mlp_matches_float64(dtype, lead):
    x, w_fc, w_proj = mlp_inputs(lead, 45, 83, dtype, seed=24)
    upstream = randn(*lead, 45, gen=generator(25), dtype=dtype)
    out, *grads = forward_backward(reference.relu2_mlp, [x, w_fc, w_proj], upstream)
    out64, *grads64 = float64_oracle(reference.relu2_mlp, [x, w_fc, w_proj], upstream)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, out64) < MLP_TOL[dtype]
    for name, g, g64 in zip(("x", "w_fc", "w_proj"), grads, grads64):
        assert g.dtype == dtype and rel_err(g, g64) < MLP_TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_relu2_matches_float64(dtype):
    x, w, _ = mlp_inputs((3, 13), 45, 83, dtype, seed=26)
    upstream = randn(3, 13, 83, gen=generator(27), dtype=dtype)
    out, *grads = forward_backward(reference.linear_relu2, [x, w], upstream)
    out64, *grads64 = float64_oracle(reference.linear_relu2, [x, w], upstream)
    assert out.shape == (3, 13, 83) and (out >= 0).all()
    assert rel_err(out, out64) < MLP_TOL[dtype]
    assert all(rel_err(g, g64) < MLP_TOL[dtype] for g, g64 in zip(grads, grads64))


def test_relu2_negative_preactivations_pass_no_gradient():
    x, w, _ = mlp_inputs((11,), 9, 21, torch.float64, seed=28)
    _, dx, dw = forward_backward(reference.linear_relu2, [x, w], torch.ones(11, 21))
    dead = (x @ w.T) < 0
    expected_dw = (2 * torch.relu(x @ w.T)).T @ x
    assert dead.any() and torch.allclose(dw, expected_dw, rtol=1e-12, atol=0)


# ---- sliding-window attention --------------------------------------------------------
# Scores, softmax and the weighted sum run in fp32 on inputs exact in fp32; the output is
# rounded once to the input dtype, and so is each gradient (~0.45 u measured) -> 2 u.

ATTN_TOL = {dtype: 2 * u for dtype, u in U.items()}


def attention_inputs(b, t, h, d, dtype, *, seed):
    gen = generator(seed)
    return [randn(b, t, h, d, gen=gen, dtype=dtype) for _ in range(4)]  # q, k, v, upstream


def random_documents(b, t, *, seed, mean_length=9):
    """[B, T] int32 document ids: a new document starts with probability 1/mean_length."""
    starts = torch.rand(b, t, generator=generator(seed)) < 1 / mean_length
    return torch.cumsum(starts.int(), dim=1).int()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,with_docs", [(None, False), (17, False), (None, True), (5, True)])
def test_attention_matches_float64(dtype, window, with_docs):
    q, k, v, upstream = attention_inputs(2, 53, 3, 24, dtype, seed=29)
    doc_ids = random_documents(2, 53, seed=30) if with_docs else None
    out, *grads = forward_backward(reference.sliding_window_attention, [q, k, v], upstream,
                                  window=window, doc_ids=doc_ids)
    out64, *grads64 = float64_oracle(reference.sliding_window_attention, [q, k, v], upstream,
                                    window=window, doc_ids=doc_ids)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, out64) < ATTN_TOL[dtype]
    for name, g, g64 in zip("qkv", grads, grads64):
        assert g.dtype == dtype and rel_err(g, g64) < ATTN_TOL[dtype], name


def test_attention_window_one_returns_v_and_no_score_gradient():
    # One allowed key: softmax weight exactly 1, so out == v bit for bit, and the scores'
    # gradient p * (dp - sum p dp) is exactly 0, so dq == dk == 0 and dv == upstream.
    q, k, v, upstream = attention_inputs(2, 19, 2, 16, torch.bfloat16, seed=31)
    out, dq, dk, dv = forward_backward(reference.sliding_window_attention, [q, k, v], upstream,
                                         window=1)
    assert torch.equal(out, v)
    assert (dq == 0).all() and (dk == 0).all() and torch.equal(dv, upstream)


def test_attention_window_at_least_t_is_plain_causal():
    q, k, v, _ = attention_inputs(2, 23, 3, 20, torch.float64, seed=32)
    causal = reference.sliding_window_attention(q, k, v)
    for window in (23, 24, 1000):
        assert torch.equal(reference.sliding_window_attention(q, k, v, window=window), causal)
    # ... and plain causal attention is torch's (independent) causal SDPA.
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)
    assert torch.allclose(causal, sdpa, rtol=0, atol=1e-12)


def test_attention_window_matches_an_explicit_band():
    q, k, v, _ = attention_inputs(1, 31, 2, 12, torch.float64, seed=33)
    i, j = torch.arange(31)[:, None], torch.arange(31)[None, :]
    band = (j <= i) & (i - j < 7)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=band).transpose(1, 2)
    assert torch.allclose(reference.sliding_window_attention(q, k, v, window=7), sdpa, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_documents_are_independent_sequences(window):
    # Masking by document == running each document on its own (the window is relative,
    # so it applies within each document the same way).
    q, k, v, _ = attention_inputs(2, 41, 2, 16, torch.float64, seed=34)
    doc_ids = random_documents(2, 41, seed=35, mean_length=7)
    out = reference.sliding_window_attention(q, k, v, window=window, doc_ids=doc_ids)
    for b in range(2):
        assert doc_ids[b].unique().numel() > 2
        for doc in doc_ids[b].unique():
            idx = (doc_ids[b] == doc).nonzero().squeeze(1)
            alone = reference.sliding_window_attention(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx],
                                                       window=window)
            assert torch.allclose(out[b:b + 1, idx], alone, rtol=0, atol=1e-12)


def test_attention_scale_multiplies_the_scores():
    q, k, v, _ = attention_inputs(1, 13, 2, 16, torch.float64, seed=36)
    scaled = reference.sliding_window_attention(q, k, v, window=5, scale=0.12)
    assert torch.allclose(scaled, reference.sliding_window_attention(q * 0.12 * 16**0.5, k, v, window=5),
                          rtol=0, atol=1e-12)
