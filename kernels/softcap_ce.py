"""Fused softcapped cross-entropy: loss and logits gradient in one pass over the logits.

The public op `softcap_cross_entropy` (contract below and in DESIGN.md §2.1; the spec is
`kernels.reference.softcap_cross_entropy`) runs one of:

  cuda       csrc/softcap_ce.cu (torch.ops.speedrun_cuda.softcap_ce_forward): the row is
             staged in shared memory (16-bit logits, capped kinds) or cached in registers,
             and the logits are read from memory exactly once.
  triton     the kernels in this file: a row of <= 16384 columns is one block read once;
             a longer one gets an online max/sum-exp sweep, then a gradient sweep that
             re-reads it from L2 (a persistent grid keeps the rows in flight inside L2).
  reference  plain PyTorch.

How the fast path works.  The training step wants d(loss)/d(logits) anyway, so the
forward computes it while the logits are in flight and keeps it: backward is then almost
free.  The gradient is computed for an incoming gradient of 1 with the mean's 1/count
already folded in (count is taken on the device, no host sync).  Backward multiplies the
kept gradient in place by the incoming gradient, on the device, skipping every row whose
factor is exactly 1 — so the usual `loss.backward()` costs one tiny launch, and only a
loss scaler or a `reduction="none"` loss with non-unit weights pays a pass over it.
A second backward through the same graph (retain_graph=True) raises instead of scaling
twice, through autograd's in-place check on the kept gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _backend, _checks, reference

OP = "softcap_cross_entropy"
_backend.register_op(OP, ("cuda", "triton"))

KIND_CODES = {None: 0, "tanh": 1, "sigmoid": 2}
REDUCTIONS = ("mean", "sum", "none")


def fixed_reference(cap: float, kind: str | None) -> bool:
    """Whether the cap bound can replace the row max as the softmax reference.

    s is bounded by cap for the capped kinds, and exp(s - cap) >= exp(-2 cap) (tanh) or
    exp(-cap) (sigmoid) stays a normal fp32 for these caps, so the sum-exp needs no
    running max: one exp per element instead of two.  The CUDA kernel uses the same rule.
    """
    return (kind == "tanh" and cap <= 40.0) or (kind == "sigmoid" and cap <= 80.0)


# ---- Triton kernels ------------------------------------------------------------------

@triton.jit
def _capped(z, cap, inv_cap, inv_scale, KIND: tl.constexpr):
    if KIND == 1:  # cap * tanh(z / cap), as 1 - 2 / (exp(2x) + 1): saturates cleanly
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * z * inv_cap) + 1.0))
    elif KIND == 2:  # cap * sigmoid(z / scale)
        return cap / (1.0 + tl.exp(-z * inv_scale))
    else:
        return z


@triton.jit
def _capped_derivative(s, inv_cap, inv_scale, KIND: tl.constexpr):
    """ds/dz written through s, so no second transcendental is needed."""
    if KIND == 1:
        return 1.0 - (s * inv_cap) * (s * inv_cap)
    elif KIND == 2:
        return s * (1.0 - s * inv_cap) * inv_scale
    else:
        return tl.full(s.shape, 1.0, tl.float32)


@triton.jit
def _softcap_ce_row(
    row, logits_ptr, targets_ptr, grad_scale_ptr, loss_ptr, grad_ptr,
    n_cols, logits_row_stride, ignore_index, cap, inv_cap, inv_scale,
    KIND: tl.constexpr, FIXED_REFERENCE: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, ONE_READ: tl.constexpr,
):
    """loss[row] and, if NEED_GRAD, grad[row, :].

    ONE_READ (BLOCK >= n_cols): the whole row is one block held in registers, so the
    gradient is computed from the values of the first sweep and the row is read once."""
    row_logits = logits_ptr + row * logits_row_stride
    offsets = tl.arange(0, BLOCK)

    # Sweep 1: per-lane running max and sum of exp(s - max), merged at the end.
    if FIXED_REFERENCE:
        lane_max = tl.full([BLOCK], cap, tl.float32)
    else:
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    if ONE_READ:  # the same update, once, for the single block; s stays live for sweep 2
        in_row = offsets < n_cols
        z = tl.load(row_logits + offsets, mask=in_row, other=0.0).to(tl.float32)
        s = tl.where(in_row, _capped(z, cap, inv_cap, inv_scale, KIND), float("-inf"))
        if FIXED_REFERENCE:
            lane_sum = tl.exp(s - lane_max)
        else:
            shift = tl.where(s > float("-inf"), s, 0.0)
            lane_sum = tl.exp(s - shift)
            lane_max = s
    if not ONE_READ:
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            in_row = cols < n_cols
            z = tl.load(row_logits + cols, mask=in_row, other=0.0).to(tl.float32)
            s = tl.where(in_row, _capped(z, cap, inv_cap, inv_scale, KIND), float("-inf"))
            if FIXED_REFERENCE:
                lane_sum += tl.exp(s - lane_max)
            else:
                new_max = tl.maximum(lane_max, s)
                # A lane that has seen only -inf keeps sum 0: shifting by 0 instead of -inf
                # avoids exp(-inf - -inf) = NaN.
                shift = tl.where(new_max > float("-inf"), new_max, 0.0)
                lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(s - shift)
                lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    row_shift = tl.where(row_max > float("-inf"), row_max, 0.0)
    lse = row_shift + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_shift), axis=0))

    # The row's target: ignored -> loss 0 and zero gradient; out of [0, V) -> NaN loss and
    # NaN gradient, and the target is never used as an address.
    target = tl.load(targets_ptr + row).to(tl.int64)
    kept = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    safe_target = tl.where(in_range, target, 0)
    z_target = tl.load(row_logits + safe_target).to(tl.float32)
    s_target = tl.where(in_range, _capped(z_target, cap, inv_cap, inv_scale, KIND), float("nan"))
    tl.store(loss_ptr + row, tl.where(kept, lse - s_target, 0.0))

    if NEED_GRAD:
        grad_scale = tl.load(grad_scale_ptr)
        row_factor = tl.where(kept, tl.where(in_range, grad_scale, float("nan")), 0.0)
        row_grad = grad_ptr + row * n_cols
        if ONE_READ:  # s of the single block is still in registers
            in_row = offsets < n_cols
            prob = tl.exp(s - lse)
            onehot = tl.where(offsets == target, 1.0, 0.0)
            g = (prob - onehot) * _capped_derivative(s, inv_cap, inv_scale, KIND) * row_factor
            tl.store(row_grad + offsets, g.to(grad_ptr.dtype.element_ty), mask=in_row)
        # Sweep 2: gradient, re-reading the row.
        if not ONE_READ:
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                in_row = cols < n_cols
                z = tl.load(row_logits + cols, mask=in_row, other=0.0).to(tl.float32)
                s = _capped(z, cap, inv_cap, inv_scale, KIND)
                prob = tl.exp(s - lse)
                onehot = tl.where(cols == target, 1.0, 0.0)
                g = (prob - onehot) * _capped_derivative(s, inv_cap, inv_scale, KIND) * row_factor
                tl.store(row_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _softcap_ce_forward_kernel(
    logits_ptr, targets_ptr, grad_scale_ptr, loss_ptr, grad_ptr,
    n_rows, n_cols, logits_row_stride, ignore_index, cap, inv_cap, inv_scale,
    KIND: tl.constexpr, FIXED_REFERENCE: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, ONE_READ: tl.constexpr,
):
    """Program p handles rows p, p + P, p + 2P, ... of n_rows, where P is the grid size.

    The launcher gives ONE_READ rows one program each (P = n_rows) and long rows a
    persistent grid small enough that the rows in flight stay in L2 between the two
    sweeps (see _programs)."""
    # rows * V exceeds 2**31 at the speedrun's shapes: an int64 start and step make the row
    # index, and so every address, int64.
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0).to(tl.int64)):
        _softcap_ce_row(row, logits_ptr, targets_ptr, grad_scale_ptr, loss_ptr, grad_ptr,
                        n_cols, logits_row_stride, ignore_index, cap, inv_cap, inv_scale,
                        KIND, FIXED_REFERENCE, NEED_GRAD, BLOCK, ONE_READ)


@triton.jit
def _scale_rows_kernel(grad_ptr, factor_ptr, n_cols, factor_stride, BLOCK: tl.constexpr):
    """grad[row, :] *= factor[row * factor_stride]; a factor of exactly 1 skips the row."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(factor_ptr + row * factor_stride)
    if factor != 1.0:
        row_grad = grad_ptr + row * n_cols
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < n_cols
            g = tl.load(row_grad + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(row_grad + cols, (g * factor).to(grad_ptr.dtype.element_ty), mask=in_row)


ONE_READ_MAX_COLS = 16384  # 16 warps x 32 lanes x 32 fp32 values of s per thread


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    """Chunk width per sweep step and warps per program (tuned on an H100: see bench/NOTES.md).

    A row of <= ONE_READ_MAX_COLS is one block (read once); longer rows sweep in 4096s."""
    limit = ONE_READ_MAX_COLS if n_cols <= ONE_READ_MAX_COLS else 4096
    block = min(triton.next_power_of_2(n_cols), limit)
    return block, max(1, min(16, block // 256))


# Long rows are swept twice, and the second sweep should find the row in L2.  With one
# program per row every resident program (up to 4 x 16-warp programs per SM) has a row in
# flight at a different point of its sweeps: at the speedrun's V = 50304 bf16 a row is
# 100.6 KB, and 132 SMs x 4 = 528 rows = 53 MB > the H100's 50 MB L2, so the re-read goes
# to DRAM.  A persistent grid of SMs x PROGRAMS_PER_SM programs, each looping over rows,
# caps the rows in flight at 132 x 2 = 264 rows = 26.5 MB, half the L2, leaving room for
# the gradient being written and other traffic.
PROGRAMS_PER_SM = 2
# The interpreter has no SMs; a small fixed grid still makes its programs loop over rows.
INTERPRETER_PROGRAMS = 4


def _programs(n_rows: int, one_read: bool, device: torch.device) -> int:
    """Grid size of the forward kernel: one program per row when the row is read once."""
    if one_read:
        return n_rows
    if device.type == "cuda":  # a cached property query: no host sync, fine under capture
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(n_rows, sms * PROGRAMS_PER_SM)
    return min(n_rows, INTERPRETER_PROGRAMS)


def _forward_triton(logits, targets, grad_scale, cap, kind, scale, ignore_index, need_grad):
    n, v = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    grad = torch.empty((n, v) if need_grad else (0,), device=logits.device, dtype=logits.dtype)
    if n == 0:
        return loss, grad
    block, warps = _block_and_warps(v)
    _softcap_ce_forward_kernel[(_programs(n, block >= v, logits.device),)](
        logits, targets, grad_scale, loss, grad if need_grad else loss,
        n, v, logits.stride(0), ignore_index, cap, 1.0 / cap, 1.0 / scale,
        KIND=KIND_CODES[kind], FIXED_REFERENCE=fixed_reference(cap, kind), NEED_GRAD=need_grad,
        BLOCK=block, ONE_READ=block >= v, num_warps=warps,
    )
    return loss, grad


def _scale_rows_triton(grad, factor):
    n, v = grad.shape
    if grad.numel() == 0:
        return
    block, warps = _block_and_warps(v)
    _scale_rows_kernel[(n,)](grad, factor, v, 0 if factor.numel() == 1 else 1, BLOCK=block, num_warps=warps)


def _forward_cuda(logits, targets, grad_scale, cap, kind, scale, ignore_index, need_grad):
    return torch.ops.speedrun_cuda.softcap_ce_forward(
        logits, targets, grad_scale, cap, KIND_CODES[kind], scale, ignore_index, need_grad)


def _scale_rows_cuda(grad, factor):
    torch.ops.speedrun_cuda.softcap_ce_scale_rows_(grad, factor)


_FORWARD = {"cuda": _forward_cuda, "triton": _forward_triton}
_SCALE_ROWS = {"cuda": _scale_rows_cuda, "triton": _scale_rows_triton}


# ---- custom ops --------------------------------------------------------------------
# kind travels as a string ("none" for None) because custom-op schemas have no Optional
# string default worth relying on; backend is fixed at trace time by the public function.

@torch.library.custom_op("kernels::softcap_ce", mutates_args=())
def _softcap_ce(logits: torch.Tensor, targets: torch.Tensor, cap: float, kind: str, scale: float,
                ignore_index: int, reduction: str, need_grad: bool, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d logits for an incoming gradient of 1); the second is [0] if not need_grad."""
    kind_or_none = None if kind == "none" else kind
    kept = targets != ignore_index
    count = kept.sum(dtype=torch.float32)
    grad_scale = (1.0 / count if reduction == "mean" else torch.ones_like(count)).reshape(1)
    row_loss, grad = _FORWARD[backend](logits, targets.contiguous(), grad_scale, cap, kind_or_none,
                                       scale, ignore_index, need_grad)
    if reduction == "none":
        return row_loss, grad
    total = row_loss.sum()
    return (total / count if reduction == "mean" else total), grad


@_softcap_ce.register_fake
def _softcap_ce_fake(logits, targets, cap, kind, scale, ignore_index, reduction, need_grad, backend):
    n, v = logits.shape
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    grad = logits.new_empty((n, v) if need_grad else (0,))
    return loss, grad


@torch.library.custom_op("kernels::softcap_ce_scale_grad_", mutates_args=("grad",))
def _softcap_ce_scale_grad_(grad: torch.Tensor, factor: torch.Tensor, backend: str) -> None:
    """grad[i, :] *= factor (scalar) or factor[i] (per row), skipping factors equal to 1."""
    _SCALE_ROWS[backend](grad, factor.to(torch.float32).contiguous())


@_softcap_ce_scale_grad_.register_fake
def _softcap_ce_scale_grad_fake(grad, factor, backend):
    return None


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _unused_grad_of_grad):
    (grad,) = ctx.saved_tensors
    _softcap_ce_scale_grad_(grad, grad_loss, ctx.backend)
    return grad, None, None, None, None, None, None, None, None


_softcap_ce.register_autograd(_backward, setup_context=_setup_context)


# ---- public op -----------------------------------------------------------------------

def _validate(logits, targets, cap, kind, scale, ignore_index, reduction):
    _checks.tensor("logits", logits, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.tensor("targets", targets, dtypes=_checks.INDEX_DTYPES, ndim=1)
    _checks.same_device(logits=logits, targets=targets)
    _checks.dim_size("targets", targets, 0, logits.shape[0], "logits.shape[0] (N)")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one column (V >= 1), got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along V (rows may be strided); "
                         f"got strides {tuple(logits.stride())}: call .contiguous() first")
    _checks.choice("kind", kind, tuple(KIND_CODES))
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.number("cap", cap, positive=True)
    _checks.number("scale", scale, positive=True)
    _checks.number("ignore_index", ignore_index, integer=True)


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, cap: float = 30.0,
                          kind: str | None = "sigmoid", scale: float = 7.5, ignore_index: int = -100,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softcapped logits, with the gradient computed in the same pass.

    Args:
        logits: [N, V] float32, float16 or bfloat16; unit stride along V.
        targets: [N] int32 or int64 class indices.
        cap, kind, scale: the softcap s = cap*tanh(z/cap) (kind="tanh"),
            s = cap*sigmoid(z/scale) (kind="sigmoid", the 2025-01 record: cap 30, scale 7.5),
            or s = z (kind=None).
        ignore_index: rows with this target have loss 0, exactly zero gradient, and are
            left out of the mean.
        reduction: "mean" (over kept rows; NaN if none is kept), "sum", or "none" ([N]).

    Returns:
        The loss in float32: a scalar, or [N] for reduction="none".

    Loss_i = logsumexp(s_i) - s_i[t_i] computed in fp32; the gradient w.r.t. logits has
    the logits' dtype.  fp32 copies of the logits are never materialized by the fast
    backends.  A target outside [0, V) that is not ignore_index gives a NaN loss and a
    NaN gradient row, never an out-of-bounds access.  No host synchronization: works
    under torch.compile(fullgraph=True) and CUDA graph capture.
    """
    _validate(logits, targets, cap, kind, scale, ignore_index, reduction)
    backend = _backend.choose(OP, logits.device)
    if backend == "reference":
        return reference.softcap_cross_entropy(logits, targets, cap=cap, kind=kind, scale=scale,
                                               ignore_index=ignore_index, reduction=reduction)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, _ = _softcap_ce(logits, targets, float(cap), kind or "none", float(scale), int(ignore_index),
                          reduction, need_grad, backend)
    return loss
