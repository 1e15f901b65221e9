"""Static performance evidence (bench/static): the AOT helper's specialization, the SASS
reader, and the budgets that the compiled code of every kernel is held to.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.hopper_aot import compile_for_hopper

# ---- tests/hopper_aot.py specializes as the JIT does ------------------------------------

SCALE_ROWS = {"module": "kernels.softcap_ce", "kernel": "_scale_rows_kernel", "num_warps": 16}


def _ptx_params(ptx: str) -> list[str]:
    return re.findall(r"\.param \.\w+ \.ptr \.global \.align \d+ (\w+)|\.param \.\w+ (\w+)", ptx)


def test_aot_hints_follow_argument_names_not_spec_order():
    # The signature listed in an order unlike the kernel's (grad_ptr, factor_ptr, n_cols,
    # factor_stride): hints must land on the named arguments.
    scrambled = {"n_cols": "i32", "factor_stride": "i32", "factor_ptr": "*fp32", "grad_ptr": "*bf16"}
    aligned, misaligned = compile_for_hopper([
        {**SCALE_ROWS, "signature": scrambled, "constexprs": {"BLOCK": 4096},
         "divisible_by_16": ["grad_ptr", "n_cols"]},
        {**SCALE_ROWS, "signature": scrambled, "constexprs": {"BLOCK": 4096}, "divisible_by_16": ["n_cols"]},
    ])
    assert aligned["divisible_by_16"] == ["grad_ptr", "n_cols"]
    assert misaligned["divisible_by_16"] == ["n_cols"]
    # What the hints buy: 16-byte vector accesses to the gradient only when it is aligned.
    assert re.search(r"st\.global\S*\.v4\.b32", aligned["ptx"])
    assert not re.search(r"st\.global\S*\.v4", misaligned["ptx"])


def test_aot_specializes_values_like_the_jit():
    # factor_stride = 1 becomes a constant (one parameter less), 50304 and aligned pointers
    # get divisibility hints (0 too: the JIT tests value % 16), a misaligned pointer and
    # 50301 do not.
    one, other = compile_for_hopper([
        {**SCALE_ROWS, "args": {"grad_ptr": "*bf16", "factor_ptr": "*fp32", "n_cols": 50304, "factor_stride": 1,
                                "BLOCK": 4096}},
        {**SCALE_ROWS, "args": {"BLOCK": 4096, "factor_stride": 0, "n_cols": 50301, "factor_ptr": "*fp32",
                                "grad_ptr": {"ptr": "bf16", "aligned": False}}},
    ])
    assert one["specialized_to_constexpr"] == {"factor_stride": 1}
    assert one["divisible_by_16"] == ["factor_ptr", "grad_ptr", "n_cols"]
    assert list(one["signature"]) == ["grad_ptr", "factor_ptr", "n_cols"]
    assert len(_ptx_params(one["ptx"])) == len(_ptx_params(other["ptx"])) - 1
    assert other["specialized_to_constexpr"] == {}
    assert other["divisible_by_16"] == ["factor_ptr", "factor_stride"]
    assert other["signature"]["factor_stride"] == "i32"


def test_aot_rejects_unknown_argument_names():
    with pytest.raises(RuntimeError, match="has no arguments \\['factor'\\]"):
        compile_for_hopper([{**SCALE_ROWS, "args": {"grad_ptr": "*bf16", "factor": "*fp32", "n_cols": 16,
                                                   "factor_stride": 1, "BLOCK": 4096}}])


# ---- budgets on the committed static records (bench/results/static) ----------------------
# A budget changes only together with the design note that states it, and the commit says why.

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "static"
OPS = ("softcap_ce", "fp8_head", "newton_schulz", "relu2_mlp", "sliding_window_attention")

# Spills known today, each with the reason and the work that removes it; any other spill fails.
KNOWN_SPILLS = {}
# Kernels whose design keeps wgmma groups in flight across the K loop's waits.
OVERLAP_CLAIMED = {
    # dx and dW promote to fp32 after every k-block (wait_group 0): test_fp8_head_* below.
    ("fp8_head", "cuda fp8_gemm<e4m3,bf16> (y)"): "bench/NOTES.md fp8_head: one k-block of wgmma kept in flight",
}
# Per-element budgets of the softcap CE (bench/NOTES.md softcap_ce).  The op runs the v2
# staged kernel: 4 MUFU ops per element by design (ex2, rcp, ex2 in the loss pass, one ex2
# in the gradient pass; tests/test_softcap_ce.py holds its hot loops to 25 instructions and
# 4 MUFU), 18 instructions today.  v1 (cached, now a fallback) stays at its issue-13 numbers;
# the Triton kernel in both configurations: long rows (two sweeps) and ONE_READ.
CE_BUDGET = {"cuda softcap_ce_staged<bf16,sigmoid>": {"instructions_per_element": 25.0, "mufu_per_element": 4.0},
             "cuda softcap_ce_cached<bf16,7>": {"instructions_per_element": 85.0, "mufu_per_element": 6.6},
             "triton _softcap_ce_forward_kernel (long rows)": {"instructions_per_element": 60.0,
                                                               "mufu_per_element": 6.0},
             "triton _softcap_ce_forward_kernel (ONE_READ)": {"instructions_per_element": 48.0,
                                                              "mufu_per_element": 4.1}}


def _records():
    return {op: json.loads((RESULTS / f"{op}.json").read_text()) for op in OPS}


def _kernels():
    return [(op, k) for op, record in _records().items() for k in record["kernels"]]


def test_no_spills_beyond_the_known_ones():
    for op, kernel in _kernels():
        allowed = KNOWN_SPILLS.get((op, kernel["name"]), (0, ""))[0]
        assert kernel["spill_bytes"] <= allowed, (op, kernel["name"], kernel["spill_bytes"])
        assert kernel["local_accesses"] == 0 or allowed, (op, kernel["name"])


def test_every_kernel_fits_an_sm_and_the_designs_occupancy_holds():
    for op, kernel in _kernels():
        assert kernel["ctas_per_sm"] >= 1, (op, kernel["name"])
    records = {(op, k["name"]): k for op, k in _kernels()}
    # csrc/softcap_ce.cu v2: 512 threads, __launch_bounds__(512, 2), the row in shared
    # memory; two such CTAs must fit an SM, or the persistent grid of 2 x 132 would queue.
    ce = records[("softcap_ce", "cuda softcap_ce_staged<bf16,sigmoid>")]
    assert ce["threads"] == 512 and ce["ctas_per_sm"] == 2 and ce["ctas"] == 2 * 132 and ce["runs_in_speedrun"]
    # The Triton long-row grid: 2 programs per SM (kernels/softcap_ce.py PROGRAMS_PER_SM),
    # each resident, so the rows in flight are the 264 that L2 holds.
    triton = records[("softcap_ce", "triton _softcap_ce_forward_kernel (long rows)")]
    assert triton["ctas"] == 2 * 132 and triton["ctas_per_sm"] >= 2
    for gemm in OVERLAP_CLAIMED:  # __launch_bounds__(384, 1): one persistent CTA per SM
        assert records[gemm]["ctas_per_sm"] == 1 and records[gemm]["threads"] == 384


def test_softcap_ce_per_element_budget():
    records = {k["name"]: k for op, k in _kernels() if op == "softcap_ce"}
    for name, budget in CE_BUDGET.items():
        for key, limit in budget.items():
            assert records[name][key] <= limit, (name, key, records[name][key])


def test_wgmma_overlap_where_the_design_claims_it():
    records = {(op, k["name"]): k for op, k in _kernels()}
    for key, why in OVERLAP_CLAIMED.items():
        assert records[key]["wgmma_in_flight"] >= 1, (key, why)


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda").exists(),
                    reason="the CUDA kernels' reading needs nvcc")
@pytest.mark.parametrize("op", OPS)
def test_committed_records_are_current(op):
    # Any change to a kernel, its config or the toolchain changes the record: regenerate
    # with `python -m bench.static` and commit the result with the change.
    from bench.static import families, report
    fresh = json.loads(json.dumps(report.op_record(families.FAMILIES[op]())))
    assert fresh == json.loads((RESULTS / f"{op}.json").read_text()), \
        f"bench/results/static/{op}.json is stale: run `python -m bench.static --only {op}` and commit it"


def test_fp8_head_row_stats_epilogue_keeps_two_ctas_per_sm_without_spills():
    """The fused head's Triton y GEMM with the loss's partial sums in its epilogue
    (kernels/fp8_head.py, maxnreg 128): at 2 CTAs/SM one CTA's exponentials can run under
    the other's wgmma; at the 133 registers it would take unbounded, only one CTA fits."""
    records = {(op, k["name"]): k for op, k in _kernels()}
    plain = records[("fp8_head", "triton _fp8_gemm_kernel (y)")]
    stats = records[("fp8_head", "triton _fp8_gemm_kernel (y + row stats)")]
    assert stats["registers"] <= 128 and stats["spill_bytes"] == 0 and stats["local_accesses"] == 0
    assert stats["ctas_per_sm"] == plain["ctas_per_sm"] == 2
    assert stats["mma"] == plain["mma"]  # the mainloop is unchanged


