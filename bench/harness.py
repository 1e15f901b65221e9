"""What every benchmark shares: timing, the device's ceilings, result records and their files.

Timing.  `time_ms` is triton.testing.do_bench with the median: CUDA events around each
run, a warm-up, and the L2 cache flushed before every run, so an op never reads inputs
that the previous run left in cache.  Inputs much smaller than L2 can also rotate among
several copies (`rotating`, `rotation_count`), so consecutive runs touch different memory.

Ceilings.  Copy bandwidth, bf16 and fp8 matmul throughput are measured on this device at
the start of a run, once per process (the suite runner shares them among benches), so a
result reads as "x % of what this GPU, with this driver and these clocks, can do".

Records.  One `Entry` per (case, implementation): its time, the throughput derived from
the work the case must do (bytes moved or FLOPs), and the fraction of the relevant
ceiling.  An implementation that cannot run (extension not built, out of memory, wrong
result) is an entry with an error string, not a crash.

Files.  `BenchRun` writes bench/results/<device-slug>/<op>.json (every number and the
metadata), <op>.md (a table) and <op>.png (a bar chart), and rewrites all three after
every entry, so a run that dies midway keeps what it measured ("complete": false).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
SCHEMA_VERSION = 1
# What a user without a GPU can do instead: the compiled-code readings, the committed
# results, and the one-call GPU session's CPU dry run.
NO_GPU_MESSAGE = ("No CUDA GPU found (torch.cuda.is_available() is False), so nothing was measured.\n"
                  "Without a GPU: `python -m bench.static` reads the kernels' compiled sm_90 code "
                  "(registers, spills, wgmma, predicted times), bench/results/ holds committed readings, "
                  "and `bash bench/gpu_session.sh --dry-run` rehearses the GPU session on the CPU.")

GBPS = "GB/s"
TFLOPS = "TFLOP/s"


# ---- timing --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
    """do_bench's budget: milliseconds of warm-up runs, then milliseconds of timed runs."""
    warmup_ms: float
    rep_ms: float


FULL_TIMING = Timing(warmup_ms=200.0, rep_ms=1000.0)
QUICK_TIMING = Timing(warmup_ms=25.0, rep_ms=100.0)


def add_suite_options(parser) -> None:
    """--out and --quick: the options every bench takes, so `python -m bench` can pass them on."""
    parser.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                        help="results root; files go to DIR/<device-slug>/ (default: bench/results)")
    parser.add_argument("--quick", action="store_true",
                        help=f"short timing windows (warm-up {QUICK_TIMING.warmup_ms:g} ms, {QUICK_TIMING.rep_ms:g} ms "
                             f"of runs instead of {FULL_TIMING.warmup_ms:g}/{FULL_TIMING.rep_ms:g}) and only the "
                             "speedrun's own size (48K tokens per GPU) unless sizes are given: a smoke run, "
                             "noisier numbers")


def sizes_for(given: Sequence[int] | None, defaults: Sequence[int], quick: bool) -> list[int]:
    """The sizes a bench measures: those given, else its defaults, of which --quick keeps the
    first (the speedrun's own shape: every default list starts with it)."""
    if given:
        return list(given)
    return list(defaults[:1] if quick else defaults)


def timing_for(quick: bool) -> Timing:
    return QUICK_TIMING if quick else FULL_TIMING


def rotating(fn: Callable, arg_sets: Sequence[tuple]) -> Callable[[], object]:
    """A no-argument callable that calls fn(*arg_sets[0]), fn(*arg_sets[1]), ... cyclically."""
    if len(arg_sets) == 0:
        raise ValueError("arg_sets must hold at least one tuple of arguments")
    sets = itertools.cycle(arg_sets)

    def call():
        return fn(*next(sets))

    return call


def rotation_count(bytes_per_set: int, cache_bytes: int) -> int:
    """How many input sets to rotate so that together they span at least twice the cache.

    With that many, a set has been evicted by the others before it comes round again.
    """
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    return max(1, math.ceil(2 * cache_bytes / bytes_per_set))


