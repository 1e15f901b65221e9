"""The 2025-01 record's own implementations, for `--kernels off` and per-family ablation.

These are what our kernels are measured against inside the trainer: FlexAttention with a
BlockMask built the way the record built it, the FP8 head through torch._scaled_mm, the
softcapped loss as plain PyTorch (fused by torch.compile), and Newton-Schulz as plain
PyTorch matmuls (torch.compile'd on CUDA, as the record did).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

FLEX_BLOCK = 128  # the record's BlockMask granularity (tokens)


# ---- attention: FlexAttention with the record's BlockMask --------------------------

def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block counts and the block indices (true ones first) of a dense [Q, KV] block mask."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.argsort(dim=-1, descending=False, stable=True).flip(-1).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def record_block_masks(docs: torch.Tensor, window_blocks: int) -> tuple[BlockMask, BlockMask]:
    """(long, short) BlockMasks: causal + same document + at most `window_blocks` KV blocks.

    docs [T] holds each token's document index (T a multiple of 128).  As in the record,
    the window is counted in whole 128-token blocks (the short one is half as many), and
    only the causal and document conditions are evaluated per token, inside partial blocks.
    """
    n_blocks = docs.numel() // FLEX_BLOCK
    block = torch.arange(n_blocks, dtype=torch.int32, device=docs.device)
    docs_first = docs.view(n_blocks, FLEX_BLOCK)[:, 0].contiguous()
    docs_last = docs.view(n_blocks, FLEX_BLOCK)[:, -1].contiguous()
    any_causal = block[:, None] >= block
    all_causal = block[:, None] > block
    any_document = (docs_first[:, None] <= docs_last) & (docs_last[:, None] >= docs_first)
    all_document = (docs_first[:, None] == docs_last) & (docs_last[:, None] == docs_first)
    any_visible = any_causal & any_document
    all_visible = all_causal & all_document
    partial_counts, partial_indices = _ordered(any_visible & ~all_visible)
    full_counts, full_indices = _ordered(all_visible)

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    def build(blocks: int) -> BlockMask:
        blocks_t = torch.tensor(blocks, dtype=torch.int32, device=docs.device)
        return BlockMask.from_kv_blocks(
            torch.clamp_max(partial_counts, torch.clamp_min(blocks_t - full_counts, 1)),
            partial_indices,
            torch.clamp_max(full_counts, blocks_t - 1),
            full_indices,
            BLOCK_SIZE=FLEX_BLOCK,
            mask_mod=document_causal,
        )

    return build(window_blocks), build(max(1, window_blocks // 2))


def _listed_blocks(counts: torch.Tensor, indices: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """Dense bool [Q blocks, KV blocks] of the first counts[q] entries of each row of indices."""
    counts, indices = counts[0, 0], indices[0, 0].long()
    keep = torch.arange(indices.shape[-1], device=indices.device) < counts[:, None]  # a count < 0 lists nothing
    dense = torch.zeros(indices.shape[0], n_kv_blocks, dtype=torch.bool, device=indices.device)
    return dense.scatter_(1, indices, keep)  # each row of indices is a permutation: no index repeats


def record_dense_mask(block_mask: BlockMask) -> torch.Tensor:
    """Bool [T, T]: the (query, key) pairs a BlockMask lets through, as compiled FlexAttention reads it.

    Key blocks listed as full pass every pair; those listed as partial pass the pairs their
    mask_mod allows; unlisted blocks pass none.  (Eager FlexAttention instead evaluates the
    mask_mod on every pair and ignores which blocks are listed: for the record's masks
    that drops the sliding window.)
    """
    length, kv_length = block_mask.seq_lengths
    q_blocks, kv_blocks = -(-length // FLEX_BLOCK), -(-kv_length // FLEX_BLOCK)
    partial = _listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, kv_blocks)[:q_blocks]
    full = _listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, kv_blocks)[:q_blocks]

    def tokens(blocks):
        return blocks.repeat_interleave(FLEX_BLOCK, 0).repeat_interleave(FLEX_BLOCK, 1)[:length, :kv_length]

    device = block_mask.kv_indices.device
    q_idx = torch.arange(length, device=device)[:, None]
    kv_idx = torch.arange(kv_length, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return tokens(full) | (tokens(partial) & block_mask.mask_mod(zero, zero, q_idx, kv_idx))


def flex_sliding_window_attention(q, k, v, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """q, k, v [1, T, H, D] -> [1, T, H, D] through FlexAttention (which wants [B, H, T, D]).

    Under torch.compile this is the record's fused FlexAttention.  Eager FlexAttention would
    ignore the BlockMask's block lists (and so the sliding window), so eagerly the same
    pairs, read off the BlockMask by record_dense_mask, mask a dense SDPA instead: O(T^2)
    memory, as eager FlexAttention's own unfused path.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if torch.compiler.is_compiling():
        out = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=record_dense_mask(block_mask), scale=scale)
    return out.transpose(1, 2)


