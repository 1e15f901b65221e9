"""First light on a lent GPU machine: everything that needs a GPU, in one call of at most 9 minutes.

    python -m bench.gpu_session [--out DIR] [--work DIR] [--dry-run]   (bash bench/gpu_session.sh)

The machine comes with its own stack (torch 2.11, triton 3.6, the CUDA toolkit,
compute-sanitizer) and no network, so nothing is installed: the repository is on
PYTHONPATH and the extension is built in place.  Stages, in order of value, each run as a
child process under its own time budget; time a stage leaves unused passes to the next,
and a stage that overruns is interrupted (SIGINT, so pytest and the trainers still write
what they have) and the next one runs:

  build        setup.py build_ext --inplace (MAX_JOBS = cores), then python -m kernels --json
  correctness  pytest -m gpu: bf16, the CUDA backend, CUDA vs Triton vs reference, CUDA graphs,
               torch.compile, for all five op families; one pytest-xdist worker per test file
               where xdist is installed (the machine's image has it): the stage is bound by
               Triton and Inductor compiling on the CPU, and the machine has 16 cores
  memcheck     compute-sanitizer --tool memcheck over the CUDA-extension ops at small shapes,
               instrumenting only the extension's kernels (namespace speedrun)
  racecheck    the same under --tool racecheck (shared-memory races)
  synccheck    the same under --tool synccheck (barrier misuse: the FP8 GEMM's cluster barriers)
  bench        python -m bench --quick: every family against every competitor
  gpt-auto     the GPT record config per GPU (torchrun over all GPUs if there are several),
  gpt-off      30 steps, --kernels auto then off: ms/step after warm-up, first step apart
  cifar-auto   the CIFAR recipe, one run each with --kernels auto and off
  cifar-off

The stages write into the work folder (each stage's log, kernels.json, correctness.xml,
bench/<device>/, the trainers' run folders).  The output folder gets three files, since
the device tool brings back at most 8 files from $OUT: summary.json and summary.md (per
stage status and seconds; GPU test counts; per op ours against the best competitor, the
share of the measured ceiling and the static prediction; per trainer auto against off)
and session.tar.gz, the work folder (files over ARCHIVE_FILE_LIMIT left out and named in
the summary).  All three are rewritten after every stage.  The exit status is the number
of stages that did not pass.

--dry-run runs the same stages on a CPU, at tiny shapes, with the reference and
interpreter backends: no extension build (KERNELS_SKIP_EXTENSION=1), the GPU tests
collected and skipped, the sanitizer workload without compute-sanitizer, the bench's
no-GPU exit, the trainers' smoke presets.  Every command, option and output file of the
real call is exercised before a GPU sees it (tests/test_gpu_session.py runs it in CI).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "runs" / "gpu-session"
DEFAULT_WORK = REPO_ROOT / "runs" / "gpu-session-work"
ARCHIVE = "session.tar.gz"
WORK_MARKER = ".gpu-session-work"
# A file the device tool brings back may hold 16 MiB: the archive leaves out any single file
# over this (a checkpoint, a profiler trace) and the summary names it.
ARCHIVE_FILE_LIMIT = 4 * 2**20
GPT_STEPS = 30
DRY_RUN_GPT_STEPS = 3
GPT_TOKENS_PER_GPU = 48 * 1024  # the record's per-GPU step: one pass of 49,152 tokens
# The synthetic corpus's val split holds 1M tokens, less than the record's 10.5M per
# validation: 8 passes of 65,536 fit it for 1 or 8 GPUs.  Validation runs once, untimed.
GPT_VAL_SEQ_LEN = 64 * 1024
GPT_VAL_TOKENS = 8 * GPT_VAL_SEQ_LEN
# The call's limit (issue 12: one call of at most 9 minutes); the stages' budgets fit inside.
SESSION_S = 9 * 60
# After SIGINT a stage gets this long to write what it has before it is killed.
GRACE_S = 15
# The test files holding GPU tests: more xdist workers than this would sit idle (--dist loadfile).
CORRECTNESS_WORKERS = 6
# Every kernel of the CUDA extension lives in namespace speedrun, so its mangled and its
# demangled names contain this and no torch, cuBLAS or Triton kernel's does: the sanitizer
# instruments ours and runs the rest at full speed.
SANITIZED_KERNELS = "kns=speedrun"


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float           # its own share of the 9 minutes; unused time passes on
    commands: list[list[str]]
    env: dict = dataclasses.field(default_factory=dict)


def _python() -> str:
    return sys.executable


def gpt_command(kernels: str, run_dir: Path, gpus: int, dry_run: bool) -> list[str]:
    """The GPT trainer at the record's per-GPU shape (or the smoke preset on a CPU)."""
    if dry_run:
        # FlexAttention has no backward on a CPU: "off" keeps our attention there, the rest the record's.
        cpu_kernels = "attention=ours,mlp=torch,head=torch,newton_schulz=torch" if kernels == "off" else kernels
        return [_python(), "-m", "speedrun.gpt", "--preset", "smoke", "--steps", str(DRY_RUN_GPT_STEPS), "--val-every", "0",
                "--device", "cpu", "--kernels", cpu_kernels, "--run-dir", str(run_dir), "--overwrite"]
    args = ["--preset", "record", "--steps", str(GPT_STEPS), "--val-every", "0",
            "--batch-tokens", str(max(gpus, 1) * GPT_TOKENS_PER_GPU),
            "--val-seq-len", str(GPT_VAL_SEQ_LEN), "--val-tokens", str(GPT_VAL_TOKENS),
            "--kernels", kernels, "--run-dir", str(run_dir), "--overwrite"]
    if gpus > 1:
        # torchrun's own module, through this Python: the console script need not be on PATH.
        return [_python(), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                "-m", "speedrun.gpt", *args]
    return [_python(), "-m", "speedrun.gpt", *args]


