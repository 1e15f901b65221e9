"""sliding_window_attention: the Triton kernels (interpreter on CPU, fp16) against the float64
reference, their block ranges against a brute-force mask, the custom-op plumbing (autograd,
fake impl, compile), the backend routing, every error path, the ahead-of-time sm_90 build,
and (GPU only) bf16 against FlexAttention with the same exact mask.

Tolerances, against the float64 reference, for fp16 inputs: the kernels keep scores,
softmax statistics and accumulators in fp32 but round P (forward, dV) and dS (dQ, dK) to
fp16 before their matmuls, and round the results to fp16: each a relative error of up to
2**-11 ~ 4.9e-4 per element, which averages out to ~3e-4 in norm (measured); 2e-3 leaves a
4x margin.  Gradients of q and k can cancel to ~0 (window=1, T=1), so their error is
measured relative to the size of the reference dV, a gradient of the same scale that
does not cancel.  bf16 on a GPU: 2**-8 per element -> 2e-2.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import reference
from tests.helpers import assert_identical, forward_backward, rel_err
from tests.hopper_aot import ROOT, compile_for_hopper

swa = importlib.import_module("kernels.sliding_window_attention")

TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Small blocks so that a short sequence spans many blocks: full, partial and skipped ones.
SMALL = {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
         "dq": dict(BLOCK_M=16, BLOCK_N=32)}


def qkv(b=2, t=37, h=2, d=64, dtype=torch.bfloat16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, d, generator=gen).to(dtype).to(device) for _ in range(3)]


def documents(b=2, t=37, seed=1, p_start=0.15, device="cpu"):
    starts = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < p_start
    return torch.cumsum(starts.int(), dim=1).int().to(device)


def documents_of_lengths(lengths, t):
    """[1, t] doc ids: documents of the given lengths, cycled until t tokens are covered."""
    ids, doc = [], 0
    while len(ids) < t:
        ids += [doc] * lengths[doc % len(lengths)]
        doc += 1
    return torch.tensor(ids[:t], dtype=torch.int32)[None]


def run_triton(q, k, v, upstream, *, window, doc_ids, scale, config=None, block_size=None):
    """(out, dq, dk, dv) from the Triton launchers directly (config: block sizes)."""
    d = q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    blocks = block_size or 1
    out, lse = swa._forward(q, k, v, doc_ids, window or 0, scale, config and config["fwd"], block_size=blocks)
    dq, dk, dv = swa._backward(upstream, q, k, v, out, lse, doc_ids, window or 0, scale, config, block_size=blocks)
    return out, dq, dk, dv


def oracle(q, k, v, upstream, **kwargs):
    return forward_backward(reference.sliding_window_attention, [x.double() for x in (q, k, v)],
                            upstream.double(), **kwargs)


def assert_close_to_reference(result, expected, dtype):
    out, dq, dk, dv = result
    out64, dq64, dk64, dv64 = expected
    for t in result:
        assert torch.isfinite(t).all(), "an element was not written (or overflowed)"
    assert rel_err(out, out64) < TOL[dtype]
    assert rel_err(dv, dv64) < TOL[dtype]
    grad_scale = dv64.norm().item()
    assert rel_err(dq, dq64, floor=grad_scale) < TOL[dtype]
    assert rel_err(dk, dk64, floor=grad_scale) < TOL[dtype]


# ---- the Triton kernels against the reference (interpreter, fp16) ----------------------

CASES = {
    # name: (B, T, H, D, window, doc_ids builder or None, scale)
    "T=1": (1, 1, 1, 64, None, None, None),
    "window=1": (2, 37, 2, 64, 1, lambda b, t: documents(b, t), None),
    "window>=T": (1, 77, 2, 128, 500, lambda b, t: documents(b, t, p_start=0.05), 0.12),
    "no window, no docs": (1, 99, 1, 64, None, None, None),
    "many short documents": (1, 150, 1, 64, 40, lambda b, t: documents_of_lengths([1, 3, 2, 5, 1, 4], t), None),
    "documents longer than the window": (1, 260, 1, 64, 24, lambda b, t: documents_of_lengths([100, 61, 90], t),
                                         None),
    "B>1, own documents per row": (3, 70, 2, 64, 20, lambda b, t: documents(b, t, seed=5, p_start=0.08), None),
    "window not a block multiple, D=128": (1, 131, 1, 128, 45, lambda b, t: documents_of_lengths([70, 33], t),
                                           0.2),
}


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, blocks, interpreter_device):
    b, t, h, d, window, make_docs, scale = CASES[case]
    q, k, v = qkv(b, t, h, d, torch.float16, seed=len(case), device=interpreter_device)
    upstream = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(3)).half().to(interpreter_device)
    doc_ids = make_docs(b, t).to(interpreter_device) if make_docs else None
    kwargs = dict(window=window, doc_ids=doc_ids, scale=scale)
    result = run_triton(q, k, v, upstream, config=SMALL if blocks == "small" else None, **kwargs)
    assert_close_to_reference(result, oracle(q, k, v, upstream, **kwargs), torch.float16)


BLOCK_CASES = {
    # name: (B, T, H, D, window, block_size, doc_ids builder or None): block-granular windows
    "the record's 1-block window, T not a multiple of 128": (1, 300, 1, 64, 128, 128,
                                                             lambda b, t: documents_of_lengths([150, 20, 200], t)),
    "the record's 2-block window, D=128": (1, 389, 2, 128, 256, 128, lambda b, t: documents(b, t, p_start=0.004)),
    "16-token blocks, 3-block window, B=2": (2, 150, 1, 64, 48, 16, lambda b, t: documents(b, t, p_start=0.03)),
    "16-token blocks, window past T": (1, 70, 1, 64, 96, 16, None),
    "7-token blocks (do not divide the tiles)": (1, 100, 1, 64, 21, 7, lambda b, t: documents_of_lengths([30, 9], t)),
}


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_triton_block_granular_window_matches_reference(case, blocks, interpreter_device):
    b, t, h, d, window, block_size, make_docs = BLOCK_CASES[case]
    q, k, v = qkv(b, t, h, d, torch.float16, seed=len(case), device=interpreter_device)
    upstream = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(3)).half().to(interpreter_device)
    doc_ids = make_docs(b, t).to(interpreter_device) if make_docs else None
    kwargs = dict(window=window, doc_ids=doc_ids, scale=0.12, block_size=block_size)
    result = run_triton(q, k, v, upstream, config=SMALL if blocks == "small" else None, **kwargs)
    assert_close_to_reference(result, oracle(q, k, v, upstream, **kwargs), torch.float16)
    # ... and, for a window shorter than T, the block-granular mask is not the exact one.
    blocked = reference.attention_mask(t, window=window, doc_ids=doc_ids, block_size=block_size)
    assert torch.equal(blocked, reference.attention_mask(t, window=window, doc_ids=doc_ids)) == (window >= t)


def test_document_scan_over_many_chunks(monkeypatch, interpreter_device):
    # With 16-id scan chunks, finding a document's start or end takes several steps.
    monkeypatch.setattr(swa, "SCAN_CHUNK", 16)
    b, t, h, d = 1, 140, 1, 64
    q, k, v = qkv(b, t, h, d, torch.float16, seed=9, device=interpreter_device)
    upstream = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(4)).half().to(interpreter_device)
    kwargs = dict(window=90, doc_ids=documents_of_lengths([57, 2, 81], t).to(interpreter_device), scale=None)
    result = run_triton(q, k, v, upstream, config=SMALL, **kwargs)
    assert_close_to_reference(result, oracle(q, k, v, upstream, **kwargs), torch.float16)


def test_every_output_element_is_written(monkeypatch, interpreter_device):
    # Every output, the saved lse and the delta buffer start as NaN: a missed row stays NaN.
    def poisoned(shape, dtype, device):  # the int32 block work: -1 (test_block_work_... checks its values)
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(swa, "_new_output", poisoned)
    b, t, h, d = 2, 45, 2, 64  # 45 = one full and one partial 32-row block
    q, k, v = qkv(b, t, h, d, torch.float16, device=interpreter_device)
    upstream = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(3)).half().to(interpreter_device)
    doc_ids = documents(b, t, device=interpreter_device)
    out, lse = swa._forward(q, k, v, doc_ids, 7, 0.125, SMALL["fwd"])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grads = swa._backward(upstream, q, k, v, out, lse, doc_ids, 7, 0.125, SMALL)
    assert all(torch.isfinite(g).all() for g in grads)


def test_strided_slices_of_a_fused_qkv_are_read_in_place(interpreter_device):
    # The GPT model projects to [B, T, 3H, D] and chunks it: q, k, v are strided views.
    fused = torch.randn(2, 53, 3 * 2, 64, generator=torch.Generator().manual_seed(7)).half().to(interpreter_device)
    q, k, v = fused.chunk(3, dim=-2)
    assert not q.is_contiguous()
    doc_ids = documents(2, 53, device=interpreter_device)
    out_strided, lse = swa._forward(q, k, v, doc_ids, 11, 0.12, SMALL["fwd"])
    out_dense, _ = swa._forward(q.contiguous(), k.contiguous(), v.contiguous(), doc_ids, 11, 0.12, SMALL["fwd"])
    assert torch.equal(out_strided, out_dense)  # same kernel arithmetic, only the addressing differs
    upstream = torch.randn(2, 53, 2, 64, generator=torch.Generator().manual_seed(8)).half().to(interpreter_device)
    result = run_triton(q, k, v, upstream, window=11, doc_ids=doc_ids, scale=0.12, config=SMALL)
    assert_close_to_reference(result, oracle(q, k, v, upstream, window=11, doc_ids=doc_ids, scale=0.12),
                              torch.float16)


def test_tensors_that_tma_cannot_read_in_place_are_copied(interpreter_device):
    # TMA reads [B, T, H * D] views: heads packed along a row, 16-byte aligned base and
    # strides.  The model's fused-QKV chunks are read in place; a head-major layout, an
    # odd storage offset, an expanded (stride-0) gradient and a non-unit stride along D are
    # copied, with equal results.
    fused = torch.randn(2, 40, 3 * 2, 64, generator=torch.Generator().manual_seed(2)).half().to(interpreter_device)
    q, k, v = fused.chunk(3, dim=-2)
    assert swa._descriptor(q, 16).base is q
    head_major = q.transpose(1, 2).contiguous().transpose(1, 2)  # stride_h = T * D
    storage = torch.empty(q.numel() + 1, dtype=q.dtype, device=interpreter_device)
    misaligned = storage[1:].view(q.shape).copy_(q)  # base 2 bytes past an aligned one
    expanded = torch.ones(1, 1, 1, 64, dtype=q.dtype, device=interpreter_device).expand(q.shape)
    strided_d = q.transpose(2, 3).contiguous().transpose(2, 3)  # an upstream gradient may come so
    for odd in (head_major, misaligned, expanded, strided_d):
        desc = swa._descriptor(odd, 16)
        assert desc.base is not odd and torch.equal(desc.base, odd)
    doc_ids = documents(2, 40, device=interpreter_device)
    expected, lse = swa._forward(q, k, v, doc_ids, 9, 0.12, SMALL["fwd"])
    for odd_q in (head_major, misaligned):
        assert torch.equal(swa._forward(odd_q, k, v, doc_ids, 9, 0.12, SMALL["fwd"])[0], expected)
    grads = swa._backward(expanded, q, k, v, expected, lse, doc_ids, 9, 0.12, SMALL)
    assert all(torch.equal(g, e) for g, e in zip(grads, swa._backward(expanded.contiguous(), q, k, v, expected, lse,
                                                                       doc_ids, 9, 0.12, SMALL)))


# ---- block ranges against a brute-force mask -------------------------------------------

@triton.jit
def _key_blocks_probe(doc_ptr, out_ptr, T, window, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    q_docs = swa._doc_ids_of(doc_ptr, m0 + tl.arange(0, BLOCK_M), T, HAS_DOCS)
    first, full_first, full_end, end = swa._key_blocks(doc_ptr, q_docs, m0, m_last, window, HAS_DOCS, BLOCK_N, SCAN,
                                                       WINDOW_BLOCK)
    base = out_ptr + tl.program_id(0) * 4
    tl.store(base, first)
    tl.store(base + 1, full_first)
    tl.store(base + 2, full_end)
    tl.store(base + 3, end)


@triton.jit
def _query_blocks_probe(doc_ptr, out_ptr, T, window, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    k_docs = swa._doc_ids_of(doc_ptr, n0 + tl.arange(0, BLOCK_N), T, HAS_DOCS)
    first, full_first, full_end, end = swa._query_blocks(doc_ptr, k_docs, n0, n_last, T, window, HAS_DOCS,
                                                         BLOCK_M, SCAN, WINDOW_BLOCK)
    base = out_ptr + tl.program_id(0) * 4
    tl.store(base, first)
    tl.store(base + 1, full_first)
    tl.store(base + 2, full_end)
    tl.store(base + 3, end)


def _check_ranges(ranges, mask, own, other, t):
    """ranges[p] for blocks of `own` rows of the [own-axis, other-axis] visibility `mask`."""
    n_other = triton.cdiv(t, other)
    saw_full = False
    for p, (first, full_first, full_end, end) in enumerate(ranges.tolist()):
        assert first <= full_first <= full_end <= end <= n_other, (p, ranges[p])
        rows = mask[p * own:(p + 1) * own]
        for blk in range(n_other):
            tile = rows[:, blk * other:(blk + 1) * other]
            any_visible = bool(tile.any())
            # Padding rows past T of this program's own block do not count; a block of the
            # other axis that runs past T is never full (its padding must be masked).
            all_visible = tile.shape[1] == other and bool(tile.all())
            # Visited exactly when some pair is visible; unmasked exactly when all are.
            assert (first <= blk < end) == any_visible, (p, blk, ranges[p])
            assert (full_first <= blk < full_end) == all_visible, (p, blk, ranges[p])
            saw_full |= all_visible
    return saw_full


@pytest.mark.parametrize("t,window,lengths,bm,bn,expect_full,block_size", [
    (200, 50, [40, 3, 1, 70, 9], 16, 32, True, None),
    (200, 50, [40, 3, 1, 70, 9], 32, 16, True, None),
    (173, None, [90, 20], 16, 16, True, None),
    (173, 1, [5, 7], 16, 32, False, None),
    (97, 300, None, 32, 16, True, None),
    (130, 60, [200], 16, 32, True, None),
    (130, 33, [200], 16, 32, False, None),  # a 16x32 tile spans 47 > 33 diagonals: never full
    # Block-granular windows (the record's BlockMask semantics at small block sizes).
    (200, 48, [40, 3, 1, 70, 9], 16, 32, True, 16),
    (200, 64, [40, 3, 1, 70, 9], 32, 16, True, 16),
    (173, 16, [90, 20], 16, 16, False, 16),  # one block: only the diagonal tile, never full
    (130, 56, [200], 16, 32, True, 8),
    (131, 42, [60, 11], 16, 16, True, 7),  # 7-token blocks straddle the tiles
    (97, 320, None, 32, 16, True, 64),  # a window past T, rounded to blocks
    (300, 128, [150, 20], 32, 16, True, 128),
])
def test_block_ranges_visit_exactly_the_visible_blocks(t, window, lengths, bm, bn, expect_full, block_size,
                                                       interpreter_device):
    doc_ids = documents_of_lengths(lengths, t) if lengths else None
    mask = reference.attention_mask(t, window=window, doc_ids=doc_ids, block_size=block_size)[0]  # [query, key]
    kernel_window = swa._kernel_window(window or 0, t, block_size or 1)
    docs = (doc_ids if doc_ids is not None else torch.zeros(1, t, dtype=torch.int32)).to(interpreter_device)
    key_ranges = torch.full((triton.cdiv(t, bm), 4), -1, dtype=torch.int32, device=interpreter_device)
    _key_blocks_probe[(key_ranges.shape[0],)](docs, key_ranges, t, kernel_window, HAS_DOCS=doc_ids is not None,
                                              BLOCK_M=bm, BLOCK_N=bn, SCAN=16, WINDOW_BLOCK=block_size or 1)
    query_ranges = torch.full((triton.cdiv(t, bn), 4), -1, dtype=torch.int32, device=interpreter_device)
    _query_blocks_probe[(query_ranges.shape[0],)](docs, query_ranges, t, kernel_window,
                                                  HAS_DOCS=doc_ids is not None, BLOCK_M=bm, BLOCK_N=bn, SCAN=16,
                                                  WINDOW_BLOCK=block_size or 1)
    saw_full = _check_ranges(key_ranges.cpu(), mask, bm, bn, t)
    assert _check_ranges(query_ranges.cpu(), mask.T, bn, bm, t) == saw_full
    assert saw_full == expect_full  # the unmasked path is exercised wherever it can be


@pytest.mark.parametrize("t,window,lengths,bm,bn,block_size", [
    (200, 50, [40, 3, 1, 70, 9], 16, 32, None),
    (173, None, [90, 20], 32, 16, None),
    (97, 300, None, 32, 16, None),
    (300, 128, [150, 20], 32, 16, 128),
])
def test_launch_order_is_longest_work_first(t, window, lengths, bm, bn, block_size, interpreter_device):
    # _block_work counts, per query (key) block, the key (query) blocks with a visible pair,
    # exactly as the brute-force mask does; the launch order is a permutation that sorts
    # that work in descending order, ties in position order.
    doc_ids = documents_of_lengths(lengths, t) if lengths else None
    mask = reference.attention_mask(t, window=window, doc_ids=doc_ids, block_size=block_size)[0]
    docs, doc_stride, has_docs = swa._doc_args(doc_ids.to(interpreter_device) if lengths else None,
                                               interpreter_device)
    kernel_window = swa._kernel_window(window or 0, t, block_size or 1)
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn)
    for query_blocks, own, other, rows in ((True, bm, bn, mask), (False, bn, bm, mask.T)):
        order = swa._longest_first(docs, doc_stride, has_docs, 1, t, kernel_window, cfg, block_size or 1,
                                   query_blocks, interpreter_device)[0].cpu()
        work = torch.tensor([[bool(rows[p * own:(p + 1) * own, c * other:(c + 1) * other].any())
                              for c in range(triton.cdiv(t, other))] for p in range(triton.cdiv(t, own))]).sum(1)
        assert sorted(order.tolist()) == list(range(len(work)))
        ranked = work[order.long()]
        assert (ranked[:-1] >= ranked[1:]).all()
        ties = ranked[:-1] == ranked[1:]
        assert (order[:-1][ties] < order[1:][ties]).all()
        assert ranked[0] > ranked[-1]  # the cases do have cheaper blocks (document or sequence starts)


def test_a_launch_over_the_grid_limit_raises_before_launching():
    docs, doc_stride, has_docs = swa._doc_args(None, "cpu")
    cfg = dict(BLOCK_M=1, BLOCK_N=1)
    with pytest.raises(ValueError, match="T = 65536 is too long: 65536 blocks"):
        swa._longest_first(docs, doc_stride, has_docs, 1, 65536, 0, cfg, 1, True, "cpu")


def test_launch_order_changes_no_result(monkeypatch, interpreter_device):
    # Each program's arithmetic is the same whichever order the blocks launch in.
    b, t, h, d = 2, 90, 2, 64
    q, k, v = qkv(b, t, h, d, torch.float16, seed=11, device=interpreter_device)
    upstream = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(5)).half().to(interpreter_device)
    kwargs = dict(window=30, doc_ids=documents(b, t, seed=4, device=interpreter_device), scale=0.12, config=SMALL)
    docs, doc_stride, has_docs = swa._doc_args(kwargs["doc_ids"], interpreter_device)
    order = swa._longest_first(docs, doc_stride, has_docs, b, t, 30, SMALL["fwd"], 1, True, interpreter_device)
    assert not torch.equal(order.cpu(), torch.arange(order.shape[1], dtype=torch.int32).repeat(b, 1))
    longest_first = run_triton(q, k, v, upstream, **kwargs)
    monkeypatch.setattr(swa, "LONGEST_FIRST", False)
    assert all(torch.equal(x, y) for x, y in zip(longest_first, run_triton(q, k, v, upstream, **kwargs)))


# ---- block-granular windows against the 2025-01 record's own BlockMask ---------------------

def published_record_block_masks(docs, window_blocks):
    """The record's create_blockmasks, rewritten here from its description: 128-token blocks;
    a key block is listed for a query block when it is causal (kb <= qb) and their document
    ranges overlap, as *full* when kb < qb and both lie in one document, else as *partial*
    (where the mask_mod, causal + same document, decides per pair); each list is ordered
    nearest block first; then build_bm(n) keeps min(partial, max(n - full, 1)) partial and
    min(full, n - 1) full blocks, for the long window n = window_blocks and the short
    n = window_blocks // 2 (0 at one block: the full count goes negative and lists nothing)."""
    from torch.nn.attention.flex_attention import BlockMask

    n = docs.numel() // 128
    first, last = docs.view(n, 128)[:, 0], docs.view(n, 128)[:, -1]
    qb, kb = torch.arange(n)[:, None], torch.arange(n)[None, :]
    overlap = (first[:, None] <= last[None, :]) & (last[:, None] >= first[None, :])
    listed = (kb <= qb) & overlap
    full = (kb < qb) & (first[:, None] == last[:, None]) & (first[None, :] == last[None, :]) & \
        (first[:, None] == first[None, :])
    partial = listed & ~full

    def ordered(dense):  # nearest (largest) listed block first, then the unlisted ones
        key = torch.where(dense, kb.expand(n, n), kb.expand(n, n) - n)
        return dense.sum(-1).int()[None, None], key.argsort(-1, descending=True).int()[None, None]

    (p_count, p_idx), (f_count, f_idx) = ordered(partial), ordered(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    def build(blocks):
        return BlockMask.from_kv_blocks(torch.clamp_max(p_count, torch.clamp_min(blocks - f_count, 1)), p_idx,
                                        torch.clamp_max(f_count, blocks - 1), f_idx, BLOCK_SIZE=128,
                                        mask_mod=mask_mod)

    return build(window_blocks), build(window_blocks // 2)


def padded_record_docs(doc_ids):
    """The record needs T to be a multiple of 128 (it asserts it; its sequences, 48Ki and
    256Ki tokens, always are): an awkward T is padded with a document of its own at the end,
    which no real query can see (it comes later), and the masks are compared on [:T, :T]."""
    t = doc_ids.numel()
    pad = -t % 128
    return torch.cat([doc_ids.long(), torch.full((pad,), int(doc_ids.max()) + 1)])


@pytest.mark.parametrize("t,lengths", [
    (2000, "fineweb-like"),  # documents of ~600 tokens: the window binds inside documents
    (1000, [3, 200, 1, 129, 127, 400, 60]),  # documents straddling, filling and missing blocks
    (1920, [5000]),  # one document, T a multiple of 128
])
def test_block_granular_mask_is_the_records_blockmask_at_every_window_setting(t, lengths):
    from speedrun.gpt import baseline

    doc_ids = (fineweb_like_documents(t, 7, "cpu") if lengths == "fineweb-like"
               else documents_of_lengths(lengths, t))
    docs = padded_record_docs(doc_ids[0])
    settings = 0
    for window_blocks in range(1, 15):  # the record's schedule: 1..14 blocks of 128
        published = published_record_block_masks(docs, window_blocks)
        ours_baseline = baseline.record_block_masks(docs, window_blocks)
        for blocks, published_mask, baseline_mask in zip((window_blocks, max(1, window_blocks // 2)), published,
                                                         ours_baseline):
            expected = baseline.record_dense_mask(published_mask)[:t, :t]
            # torch's own decoding of the block lists (to_dense) agrees with record_dense_mask.
            listed = published_mask.to_dense()[0, 0].bool().repeat_interleave(128, 0).repeat_interleave(128, 1)
            causal_document = reference.attention_mask(docs.numel(), doc_ids=docs[None])[0]
            assert torch.equal(baseline.record_dense_mask(published_mask), listed & causal_document)
            assert torch.equal(baseline.record_dense_mask(baseline_mask)[:t, :t], expected)
            mask = reference.attention_mask(t, window=blocks * 128, doc_ids=doc_ids, block_size=128)[0]
            assert torch.equal(mask, expected), (window_blocks, blocks)
            settings += 1
    assert settings == 28


def test_exact_window_is_not_the_records_pattern():
    # Why block_size exists: at the record's first setting (1 block; short window 64 tokens
    # exact, 1 block blocked) the exact token window lets through other pairs.
    from speedrun.gpt import baseline

    doc_ids = fineweb_like_documents(1024, 7, "cpu")
    _, short = baseline.record_block_masks(doc_ids[0].long(), 1)
    record = baseline.record_dense_mask(short)
    assert not torch.equal(reference.attention_mask(1024, window=64, doc_ids=doc_ids)[0], record)
    assert torch.equal(reference.attention_mask(1024, window=128, doc_ids=doc_ids, block_size=128)[0], record)


def test_record_dense_mask_drives_the_eager_fallback():
    # Eagerly, flex_sliding_window_attention masks SDPA with the BlockMask's own pairs, which
    # equals our reference with the block-granular window (fp64: the same math up to rounding).
    from speedrun.gpt import baseline

    t = 384
    doc_ids = documents_of_lengths([100, 250, 90], t)
    long_mask, short_mask = baseline.record_block_masks(doc_ids[0].long(), 2)
    q, k, v = qkv(1, t, 2, 64, torch.float64, seed=3)
    for mask, window in ((long_mask, 256), (short_mask, 128)):
        eager = baseline.flex_sliding_window_attention(q, k, v, mask, 0.12)
        expected = reference.sliding_window_attention(q, k, v, window=window, doc_ids=doc_ids, scale=0.12,
                                                      block_size=128)
        assert rel_err(eager, expected) < 1e-12


def test_window_is_not_a_specialized_kernel_argument():
    # Triton specializes ints on ==1 and divisibility by 16; window must not be, so that a
    # new window value (every step of the record's schedule) never compiles a new kernel.
    # Checked on the real JIT functions, in a child process with the interpreter off.
    script = ("import importlib; m = importlib.import_module('kernels.sliding_window_attention'); "
              "print(sorted(k.__name__ for k in (m._sliding_window_attn_fwd, m._sliding_window_attn_bwd_dkdv, "
              "m._sliding_window_attn_bwd_dq) if next(p for p in k.params if p.name == 'window').do_not_specialize))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(sorted(["_sliding_window_attn_fwd", "_sliding_window_attn_bwd_dkdv",
                                              "_sliding_window_attn_bwd_dq"]))


# ---- the public op and its plumbing --------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "cuda", "reference"])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 128)])
@pytest.mark.parametrize("window,with_docs,scale", [(None, False, None), (9, True, 0.12), (1, True, None)])
def test_cpu_tensors_run_the_reference_unless_triton_is_asked_for(backend, dtype, d, window, with_docs, scale):
    # auto -> reference on CPU; cuda has no kernel for this op and falls back to auto.
    q, k, v = qkv(d=d, dtype=dtype)
    kwargs = dict(window=window, doc_ids=documents() if with_docs else None, scale=scale)
    with kernels.use_backend(backend):
        result = forward_backward(kernels.sliding_window_attention, [q, k, v], seed=2, **kwargs)
    assert_identical(result, forward_backward(reference.sliding_window_attention, [q, k, v], seed=2,
                                              **kwargs))
    assert result[0].shape == q.shape


@pytest.mark.parametrize("window,with_docs,scale", [(None, False, None), (9, True, 0.12)])
def test_public_op_on_the_triton_backend(window, with_docs, scale, interpreter_device):
    q, k, v = qkv(d=64, dtype=torch.float16, device=interpreter_device)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).half().to(interpreter_device)
    kwargs = dict(window=window, doc_ids=documents(device=interpreter_device) if with_docs else None, scale=scale)
    with kernels.use_backend("triton"):
        result = forward_backward(kernels.sliding_window_attention, [q, k, v], upstream, **kwargs)
    assert result[0].dtype == torch.float16 and result[0].shape == q.shape
    assert_close_to_reference(result, oracle(q, k, v, upstream, **kwargs), torch.float16)


def test_slices_of_a_fused_qkv_tensor_are_fine():
    # The model projects to [B, T, 3, H, D] and slices: strided views with unit stride in D.
    fused = torch.randn(2, 37, 3, 2, 64).bfloat16()
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    assert torch.equal(kernels.sliding_window_attention(q, k, v, window=5),
                       reference.sliding_window_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                          window=5))


