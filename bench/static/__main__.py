"""`python -m bench.static`: what every kernel compiles to at the speedrun's shapes (CPU only).

Writes bench/results/static/<op>.json and <op>.md per op family (or only those named with
--only), from sm_90 cubins compiled ahead of time and cached (bench.static.build).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # the AOT child compiles; nothing here interprets

from bench.static import families, report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(families.FAMILIES), help="op families to read")
    parser.add_argument("--out", default=str(report.OUT), help="output folder (default: bench/results/static)")
    args = parser.parse_args(argv)
    for stem in args.only or list(families.FAMILIES):
        start = time.perf_counter()
        record = report.op_record(families.FAMILIES[stem]())
        paths = report.write(record, report.Path(args.out))
        print(f"{stem}: floor {record['floor_ms']} ms, predicted {record['predicted_ms']} ms "
              f"({time.perf_counter() - start:.1f} s) -> {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
