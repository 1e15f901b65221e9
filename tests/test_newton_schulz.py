"""newton_schulz: the Triton kernels (interpreter on the CPU, real Triton on a GPU) against a
float64 evaluation of the same iteration, the routing between backends, poisoned buffers,
the launch count, Muon on the kernel, compile tracing, the Hopper build, and every error path.

Tolerance.  The oracle is kernels.reference.newton_schulz on float64 inputs with
dtype=float64: the same iteration without rounding.  A half-precision evaluation rounds
three results per step (A, B, X), each to u/2 relative per entry (u = 2**-11 for fp16,
2**-8 for bf16), about u/2 .. u in the Frobenius norm of that step's X.  After the first
steps the spectrum sits in [0.7, 1.2] where the quintic's slope |p'(sigma)| is about 1 or
less, so the errors of the steps add up rather than compound: measured on these shapes the
kernel's error is 0.6u after 1 step and 2-7u after 5 (the reference's own fp16 evaluation,
which also rounds every partial product, 1-9u).  STEP_TOL = 4u per step bounds both with
room, and a kernel that rounded in the wrong place (a missing fp32 accumulation, a bf16
intermediate, a wrong coefficient) lands at 1e-1 or worse.
"""
import importlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import reference
from speedrun import optim
from tests.helpers import BACKENDS, rel_err
from tests.hopper_aot import compile_for_hopper

# The module (kernels.newton_schulz the attribute is the public function of the same name).
ns_module = importlib.import_module("kernels.newton_schulz")
NS5 = (3.4445, -4.7750, 2.0315)
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def tolerance(dtype, steps):
    """4 unit roundoffs of `dtype` per step (see the module docstring)."""
    return 4 * UNIT_ROUNDOFF[dtype] * steps


def stack(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def oracle(G, **kwargs):
    """The iteration in float64 (no rounding at all), as float64, on G's device."""
    return reference.newton_schulz(G.double(), dtype=torch.float64, **kwargs)


def run_triton(G, **kwargs):
    with kernels.use_backend("triton"):
        return kernels.newton_schulz(G, **kwargs)


def assert_close_to_oracle(G, out, *, dtype, steps=5, **kwargs):
    assert out.dtype == dtype and out.shape == G.shape and out.device == G.device
    assert torch.isfinite(out).all(), "an output element was not written (or overflowed)"
    expected = oracle(G, steps=steps, **kwargs)
    error = rel_err(out, expected)
    assert error < tolerance(dtype, steps), error
    # Our path rounds less often than the reference's half-precision evaluation: it must not
    # be much worse than it.
    ref_error = rel_err(reference.newton_schulz(G, dtype=dtype, steps=steps, **kwargs), expected)
    assert error < 2 * ref_error + UNIT_ROUNDOFF[dtype], (error, ref_error)


@pytest.fixture
def small_tiles(monkeypatch):
    """16x16 tiles (16-deep): the small test matrices then span several tiles, so the
    triangle enumeration, the mirrored stores and every edge mask are exercised."""
    monkeypatch.setattr(ns_module, "_MAX_TILE", 16)
    monkeypatch.setattr(ns_module, "_MAX_TILE_K", 16)


# ---- Triton vs the float64 iteration (fp16 in the interpreter; the GPU runs them too) ----

SHAPES = {
    "square": (48, 48),
    "wide": (37, 53),
    "tall": (53, 37),
    "one_row": (1, 29),
    "one_column": (29, 1),
    "batched_4d": (2, 3, 19, 23),
}


# Every shape at 5 steps (the GPT's NS5); steps 1 and 3 (CIFAR) on four of them, to keep
# the interpreter's time down.
STEP_CASES = [(name, 5) for name in SHAPES] + [
    (name, steps) for steps in (1, 3) for name in ("wide", "tall", "one_row", "batched_4d")]


@pytest.mark.parametrize("name,steps", STEP_CASES)
def test_triton_matches_float64_iteration(name, steps, small_tiles, interpreter_device):
    G = stack(*SHAPES[name], device=interpreter_device)
    out = run_triton(G, steps=steps, dtype=torch.float16)
    assert_close_to_oracle(G, out, dtype=torch.float16, steps=steps)


def test_triton_default_tiles_match(interpreter_device):
    # The production tile sizes (one 64-wide tile here) rather than the 16-wide test tiles.
    G = stack(3, 45, 70, device=interpreter_device)
    assert_close_to_oracle(G, run_triton(G, dtype=torch.float16), dtype=torch.float16)


@pytest.mark.parametrize("coefficients", [
    [NS5, (2.0, -1.5, 0.5), (1.5, -0.5, 0.0)],   # converging to exact orthogonality at the end
    [(3.0, -3.2, 1.2), NS5, (1.9, -1.3, 0.4)],
])
def test_triton_per_step_coefficients(coefficients, small_tiles, interpreter_device):
    G = stack(2, 21, 34, device=interpreter_device, seed=3)
    out = run_triton(G, steps=3, coefficients=coefficients, dtype=torch.float16)
    assert_close_to_oracle(G, out, dtype=torch.float16, steps=3, coefficients=coefficients)
    # A different coefficient in one step is visible: the triples are really used per step.
    other = run_triton(G, steps=3, coefficients=[NS5] * 3, dtype=torch.float16)
    assert rel_err(out, other) > 20 * tolerance(torch.float16, 3)


# ---- named schedules (ns5, polar_express) ------------------------------------------------

def spread_spectrum(*shape, low, seed=0):
    """float64 [b, m, n] with singular values log-spaced over [low, 1] and random singular
    vectors: the ill-conditioned gradients where the schedules differ."""
    gen = torch.Generator().manual_seed(seed)
    b, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(b, m, m, generator=gen, dtype=torch.float64))[0][..., :k]
    V = torch.linalg.qr(torch.randn(b, n, n, generator=gen, dtype=torch.float64))[0][..., :k]
    sigma = torch.logspace(0, math.log10(low), k, dtype=torch.float64)
    return U @ torch.diag_embed(sigma).expand(b, k, k) @ V.mT


