"""Causal attention with a sliding window and a document mask (the GPT record's attention).

Public op (contract below and in DESIGN.md §2.5; the spec is
`kernels.reference.sliding_window_attention`): `sliding_window_attention`.

Backends: only the reference exists yet, so every device and every backend setting runs
`kernels.reference` (dense: O(T^2) memory); the fast kernels will be added to the
dispatch table below.
"""
from __future__ import annotations

import torch

from kernels import _backend, _checks, reference

OP = "sliding_window_attention"
_backend.register_op(OP, ())

_ATTENTION = {"reference": reference.sliding_window_attention}

HEAD_DIMS = (64, 128)


def _validate(q, k, v, window, doc_ids, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, dtypes=_checks.HALF_DTYPES, ndim=4)
    _checks.same_dtype(q=q, k=k, v=v)
    _checks.same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape [B, T, H, D] {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    _checks.non_empty("q", q)
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"q, k, v head dim D must be one of {HEAD_DIMS}, got shape {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must have unit stride along D (other dims may be strided); "
                             f"got strides {tuple(t.stride())}: call .contiguous() first")
    if window is not None:
        _checks.number("window", window, positive=True, integer=True)
    if doc_ids is not None:
        _checks.tensor("doc_ids", doc_ids, dtypes=(torch.int32,), ndim=2)
        _checks.same_device(q=q, doc_ids=doc_ids)
        if doc_ids.shape != q.shape[:2]:
            raise ValueError(f"doc_ids must have shape [B, T] {tuple(q.shape[:2])}, "
                             f"got {tuple(doc_ids.shape)}")
    if scale is not None:
        _checks.number("scale", scale, positive=True)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             window: int | None = None, doc_ids: torch.Tensor | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """Causal, sliding-window, document-masked multi-head attention.

    Args:
        q, k, v: [B, T, H, D] bfloat16 or float16, one dtype, shape and device;
            D in (64, 128); unit stride along D (slices of a fused QKV tensor are fine).
        window: None (unlimited) or an int >= 1: query i attends key j only if i - j < window
            (window=1: each query sees only itself).
        doc_ids: None (one document per sequence) or [B, T] int32: query i attends key j
            only if doc_ids[b, j] == doc_ids[b, i].
        scale: None (D**-0.5) or a number > 0 multiplying q k^T.

    Returns:
        [B, T, H, D] in q's dtype: softmax over the allowed keys j <= i of scale * q_i.k_j,
        applied to v, computed in fp32.  Every query attends at least itself, so no row is
        fully masked.  Gradients for q, k and v.

    Backends: reference only for now (on every device and backend setting); the fast
    kernels will skip fully masked KV blocks so the work grows with T*window.  No host
    synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate(q, k, v, window, doc_ids, scale)
    implementation = _ATTENTION[_backend.choose(OP, q.device)]
    return implementation(q, k, v, window=window, doc_ids=doc_ids, scale=scale)
