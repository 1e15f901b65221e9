"""The FP8 LM head at the speedrun's shapes: our hand-written CUDA FP8 GEMM (and the Triton
one) against torch._scaled_mm (cuBLASLt) and bf16 torch.matmul, per GEMM, and the whole
head + softcap loss forward+backward against the 2025-01 record's path.

GEMMs (M tokens per GPU, V = 50304, K = 768), each with the operands already in fp8:
  y   [M, V] = x8 [M, K] . w8^T       e4m3 x e4m3 -> bf16
  dx  [M, K] = g8 [M, V] . w8         e5m2 x e4m3 -> bf16
  dW  [V, K] = g8^T [V, M] . x8       e5m2 x e4m3 -> fp32
FLOPs 2*M*V*K each; TFLOP/s is compared with the FP8 matmul peak measured at the start in
the same accumulation mode.  Accumulation: ours promotes dx and dW to fp32 every 128 of K
and runs y as one wgmma chain (kernels/fp8_head.py PROMOTE_Y; --promote-y flips it).
Two _scaled_mm baselines per GEMM, both printed:
  scaled_mm-same     use_fast_accum = not (ours promotes this GEMM): the like-for-like one
  scaled_mm-record   the 2025-01 record's call: use_fast_accum=True for y only
(with the defaults they are the same call, timed once and listed under both names).

Head + loss: loss = softcap CE(head(x)) then autograd.grad(loss, (x, W)):
  ours-cuda / ours-triton   kernels.linear_softcap_cross_entropy(fp8=True) on that backend
  record                    the record's _scaled_mm custom op (casts, w8.T.contiguous()
                            and grad transposes as the record writes them) + the record's
                            softcap CE under torch.compile
Each result is checked against the record path's loss and gradients (relative errors kept
in the JSON).  Run `python -m bench.bench_fp8_head --help` for the options.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from bench import harness

OP = "fp8_head"
DEFAULT_M = (48 * 1024, 64 * 1024)
V = 50304
K = 768
X_SCALE, W_SCALE, GRAD_SCALE = 2.0, 2.0**9, 2.0**19
CAP, SCALE = 30.0, 7.5
GEMMS = ("y", "dx", "dW")
GEMM_IMPLS = ("ours-cuda", "ours-triton", "scaled_mm-same", "scaled_mm-record", "bf16-matmul")
HEAD_IMPLS = ("ours-cuda", "ours-triton", "record")
SEED = 0
GEMM_TOL = 1e-2   # bf16 rounding of y/dx against _scaled_mm's, and both accumulations' truncation
                  # (<= 2.9e-3 fast at K = 768, <= 4.9e-4 promoted: tests/test_fp8_head.py)
HEAD_TOL = 3e-2   # e5m2 gradients: rare rounding flips from another order of the row factor

NOTES = (
    "GEMM cases time only the product (operands already cast); FLOPs = 2*M*N*K; % is of the FP8 "
    "matmul peak measured at the start (an 8192^3 e4m3 _scaled_mm) in the entry's accumulation mode "
    "(fast: use_fast_accum=True; promoted: False).",
    "scaled_mm-same: _scaled_mm in ours' accumulation mode for that GEMM; scaled_mm-record: the record's "
    "(fast for y, promoted for dx and dW).",
    "bf16-matmul: the same product with bf16 operands (what the head costs without FP8).",
    "head+loss: forward + backward of the LM head and the softcap CE loss (cap 30, sigmoid "
    "scale 7.5, mean); FLOPs = 3 * 2*M*V*K; record = the 2025-01 record's custom ops as it writes them "
    "(torch.compile'd casts, transposes and _scaled_mm: fast forward, promoted backward) + its "
    "torch.compile'd 30*sigmoid(z/7.5) cross-entropy.",
    f"ok: relative error vs scaled_mm-same (GEMMs) <= {GEMM_TOL:g}, vs the record path (head) <= {HEAD_TOL:g}.",
)


def flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def gemm_shape(gemm: str, m: int) -> tuple[int, int, int]:
    """(rows, cols, reduction) of one of the three head GEMMs at M tokens."""
    return {"y": (m, V, K), "dx": (m, K, V), "dW": (V, K, m)}[gemm]


# ---- the record's path -----------------------------------------------------------------

# The record wraps each custom op's body in torch.compile (Inductor fuses the casts with the
# transposes); so do we, or the baseline would pay for eager casts the record never runs.
@torch.compile
def _record_mm_impl(x, w):
    x8 = x.mul(X_SCALE).to(torch.float8_e4m3fn)
    w8 = w.mul(W_SCALE).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x8, w8.T, out_dtype=torch.bfloat16, scale_a=x.new_tensor(1 / X_SCALE, dtype=torch.float32),
                           scale_b=x.new_tensor(1 / W_SCALE, dtype=torch.float32), use_fast_accum=True)
    return out, x8, w8


@torch.compile
def _record_mm_backward_impl(g, x8, w8):
    one = g.new_tensor(1.0, dtype=torch.float32)
    g8 = g.mul(GRAD_SCALE).to(torch.float8_e5m2)
    dx = torch._scaled_mm(g8, w8.T.contiguous().T, out_dtype=torch.bfloat16,
                          scale_a=one / GRAD_SCALE, scale_b=one / W_SCALE, use_fast_accum=False)
    dw = torch._scaled_mm(x8.T.contiguous(), g8.T.contiguous().T, out_dtype=torch.float32,
                          scale_a=one / X_SCALE, scale_b=one / GRAD_SCALE, use_fast_accum=False).T
    return dx, dw


@torch.library.custom_op("bench_fp8_head::record_mm", mutates_args=())
def record_mm(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _record_mm_impl(x, w)


@record_mm.register_fake
def _(x, w):
    return x @ w.bfloat16().T, x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)


@torch.library.custom_op("bench_fp8_head::record_mm_backward", mutates_args=())
def record_mm_backward(g: torch.Tensor, x8: torch.Tensor, w8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _record_mm_backward_impl(g, x8, w8)


@record_mm_backward.register_fake
def _(g, x8, w8):
    return x8.to(torch.bfloat16), w8.to(torch.float32)


def _record_backward(ctx, grad_out, *_):
    x8, w8 = ctx.saved_tensors
    return record_mm_backward(grad_out.contiguous(), x8, w8)


def _record_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


record_mm.register_autograd(_record_backward, setup_context=_record_setup)


def _record_ce(logits, targets):
    return F.cross_entropy(CAP * torch.sigmoid(logits.float() / SCALE), targets)


def record_loss_fn():
    ce = torch.compile(_record_ce, dynamic=False)

    def loss(x, w, targets):
        return ce(record_mm(x, w)[0], targets)
    return loss


def ours_loss_fn(backend: str) -> Callable | str:
    try:
        import kernels
    except Exception as exc:
        return f"import kernels failed: {harness.describe_error(exc)}"
    if backend == "cuda" and not kernels.backends()["cuda_extension"]["built"]:
        return f"cuda extension not built: {kernels.backends()['cuda_extension']['error']}"

    def loss(x, w, targets):
        with kernels.use_backend(backend):
            return kernels.linear_softcap_cross_entropy(x, w, targets, cap=CAP, kind="sigmoid", scale=SCALE)
    return loss


# ---- GEMM cases ------------------------------------------------------------------------

def gemm_operands(gemm: str, m: int, device):
    gen = torch.Generator(device=device).manual_seed(SEED)
    rows, cols, red = gemm_shape(gemm, m)
    a_dtype = torch.float8_e4m3fn if gemm == "y" else torch.float8_e5m2
    a = (torch.randn(rows, red, device=device, generator=gen) * 2).to(a_dtype)
    b = (torch.randn(cols, red, device=device, generator=gen) * 2).to(torch.float8_e4m3fn)
    return a, b, gemm == "dW"


def promotes(gemm: str) -> bool:
    """Whether ours accumulates this GEMM with fp32 promotion (kernels/fp8_head.py)."""
    if gemm != "y":
        return True
    from kernels import fp8_head
    return fp8_head.PROMOTE_Y


def record_fast_accum(gemm: str) -> bool:
    """The record's use_fast_accum for this GEMM: True in the forward only."""
    return gemm == "y"


