"""Batched Newton-Schulz orthogonalization, the inner step of the Muon optimizer.

Public op (contract below and in DESIGN.md §2.3; the spec is
`kernels.reference.newton_schulz`): `newton_schulz`.  It runs one of:

  triton     the kernels in this file (CUDA tensors under "auto"; CPU tensors under
             backend "triton" with TRITON_INTERPRET=1, in Triton's interpreter).
  reference  plain PyTorch (CPU tensors under "auto", any tensor under "reference").

How the Triton path works.  Per matrix the iteration runs on the wide orientation
X [M, N] (M <= N); a tall input is never transposed in memory: the kernels read and
write it through swapped strides.  Leading dims are flattened into one batch, run in
passes of `chunk_of` matrices (one pass unless L2-sized passes still fill the GPU: see
stack_chunk); in a pass every stage is ONE launch whose grid covers matrices x tiles, and
a pass runs all steps, so its iterates, A and B stay in L2 from stage to stage:

  1. _sumsq_kernel      per (matrix, chunk of rows) the sum of squares of X0 = dtype(G),
                        in fp32, and X0 itself (unless G is already in `dtype`).  The
                        Frobenius normalization is then folded into step 1: with
                        r = 1 / (||X0|| + eps), A = r^2 (X0 X0^T) and X1 = r (a X0 + B X0),
                        so the normalized X0 is never written.
  per step (a, b, c):
  2. _syrk_kernel       A = X X^T.  Only the tiles on and below the diagonal are computed
                        (T(T+1)/2 of T^2); each off-diagonal tile is stored twice, as
                        itself and mirrored, so A is exactly symmetric.
  3. _syrk_kernel       B = b A + c A A.  A is symmetric, so A A = A A^T: the same
                        lower-triangle kernel, both operands read along contiguous rows,
                        with b A fused into the epilogue.
  4. _update_kernel     X' = a X + B X, a X fused into the epilogue; the last step writes
                        the output directly in the caller's orientation.

Matmuls take `dtype` (bf16 or fp16) operands and accumulate in fp32; each stage rounds
its result to `dtype` once (the reference also rounds the partial products b A, c A A,
a X, B X; the difference is well inside the iteration's own rounding noise).  The norm
reads G itself (fp32, fp16 or bf16, any strides), converting to `dtype` on load; float64
inputs are converted to `dtype` by torch first.  Every matmul loads `dtype` operands.

The interpreter's bf16 arithmetic is broken (DESIGN.md §4), so in the interpreter a bf16
iteration carries its values in fp32 that are rounded to bf16 (round to nearest even)
wherever the GPU path rounds: the same numbers, and the Muon step can be tested on the
CPU with Muon's default bf16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import _backend, _checks, reference

OP = "newton_schulz"
_backend.register_op(OP, ("triton",))

INPUT_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)

# Row chunks per matrix for the sum of squares (a power of two: step 1 reads them as one
# vector).  64 chunks x 33..44 matrices keeps every SM busy on the GPT's stacks.
_MAX_NORM_CHUNKS = 64
_NORM_BLOCK_ROWS = 16
# Upper limits for the tile sizes (rows/cols, reduction); tests lower them to make small
# matrices span many tiles.
_MAX_TILE = 128
_MAX_TILE_K = 64


# ---- Triton kernels ------------------------------------------------------------------

@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32.  Interpreter only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _as_iteration_dtype(x, BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x rounded to the iteration's dtype (in an fp32 carrier when emulating bf16)."""
    if EMULATE_BF16:
        return _round_to_bf16(x.to(tl.float32))
    elif BF16:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def _matmul(a, b, acc, EMULATE_BF16: tl.constexpr):
    if EMULATE_BF16:  # fp32 carriers of bf16 values: exact products, fp32 sums, like the GPU
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _inverse_norm(partials_ptr, matrix, n_chunks, eps, CHUNKS: tl.constexpr):
    """1 / (||X0||_F + eps) of one matrix from its row-chunk sums of squares."""
    offsets = tl.arange(0, CHUNKS)
    parts = tl.load(partials_ptr + matrix * n_chunks + offsets, mask=offsets < n_chunks, other=0.0)
    return 1.0 / (tl.sqrt(tl.sum(parts, axis=0)) + eps)


