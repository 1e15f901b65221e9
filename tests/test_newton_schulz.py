"""newton_schulz: the public op against the reference on the CPU, every error path, compile
tracing and backend routing.

No fast kernel exists yet, so on the CPU the public op must be the reference exactly
(bitwise) under every backend setting.  The reference itself is checked in
tests/test_reference.py.
"""
import pytest
import torch

import kernels
from kernels import reference
from tests.helpers import BACKENDS

NS5 = (3.4445, -4.7750, 2.0315)


def stack(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_dtype,dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float16), (torch.float16, torch.float16)])
def test_is_the_reference_under_every_backend(backend, input_dtype, dtype):
    G = stack(3, 37, 53, dtype=input_dtype)
    with kernels.use_backend(backend):
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
def test_options_are_passed_through(kwargs):
    G = stack(2, 41, 19)
    assert torch.equal(kernels.newton_schulz(G, **kwargs), reference.newton_schulz(G, **kwargs))


@pytest.mark.parametrize("shape", [(29, 67), (67, 29), (4, 3, 2, 11, 13)])
def test_tall_wide_and_batched(shape):
    G = stack(*shape)
    assert torch.equal(kernels.newton_schulz(G), reference.newton_schulz(G))


def test_strided_input_is_fine():
    G = stack(5, 40, 60)[::2, :, 7:50]  # a non-contiguous view: read once into the working copy
    assert not G.is_contiguous()
    assert torch.equal(kernels.newton_schulz(G), reference.newton_schulz(G.contiguous()))


def test_backend_report_says_reference_everywhere():
    assert kernels.backends()["ops"]["newton_schulz"] == {
        "kernels": [], "on_cuda_tensors": "reference", "on_cpu_tensors": "reference"}


def test_meta_tensors_at_the_speedrun_shapes():
    # The GPT's stacks: 768x768 (attention) and 768x3072 (MLP) matrices.
    for shape in [(24, 768, 768), (24, 768, 3072), (24, 3072, 768)]:
        out = kernels.newton_schulz(torch.empty(shape, device="meta"))
        assert out.shape == shape and out.dtype == torch.bfloat16


def test_compiles_with_fullgraph_and_matches_eager():
    G = stack(3, 37, 53)

    def orthogonalize(g):
        return kernels.newton_schulz(g, coefficients=[NS5] * 4 + [(1.5, -0.5, 0.0)])

    compiled = torch.compile(orthogonalize, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(G), orthogonalize(G))


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("G,exc,match", [
    (stack(2, 3).tolist(), TypeError, "G must be a torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.int32), TypeError, "G must have dtype"),
    (stack(2, 3, dtype=torch.complex64), TypeError, "G must have dtype"),
    (stack(5), ValueError, "G must have at least 2 dims"),
    (stack(0, 5, 3), ValueError, "G must not be empty"),
    (stack(4, 0), ValueError, "G must not be empty"),
])
def test_bad_input_raises_naming_it(G, exc, match):
    with pytest.raises(exc, match=match):
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
    ({"eps": -1e-7}, ValueError, "eps must be >= 0"),
    ({"eps": None}, TypeError, "eps"),
    ({"dtype": torch.float32}, TypeError, "dtype must be torch.bfloat16 or torch.float16"),
    ({"dtype": torch.float64}, TypeError, "dtype must be torch.bfloat16 or torch.float16"),
    ({"dtype": "bfloat16"}, TypeError, "dtype must be a torch.dtype"),
])
def test_bad_options_raise_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kernels.newton_schulz(stack(4, 6), **kwargs)