def spectrum_after(G, name, k):
    """Singular values after the first k steps of schedule `name`, in float64."""
    schedule = reference.NEWTON_SCHULZ_SCHEDULES[name][:k]
    return torch.linalg.svdvals(oracle(G, steps=k, coefficients=list(schedule), eps=0.0))


@pytest.mark.parametrize("shape", [(2, 37, 70), (2, 90, 33)])
def test_polar_express_orthogonalizes_better_than_ns5(shape):
    # Singular values over [1e-3, 1] (float64, no rounding).  Measured smallest singular
    # value after steps 1..5, ns5 vs polar_express: 0.002/0.005, 0.007/0.018, 0.023/0.071,
    # 0.079/0.23, 0.27/0.52: Polar Express lifts the weakest direction 1.9-3.1x further at
    # every step (its early steps overshoot to ~1.96 above, by design, and come back).
    G = spread_spectrum(*shape, low=1e-3)
    for k in range(1, 6):
        ns5, polar = spectrum_after(G, "ns5", k), spectrum_after(G, "polar_express", k)
        assert polar.min() > 1.5 * ns5.min(), (k, polar.min(), ns5.min())
    # After all 5 steps max |sigma - 1|: measured 0.48 vs 0.73 here, and 0.141 vs 0.318 on
    # [1e-2, 1] (ns5's fixed point band [0.68, 1.2] vs Polar Express's [0.86, 1.14]).
    assert (polar - 1).abs().max() < 0.55 < 0.7 < (ns5 - 1).abs().max()
    G = spread_spectrum(*shape, low=1e-2, seed=1)
    assert (spectrum_after(G, "polar_express", 5) - 1).abs().max() < 0.15
    assert (spectrum_after(G, "ns5", 5) - 1).abs().max() > 0.3


def test_named_schedules_are_the_records():
    assert reference.NEWTON_SCHULZ_SCHEDULES["ns5"] == (NS5,) * 5
    # polar_express with its 1.02 safety factor folded into step 1 is the record's iteration:
    # X / (1.02 ||X||_F), then the paper's triples unchanged (float64, eps 0: equal to 1e-12).
    G = stack(2, 19, 30, dtype=torch.float64, seed=5)
    X = G / (1.02 * G.norm(dim=(-2, -1), keepdim=True))
    for a, b, c in reference._POLAR_EXPRESS_TRIPLES:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    assert rel_err(oracle(G, steps=5, coefficients="polar_express", eps=0.0), X) < 1e-12
    assert reference._POLAR_EXPRESS_TRIPLES[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)