def cifar_command(kernels: str, run_dir: Path, dry_run: bool) -> list[str]:
    """One CIFAR run.  On the GPU with torch.compile's default mode: the record's max-autotune
    would spend the whole budget autotuning on a fresh machine (auto and off alike)."""
    shape = (["--preset", "smoke", "--epochs", "1", "--synthetic-train", "600", "--synthetic-test", "200",
              "--whiten-images", "200", "--device", "cpu"] if dry_run
             else ["--preset", "record", "--compile-mode", "default"])
    # --overwrite: a rerun into the same --work (a retried session) replaces the earlier runs.
    return [_python(), "-m", "speedrun.cifar", *shape, "--runs", "1", "--kernels", kernels,
            "--run-dir", str(run_dir), "--overwrite"]


def compute_sanitizer() -> str:
    """compute-sanitizer on PATH, else the toolkit's own copy (the CUDA image need not put its
    folder on PATH); the bare name if neither is there, so the stage's log says it is missing."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        for candidate in (Path(root) / "bin" / "compute-sanitizer",
                          Path(root) / "compute-sanitizer" / "compute-sanitizer"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return "compute-sanitizer"


def correctness_command(out: Path, cores: int) -> list[str]:
    """pytest -m gpu, spread over xdist workers where pytest-xdist is installed.  --dist
    loadfile keeps each file on one worker, in order: a family's kernels compile once, and
    at most CORRECTNESS_WORKERS big tests share the GPU's memory at a time."""
    command = [_python(), "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
               "--junitxml", str(out / "correctness.xml")]
    workers = min(CORRECTNESS_WORKERS, cores)
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(workers), "--dist", "loadfile"]
    return command + ["tests"]


