"""The benchmark harness without a GPU: metric arithmetic, the results writer (JSON,
markdown, PNG) fed with made-up timings, the softcap bench's byte count, reference and
orchestration (with a fixed fake timer on CPU tensors), and the command lines."""
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from bench import harness
from bench import bench_softcap_ce as ce

COPY = harness.COPY_BANDWIDTH


def made_up_ceilings():
    return {
        COPY: harness.Ceiling("copy bandwidth", harness.GBPS, 3000.0, ms=0.7158, detail="made up"),
        harness.BF16_MATMUL: harness.Ceiling("bf16 matmul", harness.TFLOPS, 800.0, ms=1.374, detail="made up"),
        harness.FP8_MATMUL: harness.Ceiling("fp8 matmul", harness.TFLOPS, None, detail="made up",
                                            error="RuntimeError: fp8 unsupported here"),
    }


def new_run(tmp_path, device="NVIDIA H100 80GB HBM3"):
    metadata = harness.collect_metadata(device, harness.QUICK_TIMING, extra={"note": "test"})
    return harness.BenchRun("fake_op", title="a made-up op", out_root=tmp_path, metadata=metadata,
                            ceilings=made_up_ceilings(), notes=["a note"])


def strict_json(path):
    """Parse as standard JSON: NaN/Infinity literals are rejected."""
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=reject)


# ---- arithmetic ----------------------------------------------------------------------

def test_derived_metrics_on_known_numbers():
    assert harness.gb_per_s(3e9, 1.0) == pytest.approx(3000.0)
    assert harness.gb_per_s(6e9, 2.5) == pytest.approx(2400.0)
    assert harness.tflop_per_s(2 * 8192**3, 1.0) == pytest.approx(1099.511627776)
    assert harness.fraction_of(2400.0, 3000.0) == pytest.approx(0.8)
    assert harness.fraction_of(2400.0, None) is None
    assert harness.fraction_of(None, 3000.0) is None

    ceilings = made_up_ceilings()
    entry = harness.measured("c", "i", 2.5, bytes_moved=6_000_000_000, ceiling=COPY, ceilings=ceilings)
    assert (entry.unit, entry.work) == ("GB/s", {"bytes": 6_000_000_000})
    assert entry.value == pytest.approx(2400.0)
    assert entry.fraction_of_ceiling == pytest.approx(0.8)
    entry = harness.measured("c", "i", 0.5, flops=200 * 10**9, ceiling=harness.BF16_MATMUL, ceilings=ceilings)
    assert (entry.unit, entry.value, entry.fraction_of_ceiling) == ("TFLOP/s", pytest.approx(400.0),
                                                                    pytest.approx(0.5))
    # A ceiling that failed to measure leaves the fraction unknown, not zero or an error.
    entry = harness.measured("c", "i", 0.5, flops=10**12, ceiling=harness.FP8_MATMUL, ceilings=ceilings)
    assert entry.value == pytest.approx(2000.0) and entry.fraction_of_ceiling is None
    entry = harness.failed("c", "i", "cuda extension not built", bytes_moved=10, ceiling=COPY)
    assert (entry.ms, entry.value, entry.fraction_of_ceiling, entry.error) == (
        None, None, None, "cuda extension not built")
    with pytest.raises(ValueError):
        harness.measured("c", "i", 1.0, ceiling=COPY, ceilings=ceilings)
    with pytest.raises(ValueError):
        harness.measured("c", "i", 1.0, bytes_moved=1, flops=1, ceiling=COPY, ceilings=ceilings)


def test_rotation_cycles_through_the_argument_sets():
    seen = []
    call = harness.rotating(lambda a, b: seen.append((a, b)), [(1, 2), (3, 4), (5, 6)])
    for _ in range(7):
        call()
    assert seen == [(1, 2), (3, 4), (5, 6), (1, 2), (3, 4), (5, 6), (1, 2)]
    with pytest.raises(ValueError):
        harness.rotating(print, [])
    assert harness.rotation_count(10 << 20, 50 << 20) == 10   # 2 x 50 MiB of 10 MiB sets
    assert harness.rotation_count(30 << 20, 50 << 20) == 4    # rounded up
    assert harness.rotation_count(1 << 30, 50 << 20) == 1     # bigger than L2: one set
    with pytest.raises(ValueError):
        harness.rotation_count(0, 50 << 20)