def test_triton_polar_express_matches_float64_iteration(small_tiles, interpreter_device):
    # ns5 by name is the default triple (test_named_schedules_are_the_records), already
    # covered by test_triton_matches_float64_iteration.  Measured error 4.8u and 5.6u (seeds
    # 3, 4; ns5 on the same matrices 4.1u, 3.8u), inside the same 4u-per-step tolerance:
    # the steep first steps (slope ~8 near 0) act while the small singular values carry
    # little of the norm; the reference's own fp16 evaluation is at 14-16u.
    G = stack(2, 21, 34, device=interpreter_device, seed=3)
    out = run_triton(G, steps=5, coefficients="polar_express", dtype=torch.float16)
    assert_close_to_oracle(G, out, dtype=torch.float16, steps=5, coefficients="polar_express")
    # The schedule really reaches the kernels: far from the NS5 result.
    assert rel_err(out, run_triton(G, steps=5, dtype=torch.float16)) > 20 * tolerance(torch.float16, 5)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_converts_any_input_dtype(input_dtype, small_tiles, interpreter_device):
    # Step 1 reads G itself and rounds to the iteration dtype on load (fp64 via torch).
    G = stack(2, 19, 33, dtype=input_dtype, device=interpreter_device, seed=5)
    out = run_triton(G, steps=3, dtype=torch.float16)
    assert_close_to_oracle(G.to(torch.float16), out, dtype=torch.float16, steps=3)


def test_triton_strided_and_transposed_views(small_tiles, interpreter_device):
    # A non-contiguous batch, a transposed view (tall by strides: the kernels read it as
    # the wide matrix it is a view of), and leading dims that cannot be flattened as a view.
    base = stack(5, 40, 60, device=interpreter_device, seed=7)
    for G in (base[::2, 3:30, 7:50], base[:2].mT, base[:4].reshape(2, 2, 40, 60).mT[:, :1]):
        assert not G.is_contiguous()
        out = run_triton(G, steps=2, dtype=torch.float16)
        assert out.is_contiguous()
        assert_close_to_oracle(G, out, dtype=torch.float16, steps=2)


def test_triton_zero_matrices_stay_zero(small_tiles, interpreter_device):
    # Muon pads each rank's share with zero matrices: eps > 0 must map them to exact zeros.
    G = stack(3, 18, 20, device=interpreter_device)
    G[1] = 0
    out = run_triton(G, steps=2, dtype=torch.float16)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert_close_to_oracle(G[[0, 2]], out[[0, 2]], dtype=torch.float16, steps=2)


def test_triton_writes_every_element_of_poisoned_buffers(small_tiles, monkeypatch, interpreter_device):
    # Every buffer (output, A, B, the X ping-pong pair, the norm partials) starts as NaN: an
    # element a kernel fails to write, or reads before it is written, shows up as NaN.
    made = []

    def poisoned(shape, dtype, device):
        made.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ns_module, "_empty", poisoned)
    G = stack(2, 35, 22, device=interpreter_device, seed=11)  # tall: the output is written transposed
    out = run_triton(G, steps=3, dtype=torch.float16)
    assert len(made) == 6  # out, A, B, the X pair (X0 = fp16(G) in one of them), partials
    assert_close_to_oracle(G, out, dtype=torch.float16, steps=3)


def test_triton_bf16_in_the_interpreter_via_fp32_carriers(small_tiles, interpreter_device):
    # Muon's default dtype.  On the CPU the kernels carry bf16 values in fp32 (the
    # interpreter's bf16 arithmetic is wrong); on a GPU this is real bf16.
    G = stack(2, 19, 26, device=interpreter_device, seed=2)
    out = run_triton(G, dtype=torch.bfloat16)
    assert_close_to_oracle(G, out, dtype=torch.bfloat16)


def test_one_launch_per_stage_whatever_the_batch(small_tiles, monkeypatch, interpreter_device):
    launched = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append((self.name, grid))
            return self.kernel[grid]

    for name in ("_sumsq_kernel", "_syrk_kernel", "_update_kernel"):
        monkeypatch.setattr(ns_module, name, Counting(name, getattr(ns_module, name)))
    G = stack(2, 3, 17, 21, device=interpreter_device)
    run_triton(G, steps=2, dtype=torch.float16)
    assert len(launched) == ns_module.launches(2) == 7
    assert [name for name, _ in launched] == ["_sumsq_kernel"] + ["_syrk_kernel", "_syrk_kernel",
                                                                   "_update_kernel"] * 2
    # 17 rows in 16-wide tiles: 2 per side, 3 on one triangle (not 4), for each of 6 matrices.
    assert launched[1][1] == (6 * 3,)
    assert launched[3][1] == (6 * 2 * 2,)  # the update: [17, 21] in 16x16 tiles


# ---- L2-sized passes over the stack (bench/NOTES.md, issue 18) ------------------------------

H100 = {"l2_bytes": 50 * 2 ** 20, "sms": 132}


