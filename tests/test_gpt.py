"""The GPT trainer on CPU: the record's shapes on the meta device, the op-family choices
agreeing with each other, smoke training, resume == uninterrupted, 2 processes == 1 with
accumulation, data errors, profiler outputs, the CLI."""
import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import kernels
from speedrun import ablation, distributed
from speedrun.data import fineweb
from speedrun.gpt import report, train
from speedrun.gpt.model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough for a CPU test, still every kind of layer: long and short windows,
# one layer without attention, a value-embedding table, U-net skips.
TINY = ["--num-layers", "4", "--model-dim", "64", "--num-heads", "1", "--head-dim", "64", "--mlp-dim", "128",
        "--windows", "LS-L", "--value-embeds", "1", "--seq-len", "256", "--batch-tokens", "512",
        "--val-seq-len", "256", "--val-tokens", "512", "--window-max", "256", "--device", "cpu",
        "--compile", "off", "--log-every", "1"]


def run_train(tmp_path, *extra, name="run"):
    run_dir = tmp_path / name
    assert train.main(["--preset", "smoke", *TINY, "--run-dir", str(run_dir), *extra]) == 0
    return run_dir


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the model -----------------------------------------------------------------

def test_record_shapes_and_parameter_count_on_meta():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    d, v, vp, h = 768, 50257, 50304, 3072
    attention_layers = 11  # layer 7 has none
    expected = (4 * v * d  # token embedding + 3 value embeddings
                + vp * d  # untied head, vocab padded to a multiple of 128
                + attention_layers * (3 * d * d + d * d + 2)  # merged QKV, output projection, v lambdas
                + 12 * (2 * d * h + 2)  # MLP in and out, block lambdas
                + 6)  # U-net skip weights
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.blocks[7].attn is None
    assert model.blocks[0].attn.qkv_w.shape == (3, 768, 768)
    assert model.blocks[0].mlp.fc.shape == (3072, 768) and model.blocks[0].mlp.proj.shape == (768, 3072)
    assert model.lm_head.shape == (50304, 768) and model.lm_head.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16
    groups = model.parameter_groups()
    assert len(groups["muon"]) == 11 * 2 + 12 * 2
    assert [model.layer_value_embed_index(i) for i in range(12)] == [0, 1, 2] + [None] * 6 + [0, 1, 2]


def test_window_schedule_grows_from_one_block_to_the_long_window():
    assert train.window_blocks(0, 1770, 1792) == 1
    assert train.window_blocks(1770, 1770, 1792) == 14
    blocks = [train.window_blocks(s, 1770, 1792) for s in range(1771)]
    assert blocks == sorted(blocks)


def tiny_model(choice, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(num_layers=4, model_dim=64, num_heads=1, head_dim=64, mlp_dim=128, windows="LS-L",
                       value_embeds=1)
    model = GPT(config, choice)
    with torch.no_grad():  # nonzero projections and head, so every path contributes
        for block in model.blocks:
            block.mlp.proj.normal_(std=0.05)
            if block.attn is not None:
                block.attn.proj.normal_(std=0.05)
        model.lm_head.normal_(std=0.05)
    return model


def test_flex_and_our_attention_agree_when_only_causal_and_document_masks_bind():
    torch.manual_seed(1)
    tokens = torch.randint(0, 50257, (257,))
    tokens[[40, 170]] = 50256
    inputs, targets = tokens[:-1].int(), tokens[1:].long()
    ours = tiny_model({"attention": "ours", "mlp": "torch", "head": "torch"})
    flex = tiny_model({"attention": "flex", "mlp": "torch", "head": "torch"})
    # A window of 2 blocks covers the whole 256-token sequence: only causality and
    # documents mask, where the record's blockwise window and our exact one coincide.
    # Forward only: FlexAttention has no backward on CPU.
    with torch.no_grad():
        loss_ours, loss_flex = ours(inputs, targets, 2), flex(inputs, targets, 2)
    assert torch.isfinite(loss_ours)
    assert abs(loss_ours.item() - loss_flex.item()) < 2e-2 * abs(loss_flex.item())  # bf16 activations


def test_our_mlp_and_head_match_the_record_formulation():
    torch.manual_seed(2)
    tokens = torch.randint(0, 50257, (257,))
    inputs, targets = tokens[:-1].int(), tokens[1:].long()
    ours = tiny_model({"attention": "ours", "mlp": "ours", "head": "ours"})
    record = tiny_model({"attention": "ours", "mlp": "torch", "head": "torch"})
    for model in (ours, record):  # the tolerance below was measured with exact windows (bf16 noise of 2 scalars)
        model.config.attention_window = "exact"
    a, b = ours(inputs, targets, 2), record(inputs, targets, 2)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) < 1e-3 * abs(b.item())
    for pa, pb in zip(ours.parameters(), record.parameters()):
        if pb.grad is not None:
            err = (pa.grad.float() - pb.grad.float()).norm() / pb.grad.float().norm().clamp_min(1e-12)
            assert err < 5e-2  # same FP8 head math; bf16 rounding differences downstream