EAGER_ATTENTION_NOTE = ("attention=flex without torch.compile: eager FlexAttention would ignore the BlockMask's "
                        "sliding window, so the record's BlockMask is applied as a dense [T, T] mask through "
                        "scaled_dot_product_attention (same pairs, O(T^2) memory)")


# ---- head: FP8 matmul through torch._scaled_mm, then the softcapped loss -----------------

def _scaled_mm(a, b, *, out_dtype, scale_a, scale_b, use_fast_accum):
    """torch._scaled_mm on CUDA.  On a CPU, torch's FP8 matmul is a naive loop (over 5 minutes
    for one 1024x768x50304 product on 2 cores), so there the same FP8 operands are widened to
    fp32, which holds every FP8 product exactly, and multiplied by the BLAS: the values the
    record's head sees, up to the order of the fp32 sums."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, out_dtype=out_dtype, scale_a=scale_a, scale_b=scale_b,
                                use_fast_accum=use_fast_accum)
    return (a.float() @ b.float()).mul_(scale_a * scale_b).to(out_dtype)


class _ScaledMMLinear(torch.autograd.Function):
    """y = x @ w^T in FP8 with per-tensor scales, gradients through e5m2 (the record's head)."""

    @staticmethod
    def forward(ctx, x, weight, x_scale, w_scale, grad_scale):
        x8 = x.mul(x_scale).to(torch.float8_e4m3fn)
        w8 = weight.mul(w_scale).to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device, dtype=torch.float32)
        y = _scaled_mm(x8, w8.T, out_dtype=torch.bfloat16, scale_a=one / x_scale, scale_b=one / w_scale,
                       use_fast_accum=True)
        ctx.save_for_backward(x8, w8)
        ctx.scales = (x_scale, w_scale, grad_scale)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x8, w8 = ctx.saved_tensors
        x_scale, w_scale, grad_scale = ctx.scales
        one = torch.ones((), device=grad.device, dtype=torch.float32)
        g8 = grad.mul(grad_scale).to(torch.float8_e5m2)
        grad_x = _scaled_mm(g8, w8.T.contiguous().T, out_dtype=torch.bfloat16, scale_a=one / grad_scale,
                            scale_b=one / w_scale, use_fast_accum=False)
        grad_w = _scaled_mm(x8.T.contiguous(), g8.T.contiguous().T, out_dtype=torch.float32,
                            scale_a=one / x_scale, scale_b=one / grad_scale, use_fast_accum=False).T
        return grad_x, grad_w.to(ctx.weight_dtype), None, None, None


def record_head_loss(x, weight, targets, *, fp8=True, x_scale, w_scale, grad_scale, cap, scale) -> torch.Tensor:
    """Mean loss of 30*sigmoid(logits/7.5) over the head's bf16 logits, as the record: the FP8
    head (fp8=True, training) or F.linear with the weight cast to x's dtype (validation)."""
    if fp8:
        logits = _ScaledMMLinear.apply(x, weight, x_scale, w_scale, grad_scale)
    else:
        logits = F.linear(x, weight.type_as(x))
    capped = cap * torch.sigmoid(logits.float() / scale)
    return F.cross_entropy(capped, targets)


# ---- Newton-Schulz: plain PyTorch matmuls ------------------------------------------

def newton_schulz5(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The records' NS (modded-nanogpt's zeropower_via_newtonschulz5), batched over leading dims."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


@functools.cache
def _compiled_newton_schulz5():
    return torch.compile(newton_schulz5)


def record_newton_schulz(stack: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The record's NS5 (torch.compile'd on CUDA, eager on CPU where compiling costs more than it saves)."""
    fn = _compiled_newton_schulz5() if stack.is_cuda else newton_schulz5
    return fn(stack, steps)