def test_stack_chunk_at_the_gpt_shapes():
    # 768^2: X pair, A, B = 4 x 1.18 MB per matrix; 0.75 x 50 MiB holds 8, but a full wave of
    # Gram CTAs (2 per SM, 21 tiles per matrix) needs 13: one pass (bench/NOTES.md).
    assert ns_module.stack_chunk(33, 768, 768, **H100) == 33
    assert ns_module.stack_chunk(11, 768, 768, **H100) == 11
    # 768 x 3072: 11.8 MB per matrix, 3 fit: one pass.
    assert ns_module.stack_chunk(12, 768, 3072, **H100) == 12
    # An L2 of 126 MiB and 148 SMs: 21 fit, a wave needs 15: 33 matrices in 2 passes of 16-17.
    larger = {"l2_bytes": 126 * 2 ** 20, "sms": 148}
    assert ns_module.stack_chunk(33, 768, 768, **larger) == 17
    assert ns_module.stack_chunk(21, 768, 768, **larger) == 21  # fits whole: one pass
    assert ns_module.stack_chunk(33, 768, 768, **larger, itemsize=4) == 33  # fp32 iterates: 10 fit
    assert ns_module.stack_chunk(12, 768, 3072, **larger) == 12  # 8 fit, 15 needed


def test_stack_chunk_follows_l2_size_and_sm_count():
    # 100 matrices 64 x 64 (one 64-wide Gram tile each, 32 KB working set in fp16).
    per_matrix = 2 * (2 * 64 * 64 + 2 * 64 * 64)
    l2 = int(10 * per_matrix / ns_module._L2_SHARE) + 1  # room for exactly 10
    assert ns_module.stack_chunk(100, 64, 64, l2_bytes=l2, sms=4) == 10
    assert ns_module.stack_chunk(81, 64, 64, l2_bytes=l2, sms=4) == 9  # 9 passes of 9, not 8 of 10 and 1
    assert ns_module.stack_chunk(91, 64, 64, l2_bytes=l2, sms=4) == 10  # 10 passes of 9-10
    assert ns_module.stack_chunk(100, 64, 64, l2_bytes=l2, sms=5) == 10  # 10 CTAs: 2 on each of 5 SMs
    assert ns_module.stack_chunk(100, 64, 64, l2_bytes=l2, sms=6) == 100  # 10 would leave 2 slots empty
    assert ns_module.stack_chunk(100, 64, 64, l2_bytes=per_matrix, sms=1) == 100  # nothing fits


def test_chunk_of_reads_the_device_or_the_forced_chunk(monkeypatch):
    # Off CUDA the H100's limits decide: 33 x 768^2 in one pass; 40 x 256^2 (3 Gram tiles each,
    # 0.5 MB) fit 75 at a time and a wave needs 88: one pass too; 2000 of 64 x 64 (32 KB, one
    # tile each) fit 1200 at a time, a wave needs 264: 2 passes of 1000.
    assert ns_module.chunk_of((11, 3, 768, 768), torch.device("cpu")) == 33
    assert ns_module.chunk_of((40, 256, 256), torch.device("cpu")) == 40
    assert ns_module.chunk_of((2000, 64, 64), torch.device("cpu")) == 1000
    monkeypatch.setattr(ns_module, "_CHUNK", 2)
    assert ns_module.chunk_of((11, 3, 768, 768), torch.device("cpu")) == 2
    assert ns_module.chunk_of((1, 768, 768), torch.device("cpu")) == 1


@pytest.mark.parametrize("input_dtype,shape", [(torch.float32, (5, 35, 22)), (torch.float16, (2, 3, 19, 26))])
def test_triton_passes_over_the_stack_match_one_pass_exactly(input_dtype, shape, small_tiles, monkeypatch,
                                                             interpreter_device):
    # Forced passes of <= 2 matrices (5 or 6 as 1-2-2 or 2-2-2), buffers poisoned with NaN: each pass
    # must compute exactly what one pass over the whole stack does, matrix by matrix.  fp32
    # input: X0 = fp16(G) written per pass into the X pair; fp16 input: step 1 reads G.
    launched = []
    real_empty = ns_module._empty
    monkeypatch.setattr(ns_module, "_empty", lambda shape, dtype, device: real_empty(shape, dtype, device).fill_(
        float("nan")))
    G = stack(*shape, dtype=input_dtype, device=interpreter_device, seed=13)
    whole = run_triton(G, steps=3, dtype=torch.float16)
    monkeypatch.setattr(ns_module, "_CHUNK", 2)

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    for name in ("_sumsq_kernel", "_syrk_kernel", "_update_kernel"):
        monkeypatch.setattr(ns_module, name, Counting(getattr(ns_module, name)))
    passes = run_triton(G, steps=3, dtype=torch.float16)
    batch = math.prod(shape[:-2])
    assert len(launched) == ns_module.launches(3, passes=math.ceil(batch / 2)) == 10 * 3
    assert torch.equal(passes, whole)
    assert_close_to_oracle(G.to(torch.float16) if input_dtype == torch.float16 else G, passes,
                           dtype=torch.float16, steps=3)


