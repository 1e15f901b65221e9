"""Sliding-window document attention at the speedrun's shapes: ours (block-sparse Triton)
against FlexAttention with the record's BlockMask, and dense causal SDPA as a reference.

Shapes: one packed sequence per GPU (B = 1) of T = 48*1024 and 64*1024 tokens, 6 heads of
128, bf16, scale 0.12, windows 1792 (long) and 896 (short).

Documents.  FineWeb-like lengths, generated deterministically: lengths drawn from a
lognormal with mu = 6.4, sigma = 1.0 (median e^6.4 ~ 600 tokens, mean ~ 990 tokens,
so about 50-65 documents per sequence), clamped to [16, 16384], from torch.Generator
seed 0; documents are laid end to end from token 0 and the last one is cut at T.
doc_ids = the document index of each token (the cumsum of document starts, as the model
builds it from the end-of-text tokens).

Implementations:
  ours-triton  kernels.sliding_window_attention(q, k, v, window=w, doc_ids=..., scale=0.12)
               (exact token window, exact document mask).
  ours-triton-position-order
               the same kernels launched in position order instead of longest work
               first (kernels.sliding_window_attention.LONGEST_FIRST = False): whether
               the order pays for its small kernel and sort per launch.
  ours-gluon-fwd
               ours-triton with the Gluon forward (kernels.sliding_window_attention.FORWARD
               = "gluon": a wgmma group in flight across the softmax; the backward is the
               same); Hopper only.  Checked like ours-triton before it is timed.
  flex         FlexAttention under torch.compile with the BlockMask built exactly as the
               record built it (speedrun.gpt.baseline.record_block_masks: causal +
               document, window counted in whole 128-token blocks: 14 for 1792, 7 for 896).
               Its visible set is slightly larger than the exact token window.
  sdpa-causal  F.scaled_dot_product_attention(is_causal=True): dense causal, no window
               and no documents; the O(T^2) work a window saves (a reference, not a rival).

Work counted.  Only visible (query, key) pairs of the exact mask: pairs = sum over
queries i of min(i - start(doc(i)) + 1, window).  Forward = 4 * D * H * pairs FLOPs (two
matmuls, QK^T and PV); forward+backward = 14 * D * H * pairs (backward: five matmuls,
QK^T recomputed, dP = dO V^T, dV, dQ, dK).  ours-triton and flex get the same count (the
useful work, whatever each computes); sdpa-causal gets its own T(T+1)/2 pairs.
Effective TFLOP/s = that count / median time; the ceiling is the bf16 matmul throughput
measured at the start of the run.

Check.  Before timing, ours is checked on the last 1024 queries against a dense fp32
computation over the keys they can see (out_rel_err).  Full gradients are checked in
tests/test_sliding_window_attention.py (GPU tests, against FlexAttention).
Run `python -m bench.bench_sliding_window_attention --help` for the options.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F

from bench import harness

OP = "sliding_window_attention"
MODES = ("fwd+bwd", "fwd")
IMPLEMENTATIONS = ("ours-triton", "ours-triton-position-order", "ours-gluon-fwd", "flex", "sdpa-causal")
DEFAULT_T = (48 * 1024, 64 * 1024)
DEFAULT_WINDOWS = (1792, 896)
HEADS, HEAD_DIM, SCALE = 6, 128, 0.12
FLEX_BLOCK = 128
DOC_MU, DOC_SIGMA, DOC_MIN, DOC_MAX, DOC_SEED = 6.4, 1.0, 16, 16384, 0
CHECK_ROWS = 1024
OUT_TOL = 2e-2  # bf16 output: 2**-8 relative rounding per element, P rounded to bf16 too

NOTES = (
    f"Documents: lognormal lengths (mu {DOC_MU}, sigma {DOC_SIGMA}: median ~600, mean ~990 tokens), "
    f"clamped to [{DOC_MIN}, {DOC_MAX}], seed {DOC_SEED}, laid end to end; doc_ids = document index.",
    "Work: visible pairs of the exact mask (causal, token window, same document); fwd = 4*D*H*pairs, "
    "fwd+bwd = 14*D*H*pairs FLOPs. flex is credited with the same useful work; sdpa-causal with "
    "its own T(T+1)/2 causal pairs. Ceiling: bf16 matmul measured at the start of the run.",
    "flex: torch.compile(flex_attention) with the record's BlockMask (window in whole 128-token "
    "blocks, causal and document evaluated per token inside partial blocks), built once per case "
    "outside the timing, as the trainer builds it once per step.",
    "fwd: inputs not requiring grad, under torch.no_grad(). fwd+bwd: out = f(q, k, v) then "
    "torch.autograd.grad(out, (q, k, v), dout).",
    f"ours is checked on the last {CHECK_ROWS} queries against dense fp32 attention over the keys "
    f"they see: out_rel_err, ok when <= {OUT_TOL:g}.",
)


# ---- inputs and work -------------------------------------------------------------------

def document_lengths(t: int, seed: int = DOC_SEED) -> list[int]:
    """FineWeb-like document lengths covering exactly t tokens (the last one cut)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < t:
        length = int(math.exp(DOC_MU + DOC_SIGMA * torch.randn((), generator=gen).item()))
        length = max(DOC_MIN, min(DOC_MAX, length))
        length = min(length, t - total)
        lengths.append(length)
        total += length
    return lengths


