"""Both trainers as a user meets them: a bad option or file is one `error:` line and status 2,
with nothing trained or written (the run folder's tree hashed before and after); an existing
run folder is refused unless --overwrite; damaged checkpoints are refused by name."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from speedrun import checkpoint, runlog
from speedrun.cifar import train as cifar_train
from speedrun.gpt import train as gpt_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_hash(folder):
    """sha256 over every path and file content under `folder` (missing folder: a fixed value)."""
    digest = hashlib.sha256()
    if folder.exists():
        for path in sorted(folder.rglob("*")):
            digest.update(str(path.relative_to(folder)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def refused(main, argv, run_dir, capsys):
    """Run a trainer expecting a user error; returns its one stderr line."""
    before = tree_hash(run_dir)
    assert main([*argv, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert tree_hash(run_dir) == before  # nothing trained, nothing written
    return err[0]


GPT_BAD = [
    (["--steps", "-5"], "--steps must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--val-every", "-1"], "--val-every must be >= 0"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--window-max", "4096"], "--window-max must be in [128, --seq-len 256]"),
    (["--compile", "maybe"], "argument --compile: invalid choice: 'maybe'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--head-dim", "32"], "--num-heads x --head-dim (2 x 32) must equal --model-dim (128)"),
    (["--num-heads", "0"], "--num-heads must be >= 1"),
    (["--vocab-size", "100"], "--vocab-size must be >= 50257"),
    (["--profile-steps", "abc"], "--profile-steps must be START:END"),
    (["--steps", "abc"], "argument --steps: invalid int value"),
    (["--kernels", "attn=flex"], "unknown family"),
    (["--batch-tokens", "1000"], "--batch-tokens (1000) must be a multiple of processes x --seq-len"),
    (["--windows", "LSL"], "--windows needs one of L/S/- per layer (4)"),
    (["--resume", "nosuch.pt"], "--resume nosuch.pt: no such checkpoint file"),
]


@pytest.mark.parametrize("argv,message", GPT_BAD, ids=[" ".join(a) for a, _ in GPT_BAD])
def test_gpt_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    line = refused(gpt_train.main, ["--preset", "smoke", "--device", "cpu", *argv], tmp_path / "run", capsys)
    assert message in line


def test_gpt_data_must_be_a_folder_with_both_splits(tmp_path, capsys):
    shard = tmp_path / "fineweb_train_000001.bin"
    shard.write_bytes(b"")
    line = refused(gpt_train.main, ["--preset", "smoke", "--data", str(shard)], tmp_path / "run", capsys)
    assert "--data must be a folder" in line and "(a file)" in line
    line = refused(gpt_train.main, ["--preset", "smoke", "--data", str(tmp_path)], tmp_path / "run", capsys)
    assert "holds no fineweb_val_*.bin shard" in line


CIFAR_BAD = [
    (["--runs", "0"], "--runs must be >= 1"),
    (["--epochs", "-1"], "--epochs must be >= 1"),
    (["--widths", "8,16"], "--widths must be three positive integers"),
    (["--widths", "8,x,16"], "--widths must be three positive integers"),
    (["--batch-size", "0"], "--batch-size must be in [1, 2000]"),
    (["--batch-size", "5000"], "--batch-size must be in [1, 2000]"),
    (["--translate", "40"], "--translate must be in [0, 32)"),
    (["--profile-steps", "5:2"], "--profile-steps must be START:END"),
    (["--kernels", "attention=flex"], "unknown family"),
    (["--tta-level", "7"], "argument --tta-level: invalid choice"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--muon-lr", "0"], "--muon-lr must be > 0"),
]


@pytest.mark.parametrize("argv,message", CIFAR_BAD, ids=[" ".join(a) for a, _ in CIFAR_BAD])
def test_cifar_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    line = refused(cifar_train.main, ["--preset", "smoke", "--device", "cpu", *argv], tmp_path / "run", capsys)
    assert message in line


def test_an_existing_run_folder_is_refused_for_both_trainers(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step000004.pt").write_bytes(b"a finished run's weights")
    (run_dir / "log.txt").write_text("step:4/4\n")
    for main in (gpt_train.main, cifar_train.main):
        line = refused(main, ["--preset", "smoke", "--device", "cpu"], run_dir, capsys)
        assert f"--run-dir {run_dir} already holds a run" in line and "--overwrite" in line


def test_cifar_overwrite_replaces_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stale.txt").write_text("old")
    assert cifar_train.main(["--preset", "smoke", "--device", "cpu", "--synthetic-train", "400", "--synthetic-test",
                             "100", "--batch-size", "100", "--whiten-images", "200", "--widths", "4,8,8",
                             "--epochs", "1", "--runs", "1", "--run-dir", str(run_dir), "--overwrite"]) == 0
    assert not (run_dir / "stale.txt").exists() and (run_dir / "summary.md").is_file()
    assert "command: `python -m speedrun.cifar --preset smoke --device cpu" in (run_dir / "summary.md").read_text()


@pytest.mark.parametrize("environ,prefix", [
    ({}, "python -m speedrun.gpt"),
    ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8"},
     "torchrun --nproc_per_node=8 -m speedrun.gpt"),
    ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"},
     "torchrun --nnodes=2 --nproc_per_node=8 -m speedrun.gpt"),
])
def test_the_logged_command_is_the_module_not_its_main_file(monkeypatch, environ, prefix):
    # `python -m speedrun.gpt` leaves the path of __main__.py in sys.argv[0].
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "speedrun", "gpt", "__main__.py"), "--run-dir", "a b"])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert runlog.command_line("speedrun.gpt", None) == f"{prefix} --run-dir 'a b'"
    assert runlog.command_line("speedrun.gpt", ["--steps", "3"]) == f"{prefix} --steps 3"


def test_a_user_error_under_the_cli_is_one_line_and_status_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "speedrun.gpt", "--preset", "smoke", "--steps", "0",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: --steps must be >= 1, got 0", done.stderr
    assert not (tmp_path / "run").exists()


def test_help_shows_the_preset_defaults_and_the_true_run_folder(capsys):
    with pytest.raises(SystemExit):
        gpt_train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: 1770)" in text
    assert "runs/gpt-<preset>-<time>" in text and "--preset smoke changes: steps=100" in text


# ---- checkpoints ---------------------------------------------------------------------------

def saved(tmp_path):
    state = {"step": 3, "model_config": {}, "model": {"w": torch.arange(4.0)}, "optimizers": [], "train_loader": {},
             "rng": {}}
    return checkpoint.save(tmp_path / "step000003.pt", state)


def test_a_checkpoint_round_trips_with_its_sha256_sidecar(tmp_path):
    path = saved(tmp_path)
    assert (tmp_path / "step000003.pt.sha256").read_text().split()[0] == checkpoint.sha256_of(path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(4.0))


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(100, min(len(data), 2100)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _rewrite_with_sidecar(content):
    def damage(path):
        path.write_bytes(content(path))
        (path.parent / (path.name + ".sha256")).write_text(checkpoint.sha256_of(path) + "\n")
    return damage


@pytest.mark.parametrize("damage,reason", [
    (lambda p: p.write_bytes(b""), "is damaged"),
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "is damaged"),
    (_flip_bytes, "is damaged"),
    (lambda p: (p.parent / (p.name + ".sha256")).unlink(), "has no step000003.pt.sha256"),
    (_rewrite_with_sidecar(lambda p: os.urandom(5000)), "cannot be read"),
    (_rewrite_with_sidecar(lambda p: b""), "cannot be read"),
    (_rewrite_with_sidecar(lambda p: p.read_bytes()[:300]), "cannot be read"),
], ids=["empty", "truncated", "2000-flipped-bytes", "no-sidecar", "random-bytes", "empty-with-sidecar",
        "truncated-with-sidecar"])
def test_damaged_checkpoints_are_refused_in_one_line_naming_the_file(tmp_path, damage, reason):
    path = saved(tmp_path)
    damage(path)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert "weights_only" not in message


def test_a_checkpoint_without_the_trainers_keys_is_refused_by_name(tmp_path):
    path = checkpoint.save(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    with pytest.raises(checkpoint.CheckpointError, match="lacks step, model_config"):
        checkpoint.load(path)