# ---- routing -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_on_cpu_tensors(backend, small_tiles):
    G = stack(3, 17, 23)
    with kernels.use_backend(backend):
        out = kernels.newton_schulz(G, dtype=torch.float16)
    expected = reference.newton_schulz(G, dtype=torch.float16)
    if backend == "triton":  # the interpreter (conftest sets TRITON_INTERPRET=1 on the CPU)
        assert not torch.equal(out, expected)
        assert_close_to_oracle(G, out, dtype=torch.float16)
    else:  # auto and cuda (no CUDA kernel for this op) run the reference on CPU tensors
        assert torch.equal(out, expected)


def test_backend_report():
    assert kernels.backends()["ops"]["newton_schulz"] == {
        "kernels": ["triton"], "on_cuda_tensors": "triton", "on_cpu_tensors": "reference"}


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.newton_schulz(stack(4, 6))


@pytest.mark.parametrize("input_dtype,dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float16), (torch.float16, torch.float16)])
def test_reference_backend_is_the_reference_exactly(input_dtype, dtype):
    G = stack(3, 37, 53, dtype=input_dtype)
    with kernels.use_backend("reference"):
        out = kernels.newton_schulz(G, dtype=dtype)
    assert out.dtype == dtype and out.shape == G.shape
    assert torch.equal(out, reference.newton_schulz(G, dtype=dtype))


@pytest.mark.parametrize("kwargs", [
    {"steps": 3},                                         # the CIFAR record's Muon
    {"steps": 2, "coefficients": [NS5, (1.5, -0.5, 0.0)]},  # per-step triples
    {"steps": 1, "coefficients": [[2, -1.5, 0.5]]},       # lists and ints are fine
    {"eps": 0.0},
    {"eps": 1e-3},
])
def test_options_are_passed_through_to_the_reference(kwargs):
    G = stack(2, 41, 19)
    assert torch.equal(kernels.newton_schulz(G, **kwargs), reference.newton_schulz(G, **kwargs))


def test_meta_tensors_at_the_speedrun_shapes():
    # The GPT's stacks: 768x768 (attention) and 768x3072 (MLP) matrices.
    for shape in [(24, 768, 768), (24, 768, 3072), (24, 3072, 768)]:
        out = kernels.newton_schulz(torch.empty(shape, device="meta"))
        assert out.shape == shape and out.dtype == torch.bfloat16


def test_fake_impl_gives_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        G = torch.empty(7, 3072, 768)
        out = ns_module._newton_schulz_op(G, list(NS5) * 5, 1e-7, torch.float16)
    assert out.shape == (7, 3072, 768) and out.dtype == torch.float16


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiles_with_fullgraph_and_matches_eager(backend, small_tiles, interpreter_device):
    G = stack(3, 21, 30, device=interpreter_device)

    def orthogonalize(g):
        return kernels.newton_schulz(g, steps=3, coefficients=[NS5] * 2 + [(1.5, -0.5, 0.0)],
                                     dtype=torch.float16)

    compiled = torch.compile(orthogonalize, backend="aot_eager" if G.device.type == "cpu" else "inductor",
                             fullgraph=True)
    with kernels.use_backend(backend):
        assert torch.equal(compiled(G), orthogonalize(G))
    torch._dynamo.reset()


# ---- Muon on the kernel --------------------------------------------------------------------

MUON_SHAPES = [(12, 20), (12, 20), (40, 12), (3, 16, 16), (1, 24)]


def _muon_deltas(orthogonalize=None, backend="reference", steps=2):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in MUON_SHAPES]
    start = [p.detach().clone() for p in params]
    optimizer = optim.Muon(params, lr=0.05, momentum=0.9, orthogonalize=orthogonalize)
    with kernels.use_backend(backend):
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    return [(p.detach() - p0) for p, p0 in zip(params, start)]


def test_muon_step_on_triton_matches_the_reference_muon(small_tiles):
    # Muon's default: NS5 in bf16, one kernels.newton_schulz call per shape group.  Each
    # parameter moves by lr * scale * (NS(u_1) + NS(u_2)); the float64 Muon is the oracle.
    exact = _muon_deltas(orthogonalize=lambda s: reference.newton_schulz(s.double(), dtype=torch.float64))
    ours = _muon_deltas(backend="triton")
    ref = _muon_deltas(backend="reference")
    for d_ours, d_ref, d_exact in zip(ours, ref, exact):
        assert rel_err(d_ours, d_exact) < tolerance(torch.bfloat16, 5)
        assert rel_err(d_ref, d_exact) < tolerance(torch.bfloat16, 5)
        assert rel_err(d_ours, d_ref) < 2 * tolerance(torch.bfloat16, 5)


