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


# ---- FP8 LM head ---------------------------------------------------------------------

class _FP8Linear(torch.autograd.Function):
    """The 2025-01 record's FP8 head, with torch._scaled_mm replaced by fp32 matmuls.

    fp8 values are upcast to fp32 for the products, so this runs on any device; a
    product of two fp8 numbers is exact in fp32 and the sums accumulate in fp32, as
    _scaled_mm does.  Scales multiply before the cast and divide after the matmul,
    exactly like the record's x.mul(x_s).to(e4m3) and scale_a = 1/x_s.  Nothing is
    clamped: the casts decide what happens out of range (on the CPU, e4m3fn saturates
    at +-448, even for inf; e5m2 overflows to +-inf).
    """

    @staticmethod
    def forward(ctx, x, weight, x_scale, w_scale, grad_scale):
        x8 = x.mul(x_scale).to(torch.float8_e4m3fn)
        w8 = weight.mul(w_scale).to(torch.float8_e4m3fn)
        ctx.save_for_backward(x8, w8)
        ctx.scales = (x_scale, w_scale, grad_scale)
        ctx.dtypes = (x.dtype, weight.dtype)
        y = (x8.float() @ w8.float().T) / (x_scale * w_scale)
        return y.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x8, w8 = ctx.saved_tensors
        dx, dw = _fp8_linear_grads(grad, x8, w8, ctx.scales, ctx.dtypes, ctx.needs_input_grad[:2])
        return dx, dw, None, None, None


def _fp8_linear_grads(grad, x8, w8, scales, dtypes, needs):
    """(dx, dW) of the FP8 head from the logits' gradient (None where not needs)."""
    x_scale, w_scale, grad_scale = scales
    x_dtype, w_dtype = dtypes
    g8 = grad.mul(grad_scale).to(torch.float8_e5m2)
    dx = dw = None
    if needs[0]:
        # The record's _scaled_mm writes dx in bf16; the cast to x's dtype only matters
        # for callers of the reference with other dtypes (the fp64 oracle).
        dx = ((g8.float() @ w8.float()) / (grad_scale * w_scale)).to(torch.bfloat16).to(x_dtype)
    if needs[1]:
        dw = ((g8.float().T @ x8.float()) / (grad_scale * x_scale)).to(w_dtype)
    return dx, dw


def _softcap_ce_logits_grad(logits, targets, cap, kind, scale, ignore_index, reduction):
    """d(loss)/d(logits) of softcap_cross_entropy's scalar reduction at upstream gradient 1,
    in logits' dtype: (softmax(s) - onehot(t)) * ds/dz times 1/count (mean) or 1 (sum) on a
    kept row, 0 on an ignored row, NaN on a row whose target is out of [0, V)."""
    v = logits.shape[1]
    s = softcap(logits.to(_compute_dtype(logits.dtype)), cap, kind, scale)
    if kind == "tanh":
        dsdz = 1 - (s / cap) ** 2
    elif kind == "sigmoid":
        dsdz = s * (1 - s / cap) / scale  # (cap / scale) * sigmoid * (1 - sigmoid)
    else:
        dsdz = torch.ones_like(s)
    targets = targets.long()
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < v)
    onehot = torch.nn.functional.one_hot(torch.where(in_range, targets, 0), v).to(s.dtype) * in_range[:, None]
    per_row = 1 / valid.sum() if reduction == "mean" else 1.0
    factor = torch.where(valid, torch.where(in_range, per_row, float("nan")), 0.0).to(s.dtype)
    return ((torch.softmax(s, dim=1) - onehot) * dsdz * factor[:, None]).to(logits.dtype)


