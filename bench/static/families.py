"""What the static reading compiles: per op family, its kernels at the speedrun's shapes.

Every Triton kernel is given the argument values its launcher passes at those shapes
(tensors as 16-byte aligned pointers of their dtype, ints and floats as the launcher
computes them) and the config the op picks on an H100 (the module's own config
functions), so tests/hopper_aot.py specializes it exactly as the JIT would.  Every CUDA
kernel is named by the template instance the extension launches there.

The work (bytes the op must move, FLOPs it must do) comes from the benches' own
formulas (bench/bench_<op>.py), so a static prediction and a measurement share a
denominator.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import torch
import triton

from bench.static import hopper

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 48 * 1024  # tokens per GPU per step (DESIGN.md §5)
V, D, H, HEADS, HEAD_DIM = 50304, 768, 3072, 6, 128
WINDOW = 1792  # the long window at the end of training


@dataclasses.dataclass
class Kernel:
    name: str                      # short name in the report
    role: str                      # what it does in the op, one line
    backend: str                   # "cuda" or "triton"
    threads: int | None = None     # CUDA: threads per CTA (Triton: from num_warps)
    ctas: int = 0                  # CTAs launched at the speedrun's shape
    source: str | None = None      # CUDA: csrc file
    symbol: str | None = None      # CUDA: a substring of the mangled name that picks one instance
    dynamic_smem: int = 0          # CUDA: dynamic shared memory per CTA
    spec: dict | None = None       # Triton: a tests/hopper_aot.py spec
    # Per-element reading: ("loops", elements per iteration per thread) or
    # ("path", elements per thread, {(param ordinal, byte offset): value}).
    per_element: tuple | None = None
    elements: int = 0              # elements the kernel processes at the shape (per-element kernels)
    runs_in_speedrun: bool = True  # False: a fallback (other alignment, other backend)


@dataclasses.dataclass
class Op:
    stem: str
    shape: str
    bytes: int                     # DRAM bytes the op must move
    flops: int                     # FLOPs it must do (0: bandwidth-bound)
    flop_kind: str | None          # "bf16" or "fp8": which peak bounds it
    kernels: list[Kernel]
    bench_case: str                # the bench's name for the same work (bench_<op>.case_name)
    notes: list[str] = dataclasses.field(default_factory=list)


def _bench(stem: str):
    return importlib.import_module(f"bench.bench_{stem}")


def csrc_constants(source: str) -> dict[str, int]:
    """`constexpr int NAME = EXPR;` of a csrc file, evaluated in order (ints, + - * / only)."""
    values: dict[str, int] = {}
    text = (ROOT / "csrc" / source).read_text()
    for name, expr in re.findall(r"constexpr int (\w+) = ([^;]+);", text):
        tokens = re.findall(r"\w+|[-+*/()]", expr.split("//")[0])
        if all(t in values or t.isdigit() or t in "+-*/()" for t in tokens):
            values[name] = int(eval(" ".join(str(values.get(t, t)) for t in tokens).replace("/", "//"), {}))
    return values


# ---- softcap_ce --------------------------------------------------------------------------

def softcap_ce() -> Op:
    module = importlib.import_module("kernels.softcap_ce")
    n, v = TOKENS, V
    block, warps = module._block_and_warps(v)
    constants = csrc_constants("softcap_ce.cu")
    threads = constants["kThreads"]
    packs = v // 8  # 16-byte packs of 8 bf16
    loads = -(-packs // threads)
    # CapParams p (ordinal 6): kind at +0, fixed_reference at +16; need_grad is ordinal 9.
    sigmoid_path = {(6, 0): 2, (6, 16): 1, (9, 0): 1}
    # What launch_staged gives the staged kernel at this shape: the row (v bf16) as dynamic
    # shared memory, and a persistent grid of 2 CTAs per SM (__launch_bounds__(..., 2)).
    staged_ctas = min(n, 2 * hopper.SMS)

    def triton_forward(cols: int, name: str, role: str) -> Kernel:
        """The Triton forward at n rows of `cols` columns, as _forward_triton launches it."""
        blk, nw = module._block_and_warps(cols)
        one_read = blk >= cols
        programs = n if one_read else min(n, hopper.SMS * module.PROGRAMS_PER_SM)
        args = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "grad_scale_ptr": "*fp32", "loss_ptr": "*fp32",
                "grad_ptr": "*bf16", "n_rows": n, "n_cols": cols, "logits_row_stride": cols, "ignore_index": -100,
                "cap": 30.0, "inv_cap": 1 / 30.0, "inv_scale": 1 / 7.5, "KIND": module.KIND_CODES["sigmoid"],
                "FIXED_REFERENCE": module.fixed_reference(30.0, "sigmoid"), "NEED_GRAD": True, "BLOCK": blk,
                "ONE_READ": one_read}
        # Innermost loops: the two sweeps (blk / threads elements each per iteration), or for
        # ONE_READ the row loop itself, whose one iteration is the whole row.
        return Kernel(name, role, "triton", ctas=programs,
                      spec={"module": "kernels.softcap_ce", "kernel": "_softcap_ce_forward_kernel", "args": args,
                            "num_warps": nw},
                      per_element=("loops", blk // (32 * nw)), elements=n * cols, runs_in_speedrun=False)

    return Op("softcap_ce", f"N={n}, V={v}, bf16 logits, sigmoid cap 30 / 7.5, mean",
              bytes=_bench("softcap_ce").bytes_moved(n, v, "fwd+bwd"), flops=0, flop_kind=None,
              bench_case=_bench("softcap_ce").case_name("fwd+bwd", n, v), kernels=[
        Kernel("cuda softcap_ce_staged<bf16,sigmoid>",
               "forward+gradient (v2), row staged in shared memory by bulk copy (one read), persistent grid",
               "cuda", threads=constants["kStagedThreads"], ctas=staged_ctas, source="softcap_ce.cu",
               symbol="softcap_ce_staged_kernelIN3c108BFloat16ELi2ELb0E", dynamic_smem=2 * v,
               per_element=("shared_loops", constants["kPackElems"]), elements=n * v),
        Kernel(f"cuda softcap_ce_cached<bf16,{loads}>",
               "forward+gradient (v1), row cached in registers (one read): the fallback for uncapped kinds "
               "or caps above the fixed-reference rule", "cuda", threads=threads, ctas=n, source="softcap_ce.cu",
               symbol=f"softcap_ce_cached_kernelIN3c108BFloat16ELi{loads}E",
               per_element=("path", loads * 8, sigmoid_path), elements=n * v, runs_in_speedrun=False),
        Kernel("cuda softcap_ce_streaming<bf16>", "fallback for misaligned rows / V > 65536: two sweeps",
               "cuda", threads=threads, ctas=n, source="softcap_ce.cu",
               symbol="softcap_ce_streaming_kernelIN3c108BFloat16E", runs_in_speedrun=False),
        Kernel("cuda scale_rows<bf16>", "backward: scales the kept gradient (skipped when the factor is 1)",
               "cuda", threads=256, ctas=n, source="softcap_ce.cu", symbol="scale_rows_kernelIN3c108BFloat16E"),
        triton_forward(v, "triton _softcap_ce_forward_kernel (long rows)",
                       f"Triton backend at V={v}: online sum-exp sweep, then gradient sweep from L2, persistent grid"),
        triton_forward(module.ONE_READ_MAX_COLS, "triton _softcap_ce_forward_kernel (ONE_READ)",
                       f"Triton backend at V={module.ONE_READ_MAX_COLS} (the longest row read once): "
                       "one block per row, one program per row"),
        Kernel("triton _scale_rows_kernel", "Triton backend: backward scaling", "triton", ctas=n,
               spec={"module": "kernels.softcap_ce", "kernel": "_scale_rows_kernel", "num_warps": warps,
                     "args": {"grad_ptr": "*bf16", "factor_ptr": "*fp32", "n_cols": v, "factor_stride": 0,
                              "BLOCK": block}}, runs_in_speedrun=False),
    ], notes=[f"the CUDA staged kernel keeps the row ({2 * v} B) in shared memory, 2 CTAs per SM; the v1 cached "
              f"kernel would take V = {v} as {loads} packs of 8 bf16 per thread ({packs} packs over {threads} threads)"])


# ---- fp8_head ------------------------------------------------------------------------------

def fp8_head() -> Op:
    bench = _bench("fp8_head")
    m = TOKENS
    c = csrc_constants("fp8_head.cu")
    ce = csrc_constants("softcap_ce.cu")
    fp8 = importlib.import_module("kernels.fp8_head")
    cdiv = triton.cdiv

    def gemm(a_type: str, out: str, promoted: bool, rows: int, cols: int, label: str, role: str,
             runs: bool) -> Kernel:
        """One fp8_gemm_kernel<A e5m2?, OutT, kPromote> instance at rows x cols outputs."""
        bn = c["kBNPromoted"] if promoted else c["kBNFast"]
        # Promoted: clusters of kClusterPromoted CTAs on row-tile pairs, as many as fit (at most
        # SMS // cluster; the launch asks cudaOccupancyMaxActiveClusters, which can say fewer).
        cluster = c["kClusterPromoted"] if promoted else 1
        ctas = cluster * min(cdiv(cdiv(rows, c["kBM"]), cluster) * cdiv(cols, bn), hopper.SMS // cluster)
        mangled = {"e4m3": "Lb0E", "e5m2": "Lb1E"}[a_type] + {"bf16": "13__nv_bfloat16", "fp32": "f"}[out]
        mode = ",promoted" if promoted else ""
        return Kernel(f"cuda fp8_gemm<{a_type},{out}{mode}>{label}", role, "cuda", threads=c["kThreads"],
                      ctas=ctas, source="fp8_head.cu",
                      symbol=f"fp8_gemm_kernelI{mangled}Lb{int(promoted)}E",
                      dynamic_smem=c["kSmemBytesPromoted" if promoted
                                     else "kSmemBytesFastTmaStore" if out == "bf16" else "kSmemBytesFast"],
                      runs_in_speedrun=runs)

    def cast(src: str, mangled: str, e5m2: bool, rows: int, cols: int, role: str, runs: bool) -> Kernel:
        return Kernel(f"cuda cast_fp8<{src},{'e5m2' if e5m2 else 'e4m3'}>", role, "cuda", threads=c["kCastThreads"],
                      ctas=cdiv(rows, c["kCastTile"]) * cdiv(cols, c["kCastTile"]), source="fp8_head.cu",
                      symbol=f"cast_fp8_kernelI{mangled}Lb{int(e5m2)}E", runs_in_speedrun=runs)

    def triton_gemm(name: str, a_type: str, out: str, rows: int, cols: int, red: int, alpha: float,
                    imprecise: int | None, row_stats: bool = False) -> Kernel:
        role = "Triton backend GEMM (" + ("promoted every 128 of K" if imprecise else "fast") + ")"
        if row_stats:  # the fused head's forward: launched with maxnreg 128 (kernels/fp8_head.py)
            role += " with the loss's per-tile sum-exp in the epilogue"
        return Kernel(name, role, "triton", ctas=cdiv(rows, 128) * cdiv(cols, 128), runs_in_speedrun=False,
                      spec={"module": "kernels.fp8_head", "kernel": "_fp8_gemm_kernel", "num_warps": 8,
                            "num_stages": 3, **({"maxnreg": 128} if row_stats else {}),
                            "args": {"a_ptr": a_type, "b_ptr": "*fp8e4nv", "c_ptr": out, "M": rows, "N": cols,
                                     "K": red, "stride_am": red, "stride_bn": red, "stride_cm": cols,
                                     "alpha": alpha, "stats_ptr": "*fp32",
                                     "stride_stats": cdiv(cols, 128) if row_stats else 1,
                                     "cap": 30.0, "inv_cap": 1 / 30.0, "inv_scale": 1 / 7.5,
                                     "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8,
                                     "MAX_IMPRECISE_ACC": imprecise, "KIND": 2 if row_stats else 0,
                                     "ROW_STATS": row_stats}})

    y_promoted = fp8.PROMOTE_Y
    cast_ctas = cdiv(m, c["kCastTile"]) * cdiv(V, c["kCastTile"])
    y_bytes = m * D + V * D + 2 * m * V  # x8, w8 read (1 B per element), bf16 y written
    return Op("fp8_head", f"y = x8 @ w8^T at M={m}, V={V}, K={D} (e4m3 in, bf16 out); dx, dW alike",
              bytes=y_bytes, flops=bench.flops(*bench.gemm_shape("y", m)), flop_kind="fp8",
              bench_case=bench.gemm_case("y", m), kernels=[
        gemm("e4m3", "bf16", y_promoted, m, V, " (y)", "y GEMM: TMA + wgmma, persistent, 2 consumer warpgroups, "
             "one wgmma chain over K = 768 (kernels/fp8_head.py PROMOTE_Y), y out by TMA store overlapped with "
             "the next tile", True),
        gemm("e5m2", "bf16", True, m, D, " (dx)", "dx GEMM (e5m2 gradient operand), fp32 promotion every 128 of K, "
             f"{c['kClusterPromoted']}-CTA clusters multicasting the B k-block", True),
        gemm("e5m2", "fp32", True, V, D, " (dW)", "dW GEMM, fp32 output, fp32 promotion every 128 of K, "
             f"{c['kClusterPromoted']}-CTA clusters multicasting the B k-block", True),
        gemm("e4m3", "bf16", not y_promoted, m, V, " (y, other mode)", "y GEMM with PROMOTE_Y flipped", False),
        gemm("e5m2", "bf16", False, m, D, "", "fp8_gemm(promote=False) with an e5m2 operand, bf16 out", False),
        gemm("e5m2", "fp32", False, V, D, "", "fp8_gemm(promote=False) with an e5m2 operand, fp32 out", False),
        gemm("e4m3", "fp32", False, m, V, "", "fp8_gemm(promote=False), e4m3 operands, fp32 out", False),
        gemm("e4m3", "fp32", True, m, V, "", "fp8_gemm(promote=True), e4m3 operands, fp32 out", False),
        cast("bf16", "N3c108BFloat16E", False, m, D, "x -> x8 and x8^T", True),
        cast("fp32", "f", False, V, D, "the fp32 head weight -> w8 and w8^T", True),
        cast("bf16", "N3c108BFloat16E", True, m, V, "fp8_linear's backward: grad -> g8 and g8^T (the fused "
             "head + loss writes them in ce_grad_e5m2 instead)", False),
        cast("fp32", "f", True, m, V, "an fp32 gradient or input cast to e5m2", False),
        cast("fp16", "N3c104HalfE", False, m, D, "fp16 input cast to e4m3", False),
        cast("fp16", "N3c104HalfE", True, m, V, "fp16 gradient cast to e5m2", False),
        Kernel("cuda softcap_ce_staged<bf16,sigmoid,e5m2>",
               "the fused head's loss pass (mean/sum): loss and g8 (e5m2, upstream 1) in the one read of y, "
               "row staged in shared memory, 2 CTAs/SM", "cuda", threads=ce["kStagedThreads"],
               ctas=min(m, 2 * hopper.SMS), source="softcap_ce.cu",
               symbol="softcap_ce_staged_kernelIN3c108BFloat16ELi2ELb1E", dynamic_smem=2 * V,
               per_element=("shared_loops", ce["kPackElems"]), elements=m * V),
        Kernel("cuda transpose_bytes", "g8 -> g8^T for the dW GEMM: 64x64 tiles, 16-byte loads and stores",
               "cuda", threads=c["kTransposeThreads"],
               ctas=cdiv(m, c["kTransposeTile"]) * cdiv(V, c["kTransposeTile"]), source="fp8_head.cu",
               symbol="transpose_bytes_kernel"),
        Kernel("cuda ce_grad_e5m2", "loss gradient straight to e5m2 (g8 and g8^T) in the backward: "
               "reduction='none', or where the staged loss pass does not apply", "cuda",
               threads=c["kCastThreads"], ctas=cast_ctas, source="fp8_head.cu", symbol="ce_grad_e5m2_kernel",
               runs_in_speedrun=False),
        triton_gemm("triton _fp8_gemm_kernel (y)", "*fp8e4nv", "*bf16", m, V, D, 2.0 ** -10, None),
        triton_gemm("triton _fp8_gemm_kernel (dx, promoted)", "*fp8e5", "*bf16", m, D, V, 2.0 ** -28,
                    fp8.PROMOTE_K),
        triton_gemm("triton _fp8_gemm_kernel (y + row stats)", "*fp8e4nv", "*bf16", m, V, D, 2.0 ** -10, None,
                    row_stats=True),
        Kernel("triton _loss_from_row_stats_kernel", "Triton fused head: row loss from the epilogue's partials",
               "triton", ctas=cdiv(m, 64), runs_in_speedrun=False,
               spec={"module": "kernels.fp8_head", "kernel": "_loss_from_row_stats_kernel", "num_warps": 4,
                     "args": {"stats_ptr": "*fp32", "logits_ptr": "*bf16", "targets_ptr": "*i64",
                              "loss_ptr": "*fp32", "n_rows": m, "n_tiles": cdiv(V, 128), "n_cols": V,
                              "stride_stats": cdiv(V, 128), "stride_l": V, "ignore_index": -100,
                              "cap": 30.0, "inv_cap": 1 / 30.0, "inv_scale": 1 / 7.5, "KIND": 2,
                              "BLOCK_R": 64, "BLOCK_T": 64}}),
        Kernel("triton _ce_grad_e5m2_kernel", "Triton backend gradient to e5m2", "triton", ctas=cast_ctas,
               runs_in_speedrun=False,
               spec={"module": "kernels.fp8_head", "kernel": "_ce_grad_e5m2_kernel", "num_warps": 4,
                     "args": {"logits_ptr": "*bf16", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                              "factor_ptr": "*fp32", "g8_ptr": "*u8", "g8t_ptr": "*u8", "n_rows": m, "n_cols": V,
                              "stride_l": V, "stride_g8": V, "stride_g8t": m, "factor_stride": 0,
                              "ignore_index": -100, "cap": 30.0, "inv_cap": 1 / 30.0, "inv_scale": 1 / 7.5,
                              "grad_scale": 2.0 ** 19, "KIND": 2, "BLOCK_R": 64, "BLOCK_C": 64}}),
    ], notes=["bytes and FLOPs are the y GEMM's (the largest output); dx and dW are compute-bound alike",
              f"dx and dW promote to fp32 every 128 of K (128x{c['kBNPromoted']} tiles); y "
              + ("promotes too" if y_promoted else f"does not (128x{c['kBNFast']} tiles, PROMOTE_Y = False)")])


# ---- newton_schulz -------------------------------------------------------------------------

def newton_schulz() -> Op:
    ns = importlib.import_module("kernels.newton_schulz")
    bench = _bench("newton_schulz")
    groups = bench.gpt_groups()
    size, width, batch = D, H, 12  # the 12 c_proj weights 768 x 3072: the largest stack
    n_chunks, rows_per_chunk = ns.norm_chunks(size)
    chunks = max(16, triton.next_power_of_2(n_chunks))
    flags = {"BF16": True, "EMULATE_BF16": False}
    gram, poly, upd = ns.syrk_config(size, width), ns.syrk_config(size, size), ns.update_config(size, width)

    def syrk(source: str, depth: int, has_d: bool, first: bool, cfg: dict, alpha: float, beta: float) -> dict:
        cfg = dict(cfg)
        side = triton.cdiv(size, cfg["BLOCK"])
        launch = {key: cfg.pop(key) for key in ("num_warps", "maxnreg") if key in cfg}
        return {"module": "kernels.newton_schulz", "kernel": "_syrk_kernel", **launch,
                "args": {"y_ptr": source, "c_ptr": "*bf16", "d_ptr": "*bf16", "partials_ptr": "*fp32",
                         "size": size, "depth": depth, "tiles_per_matrix": side * (side + 1) // 2,
                         "stride_yb": size * depth, "stride_ym": depth, "stride_yk": 1, "alpha": alpha,
                         "beta": beta, "eps": 1e-7, "n_chunks": n_chunks, "HAS_D": has_d, "SCALE_BY_NORM": first,
                         "CHUNKS": chunks, **flags, **cfg}}

    def update(source: str, first: bool) -> dict:
        cfg = dict(upd)
        tiles_n = triton.cdiv(width, cfg["BLOCK_N"])
        launch = {key: cfg.pop(key) for key in ("num_warps", "maxnreg") if key in cfg}
        return {"module": "kernels.newton_schulz", "kernel": "_update_kernel", **launch,
                "args": {"b_ptr": "*bf16", "x_ptr": source, "out_ptr": "*bf16", "partials_ptr": "*fp32",
                         "size": size, "width": width, "tiles_n": tiles_n,
                         "tiles_per_matrix": triton.cdiv(size, cfg["BLOCK_M"]) * tiles_n,
                         "stride_xb": size * width, "stride_xm": width, "stride_xn": 1,
                         "stride_ob": size * width, "stride_om": width, "stride_on": 1, "a_coef": 3.4445,
                         "eps": 1e-7, "n_chunks": n_chunks, "SCALE_BY_NORM": first, "CHUNKS": chunks, **flags, **cfg}}

    def tiles(cfg: dict) -> int:
        side = triton.cdiv(size, cfg["BLOCK"])
        return batch * side * (side + 1) // 2

    upd_ctas = batch * triton.cdiv(size, upd["BLOCK_M"]) * triton.cdiv(width, upd["BLOCK_N"])
    # DRAM bytes per matrix (bench/NOTES.md): the fp32 G read and the bf16 output written; in a
    # stack that runs in one pass (all four on an H100) also X0 written and, per step,
    # 2 B x (3MN + 4M^2); a stack in L2-sized passes keeps X0, the iterates, A and B in L2.
    # (X0's write and the output's are the same 2 B: the last step's X' write is the output.)
    step_bytes = g_bytes = 0
    for shape in groups:
        matrices = bench.matrices_of([shape])
        one_pass = ns.chunk_of(shape, torch.device("cpu")) == len(matrices)
        for r, c in matrices:
            g_bytes += (4 + 2) * r * c
            if one_pass:
                step_bytes += 2 * (3 * min(r, c) * max(r, c) + 4 * min(r, c) ** 2)
    return Op("newton_schulz", "NS5 on one Muon step of the GPT (44 matrices 768x768, 24 of 768x3072), bf16; "
              f"kernels shown for the {batch}x{size}x{width} stack",
              bytes=5 * step_bytes + g_bytes, flops=bench.flops(groups, 5, symmetric=True), flop_kind="bf16",
              bench_case=bench.case_name("gpt"),
              kernels=[
        Kernel("triton _sumsq_kernel", "per-chunk sums of squares of G (fp32 in), X0 = bf16(G) out", "triton",
               ctas=batch * n_chunks,
               spec={"module": "kernels.newton_schulz", "kernel": "_sumsq_kernel", "num_warps": 4,
                     "args": {"g_ptr": "*fp32", "partials_ptr": "*fp32", "copy_ptr": "*bf16", "rows": size,
                              "cols": width, "stride_gb": size * width, "stride_gm": width, "stride_gn": 1,
                              "rows_per_chunk": rows_per_chunk, "n_chunks": n_chunks, "WRITE_COPY": True, **flags,
                              "BLOCK_R": ns._NORM_BLOCK_ROWS, "BLOCK_C": ns._tile(width, 256)}}),
        Kernel("triton _syrk_kernel (A = X X^T, step 1)", "Gram of X0, normalization folded in",
               "triton", ctas=tiles(gram), spec=syrk("*bf16", width, False, True, gram, 1.0, 0.0)),
        Kernel("triton _syrk_kernel (A = X X^T)", "Gram, lower-triangle tiles mirrored", "triton",
               ctas=tiles(gram), spec=syrk("*bf16", width, False, False, gram, 1.0, 0.0)),
        Kernel("triton _syrk_kernel (B = bA + cA^2)", "polynomial of A, bA fused in the epilogue", "triton",
               ctas=tiles(poly), spec=syrk("*bf16", size, True, False, poly, 2.0315, -4.7750)),
        Kernel("triton _update_kernel (step 1)", "X' = aX + BX from X0, normalization folded in", "triton",
               ctas=upd_ctas, spec=update("*bf16", True)),
        Kernel("triton _update_kernel", "X' = aX + BX", "triton", ctas=upd_ctas, spec=update("*bf16", False)),
    ], notes=["bytes: the fp32 G read and bf16 output write per matrix, + X0 and 5 steps x 2 B x (3MN + 4M^2) "
              "where a stack runs in one pass (all four on an H100: L2-sized passes would not fill a wave; "
              "bench/NOTES.md); "
              "FLOPs: the symmetric count (one triangle of X X^T and A A)"])


# ---- relu2_mlp -----------------------------------------------------------------------------

def relu2_mlp() -> Op:
    mlp = importlib.import_module("kernels.relu2_mlp")
    bench = _bench("relu2_mlp")
    m = TOKENS
    config = mlp.kernel_config(torch.bfloat16, torch.device("cuda"))
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]

    def tma(epilogue: int, n: int, k: int, operands: torch.dtype = torch.bfloat16) -> dict:
        cfg = mlp.kernel_config(operands, torch.device("cuda"), epilogue)
        bk = cfg["BLOCK_K"]
        kind = "fp8e4nv" if operands == mlp.FP8 else "bf16"
        programs = min(132, triton.cdiv(m, bm) * triton.cdiv(n, bn))
        return {"module": "kernels.relu2_mlp", "kernel": "_gemm_nt_tma_kernel", "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"],
                "args": {"a_desc": f"tensordesc<{kind}[{bm}, {bk}]>", "b_desc": f"tensordesc<{kind}[{bn}, {bk}]>",
                         "c_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>",
                         "aux_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>", "aux_ptr": "*bf16", "scale_ptr": "*fp32",
                         "stride_auxm": n, "M": m, "N": n, "K": k, "HAS_SCALE": operands == mlp.FP8,
                         "EPILOGUE": epilogue, "WARP_SPECIALIZE": config["WARP_SPECIALIZE"],
                         "PREFETCH_AUX": epilogue == mlp.EPI_RELU2_BWD,
                         "DOT_PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                         "GROUP_M": config["GROUP_M"], "NUM_PROGRAMS": programs, "FLATTEN": config["FLATTEN"]}}

    pointer = tma(mlp.EPI_RELU2, H, D)
    pointer = {**pointer, "kernel": "_gemm_nt_pointer_kernel", "args": {
        **{k: v for k, v in pointer["args"].items()
           if not k.endswith("_desc") and k not in ("WARP_SPECIALIZE", "PREFETCH_AUX")},
        "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "aux_ptr": "*bf16", "scale_ptr": "*fp32",
        "stride_am": D, "stride_bn": D,
        "stride_cm": H, "stride_auxm": H, "EVEN_K": D % bk == 0}}
    programs = min(132, triton.cdiv(m, bm) * triton.cdiv(H, bn))
    return Op("relu2_mlp", f"M={m}, D={D}, H={H}, bf16, forward+backward (6 products)",
              bytes=0, flops=bench.flops(m, D, H, "fwd+bwd"), flop_kind="bf16",
              bench_case=bench.case_name("fwd+bwd", m, D, H), kernels=[
        Kernel("triton _gemm_nt_tma_kernel (h = relu(x W1^T)^2)", "fc forward with the relu^2 epilogue", "triton",
               ctas=programs, spec=tma(mlp.EPI_RELU2, H, D)),
        Kernel("triton _gemm_nt_tma_kernel (dpre)", "g W2 with the 2 sqrt(h) epilogue (reads h through TMA)",
               "triton", ctas=programs, spec=tma(mlp.EPI_RELU2_BWD, H, D)),
        Kernel("triton _gemm_nt_tma_kernel (y = h W2^T)", "plain product (cuBLAS by default)", "triton",
               ctas=min(132, triton.cdiv(m, bm) * triton.cdiv(D, bn)), spec=tma(mlp.EPI_NONE, D, H),
               runs_in_speedrun=False),
        Kernel("triton _gemm_nt_pointer_kernel (h)", "fallback without TMA (misaligned operands)", "triton",
               ctas=programs, spec=pointer, runs_in_speedrun=False),
        Kernel("triton _gemm_nt_tma_kernel (fp8 h = relu(s x8 W1_8^T)^2)",
               "relu2_mlp_fp8's forward (--kernels mlp=ours-fp8): e4m3 operands, per-tensor dequant scale",
               "triton", ctas=programs, spec=tma(mlp.EPI_RELU2, H, D, mlp.FP8), runs_in_speedrun=False),
    ], notes=["bytes: every product is compute-bound (>= 600 FLOP/B, bench/NOTES.md), so no memory floor is "
              "given; FLOPs of all six products, two of which (dW1, dW2) run on cuBLAS"])


# ---- sliding_window_attention ---------------------------------------------------------------

def sliding_window_attention() -> Op:
    swa = importlib.import_module("kernels.sliding_window_attention")
    bench = _bench("sliding_window_attention")
    t = TOKENS
    pairs = bench.visible_pairs(bench.document_lengths(t), WINDOW)
    strides = {"b": t * HEADS * HEAD_DIM, "t": HEADS * HEAD_DIM, "h": HEAD_DIM}

    def spec(name: str, kernel: str, rows: dict[str, str], extra: dict) -> dict:
        # rows: descriptor argument -> the config block its tiles span (q, k, v, dO are TMA
        # descriptors of [B, T, H, D] read in [1, rows, 1, D] tiles; kernels._descriptor).
        config = dict(swa.CONFIGS[HEAD_DIM][name])
        descriptors = {arg: f"tensordesc<bf16[1, {config[block]}, {HEAD_DIM}]>" for arg, block in rows.items()}
        return {"module": "kernels.sliding_window_attention", "kernel": kernel,
                "num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages"),
                "args": {**descriptors, "lse_ptr": "*fp32", "doc_ptr": "*i32", "order_ptr": "*i32", "T": t,
                         "window": WINDOW, **extra,
                         "stride_docb": t, "HAS_DOCS": True, "WINDOW_BLOCK": 128, "HEAD_DIM": HEAD_DIM,
                         "SCAN": swa.SCAN_CHUNK, **config}}

    scales = {"scale": HEAD_DIM ** -0.5, "scale_log2": HEAD_DIM ** -0.5 * swa.LOG2_E}
    qkv_rows = {"q_desc": "BLOCK_M", "k_desc": "BLOCK_N", "v_desc": "BLOCK_N"}
    fwd = spec("fwd", "_sliding_window_attn_fwd", qkv_rows,
               {"o_ptr": "*bf16", "scale_log2": scales["scale_log2"],
                **{f"stride_o{axis}": strides[axis] for axis in "bth"}})
    backward = {"delta_ptr": "*fp32", **scales}
    dkdv = spec("dkdv", "_sliding_window_attn_bwd_dkdv", {**qkv_rows, "do_desc": "BLOCK_M"},
                {"dk_ptr": "*bf16", "dv_ptr": "*bf16", **backward})
    dq = spec("dq", "_sliding_window_attn_bwd_dq", {**qkv_rows, "do_desc": "BLOCK_M", "o_desc": "BLOCK_M"},
              {"dq_ptr": "*bf16", **backward})
    fwd_blocks = swa.CONFIGS[HEAD_DIM]["fwd"]
    work = {"module": "kernels.sliding_window_attention", "kernel": "_block_work", "num_warps": 4,
            "args": {"doc_ptr": "*i32", "work_ptr": "*i32", "T": t, "window": WINDOW, "stride_docb": t,
                     "HAS_DOCS": True, "QUERY_BLOCKS": True, "BLOCK_M": fwd_blocks["BLOCK_M"],
                     "BLOCK_N": fwd_blocks["BLOCK_N"], "SCAN": swa.SCAN_CHUNK, "WINDOW_BLOCK": 128}}

    def grid(name: str, block: str) -> int:
        return triton.cdiv(t, swa.CONFIGS[HEAD_DIM][name][block]) * HEADS

    # The Gluon forward (opt-in: FORWARD = "gluon"), with the range kernel that replaces
    # _block_work before it; built where this triton has Gluon's Hopper API.
    gluon_kernels = []
    swa_gluon = importlib.import_module("kernels.sliding_window_attention_gluon")
    if swa_gluon.AVAILABLE:
        g = dict(swa_gluon.CONFIG)
        gluon_warps = g.pop("num_warps")
        gluon_fwd = {"module": "kernels.sliding_window_attention_gluon", "kernel": "_gluon_fwd",
                     "num_warps": gluon_warps,
                     "args": {"q_desc": f"gluon_tensordesc<bf16[1, {g['BLOCK_M']}, {HEAD_DIM}]>",
                              **{arg: f"gluon_tensordesc<bf16[1, {g['BLOCK_N']}, {HEAD_DIM}]>"
                                 for arg in ("k_desc", "v_desc")},
                              "doc_ptr": "*i32", "order_ptr": "*i32", "ranges_ptr": "*i32", "o_ptr": "*bf16",
                              "lse_ptr": "*fp32", "T": t, "window": WINDOW, "scale_log2": scales["scale_log2"],
                              **{f"stride_o{axis}": strides[axis] for axis in "bth"}, "stride_docb": t,
                              "HAS_DOCS": True, "HEAD_DIM": HEAD_DIM, "WINDOW_BLOCK": 128, **g}}
        ranges = {"module": "kernels.sliding_window_attention_gluon", "kernel": "_fwd_ranges", "num_warps": 4,
                  "args": {"doc_ptr": "*i32", "ranges_ptr": "*i32", "T": t, "window": WINDOW, "stride_docb": t,
                           "HAS_DOCS": True, "SCAN": swa.SCAN_CHUNK, "WINDOW_BLOCK": 128, **g}}
        gluon_kernels = [
            Kernel("gluon _gluon_fwd", "forward (opt-in, FORWARD = 'gluon'): QK^T of the next key block and PV "
                   "of this one in flight across the softmax", "triton",
                   ctas=triton.cdiv(t, g["BLOCK_M"]) * HEADS, spec=gluon_fwd, runs_in_speedrun=False),
            Kernel("triton _fwd_ranges", "key-block ranges and work per query block, before the Gluon forward",
                   "triton", ctas=triton.cdiv(t, g["BLOCK_M"]), spec=ranges, runs_in_speedrun=False),
        ]

    return Op("sliding_window_attention", f"B=1, T={t}, {HEADS} heads x {HEAD_DIM}, window {WINDOW}, "
              "FineWeb-like documents (the bench's), bf16, forward+backward",
              bytes=0, flops=bench.flops(pairs, "fwd+bwd", HEADS, HEAD_DIM), flop_kind="bf16",
              bench_case=bench.case_name("fwd+bwd", t, WINDOW), kernels=[
        Kernel("triton _sliding_window_attn_fwd", "forward: online softmax over visible key blocks", "triton",
               ctas=grid("fwd", "BLOCK_M"), spec=fwd),
        Kernel("triton _block_work", "key blocks per query block, for the longest-first launch order "
               "(once per forward, dQ and, per key block, dK/dV)", "triton",
               ctas=triton.cdiv(t, fwd_blocks["BLOCK_M"]), spec=work),
        Kernel("triton _sliding_window_attn_bwd_dq", "dQ per query block, and delta = rowsum(dO * O)", "triton",
               ctas=grid("dq", "BLOCK_M"), spec=dq),
        Kernel("triton _sliding_window_attn_bwd_dkdv", "dK, dV per key block", "triton",
               ctas=grid("dkdv", "BLOCK_N"), spec=dkdv),
        *gluon_kernels,
    ], notes=[f"{pairs / 1e6:.1f} M visible (query, key) pairs per head; FLOPs 14 D per pair and head "
              "(fwd+bwd, bench formula); compute-bound (~400 FLOP/B), so no memory floor is given"])


FAMILIES = {"softcap_ce": softcap_ce, "fp8_head": fp8_head, "newton_schulz": newton_schulz,
            "relu2_mlp": relu2_mlp, "sliding_window_attention": sliding_window_attention}