def test_device_slug_and_error_description():
    assert harness.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.device_slug("NVIDIA H200") == "nvidia-h200"
    assert harness.device_slug("  ?? ") == "unknown-device"
    assert harness.describe_error(RuntimeError("CUDA out of memory.\nmore")) == "RuntimeError: CUDA out of memory."
    assert len(harness.describe_error(ValueError("x" * 1000))) == 300


def test_command_line_is_the_module_invocation(monkeypatch):
    fake_main = types.ModuleType("__main__")
    fake_main.__spec__ = types.SimpleNamespace(name="bench.__main__")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/__main__.py", "--only", "softcap_ce", "--out", "a b"])
    assert harness.command_line() == "python -m bench --only softcap_ce --out 'a b'"


# ---- the writer ----------------------------------------------------------------------

def test_writer_json_markdown_png(tmp_path):
    run = new_run(tmp_path)
    directory = tmp_path / "nvidia-h100-80gb-hbm3"
    assert run.json_path == directory / "fake_op.json"
    # Written at once, before any entry: a crash in the first case still leaves the ceilings.
    data = strict_json(run.json_path)
    assert data["complete"] is False and data["results"] == []

    run.add(harness.measured("fwd N=8", "ours", 2.5, bytes_moved=6_000_000_000, ceiling=COPY,
                             ceilings=run.ceilings, params={"n": 8},
                             checks={"loss_rel_err": 1.5e-7, "ok": True}, extra={"working_mem_gib": 1.25}))
    assert len(strict_json(run.json_path)["results"]) == 1  # rewritten after every entry
    run.add(harness.measured("fwd N=8", "eager", 10.0, bytes_moved=6_000_000_000, ceiling=COPY,
                             ceilings=run.ceilings, checks={"loss_rel_err": float("nan"), "ok": False}))
    run.add(harness.failed("fwd N=8", "cuda", "cuda extension not built | no nvcc", bytes_moved=6_000_000_000,
                           ceiling=COPY))
    assert "**incomplete**" in run.md_path.read_text()
    run.finish()

    data = strict_json(run.json_path)
    assert data["schema_version"] == harness.SCHEMA_VERSION
    assert (data["op"], data["title"], data["complete"], data["notes"]) == (
        "fake_op", "a made-up op", True, ["a note"])
    meta = data["metadata"]
    for field in ("device", "device_slug", "driver", "cuda", "torch", "triton", "python", "git_commit",
                  "git_dirty", "command", "timestamp", "timing", "extra"):
        assert field in meta, field
    assert meta["device"] == "NVIDIA H100 80GB HBM3" and meta["device_slug"] == "nvidia-h100-80gb-hbm3"
    assert meta["torch"] == torch.__version__ and meta["cuda"] == torch.version.cuda
    assert meta["timing"]["warmup_ms"] == harness.QUICK_TIMING.warmup_ms
    assert meta["extra"] == {"note": "test"}
    if (harness.REPO_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"]) and isinstance(meta["git_dirty"], bool)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", meta["timestamp"])
    assert data["ceilings"][COPY]["value"] == 3000.0
    assert data["ceilings"][harness.FP8_MATMUL]["value"] is None
    assert data["ceilings"][harness.FP8_MATMUL]["error"] == "RuntimeError: fp8 unsupported here"

    ours, eager, cuda = data["results"]
    assert (ours["case"], ours["impl"], ours["ms"], ours["unit"], ours["ceiling"]) == (
        "fwd N=8", "ours", 2.5, "GB/s", COPY)
    assert ours["value"] == pytest.approx(2400.0) and ours["fraction_of_ceiling"] == pytest.approx(0.8)
    assert ours["work"] == {"bytes": 6_000_000_000} and ours["params"] == {"n": 8}
    assert ours["checks"] == {"loss_rel_err": 1.5e-7, "ok": True} and ours["extra"] == {"working_mem_gib": 1.25}
    assert ours["error"] is None
    assert eager["checks"]["loss_rel_err"] == "nan"  # kept, as text, in valid JSON
    assert eager["value"] == pytest.approx(600.0) and eager["fraction_of_ceiling"] == pytest.approx(0.2)
    assert (cuda["ms"], cuda["value"], cuda["error"]) == (None, None, "cuda extension not built | no nvcc")

    md = run.md_path.read_text()
    assert md.startswith("# fake_op: a made-up op\n")
    assert "Status: complete" in md
    assert f"`{meta['git_commit']}`" in md and meta["command"] in md
    assert "| copy bandwidth | 3000 GB/s | made up |" in md
    assert "| fp8 matmul | error: RuntimeError: fp8 unsupported here |" in md
    assert "| case | implementation | ms | throughput | % of ceiling | checks | error |" in md
    assert ("| fwd N=8 | ours | 2.5 | 2400 GB/s | 80.0% of copy bandwidth | "
            "loss_rel_err=1.50e-07, ok=yes, working_mem_gib=1.25 |  |") in md
    assert "| fwd N=8 | eager | 10 | 600 GB/s | 20.0% of copy bandwidth | loss_rel_err=nan, ok=NO |  |" in md
    assert "| fwd N=8 | cuda | - | - | - |  | cuda extension not built \\| no nvcc |" in md
    assert "- a note" in md

    png = run.png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.pyplot as plt
    height, width, _ = plt.imread(run.png_path).shape
    assert width > 500 and height > 300
    assert sorted(p.name for p in directory.iterdir()) == ["fake_op.json", "fake_op.md", "fake_op.png"]