# ---- ahead-of-time compilation for Hopper ---------------------------------------------------

def _hopper_specs():
    """Every kernel at the GPT's shapes (768 x 768 and 768 x 3072), bf16 and fp16."""
    size, width = 768, 3072
    specs = []
    for half in ("bf16", "fp16"):
        flags = {"BF16": half == "bf16", "EMULATE_BF16": False}
        syrk_sig = {"y_ptr": f"*{half}", "c_ptr": f"*{half}", "d_ptr": f"*{half}", "partials_ptr": "*fp32",
                    "size": "i32", "depth": "i32", "tiles_per_matrix": "i32",
                    "stride_yb": "i64", "stride_ym": "i32", "stride_yk": "i32",
                    "alpha": "fp32", "beta": "fp32", "eps": "fp32", "n_chunks": "i32"}
        for depth, has_d, first in ((width, False, True), (width, False, False), (size, True, False)):
            cfg = ns_module.syrk_config(size, depth)
            launch = {key: cfg.pop(key) for key in ("num_warps", "maxnreg")}
            specs.append({"module": "kernels.newton_schulz", "kernel": "_syrk_kernel", "signature": syrk_sig,
                          "constexprs": {"HAS_D": has_d, "SCALE_BY_NORM": first, "CHUNKS": 64, **flags, **cfg},
                          **launch,
                          "divisible_by_16": ["y_ptr", "c_ptr", "d_ptr", "size", "depth", "stride_yb",
                                              "stride_ym"]})
        cfg = ns_module.update_config(size, width)
        launch = {key: cfg.pop(key) for key in ("num_warps", "maxnreg")}
        specs.append({"module": "kernels.newton_schulz", "kernel": "_update_kernel", "signature": {
            "b_ptr": f"*{half}", "x_ptr": f"*{half}", "out_ptr": f"*{half}", "partials_ptr": "*fp32",
            "size": "i32", "width": "i32", "tiles_n": "i32", "tiles_per_matrix": "i32",
            "stride_xb": "i64", "stride_xm": "i32", "stride_xn": "i32",
            "stride_ob": "i64", "stride_om": "i32", "stride_on": "i32",
            "a_coef": "fp32", "eps": "fp32", "n_chunks": "i32"},
            "constexprs": {"SCALE_BY_NORM": False, "CHUNKS": 64, **flags, **cfg}, **launch,
            "divisible_by_16": ["b_ptr", "x_ptr", "out_ptr", "size", "width", "stride_xb", "stride_xm",
                                "stride_ob", "stride_om"]})
        specs.append({"module": "kernels.newton_schulz", "kernel": "_sumsq_kernel", "signature": {
            "g_ptr": "*fp32", "partials_ptr": "*fp32", "copy_ptr": f"*{half}", "rows": "i32", "cols": "i32",
            "stride_gb": "i64", "stride_gm": "i32", "stride_gn": "i32", "rows_per_chunk": "i32",
            "n_chunks": "i32"},
            "constexprs": {"WRITE_COPY": True, **flags, "BLOCK_R": ns_module._NORM_BLOCK_ROWS, "BLOCK_C": 256},
            "num_warps": 4, "divisible_by_16": ["g_ptr", "copy_ptr", "cols", "stride_gm"]})
    return specs


def test_triton_kernels_compile_for_sm90_with_wgmma():
    specs = _hopper_specs()
    for spec, compiled in zip(specs, compile_for_hopper(specs)):
        assert compiled["cubin_bytes"] > 0 and ".target sm_90" in compiled["ptx"], spec
        if spec["kernel"] != "_sumsq_kernel":  # the matmul kernels run on Hopper's tensor cores
            assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.(bf16|f16)", compiled["ptx"]), spec


# ---- GPU: real bf16 (the interpreter cannot do bf16 arithmetic) -----------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(33, 768, 768), (4, 768, 3072), (4, 3072, 768), (2, 3, 250, 130),
                                   (6, 64, 216), (1, 5000)])
