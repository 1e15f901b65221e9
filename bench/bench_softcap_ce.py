"""Softcapped cross-entropy at the speedrun's shapes: ours (CUDA, Triton) against the
2025-01 record's own formulation in torch eager and under torch.compile.

The record computes `logits = 30 * torch.sigmoid(z.float() / 7.5)` then
`F.cross_entropy(logits, targets)` (mean) on bf16 head outputs z of [N, V], N tokens per
GPU (48*1024, 64*1024) and V = 50304.  The op is memory-bound: it must read the bf16 logits
once and, in training, write the bf16 gradient once.  Throughput is counted on exactly
those bytes (plus the int64 targets), so any extra traffic (fp32 intermediates, a second
read of the logits) shows up as a lower share of the measured copy bandwidth.

Modes:
  fwd+bwd  loss = f(z, t); torch.autograd.grad(loss, z) -- the training step, the headline.
           Our kernels compute the gradient inside the forward and keep it; backward only
           scales it by the upstream gradient (nothing to do for the usual 1.0).
  fwd      z not requiring grad, under torch.no_grad() -- evaluation.  Our kernels then
           skip the gradient; in training their forward already is the whole fwd+bwd cost.

Before timing, each implementation is checked against the record's formulation in eager
(computed in row chunks, the same math in less memory); the relative errors go into the
results.  Run `python -m bench.bench_softcap_ce --help` for the options.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F

from bench import harness

OP = "softcap_ce"
CAP = 30.0
SCALE = 7.5
MODES = ("fwd+bwd", "fwd")
IMPLEMENTATIONS = ("ours-cuda", "ours-triton", "torch-eager", "torch-compile")
DEFAULT_N = (48 * 1024, 64 * 1024)
DEFAULT_V = 50304
LOGIT_SPREAD = 4.0  # randn * 4: logits a few units wide, like a trained head's
SEED = 0
# Losses agree to ~1e-6 (fp32 sums in another order); a bf16 gradient carries a rounding
# of up to 2**-8 relative per element, in both the implementation and the reference.
LOSS_TOL = 1e-5
GRAD_TOL = 1e-2
CHUNK_ROWS = 4096  # rows per chunk for the reference and the error norms: ~0.8 GB of fp32

NOTES = (
    "Bytes counted are those the op must move: the bf16 logits read once (N*V*2), for fwd+bwd "
    "the bf16 gradient written once (N*V*2), and the int64 targets (N*8). Throughput = those "
    "bytes / median time; the ceiling is the copy bandwidth measured at the start of the run.",
    "fwd+bwd (the headline): loss = f(z, t) then torch.autograd.grad(loss, z). Our kernels "
    "compute the gradient in the forward and keep it; backward only scales it in place.",
    "fwd: z does not require grad, under torch.no_grad() (evaluation); our kernels then skip "
    "the gradient, so this is not the forward of a training step (which is the whole fwd+bwd).",
    "torch-eager / torch-compile: the 2025-01 record's `30 * torch.sigmoid(z.float() / 7.5)` "
    "then `F.cross_entropy` (mean); torch.compile(dynamic=False), default mode.",
    f"Checks against that formulation in eager (row chunks of {CHUNK_ROWS}, same math): "
    "loss_rel_err = |loss - ref| / |ref|, grad_rel_err = ||g - g_ref||_F / ||g_ref||_F; "
    f"ok when loss_rel_err <= {LOSS_TOL:g} and grad_rel_err <= {GRAD_TOL:g}.",
    f"Inputs: bf16 logits randn * {LOGIT_SPREAD:g} (seed {SEED}), int64 targets uniform in [0, V).",
    "working_mem_gib: GPU memory the checked call allocated at its peak (outputs included), "
    "beyond what was allocated before it.",
)


def record_capped_logits(z: torch.Tensor) -> torch.Tensor:
    return CAP * torch.sigmoid(z.float() / SCALE)


def record_loss(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The record's formulation, as the record writes it."""
    return F.cross_entropy(record_capped_logits(z), targets)