def test_png_with_two_units_and_no_results(tmp_path):
    run = new_run(tmp_path, device="Some GPU")
    run.add(harness.measured("a", "x", 1.0, bytes_moved=10**9, ceiling=COPY, ceilings=run.ceilings))
    run.add(harness.measured("b", "x", 1.0, flops=10**12, ceiling=harness.BF16_MATMUL, ceilings=run.ceilings))
    import matplotlib.pyplot as plt
    two_panels = plt.imread(run.png_path).shape[0]
    empty = new_run(tmp_path / "empty", device="Some GPU")
    assert plt.imread(empty.png_path).shape[0] < two_panels  # one panel, "no results yet"


# ---- bench_softcap_ce's non-GPU parts -----------------------------------------------

def test_softcap_bytes_moved():
    n, v = 49152, 50304
    assert ce.bytes_moved(n, v, "fwd+bwd") == 2 * n * v * 2 + n * 8 == 9_890_562_048
    assert ce.bytes_moved(n, v, "fwd") == n * v * 2 + n * 8 == 4_945_477_632
    assert ce.bytes_moved(65536, v, "fwd+bwd") == 13_187_416_064
    assert ce.bytes_moved(10, 100, "fwd+bwd", logits_itemsize=4, target_itemsize=4) == 2 * 10 * 100 * 4 + 40
    with pytest.raises(ValueError):
        ce.bytes_moved(n, v, "bwd")


def test_relative_error_on_known_numbers():
    expected = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    actual = torch.tensor([[3.0, 3.0], [0.0, 8.0]])          # difference (0, 3, 0, 4): norm 5
    assert ce.relative_error(actual, expected, chunk_rows=1) == pytest.approx(1.0)
    assert ce.relative_error(expected.bfloat16(), expected) == 0.0
    assert ce.relative_error(torch.tensor(2.0), torch.tensor(4.0)) == pytest.approx(0.5)
    assert ce.relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert ce.relative_error(torch.ones(3), torch.zeros(3)) == math.inf
    assert math.isnan(ce.relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2)))
    with pytest.raises(ValueError):
        ce.relative_error(torch.ones(3), torch.ones(4))


