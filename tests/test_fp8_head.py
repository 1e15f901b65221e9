"""fp8_linear and linear_softcap_cross_entropy: the public ops against the reference on the
CPU, every error path, compile tracing and backend routing.

No fast kernel exists yet, so on the CPU the public ops must be the reference exactly
(bitwise) under every backend setting.  The reference itself is checked in
tests/test_reference.py.
"""
import pytest
import torch

import kernels
from kernels import reference
from tests.helpers import BACKENDS, assert_identical, forward_backward


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
def test_fp8_linear_is_the_reference_under_every_backend(backend, w_dtype):
    x, weight, _, upstream = head_inputs(w_dtype=w_dtype)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.fp8_linear, [x, weight], upstream)
    assert_identical(result, forward_backward(reference.fp8_linear, [x, weight], upstream))
    assert result[0].dtype == torch.bfloat16 and result[2].dtype == w_dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8,x_dtype", [(True, torch.bfloat16), (False, torch.float32),
                                         (False, torch.float16)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_softcap_ce_is_the_reference_under_every_backend(backend, fp8, x_dtype, reduction):
    x, weight, targets, _ = head_inputs()
    x = x.to(x_dtype)
    upstream = torch.full((37,) if reduction == "none" else (), 1e-3)
    kwargs = dict(targets=targets, fp8=fp8, reduction=reduction, kind="tanh", cap=15.0)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.linear_softcap_cross_entropy, [x, weight], upstream,
                                  **kwargs)
    assert_identical(result, forward_backward(reference.linear_softcap_cross_entropy, [x, weight],
                                              upstream, **kwargs))
    assert all(torch.isfinite(t).all() for t in result)


def test_scales_are_passed_through():
    x, weight, _, upstream = head_inputs()
    scales = dict(x_scale=4.0, w_scale=2.0**7, grad_scale=2.0**17)
    assert_identical(forward_backward(kernels.fp8_linear, [x, weight], upstream, **scales),
                     forward_backward(reference.fp8_linear, [x, weight], upstream, **scales))
    assert not torch.equal(kernels.fp8_linear(x, weight, **scales), kernels.fp8_linear(x, weight))


def test_backend_report_says_reference_everywhere():
    for op in ("fp8_linear", "linear_softcap_cross_entropy"):
        assert kernels.backends()["ops"][op] == {
            "kernels": [], "on_cuda_tensors": "reference", "on_cpu_tensors": "reference"}


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
