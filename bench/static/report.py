"""One kernel's static record, one op's prediction, and the JSON/markdown files."""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench import harness
from bench.static import build, hopper, sass
from bench.static.families import Kernel, Op

OUT = Path(__file__).resolve().parents[1] / "results" / "static"
RESULTS = OUT.parent  # bench/results/<device>/<op>.json: what the benches measured


def _wgmma_in_flight(instrs: list[sass.Instr]) -> int | None:
    """The fewest wgmma groups left in flight at any wait inside an innermost loop that
    issues wgmma (the K loop); without such a loop, at any wait at all."""
    in_loops = []
    for span in sass.innermost(sass.loops(instrs)):
        body = sass.within(instrs, span)
        if any(i.base.endswith("GMMA") for i in body):
            in_loops += sass.census(body)["wgmma_waits"]
    waits = in_loops or sass.census(sass.code(instrs))["wgmma_waits"]
    return min(waits) if waits else None


def _path_free(function: str) -> str:
    """The symbol with nvcc's anonymous-namespace hash masked: that hash comes from the
    build folder's path, so the committed records would change with every checkout.  The
    mask keeps the hash's length, so the mangled name still demangles."""
    return re.sub(r"(_GLOBAL__N__)([0-9a-f]+)(?=_)", lambda m: m.group(1) + "x" * len(m.group(2)), function)


def kernel_record(kernel: Kernel, cubin: Path, compiled: dict | None) -> dict:
    functions = sass.sass(str(cubin))
    if kernel.backend == "cuda":
        matches = [name for name in functions if kernel.symbol in name]
        if len(matches) != 1:
            raise RuntimeError(f"{kernel.name}: {len(matches)} kernels in csrc/{kernel.source} match {kernel.symbol!r}")
        function, threads = matches[0], kernel.threads
    else:
        function, threads = compiled["name"], 32 * compiled["num_warps"]
    instrs = functions[function]
    res = sass.resources(str(cubin))[function]
    smem = res["static_smem_bytes"] + (kernel.dynamic_smem if kernel.backend == "cuda" else compiled["shared"])
    occ = hopper.occupancy(res["registers"], threads, smem)
    census = sass.census(sass.code(instrs))
    record = {
        "name": kernel.name, "role": kernel.role, "backend": kernel.backend, "function": _path_free(function),
        "runs_in_speedrun": kernel.runs_in_speedrun,
        "registers": res["registers"], "spill_bytes": res["stack_bytes"] + res["local_bytes"],
        "smem_bytes": smem, "threads": threads, "ctas": kernel.ctas, "ctas_per_sm": occ["ctas_per_sm"],
        "occupancy_limited_by": occ["limited_by"], "occupancy": round(occ["occupancy"], 3),
        "instructions": census["instructions"], "loops": len(sass.loops(instrs)),
        "mma": census["mma"], "wgmma_waits": sorted(set(census["wgmma_waits"])),
        "wgmma_in_flight": _wgmma_in_flight(instrs),
        "tma_loads": census["tma_loads"], "tma_stores": census["tma_stores"], "cp_async": census["cp_async"],
        "global_loads": census["global_loads"], "global_stores": census["global_stores"],
        "local_accesses": census["local_accesses"],
    }
    if compiled is not None:
        record["specialization"] = {k: compiled[k] for k in ("signature", "specialized_to_constexpr",
                                                               "divisible_by_16", "num_stages")}
    if kernel.per_element:
        method = kernel.per_element[0]
        if method == "path":
            _, per_thread, assumed = kernel.per_element
            offsets = sass.param_offsets(str(cubin), function)
            constants = {offsets[ordinal] + byte: value for (ordinal, byte), value in assumed.items()}
            counted = sass.census(sass.path(instrs, constants))
            ipe, mpe = counted["instructions"] / per_thread, counted["mufu"] / per_thread
            how = (f"whole kernel on the path for params {{(ordinal, byte): value}} = "
                   f"{ {str(k): v for k, v in assumed.items()} }, / {per_thread} elements per thread")
        elif method == "shared_loops":
            # The hot loops (those with MUFU ops) of a kernel that reads its row from shared
            # memory: each 16-byte shared load is `pack` elements, so a loop's elements per
            # iteration are counted from its own LDS.128s whatever its unrolling.
            pack = kernel.per_element[1]
            spans = [s for s in sass.innermost(sass.loops(instrs)) if sass.census(sass.within(instrs, s))["mufu"]]
            bodies = [sass.within(instrs, span) for span in spans]
            elements = [pack * sum(1 for i in body if i.op == "LDS.128") for body in bodies]
            if not spans or 0 in elements:
                raise RuntimeError(f"{kernel.name}: hot loops {spans} without 16-byte shared loads")
            ipe = sum(sass.census(b)["instructions"] / e for b, e in zip(bodies, elements))
            mpe = sum(sass.census(b)["mufu"] / e for b, e in zip(bodies, elements))
            how = (f"sum over {len(spans)} innermost loops with MUFU ops of instructions / elements per iteration "
                   f"({[len(b) for b in bodies]} instructions, {elements} elements: {pack} per LDS.128)")
        else:
            per_iteration = kernel.per_element[1]
            spans = sass.innermost(sass.loops(instrs))
            bodies = [sass.census(sass.within(instrs, span)) for span in spans]
            ipe = sum(b["instructions"] for b in bodies) / per_iteration
            mpe = sum(b["mufu"] for b in bodies) / per_iteration
            how = (f"sum of {len(spans)} innermost loop bodies ({[b['instructions'] for b in bodies]} instructions)"
                   f" / {per_iteration} elements per iteration per thread")
        bounds = hopper.bounds_ms(bytes_=0, flops=0, flop_kind=None, elements=kernel.elements,
                                  instructions_per_element=ipe, mufu_per_element=mpe)
        record.update({"instructions_per_element": round(ipe, 2), "mufu_per_element": round(mpe, 3),
                       "per_element_counted_over": how,
                       "issue_bound_ms": round(bounds["issue_bound_ms"], 3),
                       "mufu_bound_ms": round(bounds["mufu_bound_ms"], 3)})
    return record