def test_backend_report_says_triton_on_cuda_and_reference_on_cpu():
    assert kernels.backends()["ops"]["sliding_window_attention"] == {
        "kernels": ["triton"], "on_cuda_tensors": "triton", "on_cpu_tensors": "reference"}


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.sliding_window_attention(*qkv())


def test_meta_tensors():
    q = torch.empty(1, 4096, 6, 128, dtype=torch.bfloat16, device="meta")
    doc_ids = torch.empty(1, 4096, dtype=torch.int32, device="meta")
    out = kernels.sliding_window_attention(q, q, q, window=1792, doc_ids=doc_ids, scale=0.12)
    assert out.shape == q.shape and out.dtype == torch.bfloat16


def test_fake_impls_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 300, 6, 128, dtype=torch.bfloat16)
        docs = torch.empty(2, 300, dtype=torch.int32)
        out, lse = torch.ops.kernels.sliding_window_attention_fwd(q, q, q, docs, 1792, 0.12, 128)
        grads = torch.ops.kernels.sliding_window_attention_bwd(q, q, q, q, out, lse, None, 0, 0.12, 1)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 6, 300) and lse.dtype == torch.float32
    assert all(g.shape == q.shape and g.dtype == torch.bfloat16 for g in grads)


# aot_eager runs the same ops as eager, so traced and eager results are bitwise equal.

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiles_with_fullgraph_and_matches_eager(backend, interpreter_device):
    q, k, v = qkv(d=64, dtype=torch.float16, device=interpreter_device)
    doc_ids = documents(device=interpreter_device)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).half().to(interpreter_device)

    def attend(a, b, c):
        return kernels.sliding_window_attention(a, b, c, window=7, doc_ids=doc_ids, scale=0.12)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    with kernels.use_backend(backend):
        assert_identical(forward_backward(compiled, [q, k, v], upstream),
                         forward_backward(attend, [q, k, v], upstream))
    torch._dynamo.reset()


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("make_args,exc,match", [
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "q must have dtype"),
    (lambda q, k, v: (q, k.float(), v), TypeError, "k must have dtype"),
    (lambda q, k, v: (q, k, v.half()), TypeError, "v has dtype torch.float16 but q has torch.bfloat16"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k[None], v), ValueError, "k must be 4-D"),
    (lambda q, k, v: (q, k[:, :20], v), ValueError, "k must have q's shape"),
    (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "v must have q's shape"),
    (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "q must not be empty"),
    (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), ValueError, "head dim D must be one of"),
    (lambda q, k, v: tuple(torch.zeros(2, 5, 1, 96, dtype=torch.bfloat16) for _ in range(3)),
     ValueError, "head dim D must be one of"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k is on meta"),
    (lambda q, k, v: (q.transpose(1, 3).contiguous().transpose(1, 3), k, v), ValueError,
     "q must have unit stride along D"),
    (lambda q, k, v: (q, k, v.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "v must have unit stride along D"),
])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bad_tensors_raise_naming_them(make_args, exc, match, backend):
    with kernels.use_backend(backend), pytest.raises(exc, match=match):
        kernels.sliding_window_attention(*make_args(*qkv()))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"window": 0}, ValueError, "window must be > 0"),
    ({"window": -3}, ValueError, "window must be > 0"),
    ({"window": 4.0}, TypeError, "window must be an int"),
    ({"window": True}, TypeError, "window must be an int"),
    ({"window": torch.tensor(4)}, TypeError, "window must be an int"),
    ({"doc_ids": documents().long()}, TypeError, "doc_ids must have dtype"),
    ({"doc_ids": documents().float()}, TypeError, "doc_ids must have dtype"),
    ({"doc_ids": documents()[0]}, ValueError, "doc_ids must be 2-D"),
    ({"doc_ids": documents(t=36)}, ValueError, r"doc_ids must have shape \[B, T\]"),
    ({"doc_ids": documents(b=1)}, ValueError, r"doc_ids must have shape \[B, T\]"),
    ({"doc_ids": documents().to("meta")}, ValueError, "doc_ids is on meta"),
    ({"doc_ids": [[0] * 37] * 2}, TypeError, "doc_ids must be a torch.Tensor"),
    ({"scale": 0.0}, ValueError, "scale must be > 0"),
    ({"scale": "0.12"}, TypeError, "scale must be a number"),
    ({"block_size": 0}, ValueError, "block_size must be > 0"),
    ({"block_size": 16.0}, TypeError, "block_size must be an int"),
    ({"window": 24, "block_size": 16}, ValueError, "window must be a whole number of blocks"),
])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bad_options_raise_naming_them(kwargs, exc, match, backend):
    with kernels.use_backend(backend), pytest.raises(exc, match=match):
        kernels.sliding_window_attention(*qkv(), **kwargs)


