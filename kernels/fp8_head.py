"""The FP8 LM head: per-tensor-scaled e4m3 matmul with e5m2 gradients, alone and fused
with the softcapped cross-entropy.

Public ops (contract below and in DESIGN.md §2.2; the spec is `kernels.reference`):

  fp8_linear                     y = x @ weight^T through e4m3, gradients through e5m2
  linear_softcap_cross_entropy   softcap_cross_entropy(head(x), targets)

Backends: only the reference exists yet, so every device and every backend setting runs
`kernels.reference`; the fast kernels will be added to the dispatch tables below.
"""
from __future__ import annotations

import torch

from kernels import _backend, _checks, reference, softcap_ce

OP_LINEAR = "fp8_linear"
OP_LINEAR_CE = "linear_softcap_cross_entropy"
_backend.register_op(OP_LINEAR, ())
_backend.register_op(OP_LINEAR_CE, ())

_FP8_LINEAR = {"reference": reference.fp8_linear}
_LINEAR_CE = {"reference": reference.linear_softcap_cross_entropy}

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def _validate_head(x, weight, x_dtypes, w_dtypes):
    _checks.tensor("x", x, dtypes=x_dtypes, ndim=2)
    _checks.tensor("weight", weight, dtypes=w_dtypes, ndim=2)
    _checks.same_device(x=x, weight=weight)
    _checks.dim_size("weight", weight, 1, x.shape[1], "x.shape[1] (K)")
    _checks.non_empty("x", x)
    _checks.non_empty("weight", weight)
    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along K (rows may be strided); "
                             f"got strides {tuple(t.stride())}: call .contiguous() first")


def _validate_scales(x_scale, w_scale, grad_scale):
    _checks.number("x_scale", x_scale, positive=True)
    _checks.number("w_scale", w_scale, positive=True)
    _checks.number("grad_scale", grad_scale, positive=True)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, *, x_scale: float = 2.0, w_scale: float = 2.0**9,
               grad_scale: float = 2.0**19) -> torch.Tensor:
    """The 2025-01 record's FP8 LM head: y = x @ weight^T computed in float8.

    Args:
        x: [N, K] bfloat16, unit stride along K.
        weight: [V, K] float32 (the record's head weight) or bfloat16, unit stride along K.
        x_scale, w_scale, grad_scale: positive per-tensor scales (the record: 2, 2**9, 2**19).

    Returns:
        y: [N, V] bfloat16, y = (x8 @ w8^T) / (x_scale * w_scale) with
        x8 = e4m3(x * x_scale), w8 = e4m3(weight * w_scale), accumulated in fp32.

    Gradients: g8 = e5m2(grad * grad_scale); dx = (g8 @ w8) / (grad_scale * w_scale) in
    bf16; dW = (g8^T @ x8) / (grad_scale * x_scale) accumulated in fp32 and returned in
    weight's dtype.  Nothing is clamped: out-of-range values follow the fp8 casts
    (e4m3fn saturates at +-448, e5m2 overflows to +-inf).

    Backends: reference only for now (on every device and backend setting).  No host
    synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate_head(x, weight, (torch.bfloat16,), WEIGHT_DTYPES)
    _validate_scales(x_scale, w_scale, grad_scale)
    implementation = _FP8_LINEAR[_backend.choose(OP_LINEAR, x.device)]
    return implementation(x, weight, x_scale=x_scale, w_scale=w_scale, grad_scale=grad_scale)


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                 fp8: bool = True, x_scale: float = 2.0, w_scale: float = 2.0**9,
                                 grad_scale: float = 2.0**19, cap: float = 30.0,
                                 kind: str | None = "sigmoid", scale: float = 7.5,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The LM head and the softcapped cross-entropy: softcap_cross_entropy(head(x), targets).

    Args:
        x: [N, K]; bfloat16 if fp8, else float32, float16 or bfloat16.  Unit stride along K.
        weight: [V, K]; float32 or bfloat16 if fp8, else any of the three (cast to x's
            dtype).  Unit stride along K.
        targets: [N] int32 or int64.
        fp8: head = fp8_linear(x, weight, x_scale=..., w_scale=..., grad_scale=...)
            (bf16 logits) if True, else x @ weight^T in x's dtype.
        cap, kind, scale, ignore_index, reduction: as softcap_cross_entropy (kind in
            "tanh", "sigmoid", None; reduction in "mean", "sum", "none").

    Returns:
        The loss in float32: a scalar, or [N] for reduction="none".

    Gradients for x and weight (through the FP8 head's e5m2 gradient path when fp8).
    Backends: reference only for now, which materializes the [N, V] logits; a fused
    kernel need not.  No host synchronization; traces under torch.compile(fullgraph=True).
    """
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {type(fp8).__name__}")
    if fp8:
        _validate_head(x, weight, (torch.bfloat16,), WEIGHT_DTYPES)
    else:
        _validate_head(x, weight, _checks.FLOAT_DTYPES, _checks.FLOAT_DTYPES)
    _validate_scales(x_scale, w_scale, grad_scale)
    _checks.tensor("targets", targets, dtypes=_checks.INDEX_DTYPES, ndim=1)
    _checks.same_device(x=x, targets=targets)
    _checks.dim_size("targets", targets, 0, x.shape[0], "x.shape[0] (N)")
    _checks.choice("kind", kind, tuple(softcap_ce.KIND_CODES))
    _checks.choice("reduction", reduction, softcap_ce.REDUCTIONS)
    _checks.number("cap", cap, positive=True)
    _checks.number("scale", scale, positive=True)
    _checks.number("ignore_index", ignore_index, integer=True)
    implementation = _LINEAR_CE[_backend.choose(OP_LINEAR_CE, x.device)]
    return implementation(x, weight, targets, fp8=fp8, x_scale=x_scale, w_scale=w_scale,
                          grad_scale=grad_scale, cap=cap, kind=kind, scale=scale,
                          ignore_index=ignore_index, reduction=reduction)
