"""Newton-Schulz (Muon's orthogonalization) on one optimizer step's full set of matrices:
ours (Triton) against the record's NS in torch eager and torch.compile, batched by shape,
and ours with the Polar Express schedule (ours-triton-polar, GPT set only: a 5-step schedule).

Sets (each stacked by shape group, one call per group, exactly as speedrun.optim.Muon does):
  gpt    the 2025-01 GPT's Muon matrices: per layer the qkv weight [3, 768, 768], the
         attention output projection 768x768, the MLP's 3072x768 and 768x3072, for 12
         layers where layer 7 has no attention -> groups [11, 3, 768, 768], [11, 768, 768],
         [12, 3072, 768], [12, 768, 3072]; NS5; fp32 inputs (the record's fp32 weights).
  cifar  airbench94_muon's six 3x3 conv filters reshaped to out x in*9 -> 64x216, 64x576,
         256x576 and 3 x 256x2304; 3 steps; fp16 inputs (the fp16 net).  Also the record's
         per-parameter Python loop.

Work counted per matrix (M <= N after the transpose of tall ones) and step:
  dense     the three products as full GEMMs: 2M^2N (X X^T) + 2M^3 (A A) + 2M^2N (B X).
  symmetric what an implementation that exploits A = A^T must do: one triangle (with the
            diagonal) of X X^T and of A A: M(M+1)N + M^2(M+1) + 2M^2N.
TFLOP/s and % of the measured bf16 matmul peak use the dense count for every implementation
(so they rank like the times); ours also reports the symmetric count in extra.  Each
implementation is checked against the same iteration in float64 first.  Run
`python -m bench.bench_newton_schulz --help` for the options.
"""
from __future__ import annotations

import argparse
import importlib
import math
from typing import Callable

import torch

from bench import harness
from speedrun.gpt import baseline

OP = "newton_schulz"
NS5 = (3.4445, -4.7750, 2.0315)
IMPLEMENTATIONS = ("ours-triton", "ours-triton-polar", "torch-eager", "torch-compile", "record-loop")
# Each implementation's Newton-Schulz coefficients (kernels.newton_schulz's `coefficients`),
# also the float64 oracle it is checked against; the others run the records' NS5 triple.
SCHEDULES = {"ours-triton-polar": "polar_express"}
SEED = 0

D, H, LAYERS, NO_ATTENTION = 768, 3072, 12, (7,)


def gpt_groups() -> list[tuple[int, ...]]:
    """The GPT's Muon stacks, one per parameter shape (the order Muon builds them)."""
    attention = LAYERS - len(NO_ATTENTION)
    return [(attention, 3, D, D), (attention, D, D), (LAYERS, H, D), (LAYERS, D, H)]


def cifar_matrices() -> list[tuple[int, int]]:
    """The six conv filters [out, in, 3, 3] of airbench94_muon as out x in*9."""
    convs = [(64, 24), (64, 64), (256, 64), (256, 256), (256, 256), (256, 256)]
    return [(out, inp * 9) for out, inp in convs]


def cifar_groups() -> list[tuple[int, ...]]:
    groups: dict[tuple[int, int], int] = {}
    for shape in cifar_matrices():
        groups[shape] = groups.get(shape, 0) + 1
    return [(count, *shape) for shape, count in groups.items()]


SETS = {
    "gpt": {"groups": gpt_groups, "steps": 5, "input_dtype": torch.float32},
    "cifar": {"groups": cifar_groups, "steps": 3, "input_dtype": torch.float16},
}


def matrices_of(groups) -> list[tuple[int, int]]:
    out = []
    for shape in groups:
        out += [tuple(shape[-2:])] * math.prod(shape[:-2])
    return out


def flops(groups, steps: int, *, symmetric: bool) -> int:
    """FLOPs of `steps` NS steps on every matrix of the groups (see the module docstring)."""
    total = 0
    for rows, cols in matrices_of(groups):
        m, n = min(rows, cols), max(rows, cols)
        if symmetric:
            total += m * (m + 1) * n + m * m * (m + 1) + 2 * m * m * n
        else:
            total += 4 * m * m * n + 2 * m ** 3
    return total * steps


# ---- implementations -----------------------------------------------------------------

# The records' NS in plain PyTorch: the one the GPT trainer's `--kernels off` runs.
torch_newton_schulz = baseline.newton_schulz5


def _ours(coefficients=NS5) -> Callable | str:
    try:
        kernels = importlib.import_module("kernels")
    except Exception as exc:  # the package is broken: the others still run
        return f"import kernels failed: {harness.describe_error(exc)}"
    if kernels.backends()["triton"]["version"] is None:
        return "triton is not installed"

    def run(G, steps):
        with kernels.use_backend("triton"):
            return kernels.newton_schulz(G, steps=steps, coefficients=coefficients, dtype=torch.bfloat16)

    return run