# ---- ahead-of-time compilation for Hopper -----------------------------------------------

def _hopper_specs(dtype="bf16", head_dim=128):
    def strides(*names):
        return {f"stride_{n}{axis}": "i32" for n in names for axis in "bth"}

    tensor = f"*{dtype}"

    def descriptors(config, **blocks):  # q, k, v, dO: TMA descriptors of [B, T, H * D] views
        return {arg: f"tensordesc<{dtype}[1, {config[block]}, {head_dim}]>" for arg, block in blocks.items()}

    qkv = dict(q_desc="BLOCK_M", k_desc="BLOCK_N", v_desc="BLOCK_N")
    signatures = {
        "fwd": ("_sliding_window_attn_fwd", lambda c: {
            **descriptors(c, **qkv), "doc_ptr": "*i32", "order_ptr": "*i32", "o_ptr": tensor, "lse_ptr": "*fp32",
            "T": "i32", "window": "i32", "scale_log2": "fp32", **strides("o"), "stride_docb": "i32"}),
        "dkdv": ("_sliding_window_attn_bwd_dkdv", lambda c: {
            **descriptors(c, **qkv, do_desc="BLOCK_M"), "lse_ptr": "*fp32", "delta_ptr": "*fp32",
            "doc_ptr": "*i32", "order_ptr": "*i32", "dk_ptr": tensor, "dv_ptr": tensor, "T": "i32", "window": "i32",
            "scale": "fp32", "scale_log2": "fp32", "stride_docb": "i32"}),
        "dq": ("_sliding_window_attn_bwd_dq", lambda c: {
            **descriptors(c, **qkv, do_desc="BLOCK_M", o_desc="BLOCK_M"), "lse_ptr": "*fp32", "delta_ptr": "*fp32",
            "doc_ptr": "*i32", "order_ptr": "*i32", "dq_ptr": tensor, "T": "i32", "window": "i32",
            "scale": "fp32", "scale_log2": "fp32", "stride_docb": "i32"}),
    }
    specs = []
    for name, (kernel, make_signature) in signatures.items():
        config = dict(swa.CONFIGS[head_dim][name])
        signature = make_signature(config)
        warps = config.pop("num_warps")
        config.pop("num_stages")
        # What the JIT specializes at the speedrun's shapes: 16-byte aligned tensors, strides
        # and T multiples of 16 (window is excluded from specialization).
        divisible = [n for n in signature if n.endswith("_ptr") or n.startswith("stride") or n == "T"]
        specs.append({"module": "kernels.sliding_window_attention", "kernel": kernel, "signature": signature,
                      # The GPT trainer's default: the record's 128-token window blocks.
                      "constexprs": {"HAS_DOCS": True, "HEAD_DIM": head_dim, "SCAN": swa.SCAN_CHUNK,
                                     "WINDOW_BLOCK": 128, **config},
                      "num_warps": warps, "divisible_by_16": divisible})
    return specs


