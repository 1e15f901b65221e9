"""Run outputs shared by both trainers: a run folder with log.txt (config, versions, GPU,
git commit, then the training lines), metrics.jsonl (one JSON object per event), and a
one-line progress display on a terminal.  Only rank 0 writes; other ranks get a silent
RunLog so the trainer's code stays free of `if rank == 0`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this run: `python -m <module> <args>`, whether the trainer was
    started with -m (sys.argv[0] is then the path of its __main__.py, which reads as a script)
    or called as main(argv).  Under torchrun the launcher's own options are gone from the
    worker's argv: the prefix is rebuilt from the process counts torchrun exports."""
    args = sys.argv[1:] if argv is None else list(argv)
    words = ["python", "-m", module, *args]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun (torch.distributed.run) only
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        nodes = int(os.environ.get("WORLD_SIZE", per_node)) // per_node
        words = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={per_node}",
                 "-m", module, *args]
    return shlex.join(words)


def environment(command: str) -> dict:
    """Versions, devices and the command: what a reader needs to reproduce or compare a run."""
    import triton

    info = {
        "command": command,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                       "memory_gib": round(props.total_memory / 2 ** 30, 1), "sms": props.multi_processor_count}
    else:
        info["gpu"] = None
    return info


def _wrapped(title: str, values: dict, width: int = 100) -> str:
    """`# title: key=value ...` lines of at most `width` characters, values with spaces or
    structure as compact JSON so each pair stays readable."""
    def text(value) -> str:
        if isinstance(value, str) and value and " " not in value:
            return value
        return json.dumps(value, separators=(",", ":"))

    pairs = " ".join(f"{key}={text(value)}" for key, value in sorted(values.items()))
    return textwrap.fill(pairs, width=width, initial_indent=f"# {title}: ", subsequent_indent="#   ",
                         break_on_hyphens=False) + "\n"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write a sibling temporary file, then rename it over `path`: never half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


class RunLog:
    def __init__(self, run_dir: str | Path, *, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.interactive = enabled and sys.stdout.isatty()
        self._progress_shown = False
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / "log.txt", "a", buffering=1)
            self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def header(self, config: dict, env: dict, kernels_line: str) -> None:
        """The run's identity, at the top of log.txt and as the first metrics record."""
        if not self.enabled:
            return
        # log.txt is read by people: wrapped key=value lines (metrics.jsonl keeps the JSON).
        self._log.write(_wrapped("config", config) + _wrapped("environment", env))
        self._log.write(f"# kernels {kernels_line}\n")
        self.metric({"event": "start", "config": config, "environment": env, "kernels": kernels_line})
        self.line(f"run folder: {self.run_dir}")
        self.line(f"kernels: {kernels_line}")

    def line(self, text: str) -> None:
        """A permanent line: to log.txt and the console."""
        if not self.enabled:
            return
        self._log.write(text + "\n")
        if self._progress_shown:
            sys.stdout.write("\r\033[K")
            self._progress_shown = False
        print(text, flush=True)

    def quiet_line(self, text: str) -> None:
        """A line for log.txt; on a terminal it only updates the progress display."""
        if not self.enabled:
            return
        self._log.write(text + "\n")
        if self.interactive:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
            self._progress_shown = True
        else:
            print(text, flush=True)

    def metric(self, record: dict) -> None:
        if self.enabled:
            self._metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        if self.enabled:
            if self._progress_shown:
                print()
            self._log.close()
            self._metrics.close()
