"""bench/gpu_session: the one-call GPU session, rehearsed on a CPU (--dry-run) end to end,
and its pieces: the commands it would run on 1 or 8 GPUs, reading bench JSON and trainer
outputs back, and the budget cut-off."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_session, harness

SCRIPT = str(harness.REPO_ROOT / "bench" / "gpu_session.sh")


def test_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "session"
    done = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHON": sys.executable}, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and [s["name"] for s in summary["stages"]] == [
        "build", "correctness", "memcheck", "racecheck", "bench", "gpt-auto", "gpt-off", "cifar-auto", "cifar-off"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert "triton_paths" in summary["kernels"]
    tests = summary["correctness"]
    assert tests["complete"] and tests["passed"] == 0 and tests["skipped"] > 0  # GPU tests skip on a CPU
    for kernels in ("auto", "off"):
        assert summary["trainers"]["gpt"][kernels]["ms_per_step"] > 0
        assert summary["trainers"]["gpt"][kernels]["steps_done"] == 3
        assert summary["trainers"]["cifar"][kernels]["runs_done"] == 1
    assert "max relative error" in (out / "memcheck.log").read_text()
    markdown = (out / "summary.md").read_text()
    assert "| gpt-off | ok |" in markdown and "(no bench results)" in markdown


def test_commands_on_one_and_eight_gpus(tmp_path):
    one = gpu_session.gpt_command("auto", tmp_path, 1, dry_run=False)
    assert one[1:3] == ["-m", "speedrun.gpt"] and one[one.index("--batch-tokens") + 1] == str(48 * 1024)
    eight = gpu_session.gpt_command("off", tmp_path, 8, dry_run=False)
    assert eight[:3] == ["torchrun", "--standalone", "--nproc_per_node=8"]
    assert eight[eight.index("--batch-tokens") + 1] == str(8 * 48 * 1024)
    assert eight[eight.index("--kernels") + 1] == "off"
    stages = gpu_session.plan(tmp_path, dry_run=False, gpus=1, cores=16)
    assert sum(s.budget_s for s in stages) <= 9 * 60 - 10
    assert stages[0].env == {"MAX_JOBS": "16"}
    assert stages[2].commands[0][:5] == ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"]


def test_a_stage_over_budget_is_interrupted_and_the_next_runs(tmp_path):
    slow = gpu_session.Stage("slow", 1, [[sys.executable, "-c", "import time; time.sleep(60)"]])
    status, seconds = gpu_session.run_stage(slow, 1.0, tmp_path / "slow.log")
    assert status == "timed out" and seconds < 30
    assert "budget of 1 s ran out" in (tmp_path / "slow.log").read_text()
    failing = gpu_session.Stage("bad", 10, [[sys.executable, "-c", "raise SystemExit(3)"], ["true"]])
    assert gpu_session.run_stage(failing, 10, tmp_path / "bad.log")[0] == "failed"
    missing = gpu_session.Stage("missing", 10, [["no-such-program-here"]])
    assert gpu_session.run_stage(missing, 10, tmp_path / "missing.log")[0] == "failed"


def test_bench_rows_compare_our_best_with_the_best_competitor(tmp_path):
    ceilings = {harness.COPY_BANDWIDTH: harness.Ceiling("copy", "GB/s", 3000.0)}
    metadata = {"device_slug": "test-gpu"}
    run = harness.BenchRun("softcap_ce", title="t", out_root=tmp_path, metadata=metadata, ceilings=ceilings)
    common = dict(ceiling=harness.COPY_BANDWIDTH, ceilings=ceilings, bytes_moved=3 * 10**9)
    for impl, ms in (("ours-cuda", 2.0), ("ours-triton", 1.5), ("torch-eager", 6.0), ("torch-compile", 3.0)):
        run.entries.append(harness.measured("48k x 50304", impl, ms, **common))
    run.entries.append(harness.failed("48k x 50304", "torch-other", "OOM", ceiling=harness.COPY_BANDWIDTH,
                                      bytes_moved=3 * 10**9))
    run.finish()
    [row] = gpu_session.read_bench(tmp_path)
    assert (row["ours"], row["best_competitor"]) == ("ours-triton", "torch-compile")
    assert row["speedup"] == pytest.approx(2.0)
    assert row["pct_of_ceiling"] == pytest.approx(100 * (3e9 / 1.5e-3 / 1e9) / 3000.0)
    assert row["errors"] == {"torch-other": "OOM"} and row["complete"]


def test_interrupted_tests_are_counted_from_the_verbose_lines(tmp_path):
    log = tmp_path / "correctness.log"
    log.write_text("tests/a.py::t[1] PASSED [ 1%]\ntests/a.py::t[2] FAILED [ 2%]\n"
                   "tests/b.py::u SKIPPED (x) [ 3%]\n")
    counts = gpu_session.read_correctness(tmp_path / "missing.xml", log)
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "complete": False,
                      "failing": ["tests/a.py::t[2]"]}
