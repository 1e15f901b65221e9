"""The FP8 LM head: per-tensor-scaled e4m3 matmul with e5m2 gradients, alone and fused
with the softcapped cross-entropy.

Public ops (contract below and in DESIGN.md §2.2; the spec is `kernels.reference`):

  fp8_linear                     y = x @ weight^T through e4m3, gradients through e5m2
  linear_softcap_cross_entropy   softcap_cross_entropy(head(x), targets)

Backends:
  cuda       csrc/fp8_head.cu: fp8 casts that also write the transposed copies the
             backward GEMMs need (wgmma takes 8-bit operands only K-major), and one
             hand-written Hopper FP8 GEMM (TMA + wgmma, warp-specialized, persistent) for
             y = x8.w8^T, dx = g8.w8 and dW = g8^T.x8.
  triton     the Triton FP8 GEMM below (portable; fp8 dots are right in Triton's
             interpreter, so it is tested on the CPU), casts and transposes in torch.
  reference  plain PyTorch (kernels/reference.py), on CPU tensors under "auto".

The fused head + loss (fp8=True) never writes a bf16 logits gradient: it goes straight to
scaled e5m2, row-major and transposed, which the two backward GEMMs read.  Gradient bytes
written: 2 per logit (e5m2 + its transpose) instead of 2 (bf16) + 1 (cast) + 1
(transpose) and their re-reads on the record's path.  For a scalar loss (mean, sum) the
e5m2 gradient is that of upstream gradient 1, and the real upstream gradient multiplies
dx and dW after the GEMMs (DESIGN.md §2.2), so it can be written before the upstream
gradient exists:
  cuda    the forward's loss pass (the staged softcap CE kernel, one read of y) also
          writes g8, and a byte-transpose kernel g8^T; y is freed after the forward and
          the backward is the two GEMMs.  Where the staged kernel does not apply
          (_grad_in_forward) and for reduction="none", as triton:
  triton  the forward keeps the bf16 logits and per-row losses; the backward recomputes
          the gradient tile by tile from them and writes g8 and g8^T (ce_grad_e5m2).

Where the forward's loss comes from:
  triton  the y GEMM's epilogue also writes, per row and tile of columns, the sum of
          exp(s - cap) of the capped logits as stored (cap is a fixed softmax reference
          for the capped kinds, so partial sums need no max); a small kernel turns those
          partials and the target logits into the row losses.  y is read once in all,
          by the backward's gradient pass, for any upstream gradient.
  cuda    the softcap CE loss kernel reads y once more (the hand-written GEMM's
          epilogue does not compute the partials yet: bench/NOTES.md ## fp8_head); when
          it writes g8 too (above), that is y's only read.
  kind=None (no fixed reference) takes the loss-kernel path on both backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _backend, _checks, reference, softcap_ce

OP_LINEAR = "fp8_linear"
OP_LINEAR_CE = "linear_softcap_cross_entropy"
_backend.register_op(OP_LINEAR, ("cuda", "triton"))
_backend.register_op(OP_LINEAR_CE, ("cuda", "triton"))

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


# ---- Triton kernels ------------------------------------------------------------------

@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm, alpha,
                     stats_ptr, stride_stats, cap, inv_cap, inv_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr, KIND: tl.constexpr,
                     ROW_STATS: tl.constexpr):
    """c[M, N] = alpha * a[M, :K] @ b[N, :K]^T; a, b fp8 with unit stride along K.

    MAX_IMPRECISE_ACC: tl.dot's max_num_imprecise_acc (see _gemm_triton).
    ROW_STATS (the fused head's forward): also stats[m, pid_n] = sum over this tile's
    columns of exp(s - cap), s the softcap (KIND) of c as stored.  The capped logits are
    bounded by cap, so cap is a fixed softmax reference (softcap_ce.fixed_reference) and
    the per-tile partial sums add up to the row's sum-exp with no max to merge: the loss
    needs no pass over c.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_rows + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None], mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
    out = (acc * alpha).to(c_ptr.dtype.element_ty)
    if ROW_STATS:
        # From the rounded value the backward will read, so the loss and its gradient
        # describe the same logits.  Before the store: fewer registers live at once.
        s = softcap_ce._capped(out.to(tl.float32), cap, inv_cap, inv_scale, KIND)
        partial = tl.sum(tl.where(cols[None, :] < N, tl.exp(s - cap), 0.0), axis=1)
        tl.store(stats_ptr + rows.to(tl.int64) * stride_stats + pid_n, partial, mask=rows < M)
    c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _loss_from_row_stats_kernel(stats_ptr, logits_ptr, targets_ptr, loss_ptr, n_rows, n_tiles, n_cols,
                                stride_stats, stride_l, ignore_index, cap, inv_cap, inv_scale,
                                KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """loss[row] = lse - s[target] with lse = cap + log(sum of the row's tile partials).

    Reads N x tiles fp32 partials and one logit per row, not the [N, V] logits.  Targets
    as softcap_cross_entropy: ignored -> 0; out of [0, V) -> NaN, never an address.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    total = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        tiles = start + tl.arange(0, BLOCK_T)
        part = tl.load(stats_ptr + rows64[:, None] * stride_stats + tiles[None, :],
                       mask=row_ok[:, None] & (tiles[None, :] < n_tiles), other=0.0)
        total += tl.sum(part, axis=1)
    lse = cap + tl.log(tl.where(row_ok, total, 1.0))  # rows past the end: no log(0)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    kept = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    safe_target = tl.where(in_range & row_ok, target, 0)
    z_target = tl.load(logits_ptr + rows64 * stride_l + safe_target, mask=row_ok, other=0.0).to(tl.float32)
    s_target = tl.where(in_range, softcap_ce._capped(z_target, cap, inv_cap, inv_scale, KIND), float("nan"))
    tl.store(loss_ptr + rows, tl.where(kept, lse - s_target, 0.0), mask=row_ok)


@triton.jit
def _to_e5m2_bits(v):
    """Round-to-nearest-even of v (exactly representable in fp16) to e5m2, as uint8 bits.

    e5m2 is the top byte of fp16 (same exponent), so RNE is an integer add on the fp16 bits;
    inf and NaN map to inf and NaN, overflow past 61440 carries into inf.  Written out
    because Triton's interpreter loses the carry into the exponent when it casts fp32 to
    fp8 (1.9 -> 1.0); on a GPU this equals the hardware cast.
    """
    bits = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return ((bits + 0x7F + ((bits >> 8) & 1)) >> 8).to(tl.uint8)


@triton.jit
def _ce_grad_e5m2_kernel(logits_ptr, targets_ptr, loss_ptr, factor_ptr, g8_ptr, g8t_ptr,
                         n_rows, n_cols, stride_l, stride_g8, stride_g8t, factor_stride,
                         ignore_index, cap, inv_cap, inv_scale, grad_scale,
                         KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """g8 = e5m2(round(round(dloss/dz) * grad_scale)) of one [BLOCK_R, BLOCK_C] tile, and g8t its transpose.

    lse = loss + s[target] (the forward's loss is lse - s[target]); rounding is to the
    logits' dtype, as the unfused path (bf16 gradient, then grad.mul(grad_scale)) does.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    kept = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    safe_target = tl.where(in_range & row_ok, target, 0)
    z_target = tl.load(logits_ptr + rows64 * stride_l + safe_target, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.load(loss_ptr + rows, mask=row_ok, other=0.0) + tl.where(
        in_range, softcap_ce._capped(z_target, cap, inv_cap, inv_scale, KIND), 0.0)
    factor = tl.load(factor_ptr + rows64 * factor_stride, mask=row_ok, other=0.0)
    factor = tl.where(kept, tl.where(in_range, factor, float("nan")), 0.0)
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    z = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    s = softcap_ce._capped(z.to(tl.float32), cap, inv_cap, inv_scale, KIND)
    prob = tl.exp(s - lse[:, None])
    onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    g = (prob - onehot) * softcap_ce._capped_derivative(s, inv_cap, inv_scale, KIND) * factor[:, None]
    g = g.to(z.dtype).to(tl.float32)
    # The product rounded to the logits' dtype (bf16 or fp16) is exact in fp16 down to e5m2's
    # smallest subnormal, so _to_e5m2_bits rounds it once, like torch's cast.
    q = _to_e5m2_bits((g * grad_scale).to(z.dtype).to(tl.float32))
    tl.store(g8_ptr + rows64[:, None] * stride_g8 + cols[None, :], q, mask=mask)
    tl.store(g8t_ptr + cols.to(tl.int64)[None, :] * stride_g8t + rows[:, None], q, mask=mask)


# ---- accumulation ----------------------------------------------------------------------
# Hopper's fp8 wgmma keeps its running fp32 sum with ~14 significant bits (truncated; the
# DeepSeek-V3 report measures it): one chain over K = 50304 loses a few % (the error model
# and its emulation: tests/test_fp8_head.py).  So every GEMM can "promote": each PROMOTE_K
# of K is a fresh wgmma chain whose result is added to fp32 registers (DeepGEMM's scheme;
# the record's backward, _scaled_mm(use_fast_accum=False), is the cuBLASLt equivalent).
# dx and dW always promote.  y does not by default (PROMOTE_Y): K = 768 is 24 k32 steps,
# <= 2.9e-3 relative in the worst case and ~6e-4 measured in the emulation, under the bf16
# rounding of y itself; the record's forward is fast-accumulated too; and unpromoted the
# CUDA kernel keeps its 128x256 tile (promoted needs 2x the accumulator registers, so
# 128x128).  Set PROMOTE_Y = True to promote y as well.
PROMOTE_K = 128
PROMOTE_Y = False


# ---- backend pieces -------------------------------------------------------------------
# quantize(t, scale, e5m2, transpose) -> (q, qt): q = fp8(t * scale) [R, >= C], qt its
# transpose [C, >= R] (or [0]); gemm(a, b, k, alpha, out_fp32) -> alpha * a[:, :k] @ b[:, :k]^T;
# ce_grad(...) -> (g8, g8t).  The CUDA pieces pad rows to 16 bytes (TMA's rule), the
# Triton ones do not: `_padded` says which, for the fake implementations.

def _padded(n: int, backend: str) -> int:
    return (n + 15) // 16 * 16 if backend == "cuda" else n


def _quantize_triton(t, scale, e5m2, transpose):
    q = t.mul(scale).to(E5M2 if e5m2 else E4M3)
    qt = q.t().contiguous() if transpose else q.new_empty((0,))
    return q, qt


def _quantize_cuda(t, scale, e5m2, transpose):
    return torch.ops.speedrun_cuda.fp8_cast(t, scale, e5m2, transpose)


def _gemm_triton(a, b, k, alpha, out_fp32, promote, softcap=None):
    """c = alpha * a[:, :k] @ b[:, :k]^T; with softcap = (cap, kind, scale) (a fixed-reference
    kind, bf16 out) also the [M, tiles] per-tile sum-exp partials of the capped c: (c, stats)."""
    m, n = a.shape[0], b.shape[0]
    c = torch.empty((m, n), device=a.device, dtype=torch.float32 if out_fp32 else torch.bfloat16)
    block_m, block_n, block_k = (128, 128, 128) if a.is_cuda else (32, 32, 32)
    tiles_n = triton.cdiv(n, block_n)
    cap, kind, scale = softcap or (1.0, None, 1.0)
    stats = torch.empty((m, tiles_n) if softcap else (1, 1), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m) * tiles_n,)
    # The accumulation mode, as in the CUDA kernel.  Triton 3.6 and 3.8 default
    # max_num_imprecise_acc to 2**30 for fp8 on sm_90 (nvidia compiler.py): one wgmma chain
    # over all of K, like use_fast_accum=True; None keeps that (an explicit value must be
    # <= BLOCK_K).  promote: BLOCK_K (= PROMOTE_K on a GPU), so each tl.dot accumulates its
    # 128 of K in a fresh wgmma chain and adds it to `acc` in fp32 (the interpreter's fp32
    # dot has no such mode: there it only has to be valid).
    imprecise = min(PROMOTE_K, block_k) if promote else None
    # Without softcap the epilogue's statistics are compiled out; stats is a dummy argument.
    _fp8_gemm_kernel[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0), alpha,
                           stats, stats.stride(0), cap, 1.0 / cap, 1.0 / scale,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                           MAX_IMPRECISE_ACC=imprecise, KIND=softcap_ce.KIND_CODES[kind],
                           ROW_STATS=softcap is not None,
                           num_warps=8 if a.is_cuda else 4, num_stages=3 if a.is_cuda else 1,
                           # The statistics' epilogue would take 133 registers (1 CTA/SM);
                           # at 128 it has no spill and keeps 2 CTAs/SM, so one CTA's
                           # exponentials overlap the other's wgmma (bench.static holds it).
                           **({"maxnreg": 128} if softcap and a.is_cuda else {}))
    return (c, stats) if softcap else c


def _loss_from_row_stats(stats, logits, targets, cap, kind, scale, ignore_index):
    n, v = logits.shape
    row_loss = torch.empty((n,), device=logits.device, dtype=torch.float32)
    block_r, block_t = (64, 64) if logits.is_cuda else (16, 16)
    _loss_from_row_stats_kernel[(triton.cdiv(n, block_r),)](
        stats, logits, targets, row_loss, n, stats.shape[1], v, stats.stride(0), logits.stride(0), ignore_index,
        cap, 1.0 / cap, 1.0 / scale, KIND=softcap_ce.KIND_CODES[kind], BLOCK_R=block_r, BLOCK_T=block_t)
    return row_loss


def _gemm_cuda(a, b, k, alpha, out_fp32, promote):
    return torch.ops.speedrun_cuda.fp8_gemm(a, b, k, alpha, out_fp32, promote)


def _ce_grad_triton(logits, targets, row_loss, row_factor, cap, kind, scale, ignore_index, grad_scale):
    n, v = logits.shape
    g8 = torch.empty((n, v), device=logits.device, dtype=torch.uint8)  # e5m2 bits
    g8t = torch.empty((v, n), device=logits.device, dtype=torch.uint8)
    block_r, block_c = (64, 64) if logits.is_cuda else (16, 32)
    grid = (triton.cdiv(n, block_r), triton.cdiv(v, block_c))
    _ce_grad_e5m2_kernel[grid](logits, targets, row_loss, row_factor, g8, g8t, n, v, logits.stride(0),
                               g8.stride(0), g8t.stride(0), 0 if row_factor.numel() == 1 else 1,
                               ignore_index, cap, 1.0 / cap, 1.0 / scale, grad_scale,
                               KIND=softcap_ce.KIND_CODES[kind], BLOCK_R=block_r, BLOCK_C=block_c)
    return g8.view(E5M2), g8t.view(E5M2)


def _ce_grad_cuda(logits, targets, row_loss, row_factor, cap, kind, scale, ignore_index, grad_scale):
    return torch.ops.speedrun_cuda.fp8_ce_grad_e5m2(logits, targets, row_loss, row_factor, cap,
                                                    softcap_ce.KIND_CODES[kind], scale, ignore_index,
                                                    grad_scale)


_QUANTIZE = {"cuda": _quantize_cuda, "triton": _quantize_triton}
_GEMM = {"cuda": _gemm_cuda, "triton": _gemm_triton}
_CE_GRAD = {"cuda": _ce_grad_cuda, "triton": _ce_grad_triton}


def _head_forward(x, weight, x_scale, w_scale, need_grad, backend, softcap=None):
    """(y bf16 [N, V], x8t, w8t): the transposed e4m3 copies only when a backward will follow.
    With softcap (Triton only, see _gemm_triton) y is (y, per-tile sum-exp partials)."""
    x8, x8t = _QUANTIZE[backend](x, x_scale, False, need_grad)
    w8, w8t = _QUANTIZE[backend](weight, w_scale, False, need_grad)
    alpha = 1.0 / (x_scale * w_scale)
    y = _GEMM[backend](x8, w8, x.shape[1], alpha, False, PROMOTE_Y, *([softcap] if softcap else []))
    return y, x8t, w8t


def _head_backward(g8, g8t, x8t, w8t, n, k, v, x_scale, w_scale, grad_scale, w_dtype, backend):
    """dx = g8 @ w8 (bf16) and dW = g8^T @ x8 (fp32 accumulation, then weight's dtype),
    both promoted to fp32 every PROMOTE_K of their long K (50304 and N)."""
    dx = _GEMM[backend](g8, w8t, v, 1.0 / (grad_scale * w_scale), False, True)
    dw = _GEMM[backend](g8t, x8t, n, 1.0 / (grad_scale * x_scale), True, True)
    return dx, dw.to(w_dtype)


def _fake_fp8(rows, cols, like, dtype, backend):
    return like.new_empty((rows, _padded(cols, backend)), dtype=dtype)


# ---- custom ops: fp8_linear -----------------------------------------------------------

@torch.library.custom_op("kernels::fp8_linear_fwd", mutates_args=())
def _fp8_linear_fwd(x: torch.Tensor, weight: torch.Tensor, x_scale: float, w_scale: float, grad_scale: float,
                    need_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x8t, w8t); x8t [K, >= N] and w8t [K, >= V] e4m3 are [0] unless need_grad."""
    return _head_forward(x, weight, x_scale, w_scale, need_grad, backend)


@_fp8_linear_fwd.register_fake
def _fp8_linear_fwd_fake(x, weight, x_scale, w_scale, grad_scale, need_grad, backend):
    (n, k), v = x.shape, weight.shape[0]
    y = x.new_empty((n, v), dtype=torch.bfloat16)
    if not need_grad:
        return y, x.new_empty((0,), dtype=E4M3), x.new_empty((0,), dtype=E4M3)
    return y, _fake_fp8(k, n, x, E4M3, backend), _fake_fp8(k, v, x, E4M3, backend)


@torch.library.custom_op("kernels::fp8_linear_bwd", mutates_args=())
def _fp8_linear_bwd(grad: torch.Tensor, x8t: torch.Tensor, w8t: torch.Tensor, x_scale: float, w_scale: float,
                    grad_scale: float, w_dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = grad.shape
    g8, g8t = _QUANTIZE[backend](grad, grad_scale, True, True)
    return _head_backward(g8, g8t, x8t, w8t, n, x8t.shape[0], v, x_scale, w_scale, grad_scale, w_dtype,
                          backend)


@_fp8_linear_bwd.register_fake
def _fp8_linear_bwd_fake(grad, x8t, w8t, x_scale, w_scale, grad_scale, w_dtype, backend):
    (n, v), k = grad.shape, x8t.shape[0]
    return grad.new_empty((n, k), dtype=torch.bfloat16), grad.new_empty((v, k), dtype=w_dtype)


def _fp8_linear_setup(ctx, inputs, output):
    x, weight, x_scale, w_scale, grad_scale, _, backend = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.args = (x_scale, w_scale, grad_scale, weight.dtype, backend)


def _fp8_linear_backward(ctx, grad_y, _grad_x8t, _grad_w8t):
    x8t, w8t = ctx.saved_tensors
    dx, dw = _fp8_linear_bwd(grad_y.contiguous(), x8t, w8t, *ctx.args)
    return dx, dw, None, None, None, None, None


_fp8_linear_fwd.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup)


# ---- custom ops: the fused head + softcap cross-entropy -----------------------------------

# The widest row the staged CE kernel holds in shared memory: 2 * V bytes plus its ~100
# static bytes within Hopper's 227 KiB per block.
STAGED_MAX_COLS = 112 * 1024


def _grad_in_forward(backend, need_grad, reduction, cap, kind, v):
    """Whether the forward's loss pass also writes the e5m2 gradient (cuda backend, scalar
    reduction, the staged kernel's case: a fixed-reference kind, V a multiple of 8 that fits)."""
    return (backend == "cuda" and need_grad and reduction != "none" and softcap_ce.fixed_reference(cap, kind)
            and v % 8 == 0 and v <= STAGED_MAX_COLS)


def _loss_factor(targets, ignore_index, reduction):
    """dloss/drow_loss of a scalar reduction at upstream 1, [1] fp32 on the device (no sync)."""
    if reduction == "mean":
        return (1.0 / (targets != ignore_index).sum(dtype=torch.float32)).reshape(1)
    return torch.ones((1,), device=targets.device, dtype=torch.float32)


def _reduce(row_loss, targets, ignore_index, reduction):
    if reduction == "none":
        return row_loss.clone()
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum(dtype=torch.float32)


@torch.library.custom_op("kernels::fp8_head_ce_fwd", mutates_args=())
def _fp8_head_ce_fwd(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, x_scale: float,
                     w_scale: float, grad_scale: float, cap: float, kind: str, scale: float, ignore_index: int, reduction: str,
                     need_grad: bool, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """(loss, row_loss [N] fp32, logits [N, V] bf16 or [0], x8t, w8t, g8, g8t) -- the rest for
    backward: g8 [N, pad16(V)] and g8t [V, pad16(N)] e5m2 (upstream 1) where _grad_in_forward,
    and then logits is [0]; else g8 and g8t are [0] and the backward computes them from logits."""
    kind_or_none = None if kind == "none" else kind
    if _grad_in_forward(backend, need_grad, reduction, cap, kind_or_none, weight.shape[0]):
        y, x8t, w8t = _head_forward(x, weight, x_scale, w_scale, need_grad, backend)
        row_loss, g8 = torch.ops.speedrun_cuda.softcap_ce_forward_e5m2(
            y, targets, _loss_factor(targets, ignore_index, reduction), cap, softcap_ce.KIND_CODES[kind_or_none],
            scale, ignore_index, grad_scale)
        g8t = torch.ops.speedrun_cuda.fp8_transpose(g8, y.shape[1])
        loss = _reduce(row_loss, targets, ignore_index, reduction)
        return loss, row_loss, y.new_empty((0,)), x8t, w8t, g8, g8t
    if backend == "triton" and softcap_ce.fixed_reference(cap, kind_or_none):
        # The loss from the GEMM epilogue's partial sums: y is never read in the forward.
        (y, stats), x8t, w8t = _head_forward(x, weight, x_scale, w_scale, need_grad, backend,
                                             softcap=(cap, kind_or_none, scale))
        row_loss = _loss_from_row_stats(stats, y, targets, cap, kind_or_none, scale, ignore_index)
    else:
        y, x8t, w8t = _head_forward(x, weight, x_scale, w_scale, need_grad, backend)
        # The softcap CE kernels through their public op, without the gradient: one read of y.
        with _backend.use_backend("auto" if backend == "cuda" else backend):
            row_loss = softcap_ce.softcap_cross_entropy(y, targets, cap=cap, kind=kind_or_none, scale=scale,
                                                        ignore_index=ignore_index, reduction="none")
    loss = _reduce(row_loss, targets, ignore_index, reduction)
    # Two distinct empty tensors: a custom op's outputs may not alias each other.
    return (loss, row_loss, (y if need_grad else y.new_empty((0,))), x8t, w8t, x.new_empty((0,), dtype=E5M2),
            x.new_empty((0,), dtype=E5M2))


@_fp8_head_ce_fwd.register_fake
def _fp8_head_ce_fwd_fake(x, weight, targets, x_scale, w_scale, grad_scale, cap, kind, scale, ignore_index, reduction,
                          need_grad, backend):
    (n, k), v = x.shape, weight.shape[0]
    loss = x.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    row_loss = x.new_empty((n,), dtype=torch.float32)
    no_logits = x.new_empty((0,), dtype=torch.bfloat16)
    no_g8 = (x.new_empty((0,), dtype=E5M2), x.new_empty((0,), dtype=E5M2))
    if not need_grad:
        return loss, row_loss, no_logits, x.new_empty((0,), dtype=E4M3), x.new_empty((0,), dtype=E4M3), *no_g8
    x8t, w8t = _fake_fp8(k, n, x, E4M3, backend), _fake_fp8(k, v, x, E4M3, backend)
    if _grad_in_forward(backend, need_grad, reduction, cap, None if kind == "none" else kind, v):
        return loss, row_loss, no_logits, x8t, w8t, _fake_fp8(n, v, x, E5M2, backend), _fake_fp8(v, n, x, E5M2, backend)
    return loss, row_loss, x.new_empty((n, v), dtype=torch.bfloat16), x8t, w8t, *no_g8


@torch.library.custom_op("kernels::fp8_head_ce_bwd", mutates_args=())
def _fp8_head_ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, row_loss: torch.Tensor, targets: torch.Tensor,
                     x8t: torch.Tensor, w8t: torch.Tensor, g8: torch.Tensor, g8t: torch.Tensor, x_scale: float,
                     w_scale: float, grad_scale: float, cap: float, kind: str, scale: float, ignore_index: int,
                     reduction: str, w_dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # V from the tensors that exist: g8t [V, pad16(N)] when the forward wrote it, else the logits.
    n, v, k = row_loss.shape[0], (g8t.shape[0] if g8.numel() else logits.shape[1]), x8t.shape[0]
    if reduction == "none":
        # Per-row upstream gradients go into the e5m2 gradient itself.  Ignored rows are
        # zeroed in the kernel.
        g8, g8t = _CE_GRAD[backend](logits, targets, row_loss, grad_loss.to(torch.float32).contiguous(), cap,
                                    None if kind == "none" else kind, scale, ignore_index, grad_scale)
        return _head_backward(g8, g8t, x8t, w8t, n, k, v, x_scale, w_scale, grad_scale, w_dtype, backend)
    if g8.numel() == 0:  # not written by the forward (_grad_in_forward): from the kept logits
        g8, g8t = _CE_GRAD[backend](logits, targets, row_loss, _loss_factor(targets, ignore_index, reduction), cap,
                                    None if kind == "none" else kind, scale, ignore_index, grad_scale)
    dx, dw = _head_backward(g8, g8t, x8t, w8t, n, k, v, x_scale, w_scale, grad_scale, w_dtype, backend)
    # The scalar upstream gradient after the GEMMs (the contract, DESIGN.md §2.2), in place,
    # one rounding per product: the softcap CE's row-scaling kernels, which skip a factor of
    # exactly 1 on the device (loss.backward()): then no pass over dx and dW at all.
    upstream = grad_loss.to(torch.float32).reshape(1)
    softcap_ce._SCALE_ROWS[backend](dx, upstream)
    softcap_ce._SCALE_ROWS[backend](dw, upstream)
    return dx, dw


@_fp8_head_ce_bwd.register_fake
def _fp8_head_ce_bwd_fake(grad_loss, logits, row_loss, targets, x8t, w8t, g8, g8t, x_scale, w_scale, grad_scale, cap,
                          kind, scale, ignore_index, reduction, w_dtype, backend):
    n, v, k = row_loss.shape[0], (g8t.shape[0] if g8.numel() else logits.shape[1]), x8t.shape[0]
    return row_loss.new_empty((n, k), dtype=torch.bfloat16), row_loss.new_empty((v, k), dtype=w_dtype)


def _fp8_head_ce_setup(ctx, inputs, output):
    (x, weight, targets, x_scale, w_scale, grad_scale, cap, kind, scale, ignore_index, reduction, _,
     backend) = inputs
    ctx.save_for_backward(output[2], output[1], targets, output[3], output[4], output[5], output[6])
    ctx.mark_non_differentiable(*output[1:])
    ctx.args = (x_scale, w_scale, grad_scale, cap, kind, scale, ignore_index, reduction, weight.dtype, backend)


def _fp8_head_ce_backward(ctx, grad_loss, *_unused):
    logits, row_loss, targets, x8t, w8t, g8, g8t = ctx.saved_tensors
    dx, dw = _fp8_head_ce_bwd(grad_loss.contiguous(), logits, row_loss, targets, x8t, w8t, g8, g8t, *ctx.args)
    return dx, dw, None, None, None, None, None, None, None, None, None, None, None


_fp8_head_ce_fwd.register_autograd(_fp8_head_ce_backward, setup_context=_fp8_head_ce_setup)


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

    Backends: cuda (the hand-written Hopper FP8 GEMM, sm_90a), triton, reference (see the
    module docstring).  Any N, K, V >= 1: the fast backends pad their fp8 copies' rows to
    16 bytes themselves, so TMA's alignment rules put no condition on the caller's shapes.
    No host synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate_head(x, weight, (torch.bfloat16,), WEIGHT_DTYPES)
    _validate_scales(x_scale, w_scale, grad_scale)
    backend = _backend.choose(OP_LINEAR, x.device)
    if backend == "reference":
        return reference.fp8_linear(x, weight, x_scale=x_scale, w_scale=w_scale, grad_scale=grad_scale)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    y, _, _ = _fp8_linear_fwd(x, weight, float(x_scale), float(w_scale), float(grad_scale), need_grad, backend)
    return y


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

    Gradients for x and weight (through the FP8 head's e5m2 gradient path when fp8; for
    "mean" and "sum" the e5m2 gradient is that of upstream 1 and the upstream gradient
    multiplies dx and dW after the GEMMs, so grad_scale must suit the upstream-1 gradient:
    DESIGN.md §2.2).  Backends (fp8=True): cuda and triton run the fused head (module
    docstring): the gradient goes straight to scaled e5m2, on cuda in the forward's loss
    pass where it can; reference materializes fp32 and bf16 intermediates.
    fp8=False: x @ weight^T in x's dtype, then softcap_cross_entropy (its own backends).
    No host synchronization; traces under torch.compile(fullgraph=True).
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
    backend = _backend.choose(OP_LINEAR_CE, x.device)
    if backend == "reference":
        return reference.linear_softcap_cross_entropy(
            x, weight, targets, fp8=fp8, x_scale=x_scale, w_scale=w_scale, grad_scale=grad_scale, cap=cap,
            kind=kind, scale=scale, ignore_index=ignore_index, reduction=reduction)
    if not fp8:
        logits = x @ weight.to(x.dtype).T
        return softcap_ce.softcap_cross_entropy(logits, targets, cap=cap, kind=kind, scale=scale,
                                                ignore_index=ignore_index, reduction=reduction)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    outputs = _fp8_head_ce_fwd(x, weight, targets, float(x_scale), float(w_scale), float(grad_scale),
                               float(cap), kind or "none", float(scale), int(ignore_index), reduction,
                               need_grad, backend)
    return outputs[0]