# ---- relu2_mlp (issue 18 item 3; bench/NOTES.md ## relu2_mlp) ------------------------------

def _relu2_mlp_record(suffix: str) -> dict:
    return next(k for k in _records()["relu2_mlp"]["kernels"] if k["name"].endswith(suffix))


def test_relu2_mlp_forward_has_4_stages_and_dpre_3_within_shared_memory():
    # 4 x 48 KiB of A/B stages + the 32 KiB store buffer fit the 227 KiB of one CTA; the
    # dpre kernel's aux half tile (32 KiB more) would not, so it keeps 3 stages.
    forward, dpre = _relu2_mlp_record("(h = relu(x W1^T)^2)"), _relu2_mlp_record("(dpre)")
    assert forward["specialization"]["num_stages"] == 4 and dpre["specialization"]["num_stages"] == 3
    for kernel in (forward, dpre):
        assert kernel["smem_bytes"] <= 227 * 1024 and kernel["ctas_per_sm"] == 1, kernel["name"]
        assert kernel["spill_bytes"] == 0 and kernel["local_accesses"] == 0 and kernel["registers"] <= 255


def test_relu2_mlp_fp8_forward_is_an_e4m3_wgmma_kernel_like_the_bf16_one():
    fp8, bf16 = _relu2_mlp_record("(fp8 h = relu(s x8 W1_8^T)^2)"), _relu2_mlp_record("(h = relu(x W1^T)^2)")
    assert list(fp8["mma"]) == ["QGMMA.64x256x32.F32.E4M3.E4M3"]  # fp8 operands straight into wgmma
    assert fp8["specialization"]["num_stages"] == 4 and fp8["smem_bytes"] == bf16["smem_bytes"]
    assert fp8["spill_bytes"] == 0 and fp8["registers"] <= 255