@pytest.mark.parametrize("spec,expected", [
    ("auto", {"attention": "ours", "mlp": "ours", "head": "ours", "newton_schulz": "ours"}),
    ("off", {"attention": "flex", "mlp": "torch", "head": "torch", "newton_schulz": "torch"}),
    ("attention=flex,mlp=ours", {"attention": "flex", "mlp": "ours", "head": "ours", "newton_schulz": "ours"}),
    ("head=off", {"attention": "ours", "mlp": "ours", "head": "torch", "newton_schulz": "ours"}),
])
def test_kernels_spec(spec, expected):
    assert ablation.parse_kernels(spec, train.FAMILIES) == expected


@pytest.mark.parametrize("spec,match", [("attention", "family=choice"), ("attn=flex", "unknown family"),
                                        ("mlp=flex", "mlp can be")])
def test_bad_kernels_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        ablation.parse_kernels(spec, train.FAMILIES)


# ---- training ---------------------------------------------------------------------

def test_smoke_training_logs_like_the_record_and_val_loss_falls(tmp_path):
    run_dir = run_train(tmp_path, "--steps", "40", "--val-every", "20")
    log = (run_dir / "log.txt").read_text()
    assert "step:40/40 train_loss:" in log and "step_avg:" in log  # --log-every 1: the loss on every line
    assert "kernels: attention=ours (ours)" in log
    vals = [m for m in metrics(run_dir) if m["event"] == "val"]
    assert [m["step"] for m in vals] == [0, 20, 40]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 1.0
    assert vals[0]["entropy_rate"] > 0
    start = metrics(run_dir)[0]
    assert start["event"] == "start" and start["environment"]["torch"] == torch.__version__
    assert start["environment"]["command"].startswith("python -m speedrun.gpt --preset smoke --num-layers 4")
    assert "# environment: command=\"python -m speedrun.gpt --preset smoke" in log


def test_the_log_is_short_readable_lines_with_the_train_loss_and_one_step_avg_per_step(tmp_path):
    run_dir = run_train(tmp_path, "--steps", "4", "--val-every", "2", "--log-every", "2")
    log = (run_dir / "log.txt").read_text()
    assert max(len(line) for line in log.splitlines()) <= 200, log  # not the config's JSON on one line
    assert "nan" not in log
    assert re.search(r"^step:2/4 train_loss:\d+\.\d{4} train_time:", log, re.MULTILINE), log
    # A step that ends before a validation shows the same time as the validation line.
    for step in (2, 4):
        avgs = re.findall(rf"^step:{step}/4 .*?(step_avg:\S+)$", log, re.MULTILINE)
        assert len(avgs) == 2 and avgs[0] == avgs[1], log
    config = metrics(run_dir)[0]["config"]  # the JSON keeps every option, typed
    assert config["steps"] == 4 and config["data"] is None and config["profile"] is False