def set_functions(impls, set_name: str) -> dict[str, Callable | str]:
    """impl -> fn(list of stacks, steps) -> list of outputs, or why it cannot run."""
    def batched(ns):
        if isinstance(ns, str):
            return ns
        return lambda stacks, steps: [ns(G, steps) for G in stacks]

    def per_parameter(stacks, steps):  # the CIFAR record: one call per parameter, in a loop
        return [torch.stack([torch_newton_schulz(m, steps) for m in G.reshape(-1, *G.shape[-2:])]).reshape(G.shape)
                for G in stacks]

    builders = {
        "ours-triton": lambda: batched(_ours()),
        # Same kernels and work, other coefficients: only the GPT set has Polar Express's 5 steps.
        "ours-triton-polar": lambda: (batched(_ours("polar_express")) if SETS[set_name]["steps"] == 5
                                      else f"polar_express is a 5-step schedule; the {set_name} set runs "
                                           f"{SETS[set_name]['steps']} steps"),
        "torch-eager": lambda: batched(torch_newton_schulz),
        # Static shapes: one graph per shape group, as a training run would have.
        "torch-compile": lambda: batched(torch.compile(torch_newton_schulz, dynamic=False)),
        "record-loop": lambda: (per_parameter if set_name == "cifar"
                                else "the GPT record batches by shape (torch-compile)"),
    }
    return {impl: builders[impl]() for impl in impls}


# ---- checks --------------------------------------------------------------------------

def tolerance(steps: int) -> float:
    """4 bf16 unit roundoffs per step: see tests/test_newton_schulz.py for the argument."""
    return 4 * 2.0 ** -8 * steps


def relative_error(outputs, expected) -> float:
    diff = norm = 0.0
    for out, ref in zip(outputs, expected):
        diff += (out.double() - ref).square().sum().item()
        norm += ref.square().sum().item()
    return math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def count_launches(fn: Callable[[], object]) -> int | None:
    """CUDA kernels launched by one call (torch.profiler), or None if the profiler fails."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:
        return None


# ---- one set -------------------------------------------------------------------------

def case_name(set_name: str) -> str:
    """The case's name in the results (bench.static names its predicted case with it too)."""
    spec = SETS[set_name]
    return f"{set_name}: {len(matrices_of(spec['groups']()))} matrices, NS{spec['steps']}"


def run_set(run: harness.BenchRun, set_name: str, impls, timer: Callable[[Callable], float], device) -> None:
    spec = SETS[set_name]
    groups, steps = spec["groups"](), spec["steps"]
    generator = torch.Generator(device=device).manual_seed(SEED)
    stacks = [torch.randn(shape, device=device, generator=generator).to(spec["input_dtype"]) for shape in groups]
    oracles = {}  # coefficients -> the float64 iteration's outputs, computed once per schedule
    dense, symmetric = flops(groups, steps, symmetric=False), flops(groups, steps, symmetric=True)
    case = case_name(set_name)
    params = {"set": set_name, "groups": [list(g) for g in groups], "steps": steps,
              "input_dtype": str(spec["input_dtype"]).removeprefix("torch."), "iteration_dtype": "bfloat16"}
    common = dict(ceiling=harness.BF16_MATMUL, flops=dense, params=params)
    functions = set_functions(impls, set_name)
    results = {}
    for impl in impls:
        fn = functions[impl]
        if isinstance(fn, str):
            results[impl] = harness.failed(case, impl, fn, **common)
            continue

        def step(fn=fn):
            return fn(stacks, steps)

        coefficients = SCHEDULES.get(impl, NS5)
        if coefficients not in oracles:
            oracles[coefficients] = [newton_schulz_float64(G, steps, coefficients) for G in stacks]
        try:
            error = relative_error(step(), oracles[coefficients])  # for torch.compile: the compilation too
            checks = {"rel_err_vs_float64": error, "ok": error <= tolerance(steps)}
            extra = {"launches": count_launches(step)}
            ms = timer(step)
        except Exception as exc:
            results[impl] = harness.failed(case, impl, harness.describe_error(exc), **common)
            continue
        finally:
            harness.free_cuda_memory()
        if impl in SCHEDULES:
            extra["coefficients"] = SCHEDULES[impl]
        if impl.startswith("ours-triton"):
            extra["tflops_symmetric_work"] = round(harness.tflop_per_s(symmetric, ms), 1)
        results[impl] = harness.measured(case, impl, ms, ceilings=run.ceilings, checks=checks,
                                         extra=extra, **common)
    baseline = results.get("torch-compile")
    for impl in impls:
        entry = results[impl]
        if entry.ms is not None and baseline is not None and baseline.ms is not None:
            entry.extra["speedup_vs_torch_compile"] = round(baseline.ms / entry.ms, 3)
        run.add(entry)
    del functions, stacks, oracles
    torch._dynamo.reset()
    harness.free_cuda_memory()


