"""The GPT block's MLP: relu(x W_fc^T)^2 W_proj^T, and its fused first half.

Public ops (contract below and in DESIGN.md §2.4; the spec is `kernels.reference`):

  relu2_mlp      relu(x @ w_fc^T)^2 @ w_proj^T
  relu2_mlp_fp8  the same with x @ w_fc^T in float8 e4m3, per-tensor scales (forward only)
  linear_relu2   relu(x @ w^T)^2

Backends:
  triton     the kernels in this file (CUDA tensors under "auto"; CPU tensors in Triton's
             interpreter with TRITON_INTERPRET=1 and backend "triton").
  reference  plain PyTorch, on every device (CPU tensors under "auto").
There is no CUDA-extension kernel for this op: backend "cuda" runs what "auto" picks.

How the fast path works.  Every matrix product is written C = A @ B^T with A [M, K] and
B [N, K] both contiguous along K ("NT"), the layout wgmma and TMA like best; a weight
that is needed the other way round is transposed once per call (D x H elements: a few
microseconds, against GEMMs over M x D x H).  One persistent Triton kernel computes every
such product: a grid of (number of SMs) programs walks the output tiles in grouped order
(GROUP_M tile rows share each column block of B while it is in L2) and applies one of
three epilogues to the fp32 accumulator before the single store:

  EPI_NONE       C = A B^T
  EPI_RELU2      C = relu(round(A B^T))^2           forward:  h = relu(x W1^T)^2
  EPI_RELU2_BWD  C = 2 (A B^T) * sqrt(aux)          backward: dpre = 2 (g W2) * relu(pre)

The forward stores only h (which the second product needs anyway): relu(pre) is sqrt(h),
so the backward needs neither the pre-activation nor dh = g W2 in memory.  The dpre
product prefetches each tile's h into L2 before its K loop, so the epilogue's load of it
does not wait on DRAM.  relu2_mlp_fp8 runs the EPI_RELU2 product on e4m3 operands
(quantized by torch on the device) with the dequantization scale read from memory, and
shares the bf16 backward.  The kernel
comes in two variants, picked per launch by feature detection: TMA tensor descriptors
(Triton's TensorDescriptor, Hopper or newer, 16-byte aligned operands) and plain
pointers (anything else, and the interpreter).

The products without an epilogue -- y = h W2^T and dx = dpre W1 (NT once transposed),
dW2 = g^T h and dW1 = dpre^T x (K = M: "TN", which the NT kernel could only do after
transposing M x H activations) -- run on cuBLAS through torch.matmul by default;
`plain_gemm("triton")` routes y and dx through the Triton kernel instead, so the bench
can measure both (bench/bench_relu2_mlp.py, bench/NOTES.md).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels import _backend, _checks, reference

try:  # host-side TMA descriptors (triton >= 3.3); without them only the pointer path exists
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

OP_MLP = "relu2_mlp"
OP_LINEAR = "linear_relu2"
_backend.register_op(OP_MLP, ("triton",))
_backend.register_op(OP_LINEAR, ("triton",))

EPI_NONE, EPI_RELU2, EPI_RELU2_BWD = 0, 1, 2
FP8 = torch.float8_e4m3fn
VARIANTS = ("tma", "pointer")
PLAIN_GEMMS = ("cublas", "triton")


# ---- Triton kernels ------------------------------------------------------------------

@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M tile rows sweep a column block before moving to the next."""
    tiles_per_group = GROUP_M * num_pid_n
    group = tile // tiles_per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    within = tile % tiles_per_group
    return first_m + within % rows_in_group, within // rows_in_group


@triton.jit
def _epilogue(acc, aux, out_dtype: tl.constexpr, EPILOGUE: tl.constexpr):
    """The fp32 accumulator of one (sub)tile -> the stored values, in out_dtype."""
    if EPILOGUE == 1:
        # As eager does: the product rounded to the dtype, relu, then the square rounded.
        # where(r < 0, 0, r) rather than maximum keeps a NaN a NaN, as torch.relu does.
        r = acc.to(out_dtype).to(tl.float32)
        r = tl.where(r < 0.0, 0.0, r)
        out = r * r
    elif EPILOGUE == 2:
        # relu(pre) = sqrt(h): zero exactly where relu cut, so no mask is needed.
        out = 2.0 * acc * tl.sqrt(aux.to(tl.float32))
    else:
        out = acc
    return out.to(out_dtype)


