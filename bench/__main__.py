"""`python -m bench`: run the benchmark suite.

The suite is every module bench/bench_<name>.py that defines `main(argv) -> int`; a new
benchmark joins by existing.  Every bench's main accepts `--out DIR` and `--quick`, which
the suite passes on; each also runs alone with its own options
(`python -m bench.bench_<name> --help`).  Benches run in one process, so the device's
ceilings are measured once and shared.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

import bench
from bench import harness

PREFIX = "bench_"


def discover() -> tuple[dict, dict]:
    """({name: module} of the runnable benches, {name: error} of those that failed to import)."""
    found, broken = {}, {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda info: info.name):
        if not info.name.startswith(PREFIX):
            continue
        name = info.name.removeprefix(PREFIX)
        try:
            module = importlib.import_module(f"bench.{info.name}")
        except Exception as exc:
            broken[name] = harness.describe_error(exc)
            continue
        if callable(getattr(module, "main", None)):
            found[name] = module
    return found, broken


def _summary(module) -> str:
    """The first paragraph of a module's docstring, on one line."""
    paragraph = (module.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmark suite: every bench/bench_<name>.py with a main(argv). "
                    "Each measures the device's ceilings (copy bandwidth, bf16 and fp8 matmul), "
                    "checks each implementation against torch eager, times it with CUDA events, "
                    "and writes <out>/<device>/<name>.{json,md,png}. Without a CUDA GPU nothing "
                    "is measured and the exit status is 0. For one bench's own options: "
                    "python -m bench.bench_<name> --help.")
    parser.add_argument("--list", action="store_true", help="list the benches and exit")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this bench (e.g. softcap_ce); repeat for several")
    harness.add_suite_options(parser)  # passed on to every bench
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    benches, broken = discover()
    if args.list:
        for name in sorted({**benches, **broken}):
            if name in broken:
                print(f"{name:<24} cannot be imported: {broken[name]}")
            else:
                print(f"{name:<24} {_summary(benches[name])}")
        return 0
    known = sorted({**benches, **broken})
    wanted = list(dict.fromkeys(name.removeprefix(PREFIX) for name in args.only)) if args.only else known
    unknown = [name for name in wanted if name not in known]
    if unknown:
        print(f"unknown bench {', '.join(unknown)}; available: {', '.join(known)}", file=sys.stderr)
        return 2
    if not harness.cuda_available_or_explain():
        return 0
    forwarded = ["--out", args.out] + (["--quick"] if args.quick else [])
    failures = []
    for name in wanted:
        print(f"== {name}", flush=True)
        if name in broken:
            print(f"cannot be imported: {broken[name]}", file=sys.stderr)
            failures.append(name)
            continue
        try:
            status = benches[name].main(forwarded)
        except SystemExit as exc:  # argparse refusing an option exits; the suite goes on
            status = exc.code
        except Exception:  # one broken bench must not cost the others their results
            traceback.print_exc()
            status = 1
        if status:
            failures.append(name)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