def test_relu2_mlp_dpre_prefetches_the_aux_tile_before_the_epilogue_wait():
    # The aux (h) tile's DRAM read must start under the K loop, not after it: in the main
    # (flattened tile x K) loop, every L2 prefetch (CCTL.E.PF2) comes before the wgmma
    # wait-for-all that opens the epilogue, which comes before the aux tile's TMA load.
    from bench.static import build, families, sass
    kernel = next(k for k in families.relu2_mlp().kernels if k.name.endswith("(dpre)"))
    (cubin, meta), = build.triton_cubins([kernel.spec])
    instrs = sass.sass(str(cubin))[meta["name"]]
    last_exit = max(i.addr for i in sass.code(instrs) if i.base == "EXIT")
    # Loops that close after the last EXIT are the mbarrier try-wait retries placed at the end.
    main = [span for span in sass.loops(instrs) if span[1] < last_exit
            and any(i.base == "HGMMA" for i in sass.within(instrs, span))]
    assert len(main) == 1, main
    body = sass.within(instrs, main[0])
    prefetches = [i.addr for i in body if i.op == "CCTL.E.PF2"]
    epilogue_wait = min(i.addr for i in body if i.op.startswith("WARPGROUP.DEPBAR") and i.operands[-1] == "0x0")
    aux_load = min(i.addr for i in body if i.base == "UTMALDG" and i.addr > epilogue_wait)
    assert len(prefetches) == 128 * 256 * 2 // 128 // 256  # one per 128-byte line, 2 per thread
    assert max(prefetches) < epilogue_wait < aux_load
    assert sass.resources(str(cubin))[meta["name"]]["local_bytes"] == 0


