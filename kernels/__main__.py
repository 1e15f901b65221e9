"""`python -m kernels`: what is built and which implementation each op runs.

    python -m kernels          a readable summary
    python -m kernels --json   kernels.backends() as JSON
"""
from __future__ import annotations

import argparse
import json

import kernels


def summary(report: dict) -> str:
    extension = report["cuda_extension"]
    lines = [
        f"backend setting : {report['selected']} (set_backend() or KERNELS_BACKEND)",
        "CUDA extension  : " + ("built (kernels._C)" if extension["built"]
                                else f"not built -- {extension['error']}"),
        f"triton          : {report['triton']['version'] or 'not installed'}"
        + (" (interpreter on: TRITON_INTERPRET=1)" if report["triton"]["interpreter"] else ""),
        f"GPU             : {report['gpu'] or 'none visible'}",
        "",
        f"{'op':32} {'fast kernels':14} {'on CUDA tensors':18} on CPU tensors",
    ]
    for op, entry in report["ops"].items():
        lines.append(f"{op:32} {','.join(entry['kernels']) or '-':14} "
                     f"{entry['on_cuda_tensors']:18} {entry['on_cpu_tensors']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print kernels.backends() as JSON")
    args = parser.parse_args(argv)
    report = kernels.backends()
    print(json.dumps(report, indent=1) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