def bytes_moved(n: int, v: int, mode: str, logits_itemsize: int = 2, target_itemsize: int = 8) -> int:
    """Bytes the op must move: logits read once, the gradient written once (fwd+bwd), targets."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    logit_passes = 2 if mode == "fwd+bwd" else 1
    return logit_passes * n * v * logits_itemsize + n * target_itemsize


# ---- implementations -----------------------------------------------------------------

def _ours(backend: str) -> Callable | str:
    """Our op pinned to `backend`, or why it cannot run here."""
    try:
        import kernels
    except Exception as exc:  # the package is broken or half-written: the others still run
        return f"import kernels failed: {harness.describe_error(exc)}"
    status = kernels.backends()
    if backend == "cuda" and not status["cuda_extension"]["built"]:
        return f"cuda extension not built: {status['cuda_extension']['error']}"
    if backend == "triton" and status["triton"]["version"] is None:
        return "triton is not installed"

    def loss(z, targets):
        with kernels.use_backend(backend):
            return kernels.softcap_cross_entropy(z, targets, cap=CAP, kind="sigmoid", scale=SCALE)

    return loss


def loss_functions(impls) -> dict[str, Callable | str]:
    """impl name -> loss(z, targets), or a string saying why that implementation cannot run."""
    builders = {
        "ours-cuda": lambda: _ours("cuda"),
        "ours-triton": lambda: _ours("triton"),
        "torch-eager": lambda: record_loss,
        # Static shapes: a second N must not get a slower dynamic-shape kernel.
        "torch-compile": lambda: torch.compile(record_loss, dynamic=False),
    }
    return {impl: builders[impl]() for impl in impls}


def forward_backward(loss_fn: Callable, z: torch.Tensor, targets: torch.Tensor):
    # autograd.grad rather than backward(): nothing accumulates into z.grad between runs.
    loss = loss_fn(z, targets)
    (grad,) = torch.autograd.grad(loss, z)
    return loss, grad


def forward_only(loss_fn: Callable, z: torch.Tensor, targets: torch.Tensor):
    with torch.no_grad():
        return loss_fn(z, targets)


# ---- correctness ---------------------------------------------------------------------

def reference_loss_and_grad(z: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS):
    """The record's eager loss and gradient, computed chunk by chunk of rows.

    Rows are independent and the mean is the sum over chunks / N, so this is the full-size
    eager result without its several fp32 copies of the logits at once (at N = 65536 a
    single one is 13 GB).  The gradient is kept in host memory, leaving the GPU to the
    implementations under test.
    """
    n = z.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    grad = torch.empty(z.shape, dtype=z.dtype, device="cpu")
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk = z[rows].detach().requires_grad_()
        chunk_sum = F.cross_entropy(record_capped_logits(chunk), targets[rows], reduction="sum")
        (chunk_grad,) = torch.autograd.grad(chunk_sum / n, chunk)
        grad[rows] = chunk_grad.cpu()
        total += chunk_sum.detach().double()
    return (total / n).float(), grad


def relative_error(actual: torch.Tensor, expected: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in chunks of rows, on actual's device.

    NaN anywhere gives NaN, which fails every tolerance check.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.dim() == 0:
        actual, expected = actual.reshape(1), expected.reshape(1)
    diff_sq = norm_sq = 0.0
    for start in range(0, actual.shape[0], chunk_rows):
        a = actual[start:start + chunk_rows].float()
        e = expected[start:start + chunk_rows].to(actual.device).float()
        diff_sq += (a - e).square().sum(dtype=torch.float64).item()
        norm_sq += e.square().sum(dtype=torch.float64).item()
    if norm_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / norm_sq)


def check(step: Callable, mode: str, ref_loss: torch.Tensor, ref_grad: torch.Tensor,
          on_cuda: bool) -> tuple[dict, dict]:
    """Run step() once (for torch.compile: the compilation) and compare with the reference.

    Returns (checks, extra): the relative errors and ok, and the working memory on a GPU.
    """
    if on_cuda:  # the allocator's own bookkeeping: no synchronization needed
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    out = step()
    loss, grad = out if mode == "fwd+bwd" else (out, None)
    checks = {"loss_rel_err": relative_error(loss.detach(), ref_loss)}
    if grad is not None:
        checks["grad_rel_err"] = relative_error(grad, ref_grad)
    checks["ok"] = checks["loss_rel_err"] <= LOSS_TOL and checks.get("grad_rel_err", 0.0) <= GRAD_TOL
    extra = {}
    if on_cuda:
        extra["working_mem_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
    return checks, extra


# ---- one shape -----------------------------------------------------------------------

def case_name(mode: str, n: int, v: int) -> str:
    """The case's name in the results (bench.static names its predicted case with it too)."""
    return f"{mode} N={n} V={v}"


