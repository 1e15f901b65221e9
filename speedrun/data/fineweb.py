"""FineWeb GPT-2 token shards: the .bin format, the record's loader, and the downloader.

Format (llm.c / modded-nanogpt): a header of 256 little-endian int32 -- magic 20240520,
version 1, token count, the rest zero -- then the tokens as little-endian uint16.

    python -m speedrun.data.fineweb --train-shards 8 --out data/fineweb10B

downloads the public pre-tokenized shards (Hugging Face dataset kjj0/fineweb10B-gpt2:
fineweb_val_000000.bin and fineweb_train_000001.bin ...); the trainer then reads them
with `--data data/fineweb10B`.  Without --data it uses the synthetic corpus
(speedrun.data.synthetic), which needs no network.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1  # the count is an int32

HF_REPO = "kjj0/fineweb10B-gpt2"
HF_TRAIN_SHARDS = 103  # fineweb_train_000001.bin .. fineweb_train_000103.bin
VAL_SHARD = "fineweb_val_000000.bin"
DEFAULT_TRAIN_SHARDS = 8  # the record reads 1770 x 393,216 = 0.70B tokens: 8 shards of ~100M
DOWNLOAD_HINT = ("download shards with `python -m speedrun.data.fineweb --train-shards N --out DIR`, "
                 "or train without --data to use the embedded synthetic corpus")


def train_shard_name(index: int) -> str:
    return f"fineweb_train_{index:06d}.bin"


# ---------------------------------------------------------------------------- the format

def write_shard(path: str | Path, tokens) -> Path:
    """Write `tokens` (any integer array-like, values in [0, 65535]) as a .bin shard.

    Written to a temporary file beside `path`, flushed to disk, then renamed over it, so
    a reader never sees a half-written shard under the final name."""
    path = Path(path)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{path}: tokens must be integers, got {tokens.dtype}")
    if tokens.size and tokens.dtype != np.uint16 and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must lie in [0, 65535] (uint16), got [{tokens.min()}, {tokens.max()}]")
    if tokens.size > MAX_TOKENS:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 count of the header")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def shard_token_count(path: str | Path) -> int:
    """Validate a shard's header and size without reading its tokens; returns the token count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such FineWeb .bin shard; {DOWNLOAD_HINT}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: truncated header: the file is {size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header of a FineWeb .bin shard")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != MAGIC:
        raise ValueError(f"{path}: not a FineWeb .bin shard (magic {magic}, expected {MAGIC})")
    if version != VERSION:
        raise ValueError(f"{path}: unsupported FineWeb .bin shard version {version} (expected {VERSION})")
    body = size - HEADER_BYTES
    if count < 0 or body != 2 * count:
        raise ValueError(f"{path}: header says {count} tokens but the file holds {body // 2}"
                         f" ({body} bytes after the header)")
    return count


def read_shard(path: str | Path, *, pin_memory: bool = False) -> torch.Tensor:
    """A shard's tokens as a uint16 CPU tensor (pinned if asked, for async copies to a GPU).

    The bytes are read straight into the tensor's memory (no intermediate bytes object)."""
    count = shard_token_count(path)
    tokens = torch.empty(count, dtype=torch.uint16, pin_memory=pin_memory)
    view = memoryview(tokens.numpy()).cast("B")
    filled = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER_BYTES)
        # One raw read returns at most ~2 GiB on Linux, so read until full or end of file.
        while filled < len(view):
            got = f.readinto(view[filled:])
            if not got:
                break
            filled += got
    if filled != 2 * count:  # the file shrank between the size check and the read
        raise ValueError(f"{path}: header says {count} tokens but the file holds {filled // 2}")
    return tokens


# ---------------------------------------------------------------------------- the loader

class OutOfData(RuntimeError):
    """The shards are used up and the loader does not wrap around."""


