"""bench/gpu_session: the one-call GPU session, rehearsed on a CPU (--dry-run) end to end,
and its pieces: the commands it would run on 1 or 8 GPUs, reading bench JSON and trainer
outputs back, and the budget cut-off."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_session, harness

SCRIPT = str(harness.REPO_ROOT / "bench" / "gpu_session.sh")


def test_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), "--work", str(work)], capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHON": sys.executable}, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The device tool brings back at most 8 files from $OUT: the session leaves three there.
    assert sorted(p.name for p in out.iterdir()) == ["session.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "session.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"work/memcheck.log", "work/correctness.xml", "work/gpt-auto/metrics.jsonl"} <= names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["archive"] == "session.tar.gz" and summary["left_out_of_archive"] == []
    assert summary["dry_run"] and [s["name"] for s in summary["stages"]] == [
        "build", "correctness", "memcheck", "racecheck", "synccheck", "bench", "gpt-auto", "gpt-off",
        "cifar-auto", "cifar-off"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert "triton_paths" in summary["kernels"]
    tests = summary["correctness"]
    assert tests["complete"] and tests["passed"] == 0 and tests["skipped"] > 0  # GPU tests skip on a CPU
    for kernels in ("auto", "off"):
        assert summary["trainers"]["gpt"][kernels]["ms_per_step"] > 0
        assert summary["trainers"]["gpt"][kernels]["steps_done"] == 3
        assert summary["trainers"]["cifar"][kernels]["runs_done"] == 1
    assert "max relative error" in (work / "memcheck.log").read_text()
    markdown = (out / "summary.md").read_text()
    assert "| gpt-off | ok |" in markdown and "(no bench results)" in markdown


def test_commands_on_one_and_eight_gpus(tmp_path):
    one = gpu_session.gpt_command("auto", tmp_path, 1, dry_run=False)
    assert one[1:3] == ["-m", "speedrun.gpt"] and one[one.index("--batch-tokens") + 1] == str(48 * 1024)
    eight = gpu_session.gpt_command("off", tmp_path, 8, dry_run=False)
    assert eight[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert eight[eight.index("--batch-tokens") + 1] == str(8 * 48 * 1024)
    assert eight[eight.index("--kernels") + 1] == "off"
    stages = {s.name: s for s in gpu_session.plan(tmp_path, dry_run=False, gpus=1, cores=16)}
    assert sum(s.budget_s for s in stages.values()) <= 9 * 60 - 10
    assert stages["build"].env == {"MAX_JOBS": "16"}
    for tool in ("memcheck", "racecheck", "synccheck"):
        [command] = stages[tool].commands
        assert Path(command[0]).name == "compute-sanitizer"
        assert command[1:7] == ["--tool", tool, "--kernel-name", "kns=speedrun", "--error-exitcode", "1"]
        assert command[-2:] == ["bench.gpu_session", "--sanitizer-workload"]


def test_the_sanitizer_filter_names_every_extension_kernel_and_no_other():
    """kns= matches a substring of the kernel's name: every __global__ of csrc/ must sit in
    namespace speedrun, or the sanitizer stages would silently skip it."""
    import re
    needle = gpu_session.SANITIZED_KERNELS.removeprefix("kns=")
    for source in sorted((harness.REPO_ROOT / "csrc").glob("*.cu")):
        text = source.read_text()
        opened = text.index(f"namespace {needle} {{")
        closed = text.index(f"}}  // namespace {needle}")
        kernels = [m.start() for m in re.finditer(r"__global__", text)]
        assert kernels, source
        assert all(opened < k < closed for k in kernels), f"{source.name}: a kernel outside namespace {needle}"
    triton_sources = "".join(p.read_text() for p in (harness.REPO_ROOT / "kernels").glob("*.py"))
    assert not re.search(rf"def \w*{needle}\w*\(", triton_sources)  # no Triton kernel carries the name


def test_correctness_spreads_over_xdist_workers_where_xdist_is_installed(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xdist" else real(name, *a))
    command = gpu_session.correctness_command(tmp_path, cores=16)
    assert command[command.index("-n") + 1] == str(gpu_session.CORRECTNESS_WORKERS)
    assert command[command.index("--dist") + 1] == "loadfile" and command[-1] == "tests"
    assert "-n" not in gpu_session.correctness_command(tmp_path, cores=1)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xdist" else real(name, *a))
    assert "-n" not in gpu_session.correctness_command(tmp_path, cores=16)


def test_compute_sanitizer_is_found_off_path_in_the_toolkit(tmp_path, monkeypatch):
    tool = tmp_path / "cuda" / "compute-sanitizer" / "compute-sanitizer"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert gpu_session.compute_sanitizer() == str(tool)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if not Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        assert gpu_session.compute_sanitizer() == "compute-sanitizer"  # the stage's log then says it is missing


def test_an_overrun_comes_off_the_next_stages_and_the_summary_is_written_after_each(tmp_path, monkeypatch):
    """Stages run to their planned ends: the call ends on plan whatever a stage does, and a
    call cut off from outside has a summary of the stages it finished."""
    import torch
    seen = []

    def fake_run(stage, budget, log):
        seen.append((stage.name, round(budget)))
        if stage.name == "correctness":
            assert json.loads((tmp_path / "summary.json").read_text())["stages"][0]["name"] == "build"
        log.write_text("")
        return ("timed out", budget + 40) if stage.name == "build" else ("ok", budget)

    clock = [0.0]

    def fake_stage(stage, budget, log):
        status, seconds = fake_run(stage, budget, log)
        clock[0] += seconds
        return status, seconds

    monkeypatch.setattr(gpu_session, "run_stage", fake_stage)
    monkeypatch.setattr(gpu_session.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert gpu_session.session(tmp_path, tmp_path / "work", dry_run=False) == 1  # the build timed out
    budgets = dict(seen)
    planned = {s.name: s.budget_s for s in gpu_session.plan(tmp_path, dry_run=False, gpus=1, cores=16)}
    assert budgets["build"] == planned["build"]
    assert budgets["correctness"] == planned["correctness"] - 40  # the build's overrun came off it
    assert budgets["memcheck"] == planned["memcheck"]  # back on plan
    assert budgets["cifar-off"] == planned["cifar-off"] - (sum(planned.values()) - (gpu_session.SESSION_S - gpu_session.GRACE_S))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == list(planned) and summary["failed_stages"] == 1
    assert set(summary["tools"]) == {"nvcc", "compute-sanitizer", "pytest-xdist"}
    assert "- tools: nvcc " in (tmp_path / "summary.md").read_text()


def test_a_stage_with_no_time_left_is_skipped(tmp_path, monkeypatch):
    import torch
    clock = [0.0]

    def slow(stage, budget, log):
        clock[0] += gpu_session.SESSION_S  # the first stage eats the whole call
        return "timed out", gpu_session.SESSION_S

    monkeypatch.setattr(gpu_session, "run_stage", slow)
    monkeypatch.setattr(gpu_session.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    gpu_session.session(tmp_path, tmp_path / "work", dry_run=False)
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert stages[0]["status"] == "timed out" and {s["status"] for s in stages[1:]} == {"skipped"}
    assert "time ran out" in (tmp_path / "work" / "cifar-off.log").read_text()


def test_the_archive_leaves_out_big_files_and_the_work_folder_is_guarded(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "gpt-auto").mkdir(parents=True)
    (work / "gpt-auto" / "log.txt").write_text("step:1\n")
    (work / "gpt-auto" / "big.pt").write_bytes(b"0" * (gpu_session.ARCHIVE_FILE_LIMIT + 1))
    left_out = gpu_session.archive(work, tmp_path / "a.tar.gz")
    assert left_out == ["work/gpt-auto/big.pt (4.0 MiB)"]
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        assert "work/gpt-auto/log.txt" in tar.getnames() and "work/gpt-auto/big.pt" not in tar.getnames()
    assert not (tmp_path / "a.tar.gz.partial").exists()
    # --work must not be a folder of something else, nor inside --out.
    with pytest.raises(SystemExit):
        gpu_session.main(["--dry-run", "--out", str(tmp_path / "o"), "--work", str(work)])
    with pytest.raises(SystemExit):
        gpu_session.main(["--dry-run", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "o" / "w")])
    assert (work / "gpt-auto" / "big.pt").exists()  # refused, not emptied


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


@pytest.mark.parametrize("xdist", [False, True])
def test_interrupted_tests_are_counted_from_the_verbose_lines(tmp_path, xdist):
    log = tmp_path / "correctness.log"
    if xdist:
        log.write_text("[gw0] [ 33%] PASSED tests/a.py::t[1] \n[gw1] [ 66%] FAILED tests/a.py::t[2] \n"
                       "[gw0] [100%] SKIPPED tests/b.py::u \n")
    else:
        log.write_text("tests/a.py::t[1] PASSED [ 1%]\ntests/a.py::t[2] FAILED [ 2%]\n"
                       "tests/b.py::u SKIPPED (x) [ 3%]\n")
    counts = gpu_session.read_correctness(tmp_path / "missing.xml", log)
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "complete": False,
                      "failing": ["tests/a.py::t[2]"]}


def test_gpt_ms_per_step_comes_from_the_synchronized_last_step_not_the_validation(tmp_path):
    """A stage cut off while the final validation compiles still reports its step time."""
    records = [{"event": "step", "step": 1, "train_time_ms": 40000.0, "timed_steps": 0},
               {"event": "step", "step": 29, "train_time_ms": 2500.0, "timed_steps": 26},
               {"event": "step", "step": 30, "train_time_ms": 2700.0, "timed_steps": 27}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = gpu_session.read_gpt(tmp_path, steps=30)
    assert result["ms_per_step"] == pytest.approx(100.0) and result["first_step_s"] == 40.0
    assert result["steps_done"] == 30 and "val_loss" not in result
    assert gpu_session.read_gpt(tmp_path, steps=40)["ms_per_step"] is None  # stopped early: no exact figure
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "val", "step": 30, "val_loss": 7.5, "train_time_ms": 2700.0}) + "\n")
    assert gpu_session.read_gpt(tmp_path, steps=30)["val_loss"] == 7.5
    assert gpu_session.read_gpt(tmp_path / "absent", steps=30) is None


def test_bench_rows_carry_the_static_prediction_of_the_same_sources(tmp_path):
    ceilings = {harness.COPY_BANDWIDTH: harness.Ceiling("copy", "GB/s", 3000.0)}
    sources = harness.kernel_sources("softcap_ce")
    run = harness.BenchRun("softcap_ce", title="t", out_root=tmp_path / "bench",
                           metadata={"device_slug": "test-gpu", "kernel_sources": sources}, ceilings=ceilings)
    common = dict(ceiling=harness.COPY_BANDWIDTH, ceilings=ceilings, bytes_moved=10**9)
    for case in ("fwd+bwd N=49152 V=50304", "fwd N=49152 V=50304"):
        run.entries.append(harness.measured(case, "ours-cuda", 4.4, **common))
    run.finish()
    static = tmp_path / "static"
    static.mkdir()
    record = {"bench_case": "fwd+bwd N=49152 V=50304", "kernel_sources": sources, "predicted_ms": 3.3,
              "floor_ms": 3.0}
    (static / "softcap_ce.json").write_text(json.dumps(record))
    rows = {row["case"]: row for row in gpu_session.read_bench(tmp_path / "bench", static_root=static)}
    assert rows["fwd+bwd N=49152 V=50304"]["predicted_ms"] == 3.3
    assert rows["fwd+bwd N=49152 V=50304"]["measured_over_predicted"] == pytest.approx(4.4 / 3.3)
    assert rows["fwd N=49152 V=50304"]["predicted_ms"] is None  # the static reading predicts one case
    (static / "softcap_ce.json").write_text(json.dumps({**record, "kernel_sources": {"sha256": "0" * 64}}))
    rows = gpu_session.read_bench(tmp_path / "bench", static_root=static)
    assert all(row["predicted_ms"] is None for row in rows)  # other kernel code: no comparison
    summary = {"dry_run": False, "device": "1 x test", "versions": "v", "total_s": 1.0, "budget_s": 530,
               "failed_stages": 0, "stages": [], "correctness": None, "bench": rows,
               "trainers": {"gpt": {}, "cifar": {}}}
    assert "| measured / predicted |" in gpu_session.render_markdown(summary)


def test_bench_metadata_names_the_kernel_sources_it_measured():
    metadata = harness.collect_metadata("Fake GPU", harness.QUICK_TIMING, op="relu2_mlp_dw")
    assert metadata["kernel_sources"] == harness.kernel_sources("relu2_mlp")
    assert metadata["kernel_sources"]["files"] == ["kernels/relu2_mlp.py"]
    assert len(metadata["kernel_sources"]["sha256"]) == 64
    assert harness.kernel_sources("no_such_family") == {"files": [], "sha256": None}