def test_triton_kernels_compile_for_sm90_with_wgmma():
    specs = _hopper_specs()
    for spec, compiled in zip(specs, compile_for_hopper(specs)):
        ptx = compiled["ptx"]
        assert compiled["cubin_bytes"] > 0 and ".target sm_90" in ptx, spec["kernel"]
        # Hopper tensor cores, fed by TMA copies of the Q, K, V and dO (and O) tiles.
        assert "wgmma.mma_async" in ptx, spec["kernel"]
        assert "cp.async.bulk.tensor" in ptx, spec["kernel"]


# ---- the Gluon forward (kernels/sliding_window_attention_gluon.py) --------------------------
# Gluon has no interpreter: here its range kernel runs (a Triton kernel), the switch is
# checked, and the kernel is compiled for sm_90; its results are checked on a GPU below.

swa_gluon = importlib.import_module("kernels.sliding_window_attention_gluon")


@pytest.mark.parametrize("t,window,lengths,bm,bn,block_size", [
    (200, 50, [40, 3, 1, 70, 9], 16, 32, None),
    (173, None, [90, 20], 32, 16, None),
    (97, 300, None, 32, 16, None),
    (300, 128, [150, 20], 32, 16, 128),
])
def test_gluon_ranges_are_the_visible_blocks_and_order_is_longest_first(t, window, lengths, bm, bn, block_size,
                                                                        interpreter_device):
    # The Gluon forward walks the key blocks that _fwd_ranges writes: exactly those with a
    # visible pair, unmasked exactly when all pairs are visible (brute force), in the
    # launch order that the tile-language forward's _longest_first gives.
    doc_ids = documents_of_lengths(lengths, t) if lengths else None
    mask = reference.attention_mask(t, window=window, doc_ids=doc_ids, block_size=block_size)[0]
    docs, doc_stride, has_docs = swa._doc_args(doc_ids.to(interpreter_device) if lengths else None,
                                               interpreter_device)
    kernel_window = swa._kernel_window(window or 0, t, block_size or 1)
    ranges, order = swa_gluon.ranges_and_order(docs, doc_stride, has_docs, 1, t, kernel_window, block_size or 1,
                                               interpreter_device, block_m=bm, block_n=bn)
    _check_ranges(ranges[0].cpu(), mask, bm, bn, t)
    expected = swa._longest_first(docs, doc_stride, has_docs, 1, t, kernel_window, dict(BLOCK_M=bm, BLOCK_N=bn),
                                  block_size or 1, True, interpreter_device)
    assert torch.equal(order.cpu(), expected.cpu())


