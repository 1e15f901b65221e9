"""The GPT block's MLP: relu(x W_fc^T)^2 W_proj^T, and its fused first half.

Public ops (contract below and in DESIGN.md §2.4; the spec is `kernels.reference`):

  relu2_mlp      relu(x @ w_fc^T)^2 @ w_proj^T
  linear_relu2   relu(x @ w^T)^2

Backends: only the reference exists yet, so every device and every backend setting runs
`kernels.reference`; the fast kernels will be added to the dispatch tables below.
"""
from __future__ import annotations

import torch

from kernels import _backend, _checks, reference

OP_MLP = "relu2_mlp"
OP_LINEAR = "linear_relu2"
_backend.register_op(OP_MLP, ())
_backend.register_op(OP_LINEAR, ())

_RELU2_MLP = {"reference": reference.relu2_mlp}
_LINEAR_RELU2 = {"reference": reference.linear_relu2}


def _unit_stride_rows(name, t):
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim; "
                         f"got strides {tuple(t.stride())}: call .contiguous() first")


def _validate_first_half(x, w, w_name):
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor(w_name, w, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.same_dtype(x=x, **{w_name: w})
    _checks.same_device(x=x, **{w_name: w})
    _checks.dim_size(w_name, w, 1, x.shape[-1], "x.shape[-1] (D)")
    _checks.non_empty("x", x)
    _checks.non_empty(w_name, w)
    _unit_stride_rows("x", x)
    _unit_stride_rows(w_name, w)


def linear_relu2(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The MLP's first half, fused: relu(x @ w^T)^2.

    Args:
        x: [..., D] bfloat16 (training), float16 or float32; unit stride along D.
        w: [H, D], the same dtype; unit stride along D.

    Returns:
        [..., H] in the inputs' dtype, computed as eager PyTorch does (matmul with fp32
        accumulation, rounded; relu; square, rounded).  Gradients for x and w.

    Backends: reference only for now (on every device and backend setting).  No host
    synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate_first_half(x, w, "w")
    implementation = _LINEAR_RELU2[_backend.choose(OP_LINEAR, x.device)]
    return implementation(x, w)


def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The GPT block's MLP: relu(x @ w_fc^T)^2 @ w_proj^T.

    Args:
        x: [..., D] bfloat16 (training), float16 or float32; unit stride along D.
        w_fc: [H, D], the same dtype; unit stride along D.
        w_proj: [D, H], the same dtype; unit stride along H.

    Returns:
        [..., D] in the inputs' dtype, computed as eager PyTorch does: the hidden
        activation relu(x @ w_fc^T)^2 is rounded to that dtype before the second matmul.
        Gradients for x, w_fc and w_proj.

    Backends: reference only for now (on every device and backend setting).  No host
    synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate_first_half(x, w_fc, "w_fc")
    _checks.tensor("w_proj", w_proj, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.same_dtype(x=x, w_proj=w_proj)
    _checks.same_device(x=x, w_proj=w_proj)
    _checks.dim_size("w_proj", w_proj, 0, x.shape[-1], "x.shape[-1] (D)")
    _checks.dim_size("w_proj", w_proj, 1, w_fc.shape[0], "w_fc.shape[0] (H)")
    _unit_stride_rows("w_proj", w_proj)
    implementation = _RELU2_MLP[_backend.choose(OP_MLP, x.device)]
    return implementation(x, w_fc, w_proj)