class TokenLoader:
    """The 2025-01 record's distributed_data_generator, resumable and with clear errors.

    Shards are read in sorted order.  Each `next_batch()` hands rank r the slice
    tokens[pos + r*local : pos + (r+1)*local + 1] of the current shard (local =
    global_batch_tokens // world_size) as (inputs int32 [local], targets int64 [local]),
    then advances pos by global_batch_tokens.  As in the record, a shard serves a batch
    at pos only while pos + global_batch_tokens + 1 < its length (so a shard of exactly
    pos + global + 1 tokens is left for the next one); otherwise the next shard starts at
    pos 0.  After the last shard: with wrap=True the first shard again (`epoch` counts the
    passes), else OutOfData.

    Fewer processes than the record's 8 ranks: with `passes` = A, this process stands for
    A of world_size x A virtual ranks, and its A successive `next_batch()` calls of one
    step read virtual ranks rank*A, ..., rank*A + A-1 (local = global_batch_tokens //
    (world_size x A)); pos advances and the shard-switch rule is applied once per step, on
    the whole global batch, as in the record.  So 1 GPU x 8 accumulation passes reads
    exactly the record's tokens, shard switches included (advancing one pass at a time
    would switch shards on a per-pass rule and drift from the record at the first switch).

    The position (shard, pos, epoch, pass) is the same on every rank, so `state_dict()`
    from any rank resumes all of them at exactly the next batch.
    """

    def __init__(self, files: Sequence[str | Path], global_batch_tokens: int, rank: int = 0, world_size: int = 1,
                 *, passes: int = 1, device: str | torch.device = "cpu", wrap: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        if global_batch_tokens < 1 or global_batch_tokens % (world_size * passes):
            raise ValueError(f"global_batch_tokens ({global_batch_tokens}) must be a positive multiple of "
                             f"world_size x passes ({world_size} x {passes})")
        self.files = sorted((Path(f) for f in files), key=str)
        if not self.files:
            raise FileNotFoundError(f"TokenLoader got no shard files; {DOWNLOAD_HINT}")
        self.global_batch_tokens = global_batch_tokens
        self.local_batch_tokens = global_batch_tokens // (world_size * passes)
        self.rank, self.world_size, self.passes = rank, world_size, passes
        self.device = torch.device(device)
        self.wrap = wrap
        # Headers are checked up front, so a bad shard fails at start-up, not hours in.
        self.lengths = [shard_token_count(f) for f in self.files]
        if not any(self._serves(i, 0) for i in range(len(self.files))):
            raise ValueError(f"no shard holds more than global_batch_tokens + 1 = {global_batch_tokens + 1} tokens "
                             f"(largest: {max(self.lengths)} in {len(self.files)} shard(s) starting with {self.files[0]})")
        # Pinned host memory lets the host-to-device copies run asynchronously.
        self._pin = self.device.type == "cuda"
        self.shard, self.pos, self.epoch, self.tokens_consumed = 0, 0, 0, 0
        self.pass_index = 0  # which of this rank's virtual ranks the next call reads
        self._loaded_index: int | None = None
        self._tokens: torch.Tensor | None = None

    @classmethod
    def from_pattern(cls, pattern_or_dir: str | Path, split: str = "train", **kwargs) -> "TokenLoader":
        """A loader over fineweb_<split>_*.bin in a folder, or over the files a glob pattern matches.

        kwargs are TokenLoader's (global_batch_tokens, rank, world_size, passes, device, wrap)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        pattern = str(Path(pattern_or_dir) / f"fineweb_{split}_*.bin") if Path(pattern_or_dir).is_dir() \
            else str(pattern_or_dir)
        files = glob.glob(pattern)
        if not files:
            raise FileNotFoundError(f"no shards match {pattern}; {DOWNLOAD_HINT}")
        return cls(files, **kwargs)

    def _serves(self, shard: int, pos: int) -> bool:
        return pos + self.global_batch_tokens + 1 < self.lengths[shard]

    def batches_per_pass(self) -> int:
        """How many batches one pass over all shards serves (from the headers alone)."""
        # Shard of length L serves pos = 0, G, 2G, ... while pos + G + 1 < L.
        G = self.global_batch_tokens
        return sum((length - G - 2) // G + 1 for length in self.lengths if length > G + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard, pos, epoch = self.shard, self.pos, self.epoch
        # Only a step's first pass may switch shards: the later ones read the same global batch.
        while self.pass_index == 0 and not self._serves(shard, pos):
            shard, pos = shard + 1, 0
            if shard == len(self.files):
                if not self.wrap:
                    raise OutOfData(
                        f"the {len(self.files)} shard(s) starting with {self.files[0]} are used up after "
                        f"{self.tokens_consumed:,} tokens ({self.tokens_consumed // self.global_batch_tokens} batches "
                        f"of {self.global_batch_tokens:,}); more shards are needed "
                        f"(python -m speedrun.data.fineweb --train-shards N) or fewer steps")
                shard, epoch = 0, epoch + 1
        if self._loaded_index != shard:
            self._tokens = None  # let the previous shard go before the next one is read
            self._tokens = read_shard(self.files[shard], pin_memory=self._pin)
            self._loaded_index = shard
        virtual_rank = self.rank * self.passes + self.pass_index
        start = pos + virtual_rank * self.local_batch_tokens
        window = self._tokens[start:start + self.local_batch_tokens + 1]
        inputs = window[:-1].to(device=self.device, dtype=torch.int32, non_blocking=self._pin)
        targets = window[1:].to(device=self.device, dtype=torch.int64, non_blocking=self._pin)
        self.shard, self.pos, self.epoch = shard, pos, epoch
        self.pass_index = (self.pass_index + 1) % self.passes
        if self.pass_index == 0:  # the step's global batch is read: on to the next
            self.pos += self.global_batch_tokens
            self.tokens_consumed += self.global_batch_tokens
        return inputs, targets

    def state_dict(self) -> dict:
        """Plain ints and strings (loadable with torch.load(weights_only=True))."""
        return {"files": [f.name for f in self.files], "shard": self.shard, "pos": self.pos, "epoch": self.epoch,
                "tokens_consumed": self.tokens_consumed, "pass_index": self.pass_index}

    def load_state_dict(self, state: dict) -> None:
        # More shards than at save time is fine (a longer run after a larger download): the
        # saved shard index still names the same file as long as the saved list is a prefix.
        names = [f.name for f in self.files]
        if names[:len(state["files"])] != list(state["files"]):
            raise ValueError(f"the data position was saved for shards {state['files'][:3]}... "
                             f"({len(state['files'])} files) but this loader reads {names[:3]}... ({len(names)} files)")
        if not 0 <= state["shard"] < len(self.files) or state["pos"] < 0:
            raise ValueError(f"invalid data position: shard {state['shard']}, pos {state['pos']}")
        self.shard, self.pos, self.epoch = int(state["shard"]), int(state["pos"]), int(state["epoch"])
        self.tokens_consumed = int(state["tokens_consumed"])
        # Checkpoints from before virtual ranks were always saved between steps.
        pass_index = int(state.get("pass_index", 0))
        if not 0 <= pass_index < self.passes:
            raise ValueError(f"the data position was saved at pass {pass_index} of a step, but this loader makes "
                             f"{self.passes} passes per step")
        self.pass_index = pass_index


# ---------------------------------------------------------------------------- the downloader

def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m speedrun.data.fineweb",
        description=f"Download the pre-tokenized FineWeb10B GPT-2 shards (Hugging Face dataset {HF_REPO}): "
                    f"the validation shard {VAL_SHARD} and the first N training shards "
                    f"(fineweb_train_000001.bin ..., about 100M tokens and 200 MB each). Shards already present "
                    f"and valid are kept. Needs `pip install huggingface_hub` and network access; the trainer's "
                    f"default synthetic corpus needs neither.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, metavar="N",
                        help=f"training shards to fetch, 0..{HF_TRAIN_SHARDS} (the record's 1770 steps read 0.7B tokens)")
    parser.add_argument("--out", type=Path, default=Path("data/fineweb10B"), metavar="DIR",
                        help="folder to write the shards to; pass it to the trainer as --data DIR")
    args = parser.parse_args(argv)
    if not 0 <= args.train_shards <= HF_TRAIN_SHARDS:
        parser.error(f"--train-shards must be in 0..{HF_TRAIN_SHARDS}, got {args.train_shards}")
    return args


def _valid_count(path: Path) -> int | None:
    try:
        return shard_token_count(path)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        from huggingface_hub import hf_hub_download  # optional: only the downloader needs it
    except ImportError:
        print("speedrun.data.fineweb: the downloader needs huggingface_hub: install it with pip install huggingface_hub",
              file=sys.stderr)
        return 2
    names = [VAL_SHARD] + [train_shard_name(i) for i in range(1, args.train_shards + 1)]
    args.out.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names, 1):
        path = args.out / name
        existing = _valid_count(path) if path.exists() else None
        if existing is not None:
            print(f"[{k}/{len(names)}] {name}: already present ({existing:,} tokens)", flush=True)
            continue
        print(f"[{k}/{len(names)}] {name}: downloading from {HF_REPO} ...", flush=True)
        try:
            # force_download: a corrupt file under this name would otherwise count as cached.
            hf_hub_download(repo_id=HF_REPO, filename=name, repo_type="dataset", local_dir=str(args.out),
                            force_download=path.exists())
        except Exception as error:  # any failure (DNS, proxy, HTTP, disk) gets the same actionable line
            reason = (str(error).strip().splitlines() or [""])[0]
            print(f"speedrun.data.fineweb: downloading {name} from huggingface.co/datasets/{HF_REPO} failed "
                  f"({type(error).__name__}: {reason}); this machine may be offline. The embedded synthetic corpus "
                  f"works offline: run the trainer without --data.", file=sys.stderr)
            return 1
        try:
            count = shard_token_count(path)
        except (OSError, ValueError) as error:
            print(f"speedrun.data.fineweb: downloaded {name} but it is not a valid shard: {error}", file=sys.stderr)
            return 1
        print(f"[{k}/{len(names)}] {name}: ok ({count:,} tokens)", flush=True)
    print(f"{len(names)} shard(s) in {args.out}; train on them with: python -m speedrun.gpt --data {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