def newton_schulz_float64(G: torch.Tensor, steps: int, coefficients=NS5) -> torch.Tensor:
    """The same iteration in float64 (the oracle): dtype(G) first, as every implementation."""
    from kernels import reference

    return reference.newton_schulz(G.bfloat16().double(), steps=steps, coefficients=coefficients,
                                   dtype=torch.float64)


# ---- command line --------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_newton_schulz",
        description="Newton-Schulz on one Muon step's matrices (GPT: NS5 on the 12-layer model's "
                    "768x768 and 768x3072 stacks; CIFAR: 3 steps on the six conv filters): ours "
                    "(Triton) against the record's NS in torch eager and torch.compile batched by "
                    "shape (and the CIFAR record's per-parameter loop), and ours with the Polar Express "
                    "schedule (GPT set). Each is checked against the "
                    "float64 iteration, then timed (CUDA events, median, L2 flushed). Writes "
                    "<out>/<device>/newton_schulz.{json,md,png}.")
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS),
                        help="which sets of matrices (default: both)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to compare (default: all)")
    parser.add_argument("--max-tile", type=int, choices=(32, 64, 128, 256), default=None,
                        help="cap ours' output tiles (default: the module's choice) for a manual sweep")
    parser.add_argument("--max-tile-k", type=int, choices=(16, 32, 64, 128), default=None,
                        help="cap ours' reduction tile (default: the module's choice)")
    parser.add_argument("--chunk", type=_positive_int, default=None,
                        help="ours' matrices per pass over a stack (default: the module's L2-sized choice, "
                             "kernels.newton_schulz.stack_chunk; 1000: one pass, as before issue 18)")
    harness.add_suite_options(parser)
    return parser.parse_args(argv)


NOTES = (
    "One timed call = one optimizer step's orthogonalizations: every shape group of the set, "
    "each as one stacked call (Muon's batching).",
    "TFLOP/s and % of ceiling count the dense work 4M^2N + 2M^3 per matrix and step (M <= N); "
    "ours' extra tflops_symmetric_work counts M(M+1)N + M^2(M+1) + 2M^2N (one triangle of "
    "X X^T and of A A).",
    "Inputs: randn (seed 0), fp32 for the GPT set, fp16 for the CIFAR set; every implementation "
    "iterates in bf16 and is checked against the same iteration in float64 on the bf16-rounded "
    "input; ok when rel_err_vs_float64 <= 4 * 2^-8 * steps.",
    "launches: CUDA kernels per call, counted once with torch.profiler; ours launches "
    "1 + 3 x steps per pass over a stack (passes_per_group_ours in the metadata).",
    "torch-compile: torch.compile(dynamic=False) of the record's NS, default mode, one graph per "
    "shape group. record-loop (CIFAR): the airbench record's per-parameter loop, eager.",
    "ours-triton-polar: ours with coefficients='polar_express' (the current modded-nanogpt "
    "record's per-step triples, safety factor folded into step 1): the same kernels and work as "
    "ours-triton, checked against the float64 iteration with that schedule; GPT set only.",
)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not harness.cuda_available_or_explain():
        return 0
    ns_module = importlib.import_module("kernels.newton_schulz")
    if args.max_tile is not None:
        ns_module._MAX_TILE = args.max_tile
    if args.max_tile_k is not None:
        ns_module._MAX_TILE_K = args.max_tile_k
    if args.chunk is not None:
        ns_module._CHUNK = args.chunk
    timing = harness.timing_for(args.quick)
    device = torch.device("cuda")
    run = harness.start_run(
        OP, title="Newton-Schulz on one Muon step's matrices, bf16 iteration",
        out_root=args.out, timing=timing, notes=NOTES,
        extra_metadata={"max_tile": ns_module._MAX_TILE, "max_tile_k": ns_module._MAX_TILE_K,
                        "chunk": args.chunk,
                        "passes_per_group_ours": {name: [-(-math.prod(g[:-2]) // ns_module.chunk_of(g, device))
                                                         for g in spec["groups"]()]
                                                  for name, spec in SETS.items()}})
    for set_name in args.sets:
        run_set(run, set_name, args.impls, timer=lambda fn: harness.time_ms(fn, timing), device="cuda")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