def test_newton_schulz_matmuls_fit_two_ctas_per_sm_without_spills():
    # bench/NOTES.md newton_schulz (issue 18): at 768 x 3072 every matmul kernel, step 1
    # included (it reads the bf16 copy X0 that _sumsq_kernel writes, not the fp32 G), keeps
    # 3 stages of 128x128x64 bf16 tiles in <= 113 KB of shared memory and <= 128 registers
    # per thread, so two 256-thread CTAs share an SM; each keeps one wgmma group in flight.
    matmuls = [k for op, k in _kernels() if op == "newton_schulz" and k["mma"]]
    assert len(matmuls) == 5, [k["name"] for k in matmuls]
    for kernel in matmuls:
        name = kernel["name"]
        assert kernel["threads"] == 256 and kernel["ctas_per_sm"] == 2, (name, kernel["ctas_per_sm"])
        assert kernel["registers"] <= 128 and kernel["smem_bytes"] <= 113 * 1024, name
        assert kernel["spill_bytes"] == 0 and kernel["local_accesses"] == 0, name
        assert kernel["wgmma_in_flight"] >= 1, name


# ---- fp8_head: promotion of the fp8 accumulation (issue 16) ---------------------------------

def _fp8_records():
    return {k["name"]: k for k in _records()["fp8_head"]["kernels"]}


def _k_loop(instrs):
    """The innermost loop that issues wgmma: the K loop."""
    from bench.static import sass
    loops = [span for span in sass.innermost(sass.loops(instrs))
             if any(i.base == "QGMMA" for i in sass.within(instrs, span))]
    assert len(loops) == 1, loops
    return sass.within(instrs, loops[0])


def test_fp8_head_backward_gemms_run_promoted_and_y_fast():
    records = _fp8_records()
    for name in ("cuda fp8_gemm<e5m2,bf16,promoted> (dx)", "cuda fp8_gemm<e5m2,fp32,promoted> (dW)"):
        k = records[name]
        # 4 x m64n128k32 per k-block of 128, each block waited for (0 in flight) before its FADDs.
        assert k["runs_in_speedrun"] and k["mma"] == {"QGMMA.64x128x32.F32.E5M2.E4M3": 4}, name
        assert k["wgmma_in_flight"] == 0 and k["ctas_per_sm"] == 1 and k["spill_bytes"] == 0, name
    y = records["cuda fp8_gemm<e4m3,bf16> (y)"]
    assert y["runs_in_speedrun"] and y["mma"] == {"QGMMA.64x256x32.F32.E4M3.E4M3": 28}
    assert records["triton _fp8_gemm_kernel (dx, promoted)"]["specialization"]  # compiled with the argument


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda").exists(),
                    reason="the CUDA kernels' reading needs nvcc")