def plan(out: Path, *, dry_run: bool, gpus: int, cores: int) -> list[Stage]:
    """The stages of one session; budgets sum to 530 s of SESSION_S, leaving Python's start
    and the last summary some slack."""
    py = _python()
    build_env = {"MAX_JOBS": str(cores)}
    if dry_run:
        build_env["KERNELS_SKIP_EXTENSION"] = "1"
    workload = [py, "-m", "bench.gpu_session", "--sanitizer-workload"] + (["--dry-run"] if dry_run else [])

    def sanitized(tool: str) -> list[str]:
        # --error-exitcode: any finding fails the stage, not only a crash.
        wrapper = [] if dry_run else [compute_sanitizer(), "--tool", tool, "--kernel-name", SANITIZED_KERNELS,
                                      "--error-exitcode", "1"]
        return wrapper + workload

    return [
        # The build's critical path is its longest translation unit (softcap_ce.cu: 42 s of
        # nvcc on this project's 2-core CI machine); the three compile side by side.
        Stage("build", 80, [[py, "setup.py", "build_ext", "--inplace"],
                            [py, "-m", "kernels", "--json", "--output", str(out / "kernels.json")]], build_env),
        Stage("correctness", 90, [correctness_command(out, cores)]),
        Stage("memcheck", 30, [sanitized("memcheck")]),
        Stage("racecheck", 30, [sanitized("racecheck")]),
        Stage("synccheck", 20, [sanitized("synccheck")]),
        Stage("bench", 90, [[py, "-m", "bench", "--quick", "--out", str(out / "bench")]]),
        Stage("gpt-auto", 65, [gpt_command("auto", out / "gpt-auto", gpus, dry_run)]),
        Stage("gpt-off", 65, [gpt_command("off", out / "gpt-off", gpus, dry_run)]),
        Stage("cifar-auto", 30, [cifar_command("auto", out / "cifar-auto", dry_run)]),
        Stage("cifar-off", 30, [cifar_command("off", out / "cifar-off", dry_run)]),
    ]


# ---- running ------------------------------------------------------------------------------

