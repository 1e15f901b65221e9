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
import subprocess
import sys
import time
from pathlib import Path

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


def environment() -> dict:
    """Versions, devices and the command: what a reader needs to reproduce or compare a run."""
    import triton

    info = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
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
        self._log.write(f"# config {json.dumps(config, sort_keys=True)}\n")
        self._log.write(f"# environment {json.dumps(env, sort_keys=True)}\n")
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