def op_record(op: Op) -> dict:
    triton_kernels = [k for k in op.kernels if k.backend == "triton"]
    compiled = dict(zip(map(id, triton_kernels), build.triton_cubins([k.spec for k in triton_kernels])))
    kernels = []
    for kernel in op.kernels:
        if kernel.backend == "cuda":
            kernels.append(kernel_record(kernel, build.cuda_cubin(kernel.source), None))
        else:
            cubin, meta = compiled[id(kernel)]
            kernels.append(kernel_record(kernel, cubin, meta))
    # The kernel that carries the op's work: the first matrix kernel, else the first that runs.
    running = [k for k in kernels if k["runs_in_speedrun"]]
    main = next((k for k in running if k["mma"]), running[0])
    bounds = hopper.bounds_ms(bytes_=op.bytes, flops=op.flops, flop_kind=op.flop_kind)
    for name in ("issue_bound_ms", "mufu_bound_ms"):
        bounds[name] = main.get(name)
    known = [v for v in bounds.values() if v is not None]
    wave = hopper.waves(main["ctas"], main["ctas_per_sm"])
    floor = max(v for k, v in bounds.items() if k.endswith("floor_ms") and v is not None)
    record = {"op": op.stem, "shape": op.shape, "bench_case": op.bench_case,
              "kernel_sources": harness.kernel_sources(op.stem), "bytes": op.bytes, "flops": op.flops,
              "floor_ms": round(floor, 3), "predicted_ms": round(max(known) * wave, 3),
              "bounds_ms": {k: (round(v, 3) if v is not None else None) for k, v in bounds.items()},
              "predicted_from": main["name"], "wave_factor": round(wave, 3),
              "assumptions": hopper.ASSUMPTIONS + op.notes, "toolchain": _toolchain(), "kernels": kernels}
    record["measured"] = measured_beside(record)
    return record