def run_stage(stage: Stage, budget_s: float, log_path: Path) -> tuple[str, float]:
    """(status, seconds): "ok", "failed" (a command exited non-zero) or "timed out"."""
    start = time.monotonic()
    env = {**os.environ, **stage.env, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    with open(log_path, "w", buffering=1) as log:
        for command in stage.commands:
            left = budget_s - (time.monotonic() - start)
            log.write(f"$ {' '.join(command)}\n")
            if left <= 0:
                return "timed out", time.monotonic() - start
            try:
                child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            except FileNotFoundError as exc:  # e.g. no compute-sanitizer on this machine
                log.write(f"cannot start: {exc}\n")
                return "failed", time.monotonic() - start
            try:
                code = child.wait(timeout=left)
            except subprocess.TimeoutExpired:
                _interrupt(child)
                log.write(f"\n-- interrupted: the stage's budget of {budget_s:.0f} s ran out\n")
                return "timed out", time.monotonic() - start
            if code != 0:
                log.write(f"\n-- exit status {code}\n")
                return "failed", time.monotonic() - start
    return "ok", time.monotonic() - start


def _interrupt(child: subprocess.Popen) -> None:
    """SIGINT to the child's process group (pytest prints its summary, torchrun stops its
    workers), then SIGKILL if it has not left after GRACE_S."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- reading the results back ---------------------------------------------------------------

def read_correctness(xml_path: Path, log_path: Path) -> dict | None:
    """Counts of the GPU tests: from pytest's JUnit XML, else (interrupted) from the -v lines."""
    if xml_path.exists():
        text = xml_path.read_text(errors="replace")
        match = re.search(r"<testsuite [^>]*", text)
        if match:
            attrs = dict(re.findall(r'(\w+)="([^"]*)"', match.group(0)))
            total = int(attrs.get("tests", 0))
            failed, errors, skipped = (int(attrs.get(k, 0)) for k in ("failures", "errors", "skipped"))
            failing = re.findall(r'<testcase classname="([^"]*)" name="([^"]*)"[^>]*>\s*<(?:failure|error)', text)
            return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors,
                    "skipped": skipped, "complete": True,
                    "failing": [f"{cls}::{name}" for cls, name in failing][:50]}
    if not log_path.exists():
        return None
    text = log_path.read_text(errors="replace")
    # "tests/a.py::t PASSED [ 1%]" from one process; "[gw0] [  1%] PASSED tests/a.py::t" from xdist.
    lines = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M)
    lines += [(test, word) for word, test in re.findall(
        r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+)", text, re.M)]
    counts = {word.lower(): sum(1 for _, w in lines if w == word) for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"], "complete": False,
            "failing": [test for test, word in lines if word in ("FAILED", "ERROR")][:50]}


def static_record(op: str, kernel_sources: dict | None,
                  static_root: Path = REPO_ROOT / "bench" / "results" / "static") -> dict | None:
    """bench.static's committed record of this op, when it was read from the same kernel
    sources as the measurement (else its prediction is of other code)."""
    path = static_root / f"{op}.json"
    if not path.exists() or not kernel_sources:
        return None
    record = json.loads(path.read_text())
    same = (record.get("kernel_sources") or {}).get("sha256") == kernel_sources.get("sha256")
    return record if same else None


def read_bench(bench_root: Path, static_root: Path = REPO_ROOT / "bench" / "results" / "static") -> list[dict]:
    """Per op and case: our best implementation against the best competitor, from the bench
    JSON, and beside it bench.static's prediction where one exists for that case.

    speedup = best competitor ms / our best ms (> 1: ours is faster); measured_over_predicted
    > 1: slower than the static reading predicted.
    """
    from bench import harness
    rows = []
    for path in sorted(bench_root.glob("*/*.json")):
        data = json.loads(path.read_text())
        op = data.get("op", path.stem)
        static = static_record(op, (data.get("metadata") or {}).get("kernel_sources"), static_root)
        cases: dict[str, list[dict]] = {}
        for entry in data.get("results", []):
            cases.setdefault(entry["case"], []).append(entry)
        for case, entries in cases.items():
            ours, rival = harness.best_per_side(entries)
            fraction = ours.get("fraction_of_ceiling") if ours else None
            # The static reading predicts one case per op: the one it names.
            predicted = static if static and static.get("bench_case") == case else {}
            rows.append({
                "op": op, "case": case, "complete": bool(data.get("complete")),
                "ours": ours["impl"] if ours else None, "ours_ms": ours["ms"] if ours else None,
                "best_competitor": rival["impl"] if rival else None, "competitor_ms": rival["ms"] if rival else None,
                "speedup": rival["ms"] / ours["ms"] if ours and rival else None,
                "pct_of_ceiling": 100 * fraction if fraction is not None else None,
                "ceiling": ours["ceiling"] if ours else None,
                "predicted_ms": predicted.get("predicted_ms"), "floor_ms": predicted.get("floor_ms"),
                "measured_over_predicted": ours["ms"] / predicted["predicted_ms"] if ours and predicted else None,
                "errors": {e["impl"]: e["error"] for e in entries if e.get("error")},
            })
    return rows


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_gpt(run_dir: Path, steps: int) -> dict | None:
    """ms/step after warm-up and the first step's time (compilation + one step, host clock) apart.

    ms/step comes from the last step's record: the trainer synchronizes before the final
    validation, so that record's train_time_ms is exact over its timed_steps, and a stage
    cut off while the validation compiles its longer sequence still has its number."""
    records = _records(run_dir)
    if not records:
        return None
    done = [r for r in records if r.get("event") == "step"]
    result = {"steps_done": done[-1]["step"] if done else 0,
              "first_step_s": done[0]["train_time_ms"] / 1000 if done else None, "ms_per_step": None}
    last = done[-1] if done else {}
    if last.get("step") == steps and last.get("timed_steps", 0) > 0:
        result["ms_per_step"] = last["train_time_ms"] / last["timed_steps"]
    finals = [r for r in records if r.get("event") == "val" and r.get("step") == steps]
    if finals:
        result["val_loss"] = finals[-1]["val_loss"]
    return result


def read_cifar(run_dir: Path) -> dict | None:
    """The run's time as the record measures it (whitening, epochs, TTA) and per training step."""
    path = run_dir / "results.json"
    if not path.exists():
        return {"runs_done": 0} if run_dir.exists() else None
    data = json.loads(path.read_text())
    config, summary = data["config"], data["summary"]
    train_size = config["synthetic_train"] if config["data"] == "synthetic" else 50_000
    steps = train_size // config["batch_size"] * config["epochs"]  # the last partial batch is dropped
    return {"runs_done": summary["runs"], "s_per_run": summary["time_mean_s"],
            "ms_per_step": 1000 * summary["time_mean_s"] / steps, "steps_per_run": steps,
            "accuracy": summary["accuracy"]["mean"]}


# ---- the summary ----------------------------------------------------------------------------

def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render_markdown(summary: dict) -> str:
    lines = [f"# GPU session{' (dry run on CPU)' if summary['dry_run'] else ''}: {summary['device']}", "",
             f"- versions: {summary['versions']}",
             "- tools: " + ", ".join(f"{name} {'found' if where else 'MISSING'}"
                                     for name, where in (summary.get("tools") or {}).items()),
             f"- total {summary['total_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
             f"exit status {summary['failed_stages']} (stages not ok)", "",
             "| stage | status | seconds | budget s |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']:.0f} |" for s in summary["stages"]]
    tests = summary.get("correctness")
    if tests:
        lines += ["", f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped{'' if tests['complete'] else ' (interrupted)'}"]
        lines += [f"- failing: `{name}`" for name in tests["failing"]]
    lines += ["", "Predicted: bench.static's reading of the same kernel sources (bench/results/static), "
                  "where it covers the case; measured / predicted > 1 is slower than predicted.", "",
              "| op | case | ours | ms | predicted ms | measured / predicted | best competitor | ms | speedup "
              "| % of ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
    if not summary["bench"]:
        lines.append("| (no bench results) | | | | | | | | | |")
    for row in summary["bench"]:
        ceiling = f"{_fmt(row['pct_of_ceiling'], '.1f')} ({row['ceiling']})" if row["pct_of_ceiling"] is not None else "-"
        lines.append(f"| {row['op']} | {row['case']} | {row['ours'] or '-'} | {_fmt(row['ours_ms'], '.4g')} | "
                     f"{_fmt(row.get('predicted_ms'), '.4g')} | {_fmt(row.get('measured_over_predicted'), '.2f')} | "
                     f"{row['best_competitor'] or '-'} | {_fmt(row['competitor_ms'], '.4g')} | "
                     f"{_fmt(row['speedup'], '.2f')} | {ceiling} |")
    lines += ["", "| trainer | kernels | ms/step | first step s (compile) | s per run | note |", "|---|---|---|---|---|---|"]
    for trainer, runs in summary["trainers"].items():
        for kernels, result in runs.items():
            result = result or {}
            note = (f"{result.get('steps_done', 0)} steps" if trainer == "gpt"
                    else f"{result.get('runs_done', 0)} run(s), {result.get('steps_per_run', '-')} steps each")
            lines.append(f"| {trainer} | {kernels} | {_fmt(result.get('ms_per_step'), '.2f')} | "
                         f"{_fmt(result.get('first_step_s'), '.1f')} | {_fmt(result.get('s_per_run'), '.3f')} | {note} |")
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return (f"python {'.'.join(map(str, sys.version_info[:3]))}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), triton {triton_version}")


def _tools() -> dict:
    """What the stages will call, found or not: a stage that cannot start says why in its
    log, and this says it at the top of the summary."""
    sanitizer = compute_sanitizer()
    return {"nvcc": shutil.which("nvcc"), "compute-sanitizer": sanitizer if os.path.isabs(sanitizer) else None,
            "pytest-xdist": importlib.util.find_spec("xdist") is not None}


def session(out: Path, work: Path, *, dry_run: bool) -> int:
    import torch
    gpus = 0 if dry_run else torch.cuda.device_count()
    device = (f"{gpus} x {torch.cuda.get_device_name()}" if gpus else "CPU")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = plan(work, dry_run=dry_run, gpus=gpus, cores=os.cpu_count() or 1)
    if not dry_run and not gpus:
        print("no CUDA GPU visible: use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    summary = {"dry_run": dry_run, "device": device, "gpus": gpus, "versions": _versions(), "tools": _tools(),
               "budget_s": sum(s.budget_s for s in stages), "stages": []}
    session_start, planned_end = time.monotonic(), 0.0
    for stage in stages:
        # Each stage may run until its planned end: time one leaves unused passes on, and time
        # one takes past its budget (its grace after SIGINT) comes off the next, so the call
        # ends on plan, inside SESSION_S, whatever the stages do.
        planned_end += stage.budget_s
        budget = min(planned_end, SESSION_S - GRACE_S) - (time.monotonic() - session_start)
        log = work / f"{stage.name}.log"
        print(f"== {stage.name} (budget {budget:.0f} s) -> {log}", flush=True)
        if budget < 1:
            log.write_text("-- skipped: the session's time ran out before this stage\n")
            status, seconds = "skipped", 0.0
        else:
            status, seconds = run_stage(stage, budget, log)
        print(f"   {status} in {seconds:.0f} s", flush=True)
        summary["stages"].append({"name": stage.name, "status": status, "seconds": seconds,
                                  "budget_s": max(budget, 0.0), "commands": [" ".join(c) for c in stage.commands],
                                  "log": log.name})
        # Rewritten after every stage: a call cut off from outside still brings back a summary.
        _write_summary(summary, out, work, session_start)
    print(render_markdown(summary))
    return summary["failed_stages"]


def _write_summary(summary: dict, out: Path, work: Path, session_start: float) -> None:
    dry_run = summary["dry_run"]
    summary.update({
        "total_s": time.monotonic() - session_start,
        "failed_stages": sum(r["status"] != "ok" for r in summary["stages"]),
        "kernels": json.loads((work / "kernels.json").read_text()) if (work / "kernels.json").exists() else None,
        "correctness": read_correctness(work / "correctness.xml", work / "correctness.log"),
        "bench": read_bench(work / "bench"),
        "trainers": {"gpt": {k: read_gpt(work / f"gpt-{k}", DRY_RUN_GPT_STEPS if dry_run else GPT_STEPS)
                             for k in ("auto", "off")},
                     "cifar": {k: read_cifar(work / f"cifar-{k}") for k in ("auto", "off")}},
        "archive": ARCHIVE, "left_out_of_archive": archive(work, out / ARCHIVE),
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))


def archive(work: Path, path: Path) -> list[str]:
    """The work folder as one tar.gz (written beside, then renamed: a reader never sees half
    an archive); returns the files left out for their size, relative to the work folder."""
    left_out = []

    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if member.isfile() and member.size > ARCHIVE_FILE_LIMIT:
            left_out.append(f"{member.name} ({member.size / 2**20:.1f} MiB)")
            return None
        return member

    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(work, arcname=work.name, filter=keep)
    partial.replace(path)
    return left_out


# ---- the sanitizer's workload -------------------------------------------------------------------

# Our op against the reference op on the same inputs.  The CUDA kernels differ from the
# reference by accumulation order and one rounding of each output to its dtype (bf16:
# 2**-8 relative per element, a few 1e-3 in norm); the FP8 head quantizes identically in
# both.  2e-2 flags a wrong kernel, not rounding: the GPU tests hold the tight bounds.
WORKLOAD_TOL = 2e-2


@contextlib.contextmanager
def _promote_y(value: bool):
    from kernels import fp8_head
    saved, fp8_head.PROMOTE_Y = fp8_head.PROMOTE_Y, value
    try:
        yield
    finally:
        fp8_head.PROMOTE_Y = saved


def sanitizer_workload(device: str, backend: str) -> list[str]:
    """The CUDA-extension ops, forward and backward, at small awkward shapes (rows and vocab
    sizes that are no multiple of a tile), checked against the reference: what
    compute-sanitizer watches for out-of-bounds accesses and shared-memory races."""
    import torch

    import kernels
    from kernels import reference

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def check(name, fn, ref_fn, inputs, upstream_scale=1.0, **kwargs):
        """Forward, then backward from a fixed random upstream gradient times upstream_scale."""
        runs = []
        for f in (fn, ref_fn):
            leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            out = f(*leaves, **kwargs)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * upstream_scale
            out.backward(upstream.to(out.device, out.dtype))
            runs.append([out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad])
        errors = [rel(a, b) for a, b in zip(*runs)]
        if not max(errors) < WORKLOAD_TOL:
            raise AssertionError(f"{name}: relative errors {errors} against the reference exceed {WORKLOAD_TOL}")
        return f"{name}: max relative error {max(errors):.2e}"

    gen = torch.Generator().manual_seed(0)
    lines = []
    with kernels.use_backend(backend):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for n, v in ((3, 7), (37, 1000), (5, 4099)):
                for kind in ("sigmoid", "tanh", None):
                    logits = (torch.randn(n, v, generator=gen) * 4).to(device, dtype)
                    targets = torch.randint(0, v, (n,), generator=gen).to(device)
                    targets[0] = -100
                    lines.append(check(f"softcap_cross_entropy {dtype} {n}x{v} {kind}", kernels.softcap_cross_entropy,
                                       reference.softcap_cross_entropy, [logits, targets], kind=kind))
        # 300 x 150 x 1000: dx has 3 row tiles (odd: the promoted GEMM's 2-CTA clusters get a
        # phantom tile), a ragged column tile whose second B slice starts past N, and 8
        # k-blocks (more than the 6 stages: barrier phases wrap).
        for n, k, v in ((37, 72, 101), (129, 96, 1000), (300, 150, 1000)):
            x = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
            weight = (torch.randn(v, k, generator=gen) * 0.05).to(device)
            targets = torch.randint(0, v, (n,), generator=gen).to(device)
            # The gradient is scaled by 2**19 into e5m2 (max 57344): an upstream like a mean
            # loss's over many rows, as in training, keeps it in range.
            # y in both accumulation modes (kernels/fp8_head.py PROMOTE_Y): the fast one stores
            # through TMA, the promoted one runs the 128x128 tiles dx and dW always use.
            for promote_y in (False, True):
                with _promote_y(promote_y):
                    lines.append(check(f"fp8_linear {n}x{k}x{v} promote_y={promote_y}", kernels.fp8_linear,
                                       reference.fp8_linear, [x, weight], upstream_scale=1e-4))
            # V = 1000 (a multiple of 8): the cuda forward's staged loss pass writes g8 and the
            # byte transpose g8^T (mean, sum); V = 101 and reduction "none": the backward's
            # ce_grad_e5m2.  A sum's upstream-1 gradient needs grad_scale <= 2**15 (DESIGN §2.2).
            for reduction, grad_scale in (("mean", 2.0**19), ("sum", 2.0**12), ("none", 2.0**19)):
                lines.append(check(f"linear_softcap_cross_entropy {n}x{k}x{v} {reduction}",
                                   kernels.linear_softcap_cross_entropy, reference.linear_softcap_cross_entropy,
                                   [x, weight, targets], upstream_scale=1e-2 if reduction == "none" else 1.0,
                                   reduction=reduction, grad_scale=grad_scale))
    if device == "cuda":
        torch.cuda.synchronize()
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT), metavar="DIR",
                        help=f"where summary.json, summary.md and {ARCHIVE} go (default: $OUT, else "
                             "runs/gpu-session)")
    parser.add_argument("--work", default=str(DEFAULT_WORK), metavar="DIR",
                        help="where the stages write (default: runs/gpu-session-work); emptied first")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages on a CPU at tiny shapes (reference/interpreter backends)")
    parser.add_argument("--sanitizer-workload", action="store_true",
                        help="(the memcheck/racecheck stages' child) run the CUDA-extension ops at small shapes")
    args = parser.parse_args(argv)
    if args.sanitizer_workload:
        device, backend = ("cpu", "reference") if args.dry_run else ("cuda", "cuda")
        for line in sanitizer_workload(device, backend):
            print(line)
        return 0
    if not args.dry_run and shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    if out == work or out in work.parents:
        parser.error("--work must lie outside --out: the output folder holds only the summary and the archive")
    # A retried session starts clean; a folder this did not make is never emptied.
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).exists():
        parser.error(f"--work {work} holds files of something else: name an empty or new folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("made by python -m bench.gpu_session; emptied by its next run\n")
    return session(out, work, dry_run=args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