def test_gpu_bf16_matches_float64_iteration(shape):
    G = stack(*shape, device="cuda")
    out = run_triton(G, dtype=torch.bfloat16)
    assert_close_to_oracle(G, out, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_bf16_input_cifar_steps_and_fp16():
    G = stack(3, 256, 2304, dtype=torch.bfloat16, device="cuda")
    assert_close_to_oracle(G, run_triton(G, steps=3, dtype=torch.bfloat16), dtype=torch.bfloat16, steps=3)
    assert_close_to_oracle(G, run_triton(G, steps=3, dtype=torch.float16), dtype=torch.float16, steps=3)


@pytest.mark.gpu
def test_gpu_auto_routes_to_triton_and_captures_in_a_cuda_graph():
    G = stack(4, 768, 3072, dtype=torch.bfloat16, device="cuda")
    with kernels.use_backend("auto"):
        eager = kernels.newton_schulz(G)
        compiled = torch.compile(lambda g: kernels.newton_schulz(g), fullgraph=True)
        assert torch.equal(compiled(G), eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = kernels.newton_schulz(G)
    graph.replay()
    assert torch.equal(captured, eager)
    assert torch.equal(eager, run_triton(G))
    torch._dynamo.reset()


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("G,exc,match", [
    (stack(2, 3).tolist(), TypeError, "G must be a torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.int32), TypeError, "G must have dtype"),
    (stack(2, 3, dtype=torch.complex64), TypeError, "G must have dtype"),
    (stack(5), ValueError, "G must have at least 2 dims"),
    (stack(0, 5, 3), ValueError, "G must not be empty"),
    (stack(4, 0), ValueError, "G must not be empty"),
])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bad_input_raises_naming_it(G, exc, match, backend):
    with kernels.use_backend(backend), pytest.raises(exc, match=match):
        kernels.newton_schulz(G)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"steps": 0}, ValueError, "steps must be > 0"),
    ({"steps": 2.0}, TypeError, "steps must be an int"),
    ({"steps": True}, TypeError, "steps must be an int"),
    ({"coefficients": 3.4}, TypeError, "coefficients must be"),
    ({"coefficients": (3.4, -4.7)}, ValueError, "coefficients must be an .a, b, c. triple.*got 2 entries"),
    ({"coefficients": (3.4, -4.7, 2.0, 1.0)}, ValueError, "got 4 entries"),
    ({"coefficients": []}, ValueError, "got 0 entries"),
    ({"coefficients": (3.4, -4.7, "2")}, TypeError, r"coefficients\[2\] must be a number"),
    ({"coefficients": (NS5, 1.0, 2.0)}, TypeError, r"coefficients\[0\] must be a number"),
    ({"coefficients": [NS5] * 4}, ValueError, "coefficients holds 4 per-step triples but steps=5"),
    ({"coefficients": [NS5] * 6}, ValueError, "coefficients holds 6"),
    ({"steps": 2, "coefficients": [NS5, (1.0, 2.0)]}, TypeError, r"coefficients\[1\] must be an"),
    ({"steps": 2, "coefficients": [NS5, (1.0, 2.0, None)]}, TypeError, r"coefficients\[1\]\[2\]"),
    ({"coefficients": "polar"}, ValueError, r"coefficients='polar' is not a named schedule; choose one of "
                                            r"\['ns5', 'polar_express'\]"),
    ({"steps": 3, "coefficients": "polar_express"}, ValueError,
     "coefficients='polar_express' is a 5-step schedule but steps=3; use steps=5"),
    ({"steps": 6, "coefficients": "ns5"}, ValueError, "coefficients='ns5' is a 5-step schedule but steps=6"),
    ({"eps": -1e-7}, ValueError, "eps must be >= 0"),
    ({"eps": None}, TypeError, "eps"),
    ({"dtype": torch.float32}, TypeError, "dtype must be torch.bfloat16 or torch.float16"),
    ({"dtype": torch.float64}, TypeError, "dtype must be torch.bfloat16 or torch.float16"),
    ({"dtype": "bfloat16"}, TypeError, "dtype must be a torch.dtype"),
])
def test_bad_options_raise_naming_them(kwargs, exc, match):
    with kernels.use_backend("triton"), pytest.raises(exc, match=match):
        kernels.newton_schulz(stack(4, 6), **kwargs)


# ---- bench/bench_newton_schulz.py without a GPU ----------------------------------------------