def test_fp8_head_sass_adds_each_k_block_into_fp32_between_qgmma_groups():
    # The promotion as compiled: in the K loop of every promoted instance, after the k-block's
    # 4 QGMMAs and the wait for them, one FADD per accumulator (64 per thread for m64n128)
    # before the loop branches back to the next k-block's QGMMAs; none in the fast instances.
    from bench.static import build, sass
    functions = sass.sass(str(build.cuda_cubin("fp8_head.cu")))
    gemms = {name: sass.code(instrs) for name, instrs in functions.items() if "fp8_gemm_kernel" in name}
    assert len(gemms) == 8, sorted(gemms)  # (A e4m3 | e5m2) x (bf16 | fp32) x (fast | promoted)
    for name, instrs in gemms.items():
        body = _k_loop(instrs)
        ops = [i.base for i in body]
        last_mma = max(n for n, op in enumerate(ops) if op == "QGMMA")
        if re.search(r"Lb1EEEv", name):  # kPromote = true
            assert ops.count("QGMMA") == 4, name
            after = ops[last_mma:]
            assert "FADD" in after and "WARPGROUP" in after[:after.index("FADD")], name  # the wait comes first
            assert after.count("FADD") == 64 and ops.count("FADD") == 64, name
        else:
            assert ops.count("FADD") == 0, name


def test_fp8_head_triton_gemm_promotes_with_max_num_imprecise_acc():
    # Triton 3.8 lowers tl.dot(max_num_imprecise_acc=128) with BLOCK_K = 128 to a partial
    # wgmma accumulator added into the loop's fp32 one once per iteration: 64 FADDs per
    # thread for a 128 x 128 tile over 2 warpgroups; the default (None: 2**30 on sm_90)
    # adds nothing.
    from bench.static import build, families, sass
    kernels = {k.name: k for k in families.fp8_head().kernels if k.backend == "triton"}
    names = ("triton _fp8_gemm_kernel (y)", "triton _fp8_gemm_kernel (dx, promoted)")
    compiled = build.triton_cubins([kernels[n].spec for n in names])
    for name, (cubin, meta) in zip(names, compiled):
        body = _k_loop(sass.code(sass.sass(str(cubin))[meta["name"]]))
        fadds = sum(1 for i in body if i.base == "FADD")
        assert fadds == (64 if "promoted" in name else 0), (name, fadds)


def test_fp8_head_y_epilogue_is_a_tma_store():
    # y (fast, bf16 out) stages its tile in shared memory and sends it with 4 TMA stores per
    # consumer warpgroup (UTMASTG, one per 64 x 64 box) while the next tile's loop runs;
    # the register path stays for unaligned outputs.  The fp32 / promoted instances have
    # no TMA store.
    records = _fp8_records()
    y = records["cuda fp8_gemm<e4m3,bf16> (y)"]
    assert y["tma_stores"] == 4 and y["smem_bytes"] <= 227 * 1024 and y["ctas_per_sm"] == 1
    for name in ("cuda fp8_gemm<e5m2,bf16,promoted> (dx)", "cuda fp8_gemm<e5m2,fp32,promoted> (dW)",
                 "cuda fp8_gemm<e5m2,fp32>"):
        assert records[name]["tma_stores"] == 0, name


# ---- sliding_window_attention (issue 17, bench/NOTES.md sliding_window_attention) ---------

ATTENTION_KERNELS = ("_sliding_window_attn_fwd", "_sliding_window_attn_bwd_dkdv", "_sliding_window_attn_bwd_dq")


def _attention_records():
    return {k["name"].removeprefix("triton "): k for op, k in _kernels() if op == "sliding_window_attention"}