def doc_ids_from_lengths(lengths: list[int]) -> torch.Tensor:
    """[1, T] int32: the document index of every token."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                   torch.tensor(lengths))[None].contiguous()


def visible_pairs(lengths: list[int], window: int | None) -> int:
    """Number of (query, key) pairs the exact mask allows: sum_i min(i - doc start + 1, window)."""
    total = 0
    for length in lengths:
        position = torch.arange(1, length + 1, dtype=torch.int64)  # keys visible without a window
        total += int((position if window is None else position.clamp(max=window)).sum())
    return total


def flops(pairs: int, mode: str, heads: int | None = None, head_dim: int | None = None) -> int:
    """FLOPs of `pairs` visible (query, key) pairs per head: 4*D per pair forward, 14*D fwd+bwd."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    heads = HEADS if heads is None else heads
    head_dim = HEAD_DIM if head_dim is None else head_dim
    return (4 if mode == "fwd" else 14) * head_dim * heads * pairs


# ---- implementations --------------------------------------------------------------------

def attention_functions(impls, doc_ids: torch.Tensor, window: int) -> dict[str, Callable | str]:
    """impl name -> attend(q, k, v) on [B, T, H, D], or a string saying why it cannot run."""
    functions: dict[str, Callable | str] = {}
    for impl in impls:
        try:
            functions[impl] = _build(impl, doc_ids, window)
        except Exception as exc:
            functions[impl] = harness.describe_error(exc)
    return functions


def _build(impl: str, doc_ids: torch.Tensor, window: int) -> Callable:
    if impl in ("ours-triton", "ours-triton-position-order", "ours-gluon-fwd"):
        import importlib

        import kernels
        swa = importlib.import_module("kernels.sliding_window_attention")
        longest_first = impl != "ours-triton-position-order"
        forward = "gluon" if impl == "ours-gluon-fwd" else "triton"

        def ours(q, k, v):
            # Set on every call and left set: the autograd backward that follows this
            # forward (step() in _check_and_time) launches in the same order.
            swa.LONGEST_FIRST = longest_first
            swa.FORWARD = forward
            with kernels.use_backend("triton"):
                return kernels.sliding_window_attention(q, k, v, window=window, doc_ids=doc_ids, scale=SCALE)
        return ours
    if impl == "flex":
        from speedrun.gpt import baseline

        if window % FLEX_BLOCK or doc_ids.shape[1] % FLEX_BLOCK:
            raise ValueError(f"the record's BlockMask needs window and T in whole {FLEX_BLOCK}-token blocks")
        long_mask, _ = baseline.record_block_masks(doc_ids[0].long(), window // FLEX_BLOCK)
        compiled = torch.compile(baseline.flex_sliding_window_attention, dynamic=False)

        def flex(q, k, v):
            return compiled(q, k, v, long_mask, SCALE)
        return flex
    if impl == "sdpa-causal":
        def sdpa(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=SCALE)
            return out.transpose(1, 2)
        return sdpa
    raise ValueError(f"unknown implementation {impl!r}")


def tail_reference(q, k, v, doc_ids, window, rows=CHECK_ROWS) -> torch.Tensor:
    """Exact attention of the last `rows` queries in fp32, over the keys they can see."""
    t = q.shape[1]
    q0 = max(0, t - rows)
    k0 = max(0, q0 - window + 1)
    i = torch.arange(q0, t, device=q.device)[:, None]
    j = torch.arange(k0, t, device=q.device)[None, :]
    docs = doc_ids[0]
    allowed = (j <= i) & (i - j < window) & (docs[i] == docs[j])
    scores = torch.einsum("bihd,bjhd->bhij", q[:, q0:].float(), k[:, k0:].float()) * SCALE
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v[:, k0:].float())


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# ---- one case ---------------------------------------------------------------------------