def test_bench_sets_and_flop_counts():
    from bench import bench_newton_schulz as bench

    assert bench.gpt_groups() == [(11, 3, 768, 768), (11, 768, 768), (12, 3072, 768), (12, 768, 3072)]
    assert bench.cifar_groups() == [(1, 64, 216), (1, 64, 576), (1, 256, 576), (3, 256, 2304)]
    assert len(bench.matrices_of(bench.gpt_groups())) == 33 + 11 + 12 + 12
    # One 768 x 3072 matrix (tall or wide), one step: 4 M^2 N + 2 M^3 dense.
    m, n = 768, 3072
    assert bench.flops([(3072, 768)], 1, symmetric=False) == 4 * m * m * n + 2 * m ** 3 == 8_153_726_976
    assert bench.flops([(1, 768, 3072)], 1, symmetric=True) == m * (m + 1) * n + m * m * (m + 1) + 2 * m * m * n
    # The GPT set, NS5: 1.58 dense TFLOP; the symmetric work is about 72 % of it.
    dense = bench.flops(bench.gpt_groups(), 5, symmetric=False)
    assert dense == 5 * (44 * 6 * 768 ** 3 + 24 * 8_153_726_976)
    assert 0.70 < bench.flops(bench.gpt_groups(), 5, symmetric=True) / dense < 0.74


def test_bench_run_set_checks_times_and_records(tmp_path, monkeypatch, small_tiles):
    from bench import bench_newton_schulz as bench
    from bench import harness

    # A tiny stand-in for the CIFAR set; ours runs in the interpreter.
    monkeypatch.setitem(bench.SETS, "cifar", {"groups": lambda: [(2, 20, 36), (1, 40, 24)], "steps": 3,
                                              "input_dtype": torch.float16})
    monkeypatch.setattr(bench, "count_launches", lambda fn: 7)
    impls = ["torch-eager", "ours-triton", "record-loop"]
    metadata = harness.collect_metadata("Fake GPU", harness.QUICK_TIMING)
    ceilings = {harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0, ms=1.0, detail="made up")}
    run = harness.BenchRun(bench.OP, title="t", out_root=tmp_path, metadata=metadata, ceilings=ceilings)
    timings = iter([2.0, 1.0, 4.0])  # ms, made up, in the order of impls
    bench.run_set(run, "cifar", impls, timer=lambda fn: (fn(), next(timings))[1], device="cpu")
    by_impl = {entry.impl: entry for entry in run.entries}
    assert list(by_impl) == impls
    for entry in run.entries:
        assert entry.error is None and entry.checks["ok"], entry
        assert entry.work == {"flops": bench.flops([(2, 20, 36), (1, 40, 24)], 3, symmetric=False)}
        assert entry.extra["launches"] == 7
        assert "speedup_vs_torch_compile" not in entry.extra  # torch-compile was not run
    assert by_impl["ours-triton"].extra["tflops_symmetric_work"] >= 0
    assert by_impl["ours-triton"].ms == 1.0


def test_bench_polar_express_variant_is_checked_against_its_own_schedule(tmp_path, monkeypatch):
    from bench import bench_newton_schulz as bench
    from bench import harness

    # Tiny stand-ins (one tile, to keep the interpreter fast): a 5-step "gpt" set, where
    # Polar Express runs, and a 3-step "cifar" set, where it is refused.
    monkeypatch.setitem(bench.SETS, "gpt", {"groups": lambda: [(2, 20, 36)], "steps": 5,
                                            "input_dtype": torch.float32})
    monkeypatch.setitem(bench.SETS, "cifar", {"groups": lambda: [(1, 20, 36)], "steps": 3,
                                              "input_dtype": torch.float16})
    monkeypatch.setattr(bench, "count_launches", lambda fn: 16)
    metadata = harness.collect_metadata("Fake GPU", harness.QUICK_TIMING)
    run = harness.BenchRun(bench.OP, title="t", out_root=tmp_path, metadata=metadata, ceilings={})
    for set_name in ("gpt", "cifar"):
        bench.run_set(run, set_name, ["ours-triton-polar"], timer=lambda fn: 1.0, device="cpu")
    gpt, cifar = run.entries
    # Checked against the float64 Polar Express iteration: against NS5's it would be off by
    # far more than the tolerance (test_triton_polar_express_matches_float64_iteration).
    assert gpt.error is None and gpt.checks["ok"] and gpt.extra["coefficients"] == "polar_express", gpt
    assert cifar.ms is None and "polar_express is a 5-step schedule; the cifar set runs 3 steps" in cifar.error


def test_bench_chunk_option(capsys):
    from bench import bench_newton_schulz as bench

    assert bench.parse_args(["--chunk", "7"]).chunk == 7
    assert bench.parse_args([]).chunk is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--chunk", "0"])
    assert "--chunk: must be >= 1, got 0" in capsys.readouterr().err


def test_bench_without_gpu_exits_0():
    from bench import harness

    done = subprocess.run([sys.executable, "-m", "bench.bench_newton_schulz", "--quick"], cwd=harness.REPO_ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert harness.NO_GPU_MESSAGE in done.stdout