def test_sliding_window_attention_tiles_arrive_by_tma_and_nothing_spills():
    # Q, K, V and dO tiles come through TMA descriptors: no per-thread addresses in the
    # pipeline, which is what made the pointer kernels spill at 64-query dK/dV blocks.
    records = _attention_records()
    for name in ATTENTION_KERNELS:
        kernel = records[name]
        assert kernel["tma_loads"] > 0, name
        assert kernel["spill_bytes"] == 0 and kernel["local_accesses"] == 0, (name, kernel["spill_bytes"])
        assert kernel["ctas_per_sm"] >= 1 and any(mma.startswith("HGMMA") for mma in kernel["mma"]), name


def test_sliding_window_attention_dkdv_walks_query_blocks_of_at_least_64_rows():
    # The record is current (test_committed_records_are_current), so it was built with these.
    import importlib
    swa = importlib.import_module("kernels.sliding_window_attention")
    for head_dim, configs in swa.CONFIGS.items():
        assert configs["dkdv"]["BLOCK_M"] >= 64, head_dim



# ---- fp8_head: 2-CTA clusters with TMA multicast for the promoted tiles (issue 16) --------

@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda").exists(),
                    reason="the CUDA kernels' reading needs nvcc")
def test_fp8_head_promoted_gemm_multicasts_b_across_a_2_cta_cluster():
    # As compiled (csrc/fp8_head.cu header, "Clusters"): every promoted instance loads A
    # alone and its B slice with a multicast TMA load in the K loop, releases each stage to
    # both CTAs of the cluster (remote mbarrier arrives) without a GPU-scope fence per
    # arrival, and syncs the cluster (barrier.cluster) once at start and once at exit; the
    # fast instances have none of it.  Registers, shared memory and spills as before.
    from bench.static import build, families, sass
    assert families.csrc_constants("fp8_head.cu")["kClusterPromoted"] == 2  # the design, not the comparison
    functions = sass.sass(str(build.cuda_cubin("fp8_head.cu")))
    gemms = {name: sass.code(instrs) for name, instrs in functions.items() if "fp8_gemm_kernel" in name}
    assert len(gemms) == 8, sorted(gemms)
    for name, instrs in gemms.items():
        ops = [i.op for i in instrs]
        loop = [i.op for i in _k_loop(instrs)]  # the consumers'
        cluster_ops = sum(op.startswith("UCGABAR") for op in ops)
        if re.search(r"Lb1EEEv", name):  # kPromote = true
            # The producer's k-block loop is unrolled (with one elected-issue loop per TMA
            # instruction): each copy loads its A tile alone and its B slice by multicast.
            assert ops.count("UTMALDG.2D.MULTICAST") == ops.count("UTMALDG.2D") > 0, name
            assert any(op.startswith("SYNCS.ARRIVE.TRANS64.RED") for op in loop), name  # remote release
            assert "MEMBAR.ALL.GPU" not in loop, name
            assert ops.count("UCGABAR_ARV") == 2 and ops.count("UCGABAR_WAIT") == 2, name
        else:
            assert cluster_ops == 0 and not any("MULTICAST" in op for op in ops), name
    records = _fp8_records()
    for name in ("cuda fp8_gemm<e5m2,bf16,promoted> (dx)", "cuda fp8_gemm<e5m2,fp32,promoted> (dW)"):
        k = records[name]
        assert k["registers"] == 168 and k["spill_bytes"] == 0 and k["local_accesses"] == 0, name
        assert k["smem_bytes"] == 198752 and k["ctas_per_sm"] == 1 and k["ctas"] % 2 == 0, name


# ---- fp8_head: the e5m2 gradient in the cuda loss pass (issue 15 item 2) --------------------

