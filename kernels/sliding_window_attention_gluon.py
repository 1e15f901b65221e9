"""Gluon forward of sliding-window attention: a wgmma group stays in flight across the softmax.

Why a second forward.  Triton's tile language cannot keep a QK^T wgmma in flight while
the softmax reads the previous score tile: its wgmma pipeliner waits for every dot whose
result feeds anything but another dot's accumulator (bench/NOTES.md, sliding_window_attention).
Gluon (`triton.experimental.gluon`, in triton 3.6 and 3.8) issues wgmma asynchronously
and waits with an explicit count, so this kernel runs FlashAttention-3's intra-warpgroup
pipeline: per key block j,

    issue S(j+1) = Q K(j+1)^T                 (async)
    softmax of S(j) -> P(j), alpha            (overlaps S(j+1) and PV(j-1))
    wait until 1 group is left                (PV(j-1) done; S(j+1) may still run)
    O = alpha * O; issue O += P(j) V(j)       (async)
    wait until 1 group is left                (S(j+1) done; PV(j) still runs)

so no wait inside the loop waits for everything (`wgmma.wait_group 1`, never 0).
Tiles arrive by TMA into two K and two V buffers tracked by mbarriers.

Same contract as the tile-language forward (kernels/sliding_window_attention.py): exact
or block-granular window, document ids, a run-time window (no recompiles), the same
log-sum-exp for the shared backward.  The key-block ranges come from that module's
`_key_blocks`, run by a small Triton kernel (`_fwd_ranges`) whose counts also give the
longest-first launch order, so the range logic stays written once; one loop walks all
key blocks of a query block and evaluates the mask only on the partial ones.

Gluon does not run in Triton's interpreter, and this kernel has not run on a GPU yet:
it is compiled and read statically (tests/test_static.py), its GPU tests compare it with
the tile-language kernel and the reference, and it is used only when asked for
(`kernels.sliding_window_attention.FORWARD = "gluon"`) until those tests have passed.
"""
from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

# The module (kernels/__init__.py exports the op of the same name as an attribute of kernels).
swa = importlib.import_module("kernels.sliding_window_attention")

try:  # Gluon's Hopper API as triton 3.6 and 3.8 both spell it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    AVAILABLE = True
except ImportError:  # an older Triton: only the tile-language forward exists
    AVAILABLE = False

# 128 queries x 128 keys per step over two warpgroups (64 query rows each), as the
# tile-language forward: S, O (fp32) and P (bf16) take 64 + 64 + 32 registers a thread, and
# Q, two K and two V tiles 160 KB (D = 128) of shared memory.
CONFIG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8)


@triton.jit(do_not_specialize=["window"])
def _fwd_ranges(doc_ptr, ranges_ptr, T, window, stride_docb, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SCAN: tl.constexpr, WINDOW_BLOCK: tl.constexpr):
    """ranges[b, p] = (first, first full, end of full, end) key blocks of query block p:
    swa._key_blocks, so the Gluon forward walks exactly the tile-language forward's blocks."""
    batch = tl.program_id(1)
    block = tl.program_id(0)
    doc_row = doc_ptr + batch.to(tl.int64) * stride_docb
    m0 = block * BLOCK_M
    q_docs = swa._doc_ids_of(doc_row, m0 + tl.arange(0, BLOCK_M), T, HAS_DOCS)
    first, full_first, full_end, end = swa._key_blocks(doc_row, q_docs, m0, tl.minimum(m0 + BLOCK_M, T) - 1, window,
                                                       HAS_DOCS, BLOCK_N, SCAN, WINDOW_BLOCK)
    out = ranges_ptr + (batch * tl.num_programs(0) + block) * 4
    tl.store(out, first)
    tl.store(out + 1, full_first)
    tl.store(out + 2, full_end)
    tl.store(out + 3, end)


