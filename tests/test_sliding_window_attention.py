"""sliding_window_attention: the public op against the reference on the CPU, every error
path, compile tracing and backend routing.

No fast kernel exists yet, so on the CPU the public op must be the reference exactly
(bitwise) under every backend setting.  The reference itself is checked in
tests/test_reference.py.
"""
import pytest
import torch

import kernels
from kernels import reference
from tests.helpers import BACKENDS, assert_identical, forward_backward


def qkv(b=2, t=37, h=2, d=64, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, d, generator=gen).to(dtype) for _ in range(3)]


def documents(b=2, t=37, seed=1):
    starts = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.15
    return torch.cumsum(starts.int(), dim=1).int()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 128)])
@pytest.mark.parametrize("window,with_docs,scale", [(None, False, None), (9, True, 0.12), (1, True, None)])
def test_is_the_reference_under_every_backend(backend, dtype, d, window, with_docs, scale):
    q, k, v = qkv(d=d, dtype=dtype)
    kwargs = dict(window=window, doc_ids=documents() if with_docs else None, scale=scale)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.sliding_window_attention, [q, k, v], seed=2, **kwargs)
    assert_identical(result, forward_backward(reference.sliding_window_attention, [q, k, v], seed=2,
                                              **kwargs))
    assert result[0].shape == q.shape


def test_slices_of_a_fused_qkv_tensor_are_fine():
    # The model projects to [B, T, 3, H, D] and slices: strided views with unit stride in D.
    fused = torch.randn(2, 37, 3, 2, 64).bfloat16()
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    assert torch.equal(kernels.sliding_window_attention(q, k, v, window=5),
                       reference.sliding_window_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                          window=5))


def test_backend_report_says_reference_everywhere():
    assert kernels.backends()["ops"]["sliding_window_attention"] == {
        "kernels": [], "on_cuda_tensors": "reference", "on_cpu_tensors": "reference"}


def test_meta_tensors():
    q = torch.empty(1, 4096, 6, 128, dtype=torch.bfloat16, device="meta")
    doc_ids = torch.empty(1, 4096, dtype=torch.int32, device="meta")
    out = kernels.sliding_window_attention(q, q, q, window=1792, doc_ids=doc_ids, scale=0.12)
    assert out.shape == q.shape and out.dtype == torch.bfloat16


# aot_eager runs the same ATen ops as eager, so traced and eager results are bitwise equal.

def test_compiles_with_fullgraph_and_matches_eager():
    q, k, v = qkv()
    doc_ids = documents()

    def attend(a, b, c):
        return kernels.sliding_window_attention(a, b, c, window=7, doc_ids=doc_ids, scale=0.12)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert_identical(forward_backward(compiled, [q, k, v], seed=2),
                     forward_backward(attend, [q, k, v], seed=2))


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("make_args,exc,match", [
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "q must have dtype"),
    (lambda q, k, v: (q, k.float(), v), TypeError, "k must have dtype"),
    (lambda q, k, v: (q, k, v.half()), TypeError, "v has dtype torch.float16 but q has torch.bfloat16"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k[None], v), ValueError, "k must be 4-D"),
    (lambda q, k, v: (q, k[:, :20], v), ValueError, "k must have q's shape"),
    (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "v must have q's shape"),
    (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "q must not be empty"),
    (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), ValueError, "head dim D must be one of"),
    (lambda q, k, v: tuple(torch.zeros(2, 5, 1, 96, dtype=torch.bfloat16) for _ in range(3)),
     ValueError, "head dim D must be one of"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k is on meta"),
    (lambda q, k, v: (q.transpose(1, 3).contiguous().transpose(1, 3), k, v), ValueError,
     "q must have unit stride along D"),
    (lambda q, k, v: (q, k, v.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "v must have unit stride along D"),
])
def test_bad_tensors_raise_naming_them(make_args, exc, match):
    with pytest.raises(exc, match=match):
        kernels.sliding_window_attention(*make_args(*qkv()))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"window": 0}, ValueError, "window must be > 0"),
    ({"window": -3}, ValueError, "window must be > 0"),
    ({"window": 4.0}, TypeError, "window must be an int"),
    ({"window": True}, TypeError, "window must be an int"),
    ({"window": torch.tensor(4)}, TypeError, "window must be an int"),
    ({"doc_ids": documents().long()}, TypeError, "doc_ids must have dtype"),
    ({"doc_ids": documents().float()}, TypeError, "doc_ids must have dtype"),
    ({"doc_ids": documents()[0]}, ValueError, "doc_ids must be 2-D"),
    ({"doc_ids": documents(t=36)}, ValueError, r"doc_ids must have shape \[B, T\]"),
    ({"doc_ids": documents(b=1)}, ValueError, r"doc_ids must have shape \[B, T\]"),
    ({"doc_ids": documents().to("meta")}, ValueError, "doc_ids is on meta"),
    ({"doc_ids": [[0] * 37] * 2}, TypeError, "doc_ids must be a torch.Tensor"),
    ({"scale": 0.0}, ValueError, "scale must be > 0"),
    ({"scale": "0.12"}, TypeError, "scale must be a number"),
])
def test_bad_options_raise_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kernels.sliding_window_attention(*qkv(), **kwargs)