def gemm_functions(impls) -> dict[str, Callable | str]:
    """impl -> fn(a, b, fp32, promote) or the reason it cannot run; promote: ours' mode."""
    def ours(backend):
        try:
            from kernels import fp8_head
        except Exception as exc:
            return f"import kernels failed: {harness.describe_error(exc)}"
        if backend == "cuda":
            import kernels
            if not kernels.backends()["cuda_extension"]["built"]:
                return "cuda extension not built"
            return lambda a, b, fp32, promote: fp8_head._gemm_cuda(a, b, a.shape[1], 1.0, fp32, promote)
        return lambda a, b, fp32, promote: fp8_head._gemm_triton(a, b, a.shape[1], 1.0, fp32, promote)

    def bf16(a, b, fp32, promote):
        return a @ b.T  # called with bf16 copies

    def scaled(a, b, fp32, promote):
        return scaled_mm_call(not promote)(a, b, fp32)

    # The two _scaled_mm baselines differ only in the mode run_gemms passes them.
    table = {"ours-cuda": lambda: ours("cuda"), "ours-triton": lambda: ours("triton"),
             "scaled_mm-same": lambda: scaled, "scaled_mm-record": lambda: scaled, "bf16-matmul": lambda: bf16}
    return {impl: table[impl]() for impl in impls}


