"""Causal attention with a sliding window and a document mask (the GPT record's attention).

Public op (contract below and in DESIGN.md §2.5; the spec is
`kernels.reference.sliding_window_attention`): `sliding_window_attention`.

Backends:
  triton     the block-sparse flash-attention kernels in this file (forward, and a
             backward of two kernels: dQ, which also writes delta = rowsum(dO * O),
             then dK/dV).  On CUDA tensors `auto` picks it; on CPU tensors it runs in
             Triton's interpreter when TRITON_INTERPRET=1 and the backend is set to
             "triton" explicitly.
  reference  plain PyTorch, dense O(T^2) memory: CPU tensors under `auto`.

The window.  Exact (block_size None): query i sees keys j > i - window.  Block-granular
(block_size = 128, the 2025-01 record's FlexAttention BlockMask): the window is
window // block_size whole key blocks ending with i's own block, so query i sees keys
j >= edge(i) = (i // block_size + 1) * block_size - window; exact is block_size 1 in the
same formula.  The kernels take block_size as the constexpr WINDOW_BLOCK (1 or 128:
two compiled variants; a new window value still compiles nothing).

How the kernels skip work.  Query i sees keys j in [lo(i), i] with
lo(i) = max(edge(i), start of i's document) (documents are runs of equal doc_ids).
For a block of queries [m0, m_last] the visible keys lie in [lo(m0), m_last], because
lo never decreases with i; only the key blocks meeting that range are loaded.  Inside
it, a key block is *full* (every pair visible, no mask evaluated) when it ends at or
before m0 (causal), starts at or after edge(m_last) (window) and the query block and the
keys all belong to one document; only the other, *partial* blocks evaluate the
per-element mask (causal, window edge, equal doc ids).
The ranges come from `_key_blocks` / `_query_blocks` below, computed on the device per
program from doc_ids and window: no host synchronization, no dense mask, nothing
precomputed.  Document starts are found by scanning doc_ids backwards from m0 in
vector chunks, never further than the window (the scan costs a few loads of doc_ids).
The backward uses the same two functions: dQ walks the key blocks of its query block
exactly like the forward; dK/dV walks the query blocks that can see its key block.
So does the launch order: before each kernel, `_block_work` counts every block's work
with them and a device argsort launches the longest blocks first (see below).

Tiles of q, k, v and dO arrive through TMA descriptors of their [B, T, H * D] views
(host-side TensorDescriptor, in triton 3.6-3.8 and in the interpreter alike).

The forward keeps the online softmax in fp32 and saves the log-sum-exp (in base-2 units
of scale * log2(e) * q.k) for the backward, which recomputes the probabilities.
`window` is a run-time kernel argument excluded from specialization, so changing it
never recompiles a kernel.

Documents must be contiguous (an id does not reappear after a different one, as with
doc_ids = cumsum of document starts): the kernels find a document's start as the start
of its run of equal ids.  Within the blocks they visit they compare ids exactly.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import _backend, _checks, reference

OP = "sliding_window_attention"
_backend.register_op(OP, ("triton",))

HEAD_DIMS = (64, 128)

# Doc ids scanned per step when looking for a document's start or end.
SCAN_CHUNK = 1024


# ---- mask and block ranges: written once, shared by forward and backward ---------------

@triton.jit
def _window_edge(q_pos, window, WINDOW_BLOCK: tl.constexpr):
    """First key the window lets query q_pos see: q_pos - window + 1 for an exact window
    (WINDOW_BLOCK = 1); the first key of the oldest of the window // WINDOW_BLOCK key blocks
    ending with q_pos's own block for a block-granular one."""
    return (q_pos // WINDOW_BLOCK + 1) * WINDOW_BLOCK - window


@triton.jit
def _last_query(k_pos, window, WINDOW_BLOCK: tl.constexpr):
    """Last query whose window reaches key k_pos (the inverse of _window_edge): the largest i
    with _window_edge(i) <= k_pos; k_pos + window - 1 for an exact window."""
    return ((k_pos + window) // WINDOW_BLOCK) * WINDOW_BLOCK - 1


@triton.jit
def _visible(q_pos, k_pos, q_doc, k_doc, window, HAS_DOCS: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    """The mask on broadcastable position / doc-id tensors: may query q_pos see key k_pos?"""
    ok = (k_pos <= q_pos) & (k_pos >= _window_edge(q_pos, window, WINDOW_BLOCK))
    if HAS_DOCS:
        ok = ok & (q_doc == k_doc)
    return ok


@triton.jit
def _run_start(doc_row, pos, limit, CHUNK: tl.constexpr):
    """Smallest s in [limit, pos] such that doc[s..pos] all equal doc[pos] (limit <= pos)."""
    doc = tl.load(doc_row + pos)
    start = limit
    end = pos  # doc ids at [end - CHUNK, end) are looked at next
    while end > start:
        offs = end - CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(doc_row + offs, mask=offs >= start, other=doc)
        last_other = tl.max(tl.where(ids != doc, offs, -1), axis=0)
        start = tl.maximum(start, last_other + 1)  # > end - CHUNK once another id is found
        end -= CHUNK
    return start


@triton.jit
def _run_end(doc_row, pos, limit, CHUNK: tl.constexpr):
    """Largest e in [pos, limit] such that doc[pos..e] all equal doc[pos] (limit <= T - 1)."""
    doc = tl.load(doc_row + pos)
    end = limit
    begin = pos + 1  # doc ids at [begin, begin + CHUNK) are looked at next
    while begin <= end:
        offs = begin + tl.arange(0, CHUNK)
        ids = tl.load(doc_row + offs, mask=offs <= end, other=doc)
        first_other = tl.min(tl.where(ids != doc, offs, end + 1), axis=0)
        end = tl.minimum(end, first_other - 1)
        begin += CHUNK
    return end


@triton.jit
def _key_blocks(doc_row, q_docs, m0, m_last, window, HAS_DOCS: tl.constexpr, BLOCK_N: tl.constexpr,
                CHUNK: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    """Key blocks for the query rows [m0, m_last]: (first, first full, end of full, end).

    Blocks [first, first_full) and [end_full, end) are partial (masked), blocks
    [first_full, end_full) are full (every pair visible).  q_docs: the rows' doc ids
    (rows past T repeat doc[T - 1]).
    """
    lo = tl.maximum(_window_edge(m0, window, WINDOW_BLOCK), 0)
    if HAS_DOCS:
        lo = _run_start(doc_row, m0, lo, CHUNK)
    first = lo // BLOCK_N
    end = m_last // BLOCK_N + 1
    # Full keys: j <= m0 (causal for every row), j >= the window edge of m_last (window for
    # every row: the edge never decreases) and j >= lo (the document of m0, which is every
    # row's when single_doc).
    full_first = tl.cdiv(tl.maximum(_window_edge(m_last, window, WINDOW_BLOCK), lo), BLOCK_N)
    full_end = (m0 + 1) // BLOCK_N
    no_full = full_end <= full_first
    if HAS_DOCS:  # rows (keys) of more than one document: every block needs the doc mask
        no_full = no_full | (tl.min(q_docs, axis=0) != tl.max(q_docs, axis=0))
    full_first = tl.where(no_full, end, full_first)
    full_end = tl.where(no_full, end, full_end)
    return first, full_first, full_end, end


@triton.jit
def _query_blocks(doc_row, k_docs, n0, n_last, T, window, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                  CHUNK: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    """Query blocks that see the key rows [n0, n_last]: (first, first full, end of full, end).

    The mirror of _key_blocks: queries i >= n0, i <= _last_query(n_last), in the document
    of n_last; full ones also have i >= n_last, i <= _last_query(n0) and one document
    for all keys.  k_docs: the keys' doc ids (keys past T repeat doc[T - 1]).
    """
    hi = tl.minimum(_last_query(n_last, window, WINDOW_BLOCK), T - 1)
    if HAS_DOCS:
        hi = _run_end(doc_row, n_last, hi, CHUNK)
    first = n0 // BLOCK_M
    end = hi // BLOCK_M + 1
    full_first = tl.cdiv(n_last, BLOCK_M)
    full_end = (tl.minimum(_last_query(n0, window, WINDOW_BLOCK), hi) + 1) // BLOCK_M
    no_full = full_end <= full_first
    if HAS_DOCS:  # rows (keys) of more than one document: every block needs the doc mask
        no_full = no_full | (tl.min(k_docs, axis=0) != tl.max(k_docs, axis=0))
    full_first = tl.where(no_full, end, full_first)
    full_end = tl.where(no_full, end, full_end)
    return first, full_first, full_end, end


@triton.jit
def _doc_ids_of(doc_row, pos, T, HAS_DOCS: tl.constexpr):
    """Doc ids at positions pos (clamped to T - 1, so padding rows repeat the last id)."""
    if HAS_DOCS:
        return tl.load(doc_row + tl.minimum(pos, T - 1))
    else:
        return pos


# ---- longest work first ------------------------------------------------------------------
# The GPU hands out a grid's CTAs in launch order, so launching the blocks with the most key
# (query) blocks to visit first is longest-processing-time-first list scheduling: the last
# wave is made of short blocks and the tail of idle SMs shrinks.  Work varies with the
# data: a query block near its document's start (or the sequence start) sees few keys.  So
# each launch reads its block index from `order`, a permutation computed on the device
# (no host sync, capturable in a CUDA graph) from _block_work and a stable descending sort.
# The grid is (heads, blocks, batch): heads vary fastest, so the launch order is longest
# first across all heads, not per head.

@triton.jit(do_not_specialize=["window"])
def _block_work(doc_ptr, work_ptr, T, window, stride_docb, HAS_DOCS: tl.constexpr, QUERY_BLOCKS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    """work[b, p] = key blocks that query block p visits (QUERY_BLOCKS; the forward and dQ),
    else query blocks that key block p visits (dK/dV): the same ranges the kernels walk."""
    batch = tl.program_id(1)
    doc_row = doc_ptr + batch.to(tl.int64) * stride_docb
    if QUERY_BLOCKS:
        m0 = tl.program_id(0) * BLOCK_M
        q_docs = _doc_ids_of(doc_row, m0 + tl.arange(0, BLOCK_M), T, HAS_DOCS)
        first, _, _, end = _key_blocks(doc_row, q_docs, m0, tl.minimum(m0 + BLOCK_M, T) - 1, window, HAS_DOCS,
                                       BLOCK_N, SCAN, WINDOW_BLOCK)
    else:
        n0 = tl.program_id(0) * BLOCK_N
        k_docs = _doc_ids_of(doc_row, n0 + tl.arange(0, BLOCK_N), T, HAS_DOCS)
        first, _, _, end = _query_blocks(doc_row, k_docs, n0, tl.minimum(n0 + BLOCK_N, T) - 1, T, window, HAS_DOCS,
                                         BLOCK_M, SCAN, WINDOW_BLOCK)
    tl.store(work_ptr + batch * tl.num_programs(0) + tl.program_id(0), end - first)


@triton.jit
def _launch_block(order_ptr, batch):
    """The block this program computes: entry program_id(1) of its batch row's order."""
    return tl.load(order_ptr + batch.to(tl.int64) * tl.num_programs(1) + tl.program_id(1))


# ---- tiles through TMA -------------------------------------------------------------------
# q, k, v, dO are read through host-side TMA descriptors of their [B, T, H * D] views (the
# launchers' _descriptor), in [1, ROWS, D] tiles: the copy engine computes every address (no
# per-thread pointers held in registers across the pipeline's stages, which is what made
# the pointer kernels spill) and fills rows past T with zeros, so no load needs a mask.
# (A [B, T, H, D] descriptor with [1, ROWS, 1, D] tiles would take any head stride, but
# its unit middle dimension makes Triton route every tile through registers: +30 to 75
# registers per kernel in the sm_90 build.)

@triton.jit
def _tile(desc, batch, row0, head, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [row0, row0 + ROWS) of one (batch, head), from a [B, T, H * D] descriptor (zeros past T)."""
    return tl.reshape(desc.load([batch, row0, head * HEAD_DIM]), [ROWS, HEAD_DIM])


# ---- forward ---------------------------------------------------------------------------

@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                T, window, scale_log2, block_start, block_end,
                MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                WINDOW_BLOCK: tl.constexpr):
    """Online softmax over key blocks [block_start, block_end); MASKED evaluates the exact mask."""
    offs = tl.arange(0, BLOCK_N)
    for block in range(block_start, block_end):
        n0 = block * BLOCK_N
        k = _tile(k_desc, batch, n0, head, BLOCK_N, HEAD_DIM)
        v = _tile(v_desc, batch, n0, head, BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            k_pos = n0 + offs
            k_docs = _doc_ids_of(doc_row, k_pos, T, HAS_DOCS)
            s = tl.where(_visible(q_pos[:, None], k_pos[None, :], q_docs[:, None], k_docs[None, :], window,
                                  HAS_DOCS, WINDOW_BLOCK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2)
        if MASKED:  # a row may have seen nothing yet: shift by 0, not -inf (no NaN)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * scale_log2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["window"])
def _sliding_window_attn_fwd(
    q_desc, k_desc, v_desc, doc_ptr, order_ptr, o_ptr, lse_ptr,
    T, window, scale_log2,
    stride_ob, stride_ot, stride_oh, stride_docb,
    HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr,
):
    """One program per (head, query block taken from `order`, batch): out rows [m0, m0 + BLOCK_M)
    and their lse."""
    head = tl.program_id(0)
    batch = tl.program_id(2)
    m0 = _launch_block(order_ptr, batch) * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    rows = tl.arange(0, BLOCK_M)
    q_pos = m0 + rows
    dims = tl.arange(0, HEAD_DIM)
    q = _tile(q_desc, batch, m0, head, BLOCK_M, HEAD_DIM)
    doc_row = doc_ptr + batch.to(tl.int64) * stride_docb
    q_docs = _doc_ids_of(doc_row, q_pos, T, HAS_DOCS)
    first, full_first, full_end, end = _key_blocks(doc_row, q_docs, m0, m_last, window, HAS_DOCS, BLOCK_N, SCAN,
                                                   WINDOW_BLOCK)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                                T, window, scale_log2, first, full_first,
                                True, HAS_DOCS, HEAD_DIM, BLOCK_N, WINDOW_BLOCK)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                                T, window, scale_log2, full_first, full_end,
                                False, HAS_DOCS, HEAD_DIM, BLOCK_N, WINDOW_BLOCK)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                                T, window, scale_log2, full_end, end, True, HAS_DOCS, HEAD_DIM, BLOCK_N, WINDOW_BLOCK)

    in_range = q_pos < T
    l_i = tl.where(in_range, l_i, 1.0)  # rows past T saw nothing; they are not stored
    out = acc / l_i[:, None]
    o_ptrs = (o_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + m0.to(tl.int64) * stride_ot
              + rows[:, None] * stride_ot + dims[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=in_range[:, None])
    lse_row = lse_ptr + (batch.to(tl.int64) * tl.num_programs(0) + head) * T
    tl.store(lse_row + q_pos, m_i + tl.log2(l_i), mask=in_range)


# ---- backward --------------------------------------------------------------------------

@triton.jit
def _dkdv_blocks(dk, dv, k, v, k_pos, k_docs, q_desc, do_desc, batch, head, lse_row, delta_row,
                 doc_row, T, window, scale_log2, block_start, block_end,
                 MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 WINDOW_BLOCK: tl.constexpr):
    """Accumulate dK, dV (transposed layout: key rows) over query blocks [block_start, block_end)."""
    offs = tl.arange(0, BLOCK_M)
    for block in range(block_start, block_end):
        m0 = block * BLOCK_M
        q_pos = m0 + offs
        q = _tile(q_desc, batch, m0, head, BLOCK_M, HEAD_DIM)  # rows past T: q = do = 0
        do = _tile(do_desc, batch, m0, head, BLOCK_M, HEAD_DIM)
        if MASKED:  # rows past T: lse = +inf -> p = 0, ds = 0
            lse = tl.load(lse_row + q_pos, mask=q_pos < T, other=float("inf"))
            delta = tl.load(delta_row + q_pos, mask=q_pos < T, other=0.0)
        else:
            lse = tl.load(lse_row + q_pos)
            delta = tl.load(delta_row + q_pos)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * scale_log2 - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            q_docs = _doc_ids_of(doc_row, q_pos, T, HAS_DOCS)
            p_t = tl.where(_visible(q_pos[None, :], k_pos[:, None], q_docs[None, :], k_docs[:, None], window,
                                    HAS_DOCS, WINDOW_BLOCK), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["window"])
def _sliding_window_attn_bwd_dkdv(
    q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, doc_ptr, order_ptr, dk_ptr, dv_ptr,
    T, window, scale, scale_log2, stride_docb,
    HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr,
):
    """One program per (head, key block taken from `order`, batch): dK, dV of keys [n0, n0 + BLOCK_N).

    dk, dv are contiguous [B, T, H, D]; each program owns its rows, so no atomics.
    """
    head = tl.program_id(0)
    batch = tl.program_id(2)
    n0 = _launch_block(order_ptr, batch) * BLOCK_N
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    offs = tl.arange(0, BLOCK_N)
    k_pos = n0 + offs
    dims = tl.arange(0, HEAD_DIM)
    k = _tile(k_desc, batch, n0, head, BLOCK_N, HEAD_DIM)
    v = _tile(v_desc, batch, n0, head, BLOCK_N, HEAD_DIM)
    doc_row = doc_ptr + batch.to(tl.int64) * stride_docb
    k_docs = _doc_ids_of(doc_row, k_pos, T, HAS_DOCS)
    first, full_first, full_end, end = _query_blocks(doc_row, k_docs, n0, n_last, T, window, HAS_DOCS,
                                                     BLOCK_M, SCAN, WINDOW_BLOCK)

    lse_row = lse_ptr + (batch.to(tl.int64) * tl.num_programs(0) + head) * T
    delta_row = delta_ptr + (batch.to(tl.int64) * tl.num_programs(0) + head) * T
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _dkdv_blocks(dk, dv, k, v, k_pos, k_docs, q_desc, do_desc, batch, head, lse_row, delta_row,
                          doc_row, T, window, scale_log2, first, full_first,
                          True, HAS_DOCS, HEAD_DIM, BLOCK_M, WINDOW_BLOCK)
    dk, dv = _dkdv_blocks(dk, dv, k, v, k_pos, k_docs, q_desc, do_desc, batch, head, lse_row, delta_row,
                          doc_row, T, window, scale_log2, full_first, full_end,
                          False, HAS_DOCS, HEAD_DIM, BLOCK_M, WINDOW_BLOCK)
    dk, dv = _dkdv_blocks(dk, dv, k, v, k_pos, k_docs, q_desc, do_desc, batch, head, lse_row, delta_row,
                          doc_row, T, window, scale_log2, full_end, end,
                          True, HAS_DOCS, HEAD_DIM, BLOCK_M, WINDOW_BLOCK)

    # dk, dv are contiguous [B, T, H, D] with q's B, T, H.
    n_heads = tl.num_programs(0)
    in_range = k_pos[:, None] < T
    out_offsets = ((batch.to(tl.int64) * T + n0) * n_heads + head) * HEAD_DIM + (offs[:, None] * n_heads * HEAD_DIM
                                                                                 + dims[None, :])
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=in_range)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
               T, window, scale_log2, block_start, block_end,
               MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               WINDOW_BLOCK: tl.constexpr):
    """Accumulate dQ over key blocks [block_start, block_end)."""
    offs = tl.arange(0, BLOCK_N)
    for block in range(block_start, block_end):
        n0 = block * BLOCK_N
        k = _tile(k_desc, batch, n0, head, BLOCK_N, HEAD_DIM)
        v = _tile(v_desc, batch, n0, head, BLOCK_N, HEAD_DIM)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
        if MASKED:
            k_pos = n0 + offs
            k_docs = _doc_ids_of(doc_row, k_pos, T, HAS_DOCS)
            p = tl.where(_visible(q_pos[:, None], k_pos[None, :], q_docs[:, None], k_docs[None, :], window,
                                  HAS_DOCS, WINDOW_BLOCK), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["window"])
def _sliding_window_attn_bwd_dq(
    q_desc, k_desc, v_desc, do_desc, o_desc, lse_ptr, delta_ptr, doc_ptr, order_ptr, dq_ptr,
    T, window, scale, scale_log2, stride_docb,
    HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr,
):
    """One program per (head, query block taken from `order`, batch): dQ of rows [m0, m0 + BLOCK_M);
    no atomics.

    It also writes delta = rowsum(dO * O) of its rows, which dK/dV (launched after it)
    reads: the dO tile is loaded here anyway, so a separate delta pass would read dO twice.
    """
    head = tl.program_id(0)
    batch = tl.program_id(2)
    m0 = _launch_block(order_ptr, batch) * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    rows = tl.arange(0, BLOCK_M)
    q_pos = m0 + rows
    dims = tl.arange(0, HEAD_DIM)
    q = _tile(q_desc, batch, m0, head, BLOCK_M, HEAD_DIM)
    do = _tile(do_desc, batch, m0, head, BLOCK_M, HEAD_DIM)
    o = _tile(o_desc, batch, m0, head, BLOCK_M, HEAD_DIM)
    lse_row = lse_ptr + (batch.to(tl.int64) * tl.num_programs(0) + head) * T
    delta_row = delta_ptr + (batch.to(tl.int64) * tl.num_programs(0) + head) * T
    lse = tl.load(lse_row + q_pos, mask=q_pos < T, other=float("inf"))
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # rows past T: 0 (TMA zero fill)
    tl.store(delta_row + q_pos, delta, mask=q_pos < T)
    doc_row = doc_ptr + batch.to(tl.int64) * stride_docb
    q_docs = _doc_ids_of(doc_row, q_pos, T, HAS_DOCS)
    first, full_first, full_end, end = _key_blocks(doc_row, q_docs, m0, m_last, window, HAS_DOCS, BLOCK_N, SCAN,
                                                   WINDOW_BLOCK)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                    T, window, scale_log2, first, full_first, True, HAS_DOCS, HEAD_DIM, BLOCK_N, WINDOW_BLOCK)
    dq = _dq_blocks(dq, q, do, lse, delta, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                    T, window, scale_log2, full_first, full_end, False, HAS_DOCS, HEAD_DIM, BLOCK_N, WINDOW_BLOCK)
    dq = _dq_blocks(dq, q, do, lse, delta, q_pos, q_docs, k_desc, v_desc, batch, head, doc_row,
                    T, window, scale_log2, full_end, end, True, HAS_DOCS, HEAD_DIM, BLOCK_N, WINDOW_BLOCK)

    n_heads = tl.num_programs(0)
    in_range = q_pos[:, None] < T
    out_offsets = ((batch.to(tl.int64) * T + m0) * n_heads + head) * HEAD_DIM + (rows[:, None] * n_heads * HEAD_DIM
                                                                                 + dims[None, :])
    tl.store(dq_ptr + out_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=in_range)


# ---- launchers -------------------------------------------------------------------------

# Block sizes and warps per kernel and head dim: 128-row wgmma tiles over two warpgroups
# (forward 128 x 128 with K/V double-buffered: 3 stages would take all 227 KB of shared
# memory; dK/dV 64 keys x 64 queries, the widest tiles whose accumulators, K and V fit),
# chosen so that the sm_90 builds of all three kernels fit in 255 registers without
# spilling (bench/results/static/sliding_window_attention.md; bench/NOTES.md lists what
# spilled).  NOT timed on a GPU yet.  Tests pass smaller blocks to exercise many blocks.
CONFIGS = {
    64: {"fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
         "dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
         "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)},
    128: {"fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
          "dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
          "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)},
}
LOG2_E = 1.4426950408889634


def _descriptor(t, rows):
    """TMA descriptor of a [B, T, H, D] tensor read in [1, rows, D] tiles of its [B, T, H * D] view.

    That view needs unit stride along D and the heads packed along each row (stride_h == D:
    true of contiguous tensors and of the model's fused-QKV chunks); TMA also wants a
    16-byte aligned base and 16-byte multiple strides.  A tensor without them (an odd
    storage offset, an expanded gradient) is copied once.  A size-1 dimension is never
    stepped along, so its stride (which torch leaves arbitrary) is replaced by a valid one.
    """
    batch, length, heads, head_dim = t.shape

    def strides(t):
        token = t.stride(1) if length > 1 else heads * head_dim
        return [t.stride(0) if batch > 1 else length * token, token]

    size = t.element_size()
    if (t.data_ptr() % 16 or t.stride(3) != 1 or (heads > 1 and t.stride(2) != head_dim)
            or any(stride <= 0 or stride * size % 16 for stride in strides(t))):
        t = t.clone(memory_format=torch.contiguous_format)
    return TensorDescriptor(t, [batch, length, heads * head_dim], [*strides(t), 1], [1, rows, head_dim])


def _new_output(shape, dtype, device):
    """Allocation of every kernel output (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernel_window(window: int, length: int, block_size: int = 1) -> int:
    """The window as the kernels take it: window 0 means unlimited.  A window of T rounded up
    to whole blocks already reaches key 0 from every query, so min(window, that) is exact,
    stays a multiple of block_size and fits int32."""
    whole = -(-length // block_size) * block_size
    return whole if window <= 0 else min(window, whole)


def _doc_args(doc_ids: Optional[torch.Tensor], device):
    if doc_ids is None:
        return torch.zeros(1, dtype=torch.int32, device=device), 0, False
    doc_ids = doc_ids.contiguous()
    return doc_ids, doc_ids.stride(0), True


# Launch blocks longest work first (see _block_work).  False: in position order, as v1
# did; bench/bench_sliding_window_attention.py times both ("ours-triton-position-order"),
# since the order costs a small kernel and a sort per launch that only a GPU can weigh.
LONGEST_FIRST = True
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: T up to 65535 * 64 = 4,194,240 tokens


def _longest_first(docs, doc_stride, has_docs, batch, length, kernel_window, cfg, block_size, query_blocks, device):
    """[B, blocks] int32: per batch row, the query (query_blocks) or key blocks of a kernel
    with config cfg, most work first (ties in position order); see _block_work."""
    blocks = triton.cdiv(length, cfg["BLOCK_M"] if query_blocks else cfg["BLOCK_N"])
    if blocks > MAX_GRID_Y:  # the blocks are the grid's y axis (heads vary fastest, on x)
        raise ValueError(f"T = {length} is too long: {blocks} blocks of a launch exceed the grid's {MAX_GRID_Y}")
    if not LONGEST_FIRST:
        return torch.arange(blocks, dtype=torch.int32, device=device).repeat(batch, 1)
    work = _new_output((batch, blocks), torch.int32, device)
    _block_work[(blocks, batch)](docs, work, length, kernel_window, doc_stride, HAS_DOCS=has_docs,
                                 QUERY_BLOCKS=query_blocks, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                 SCAN=SCAN_CHUNK, WINDOW_BLOCK=block_size, num_warps=4)
    return torch.argsort(work, dim=1, descending=True, stable=True).to(torch.int32)


# The forward kernel on CUDA tensors: "triton" (the tile-language kernel above, the tested
# default) or "gluon" (kernels/sliding_window_attention_gluon.py: Hopper only, keeps a wgmma
# group in flight across the softmax; opt-in until its GPU tests have passed on a GPU).  Read
# once at import from SPEEDRUN_ATTENTION_FORWARD; assigning it switches too.  The backward
# is the same either way.  A `config` (tests' small blocks) always means the triton kernel.
FORWARDS = ("triton", "gluon")
FORWARD = os.environ.get("SPEEDRUN_ATTENTION_FORWARD", "triton")


def _forward(q, k, v, doc_ids, window, scale, config=None, block_size=1):
    """(out [B, T, H, D] contiguous, lse [B, H, T] fp32 in base-2 units of scale*log2(e)*q.k)."""
    if FORWARD not in FORWARDS:
        raise ValueError(f"sliding_window_attention.FORWARD (SPEEDRUN_ATTENTION_FORWARD) must be one of "
                         f"{FORWARDS}, got {FORWARD!r}")
    if FORWARD == "gluon" and config is None:
        from kernels import sliding_window_attention_gluon  # imports this module: loaded on first use
        return sliding_window_attention_gluon.forward(q, k, v, doc_ids, window, scale, block_size)
    batch, length, heads, head_dim = q.shape
    cfg = dict(config or CONFIGS[head_dim]["fwd"])
    out = _new_output((batch, length, heads, head_dim), q.dtype, q.device)
    lse = _new_output((batch, heads, length), torch.float32, q.device)
    docs, doc_stride, has_docs = _doc_args(doc_ids, q.device)
    kernel_window = _kernel_window(window, length, block_size)
    order = _longest_first(docs, doc_stride, has_docs, batch, length, kernel_window, cfg, block_size, True, q.device)
    _sliding_window_attn_fwd[(heads, order.shape[1], batch)](
        _descriptor(q, cfg["BLOCK_M"]), _descriptor(k, cfg["BLOCK_N"]), _descriptor(v, cfg["BLOCK_N"]),
        docs, order, out, lse, length, kernel_window, scale * LOG2_E,
        *out.stride()[:3], doc_stride,
        HAS_DOCS=has_docs, HEAD_DIM=head_dim, SCAN=SCAN_CHUNK, WINDOW_BLOCK=block_size, **cfg)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, doc_ids, window, scale, config=None, block_size=1):
    """(dq, dk, dv), contiguous [B, T, H, D] in q's dtype."""
    batch, length, heads, head_dim = q.shape
    configs = config or CONFIGS[head_dim]
    docs, doc_stride, has_docs = _doc_args(doc_ids, q.device)
    kernel_window = _kernel_window(window, length, block_size)
    delta = _new_output((batch, heads, length), torch.float32, q.device)  # written by the dQ kernel
    dq, dk, dv = (_new_output((batch, length, heads, head_dim), q.dtype, q.device) for _ in range(3))
    common = (length, kernel_window, scale, scale * LOG2_E, doc_stride)
    cfg = configs["dq"]
    order = _longest_first(docs, doc_stride, has_docs, batch, length, kernel_window, cfg, block_size, True, q.device)
    _sliding_window_attn_bwd_dq[(heads, order.shape[1], batch)](
        _descriptor(q, cfg["BLOCK_M"]), _descriptor(k, cfg["BLOCK_N"]), _descriptor(v, cfg["BLOCK_N"]),
        _descriptor(grad_out, cfg["BLOCK_M"]), _descriptor(out, cfg["BLOCK_M"]), lse, delta, docs, order, dq,
        *common, HAS_DOCS=has_docs, HEAD_DIM=head_dim, SCAN=SCAN_CHUNK, WINDOW_BLOCK=block_size, **cfg)
    cfg = configs["dkdv"]
    order = _longest_first(docs, doc_stride, has_docs, batch, length, kernel_window, cfg, block_size, False, q.device)
    _sliding_window_attn_bwd_dkdv[(heads, order.shape[1], batch)](
        _descriptor(q, cfg["BLOCK_M"]), _descriptor(k, cfg["BLOCK_N"]), _descriptor(v, cfg["BLOCK_N"]),
        _descriptor(grad_out, cfg["BLOCK_M"]), lse, delta, docs, order, dk, dv, *common,
        HAS_DOCS=has_docs, HEAD_DIM=head_dim, SCAN=SCAN_CHUNK, WINDOW_BLOCK=block_size, **cfg)
    return dq, dk, dv


# ---- custom ops --------------------------------------------------------------------------
# window travels as an int with 0 meaning unlimited, block_size as an int with 1 meaning an
# exact token window (custom-op schemas want plain ints).

@torch.library.custom_op("kernels::sliding_window_attention_fwd", mutates_args=())
def _swa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor],
                 window: int, scale: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out [B, T, H, D] in q's dtype, lse [B, H, T] fp32 (base-2 units) for backward."""
    return _forward(q, k, v, doc_ids, window, scale, block_size=block_size)


@_swa_forward.register_fake
def _swa_forward_fake(q, k, v, doc_ids, window, scale, block_size):
    batch, length, heads, head_dim = q.shape
    return (q.new_empty((batch, length, heads, head_dim)),
            q.new_empty((batch, heads, length), dtype=torch.float32))


@torch.library.custom_op("kernels::sliding_window_attention_bwd", mutates_args=())
def _swa_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, doc_ids: Optional[torch.Tensor], window: int, scale: float, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the upstream gradient grad_out of out."""
    return _backward(grad_out, q, k, v, out, lse, doc_ids, window, scale, block_size=block_size)


@_swa_backward.register_fake
def _swa_backward_fake(grad_out, q, k, v, out, lse, doc_ids, window, scale, block_size):
    batch, length, heads, head_dim = q.shape
    return tuple(q.new_empty((batch, length, heads, head_dim)) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, window, scale, block_size = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.window, ctx.scale, ctx.block_size = window, scale, block_size
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    dq, dk, dv = _swa_backward(grad_out, q, k, v, out, lse, doc_ids, ctx.window, ctx.scale, ctx.block_size)
    return dq, dk, dv, None, None, None, None


_swa_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _attention_triton(q, k, v, *, window, doc_ids, scale, block_size):
    head_dim = q.shape[3]
    out, _ = _swa_forward(q, k, v, doc_ids, 0 if window is None else int(window),
                          float(head_dim ** -0.5 if scale is None else scale), 1 if block_size is None else block_size)
    return out


_ATTENTION = {"reference": reference.sliding_window_attention, "triton": _attention_triton}


# ---- public op -----------------------------------------------------------------------------

def _validate(q, k, v, window, doc_ids, scale, block_size):
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
    if block_size is not None:
        _checks.number("block_size", block_size, positive=True, integer=True)
        if window is not None and window % block_size:
            raise ValueError(f"window must be a whole number of blocks when block_size is given: "
                             f"{window} is not a multiple of block_size {block_size}")
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
                             scale: float | None = None, block_size: int | None = None) -> torch.Tensor:
    """Causal, sliding-window, document-masked multi-head attention.

    Args:
        q, k, v: [B, T, H, D] bfloat16 or float16, one dtype, shape and device;
            D in (64, 128); unit stride along D (slices of a fused QKV tensor are fine:
            the Triton kernels read them in place, without copies; layouts whose heads
            are not packed along a row are copied once).
        window: None (unlimited) or an int >= 1: query i attends key j only if i - j < window
            (window=1: each query sees only itself); with block_size, only if
            i // block_size - j // block_size < window // block_size.
        block_size: None (the window counts tokens) or an int >= 1 dividing window: the
            window counts whole key blocks of block_size tokens (positions [n*block_size,
            (n+1)*block_size)).  A query sees every key of its document in its own block (up
            to itself) and in the window // block_size - 1 blocks before it: the 2025-01
            record's FlexAttention BlockMask with block_size=128 (its short window of
            window_blocks // 2 blocks, at least 1).
        doc_ids: None (one document per sequence) or [B, T] int32: query i attends key j
            only if doc_ids[b, j] == doc_ids[b, i].  Documents are contiguous runs of
            equal ids (e.g. the cumsum of document starts); the Triton kernels rely on it.
        scale: None (D**-0.5) or a number > 0 multiplying q k^T.

    Returns:
        [B, T, H, D] in q's dtype: softmax over the allowed keys j <= i of scale * q_i.k_j,
        applied to v, computed in fp32.  Every query attends at least itself, so no row is
        fully masked.  Gradients for q, k and v.

    Backends: "triton" (block-sparse flash attention: fully masked key blocks are never
    loaded, so the work grows with T*window; `auto` on CUDA tensors), "reference" (dense,
    `auto` on CPU tensors).  The window is a run-time value: changing it recompiles no
    kernel.  No host synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate(q, k, v, window, doc_ids, scale, block_size)
    implementation = _ATTENTION[_backend.choose(OP, q.device)]
    return implementation(q, k, v, window=window, doc_ids=doc_ids, scale=scale, block_size=block_size)