def _check_and_time(impl: str, loss_fn: Callable | str, mode: str, z: torch.Tensor,
                    targets: torch.Tensor, reference, timer: Callable[[Callable], float],
                    ceilings: dict[str, harness.Ceiling]) -> harness.Entry:
    """One entry: unavailable, failed its check run, or checked and timed."""
    n, v = z.shape
    case = case_name(mode, n, v)
    common = dict(ceiling=harness.COPY_BANDWIDTH, bytes_moved=bytes_moved(n, v, mode),
                  params={"mode": mode, "n": n, "v": v, "dtype": "bfloat16", "cap": CAP, "scale": SCALE})
    if isinstance(loss_fn, str):
        return harness.failed(case, impl, loss_fn, **common)
    inputs = z.detach().requires_grad_(mode == "fwd+bwd")
    run_step = forward_backward if mode == "fwd+bwd" else forward_only

    def step():
        return run_step(loss_fn, inputs, targets)

    try:
        checks, extra = check(step, mode, *reference, on_cuda=z.is_cuda)
    except Exception as exc:  # out of memory, a backend refusing the input, a compile error
        return harness.failed(case, impl, harness.describe_error(exc), **common)
    finally:
        harness.free_cuda_memory()
    errors = ", ".join(f"{key} {value:.2e}" for key, value in checks.items() if key.endswith("rel_err"))
    print(f"{case:<28} {impl:<14} check: {errors}{'' if checks['ok'] else '  MISMATCH (timed anyway)'}",
          flush=True)
    try:
        ms = timer(step)
    except Exception as exc:
        return harness.failed(case, impl, harness.describe_error(exc), checks=checks, extra=extra, **common)
    finally:
        harness.free_cuda_memory()
    return harness.measured(case, impl, ms, ceilings=ceilings, checks=checks, extra=extra, **common)


def run_shape(run: harness.BenchRun, *, n: int, v: int, modes, impls, timer: Callable[[Callable], float],
              device: str | torch.device) -> None:
    """Check and time every (mode, implementation) at [n, v]; each becomes an entry of `run`."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    z = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=generator).mul_(LOGIT_SPREAD)
    targets = torch.randint(0, v, (n,), device=device, generator=generator)
    reference = reference_loss_and_grad(z, targets)
    harness.free_cuda_memory()
    functions = loss_functions(impls)
    for mode in modes:
        for impl in impls:
            run.add(_check_and_time(impl, functions[impl], mode, z, targets, reference, timer,
                                    run.ceilings))
    # Compiled graphs and their buffers belong to this shape: drop them before the next one.
    del functions, z, targets, reference
    torch._dynamo.reset()
    harness.free_cuda_memory()


# ---- command line --------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_softcap_ce",
        description="Softcapped cross-entropy (bf16 logits [N, V], cap 30, sigmoid scale 7.5): "
                    "ours CUDA and Triton against the 2025-01 record's formulation in torch eager "
                    "and torch.compile. Each implementation is checked against eager, then timed "
                    "(CUDA events, median, L2 flushed); throughput counts the bytes the op must "
                    "move and is compared with the copy bandwidth measured at the start. Writes "
                    "<out>/<device>/softcap_ce.{json,md,png}, updated after every measurement.")
    parser.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                        help=f"rows (tokens per GPU) to measure (default: {' '.join(map(str, DEFAULT_N))}; "
                             "--quick: the first)")
    parser.add_argument("--v", type=int, default=DEFAULT_V, metavar="V",
                        help="vocabulary size, columns (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="fwd+bwd: the training step (headline); fwd: no-grad forward "
                             "(default: both)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to compare (default: all)")
    harness.add_suite_options(parser)
    args = parser.parse_args(argv)
    args.n = harness.sizes_for(args.n, DEFAULT_N, args.quick)
    if any(n <= 0 for n in args.n) or args.v <= 0:
        parser.error("--n and --v must be positive")
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
    run = harness.start_run(
        OP, title="softcapped cross-entropy, bf16 logits, cap 30 * sigmoid(z / 7.5)",
        out_root=args.out, timing=timing, notes=NOTES,
        extra_metadata={"kernels_backends": _backends_summary(), "loss_tol": LOSS_TOL, "grad_tol": GRAD_TOL})
    for n in args.n:
        run_shape(run, n=n, v=args.v, modes=args.modes, impls=args.impls,
                  timer=lambda fn: harness.time_ms(fn, timing), device="cuda")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
