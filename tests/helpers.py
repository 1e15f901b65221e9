"""Shared test utilities: the backend settings to sweep, relative error, forward+backward
runs on fresh leaf copies, and bitwise comparison of their results."""
import torch

BACKENDS = ["auto", "cuda", "triton", "reference"]


def rel_err(actual, expected, floor=1e-30):
    """||actual - expected|| / max(||expected||, floor) in float64.

    NaN anywhere gives NaN, which fails every `<` comparison.
    """
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def forward_backward(fn, inputs, upstream=None, *, seed=0, **kwargs):
    """(out, *grads) of out = fn(*inputs, **kwargs) backpropagated from `upstream`.

    The inputs are replaced by detached leaf copies, so the callers' tensors are untouched.
    `upstream` (cast to out's dtype) defaults to a fixed, non-uniform standard normal drawn
    from a generator seeded with `seed`.
    """
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(upstream.to(out.dtype))
    return (out.detach(), *[leaf.grad for leaf in leaves])


def assert_identical(actual, expected):
    """Every tensor of `actual` has the dtype and the exact values of its `expected` peer."""
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e)
