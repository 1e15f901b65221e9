"""ReLU^2 MLP at the speedrun's shapes: ours (Triton GEMMs with relu^2 epilogues) against
the 2025-01 record's own formulation in torch eager and under torch.compile.

The record's MLP is `F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)` on bf16 x of
[M, D], M tokens per GPU (48*1024, 64*1024), D = 768, H = 3072.  It is compute-bound: six
M x D x H products per training step (two forward, four backward), 12 * M * D * H FLOPs
(1.39 TFLOP at M = 49152); throughput counts exactly those FLOPs and is compared with the
bf16 matmul peak measured at the start of the run.  The elementwise relu^2 and its
gradient are free in our kernels (GEMM epilogues) and cost memory passes elsewhere.

Modes:
  fwd+bwd  y = mlp(x, w_fc, w_proj); torch.autograd.grad(y, (x, w_fc, w_proj), g) -- the
           training step, the headline.
  fwd      under torch.no_grad() -- evaluation.

Implementations:
  ours-triton       kernels.relu2_mlp (backend triton): fused relu^2 GEMM and fused dpre
                    GEMM in Triton; y, dx, dW1, dW2 on cuBLAS (the default).
  ours-triton-all   the same with y and dx also on the Triton GEMM (plain_gemm("triton")).
  ours-fp8          kernels.relu2_mlp_fp8: the first product in e4m3 with amax/448 per-tensor
                    scales (the current modded-nanogpt record's FP8 MLP forward), the rest as
                    ours-triton; checked against eager with FP8_TOL instead of TOL.
  torch-eager       the record's formulation.
  torch-compile     the same under torch.compile(dynamic=False), default mode.
  torch-compile-max-autotune  (not in the default list: minutes of autotuning per shape)

Before timing, each implementation is checked against torch eager (relative Frobenius
error of y and of each gradient).  `python -m bench.bench_relu2_mlp --help` for options.

`--dw` times the two weight-gradient products (dW2 = g^T h, dW1 = dpre^T x: K = M, a
3072 x 768 output) on cuBLAS against an explicit split-K (DW_SPLITS): the check of
cuBLAS's split-K choice for the products that stay on it.

`--sweep` instead times the single products at the same shapes -- the fused forward GEMM
(x W1^T with the relu^2 epilogue), the fused dpre GEMM and the plain y GEMM -- for each
tile configuration in SWEEP_CONFIGS and both kernel variants, beside cuBLAS on the same
product: the data for choosing kernels.relu2_mlp's defaults.
"""
from __future__ import annotations

import argparse
import importlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from bench import harness

OP = "relu2_mlp"
MODES = ("fwd+bwd", "fwd")
IMPLEMENTATIONS = ("ours-triton", "ours-triton-all", "ours-fp8", "torch-eager", "torch-compile")
OPTIONAL_IMPLEMENTATIONS = ("torch-compile-max-autotune",)
DEFAULT_M = (48 * 1024, 64 * 1024)
DEFAULT_D = 768
DEFAULT_H = 3072
SEED = 0
# Both sides round h, y and every gradient to bf16 (2**-8 relative per element) from fp32
# sums taken in different orders; ~4e-3 is typical, 2e-2 flags a real error.
TOL = 2e-2
# ours-fp8 quantizes x and w_fc to e4m3 (unit roundoff 2**-4): its outputs differ from the bf16
# MLP by ~5e-2 (tests/test_relu2_mlp.py derives the bounds); 2 * 2**-4 flags a real error.
FP8_TOL = 2 * 2.0 ** -4

NOTES = (
    "FLOPs counted: 4*M*D*H (fwd) and 12*M*D*H (fwd+bwd); the elementwise relu^2 work is not counted.",
    "Inputs: bf16 x ~ randn, w_fc ~ U(+-sqrt(3)*0.5*D**-0.5) as the model inits it, "
    f"w_proj ~ randn * H**-0.5 (the model's zero init would make the check vacuous), "
    f"upstream gradient ~ randn; seed {SEED}.",
    f"Checks against torch eager: rel_err = ||a - b||_F / ||b||_F per output; ok when all <= {TOL:g} "
    f"({FP8_TOL:g} for ours-fp8, whose e4m3 operands differ from bf16 by design).",
    "torch-compile: torch.compile(record_mlp, dynamic=False), default mode.",
)


