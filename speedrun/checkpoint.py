"""Checkpoints for both trainers: written atomically with a sha256 sidecar, read with
torch.load(weights_only=True) after the checksum matches.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (state dicts,
the step, the data position, RNG states), so loading it never unpickles arbitrary
objects.  It is first written beside its destination and then renamed over it, so a
crash mid-write leaves the previous checkpoint intact.  Beside it, `<name>.sha256` holds
the file's digest: a flipped byte that torch.load would read silently is caught, and an
unreadable file is refused in one line naming it (a CheckpointError, a user error).
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from speedrun.cli import UsageError

# The keys every checkpoint of the GPT trainer holds (checked on load: a state dict of
# something else is refused by name, not with a KeyError deep in the trainer).
REQUIRED_KEYS = ("step", "model_config", "model", "optimizers", "train_loader", "rng")


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: the message names the file and why."""


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:  # hashlib reads the file in chunks itself (Python >= 3.11)
        return hashlib.file_digest(f, "sha256").hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def rng_state() -> dict:
    """Every generator a training step may draw from, as weights_only-loadable values."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": list(np.random.get_state()[1].tolist()), "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, payload: dict) -> Path:
    """Write `payload` to `path` atomically (temp file in the same folder, then rename), then
    its sha256 sidecar (also atomically; a checkpoint without one is refused on load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, temporary)
    digest = sha256_of(temporary)
    os.replace(temporary, path)
    side_temporary = path.with_name(f".{path.name}.sha256.tmp-{os.getpid()}")
    side_temporary.write_text(f"{digest}  {path.name}\n")
    os.replace(side_temporary, sidecar(path))
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint at `path`, after its checksum; CheckpointError (one line) if it is missing,
    damaged, or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (checkpoints are runs/<name>/checkpoints/"
                              "stepNNNNNN.pt)")
    check = sidecar(path)
    if not check.is_file():
        raise CheckpointError(f"checkpoint {path} has no {check.name} beside it, so its integrity cannot be "
                              "checked: resume from a checkpoint the trainer wrote, with its .sha256 file")
    expected = check.read_text().split()[0] if check.read_text().split() else ""
    found = sha256_of(path)
    if found != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its sha256 is {found[:16]}..., {check.name} says "
                              f"{expected[:16] or '(empty)'}...; resume from an earlier checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch's message suggests weights_only=False: never for a file we cannot trust
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}): it is not a "
                              "checkpoint of this trainer") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is not a checkpoint of the "
                              "GPT trainer")
    return state