def time_ms(fn: Callable, timing: Timing, arg_sets: Sequence[tuple] | None = None) -> float:
    """Median milliseconds of fn() (or of fn(*args), args cycling over arg_sets) on the GPU."""
    from triton.testing import do_bench

    call = fn if arg_sets is None else rotating(fn, arg_sets)
    return float(do_bench(call, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median"))


def free_cuda_memory() -> None:
    """Return cached blocks to the driver, so the next implementation starts from a clean heap."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """One line for the record: the exception type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- derived metrics -----------------------------------------------------------------

def gb_per_s(bytes_moved: float, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def tflop_per_s(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def fraction_of(value: float | None, ceiling: float | None) -> float | None:
    """value / ceiling, or None when either is unknown (a ceiling that failed to measure)."""
    if value is None or ceiling is None or ceiling <= 0:
        return None
    return value / ceiling


# ---- ceilings ------------------------------------------------------------------------

COPY_BANDWIDTH = "copy_bandwidth"
BF16_MATMUL = "bf16_matmul"
FP8_MATMUL = "fp8_matmul"
FP8_MATMUL_PROMOTED = "fp8_matmul_promoted"

COPY_BYTES = 1 << 30  # 1 GiB each way: far beyond L2, long enough to reach steady state
MATMUL_SIZE = 8192


@dataclasses.dataclass
class Ceiling:
    label: str
    unit: str
    value: float | None
    ms: float | None = None
    detail: str = ""
    error: str | None = None


def _measure_ceiling(label: str, unit: str, detail: str, work: float,
                     make_fn: Callable[[], Callable], timing: Timing) -> Ceiling:
    """Time the function make_fn() builds; work is its bytes (GB/s) or FLOPs (TFLOP/s)."""
    try:
        ms = time_ms(make_fn(), timing)
    except Exception as exc:  # e.g. fp8 matmul unsupported by this torch/GPU
        return Ceiling(label, unit, None, detail=detail, error=describe_error(exc))
    finally:
        free_cuda_memory()
    value = gb_per_s(work, ms) if unit == GBPS else tflop_per_s(work, ms)
    return Ceiling(label, unit, value, ms=ms, detail=detail)


def _copy_fn():
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _bf16_matmul_fn():
    # Random operands: power draw (and so clocks) depends on the data; zeros would flatter.
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    return lambda: torch.matmul(a, b, out=out)


def _fp8_matmul_fn(fast_accum: bool = True):
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda").to(torch.float8_e4m3fn)
    # _scaled_mm wants the second operand column-major: the transpose of a row-major tensor.
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda", dtype=torch.float32)

    # fast_accum: one tensor-core chain over K, as the records' FP8 forward uses: the
    # throughput an FP8 kernel can reach.  Without it cuBLASLt promotes the partial sums to
    # fp32 along K (the records' backward): the ceiling for promoted-accumulation GEMMs.
    def matmul():
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)

    matmul()  # an unsupported GPU or torch fails here, with a clear error, not inside do_bench
    return matmul


_ceilings: dict[str, Ceiling] | None = None


def measure_ceilings(timing: Timing) -> dict[str, Ceiling]:
    """The device's ceilings, measured on the first call in this process and then reused."""
    global _ceilings
    if _ceilings is None:
        matmul_flops = 2 * MATMUL_SIZE**3
        size = f"{MATMUL_SIZE}x{MATMUL_SIZE}x{MATMUL_SIZE}"
        _ceilings = {
            COPY_BANDWIDTH: _measure_ceiling(
                "copy bandwidth", GBPS,
                f"device-to-device copy of {COPY_BYTES / 2**30:g} GiB, bytes read + bytes written",
                2 * COPY_BYTES, _copy_fn, timing),
            BF16_MATMUL: _measure_ceiling(
                "bf16 matmul", TFLOPS, f"torch.matmul {size}, bf16 randn operands",
                matmul_flops, _bf16_matmul_fn, timing),
            FP8_MATMUL: _measure_ceiling(
                "fp8 matmul", TFLOPS,
                f"torch._scaled_mm {size}, e4m3 operands, per-tensor scales, bf16 out, fast accumulation",
                matmul_flops, _fp8_matmul_fn, timing),
            FP8_MATMUL_PROMOTED: _measure_ceiling(
                "fp8 matmul, promoted", TFLOPS,
                f"torch._scaled_mm {size}, e4m3 operands, per-tensor scales, bf16 out, use_fast_accum=False",
                matmul_flops, lambda: _fp8_matmul_fn(fast_accum=False), timing),
        }
    return _ceilings


# ---- records -------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    """One (case, implementation) result; ms/value are None when error says why."""
    case: str
    impl: str
    params: dict
    ms: float | None
    unit: str                       # GB/s or TFLOP/s
    value: float | None             # the throughput in `unit`
    ceiling: str                    # key into the run's ceilings
    fraction_of_ceiling: float | None
    work: dict                      # {"bytes": ...} or {"flops": ...}: what the case must do
    checks: dict = dataclasses.field(default_factory=dict)   # correctness, e.g. relative errors
    extra: dict = dataclasses.field(default_factory=dict)    # anything else worth keeping
    error: str | None = None


def _work(bytes_moved: int | None, flops: int | None) -> tuple[dict, str]:
    if (bytes_moved is None) == (flops is None):
        raise ValueError("give exactly one of bytes_moved and flops")
    return ({"bytes": bytes_moved}, GBPS) if bytes_moved is not None else ({"flops": flops}, TFLOPS)


def measured(case: str, impl: str, ms: float, *, ceiling: str, ceilings: dict[str, Ceiling],
             bytes_moved: int | None = None, flops: int | None = None, params: dict | None = None,
             checks: dict | None = None, extra: dict | None = None) -> Entry:
    """An entry for a timed run: throughput from the case's bytes or FLOPs, and its share of `ceiling`."""
    work, unit = _work(bytes_moved, flops)
    value = gb_per_s(bytes_moved, ms) if unit == GBPS else tflop_per_s(flops, ms)
    ceiling_value = ceilings[ceiling].value if ceiling in ceilings else None
    return Entry(case, impl, dict(params or {}), ms, unit, value, ceiling,
                 fraction_of(value, ceiling_value), work, dict(checks or {}), dict(extra or {}))


def failed(case: str, impl: str, error: str, *, ceiling: str, bytes_moved: int | None = None,
           flops: int | None = None, params: dict | None = None, checks: dict | None = None,
           extra: dict | None = None) -> Entry:
    """An entry for an implementation that could not be timed, with the reason."""
    work, unit = _work(bytes_moved, flops)
    return Entry(case, impl, dict(params or {}), None, unit, None, ceiling, None, work,
                 dict(checks or {}), dict(extra or {}), error)


def best_per_side(entries: Sequence[dict]) -> tuple[dict | None, dict | None]:
    """(our fastest, the fastest competitor) among one case's timed entries, as stored in a
    result's JSON.  An implementation is ours when its name starts with "ours" (the
    benches' convention)."""
    timed = [e for e in entries if e.get("ms") is not None]
    ours = min((e for e in timed if e["impl"].startswith("ours")), key=lambda e: e["ms"], default=None)
    rival = min((e for e in timed if not e["impl"].startswith("ours")), key=lambda e: e["ms"], default=None)
    return ours, rival


def format_entry(entry: Entry, ceilings: dict[str, Ceiling]) -> str:
    """The progress line printed as each entry completes."""
    head = f"{entry.case:<28} {entry.impl:<14}"
    if entry.error is not None:
        return f"{head} error: {entry.error}"
    share = ""
    if entry.fraction_of_ceiling is not None:
        share = f"  {100 * entry.fraction_of_ceiling:5.1f}% of {ceilings[entry.ceiling].label}"
    return f"{head} {entry.ms:9.4g} ms  {entry.value:8.4g} {entry.unit}{share}"


# ---- metadata ------------------------------------------------------------------------

def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the results folder of a device."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty): dirty counts changed and untracked files, except the results themselves."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return (commit.strip() if commit else None), (None if status is None else bool(status.strip()))


def kernel_sources(op: str) -> dict:
    """The files that hold an op family's kernels (kernels/<op>.py and kernels/<op>_*.py,
    csrc/<op>.cu) and one sha256 over their paths and contents.  A result carries it, so a
    static prediction is put beside a measurement only when both read the same kernel code
    (bench.static), whatever commit either was made at and whether git is there at all.
    A bench op named past its family's stem ("relu2_mlp_dw") is that family's ("relu2_mlp")."""
    family = op
    while not (REPO_ROOT / "kernels" / f"{family}.py").is_file() and "_" in family:
        family = family.rsplit("_", 1)[0]
    files = [REPO_ROOT / "kernels" / f"{family}.py", *sorted((REPO_ROOT / "kernels").glob(f"{family}_*.py")),
             REPO_ROOT / "csrc" / f"{family}.cu"]
    files = [f for f in files if f.is_file()]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"files": [f.relative_to(REPO_ROOT).as_posix() for f in files],
            "sha256": digest.hexdigest() if files else None}



def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: the field stays empty
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def command_line() -> str:
    """The command that started this process, as `python -m <module> <args>` when run with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def _device_properties() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 2),
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 2),
    }


def collect_metadata(device_name: str, timing: Timing, extra: dict | None = None, op: str | None = None) -> dict:
    """Everything needed to reproduce or question a run, gathered when the run starts."""
    commit, dirty = git_state()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name,
        "device_slug": device_slug(device_name),
        "device_properties": _device_properties() if torch.cuda.is_available() else None,
        "driver": driver_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "kernel_sources": kernel_sources(op) if op else None,
        "command": command_line(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": {"method": "triton.testing.do_bench, median, L2 flushed before each run",
                   **dataclasses.asdict(timing)},
        "extra": dict(extra or {}),
    }


def cuda_available_or_explain() -> bool:
    """True if there is a GPU to measure on; otherwise prints why nothing will be measured."""
    if torch.cuda.is_available():
        return True
    print(NO_GPU_MESSAGE)
    return False


# ---- the run and its files -----------------------------------------------------------

def _json_safe(obj):
    """NaN and inf (a broken implementation's error) become strings: the JSON stays valid."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(key): _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(value) for value in obj]
    return obj


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a sibling temporary file, then rename: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


class BenchRun:
    """The results of one op's run, rewritten to disk after every entry."""

    def __init__(self, op: str, *, title: str, out_root: str | Path, metadata: dict,
                 ceilings: dict[str, Ceiling], notes: Sequence[str] = ()):
        self.op = op
        self.title = title
        self.metadata = metadata
        self.ceilings = ceilings
        self.notes = list(notes)
        self.entries: list[Entry] = []
        self.complete = False
        self.directory = Path(out_root) / metadata["device_slug"]
        self.save()  # the metadata and ceilings are on disk before the first case runs

    @property
    def json_path(self) -> Path:
        return self.directory / f"{self.op}.json"

    @property
    def md_path(self) -> Path:
        return self.directory / f"{self.op}.md"

    @property
    def png_path(self) -> Path:
        return self.directory / f"{self.op}.png"

    def add(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        print(format_entry(entry, self.ceilings), flush=True)
        self.save()
        return entry

    def finish(self) -> None:
        self.complete = True
        self.save()
        print(f"wrote {self.json_path}, {self.md_path.name}, {self.png_path.name}")

    def to_dict(self) -> dict:
        return _json_safe({
            "schema_version": SCHEMA_VERSION,
            "op": self.op,
            "title": self.title,
            "complete": self.complete,
            "metadata": self.metadata,
            "ceilings": {name: dataclasses.asdict(c) for name, c in self.ceilings.items()},
            "notes": self.notes,
            "results": [dataclasses.asdict(entry) for entry in self.entries],
        })

    def save(self) -> None:
        data = self.to_dict()
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        _replace_atomically(self.json_path, lambda p: p.write_text(text))
        markdown = render_markdown(data)
        _replace_atomically(self.md_path, lambda p: p.write_text(markdown))
        _replace_atomically(self.png_path, lambda p: render_png(data, p))


def start_run(op: str, *, title: str, out_root: str | Path, timing: Timing,
              notes: Sequence[str] = (), extra_metadata: dict | None = None) -> BenchRun:
    """Gather metadata, measure (or reuse) the ceilings, and open the op's result files."""
    device_name = torch.cuda.get_device_name()
    metadata = collect_metadata(device_name, timing, extra_metadata, op=op)
    print(f"{op}: {device_name}, torch {metadata['torch']}, triton {metadata['triton']}, "
          f"commit {(metadata['git_commit'] or 'unknown')[:12]}{' (dirty)' if metadata['git_dirty'] else ''}",
          flush=True)
    ceilings = measure_ceilings(timing)
    for ceiling in ceilings.values():
        shown = f"{ceiling.value:.4g} {ceiling.unit}" if ceiling.value is not None else f"error: {ceiling.error}"
        print(f"  ceiling {ceiling.label}: {shown}", flush=True)
    return BenchRun(op, title=title, out_root=out_root, metadata=metadata, ceilings=ceilings, notes=notes)


# ---- rendering (from the JSON dict, so the table and chart show exactly what is stored) --

def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _details(entry: dict) -> str:
    items = {**entry["checks"], **entry["extra"]}
    parts = []
    for key, value in items.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'yes' if value else 'NO'}")
        elif isinstance(value, float) and key.endswith("_err"):  # errors span decades: scientific
            parts.append(f"{key}={value:.2e}")
        elif isinstance(value, float):
            parts.append(f"{key}={_number(value)}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def render_markdown(data: dict) -> str:
    meta, ceilings = data["metadata"], data["ceilings"]
    status = ("complete" if data["complete"] else
              "**incomplete**: the run stopped early or is still going; the rows below are what finished")
    commit = meta.get("git_commit") or "unknown"
    dirty = {True: " (uncommitted changes)", False: "", None: " (tree state unknown)"}[meta.get("git_dirty")]
    timing = meta.get("timing", {})
    lines = [
        f"# {data['op']}: {data['title']}",
        "",
        f"Status: {status}",
        "",
        "| | |",
        "|---|---|",
        f"| device | {_cell(meta.get('device'))} (driver {meta.get('driver')}, CUDA {meta.get('cuda')}) |",
        f"| torch / triton | {meta.get('torch')} / {meta.get('triton')} |",
        f"| commit | `{commit}`{dirty} |",
        f"| when | {meta.get('timestamp')} |",
        f"| command | `{_cell(meta.get('command'))}` |",
        f"| timing | {_cell(timing.get('method'))}; warm-up {timing.get('warmup_ms')} ms, "
        f"{timing.get('rep_ms')} ms of timed runs |",
        "",
        "## Ceilings (measured at the start of this run)",
        "",
        "| ceiling | value | how |",
        "|---|---|---|",
    ]
    for ceiling in ceilings.values():
        value = (f"{_number(ceiling['value'])} {ceiling['unit']}" if ceiling["value"] is not None
                 else f"error: {_cell(ceiling['error'])}")
        lines.append(f"| {ceiling['label']} | {value} | {_cell(ceiling['detail'])} |")
    lines += [
        "",
        "## Results",
        "",
        "| case | implementation | ms | throughput | % of ceiling | checks | error |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for entry in data["results"]:
        ms = _number(entry["ms"]) if entry["ms"] is not None else "-"
        throughput = f"{_number(entry['value'])} {entry['unit']}" if entry["value"] is not None else "-"
        share = "-"
        if entry["fraction_of_ceiling"] is not None:
            label = ceilings.get(entry["ceiling"], {}).get("label", entry["ceiling"])
            share = f"{100 * entry['fraction_of_ceiling']:.1f}% of {label}"
        lines.append(f"| {_cell(entry['case'])} | {_cell(entry['impl'])} | {ms} | {throughput} | {share} "
                     f"| {_cell(_details(entry))} | {_cell(entry['error'] or '')} |")
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in data["notes"]]
    return "\n".join(lines) + "\n"


def _in_order(values) -> list:
    return list(dict.fromkeys(values))


def render_png(data: dict, path: Path) -> None:
    """Grouped bars: one group per case, one bar per implementation, one panel per unit,
    each panel with its ceilings drawn as dashed lines and bars labelled with their share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = data["results"]
    units = _in_order(entry["unit"] for entry in entries) or [None]
    impls = _in_order(entry["impl"] for entry in entries)
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    most_cases = max([len(_in_order(e["case"] for e in entries if e["unit"] == u)) for u in units] + [1])
    width_in = max(7.0, 1.5 + most_cases * (0.5 + 0.4 * max(1, len(impls))))
    fig, axes = plt.subplots(len(units), 1, figsize=(width_in, 4.5 * len(units)), squeeze=False)
    fig.suptitle(f"{data['op']}: {data['title']}\n{data['metadata'].get('device')}", fontsize=10)
    for ax, unit in zip(axes[:, 0], units):
        if unit is None:
            ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        mine = [entry for entry in entries if entry["unit"] == unit]
        cases = _in_order(entry["case"] for entry in mine)
        bar_width = 0.8 / max(1, len(impls))
        top = 0.0
        for entry in mine:
            x = cases.index(entry["case"]) + (impls.index(entry["impl"]) - (len(impls) - 1) / 2) * bar_width
            label = entry["impl"] if entry["impl"] not in ax.get_legend_handles_labels()[1] else None
            if entry["value"] is None:
                ax.text(x, 0.02, "error", rotation=90, ha="center", va="bottom", fontsize=7, color="red",
                        transform=ax.get_xaxis_transform())  # x in data, y in axes units
                continue
            ax.bar(x, entry["value"], bar_width, color=colors[entry["impl"]], label=label)
            top = max(top, entry["value"])
            if entry["fraction_of_ceiling"] is not None:
                ax.text(x, entry["value"], f"{100 * entry['fraction_of_ceiling']:.0f}%",
                        ha="center", va="bottom", fontsize=7)
        for name in _in_order(entry["ceiling"] for entry in mine):
            ceiling = data["ceilings"].get(name)
            if ceiling and ceiling["value"] is not None:
                ax.axhline(ceiling["value"], linestyle="--", color="gray",
                           label=f"{ceiling['label']}: {ceiling['value']:.4g} {ceiling['unit']}")
                top = max(top, ceiling["value"])
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_ylim(0, (top or 1.0) * 1.15)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
