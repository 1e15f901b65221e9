"""`python -m kernels`: what is built, which implementation each op runs, and which path
the Triton kernels whose code depends on a Triton feature take with the triton installed.

    python -m kernels          a readable summary
    python -m kernels --json   kernels.backends() plus "triton_paths", as JSON
    python -m kernels --json --output FILE    the same, written to FILE
"""
from __future__ import annotations

import argparse
import importlib
import json

import kernels

# The modules, not the ops of the same name that kernels/__init__.py exports.
relu2_mlp = importlib.import_module("kernels.relu2_mlp")
swa = importlib.import_module("kernels.sliding_window_attention")
swa_gluon = importlib.import_module("kernels.sliding_window_attention_gluon")


def triton_paths() -> dict[str, str]:
    """{ops: the path their Triton kernels take here}, for the kernels with a feature switch.

    The MLP GEMM imports Triton's host-side TensorDescriptor once at import and, without
    it, has only the pointer variant.  The attention forward has a Gluon kernel where
    triton.experimental.gluon's Hopper API imports, used only when asked for (FORWARD).
    Every other kernel uses features all supported tritons (3.6-3.8) have: one path.
    """
    if relu2_mlp.TensorDescriptor is None:
        mlp = "pointer variant only (this triton has no triton.tools.tensor_descriptor)"
    else:
        mlp = "TMA tensor descriptors on sm_90+ with 16-byte aligned operands, else the pointer variant"
    if swa_gluon.AVAILABLE:
        attention = (f"forward: {swa.FORWARD} kernel (SPEEDRUN_ATTENTION_FORWARD=triton|gluon; the Gluon one, "
                     "Hopper only, keeps a wgmma group in flight across the softmax)")
    else:
        attention = "forward: triton kernel only (this triton has no Gluon Hopper API)"
    return {f"{relu2_mlp.OP_MLP}, {relu2_mlp.OP_LINEAR}": mlp, swa.OP: attention}


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
    if report.get("triton_paths"):
        lines += ["", f"triton {report['triton']['version']} kernel paths:"]
        lines += [f"  {ops}: {path}" for ops, path in report["triton_paths"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print kernels.backends() as JSON")
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of printing")
    args = parser.parse_args(argv)
    report = kernels.backends()
    if report["triton"]["version"] is not None:
        report["triton_paths"] = triton_paths()
    text = json.dumps(report, indent=1) if args.json else summary(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