_ONE: dict = {}


def scaled_mm_call(fast_accum: bool) -> Callable:
    """_scaled_mm(a, b^T) with unit scales in the given accumulation mode."""
    def call(a, b, fp32):
        one = _ONE.setdefault(a.device, torch.ones((), device=a.device))
        return torch._scaled_mm(a, b.T, scale_a=one, scale_b=one, out_dtype=torch.float32 if fp32 else torch.bfloat16,
                                use_fast_accum=fast_accum)
    return call


def gemm_case(gemm: str, m: int) -> str:
    """The case's name in the results (bench.static names its predicted case with it too)."""
    rows, cols, red = gemm_shape(gemm, m)
    return f"{gemm} M={rows} N={cols} K={red}"


def run_gemms(run, m, impls, timer, device):
    fns = gemm_functions(impls)
    for gemm in GEMMS:
        a, b, fp32 = gemm_operands(gemm, m, device)
        rows, cols, red = gemm_shape(gemm, m)
        case = gemm_case(gemm, m)
        ours_promote = promotes(gemm)
        expected = scaled_mm_call(not ours_promote)(a, b, fp32)
        timed: dict[bool, float] = {}  # ms of _scaled_mm per mode: the two baselines share a call
        for impl in impls:
            fn = fns[impl]
            # The mode the entry runs in: the record's for scaled_mm-record, ours' otherwise.
            promote = not record_fast_accum(gemm) if impl == "scaled_mm-record" else ours_promote
            params = {"gemm": gemm, "m": rows, "n": cols, "k": red,
                      "accumulation": "fp32" if impl == "bf16-matmul" else ("promoted" if promote else "fast")}
            ceiling = (harness.BF16_MATMUL if impl == "bf16-matmul"
                       else harness.FP8_MATMUL_PROMOTED if promote else harness.FP8_MATMUL)
            common = dict(ceiling=ceiling, flops=flops(rows, cols, red), params=params)
            if isinstance(fn, str):
                run.add(harness.failed(case, impl, fn, **common))
                continue
            args = (a.bfloat16(), b.bfloat16(), fp32, promote) if impl == "bf16-matmul" else (a, b, fp32, promote)
            shared = impl.startswith("scaled_mm") and promote in timed
            try:
                out = fn(*args)
                checks = {}
                if impl != "bf16-matmul":
                    err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
                    checks = {"rel_err_vs_scaled_mm_same": err, "ok": err <= GEMM_TOL}
                del out
                ms = timed[promote] if shared else timer(lambda: fn(*args))
                if impl.startswith("scaled_mm"):
                    timed[promote] = ms
            except Exception as exc:
                run.add(harness.failed(case, impl, harness.describe_error(exc), **common))
                continue
            finally:
                harness.free_cuda_memory()
            extra = {"same_call_as_the_other_scaled_mm": True} if shared else {}
            run.add(harness.measured(case, impl, ms, ceilings=run.ceilings, checks=checks, extra=extra, **common))
        del a, b, expected
        harness.free_cuda_memory()


