"""The spec: every op of `kernels` in plain PyTorch, differentiable by autograd.

Fast backends are tested against these functions, and these are tested against
float64 (tests/test_reference.py).  They favour clarity over speed and memory: the
attention reference builds a dense [T, T] mask, the cross-entropy materializes fp32
logits.  They accept float64 inputs as well, so a test can run the same code as the
float64 oracle.  Argument validation lives in the public wrappers, not here.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32; fp64 stays fp64 (for the float64 oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcap(z: torch.Tensor, cap: float, kind: str | None, scale: float) -> torch.Tensor:
    """The capped logits s: cap*tanh(z/cap), cap*sigmoid(z/scale), or z itself."""
    if kind == "tanh":
        return cap * torch.tanh(z / cap)
    if kind == "sigmoid":
        return cap * torch.sigmoid(z / scale)
    return z


def softcap_cross_entropy(logits, targets, *, cap=30.0, kind="sigmoid", scale=7.5,
                          ignore_index=-100, reduction="mean"):
    """Loss_i = logsumexp(s_i) - s_i[t_i], s = softcap(logits), in fp32 (fp64 for fp64).

    Rows whose target equals ignore_index have loss 0 and exactly zero gradient and do
    not count in the mean (a mean over no rows is NaN, as in F.cross_entropy).  A
    target outside [0, V) that is not ignore_index makes its row's loss and gradient
    NaN; it is never used as an index.
    """
    n, v = logits.shape
    s = softcap(logits.to(_compute_dtype(logits.dtype)), cap, kind, scale)
    targets = targets.long()
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < v)
    # NaN over the whole row of an out-of-range target: loss and gradient both NaN.
    poison = torch.where(valid & ~in_range, float("nan"), 0.0).to(s.dtype)
    s = s + poison[:, None]
    safe_targets = torch.where(in_range, targets, 0)
    target_logit = s.gather(1, safe_targets[:, None]).squeeze(1)
    row_loss = torch.where(valid, torch.logsumexp(s, dim=1) - target_logit, 0.0)
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / valid.sum()
