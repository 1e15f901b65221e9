"""Batched Newton-Schulz orthogonalization, the inner step of the Muon optimizer.

Public op (contract below and in DESIGN.md §2.3; the spec is
`kernels.reference.newton_schulz`): `newton_schulz`.

Backends: only the reference exists yet, so every device and every backend setting runs
`kernels.reference`; the fast kernels will be added to the dispatch table below.
"""
from __future__ import annotations

import torch

from kernels import _backend, _checks, reference

OP = "newton_schulz"
_backend.register_op(OP, ())

_NEWTON_SCHULZ = {"reference": reference.newton_schulz}

INPUT_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _validate_triple(name, triple):
    if not isinstance(triple, (tuple, list)) or len(triple) != 3:
        raise TypeError(f"{name} must be an (a, b, c) triple of numbers, got {triple!r}")
    for index, value in enumerate(triple):
        _checks.number(f"{name}[{index}]", value)


def _validate_coefficients(coefficients, steps):
    """One (a, b, c) triple, or a sequence of exactly `steps` triples."""
    if not isinstance(coefficients, (tuple, list)):
        raise TypeError("coefficients must be an (a, b, c) triple or a sequence of `steps` triples, "
                        f"got {type(coefficients).__name__}")
    if not coefficients or not all(isinstance(c, (tuple, list)) for c in coefficients):
        if len(coefficients) != 3:
            raise ValueError(f"coefficients must be an (a, b, c) triple or a sequence of `steps` triples, "
                             f"got {len(coefficients)} entries")
        _validate_triple("coefficients", coefficients)
        return
    if len(coefficients) != steps:
        raise ValueError(f"coefficients holds {len(coefficients)} per-step triples but steps={steps}; "
                         "give one triple per step, or a single triple for all steps")
    for index, triple in enumerate(coefficients):
        _validate_triple(f"coefficients[{index}]", triple)


def newton_schulz(G: torch.Tensor, *, steps: int = 5,
                  coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalize every matrix of G with Muon's quintic Newton-Schulz iteration.

    Args:
        G: [..., m, n] float32, float16, bfloat16 or float64, any strides, not empty.
            Leading dims are a batch: all matrices go through one batched computation.
        steps: number of iterations, >= 1 (Muon in the GPT record: 5; CIFAR record: 3).
        coefficients: one (a, b, c) triple used at every step, or a sequence of `steps`
            triples, one per step.
        eps: >= 0, added to the Frobenius norm before dividing.
        dtype: torch.bfloat16 or torch.float16, the dtype the iteration runs in.

    Returns:
        [..., m, n] in `dtype`.  Per matrix: X = dtype(G); transposed if m > n (so the
        Gram matrix is the smaller one); X = X / (||X||_F + eps); each step
        A = X X^T, B = bA + cA^2, X = aX + BX (matmuls accumulate in fp32, results
        rounded to `dtype`); transposed back.  With the default coefficients the singular
        values of the result land near [0.7, 1.2] rather than exactly at 1, except for
        directions whose singular value in G is tiny relative to ||G||_F.

    Autograd differentiates the reference; Muon does not need it.  Backends: reference
    only for now (on every device and backend setting).  No host synchronization;
    traces under torch.compile(fullgraph=True).
    """
    _checks.tensor("G", G, dtypes=INPUT_DTYPES, min_ndim=2)
    _checks.non_empty("G", G)
    _checks.number("steps", steps, positive=True, integer=True)
    _validate_coefficients(coefficients, steps)
    _checks.number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _checks.HALF_DTYPES:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    implementation = _NEWTON_SCHULZ[_backend.choose(OP, G.device)]
    return implementation(G, steps=steps, coefficients=coefficients, eps=eps, dtype=dtype)