def run_head(run, m, impls, timer, device):
    gen = torch.Generator(device=device).manual_seed(SEED)
    x = torch.randn(m, K, device=device, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(V, K, device=device, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (m,), device=device, generator=gen)
    case = f"head+loss M={m} V={V} K={K}"
    common = dict(ceiling=harness.FP8_MATMUL, flops=3 * flops(m, V, K), params={"m": m, "v": V, "k": K})
    table = {"ours-cuda": lambda: ours_loss_fn("cuda"), "ours-triton": lambda: ours_loss_fn("triton"),
             "record": record_loss_fn}
    reference = None
    for impl in ("record",) + tuple(i for i in impls if i != "record"):
        if impl not in impls and impl != "record":
            continue
        fn = table[impl]()
        if isinstance(fn, str):
            run.add(harness.failed(case, impl, fn, **common))
            continue

        def step():
            loss = fn(x, w, targets)
            return (loss, *torch.autograd.grad(loss, (x, w)))
        try:
            out = step()
            if reference is None:
                reference = [t.detach().float() for t in out]
                checks = {}
            else:
                errs = [((a.float() - e).norm() / e.norm()).item() for a, e in zip(out, reference)]
                checks = {"loss_rel_err": errs[0], "dx_rel_err": errs[1], "dw_rel_err": errs[2],
                          "ok": max(errs) <= HEAD_TOL}
            del out
            ms = timer(step)
        except Exception as exc:
            run.add(harness.failed(case, impl, harness.describe_error(exc), **common))
            continue
        finally:
            harness.free_cuda_memory()
        if impl in impls:
            run.add(harness.measured(case, impl, ms, ceilings=run.ceilings, checks=checks, **common))
    torch._dynamo.reset()
    harness.free_cuda_memory()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_fp8_head",
        description="FP8 LM head: the three GEMMs (y, dx, dW) of ours (CUDA, Triton) vs torch._scaled_mm and "
                    "bf16 matmul, and head + softcap loss fwd+bwd vs the 2025-01 record's path. Writes "
                    "<out>/<device>/fp8_head.{json,md,png}.")
    parser.add_argument("--m", type=int, nargs="+", default=None, metavar="M",
                        help=f"tokens per GPU (default: {' '.join(map(str, DEFAULT_M))}; "
                             "--quick: the first)")
    parser.add_argument("--parts", nargs="+", choices=("gemm", "head"), default=["gemm", "head"],
                        help="what to measure (default: both)")
    parser.add_argument("--gemm-impls", nargs="+", choices=GEMM_IMPLS, default=list(GEMM_IMPLS))
    parser.add_argument("--head-impls", nargs="+", choices=HEAD_IMPLS, default=list(HEAD_IMPLS))
    parser.add_argument("--promote-y", action="store_true",
                        help="run ours' y GEMM with fp32 promotion too (kernels/fp8_head.py PROMOTE_Y), in the "
                             "GEMM cases and the head + loss")
    harness.add_suite_options(parser)
    args = parser.parse_args(argv)
    args.m = harness.sizes_for(args.m, DEFAULT_M, args.quick)
    if any(m <= 0 for m in args.m):
        parser.error("--m must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not harness.cuda_available_or_explain():
        return 0
    timing = harness.timing_for(args.quick)
    run = harness.start_run(OP, title="FP8 LM head: GEMMs and head + softcap loss", out_root=args.out,
                            timing=timing, notes=NOTES)
    timer = lambda fn: harness.time_ms(fn, timing)  # noqa: E731
    if args.promote_y:
        from kernels import fp8_head
        fp8_head.PROMOTE_Y = True
    for m in args.m:
        if "gemm" in args.parts:
            run_gemms(run, m, args.gemm_impls, timer, "cuda")
        if "head" in args.parts:
            run_head(run, m, args.head_impls, timer, "cuda")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