def test_fp8_head_e5m2_loss_pass_keeps_the_staged_kernels_occupancy_and_mufu():
    """The staged CE kernel's kE5M2 instance (the fused head's loss pass on cuda) must keep
    what the bf16 one has: 2 CTAs/SM of 512 threads with the row in shared memory (two rows
    in flight per SM), no spill, 4 MUFU per element, and within its instruction budget."""
    records = {(op, k["name"]): k for op, k in _kernels()}
    e5m2 = records[("fp8_head", "cuda softcap_ce_staged<bf16,sigmoid,e5m2>")]
    bf16 = records[("softcap_ce", "cuda softcap_ce_staged<bf16,sigmoid>")]
    assert e5m2["runs_in_speedrun"] and e5m2["threads"] == 512
    assert e5m2["ctas_per_sm"] == bf16["ctas_per_sm"] == 2 and e5m2["ctas"] == 2 * 132
    assert e5m2["spill_bytes"] == 0 and e5m2["local_accesses"] == 0
    assert e5m2["mufu_per_element"] == bf16["mufu_per_element"] == 4.0
    assert e5m2["instructions_per_element"] <= E5M2_LOSS_PASS_BUDGET, e5m2["instructions_per_element"]
    # g8 leaves as 8-byte stores (8 e5m2 bytes per 16-byte pack of the row), never bytes in the loop.
    assert "8B" in e5m2["global_stores"]


# bench/NOTES.md fp8_head, "The e5m2 gradient in the cuda loss pass".
E5M2_LOSS_PASS_BUDGET = 34.0  # 33.75 static, 24.0 executed: the overflow path is counted


def test_fp8_head_g8_transpose_moves_16_bytes_per_access():
    """g8^T (4.95 GB of traffic per step) by 16-byte loads and stores only: a byte-wide
    store would cost 16x the store instructions and partial sectors."""
    k = _fp8_records()["cuda transpose_bytes"]
    assert k["runs_in_speedrun"] and k["spill_bytes"] == 0
    assert k["global_loads"] == {"16B": 1} and k["global_stores"] == {"16B": 1}
    assert k["ctas_per_sm"] >= 2  # several tiles in flight per SM to cover DRAM latency
    ce_grad = _fp8_records()["cuda ce_grad_e5m2"]
    assert not ce_grad["runs_in_speedrun"]  # the speedrun's mean loss writes g8 in the forward


def test_sliding_window_attention_gluon_forward_softmax_runs_with_a_wgmma_group_in_flight():
    # Issue 17's overlap, in the Gluon forward's key-block loops (partial blocks, full blocks,
    # partial blocks) as ptxas left them: exactly two wgmma waits per step (ptxas did not
    # serialize the wgmma, which adds a wait per HGMMA); the first leaves one group (PV of
    # this block) in flight and all 64 exponentials of the 128 x 128 score tile (per thread)
    # come after it and before the second, which waits for all.  ptxas is free to hoist that
    # second wait above the exponentials and did so in earlier versions (bench/NOTES.md): this
    # reads where it is.  The record's wgmma_in_flight is the fewest at any wait in a loop: 0.
    import importlib
    from bench.static import build, families, sass
    if not importlib.import_module("kernels.sliding_window_attention_gluon").AVAILABLE:
        pytest.skip("this triton has no Gluon Hopper API")
    kernel = next(k for k in families.sliding_window_attention().kernels if k.name == "gluon _gluon_fwd")
    (cubin, meta), = build.triton_cubins([kernel.spec])
    instrs = sass.code(sass.sass(str(cubin))[meta["name"]])
    last_exit = max(i.addr for i in instrs if i.base == "EXIT")
    # Loops that close after the last EXIT are the mbarrier try-wait retries placed at the end.
    loops = [span for span in sass.loops(instrs) if span[1] < last_exit
             and any(i.base == "HGMMA" for i in sass.within(instrs, span))]
    assert len(loops) == 3, loops
    for span in loops:
        body = sass.within(instrs, span)
        waits = [(i.addr, int(i.operands[-1], 0)) for i in body if i.op.startswith("WARPGROUP.DEPBAR")]
        assert [count for _, count in waits] == [1, 0], (span, waits)
        exps = [i.addr for i in body if i.op.startswith("MUFU.EX2")]
        assert sum(waits[0][0] < addr < waits[1][0] for addr in exps) >= 64, (span, waits)
        assert any(i.base == "UTMALDG" for i in body), span  # K and V of later blocks arrive meanwhile
    record = _attention_records()["gluon _gluon_fwd"]
    assert record["spill_bytes"] == 0 and record["local_accesses"] == 0 and record["wgmma_in_flight"] == 0
    assert record["tma_loads"] > 0 and not record["runs_in_speedrun"]  # opt-in until its GPU tests pass