if AVAILABLE:

    @gluon.jit
    def _softmax_step(s, m_i, l_i, q_pos, q_docs, doc_row, n0, T, window, scale_log2, MASKED: gl.constexpr,
                      HAS_DOCS: gl.constexpr, WINDOW_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr,
                      COL_LAYOUT: gl.constexpr):
        """Online-softmax update for one score tile: (p in fp32, alpha, new max, new sum).
        MASKED: the block is partial, evaluate the exact mask."""
        if MASKED:
            k_pos = n0 + gl.arange(0, BLOCK_N, layout=COL_LAYOUT)
            ok = (k_pos[None, :] <= q_pos[:, None]) & (
                k_pos[None, :] >= (q_pos[:, None] // WINDOW_BLOCK + 1) * WINDOW_BLOCK - window)
            if HAS_DOCS:
                k_docs = gl.load(doc_row + gl.minimum(k_pos, T - 1))
                ok = ok & (q_docs[:, None] == k_docs[None, :])
            s = gl.where(ok, s, float("-inf"))
        elif HAS_DOCS:
            # A full block lies in the rows' document, so this changes nothing.  It is here for
            # ptxas: without it (as without documents) ptxas hoists the wait for PV above the
            # exponentials of full blocks, and only masked blocks overlap the two
            # (tests/test_static.py reads the order in the SASS).
            k_pos = n0 + gl.arange(0, BLOCK_N, layout=COL_LAYOUT)
            k_docs = gl.load(doc_row + gl.minimum(k_pos, T - 1))
            s = gl.where(q_docs[:, None] == k_docs[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
        if MASKED:  # a row may have seen nothing yet: shift by 0, not -inf (no NaN)
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * scale_log2 - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _steps(block_lo, block_hi, first, end, state, q_tile, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc,
               batch, col0, s_zero, q_pos, q_docs, doc_row, T, window, scale_log2, MASKED: gl.constexpr,
               HAS_DOCS: gl.constexpr, WINDOW_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               COL_LAYOUT: gl.constexpr, OROW_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr):
        """Steps block_lo .. block_hi - 1 of the forward's pipeline; state = (P(block_lo) in the PV
        operand layout, its alpha, row max, row sum, O), with no wgmma in flight in or out.

        Step `block`: S(block + 1) and PV(block) are issued back to back, then the softmax of
        S(block + 1) (MASKED: evaluate the mask) runs while PV(block) is still on the tensor
        cores.  Every wgmma is complete at the end of a step, so nothing in flight crosses the
        loop's back edge (ptxas serializes every wgmma of a kernel otherwise).
        """
        p, alpha, m_i, l_i, acc = state
        tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
        for block in range(block_lo, block_hi):
            step = block - first
            buf = step % 2
            nxt = 1 - buf
            # K(block + 2) into this block's K buffer (S(block) completed in the step before).
            fetch = block + 2 < end
            mbarrier.expect(k_bar.index(buf), tile_bytes, pred=fetch)
            tma.async_copy_global_to_shared(k_desc, [batch, (block + 2) * BLOCK_N, col0], k_bar.index(buf),
                                            k_smem.index(buf), pred=fetch)
            mbarrier.wait(k_bar.index(nxt), ((step + 1) // 2) & 1)
            s = warpgroup_mma(q_tile, k_smem.index(nxt).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            acc = acc * gl.convert_layout(alpha, OROW_LAYOUT)[:, None]
            mbarrier.wait(v_bar.index(buf), (step // 2) & 1)
            acc = warpgroup_mma(p, v_smem.index(buf).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            # The softmax wait: S(block + 1) done, PV(block) still in flight.
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            p_next, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_pos, q_docs, doc_row, (block + 1) * BLOCK_N, T,
                                                    window, scale_log2, MASKED, HAS_DOCS, WINDOW_BLOCK, BLOCK_N,
                                                    COL_LAYOUT)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            # Only now may P(block + 1) take the registers of P(block), the A operand that
            # PV(block) read until the wait.
            p = gl.convert_layout(p_next.to(q_tile.dtype), P_LAYOUT)
            # PV(block) done: its V buffer takes V(block + 2).
            mbarrier.expect(v_bar.index(buf), tile_bytes, pred=fetch)
            tma.async_copy_global_to_shared(v_desc, [batch, (block + 2) * BLOCK_N, col0], v_bar.index(buf),
                                            v_smem.index(buf), pred=fetch)
        return p, alpha, m_i, l_i, acc

    @gluon.jit(do_not_specialize=["window"])
    def _gluon_fwd(q_desc, k_desc, v_desc, doc_ptr, order_ptr, ranges_ptr, o_ptr, lse_ptr,
                   T, window, scale_log2, stride_ob, stride_ot, stride_oh, stride_docb,
                   HAS_DOCS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   WINDOW_BLOCK: gl.constexpr, num_warps: gl.constexpr):
        """One program per (head, query block taken from `order`, batch), as the tile-language forward."""
        # wgmma layouts: warps stacked along the query rows (16 rows per warp, 64 per warpgroup).
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)

        head = gl.program_id(0)
        batch = gl.program_id(2)
        slot = batch.to(gl.int64) * gl.num_programs(1) + gl.program_id(1)
        q_block = gl.load(order_ptr + slot)
        ranges = ranges_ptr + (batch.to(gl.int64) * gl.num_programs(1) + q_block) * 4
        first = gl.load(ranges)
        full_first = gl.load(ranges + 1)
        full_end = gl.load(ranges + 2)
        end = gl.load(ranges + 3)
        m0 = q_block * BLOCK_M
        col0 = head * HEAD_DIM
        doc_row = doc_ptr + batch.to(gl.int64) * stride_docb
        q_pos = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
        if HAS_DOCS:
            q_docs = gl.load(doc_row + gl.minimum(q_pos, T - 1))
        else:
            q_docs = q_pos

        # Shared memory: Q, and K / V double-buffered; one mbarrier per buffer.
        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
        tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2

        # Prologue: Q, K and V of the first two blocks; S(first) and its softmax.
        mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(q_desc, [batch, m0, col0], q_bar, q_smem)
        for i in gl.static_range(2):
            fetch = first + i < end
            mbarrier.expect(k_bar.index(i), tile_bytes, pred=fetch)
            tma.async_copy_global_to_shared(k_desc, [batch, (first + i) * BLOCK_N, col0], k_bar.index(i),
                                            k_smem.index(i), pred=fetch)
            mbarrier.expect(v_bar.index(i), tile_bytes, pred=fetch)
            tma.async_copy_global_to_shared(v_desc, [batch, (first + i) * BLOCK_N, col0], v_bar.index(i),
                                            v_smem.index(i), pred=fetch)
        q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_tile, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_layout)
        # The first block is masked even when full (rare; the mask then changes nothing).
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_pos, q_docs, doc_row, first * BLOCK_N, T, window,
                                           scale_log2, True, HAS_DOCS, WINDOW_BLOCK, BLOCK_N, col_layout)
        p = gl.convert_layout(p.to(q_desc.dtype), p_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)

        # The steps, in three loops by whether the block whose softmax they run is partial
        # (masked) or full: a run-time branch on that inside the loop made ptxas hoist the
        # wait for PV above the exponentials (to the branches' join), ending the overlap.
        state = (p, alpha, m_i, l_i, acc)
        masked_end = gl.maximum(full_first - 1, first)
        full_stop = gl.maximum(full_end - 1, first)
        state = _steps(first, masked_end, first, end, state, q_tile, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc,
                       batch, col0, s_zero, q_pos, q_docs, doc_row, T, window, scale_log2, True, HAS_DOCS,
                       WINDOW_BLOCK, BLOCK_N, HEAD_DIM, col_layout, orow_layout, p_layout)
        state = _steps(masked_end, full_stop, first, end, state, q_tile, k_smem, v_smem, k_bar, v_bar, k_desc,
                       v_desc, batch, col0, s_zero, q_pos, q_docs, doc_row, T, window, scale_log2, False, HAS_DOCS,
                       WINDOW_BLOCK, BLOCK_N, HEAD_DIM, col_layout, orow_layout, p_layout)
        state = _steps(full_stop, end - 1, first, end, state, q_tile, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc,
                       batch, col0, s_zero, q_pos, q_docs, doc_row, T, window, scale_log2, True, HAS_DOCS,
                       WINDOW_BLOCK, BLOCK_N, HEAD_DIM, col_layout, orow_layout, p_layout)
        p, alpha, m_i, l_i, acc = state

        # The last block's PV.
        step = end - 1 - first
        acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
        mbarrier.wait(v_bar.index(step % 2), (step // 2) & 1)
        acc = warpgroup_mma(p, v_smem.index(step % 2).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(2):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))

        # Epilogue: O = acc / l, lse = m + log2(l) (base 2, as the backward expects).
        l_o = gl.convert_layout(l_i, orow_layout)
        out = acc / l_o[:, None]
        rows = m0 + gl.arange(0, BLOCK_M, layout=orow_layout)
        dims = gl.arange(0, HEAD_DIM, layout=ocol_layout)
        offsets = (batch.to(gl.int64) * stride_ob + rows[:, None].to(gl.int64) * stride_ot + head * stride_oh
                   + dims[None, :])
        gl.store(o_ptr + offsets, out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < T)
        lse = m_i + gl.log2(l_i)
        lse_rows = (batch.to(gl.int64) * gl.num_programs(0) + head) * T + q_pos
        gl.store(lse_ptr + lse_rows, lse, mask=q_pos < T)


# ---- launcher ----------------------------------------------------------------------------

def unusable_reason(q: torch.Tensor) -> str | None:
    """Why the Gluon forward cannot run on q's device here, or None when it can."""
    if not AVAILABLE:
        return f"triton {triton.__version__} has no Gluon Hopper API (triton.experimental.gluon, 3.6+)"
    if q.device.type != "cuda":
        return "it runs on CUDA tensors only (Gluon has no interpreter)"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "it is written for Hopper (sm_90) wgmma"
    return None


def _descriptor(t: torch.Tensor, rows: int):
    """Gluon TMA descriptor of a [B, T, H, D] tensor in [1, rows, D] tiles of its [B, T, H * D]
    view; layouts TMA cannot read in place are copied once (as swa._descriptor)."""
    plain = swa._descriptor(t, rows)  # the checks and the copy live there, written once
    element = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(plain.block_shape, element)
    return GluonTensorDescriptor(plain.base, plain.shape, plain.strides, plain.block_shape, layout)


def ranges_and_order(docs, doc_stride, has_docs, batch, length, kernel_window, block_size, device,
                     block_m=CONFIG["BLOCK_M"], block_n=CONFIG["BLOCK_N"]):
    """([B, blocks, 4] int32 key-block ranges per query block, [B, blocks] int32 launch order).

    One small Triton kernel (it runs in the interpreter too): the ranges the Gluon forward
    walks, whose lengths are each block's work, so the longest-first order needs no
    _block_work launch of its own.
    """
    blocks = triton.cdiv(length, block_m)
    if blocks > swa.MAX_GRID_Y:
        raise ValueError(f"T = {length} is too long: {blocks} blocks of a launch exceed the grid's {swa.MAX_GRID_Y}")
    ranges = swa._new_output((batch, blocks, 4), torch.int32, device)
    _fwd_ranges[(blocks, batch)](docs, ranges, length, kernel_window, doc_stride, HAS_DOCS=has_docs,
                                 BLOCK_M=block_m, BLOCK_N=block_n, SCAN=swa.SCAN_CHUNK, WINDOW_BLOCK=block_size,
                                 num_warps=4)
    if not swa.LONGEST_FIRST:
        return ranges, torch.arange(blocks, dtype=torch.int32, device=device).repeat(batch, 1)
    work = ranges[:, :, 3] - ranges[:, :, 0]
    return ranges, torch.argsort(work, dim=1, descending=True, stable=True).to(torch.int32)


def forward(q, k, v, doc_ids, window, scale, block_size=1):
    """(out [B, T, H, D] contiguous, lse [B, H, T] fp32 base 2): swa._forward's results, from the Gluon kernel."""
    reason = unusable_reason(q)
    if reason is not None:
        raise RuntimeError(f"the Gluon attention forward cannot run here: {reason}")
    batch, length, heads, head_dim = q.shape
    block_m, block_n = CONFIG["BLOCK_M"], CONFIG["BLOCK_N"]
    out = swa._new_output((batch, length, heads, head_dim), q.dtype, q.device)
    lse = swa._new_output((batch, heads, length), torch.float32, q.device)
    docs, doc_stride, has_docs = swa._doc_args(doc_ids, q.device)
    kernel_window = swa._kernel_window(window, length, block_size)
    ranges, order = ranges_and_order(docs, doc_stride, has_docs, batch, length, kernel_window, block_size, q.device)
    _gluon_fwd[(heads, order.shape[1], batch)](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), docs, order, ranges, out, lse,
        length, kernel_window, scale * swa.LOG2_E, *out.stride()[:3], doc_stride,
        HAS_DOCS=has_docs, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, WINDOW_BLOCK=block_size,
        num_warps=CONFIG["num_warps"])
    return out, lse