def test_chunked_reference_equals_the_full_eager_formulation():
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(37, 300, generator=gen) * 4).bfloat16()
    targets = torch.randint(0, 300, (37,), generator=gen)
    loss, grad = ce.reference_loss_and_grad(z, targets, chunk_rows=8)  # 5 chunks, the last short
    leaf = z.clone().requires_grad_()
    full_loss = ce.record_loss(leaf, targets)
    full_loss.backward()
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16 and grad.shape == z.shape
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert ce.relative_error(grad, leaf.grad) < 1e-3
    # The formulation itself: 30 * sigmoid(z / 7.5), then the mean cross-entropy.
    s = 30 * torch.sigmoid(z.double() / 7.5)
    by_hand = (torch.logsumexp(s, 1) - s[torch.arange(37), targets]).mean()
    assert full_loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_run_shape_checks_times_and_records_every_implementation(tmp_path, monkeypatch):
    def broken(z, targets):
        raise RuntimeError("kernel refused the input")

    def wrong(z, targets):
        return ce.record_loss(z, targets) * 2

    impls = ["unavailable", "torch-eager", "broken", "wrong"]
    monkeypatch.setattr(ce, "loss_functions", lambda names: {
        "unavailable": "cuda extension not built: no nvcc", "torch-eager": ce.record_loss,
        "broken": broken, "wrong": wrong})
    timed = []

    def fake_timer(step):
        step()  # the step must run as it would under do_bench
        timed.append(step)
        return 2.0  # ms, made up

    run = new_run(tmp_path, device="Fake GPU")
    n, v = 40, 257
    ce.run_shape(run, n=n, v=v, modes=ce.MODES, impls=impls, timer=fake_timer, device="cpu")
    run.finish()

    results = strict_json(run.json_path)["results"]
    assert [(r["case"], r["impl"]) for r in results] == [
        (f"{mode} N={n} V={v}", impl) for mode in ce.MODES for impl in impls]
    assert len(timed) == 4  # eager and wrong, in both modes: nothing that failed its run is timed
    by_key = {(r["params"].get("mode", r["case"].split()[0]), r["impl"]): r for r in results}
    for mode in ce.MODES:
        bytes_ = ce.bytes_moved(n, v, mode)
        eager = by_key[mode, "torch-eager"]
        assert eager["ms"] == 2.0 and eager["work"] == {"bytes": bytes_}
        assert eager["value"] == pytest.approx(bytes_ / 2e-3 / 1e9)
        assert eager["fraction_of_ceiling"] == pytest.approx(eager["value"] / 3000.0)
        assert eager["checks"]["loss_rel_err"] == 0.0 and eager["checks"]["ok"] is True
        assert ("grad_rel_err" in eager["checks"]) == (mode == "fwd+bwd")
        assert eager["params"] == {"mode": mode, "n": n, "v": v, "dtype": "bfloat16", "cap": 30.0, "scale": 7.5}
        wrong_entry = by_key[mode, "wrong"]
        assert wrong_entry["checks"]["loss_rel_err"] == pytest.approx(1.0) and wrong_entry["checks"]["ok"] is False
        assert wrong_entry["ms"] == 2.0  # timed anyway, flagged
        assert by_key[mode, "unavailable"]["error"] == "cuda extension not built: no nvcc"
        assert by_key[mode, "broken"]["error"] == "RuntimeError: kernel refused the input"
        assert by_key[mode, "broken"]["ms"] is None


def test_loss_functions_names():
    functions = ce.loss_functions(["torch-eager"])
    assert functions == {"torch-eager": ce.record_loss}
    assert set(ce.IMPLEMENTATIONS) == {"ours-cuda", "ours-triton", "torch-eager", "torch-compile"}


def test_softcap_cli_options():
    args = ce.parse_args([])
    assert args.n == [49152, 65536] and args.v == 50304 and args.modes == ["fwd+bwd", "fwd"]
    assert args.impls == list(ce.IMPLEMENTATIONS) and not args.quick
    args = ce.parse_args(["--n", "1024", "--v", "512", "--impls", "torch-eager", "--quick", "--out", "x"])
    assert (args.n, args.v, args.impls, args.quick, args.out) == ([1024], 512, ["torch-eager"], True, "x")
    with pytest.raises(SystemExit):
        ce.parse_args(["--n", "0"])


@pytest.mark.parametrize("stem,flag", [("softcap_ce", "n"), ("fp8_head", "m"), ("relu2_mlp", "m"),
                                       ("sliding_window_attention", "t")])
def test_quick_measures_only_the_speedrun_shape_unless_sizes_are_given(stem, flag):
    """The GPU session's `python -m bench --quick` has 90 s for five families: the 48K-token
    shape each static prediction is for, not the 64K one beside it."""
    import importlib
    b = importlib.import_module(f"bench.bench_{stem}")
    defaults = {"n": "DEFAULT_N", "m": "DEFAULT_M", "t": "DEFAULT_T"}[flag]
    assert getattr(b.parse_args(["--quick"]), flag) == [48 * 1024]
    assert getattr(b.parse_args([]), flag) == list(getattr(b, defaults)) == [48 * 1024, 64 * 1024]
    assert getattr(b.parse_args(["--quick", f"--{flag}", "1000", "2000"]), flag) == [1000, 2000]