def case_name(mode: str, t: int, window: int) -> str:
    """The case's name in the results (bench.static names its predicted case with it too)."""
    return f"{mode} T={t} w={window}"


def run_case(run: harness.BenchRun, *, t: int, window: int, modes, impls, timer: Callable[[Callable], float],
             device: str | torch.device) -> None:
    lengths = document_lengths(t)
    doc_ids = doc_ids_from_lengths(lengths).to(device)
    pairs = {"exact": visible_pairs(lengths, window), "causal": t * (t + 1) // 2}
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v, dout = (torch.randn(1, t, HEADS, HEAD_DIM, device=device, generator=gen, dtype=torch.bfloat16)
                     for _ in range(4))
    functions = attention_functions(impls, doc_ids, window)
    params = {"t": t, "window": window, "heads": HEADS, "head_dim": HEAD_DIM, "documents": len(lengths),
              "visible_pairs": pairs["exact"], "dtype": "bfloat16"}
    for mode in modes:
        for impl in impls:
            work = flops(pairs["causal" if impl == "sdpa-causal" else "exact"], mode)
            case = case_name(mode, t, window)
            common = dict(ceiling=harness.BF16_MATMUL, flops=work, params={**params, "mode": mode})
            fn = functions[impl]
            if isinstance(fn, str):
                run.add(harness.failed(case, impl, fn, **common))
                continue
            run.add(_check_and_time(case, impl, fn, mode, (q, k, v, dout), doc_ids, window, timer, common,
                                    run.ceilings))
    del functions, q, k, v, dout
    torch._dynamo.reset()
    harness.free_cuda_memory()


def _check_and_time(case, impl, fn, mode, tensors, doc_ids, window, timer, common, ceilings) -> harness.Entry:
    q, k, v, dout = tensors
    if mode == "fwd+bwd":
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step():
            out = fn(*leaves)
            return out, torch.autograd.grad(out, leaves, dout)
    else:
        def step():
            with torch.no_grad():
                return fn(q, k, v), None
    checks = {}
    try:
        out, _ = step()  # compiles flex; the check below uses this run's output
        if impl.startswith("ours-"):
            checks["out_rel_err"] = _rel_err(out[:, -CHECK_ROWS:], tail_reference(q, k, v, doc_ids, window))
            checks["ok"] = checks["out_rel_err"] <= OUT_TOL
        del out
    except Exception as exc:
        return harness.failed(case, impl, harness.describe_error(exc), **common)
    finally:
        harness.free_cuda_memory()
    try:
        ms = timer(step)
    except Exception as exc:
        return harness.failed(case, impl, harness.describe_error(exc), checks=checks, **common)
    finally:
        harness.free_cuda_memory()
    return harness.measured(case, impl, ms, ceilings=ceilings, checks=checks, **common)


# ---- command line -----------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_sliding_window_attention",
        description="Causal sliding-window document attention (B=1, H=6, D=128, bf16, FineWeb-like "
                    "documents): ours (block-sparse Triton) against FlexAttention with the record's "
                    "BlockMask and dense causal SDPA. Forward and forward+backward; effective TFLOP/s "
                    "count only the visible (query, key) pairs. Writes <out>/<device>/"
                    "sliding_window_attention.{json,md,png}.")
    parser.add_argument("--t", type=int, nargs="+", default=None, metavar="T",
                        help=f"sequence lengths (tokens per GPU) (default: {' '.join(map(str, DEFAULT_T))}; "
                             "--quick: the first)")
    parser.add_argument("--windows", type=int, nargs="+", default=list(DEFAULT_WINDOWS), metavar="W",
                        help="attention windows in tokens (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="fwd+bwd (training, the headline) and/or fwd (default: both)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to compare (default: all)")
    harness.add_suite_options(parser)
    args = parser.parse_args(argv)
    args.t = harness.sizes_for(args.t, DEFAULT_T, args.quick)
    if any(t <= 0 for t in args.t) or any(w <= 0 for w in args.windows):
        parser.error("--t and --windows must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not harness.cuda_available_or_explain():
        return 0
    timing = harness.timing_for(args.quick)
    run = harness.start_run(OP, title="causal + sliding window + document attention, B=1, H=6, D=128, bf16",
                            out_root=args.out, timing=timing, notes=NOTES,
                            extra_metadata={"out_tol": OUT_TOL, "check_rows": CHECK_ROWS})
    for t in args.t:
        for window in args.windows:
            run_case(run, t=t, window=window, modes=args.modes, impls=args.impls,
                     timer=lambda fn: harness.time_ms(fn, timing), device="cuda")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