def record_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The record's formulation, as the record (and speedrun/gpt/model.py's torch path) writes it."""
    return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)


def flops(m: int, d: int, h: int, mode: str) -> int:
    """Matmul FLOPs the mode must do: two products forward, four more backward."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return (12 if mode == "fwd+bwd" else 4) * m * d * h


# ---- implementations -----------------------------------------------------------------

def _ours(plain: str, op: str = "relu2_mlp") -> Callable | str:
    """kernels.<op> on the Triton backend with the plain products on `plain`, or why not."""
    try:
        import kernels
        module = importlib.import_module("kernels.relu2_mlp")
    except Exception as exc:  # a broken package must not stop the other implementations
        return f"import kernels failed: {harness.describe_error(exc)}"
    if kernels.backends()["triton"]["version"] is None:
        return "triton is not installed"

    def mlp(x, w_fc, w_proj):
        with kernels.use_backend("triton"), module.plain_gemm(plain):
            return getattr(kernels, op)(x, w_fc, w_proj)

    return mlp


def mlp_functions(impls) -> dict[str, Callable | str]:
    """impl name -> mlp(x, w_fc, w_proj), or a string saying why it cannot run."""
    builders = {
        "ours-triton": lambda: _ours("cublas"),
        "ours-triton-all": lambda: _ours("triton"),
        "ours-fp8": lambda: _ours("cublas", "relu2_mlp_fp8"),
        "torch-eager": lambda: record_mlp,
        "torch-compile": lambda: torch.compile(record_mlp, dynamic=False),
        "torch-compile-max-autotune": lambda: torch.compile(record_mlp, dynamic=False, mode="max-autotune-no-cudagraphs"),
    }
    return {impl: builders[impl]() for impl in impls}


def forward_backward(fn: Callable, x, w_fc, w_proj, upstream):
    # autograd.grad rather than backward(): nothing accumulates into .grad between runs.
    y = fn(x, w_fc, w_proj)
    return (y, *torch.autograd.grad(y, (x, w_fc, w_proj), upstream))


def forward_only(fn: Callable, x, w_fc, w_proj, upstream):
    with torch.no_grad():
        return (fn(x, w_fc, w_proj),)


