"""relu2_mlp and linear_relu2: the public ops against the reference on the CPU, every error
path, compile tracing and backend routing.

No fast kernel exists yet, so on the CPU the public ops must be the reference exactly
(bitwise) under every backend setting.  The reference itself is checked in
tests/test_reference.py.
"""
import pytest
import torch

import kernels
from kernels import reference
from tests.helpers import BACKENDS, assert_identical, forward_backward


def mlp_inputs(lead=(3, 13), d=45, h=83, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    w_fc = (torch.randn(h, d, generator=gen) * d**-0.5).to(dtype)
    w_proj = (torch.randn(d, h, generator=gen) * h**-0.5).to(dtype)
    return x, w_fc, w_proj


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead", [(37,), (3, 13), ()])
def test_relu2_mlp_is_the_reference_under_every_backend(backend, dtype, lead):
    x, w_fc, w_proj = mlp_inputs(lead, dtype=dtype)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.relu2_mlp, [x, w_fc, w_proj], seed=1)
    assert_identical(result, forward_backward(reference.relu2_mlp, [x, w_fc, w_proj], seed=1))
    assert result[0].shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_relu2_is_the_reference_under_every_backend(backend, dtype):
    x, w, _ = mlp_inputs(dtype=dtype)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.linear_relu2, [x, w], seed=1)
    assert_identical(result, forward_backward(reference.linear_relu2, [x, w], seed=1))
    assert result[0].shape == (3, 13, 83)


def test_strided_rows_are_fine():
    x, w_fc, w_proj = mlp_inputs()
    x = x[:, ::2]  # strided leading dims, unit stride along D
    assert not x.is_contiguous()
    assert torch.equal(kernels.relu2_mlp(x, w_fc, w_proj), reference.relu2_mlp(x, w_fc, w_proj))


def test_backend_report_says_reference_everywhere():
    for op in ("relu2_mlp", "linear_relu2"):
        assert kernels.backends()["ops"][op] == {
            "kernels": [], "on_cuda_tensors": "reference", "on_cpu_tensors": "reference"}


def test_meta_tensors_at_the_speedrun_shapes():
    x = torch.empty(1, 48 * 1024, 768, dtype=torch.bfloat16, device="meta")
    w_fc = torch.empty(3072, 768, dtype=torch.bfloat16, device="meta")
    w_proj = torch.empty(768, 3072, dtype=torch.bfloat16, device="meta")
    assert kernels.relu2_mlp(x, w_fc, w_proj).shape == x.shape
    assert kernels.linear_relu2(x, w_fc).shape == (1, 48 * 1024, 3072)


# aot_eager runs the same ATen ops as eager, so traced and eager results are bitwise equal.

def test_relu2_mlp_compiles_with_fullgraph_and_matches_eager():
    compiled = torch.compile(kernels.relu2_mlp, backend="aot_eager", fullgraph=True)
    x, w_fc, w_proj = mlp_inputs()
    assert_identical(forward_backward(compiled, [x, w_fc, w_proj], seed=1),
                     forward_backward(kernels.relu2_mlp, [x, w_fc, w_proj], seed=1))


def test_linear_relu2_compiles_with_fullgraph_and_matches_eager():
    compiled = torch.compile(kernels.linear_relu2, backend="aot_eager", fullgraph=True)
    x, w, _ = mlp_inputs()
    assert_identical(forward_backward(compiled, [x, w], seed=1),
                     forward_backward(kernels.linear_relu2, [x, w], seed=1))


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