@triton.jit
def _sumsq_kernel(g_ptr, partials_ptr, copy_ptr, rows, cols, stride_gb, stride_gm, stride_gn,
                  rows_per_chunk, n_chunks,
                  WRITE_COPY: tl.constexpr, BF16: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partials[matrix, chunk] = sum of dtype(G)^2 over the chunk's rows (physical layout);
    with WRITE_COPY also copy = dtype(G), contiguous [batch, rows, cols] in G's orientation."""
    pid = tl.program_id(0)
    matrix = pid // n_chunks
    chunk = pid % n_chunks
    base = g_ptr + matrix.to(tl.int64) * stride_gb
    copy_base = copy_ptr + matrix.to(tl.int64) * rows * cols
    first_row = chunk * rows_per_chunk
    last_row = tl.minimum(first_row + rows_per_chunk, rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for row_start in range(first_row, last_row, BLOCK_R):
        r = row_start + tl.arange(0, BLOCK_R)
        for col_start in range(0, cols, BLOCK_C):
            c = col_start + tl.arange(0, BLOCK_C)
            mask = (r[:, None] < last_row) & (c[None, :] < cols)
            x = tl.load(base + r[:, None] * stride_gm + c[None, :] * stride_gn, mask=mask, other=0.0)
            x = _as_iteration_dtype(x, BF16, EMULATE_BF16)
            if WRITE_COPY:
                tl.store(copy_base + r[:, None] * cols + c[None, :], x.to(copy_ptr.dtype.element_ty), mask=mask)
            x = x.to(tl.float32)
            acc += x * x
    tl.store(partials_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _syrk_kernel(y_ptr, c_ptr, d_ptr, partials_ptr,
                 size, depth, tiles_per_matrix,
                 stride_yb, stride_ym, stride_yk,
                 alpha, beta, eps, n_chunks,
                 HAS_D: tl.constexpr, SCALE_BY_NORM: tl.constexpr, CHUNKS: tl.constexpr,
                 BF16: tl.constexpr, EMULATE_BF16: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """C = alpha * Y Y^T (* r^2 if SCALE_BY_NORM) (+ beta * D): Y [size, depth], C, D [size, size].

    One program per tile on or below the diagonal of C; D must be symmetric (it is A).
    C and D are contiguous [batch, size, size] in the iteration dtype.
    """
    pid = tl.program_id(0)
    matrix = pid // tiles_per_matrix
    t = pid % tiles_per_matrix
    # Lower-triangle tile t = i (i + 1) / 2 + j, 0 <= j <= i: invert with a square root,
    # then fix the float estimate by one step either way.
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2

    rows_i = i * BLOCK + tl.arange(0, BLOCK)
    rows_j = j * BLOCK + tl.arange(0, BLOCK)
    y_base = y_ptr + matrix.to(tl.int64) * stride_yb
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k_start in tl.range(0, depth, BLOCK_K, num_stages=STAGES):
        k = k_start + tl.arange(0, BLOCK_K)
        in_k = k[None, :] < depth
        a = tl.load(y_base + rows_i[:, None] * stride_ym + k[None, :] * stride_yk,
                    mask=(rows_i[:, None] < size) & in_k, other=0.0)
        b = tl.load(y_base + rows_j[:, None] * stride_ym + k[None, :] * stride_yk,
                    mask=(rows_j[:, None] < size) & in_k, other=0.0)
        a = _as_iteration_dtype(a, BF16, EMULATE_BF16)
        b = _as_iteration_dtype(b, BF16, EMULATE_BF16)
        acc = _matmul(a, tl.trans(b), acc, EMULATE_BF16)

    acc = acc * alpha
    if SCALE_BY_NORM:
        r = _inverse_norm(partials_ptr, matrix, n_chunks, eps, CHUNKS)
        acc = acc * (r * r)
    square = matrix.to(tl.int64) * size * size
    mask = (rows_i[:, None] < size) & (rows_j[None, :] < size)
    offsets = rows_i[:, None] * size + rows_j[None, :]
    if HAS_D:
        d = tl.load(d_ptr + square + offsets, mask=mask, other=0.0).to(tl.float32)
        acc += beta * d
    out = _as_iteration_dtype(acc, BF16, EMULATE_BF16).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + square + offsets, out, mask=mask)
    if i != j:  # the mirrored tile C[j, i] = C[i, j]^T (D is symmetric too)
        tl.store(c_ptr + square + rows_j[None, :] * size + rows_i[:, None], out, mask=mask)


@triton.jit
def _update_kernel(b_ptr, x_ptr, out_ptr, partials_ptr,
                   size, width, tiles_n, tiles_per_matrix,
                   stride_xb, stride_xm, stride_xn, stride_ob, stride_om, stride_on,
                   a_coef, eps, n_chunks,
                   SCALE_BY_NORM: tl.constexpr, CHUNKS: tl.constexpr,
                   BF16: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   STAGES: tl.constexpr):
    """OUT = a X + B X (all times r if SCALE_BY_NORM): B [size, size] contiguous, X [size, width].

    X and OUT are addressed through strides, so a tall matrix's transpose is free.
    """
    pid = tl.program_id(0)
    matrix = pid // tiles_per_matrix
    t = pid % tiles_per_matrix
    tile_m = t // tiles_n
    tile_n = t % tiles_n
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_base = b_ptr + matrix.to(tl.int64) * size * size
    x_base = x_ptr + matrix.to(tl.int64) * stride_xb
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in tl.range(0, size, BLOCK_K, num_stages=STAGES):
        k = k_start + tl.arange(0, BLOCK_K)
        bm = tl.load(b_base + rows[:, None] * size + k[None, :],
                     mask=(rows[:, None] < size) & (k[None, :] < size), other=0.0)
        x = tl.load(x_base + k[:, None] * stride_xm + cols[None, :] * stride_xn,
                    mask=(k[:, None] < size) & (cols[None, :] < width), other=0.0)
        bm = _as_iteration_dtype(bm, BF16, EMULATE_BF16)
        x = _as_iteration_dtype(x, BF16, EMULATE_BF16)
        acc = _matmul(bm, x, acc, EMULATE_BF16)

    mask = (rows[:, None] < size) & (cols[None, :] < width)
    x_tile = tl.load(x_base + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    x_tile = _as_iteration_dtype(x_tile, BF16, EMULATE_BF16).to(tl.float32)
    acc += a_coef * x_tile
    if SCALE_BY_NORM:
        acc = acc * _inverse_norm(partials_ptr, matrix, n_chunks, eps, CHUNKS)
    out = _as_iteration_dtype(acc, BF16, EMULATE_BF16).to(out_ptr.dtype.element_ty)
    o_base = out_ptr + matrix.to(tl.int64) * stride_ob
    tl.store(o_base + rows[:, None] * stride_om + cols[None, :] * stride_on, out, mask=mask)


# ---- launch configuration ------------------------------------------------------------

def _tile(extent: int, limit: int) -> int:
    """A power-of-two tile edge: >= 16 (tl.dot's minimum), <= limit, no larger than needed."""
    return max(16, min(limit, triton.next_power_of_2(extent)))


def _launch(block_m: int, block_n: int) -> dict:
    """Two warpgroups for 128x128 tiles (each a 64x128 wgmma), one below.  With two, at most
    128 registers per thread: two 256-thread CTAs then share an SM's 64K registers (triton
    3.6 gives the B = bA + cA^2 kernel 132 uncapped, 126 capped, without spills)."""
    return {"num_warps": 8, "maxnreg": 128} if block_m * block_n >= 128 * 128 else {"num_warps": 4}


# Pipeline depth of every K loop.  At 128x128x64 bf16 tiles a stage holds 32 KB of operands:
# 3 stages (97 KB per CTA) let two CTAs share an SM's 228 KB, 4 (129 KB) allowed one
# (bench/NOTES.md: the second CTA's epilogue and loads overlap the first's wgmma).
_STAGES = 3


def syrk_config(size: int, depth: int) -> dict:
    """Tiles for C [size, size] = Y Y^T over `depth`: unmeasured, see bench/NOTES.md."""
    block = _tile(size, _MAX_TILE)
    block_k = _tile(depth, _MAX_TILE_K)
    return {"BLOCK": block, "BLOCK_K": block_k, "STAGES": _STAGES, **_launch(block, block)}


def update_config(size: int, width: int) -> dict:
    """Tiles for OUT [size, width] = B [size, size] X [size, width]: unmeasured, see bench/NOTES.md."""
    block_m = _tile(size, _MAX_TILE)
    block_n = _tile(width, _MAX_TILE)
    block_k = _tile(size, _MAX_TILE_K)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
            "STAGES": _STAGES, **_launch(block_m, block_n)}


def norm_chunks(rows: int) -> tuple[int, int]:
    """(chunks, rows per chunk) of one matrix's sum of squares: at most _MAX_NORM_CHUNKS."""
    chunks = min(_MAX_NORM_CHUNKS, triton.cdiv(rows, _NORM_BLOCK_ROWS))
    rows_per_chunk = triton.cdiv(rows, chunks)
    return triton.cdiv(rows, rows_per_chunk), rows_per_chunk


# L2 chunking (bench/NOTES.md, issue 18): the stack runs in passes of `chunk` matrices, each
# pass all steps, so a pass's X pair, A and B stay in L2 from stage to stage and step to
# step.  The share of L2 they may fill: the rest holds G's and the output's lines streaming
# through, and is headroom for an L2 that is no perfect LRU over one pool (H100: two
# partitions).
_L2_SHARE = 0.75
# CTAs of the 128x128-tile kernels resident per SM (syrk_config/update_config's 3 stages
# and 128 registers; tests/test_static.py holds it).
_CTAS_PER_SM = 2
# Without a CUDA device (the interpreter) the H100's L2 and SM count decide, as on the GPU.
_H100_L2_BYTES = 50 * 2 ** 20
_H100_SMS = 132
# Matrices per pass when set (the bench's --chunk, tests); None: stack_chunk's choice.
_CHUNK = None


def stack_chunk(batch: int, size: int, width: int, *, l2_bytes: int, sms: int, itemsize: int = 2) -> int:
    """Matrices per pass over a [batch, size, width] stack (size <= width): `batch` (one pass)
    unless L2-sized passes still fill the GPU.

    A matrix's working set is its X pair, A and B: itemsize * (2 size width + 2 size^2) bytes,
    and a pass holds as many as fit in _L2_SHARE of the L2.  A pass must also fill one full
    wave of Gram CTAs (_CTAS_PER_SM per SM; the Gram launch has the fewest tiles): a pass
    that leaves CTA slots empty in its launches loses more than the DRAM traffic it saves
    (bench/NOTES.md works it out for the 768^2 stacks, where an H100 fits 8 and a wave needs
    13), and the stack runs in one pass.  Passes are balanced: 33 matrices that fit 21 at a
    time run as 2 passes of 16-17, not 21 and 12.
    """
    per_matrix = itemsize * (2 * size * width + 2 * size * size)
    fit = int(_L2_SHARE * l2_bytes) // per_matrix
    side = triton.cdiv(size, syrk_config(size, width)["BLOCK"])
    needed = triton.cdiv(_CTAS_PER_SM * sms, side * (side + 1) // 2)
    if fit >= batch or fit < needed:
        return batch
    passes = triton.cdiv(batch, fit)
    return triton.cdiv(batch, passes)


def _device_limits(device: torch.device) -> dict:
    """l2_bytes and sms of `device` (the H100's off CUDA)."""
    if device.type != "cuda":
        return {"l2_bytes": _H100_L2_BYTES, "sms": _H100_SMS}
    props = torch.cuda.get_device_properties(device)
    return {"l2_bytes": props.L2_cache_size, "sms": props.multi_processor_count}


def chunk_of(shape, device: torch.device) -> int:
    """Matrices per pass for a stack G of `shape` [..., m, n] on `device`."""
    batch = math.prod(shape[:-2])
    size, width = sorted(shape[-2:])
    if _CHUNK is not None:
        return min(_CHUNK, batch)
    return stack_chunk(batch, size, width, **_device_limits(device))


def launches(steps: int, passes: int = 1) -> int:
    """Kernel launches per call: per pass over the stack, the norm, then 3 per step."""
    return passes * (1 + 3 * steps)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer of the Triton path is allocated here (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _emulate_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and device.type == "cpu"


def _newton_schulz_triton(G: torch.Tensor, coefficients: list[float], eps: float,
                          dtype: torch.dtype) -> torch.Tensor:
    """The Triton iteration on G [..., m, n]; coefficients flattened (a0, b0, c0, a1, ...)."""
    shape = G.shape
    m, n = shape[-2], shape[-1]
    if G.dtype == torch.float64:  # the kernels load fp32/fp16/bf16; fp64 is rare enough to copy
        G = G.to(dtype)
    G3 = G.reshape(-1, m, n)  # a view whenever the leading dims allow one
    batch = G3.shape[0]
    tall = m > n
    size, width = (n, m) if tall else (m, n)
    device = G.device
    bf16 = dtype == torch.bfloat16
    flags = {"BF16": bf16, "EMULATE_BF16": _emulate_bf16(dtype, device)}

    def wide(strides):  # X [size, width] of a [batch, m, n] buffer: a tall one through swapped strides
        return (strides[0], strides[2], strides[1]) if tall else strides

    out = _empty((batch, m, n), dtype, device)
    steps = len(coefficients) // 3
    chunk = chunk_of(G3.shape, device)
    # Buffers for one pass of `chunk` matrices, reused by every pass (so a pass finds them in L2).
    gram = _empty((chunk, size, size), dtype, device)
    poly = _empty((chunk, size, size), dtype, device)
    # The iterates X0 .. X_steps: X0 = dtype(G) is written by the norm kernel unless G is
    # already in `dtype` (every matmul then loads half-precision operands; an fp32 G in the
    # K loops would double their shared memory and need 206 registers); X_k (0 < k < steps)
    # lives in pair[k % 2], X0 in pair[0]; the last step writes `out`.
    write_copy = G3.dtype != dtype
    used = {1} if steps >= 2 else set()
    if write_copy or steps >= 3:
        used.add(0)
    pair = {index: _empty((chunk, size, width), dtype, device) for index in sorted(used)}

    n_chunks, rows_per_chunk = norm_chunks(m)
    chunks_p2 = max(16, triton.next_power_of_2(n_chunks))  # one vector load; small vectors padded
    partials = _empty((chunk * n_chunks,), torch.float32, device)

    gram_cfg = syrk_config(size, width)
    poly_cfg = syrk_config(size, size)
    upd_cfg = update_config(size, width)
    side = triton.cdiv(size, gram_cfg["BLOCK"])
    gram_tiles = side * (side + 1) // 2
    side_p = triton.cdiv(size, poly_cfg["BLOCK"])
    poly_tiles = side_p * (side_p + 1) // 2
    tiles_n = triton.cdiv(width, upd_cfg["BLOCK_N"])
    upd_tiles = triton.cdiv(size, upd_cfg["BLOCK_M"]) * tiles_n

    passes = triton.cdiv(batch, chunk)
    for index in range(passes):  # balanced: the passes' sizes differ by at most 1
        first_matrix = index * batch // passes
        count = (index + 1) * batch // passes - first_matrix
        G_pass = G3[first_matrix:first_matrix + count]
        x0 = pair[0][:count].view(count, m, n) if write_copy else G_pass
        _sumsq_kernel[(count * n_chunks,)](
            G_pass, partials, x0, m, n, *G_pass.stride(), rows_per_chunk, n_chunks, WRITE_COPY=write_copy,
            BLOCK_R=_NORM_BLOCK_ROWS, BLOCK_C=_tile(n, 256), num_warps=4, **flags)
        source, source_strides = x0, wide(x0.stride())
        for step in range(steps):
            a, b, c = coefficients[3 * step: 3 * step + 3]
            first = step == 0
            norm_args = dict(SCALE_BY_NORM=first, CHUNKS=chunks_p2)
            _syrk_kernel[(count * gram_tiles,)](
                source, gram, gram, partials, size, width, gram_tiles, *source_strides,
                1.0, 0.0, eps, n_chunks, HAS_D=False, **norm_args, **flags, **gram_cfg)
            _syrk_kernel[(count * poly_tiles,)](
                gram, poly, gram, partials, size, size, poly_tiles, size * size, size, 1,
                c, b, eps, n_chunks, HAS_D=True, SCALE_BY_NORM=False, CHUNKS=chunks_p2, **flags, **poly_cfg)
            if step == steps - 1:
                target = out[first_matrix:first_matrix + count]
                target_strides = wide(target.stride())
            else:
                target = pair[(step + 1) % 2][:count]
                target_strides = target.stride()
            _update_kernel[(count * upd_tiles,)](
                poly, source, target, partials, size, width, tiles_n, upd_tiles,
                *source_strides, *target_strides, a, eps, n_chunks, **norm_args, **flags, **upd_cfg)
            source, source_strides = target, target_strides
    return out.reshape(shape)


# ---- custom op -----------------------------------------------------------------------

@torch.library.custom_op("kernels::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], eps: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """The Triton iteration; `coefficients` is the flat list (a0, b0, c0, a1, b1, c1, ...)."""
    return _newton_schulz_triton(G, coefficients, eps, dtype)


@_newton_schulz_op.register_fake
def _newton_schulz_fake(G, coefficients, eps, dtype):
    return G.new_empty(G.shape, dtype=dtype)


# ---- public op -----------------------------------------------------------------------

def _validate_triple(name, triple):
    if not isinstance(triple, (tuple, list)) or len(triple) != 3:
        raise TypeError(f"{name} must be an (a, b, c) triple of numbers, got {triple!r}")
    for index, value in enumerate(triple):
        _checks.number(f"{name}[{index}]", value)


def _validate_coefficients(coefficients, steps):
    """One (a, b, c) triple, a sequence of exactly `steps` triples, or a schedule's name."""
    if isinstance(coefficients, str):
        reference.per_step_coefficients(coefficients, steps)  # raises on an unknown name or step count
        return
    if not isinstance(coefficients, (tuple, list)):
        raise TypeError("coefficients must be an (a, b, c) triple or a sequence of `steps` triples, "
                        f"got {type(coefficients).__name__}")
    if not coefficients or not all(isinstance(c, (tuple, list)) for c in coefficients):
        if len(coefficients) != 3:
            raise ValueError(f"coefficients must be an (a, b, c) triple or a sequence of `steps` triples, "
                             f"got {len(coefficients)} entries")
        _validate_triple("coefficients", coefficients)
        return
    if len(coefficients) != steps:
        raise ValueError(f"coefficients holds {len(coefficients)} per-step triples but steps={steps}; "
                         "give one triple per step, or a single triple for all steps")
    for index, triple in enumerate(coefficients):
        _validate_triple(f"coefficients[{index}]", triple)


_NEWTON_SCHULZ = {
    "reference": reference.newton_schulz,
    "triton": lambda G, *, steps, coefficients, eps, dtype: _newton_schulz_op(
        G, [float(v) for triple in reference.per_step_coefficients(coefficients, steps) for v in triple],
        float(eps), dtype),
}


def newton_schulz(G: torch.Tensor, *, steps: int = 5,
                  coefficients=reference.NS5_TRIPLE, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalize every matrix of G with Muon's quintic Newton-Schulz iteration.

    Args:
        G: [..., m, n] float32, float16, bfloat16 or float64, any strides, not empty.
            Leading dims are a batch: all matrices go through one batched computation.
        steps: number of iterations, >= 1 (Muon in the GPT record: 5; CIFAR record: 3).
        coefficients: one (a, b, c) triple used at every step, a sequence of `steps`
            triples, one per step, or the name of a schedule in
            `kernels.reference.NEWTON_SCHULZ_SCHEDULES`, whose length `steps` must equal
            (ValueError otherwise; a schedule is never truncated or repeated, since its
            triples are optimized for its step count):
              "ns5"            the default triple at each of 5 steps (the 2025-01-26 record).
              "polar_express"  the 5 per-step optimal quintics of Amsel, Persson, Musco,
                               Gower, "The Polar Express: Optimal Matrix Sign Methods and
                               Their Application to the Muon Algorithm" (2025,
                               arXiv:2505.16932), as modded-nanogpt's train_gpt.py uses
                               them (`polar_express_coeffs`), with its normalization
                               X / (1.02 ||X||_F): the 1.02 safety factor is folded into
                               step 1's triple (a/1.02, b/1.02^3, c/1.02^5), equal in exact
                               arithmetic; eps stays this op's (the record adds 1e-6).
        eps: >= 0, added to the Frobenius norm before dividing.
        dtype: torch.bfloat16 or torch.float16, the dtype the iteration runs in.

    Returns:
        [..., m, n] in `dtype`.  Per matrix: X = dtype(G); transposed if m > n (so the
        Gram matrix is the smaller one); X = X / (||X||_F + eps); each step
        A = X X^T, B = bA + cA^2, X = aX + BX (matmuls accumulate in fp32, results
        rounded to `dtype`); transposed back.  With the default coefficients the singular
        values of the result land near [0.7, 1.2] rather than exactly at 1, except for
        directions whose singular value in G is tiny relative to ||G||_F.

    Backends: "triton" (CUDA tensors under "auto"; CPU tensors under "triton" with
    TRITON_INTERPRET=1) launches 1 + 3 * steps kernels per pass over the stack whatever
    its size (one pass unless L2-sized passes fill the GPU: never at the GPT's shapes on
    an H100): the symmetric Gram matrix and A A computed on one triangle of tiles and
    mirrored, the norm folded into step 1, tall matrices read and written through swapped strides.  It
    rounds once per stage (the reference rounds each partial product too) and takes the
    norm in fp32.  "reference" (CPU tensors under "auto") is kernels.reference.  Only the
    reference is differentiable; Muon needs no gradient.  No host synchronization; traces
    under torch.compile(fullgraph=True) (a custom op with a fake implementation).
    """
    _checks.tensor("G", G, dtypes=INPUT_DTYPES, min_ndim=2)
    _checks.non_empty("G", G)
    _checks.number("steps", steps, positive=True, integer=True)
    _validate_coefficients(coefficients, steps)
    _checks.number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _checks.HALF_DTYPES:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    implementation = _NEWTON_SCHULZ[_backend.choose(OP, G.device)]
    return implementation(G, steps=steps, coefficients=coefficients, eps=eps, dtype=dtype)