def test_forward_switch_is_checked_and_gluon_refuses_cpu_tensors(monkeypatch, interpreter_device):
    q, k, v = qkv(1, 40, 1, 64, torch.float16, device="cpu")
    monkeypatch.setattr(swa, "FORWARD", "gluon-ish")
    with pytest.raises(ValueError, match=r"FORWARD \(SPEEDRUN_ATTENTION_FORWARD\) must be one of"):
        swa._forward(q, k, v, None, 9, 0.12)
    monkeypatch.setattr(swa, "FORWARD", "gluon")
    reason = "CUDA tensors only" if swa_gluon.AVAILABLE else "no Gluon Hopper API"
    with pytest.raises(RuntimeError, match=f"Gluon attention forward cannot run here: .*{reason}"):
        swa._forward(q, k, v, None, 9, 0.12)


def test_python_m_kernels_names_the_attention_forward(monkeypatch, capsys):
    from kernels import __main__ as cli
    monkeypatch.setattr(cli.swa, "FORWARD", "gluon")
    assert cli.main([]) == 0
    assert "sliding_window_attention: forward: gluon kernel" in capsys.readouterr().out
    monkeypatch.setattr(cli.swa_gluon, "AVAILABLE", False)  # as with a triton without Gluon
    assert cli.main([]) == 0
    assert "forward: triton kernel only" in capsys.readouterr().out