def measured_beside(record: dict, results: Path = RESULTS) -> list[dict]:
    """The committed GPU results of the predicted case, one row per device, from a bench run
    on the same kernel sources (harness.kernel_sources): a measurement of other code says
    nothing about this reading.  Empty until a GPU has measured these sources."""
    rows = []
    for path in sorted(results.glob(f"*/{record['op']}.json")):
        if path.parent == OUT:
            continue
        data = json.loads(path.read_text())
        metadata = data.get("metadata") or {}
        if (metadata.get("kernel_sources") or {}).get("sha256") != record["kernel_sources"]["sha256"]:
            continue
        ours, rival = harness.best_per_side([e for e in data.get("results", []) if e["case"] == record["bench_case"]])
        if ours is None:
            continue
        rows.append({"device": metadata.get("device"), "commit": metadata.get("git_commit"),
                     "dirty": metadata.get("git_dirty"), "results": path.relative_to(results).as_posix(),
                     "ours": ours["impl"], "ours_ms": ours["ms"],
                     "measured_over_predicted": round(ours["ms"] / record["predicted_ms"], 3),
                     "best_competitor": rival["impl"] if rival else None,
                     "competitor_ms": rival["ms"] if rival else None})
    return rows


def _toolchain() -> dict:
    import triton
    return {"triton": triton.__version__, "nvcc": build.nvcc_version(), "arch": build.ARCH}


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


COLUMNS = ("registers", "spill_bytes", "smem_bytes", "threads", "ctas_per_sm", "occupancy_limited_by", "mma",
           "wgmma_in_flight", "tma_loads", "cp_async", "global_loads", "global_stores",
           "instructions_per_element", "mufu_per_element")


def markdown(record: dict) -> str:
    lines = [f"# Static reading: {record['op']}", "",
             "Generated by `python -m bench.static` from the sm_90 SASS; no GPU involved. "
             "Do not edit: regenerate.", "",
             f"Shape: {record['shape']}.", "",
             f"**Floor {record['floor_ms']} ms; predicted {record['predicted_ms']} ms** "
             f"(from {record['predicted_from']}, wave factor {record['wave_factor']}). "
             f"Bounds: {_cell(record['bounds_ms'])}.", ""]
    lines += _measured_lines(record)
    lines += ["", "Assumptions:", ""]
    lines += [f"- {a}" for a in record["assumptions"]]
    lines += ["", "| kernel | runs | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for k in record["kernels"]:
        lines.append(f"| {k['name']} | {'yes' if k['runs_in_speedrun'] else 'fallback'} | "
                     + " | ".join(_cell(k.get(c)) for c in COLUMNS) + " |")
    lines += ["", "Per-element counts:", ""]
    lines += [f"- {k['name']}: {k['per_element_counted_over']}" for k in record["kernels"]
              if "per_element_counted_over" in k]
    return "\n".join(lines) + "\n"


def _measured_lines(record: dict) -> list[str]:
    sources = record["kernel_sources"]
    head = (f"Predicted and measured: bench case `{record['bench_case']}`, kernel sources "
            f"{', '.join(sources['files'])} (sha256 {sources['sha256'][:12]}).")
    if not record["measured"]:
        return [head, "", "Measured: none yet on these sources (a GPU run of `python -m bench` or "
                          "`bash bench/gpu_session.sh`, committed under bench/results/<device>/, fills this in)."]
    lines = [head, "", "| device | commit | ours | measured ms | predicted ms | measured / predicted "
                       "| best competitor | ms |", "|---|---|---|---|---|---|---|---|"]
    for row in record["measured"]:
        commit = (row["commit"] or "unknown")[:12] + (" (dirty)" if row["dirty"] else "")
        lines.append(f"| {row['device']} | {commit} | {row['ours']} | {row['ours_ms']:.4g} | "
                     f"{record['predicted_ms']} | {row['measured_over_predicted']} | "
                     f"{row['best_competitor'] or '-'} | {_cell(row['competitor_ms'])} |")
    return lines


def write(record: dict, out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{record['op']}.json", out / f"{record['op']}.md"]
    paths[0].write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    paths[1].write_text(markdown(record))
    return paths