class _FP8HeadScalarLoss(torch.autograd.Function):
    """The fused FP8 head's scalar loss (reduction "mean" or "sum"), with its contract's
    backward: the logits' gradient is quantized to e5m2 at upstream gradient 1, and the
    upstream gradient u multiplies dx and dW after the GEMMs, each product rounded to the
    gradient's dtype once (exact for u = 1).  So the e5m2 gradient can be written before u
    exists (kernels/fp8_head.py writes it in the loss pass).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, scales, ce_args):
        x_scale, w_scale, _ = scales
        x8 = x.mul(x_scale).to(torch.float8_e4m3fn)
        w8 = weight.mul(w_scale).to(torch.float8_e4m3fn)
        logits = ((x8.float() @ w8.float().T) / (x_scale * w_scale)).to(torch.bfloat16)
        ctx.save_for_backward(x8, w8, logits, targets)
        ctx.scales, ctx.ce_args, ctx.dtypes = scales, ce_args, (x.dtype, weight.dtype)
        cap, kind, scale, ignore_index, reduction = ce_args
        return softcap_cross_entropy(logits, targets, cap=cap, kind=kind, scale=scale,
                                     ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def backward(ctx, grad):
        x8, w8, logits, targets = ctx.saved_tensors
        g = _softcap_ce_logits_grad(logits, targets, *ctx.ce_args)
        dx, dw = _fp8_linear_grads(g, x8, w8, ctx.scales, ctx.dtypes, ctx.needs_input_grad[:2])
        upstream = grad.to(torch.float32)  # 0-dim: each product keeps the gradient's dtype
        dx = None if dx is None else (dx * upstream).to(dx.dtype)
        dw = None if dw is None else (dw * upstream).to(dw.dtype)
        return dx, dw, None, None, None


def fp8_linear(x, weight, *, x_scale=2.0, w_scale=2.0**9, grad_scale=2.0**19):
    """y = (e4m3(x*x_scale) @ e4m3(weight*w_scale)^T) / (x_scale*w_scale), in bf16.

    x [N, K], weight [V, K] -> y [N, V] bf16.  Backward quantizes the incoming gradient
    g8 = e5m2(grad*grad_scale) and returns dx = (g8 @ w8)/(grad_scale*w_scale) rounded to
    bf16 (then x's dtype) and dW = (g8^T @ x8)/(grad_scale*x_scale) accumulated in fp32,
    in weight's dtype.  The scaling multiplies in each input's own dtype, as the record.
    """
    return _FP8Linear.apply(x, weight, x_scale, w_scale, grad_scale)


def linear_softcap_cross_entropy(x, weight, targets, *, fp8=True, x_scale=2.0, w_scale=2.0**9,
                                 grad_scale=2.0**19, cap=30.0, kind="sigmoid", scale=7.5,
                                 ignore_index=-100, reduction="mean"):
    """softcap_cross_entropy(head(x), targets): the LM head followed by the capped loss.

    head = fp8_linear with the given scales if fp8, else x @ weight^T in x's dtype (weight
    cast to x's dtype).  The [N, V] logits are materialized here.

    fp8 with reduction "mean" or "sum": the backward quantizes the logits' gradient at
    upstream gradient 1, g8 = e5m2(bf16(bf16(dloss/dz) * grad_scale)) with dloss/dz of the
    mean (1/count) or sum, and the upstream gradient u multiplies dx and dW after the
    GEMMs: dx = bf16(dx_1 * u), dW = w_dtype(dW_1 * u) (exact for u = 1, the training
    case; otherwise one more rounding of each).  reduction "none" quantizes the gradient
    with the per-row upstream gradients folded in, as plain autograd does.
    """
    if fp8 and reduction != "none":
        return _FP8HeadScalarLoss.apply(x, weight, targets, (x_scale, w_scale, grad_scale),
                                        (cap, kind, scale, ignore_index, reduction))
    if fp8:
        logits = fp8_linear(x, weight, x_scale=x_scale, w_scale=w_scale, grad_scale=grad_scale)
    else:
        logits = x @ weight.to(x.dtype).T
    return softcap_cross_entropy(logits, targets, cap=cap, kind=kind, scale=scale,
                                 ignore_index=ignore_index, reduction=reduction)


# ---- Newton-Schulz ----------------------------------------------------------------------

NS5_TRIPLE = (3.4445, -4.7750, 2.0315)

# Polar Express's safety factor: the record divides X by (1 + 2e-2) ||X||_F so that rounding
# cannot push a singular value past 1, where the aggressive first polynomial blows up.
POLAR_EXPRESS_SAFETY = 1.02
# Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm" (2025, arXiv:2505.16932): the per-step optimal odd
# quintics for 5 iterations (cushion 2, safety factor 2e-2), as KellerJordan/
# modded-nanogpt train_gpt.py lists them in `polar_express_coeffs`.
_POLAR_EXPRESS_TRIPLES = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _fold_safety(triples, safety):
    """The iteration on X / safety, expressed on X: step 1's a X + b X^3 + c X^5 of X / s
    equals (a / s) X + (b / s^3) X^3 + (c / s^5) X^5, so the safety factor needs no extra
    pass over X (the later steps see the same X as in the record)."""
    (a, b, c), *rest = triples
    return ((a / safety, b / safety ** 3, c / safety ** 5), *rest)


# Named Newton-Schulz schedules, name -> one (a, b, c) per step; shared by kernels.reference,
# the Triton path (kernels.newton_schulz) and the GPT trainer (--muon-coefficients).
NEWTON_SCHULZ_SCHEDULES = {
    # The 2025-01-26 record's NS5: one triple, 5 steps.
    "ns5": (NS5_TRIPLE,) * 5,
    # The current modded-nanogpt record's Polar Express, its safety factor folded into step 1.
    "polar_express": _fold_safety(_POLAR_EXPRESS_TRIPLES, POLAR_EXPRESS_SAFETY),
}


def per_step_coefficients(coefficients, steps):
    """`steps` (a, b, c) triples from one triple (used every step), a per-step sequence, or
    the name of a schedule in NEWTON_SCHULZ_SCHEDULES (which must have `steps` triples)."""
    if isinstance(coefficients, str):
        schedule = NEWTON_SCHULZ_SCHEDULES.get(coefficients)
        if schedule is None:
            raise ValueError(f"coefficients={coefficients!r} is not a named schedule; "
                             f"choose one of {sorted(NEWTON_SCHULZ_SCHEDULES)}")
        if len(schedule) != steps:
            raise ValueError(f"coefficients={coefficients!r} is a {len(schedule)}-step schedule but "
                             f"steps={steps}; use steps={len(schedule)}")
        return list(schedule)
    if all(isinstance(c, (int, float)) for c in coefficients):
        return [tuple(coefficients)] * steps
    return [tuple(triple) for triple in coefficients]


def newton_schulz(G, *, steps=5, coefficients=NS5_TRIPLE, eps=1e-7, dtype=torch.bfloat16):
    """Muon's quintic Newton-Schulz iteration on every matrix of G [..., m, n], in `dtype`.

    X = G in dtype, transposed to wide (m <= n) if tall; X /= ||X||_F + eps per matrix;
    then per step with (a, b, c): A = X X^T, B = bA + cA^2, X = aX + BX; transposed back.
    `coefficients`: one triple, one per step, or a name in NEWTON_SCHULZ_SCHEDULES.
    The leading dims are one batch of matmuls.  dtype may be float32/float64 here (the
    oracle); the public op allows bf16 and fp16.
    """
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: A is then the smaller of the two Gram matrices
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in per_step_coefficients(coefficients, steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# ---- ReLU^2 MLP ---------------------------------------------------------------------------

def linear_relu2(x, w):
    """relu(x @ w^T)^2 for x [..., D], w [H, D] -> [..., H], in the inputs' dtype."""
    return torch.relu(x @ w.T).square()


def relu2_mlp(x, w_fc, w_proj):
    """relu(x @ w_fc^T)^2 @ w_proj^T for x [..., D], w_fc [H, D], w_proj [D, H] -> [..., D].

    Computed in the inputs' dtype with torch's matmuls, as eager PyTorch would: the hidden
    activation is rounded to that dtype after the matmul and after the square.
    """
    return linear_relu2(x, w_fc) @ w_proj.T


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_scale(t):
    """The per-tensor e4m3 scale of t: amax(|t|) / 448, so that t / scale spans e4m3's range.

    In fp32 (fp64 for fp64 t), a 0-D tensor on t's device (no host sync); an all-zero t
    gets the smallest normal fp32 instead of 0, so t / scale stays 0 rather than NaN.
    """
    amax = t.detach().abs().amax().to(_compute_dtype(t.dtype))
    return (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_e4m3(t, scale):
    """e4m3(clamp(t / scale, -448, 448)), the quotient taken in fp32 (fp64 for fp64 t).

    The clamp makes values past the range saturate on every device (torch's own cast
    gives NaN beyond 480 on CUDA); with scale = fp8_scale(t) nothing is clamped.
    """
    quotient = t.detach().to(_compute_dtype(t.dtype)) / scale
    return quotient.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def relu2_mlp_fp8(x, w_fc, w_proj, *, x_scale=None, w_scale=None):
    """relu2_mlp with the first product in float8 e4m3, per-tensor scales (the forward of the
    current modded-nanogpt record's FP8 MLP): for x [..., D], w_fc [H, D], w_proj [D, H].

    x8 = quantize_e4m3(x, x_scale), w8 = quantize_e4m3(w_fc, w_scale) (scales: floats or
    0-D tensors, the dequantization factors, x ~ x8 * x_scale; None: fp8_scale, i.e.
    amax / 448 each call); pre = (x8 @ w8^T) * (x_scale * w_scale) with exact products and
    fp32 sums (fp64 for fp64), rounded to x's dtype; h = relu(pre)^2 rounded; y = h @ w_proj^T.
    Backward straight through the quantization, as the record's: the gradients are those of
    relu2_mlp at the unquantized x and w_fc with relu(pre) taken at the fp8 pre-activation:
    dpre = 2 (g w_proj) relu(pre), dx = dpre w_fc, dw_fc = dpre^T x, dw_proj = g^T h.
    """
    compute = _compute_dtype(x.dtype)
    xs = fp8_scale(x) if x_scale is None else torch.as_tensor(x_scale, dtype=compute, device=x.device)
    ws = fp8_scale(w_fc) if w_scale is None else torch.as_tensor(w_scale, dtype=compute, device=x.device)
    x8, w8 = quantize_e4m3(x, xs), quantize_e4m3(w_fc, ws)
    pre_fp8 = ((x8.to(compute) @ w8.to(compute).T) * (xs * ws)).to(x.dtype)
    pre = x @ w_fc.T  # carries the gradient; its value (exactly) is the fp8 one
    pre = pre_fp8 + (pre - pre.detach())
    return torch.relu(pre).square() @ w_proj.T


# ---- attention --------------------------------------------------------------------------

def attention_mask(length, *, window=None, doc_ids=None, device=None, block_size=None):
    """Boolean [B or 1, T, T]: query i may attend key j (causal, window, same document).

    The window counts tokens (i - j < window), or with block_size whole key blocks of
    block_size tokens (i // block_size - j // block_size < window // block_size).
    """
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        if block_size is None:
            allowed = allowed & (i - j < window)
        else:
            allowed = allowed & (i // block_size - j // block_size < window // block_size)
    allowed = allowed[None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return allowed


def sliding_window_attention(q, k, v, *, window=None, doc_ids=None, scale=None, block_size=None):
    """softmax(scale * q k^T, masked) v per batch and head; q, k, v [B, T, H, D] -> [B, T, H, D].

    Query i attends key j iff j <= i, i - j < window (None: unlimited) and
    doc_ids[b, j] == doc_ids[b, i] (None: one document).  With block_size the window
    counts whole blocks instead: i // block_size - j // block_size < window // block_size
    (the 2025-01 record's BlockMask at block_size=128).  scale defaults to D**-0.5.
    Dense: scores and probabilities in fp32 (fp64 for fp64 inputs), output in q's dtype.
    Every query sees itself, so no row is fully masked.
    """
    length, head_dim = q.shape[1], q.shape[3]
    compute = _compute_dtype(q.dtype)
    scale = head_dim ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q.to(compute), k.to(compute)) * scale
    allowed = attention_mask(length, window=window, doc_ids=doc_ids, device=q.device, block_size=block_size)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v.to(compute))
    return out.to(q.dtype)