@pytest.mark.skipif(not swa_gluon.AVAILABLE, reason="this triton has no Gluon Hopper API")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gluon_forward_compiles_for_sm90_with_the_softmax_wait_leaving_one_group(head_dim, tmp_path):
    # The PTX keeps one wgmma group in flight at the softmax wait (wait_group 1), and ptxas
    # kept it: in each of the three key-block loops exactly the waits [1, 0] (a ptxas that
    # serializes the wgmma puts a wait 0 after every one).  Where the exponentials land
    # between them is read for the main stack's build in tests/test_static.py.
    config = dict(swa_gluon.CONFIG)
    warps = config.pop("num_warps")
    desc = {arg: f"gluon_tensordesc<bf16[1, {config[block]}, {head_dim}]>"
            for arg, block in (("q_desc", "BLOCK_M"), ("k_desc", "BLOCK_N"), ("v_desc", "BLOCK_N"))}
    spec = {"module": "kernels.sliding_window_attention_gluon", "kernel": "_gluon_fwd", "num_warps": warps,
            "args": {**desc, "doc_ptr": "*i32", "order_ptr": "*i32", "ranges_ptr": "*i32", "o_ptr": "*bf16",
                     "lse_ptr": "*fp32", "T": 4096, "window": 1792, "scale_log2": 0.17, "stride_ob": 4096 * 768,
                     "stride_ot": 768, "stride_oh": head_dim, "stride_docb": 4096, "HAS_DOCS": True,
                     "HEAD_DIM": head_dim, "WINDOW_BLOCK": 1, **config}}
    compiled, = compile_for_hopper([spec], cubin_dir=str(tmp_path))
    ptx = compiled["ptx"]
    assert compiled["cubin_bytes"] > 0 and ".target sm_90" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    from bench.static import sass
    instrs = sass.code(sass.sass(compiled["cubin_path"])[compiled["name"]])
    last_exit = max(i.addr for i in instrs if i.base == "EXIT")  # try-wait retry loops sit after it
    loops = [span for span in sass.loops(instrs) if span[1] < last_exit
             and any(i.base == "HGMMA" for i in sass.within(instrs, span))]
    assert len(loops) == 3, loops
    for span in loops:
        waits = [int(i.operands[-1], 0) for i in sass.within(instrs, span) if i.op.startswith("WARPGROUP.DEPBAR")]
        assert waits == [1, 0], (span, waits)
    assert "window" not in compiled["specialized_to_constexpr"] and "window" in compiled["signature"]