@triton.jit
def _dequant_scale(scale_ptr, HAS_SCALE: tl.constexpr):
    """The factor the fp32 accumulator is multiplied by: *scale_ptr (a device scalar, so a
    scale computed on the GPU needs no host sync) or 1."""
    if HAS_SCALE:
        return tl.load(scale_ptr)
    return 1.0


@triton.jit
def _prefetch_tile_to_l2(ptr, stride_m, off_m, off_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Start the DRAM -> L2 read of ptr[off_m:+BLOCK_M, off_n:+BLOCK_N] and return at once.

    One `prefetch.global.L2` per 128-byte line of the tile (128 x 256 bf16: 512 lines, 2
    per thread at 8 warps).  Nothing waits on it and nothing is written, so it cannot
    change a result; issued before the K loop, the epilogue's TMA load of the same tile
    then hits L2 instead of paying DRAM latency after the last wgmma.  (The bulk form,
    cp.async.bulk.prefetch, takes uniform operands: per-thread addresses compile to a
    32-step loop per warp, hence the per-line form.)  Lines past M or N are skipped, so
    no address outside the tensor is touched.
    """
    LINE: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)  # elements per line
    tl.static_assert(BLOCK_N >= LINE, "the prefetch needs tile rows of at least one 128-byte line")
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N // LINE) * LINE
    go = ((rows < M)[:, None] & (cols < N)[None, :]).to(tl.int32)
    addrs = ptr + rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $1, 0; @p prefetch.global.L2 [$2]; mov.u32 $0, 0; }",
        "=r,r,l", [go, addrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemm_nt_pointer_kernel(
    a_ptr, b_ptr, c_ptr, aux_ptr, scale_ptr, M, N, K, stride_am, stride_bn, stride_cm, stride_auxm,
    EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
):
    """C[M, N] = epilogue(s * A[M, K] @ B[N, K]^T, aux[M, N]); persistent over output tiles.

    s = *scale_ptr (fp32, read once) with HAS_SCALE (fp8 operands: the dequantization
    x_scale * w_scale), else 1.  C's dtype may differ from A's (fp8 in, bf16 out).
    """
    scale = _dequant_scale(scale_ptr, HAS_SCALE)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows and columns past the end read row 0 instead (always in bounds) and are never
        # stored, so the main loop's loads need no M/N masks.  int64: M * stride may pass 2**31.
        a_rows = tl.where(rows < M, rows, 0).to(tl.int64)
        b_rows = tl.where(cols < N, cols, 0).to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + b_rows[:, None] * stride_bn + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, k_tiles):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_in = offs_k < K - kt * BLOCK_K
                a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_in[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        inside = (rows < M)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)
        aux = None
        if EPILOGUE == 2:
            aux = tl.load(aux_ptr + rows64[:, None] * stride_auxm + cols[None, :], mask=inside, other=0.0)
        out = _epilogue(acc * scale, aux, c_ptr.dtype.element_ty, EPILOGUE)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], out, mask=inside)


@triton.jit
def _gemm_nt_tma_kernel(
    a_desc, b_desc, c_desc, aux_desc, aux_ptr, scale_ptr, stride_auxm, M, N, K,
    EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PREFETCH_AUX: tl.constexpr,
):
    """The pointer kernel's contract through TMA descriptors.

    TMA zero-fills loads past the tensor's edge and clips stores to it, so no masks at all.
    The epilogue runs on two [BLOCK_M, BLOCK_N/2] halves: half the registers live at once
    for the aux tile and the converted output, and half the shared-memory staging buffer
    for the TMA store.  c_desc and aux_desc have block [BLOCK_M, BLOCK_N / 2].
    PREFETCH_AUX (EPI_RELU2_BWD on a GPU): aux_ptr/stride_auxm address the aux tensor for
    the L2 prefetch of each tile's aux tile before its K loop (inline PTX, which the
    interpreter cannot run; a prefetch never changes a result).
    """
    HALF_N: tl.constexpr = BLOCK_N // 2
    scale = _dequant_scale(scale_ptr, HAS_SCALE)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if PREFETCH_AUX:  # the aux tile's DRAM read runs under this tile's K loop
            _prefetch_tile_to_l2(aux_ptr, stride_auxm, off_m, off_n, M, N, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])
            b = b_desc.load([off_n, kt * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        halves = tl.permute(tl.reshape(acc * scale, (BLOCK_M, 2, HALF_N)), (0, 2, 1))
        acc_lo, acc_hi = tl.split(halves)
        aux_lo = None
        aux_hi = None
        if EPILOGUE == 2:
            aux_lo = aux_desc.load([off_m, off_n])
            aux_hi = aux_desc.load([off_m, off_n + HALF_N])
        c_desc.store([off_m, off_n], _epilogue(acc_lo, aux_lo, c_desc.dtype, EPILOGUE))
        c_desc.store([off_m, off_n + HALF_N], _epilogue(acc_hi, aux_hi, c_desc.dtype, EPILOGUE))


# ---- launch --------------------------------------------------------------------------

# Interpreter tiles: small, so awkward test shapes span several tiles, partial tiles and
# K steps, and few programs, so each walks several tiles (the persistent loop is exercised).
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2,
                           FLATTEN=False, WARP_SPECIALIZE=False)
_INTERPRETER_PROGRAMS = 3
CONFIG_KEYS = tuple(_INTERPRETER_CONFIG)

_config_override: dict = {}


def kernel_config(dtype: torch.dtype, device: torch.device, epilogue: int = EPI_NONE) -> dict:
    """Tile shape and launch options (not measured yet: see bench/NOTES.md ## relu2_mlp).

    16-bit: 128 x 256 x 64 tiles, 8 warps (two consumer warpgroups, 128 fp32 accumulator
    registers per thread); one stage of A/B tiles is (128 + 256) x 64 x 2 B = 48 KiB and
    the epilogue's TMA staging buffer [128, 128] is 32 KiB.  The forward and plain
    products take 4 stages: 4 x 48 + 32 = 224 KiB (229,408 B as compiled, + 1 KiB of
    barriers), under the 227 KiB one CTA may have on sm_90; the dpre product stages its
    aux half tile too (another 32 KiB), so 4 stages (256 KiB) do not fit and it keeps 3
    (208 KiB).  The tile loop is flattened into the K loop so the next tile's loads
    overlap this tile's epilogue.  e4m3 operands (relu2_mlp_fp8): 128 x 256 x 128, the
    same 48 KiB per stage (1-byte elements, K twice as deep per stage; wgmma k32 steps)
    and the same stage counts.  fp32 (exact, non-tf32 dots, not a training dtype):
    128 x 128 x 32, 3 stages.  WARP_SPECIALIZE (TMA variant only; Triton ignores it on a
    flattened loop) is the alternative schedule `bench_relu2_mlp --sweep` compares.
    `tile_config` overrides (for every epilogue alike).
    """
    if device.type != "cuda":
        config = dict(_INTERPRETER_CONFIG)
    elif dtype == FP8:  # e4m3 operands: the same 48 KiB stages with 128-byte rows of K
        config = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8,
                      num_stages=3 if epilogue == EPI_RELU2_BWD else 4, FLATTEN=True, WARP_SPECIALIZE=False)
    elif dtype == torch.float32:
        config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3,
                      FLATTEN=True, WARP_SPECIALIZE=False)
    else:
        config = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8,
                      num_stages=3 if epilogue == EPI_RELU2_BWD else 4, FLATTEN=True, WARP_SPECIALIZE=False)
    config.update(_config_override)
    return config


@contextlib.contextmanager
def tile_config(**overrides):
    """Override kernel_config's keys (BLOCK_M, ..., num_stages, FLATTEN, WARP_SPECIALIZE)
    for the launches inside the block: the bench's config sweep, tests."""
    global _config_override
    unknown = set(overrides) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown tile_config keys {sorted(unknown)}; known: {CONFIG_KEYS}")
    previous, _config_override = _config_override, {**_config_override, **overrides}
    try:
        yield
    finally:
        _config_override = previous


_sm_counts: dict[int, int] = {}


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _tma_aligned(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, 16-byte aligned row strides and unit inner stride."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0
            and (t.stride(0) * size) % 16 == 0)


def tma_available(device: torch.device) -> bool:
    """Whether the TMA variant can run on `device` at all (Triton has descriptors, sm_90+)."""
    if TensorDescriptor is None or _backend.interpreter_enabled() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def choose_variant(tensors, device: torch.device) -> str:
    """"tma" where descriptors exist and every operand suits them, else "pointer"."""
    if tma_available(device) and all(_tma_aligned(t) for t in tensors):
        return "tma"
    return "pointer"


def gemm_nt(a: torch.Tensor, b: torch.Tensor, epilogue: int = EPI_NONE, aux: torch.Tensor | None = None,
            *, variant: str | None = None, out: torch.Tensor | None = None, scale: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C = epilogue(scale * a @ b^T) for a [M, K], b [N, K] (unit stride along K), C [M, N].

    C is in out_dtype (default a's dtype; fp8 operands need a 16-bit one).  scale: a
    one-element fp32 tensor on a's device, read by the kernel (no host sync), or None (1).
    aux [M, N] (unit inner stride) is read by EPI_RELU2_BWD only.  `variant` forces "tma"
    or "pointer" (tests); None picks by feature detection.  `out` (tests: poisoned
    buffers) receives C instead of a new tensor.
    """
    m, k = a.shape
    n = b.shape[0]
    out_dtype = out_dtype or a.dtype
    c = torch.empty((m, n), device=a.device, dtype=out_dtype) if out is None else out
    assert c.shape == (m, n) and c.dtype == out_dtype and c.stride(-1) == 1
    assert scale is None or (scale.numel() == 1 and scale.dtype == torch.float32 and scale.device == a.device)
    if epilogue == EPI_RELU2_BWD:
        assert aux is not None and aux.shape == (m, n) and aux.stride(-1) == 1
    operands = [a, b, c] + ([aux] if aux is not None else [])
    variant = variant or choose_variant(operands, a.device)
    config = kernel_config(a.dtype, a.device, epilogue)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(_num_programs(a.device), triton.cdiv(m, bm) * triton.cdiv(n, bn))
    scale_arg = scale if scale is not None else c  # never read without HAS_SCALE
    common = dict(EPILOGUE=epilogue, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                  HAS_SCALE=scale is not None,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config["GROUP_M"],
                  NUM_PROGRAMS=programs, FLATTEN=config["FLATTEN"],
                  num_warps=config["num_warps"], num_stages=config["num_stages"])
    if variant == "tma":
        a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
        b_desc = TensorDescriptor.from_tensor(b, [bn, bk])
        c_desc = TensorDescriptor.from_tensor(c, [bm, bn // 2])
        aux_desc = TensorDescriptor.from_tensor(aux, [bm, bn // 2]) if aux is not None else c_desc
        aux_arg = aux if aux is not None else c
        prefetch = (epilogue == EPI_RELU2_BWD and not _backend.interpreter_enabled()
                    and bn * aux_arg.element_size() >= 128)
        _gemm_nt_tma_kernel[(programs,)](a_desc, b_desc, c_desc, aux_desc, aux_arg, scale_arg, aux_arg.stride(0),
                                         m, n, k,
                                         WARP_SPECIALIZE=config["WARP_SPECIALIZE"], PREFETCH_AUX=prefetch,
                                         **common)
    elif variant == "pointer":
        aux_arg = aux if aux is not None else c
        _gemm_nt_pointer_kernel[(programs,)](
            a, b, c, aux_arg, scale_arg, m, n, k, a.stride(0), b.stride(0), c.stride(0), aux_arg.stride(0),
            EVEN_K=k % bk == 0, **common)
    else:
        raise ValueError(f"variant must be one of {VARIANTS} or None, got {variant!r}")
    return c


# ---- which products run where ----------------------------------------------------------

_plain_gemm = "cublas"


@contextlib.contextmanager
def plain_gemm(name: str):
    """Run the epilogue-free NT products (y = h W2^T, dx = dpre W1) on "cublas" or "triton".

    Read when relu2_mlp is called (fixed at trace time under torch.compile).
    """
    global _plain_gemm
    _checks.choice("name", name, PLAIN_GEMMS)
    previous, _plain_gemm = _plain_gemm, name
    try:
        yield
    finally:
        _plain_gemm = previous


def _product_nt(a, b, plain):
    """a @ b^T with no epilogue, on cuBLAS or the Triton kernel."""
    if plain == "triton":
        return gemm_nt(a, b.contiguous())
    return a @ b.T


# ---- custom ops ------------------------------------------------------------------------
# The public functions flatten x to 2-D [M, D] (a view where possible) before these ops and
# restore the leading dims after, so autograd of the reshape is torch's own.

@torch.library.custom_op("kernels::relu2_mlp_forward", mutates_args=())
def _mlp_forward(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, plain: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = relu(x w_fc^T)^2 (kept for the backward), y = h w_proj^T."""
    h = gemm_nt(x, w_fc, EPI_RELU2)
    return _product_nt(h, w_proj, plain), h


@_mlp_forward.register_fake
def _mlp_forward_fake(x, w_fc, w_proj, plain):
    return x.new_empty((x.shape[0], w_proj.shape[0])), x.new_empty((x.shape[0], w_fc.shape[0]))


@torch.library.custom_op("kernels::relu2_mlp_backward", mutates_args=())
def _mlp_backward(grad: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                  h: torch.Tensor, plain: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_fc, dw_proj) from grad = dL/dy and the kept h."""
    grad = grad.contiguous()
    dw_proj = grad.T @ h                                                  # [D, H], cuBLAS
    dpre = gemm_nt(grad, w_proj.T.contiguous(), EPI_RELU2_BWD, h)         # [M, H], fused
    dx = _product_nt(dpre, w_fc.T, plain)                                 # [M, D]
    dw_fc = dpre.T @ x                                                    # [H, D], cuBLAS
    return dx, dw_fc, dw_proj


@_mlp_backward.register_fake
def _mlp_backward_fake(grad, x, w_fc, w_proj, h, plain):
    return x.new_empty(x.shape), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _mlp_setup_context(ctx, inputs, output):
    x, w_fc, w_proj, plain = inputs
    ctx.plain = plain
    ctx.save_for_backward(x, w_fc, w_proj, output[1])
    ctx.mark_non_differentiable(output[1])


def _mlp_autograd_backward(ctx, grad_y, _grad_h):
    x, w_fc, w_proj, h = ctx.saved_tensors
    dx, dw_fc, dw_proj = _mlp_backward(grad_y, x, w_fc, w_proj, h, ctx.plain)
    return dx, dw_fc, dw_proj, None


_mlp_forward.register_autograd(_mlp_autograd_backward, setup_context=_mlp_setup_context)


@torch.library.custom_op("kernels::relu2_mlp_fp8_forward", mutates_args=())
def _mlp_fp8_forward(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, x_scale: torch.Tensor,
                     w_scale: torch.Tensor, plain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = relu(s (x8 w8^T))^2 with e4m3 operands and s = x_scale * w_scale, y = h w_proj^T.

    The quantization is torch's cast on the device (one pass over x, one over w_fc); the
    kernel reads s from device memory, so dynamic scales cost no host sync.
    """
    x8 = reference.quantize_e4m3(x, x_scale)
    w8 = reference.quantize_e4m3(w_fc, w_scale)
    dequant = (x_scale * w_scale).reshape(1)
    h = gemm_nt(x8, w8, EPI_RELU2, scale=dequant, out_dtype=x.dtype)
    return _product_nt(h, w_proj, plain), h


@_mlp_fp8_forward.register_fake
def _mlp_fp8_forward_fake(x, w_fc, w_proj, x_scale, w_scale, plain):
    return x.new_empty((x.shape[0], w_proj.shape[0])), x.new_empty((x.shape[0], w_fc.shape[0]))


def _mlp_fp8_setup_context(ctx, inputs, output):
    x, w_fc, w_proj, _x_scale, _w_scale, plain = inputs
    _mlp_setup_context(ctx, (x, w_fc, w_proj, plain), output)


def _mlp_fp8_autograd_backward(ctx, grad_y, _grad_h):
    # Straight through the quantization: the bf16 backward at the unquantized x and w_fc,
    # with relu(pre) = sqrt(h) taken from the fp8 forward's h (as the record's FP8 MLP).
    dx, dw_fc, dw_proj, _ = _mlp_autograd_backward(ctx, grad_y, _grad_h)
    return dx, dw_fc, dw_proj, None, None, None


_mlp_fp8_forward.register_autograd(_mlp_fp8_autograd_backward, setup_context=_mlp_fp8_setup_context)


@torch.library.custom_op("kernels::linear_relu2_forward", mutates_args=())
def _linear_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return gemm_nt(x, w, EPI_RELU2)


@_linear_forward.register_fake
def _linear_forward_fake(x, w):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("kernels::linear_relu2_backward", mutates_args=())
def _linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, h: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) from grad = dL/dh: no product to fuse dpre into, so it is one fp32 pass."""
    dpre = (2.0 * grad.float() * h.float().sqrt()).to(h.dtype)
    return dpre @ w, dpre.T @ x


@_linear_backward.register_fake
def _linear_backward_fake(grad, x, w, h):
    return x.new_empty(x.shape), torch.empty_like(w)


def _linear_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _linear_autograd_backward(ctx, grad_h):
    x, w, h = ctx.saved_tensors
    return _linear_backward(grad_h, x, w, h)


_linear_forward.register_autograd(_linear_autograd_backward, setup_context=_linear_setup_context)


def _relu2_mlp_triton(x, w_fc, w_proj):
    y = _mlp_forward(x.reshape(-1, x.shape[-1]), w_fc, w_proj, _plain_gemm)[0]
    return y.reshape(x.shape)


def _linear_relu2_triton(x, w):
    return _linear_forward(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])


def _relu2_mlp_fp8_triton(x, w_fc, w_proj, x_scale, w_scale):
    y = _mlp_fp8_forward(x.reshape(-1, x.shape[-1]), w_fc, w_proj, x_scale, w_scale, _plain_gemm)[0]
    return y.reshape(x.shape)


def _relu2_mlp_fp8_reference(x, w_fc, w_proj, x_scale, w_scale):
    return reference.relu2_mlp_fp8(x, w_fc, w_proj, x_scale=x_scale, w_scale=w_scale)


_RELU2_MLP = {"reference": reference.relu2_mlp, "triton": _relu2_mlp_triton}
_RELU2_MLP_FP8 = {"reference": _relu2_mlp_fp8_reference, "triton": _relu2_mlp_fp8_triton}
_LINEAR_RELU2 = {"reference": reference.linear_relu2, "triton": _linear_relu2_triton}


# ---- public ops ----------------------------------------------------------------------

def _unit_stride_rows(name, t):
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim; "
                         f"got strides {tuple(t.stride())}: call .contiguous() first")


def _validate_first_half(x, w, w_name):
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor(w_name, w, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.same_dtype(x=x, **{w_name: w})
    _checks.same_device(x=x, **{w_name: w})
    _checks.dim_size(w_name, w, 1, x.shape[-1], "x.shape[-1] (D)")
    _checks.non_empty("x", x)
    _checks.non_empty(w_name, w)
    _unit_stride_rows("x", x)
    _unit_stride_rows(w_name, w)


def linear_relu2(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The MLP's first half, fused: relu(x @ w^T)^2.

    Args:
        x: [..., D] bfloat16 (training), float16 or float32; unit stride along D.
        w: [H, D], the same dtype; unit stride along D.

    Returns:
        [..., H] in the inputs' dtype, computed as eager PyTorch does (matmul with fp32
        accumulation, rounded; relu; square, rounded).  Gradients for x and w.

    Backends: "triton" (auto on CUDA tensors): one persistent GEMM with the relu^2 in its
    epilogue; the backward forms dpre = 2 * grad * sqrt(h) in fp32 and multiplies on
    cuBLAS.  "reference" (auto on CPU tensors).  No host synchronization; traces under
    torch.compile(fullgraph=True).
    """
    _validate_first_half(x, w, "w")
    implementation = _LINEAR_RELU2[_backend.choose(OP_LINEAR, x.device)]
    return implementation(x, w)


def _validate_mlp(x, w_fc, w_proj):
    _validate_first_half(x, w_fc, "w_fc")
    _checks.tensor("w_proj", w_proj, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.same_dtype(x=x, w_proj=w_proj)
    _checks.same_device(x=x, w_proj=w_proj)
    _checks.dim_size("w_proj", w_proj, 0, x.shape[-1], "x.shape[-1] (D)")
    _checks.dim_size("w_proj", w_proj, 1, w_fc.shape[0], "w_fc.shape[0] (H)")
    _unit_stride_rows("w_proj", w_proj)


def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The GPT block's MLP: relu(x @ w_fc^T)^2 @ w_proj^T.

    Args:
        x: [..., D] bfloat16 (training), float16 or float32; unit stride along D.
        w_fc: [H, D], the same dtype; unit stride along D.
        w_proj: [D, H], the same dtype; unit stride along H.

    Returns:
        [..., D] in the inputs' dtype, computed as eager PyTorch does: the hidden
        activation relu(x @ w_fc^T)^2 is rounded to that dtype before the second matmul.
        Gradients for x, w_fc and w_proj.

    Backends: "triton" (auto on CUDA tensors): forward h = relu(x w_fc^T)^2 in one
    persistent GEMM's epilogue (only h is kept for the backward), y = h w_proj^T;
    backward dpre = 2 (g w_proj) * relu(pre) in another GEMM's epilogue (relu(pre) =
    sqrt(h); dh is never stored), dx, dw_fc, dw_proj on cuBLAS.  "reference" (auto on
    CPU tensors).  No host synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate_mlp(x, w_fc, w_proj)
    implementation = _RELU2_MLP[_backend.choose(OP_MLP, x.device)]
    return implementation(x, w_fc, w_proj)


def _scale_tensor(name, value, x):
    """A per-tensor scale as a one-element fp32 tensor on x's device (None: amax / 448 of t)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a positive float or a one-element float tensor; "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        _checks.same_device(x=x, **{name: value})
        return value.detach().float().reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite float or a one-element tensor, got {value!r}")
    return torch.full((), float(value), dtype=torch.float32, device=x.device)


def relu2_mlp_fp8(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, *,
                  x_scale: float | torch.Tensor | None = None,
                  w_scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """relu2_mlp with its first product in float8 e4m3, per-tensor scales: the FP8 forward of
    the current modded-nanogpt record's MLP (its c_fc product in e4m3 with dequantization
    scales x_scale * w_scale applied to the fp32 accumulator, the rest in bf16).

    Args:
        x, w_fc, w_proj: as relu2_mlp (bf16 in training; fp16/fp32 also accepted).
        x_scale, w_scale: dequantization scales, x ~ e4m3(x / x_scale) * x_scale: positive
            floats or one-element tensors on x's device (their values are not checked: that
            would sync with the device); None (default): amax(|t|) / 448 of the tensor,
            computed on the device every call, as the record does.  Values of t / scale past
            +-448 saturate.

    Returns:
        [..., D] in x's dtype: pre = (x8 @ w8^T) * x_scale * w_scale accumulated in fp32 and
        rounded to x's dtype, h = relu(pre)^2 rounded, y = h @ w_proj^T.  Gradients for x,
        w_fc, w_proj straight through the quantization (those of relu2_mlp at the
        unquantized inputs, with relu(pre) from the fp8 forward); none for the scales.
        The spec is kernels.reference.relu2_mlp_fp8.

    Backends: as relu2_mlp (the same backend choice): "triton" runs the fused relu^2 GEMM
    on e4m3 operands (wgmma with fp8 inputs on Hopper) and the bf16 backward;
    "reference" the spec.  No host synchronization; traces under torch.compile(fullgraph=True).
    """
    _validate_mlp(x, w_fc, w_proj)
    x_scale = reference.fp8_scale(x).float() if x_scale is None else _scale_tensor("x_scale", x_scale, x)
    w_scale = reference.fp8_scale(w_fc).float() if w_scale is None else _scale_tensor("w_scale", w_scale, x)
    implementation = _RELU2_MLP_FP8[_backend.choose(OP_MLP, x.device)]
    return implementation(x, w_fc, w_proj, x_scale, w_scale)