def make_inputs(m: int, d: int, h: int, device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(SEED)
    bound = 3**0.5 * 0.5 * d**-0.5
    x = torch.randn(m, d, device=device, generator=gen).bfloat16()
    w_fc = (torch.rand(h, d, device=device, generator=gen) * 2 - 1).mul_(bound).bfloat16()
    w_proj = (torch.randn(d, h, device=device, generator=gen) * h**-0.5).bfloat16()
    upstream = torch.randn(m, d, device=device, generator=gen).bfloat16()
    return x, w_fc, w_proj, upstream


# ---- correctness ---------------------------------------------------------------------

OUTPUT_NAMES = ("y", "dx", "dw_fc", "dw_proj")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in fp64; NaN anywhere gives NaN."""
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    diff = (actual.double() - expected.double()).norm().item()
    norm = expected.double().norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def check(step: Callable, reference: tuple, on_cuda: bool, tol: float = TOL) -> tuple[dict, dict]:
    """Run step() once (for torch.compile: the compilation) and compare with eager."""
    if on_cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    outputs = step()
    checks = {f"{name}_rel_err": relative_error(out.detach(), ref)
              for name, out, ref in zip(OUTPUT_NAMES, outputs, reference)}
    checks["ok"] = all(value <= tol for value in checks.values())  # NaN compares False
    extra = {}
    if on_cuda:
        extra["working_mem_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
    return checks, extra


# ---- one shape -----------------------------------------------------------------------

def case_name(mode: str, m: int, d: int, h: int) -> str:
    """The case's name in the results (bench.static names its predicted case with it too)."""
    return f"{mode} M={m} D={d} H={h}"


def _check_and_time(impl: str, fn: Callable | str, mode: str, inputs: tuple, reference: tuple,
                    timer: Callable[[Callable], float], ceilings: dict) -> harness.Entry:
    x, w_fc, w_proj, upstream = inputs
    (m, d), h = x.shape, w_fc.shape[0]
    case = case_name(mode, m, d, h)
    common = dict(ceiling=harness.BF16_MATMUL, flops=flops(m, d, h, mode),
                  params={"mode": mode, "m": m, "d": d, "h": h, "dtype": "bfloat16"})
    if isinstance(fn, str):
        return harness.failed(case, impl, fn, **common)
    training = mode == "fwd+bwd"
    leaves = [t.detach().requires_grad_(training) for t in (x, w_fc, w_proj)]
    run_step = forward_backward if training else forward_only

    def step():
        return run_step(fn, *leaves, upstream)

    try:
        checks, extra = check(step, reference[: 4 if training else 1], on_cuda=x.is_cuda,
                              tol=FP8_TOL if impl == "ours-fp8" else TOL)
    except Exception as exc:  # out of memory, a kernel refusing the input, a compile error
        return harness.failed(case, impl, harness.describe_error(exc), **common)
    finally:
        harness.free_cuda_memory()
    errors = ", ".join(f"{k} {v:.2e}" for k, v in checks.items() if k.endswith("rel_err"))
    print(f"{case:<28} {impl:<16} check: {errors}{'' if checks['ok'] else '  MISMATCH (timed anyway)'}",
          flush=True)
    try:
        ms = timer(step)
    except Exception as exc:
        return harness.failed(case, impl, harness.describe_error(exc), checks=checks, extra=extra, **common)
    finally:
        harness.free_cuda_memory()
    return harness.measured(case, impl, ms, ceilings=ceilings, checks=checks, extra=extra, **common)


def run_shape(run: harness.BenchRun, *, m: int, d: int, h: int, modes, impls,
              timer: Callable[[Callable], float], device) -> None:
    """Check and time every (mode, implementation) at [m, d] x [h, d]; each becomes an entry."""
    inputs = make_inputs(m, d, h, device)
    leaves = [t.detach().requires_grad_() for t in inputs[:3]]
    reference = tuple(t.detach() for t in forward_backward(record_mlp, *leaves, inputs[3]))
    del leaves
    harness.free_cuda_memory()
    functions = mlp_functions(impls)
    for mode in modes:
        for impl in impls:
            run.add(_check_and_time(impl, functions[impl], mode, inputs, reference, timer, run.ceilings))
    del functions, inputs, reference
    torch._dynamo.reset()
    harness.free_cuda_memory()


# ---- config sweep (single products) -------------------------------------------------

SWEEP_CONFIGS = (
    {},                                                  # the default: 128x256x64, 8 warps, 4 stages (dpre 3)
    {"num_stages": 3},                                   # the forward's previous default
    {"BLOCK_M": 256, "BLOCK_N": 128},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
    {"GROUP_M": 16},
    {"FLATTEN": False},
    {"FLATTEN": False, "WARP_SPECIALIZE": True},
)


def config_label(config: dict, variant: str | None = None) -> str:
    parts = [f"{key}={value}" for key, value in config.items()] or ["default"]
    return " ".join(["ours", *parts, *([variant] if variant else [])])


def sweep_products(x, w_fc, w_proj, upstream):
    """name -> (torch_fn, our_fn(variant), (m, n, k)) for the three products the kernel serves."""
    module = importlib.import_module("kernels.relu2_mlp")
    h = module.gemm_nt(x, w_fc, module.EPI_RELU2)
    w_proj_t = w_proj.T.contiguous()
    (m, d), hidden = x.shape, w_fc.shape[0]
    return {
        "fwd relu2 GEMM": (lambda: torch.relu(x @ w_fc.T).square(),
                           lambda variant: module.gemm_nt(x, w_fc, module.EPI_RELU2, variant=variant),
                           (m, hidden, d)),
        "bwd dpre GEMM": (lambda: 2 * (upstream @ w_proj) * torch.sqrt(h),
                          lambda variant: module.gemm_nt(upstream, w_proj_t, module.EPI_RELU2_BWD, h, variant=variant),
                          (m, hidden, d)),
        "plain y GEMM": (lambda: h @ w_proj.T,
                         lambda variant: module.gemm_nt(h, w_proj, variant=variant),
                         (m, d, hidden)),
    }


def _sweep_trial(run: harness.BenchRun, case: str, label: str, step: Callable, expected: torch.Tensor,
                 timer: Callable[[Callable], float], common: dict) -> None:
    """One trial of a sweep: checked against `expected`, then timed; a trial that raises (a
    config that does not fit shared memory or registers, a split that does not divide M,
    out of memory) is recorded as failed and the sweep goes on."""
    try:
        error = relative_error(step(), expected)
        ms = timer(step)
    except Exception as exc:
        run.add(harness.failed(case, label, harness.describe_error(exc), **common))
        return
    finally:
        harness.free_cuda_memory()
    run.add(harness.measured(case, label, ms, ceilings=run.ceilings, **common,
                             checks={"rel_err": error, "ok": error <= TOL}))


def run_sweep(run: harness.BenchRun, *, m: int, d: int, h: int, timer: Callable[[Callable], float],
              device, configs=SWEEP_CONFIGS) -> None:
    """Time each product on cuBLAS (plus torch's pointwise ops where there is an epilogue) and
    on our kernel under every config (TMA variant where available) and the default pointer one."""
    module = importlib.import_module("kernels.relu2_mlp")
    x, w_fc, w_proj, upstream = make_inputs(m, d, h, device)
    for name, (torch_fn, our_fn, (pm, pn, pk)) in sweep_products(x, w_fc, w_proj, upstream).items():
        case = f"{name} M={pm} N={pn} K={pk}"
        common = dict(ceiling=harness.BF16_MATMUL, flops=2 * pm * pn * pk,
                      params={"product": name, "m": pm, "n": pn, "k": pk, "dtype": "bfloat16"})
        expected = torch_fn()
        trials = [("torch (cuBLAS + pointwise)", {}, None, torch_fn)]
        trials += [(config_label(config), config, None, our_fn) for config in configs]
        trials.append((config_label({}, "pointer"), {}, "pointer", our_fn))
        for label, config, variant, fn in trials:
            def step(fn=fn, config=config, variant=variant):
                if fn is torch_fn:
                    return fn()
                with module.tile_config(**config):
                    return fn(variant)
            _sweep_trial(run, case, label, step, expected, timer, common)
    del x, w_fc, w_proj, upstream
    harness.free_cuda_memory()


# ---- weight gradients: cuBLAS against explicit split-K -----------------------------------

# dW1 = dpre^T x and dW2 = g^T h reduce over the M tokens into small outputs (3072 x 768:
# 72 tiles of 128 x 256 for 132 SMs), so a GEMM that gives one output tile to one SM leaves
# SMs idle unless it splits K.  cuBLAS picks its own split (not settable from torch); the
# explicit split-K below cuts M into S chunks, multiplies them as one batch with fp32
# partial sums and adds the S partials: if it beats torch.matmul, cuBLAS's choice is short.
DW_SPLITS = (2, 4, 8, 16)


def split_k_tn(a: torch.Tensor, b: torch.Tensor, splits: int) -> torch.Tensor:
    """a^T b for a [M, P], b [M, Q] with M cut into `splits` chunks: fp32 partials, one sum."""
    m = a.shape[0]
    if m % splits:
        raise ValueError(f"M = {m} is not a multiple of splits = {splits}")
    a_chunks = a.view(splits, m // splits, a.shape[1]).transpose(1, 2)
    b_chunks = b.view(splits, m // splits, b.shape[1])
    if a.is_cuda:  # bf16 products accumulated and returned in fp32 by cuBLAS itself
        partials = torch.bmm(a_chunks, b_chunks, out_dtype=torch.float32)
    else:  # CPU (tests): no bf16 -> fp32 bmm there; the same sums in fp32
        partials = torch.bmm(a_chunks.float(), b_chunks.float())
    return partials.sum(0).to(a.dtype)


def dw_products(x, w_fc, w_proj, upstream):
    """name -> (a, b, P, Q): the two weight-gradient products a^T b of the backward."""
    module = importlib.import_module("kernels.relu2_mlp")
    h = module.gemm_nt(x, w_fc, module.EPI_RELU2)
    dpre = module.gemm_nt(upstream, w_proj.T.contiguous(), module.EPI_RELU2_BWD, h)
    return {"dW2 = g^T h": (upstream, h), "dW1 = dpre^T x": (dpre, x)}


def run_dw(run: harness.BenchRun, *, m: int, d: int, h: int, timer: Callable[[Callable], float],
           device, splits=DW_SPLITS) -> None:
    """Time each weight-gradient product on cuBLAS (torch.matmul) and as explicit split-K."""
    x, w_fc, w_proj, upstream = make_inputs(m, d, h, device)
    for name, (a, b) in dw_products(x, w_fc, w_proj, upstream).items():
        (pm, pp), pq = a.shape, b.shape[1]
        case = f"{name} [{pp}, {pq}] K={pm}"
        common = dict(ceiling=harness.BF16_MATMUL, flops=2 * pm * pp * pq,
                      params={"product": name, "m": pp, "n": pq, "k": pm, "dtype": "bfloat16"})
        expected = (a.T @ b).double()
        trials = [("cuBLAS (torch.matmul)", lambda a=a, b=b: a.T @ b)]
        trials += [(f"split-K {s} (bmm fp32 partials + sum)", lambda a=a, b=b, s=s: split_k_tn(a, b, s))
                   for s in splits]
        for label, step in trials:
            _sweep_trial(run, case, label, step, expected, timer, common)
    del x, w_fc, w_proj, upstream
    harness.free_cuda_memory()


# ---- command line --------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_relu2_mlp",
        description="ReLU^2 MLP (bf16 x [M, D] -> relu(x w_fc^T)^2 w_proj^T): ours (Triton GEMMs "
                    "with relu^2 epilogues; the plain products on cuBLAS or on our Triton GEMM) "
                    "against the 2025-01 record's formulation in torch eager and torch.compile. "
                    "Each implementation is checked against eager, then timed (CUDA events, "
                    "median, L2 flushed); throughput counts the matmul FLOPs and is compared with "
                    "the bf16 matmul peak measured at the start. Writes "
                    "<out>/<device>/relu2_mlp.{json,md,png}, updated after every measurement.")
    parser.add_argument("--m", type=int, nargs="+", default=None, metavar="M",
                        help=f"tokens (rows of x) to measure (default: {' '.join(map(str, DEFAULT_M))}; "
                             "--quick: the first)")
    parser.add_argument("--d", type=int, default=DEFAULT_D, help="model dim (default: %(default)s)")
    parser.add_argument("--h", type=int, default=DEFAULT_H, help="hidden dim (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="fwd+bwd: the training step (headline); fwd: no-grad forward (default: both)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS + OPTIONAL_IMPLEMENTATIONS,
                        default=list(IMPLEMENTATIONS),
                        help="implementations to compare (default: %(default)s)")
    harness.add_suite_options(parser)
    parser.add_argument("--sweep", action="store_true",
                        help="time the single products per tile config (SWEEP_CONFIGS) and variant "
                             "against cuBLAS instead of the implementations; writes relu2_mlp_sweep.*")
    parser.add_argument("--dw", action="store_true",
                        help="time the two weight-gradient products (K = M) on cuBLAS against explicit "
                             f"split-K with {DW_SPLITS} chunks instead; writes relu2_mlp_dw.*")
    args = parser.parse_args(argv)
    if args.sweep and args.dw:
        parser.error("--sweep and --dw are separate runs: give one")
    args.m = harness.sizes_for(args.m, DEFAULT_M, args.quick)
    if any(m <= 0 for m in args.m) or args.d <= 0 or args.h <= 0:
        parser.error("--m, --d and --h must be positive")
    return args


def _backends_summary() -> dict | str:
    try:
        import kernels
    except Exception as exc:
        return f"import kernels failed: {harness.describe_error(exc)}"
    return kernels.backends()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not harness.cuda_available_or_explain():
        return 0
    timing = harness.timing_for(args.quick)
    if args.dw:
        run = harness.start_run(f"{OP}_dw", title=f"ReLU^2 MLP weight gradients: cuBLAS vs split-K, bf16, "
                                f"D={args.d}, H={args.h}", out_root=args.out, timing=timing,
                                notes=(f"FLOPs counted: 2*M*D*H per product; split-K: {DW_SPLITS} chunks of M.",),
                                extra_metadata={"tol": TOL})
        for m in args.m:
            run_dw(run, m=m, d=args.d, h=args.h, timer=lambda fn: harness.time_ms(fn, timing), device="cuda")
        run.finish()
        return 0
    if args.sweep:
        run = harness.start_run(f"{OP}_sweep", title=f"ReLU^2 MLP products per tile config, bf16, D={args.d}, "
                                f"H={args.h}", out_root=args.out, timing=timing, notes=NOTES[:1],
                                extra_metadata={"tol": TOL})
        for m in args.m:
            run_sweep(run, m=m, d=args.d, h=args.h, timer=lambda fn: harness.time_ms(fn, timing), device="cuda")
        run.finish()
        return 0
    run = harness.start_run(
        OP, title=f"ReLU^2 MLP, bf16, D={args.d}, H={args.h}", out_root=args.out, timing=timing, notes=NOTES,
        extra_metadata={"kernels_backends": _backends_summary(), "tol": TOL})
    for m in args.m:
        run_shape(run, m=m, d=args.d, h=args.h, modes=args.modes, impls=args.impls,
                  timer=lambda fn: harness.time_ms(fn, timing), device="cuda")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