# ---- GPU: bf16 against FlexAttention with the exact same mask ------------------------------

def fineweb_like_documents(t, seed, device):
    """[1, t] doc ids with lognormal document lengths (median ~ 600 tokens), clamped to [16, 8192]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(4096, generator=gen) * 1.0 + 6.4).clamp(16, 8192).long()
    ids = torch.repeat_interleave(torch.arange(4096), lengths)[:t]
    return ids.to(torch.int32)[None].to(device)


def flex_reference(q, k, v, *, window, doc_ids, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, length = q.shape[:2]
    docs = doc_ids

    def sliding_window_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window) & (docs[b, q_idx] == docs[b, kv_idx])

    block_mask = create_block_mask(sliding_window_document_causal, batch, None, length, length, device=q.device)
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                         scale=scale)
    return out.transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,h,d,window", [(1, 8192, 6, 128, 1792), (2, 4096 + 77, 3, 64, 896),
                                             (1, 5000, 6, 128, 128)])
def test_gpu_bf16_matches_flex_attention(b, t, h, d, window):
    q, k, v = qkv(b, t, h, d, torch.bfloat16, seed=1, device="cuda")
    doc_ids = torch.cat([fineweb_like_documents(t, seed, "cuda") for seed in range(b)])
    upstream = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    kwargs = dict(window=window, doc_ids=doc_ids, scale=0.12)
    with kernels.use_backend("triton"):
        ours = forward_backward(kernels.sliding_window_attention, [q, k, v], upstream, **kwargs)
    flex = forward_backward(flex_reference, [q, k, v], upstream, **kwargs)
    for mine, theirs in zip(ours, flex):
        assert torch.isfinite(mine).all()
        assert rel_err(mine, theirs) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_bf16_matches_reference_and_changing_window_compiles_nothing():
    q, k, v = qkv(1, 1000, 2, 128, torch.bfloat16, seed=4, device="cuda")
    doc_ids = fineweb_like_documents(1000, 3, "cuda")
    upstream = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    kernel = swa._sliding_window_attn_fwd
    compiled_before = None
    for window in (128, 256, 333, 896, 1):
        kwargs = dict(window=window, doc_ids=doc_ids, scale=None)
        with kernels.use_backend("triton"):
            ours = forward_backward(kernels.sliding_window_attention, [q, k, v], upstream, **kwargs)
        assert_close_to_reference(ours, oracle(q, k, v, upstream, **kwargs), torch.bfloat16)
        compiled = sum(len(cache[0]) for cache in kernel.device_caches.values())
        compiled_before = compiled_before or compiled
        assert compiled == compiled_before, f"window={window} compiled a new forward kernel"


def _check_cuda_graph_capture_and_compile():
    """The op under torch.compile(fullgraph) and replayed from a CUDA graph, against FlexAttention."""
    q, k, v = qkv(1, 2048, 6, 128, torch.bfloat16, seed=5, device="cuda")
    doc_ids = fineweb_like_documents(2048, 1, "cuda")
    attend = torch.compile(lambda a, b, c: kernels.sliding_window_attention(a, b, c, window=896, doc_ids=doc_ids,
                                                                            scale=0.12), fullgraph=True)
    expected = flex_reference(q, k, v, window=896, doc_ids=doc_ids, scale=0.12)
    assert rel_err(attend(q, k, v), expected) < TOL[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()
    kernels.sliding_window_attention(q, k, v, window=896, doc_ids=doc_ids, scale=0.12)  # warm up
    with torch.cuda.graph(graph):
        static_out = kernels.sliding_window_attention(q, k, v, window=896, doc_ids=doc_ids, scale=0.12)
    graph.replay()
    assert rel_err(static_out, expected) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_compile():
    _check_cuda_graph_capture_and_compile()


# ---- GPU: the Gluon forward against the tile-language forward and the reference -------------
# These must pass on an H100 before FORWARD = "gluon" may become the default.

def _gluon_or_skip():
    reason = swa_gluon.unusable_reason(torch.empty(0, device="cuda"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,h,d,window,block_size,dtype", [
    (1, 8192, 6, 128, 1792, None, torch.bfloat16),
    (2, 4096 + 77, 3, 64, 896, None, torch.bfloat16),  # T not a whole block, two sequences
    (1, 6000, 6, 128, 1792, 128, torch.bfloat16),  # the record's block-granular window
    (1, 1000, 2, 128, 1, None, torch.float16),  # each query sees only itself
    (1, 700, 2, 64, None, None, torch.float16),  # no window
])
def test_gpu_gluon_forward_matches_the_triton_forward(b, t, h, d, window, block_size, dtype):
    # Same inputs, same fp32 statistics, P rounded to the input dtype in both: the outputs
    # differ only by summation order and a different split of the rounding (tolerance: the
    # dtype's, as against the reference); lse (fp32 sums) to 1e-3 in base-2 units.
    _gluon_or_skip()
    q, k, v = qkv(b, t, h, d, dtype, seed=2, device="cuda")
    doc_ids = torch.cat([fineweb_like_documents(t, seed, "cuda") for seed in range(b)])
    args = (q, k, v, doc_ids, window or 0, 0.12)
    expected_out, expected_lse = swa._forward(*args, block_size=block_size or 1)
    out, lse = swa_gluon.forward(*args, block_size or 1)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, expected_out) < TOL[dtype]
    assert (lse - expected_lse).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("window,block_size", [(333, None), (256, 128)])
def test_gpu_gluon_forward_with_the_backward_matches_reference_and_windows_compile_nothing(
        window, block_size, monkeypatch):
    _gluon_or_skip()
    monkeypatch.setattr(swa, "FORWARD", "gluon")
    q, k, v = qkv(1, 1000, 2, 128, torch.bfloat16, seed=4, device="cuda")
    doc_ids = fineweb_like_documents(1000, 3, "cuda")
    upstream = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    compiled_before = None
    for w in (window, 2 * window, window + 128):
        kwargs = dict(window=w, doc_ids=doc_ids, scale=None, block_size=block_size)
        with kernels.use_backend("triton"):
            ours = forward_backward(kernels.sliding_window_attention, [q, k, v], upstream, **kwargs)
        assert_close_to_reference(ours, oracle(q, k, v, upstream, **kwargs), torch.bfloat16)
        compiled = sum(len(cache[0]) for cache in swa_gluon._gluon_fwd.device_caches.values())
        compiled_before = compiled_before or compiled
        assert compiled == compiled_before, f"window={w} compiled a new Gluon forward"


@pytest.mark.gpu
def test_gpu_gluon_forward_under_cuda_graph_and_compile(monkeypatch):
    _gluon_or_skip()
    monkeypatch.setattr(swa, "FORWARD", "gluon")
    _check_cuda_graph_capture_and_compile()


# ---- bench/bench_sliding_window_attention.py without a GPU ------------------------------------

def test_bench_documents_and_work_counts():
    from bench import bench_sliding_window_attention as bench

    lengths = bench.document_lengths(49152)
    assert sum(lengths) == 49152 and lengths == bench.document_lengths(49152)  # deterministic
    assert all(length >= 1 for length in lengths) and 20 < len(lengths) < 200
    small = bench.document_lengths(300, seed=3)
    doc_ids = bench.doc_ids_from_lengths(small)
    for window in (None, 1, 37, 1792):
        expected = int(reference.attention_mask(300, window=window, doc_ids=doc_ids).sum())
        assert bench.visible_pairs(small, window) == expected
    assert bench.flops(1000, "fwd") == 4 * 128 * 6 * 1000
    assert bench.flops(1000, "fwd+bwd") == 14 * 128 * 6 * 1000
    with pytest.raises(ValueError):
        bench.flops(1000, "bwd")


def test_bench_case_records_every_implementation_on_cpu(tmp_path, monkeypatch):
    from bench import bench_sliding_window_attention as bench
    from bench import harness

    monkeypatch.setattr(bench, "HEADS", 1)
    ceilings = {harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0, detail="made up")}
    run = harness.BenchRun("swa_test", title="t", out_root=tmp_path, ceilings=ceilings,
                           metadata=harness.collect_metadata("Fake GPU", harness.QUICK_TIMING))
    timed = []

    def fake_timer(step):
        step()
        timed.append(step)
        return 2.0

    bench.run_case(run, t=256, window=128, modes=bench.MODES, impls=["sdpa-causal", "unknown"],
                   timer=fake_timer, device="cpu")
    results = run.to_dict()["results"]
    assert [(r["case"], r["impl"]) for r in results] == [
        (f"{mode} T=256 w=128", impl) for mode in bench.MODES for impl in ("sdpa-causal", "unknown")]
    assert len(timed) == 2
    sdpa = results[0]
    assert sdpa["work"] == {"flops": bench.flops(256 * 257 // 2, "fwd+bwd", heads=1)}
    assert sdpa["value"] == pytest.approx(sdpa["work"]["flops"] / 2e-3 / 1e12)
    assert "unknown implementation" in results[1]["error"]


def test_bench_without_gpu_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "bench.bench_sliding_window_attention", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "No CUDA GPU found" in done.stdout