# ---- the command lines ---------------------------------------------------------------

def run_cli(*args):
    """python -m <args> from the repository root, with every GPU hidden."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", *args], cwd=harness.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_suite_without_gpu_says_so_and_exits_0(tmp_path):
    done = run_cli("bench", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == harness.NO_GPU_MESSAGE
    assert "python -m bench.static" in done.stdout  # and what to do instead
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_suite_lists_softcap_ce():
    done = run_cli("bench", "--list")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^softcap_ce\s+Softcapped cross-entropy", done.stdout, re.MULTILINE)


def test_single_bench_without_gpu_exits_0():
    done = run_cli("bench.bench_softcap_ce", "--quick")
    assert done.returncode == 0, done.stderr
    assert harness.NO_GPU_MESSAGE in done.stdout


def test_suite_help_and_unknown_name(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--list" in out and "--only" in out and "--quick" in out and "nothing is measured" in out
    assert main(["--only", "no_such_bench"]) == 2
    assert "unknown bench no_such_bench; available:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ce.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_suite_runs_every_selected_bench_and_survives_failures(monkeypatch, capsys):
    import bench.__main__ as suite

    calls = []

    def bench_module(name, behaviour):
        module = types.ModuleType(f"bench.bench_{name}")

        def main(argv):
            calls.append((name, argv))
            return behaviour(argv)

        module.main = main
        return module

    def crash(argv):
        raise RuntimeError("boom")

    benches = {"a_crash": bench_module("a_crash", crash),
               "b_bad_option": bench_module("b_bad_option", lambda argv: ce.parse_args(["--bogus"])),
               "c_fine": bench_module("c_fine", lambda argv: 0)}
    monkeypatch.setattr(suite, "discover", lambda: (benches, {"d_broken": "SyntaxError: oops"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    assert suite.main(["--out", "somewhere", "--quick"]) == 1
    assert calls == [(name, ["--out", "somewhere", "--quick"]) for name in ("a_crash", "b_bad_option", "c_fine")]
    assert "failed: a_crash, b_bad_option, d_broken" in capsys.readouterr().err
    calls.clear()
    assert suite.main(["--only", "c_fine", "--only", "bench_c_fine"]) == 0  # prefix allowed, run once
    assert calls == [("c_fine", ["--out", str(harness.DEFAULT_OUT)])]


def test_ceilings_are_measured_once_per_process_and_errors_are_kept(monkeypatch):
    made = []

    def maker(name, fail=False):
        def make():
            made.append(name)
            if fail:
                raise RuntimeError("_scaled_mm is not supported on this device")
            return lambda: None
        return make

    monkeypatch.setattr(harness, "_ceilings", None)
    monkeypatch.setattr(harness, "_copy_fn", maker("copy"))
    monkeypatch.setattr(harness, "_bf16_matmul_fn", maker("bf16"))
    monkeypatch.setattr(harness, "_fp8_matmul_fn", maker("fp8", fail=True))
    monkeypatch.setattr(harness, "time_ms", lambda fn, timing: 0.5)  # made up: every timing 0.5 ms

    ceilings = harness.measure_ceilings(harness.QUICK_TIMING)
    assert harness.measure_ceilings(harness.FULL_TIMING) is ceilings and made == ["copy", "bf16", "fp8"]
    copy = ceilings[harness.COPY_BANDWIDTH]
    assert (copy.unit, copy.ms, copy.error) == ("GB/s", 0.5, None)
    assert copy.value == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9)  # 1 GiB read + 1 GiB written
    bf16 = ceilings[harness.BF16_MATMUL]
    assert bf16.unit == "TFLOP/s" and bf16.value == pytest.approx(2 * 8192**3 / 0.5e-3 / 1e12)
    fp8 = ceilings[harness.FP8_MATMUL]
    assert (fp8.value, fp8.error) == (None, "RuntimeError: _scaled_mm is not supported on this device")