# ---- predicted beside measured (issue 13) -------------------------------------------------

def _default_cases(stem: str) -> list[str]:
    """The case names a default `python -m bench` run of the family writes."""
    import importlib
    b = importlib.import_module(f"bench.bench_{stem}")
    return {
        "softcap_ce": lambda: [b.case_name(mode, n, b.DEFAULT_V) for mode in b.MODES for n in b.DEFAULT_N],
        "fp8_head": lambda: [b.gemm_case(g, m) for g in b.GEMMS for m in b.DEFAULT_M],
        "newton_schulz": lambda: [b.case_name(s) for s in b.SETS],
        "relu2_mlp": lambda: [b.case_name(mode, m, b.DEFAULT_D, b.DEFAULT_H) for mode in b.MODES for m in b.DEFAULT_M],
        "sliding_window_attention": lambda: [b.case_name(mode, t, w) for mode in b.MODES for t in b.DEFAULT_T
                                             for w in b.DEFAULT_WINDOWS],
    }[stem]()


@pytest.mark.parametrize("op", OPS)
def test_the_predicted_case_is_one_the_bench_measures(op):
    record = json.loads((RESULTS / f"{op}.json").read_text())
    assert record["bench_case"] in _default_cases(op)
    from bench import harness
    assert record["kernel_sources"] == harness.kernel_sources(op)  # else regenerate: the kernels changed


def _fake_results(root: Path, op: str, case: str, sha: str, device: str = "Fake GPU") -> Path:
    path = root / device.lower().replace(" ", "-") / f"{op}.json"
    path.parent.mkdir(parents=True)
    entries = [{"case": case, "impl": "ours-cuda", "ms": 4.0}, {"case": case, "impl": "ours-triton", "ms": 3.6},
               {"case": case, "impl": "torch-compile", "ms": 7.2}, {"case": case, "impl": "torch-eager", "ms": None},
               {"case": "fwd N=1 V=2", "impl": "ours-cuda", "ms": 0.001}]
    path.write_text(json.dumps({"op": op, "complete": True, "results": entries, "metadata": {
        "device": device, "git_commit": "abc123" * 7, "git_dirty": False, "kernel_sources": {"sha256": sha}}}))
    return path


def test_measurements_of_the_same_sources_are_put_beside_the_prediction(tmp_path, monkeypatch):
    from bench.static import report
    record = json.loads((RESULTS / "softcap_ce.json").read_text())
    sha = record["kernel_sources"]["sha256"]
    monkeypatch.setattr(report, "OUT", tmp_path / "static")
    (tmp_path / "static").mkdir()
    _fake_results(tmp_path, "softcap_ce", record["bench_case"], sha)
    _fake_results(tmp_path, "softcap_ce", record["bench_case"], "0" * 64, device="Other GPU")  # other code
    [row] = report.measured_beside(record, results=tmp_path)
    assert (row["device"], row["ours"], row["ours_ms"]) == ("Fake GPU", "ours-triton", 3.6)
    assert (row["best_competitor"], row["competitor_ms"]) == ("torch-compile", 7.2)
    assert row["measured_over_predicted"] == round(3.6 / record["predicted_ms"], 3)
    assert row["results"] == "fake-gpu/softcap_ce.json"
    text = report.markdown({**record, "measured": [row]})
    assert f"| Fake GPU | abc123abc123 | ours-triton | 3.6 | {record['predicted_ms']} |" in text
    assert "Measured: none yet" in report.markdown({**record, "measured": []})