def test_polar_express_schedule_reaches_muon_and_is_logged(tmp_path, monkeypatch):
    seen = []
    newton_schulz = kernels.newton_schulz

    def recording(stack, **kwargs):
        seen.append((kwargs["steps"], kwargs["coefficients"]))
        return newton_schulz(stack, **kwargs)

    monkeypatch.setattr(kernels, "newton_schulz", recording)
    run_dir = run_train(tmp_path, "--steps", "2", "--val-every", "0", "--muon-coefficients", "polar_express")
    assert seen and set(seen) == {(5, "polar_express")}
    assert metrics(run_dir)[0]["config"]["muon_coefficients"] == "polar_express"
    losses = [m["train_loss"] for m in metrics(run_dir) if "train_loss" in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    # The torch baseline (the record's NS5) cannot run another schedule: refused, not ignored.
    cfg, _ = train.parse_args(["--preset", "smoke", "--muon-coefficients", "polar_express", "--kernels", "off"])
    with pytest.raises(ValueError, match="--muon-coefficients polar_express needs our Newton-Schulz"):
        train.check_config(cfg, 1)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_run_writes_a_summary_and_a_training_plot(tmp_path):
    run_dir = run_train(tmp_path, "--steps", "4", "--val-every", "2", "--log-every", "2")
    vals = [m for m in metrics(run_dir) if m["event"] == "val"]
    summary = (run_dir / "summary.md").read_text()
    assert "smoke preset, 4/4 steps, finished" in summary
    assert "`python -m speedrun.gpt --preset smoke" in summary
    final, rate = vals[-1]["val_loss"], vals[-1]["entropy_rate"]
    assert f"final {final:.4f} (step 4)" in summary and f"corpus entropy rate {rate:.4f}" in summary
    assert f"gap {final - rate:.4f} final" in summary
    assert re.search(r"mean step time: \d+\.\d\d ms/step, [\d,]+ tokens/s", summary), summary
    assert "final train loss:" in summary and str(run_dir / "log.txt") in summary
    png = (run_dir / "training.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert not list(run_dir.glob(".*tmp*"))  # written atomically: no temporary left
    assert "summary: " in (run_dir / "log.txt").read_text().splitlines()[-2]


def test_a_fineweb_summary_says_there_is_no_entropy_rate_and_times_only_the_timed_steps(tmp_path):
    # metrics.jsonl as a FineWeb run logs it: no entropy rate; the clock restarts after step 1
    # (timing_warmup = 1); a checkpoint at step 2 was written outside the clock.
    start = {"event": "start", "time": 0.0, "kernels": "attention=ours (ours)",
             "config": {"steps": 4, "batch_tokens": 1000, "log_every": 2},
             "environment": {"command": "python -m speedrun.gpt --data fineweb10B"}}
    cumulative = {1: 900.0, 2: 100.0, 3: 300.0, 4: 600.0}
    steps = [{"event": "step", "time": float(step), "step": step, "train_time_ms": ms,
              **({"train_loss": 5.0 - step / 2} if step % 2 == 0 else {})} for step, ms in cumulative.items()]
    vals = [{"event": "val", "time": 4.5, "step": 4, "val_loss": 3.5, "entropy_rate": None, "train_time_ms": 600.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [start, *steps, *vals]) + "{cut sho")
    assert report.step_times(steps, timing_warmup=1) == {2: 100.0, 3: 200.0, 4: 300.0}
    summary_path, plot = report.write_summary(tmp_path, preset="record", timing_warmup=1, device="CPU")
    summary = summary_path.read_text()
    assert "final 3.5000 (step 4)" in summary and "unknown (FineWeb data" in summary and "gap" not in summary
    assert "final train loss: 3.0000 (step 4" in summary
    assert "mean step time: 200.00 ms/step, 5,000 tokens/s (steps 2..4" in summary
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_ctrl_c_still_writes_a_summary_of_the_steps_done(tmp_path, monkeypatch):
    schedule = train.optim.apply_schedule

    def interrupt_at_step_3(optimizers, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt
        schedule(optimizers, step, *args, **kwargs)

    monkeypatch.setattr(train.optim, "apply_schedule", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, "--steps", "6", "--val-every", "2")
    run_dir = tmp_path / "run"
    summary = (run_dir / "summary.md").read_text()
    assert "3/6 steps, stopped by Ctrl-C after step 3" in summary and "final " in summary
    assert (run_dir / "training.png").read_bytes().startswith(PNG_MAGIC)


def test_a_failing_run_still_writes_its_summary_naming_the_error(tmp_path, monkeypatch):
    schedule = train.optim.apply_schedule

    def fail_at_step_2(optimizers, step, *args, **kwargs):
        if step == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        schedule(optimizers, step, *args, **kwargs)

    monkeypatch.setattr(train.optim, "apply_schedule", fail_at_step_2)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train(tmp_path, "--steps", "6", "--val-every", "0")
    run_dir = tmp_path / "run"
    summary = (run_dir / "summary.md").read_text()
    assert "2/6 steps, stopped by RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB after step 2" in summary
    assert "more detail" not in summary
    assert "stopped by RuntimeError" in (run_dir / "log.txt").read_text()


def final_parameters(run_dir):
    checkpoints = sorted((run_dir / "checkpoints").glob("*.pt"))
    return torch.load(checkpoints[-1], weights_only=True)["model"]


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    common = ("--steps", "6", "--save-every", "3", "--val-every", "0", "--log-every", "2")
    whole = run_train(tmp_path, *common, name="whole")
    first = run_train(tmp_path, *common, name="first")
    step3 = first / "checkpoints" / "step000003.pt"
    resumed = run_train(tmp_path, *common, "--resume", str(step3), name="resumed")
    expected, actual = final_parameters(whole), final_parameters(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert torch.load(step3, weights_only=True)["train_loader"] is not None

    def logged(run_dir, after):  # every metric but the clock, for the steps after `after`
        return [{k: v for k, v in m.items() if k not in ("time", "train_time_ms")} for m in metrics(run_dir)
                if m["event"] in ("step", "val") and m["step"] > after]
    # --log-every 2: the loss summed over steps 3 and 4 spans the checkpoint at step 3.
    assert any("train_loss" in m for m in logged(whole, 3))
    assert logged(resumed, 3) == logged(whole, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank, world_size, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train.main(argv)


def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    common = ["--preset", "smoke", *TINY, "--steps", "3", "--save-every", "3", "--val-every", "0"]
    one = tmp_path / "one"
    assert train.main([*common, "--run-dir", str(one)]) == 0  # 1 process x 2 accumulation steps
    two = tmp_path / "two"
    mp.spawn(_train_rank, args=(2, _free_port(), [*common, "--run-dir", str(two)]), nprocs=2, join=True)
    expected, actual = final_parameters(one), final_parameters(two)
    for key in expected:
        # Same tokens, same math; only the order of two gradient sums differs (bf16 activations).
        err = (expected[key].float() - actual[key].float()).norm() / expected[key].float().norm().clamp_min(1e-6)
        assert err < 1e-2, key


def test_corrupt_shard_gives_a_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    fineweb.write_shard(data / "fineweb_train_000001.bin", torch.randint(0, 50257, (5000,), dtype=torch.int32)
                        .to(torch.uint16))
    fineweb.write_shard(data / "fineweb_val_000000.bin", torch.randint(0, 50257, (5000,), dtype=torch.int32)
                        .to(torch.uint16))
    shard = data / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated
    assert train.main(["--preset", "smoke", *TINY, "--steps", "2", "--data", str(data),
                       "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data: ") and "fineweb_train_000001.bin" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_val_split_too_short_fails_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    tokens = lambda n: torch.randint(0, 50257, (n,), dtype=torch.int32).to(torch.uint16)  # noqa: E731
    fineweb.write_shard(data / "fineweb_train_000001.bin", tokens(5000))
    fineweb.write_shard(data / "fineweb_val_000000.bin", tokens(1000))  # serves 3 passes of 256
    assert train.main(["--preset", "smoke", *TINY, "--steps", "2", "--data", str(data), "--val-tokens", "1024",
                       "--run-dir", str(tmp_path / "run")]) == 2
    assert re.search(r"--val-tokens 1,024 needs 4 passes .* serve 3: use --val-tokens 768", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # not one step trained, nothing written


def test_profile_writes_its_outputs(tmp_path):
    run_dir = run_train(tmp_path, "--steps", "6", "--val-every", "0", "--profile", "--profile-steps", "2:4")
    profile = run_dir / "profile"
    for name in ("summary.md", "trace.json", "steps.jsonl", "step_breakdown.png"):
        assert (profile / name).is_file(), name
    summary = (profile / "summary.md").read_text()
    for phase in ("data", "forward", "backward", "grad_comm", "optimizer"):
        assert phase in summary
    json.loads((profile / "trace.json").read_text())


def test_help_explains_every_option():
    done = subprocess.run([sys.executable, "-m", "speedrun.gpt", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    for flag in ("--preset", "--kernels", "--save-every", "--resume", "--profile", "--batch-tokens", "--data"):
        assert flag in done.stdout


def test_bad_batch_shape_is_refused():
    cfg, _ = train.parse_args(["--preset", "smoke", "--batch-tokens", "1000"])
    with pytest.raises(ValueError, match="batch-tokens"):
        train.check_config(cfg, 1)
    assert distributed.setup("cpu").world_size == 1
