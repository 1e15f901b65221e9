"""The embedded default corpus: FineWeb-format shards from a Markov chain of known entropy rate.

The trainer runs out of the box, offline, on this corpus, and prints its entropy rate
beside the val loss: no model can beat that rate on average, so it is the floor the val
loss falls toward (a model that has learned the chain exactly sits on it).

The chain.  K content tokens (ids 0..K-1, a block of the GPT-2 vocabulary) and the
document separator EOT = 50256.  From a content token x: with probability q emit EOT,
else emit (x + n) mod K with n drawn from a fixed offset distribution p (num_offsets
distinct offsets in 1..K-1 drawn with noise_seed, probabilities proportional to
rank^-zipf).  From EOT: a uniform content token.  Every stationary row's entropy is
known, so the entropy rate is exact (nats/token):

    H = [H_b(q) + (1-q) H(p)] / (1+q) + [q/(1+q)] log K

(content tokens have stationary mass 1/(1+q) and row entropy H_b(q) + (1-q) H(p); EOT has
mass q/(1+q) and row entropy log K).  So each document is EOT followed by a geometric
number of content tokens (mean 1/q, 400 by default: longer than the short attention
windows of the smoke preset, shorter than the long ones), like FineWeb's shards where
every document starts with EOT.

    python -m speedrun.data.synthetic [--out DIR]

generates the default corpus (into the cache, or DIR) and prints its entropy rate;

    python -m speedrun.data.synthetic --verify [--out DIR]

checks every shard of it against the sha256 manifest in corpus.json and exits 0 or 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from speedrun.checkpoint import sha256_of
from speedrun.data import fineweb

EOT = 50256  # GPT-2's <|endoftext|>: the record's document separator


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    K: int = 1024                    # content tokens: ids 0..K-1
    q: float = 1 / 400               # P(EOT | content token); documents hold 1/q content tokens on average
    num_offsets: int = 32            # support of the offset distribution p
    zipf: float = 1.0                # p(offset of rank r) proportional to r^-zipf
    noise_seed: int = 0              # picks the offsets
    seed: int = 1                    # draws the token streams
    train_tokens: int = 20_000_000
    val_tokens: int = 1_000_000
    shard_tokens: int = 10_000_000   # train (and val) are cut into shards of at most this many tokens
    version: int = 1                 # bump when the generator changes: it names the cache folder

    def __post_init__(self):
        if not 2 <= self.K <= EOT:
            raise ValueError(f"K must be in [2, {EOT}] so content ids stay below EOT={EOT}, got {self.K}")
        if not 0 < self.q < 1:
            raise ValueError(f"q must be in (0, 1), got {self.q}")
        if not 1 <= self.num_offsets <= self.K - 1:
            raise ValueError(f"num_offsets must be in [1, K-1={self.K - 1}], got {self.num_offsets}")
        if min(self.train_tokens, self.val_tokens, self.shard_tokens) < 1:
            raise ValueError("train_tokens, val_tokens and shard_tokens must be positive")


DEFAULT_SPEC = SyntheticSpec()


def noise_distribution(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [num_offsets], probabilities float64 [num_offsets]), most likely first.

    The offsets are distinct mod K, so the next-token distribution of a content token has
    exactly the entropy of p (no two offsets land on the same token)."""
    rng = np.random.default_rng(spec.noise_seed)
    offsets = rng.choice(np.arange(1, spec.K, dtype=np.int64), size=spec.num_offsets, replace=False)
    weights = np.arange(1, spec.num_offsets + 1, dtype=np.float64) ** -spec.zipf
    return offsets, weights / weights.sum()


def entropy_rate(spec: SyntheticSpec) -> float:
    """The chain's stationary entropy rate in nats/token (the best achievable mean val loss)."""
    _, probs = noise_distribution(spec)
    q = spec.q
    noise_entropy = -float(np.sum(probs * np.log(probs)))
    binary_entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    return (binary_entropy + (1 - q) * noise_entropy) / (1 + q) + q / (1 + q) * math.log(spec.K)


def sample_tokens(spec: SyntheticSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` tokens (uint16) of the chain, starting with EOT; the last document is cut off.

    Vectorized: all randomness comes from rng.random() (uniforms, whose stream numpy keeps
    stable across versions) turned into samples by inverse CDFs."""
    offsets, probs = noise_distribution(spec)
    cdf = np.cumsum(probs)
    # Content tokens per document: L >= 1 with P(L = l) = (1-q)^(l-1) q.  Draw documents in
    # batches until they cover `count` tokens (each document takes L + 1 with its EOT).
    lengths, covered = [], 0
    while covered < count:
        batch = max(16, int(1.1 * (count - covered) * spec.q / (1 + spec.q)))
        drawn = 1 + np.floor(np.log1p(-rng.random(batch)) / math.log1p(-spec.q)).astype(np.int64)
        lengths.append(drawn)
        covered += int(drawn.sum() + batch)
    lengths = np.concatenate(lengths)
    ends = np.cumsum(lengths + 1)                       # one past each document's last token
    lengths = lengths[:int(np.searchsorted(ends, count)) + 1]
    doc_starts = ends[:len(lengths)] - (lengths + 1)    # where each EOT goes
    total_content = int(lengths.sum())

    # Within a document token_i = (first + offset_1 + ... + offset_i) mod K: one cumulative
    # sum over all documents, re-based at each document's first token.
    steps = offsets[np.minimum(np.searchsorted(cdf, rng.random(total_content), side="right"), len(cdf) - 1)]
    first_index = np.cumsum(lengths) - lengths          # each document's first content token
    steps[first_index] = 0
    running = np.cumsum(steps)
    first_token = np.floor(rng.random(len(lengths)) * spec.K).astype(np.int64)
    content = np.mod(running + np.repeat(first_token - running[first_index], lengths), spec.K)

    stream = np.empty(total_content + len(lengths), dtype=np.uint16)
    is_eot = np.zeros(len(stream), dtype=bool)
    is_eot[doc_starts] = True
    stream[is_eot] = EOT
    stream[~is_eot] = content
    return stream[:count]


def _split_shards(split: str, total: int, first_index: int, spec: SyntheticSpec) -> list[tuple[str, int]]:
    """(file name, token count) of each shard of a split."""
    sizes = [min(spec.shard_tokens, total - start) for start in range(0, total, spec.shard_tokens)]
    return [(f"fineweb_{split}_{first_index + i:06d}.bin", n) for i, n in enumerate(sizes)]


def generate(spec: SyntheticSpec, out_dir: str | Path) -> Path:
    """Write the corpus into out_dir: fineweb_val_000000.bin.., fineweb_train_000001.bin..,
    and corpus.json, written last, whose "manifest" lists every shard's name, token count,
    byte size and sha256, so a damaged copy can be told from a complete one
    (corpus_problems)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, manifest = {}, []
    for split_id, (split, total, first_index) in enumerate([("val", spec.val_tokens, 0),
                                                             ("train", spec.train_tokens, 1)]):
        for shard_id, (name, count) in enumerate(_split_shards(split, total, first_index, spec)):
            # A stream per shard: one shard's tokens are in memory at a time, whatever the corpus size.
            rng = np.random.default_rng([spec.seed, split_id, shard_id])
            path = fineweb.write_shard(out_dir / name, sample_tokens(spec, count, rng))
            shards[name] = count
            manifest.append({"name": name, "tokens": count, "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    offsets, probs = noise_distribution(spec)
    description = {
        "what": "speedrun synthetic corpus: a Markov chain over K content tokens and EOT (speedrun/data/synthetic.py)",
        "version": spec.version,
        "spec": dataclasses.asdict(spec),
        "entropy_rate": entropy_rate(spec),  # nats/token
        "entropy_rate_bits": entropy_rate(spec) / math.log(2),
        "eot": EOT,
        "offsets": offsets.tolist(),
        "offset_probs": probs.tolist(),
        "train_tokens": spec.train_tokens,
        "val_tokens": spec.val_tokens,
        "shards": shards,  # name -> token count, as before the manifest, for the readers of that form
        "manifest": manifest,
    }
    (out_dir / "corpus.json").write_text(json.dumps(description, indent=1) + "\n")
    return out_dir


def corpus_name(spec: SyntheticSpec) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return f"synthetic-v{spec.version}-{digest}"


def cache_folder(spec: SyntheticSpec = DEFAULT_SPEC, cache_dir: str | Path | None = None) -> Path:
    """<cache>/synthetic-v<version>-<hash of spec>, <cache> = cache_dir, else $SPEEDRUN_CACHE,
    else ~/.cache/speedrun: where ensure_corpus keeps the corpus of `spec`."""
    root = Path(cache_dir or os.environ.get("SPEEDRUN_CACHE") or Path.home() / ".cache" / "speedrun")
    return root / corpus_name(spec)


def corpus_problems(folder: str | Path) -> list[str]:
    """What is wrong with a generated corpus against the manifest in its corpus.json, one
    phrase per problem naming the file; empty when every shard is there with its recorded
    size and sha256 and no other shard is.

    The sizes catch a deleted or truncated shard with a clear message before any hashing;
    the sha256s catch damage that keeps the size.  Hashing the default corpus (42 MB) took
    0.08 s with the page cache warm and 0.10-0.14 s cold (2-core VM, `time` minus the
    interpreter's start), and this whole check 0.075 s warm: well under the ~1 s a start may
    spend on it, so ensure_corpus runs the full check on every use rather than sizes alone.
    (A spec ten times the default would cross 1 s.)"""
    folder = Path(folder)
    try:
        description = json.loads((folder / "corpus.json").read_text())
    except FileNotFoundError:
        return ["corpus.json is missing"]
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        return [f"corpus.json is not valid JSON ({error})"]
    manifest = description.get("manifest") if isinstance(description, dict) else None
    if not isinstance(manifest, list) or not all(
            isinstance(entry, dict) and {"name", "bytes", "sha256"} <= entry.keys() for entry in manifest):
        # Also what a corpus.json written before the manifest existed looks like.
        return ["corpus.json holds no shard manifest"]
    problems = []
    for entry in manifest:
        name, path = entry["name"], folder / entry["name"]
        try:
            if (size := path.stat().st_size) != entry["bytes"]:
                problems.append(f"{name} has {size} bytes, the manifest says {entry['bytes']}")
            elif sha256_of(path) != entry["sha256"]:
                problems.append(f"{name} does not match the manifest's sha256 (same size, different bytes)")
        # Caught around the reads too, not tested beforehand: ensure_corpus runs this check
        # before taking the lock, while another process may be replacing the folder.
        except FileNotFoundError:
            problems.append(f"{name} is missing")
    # The loader reads every fineweb_<split>_*.bin in the folder, so a stray shard would be trained on.
    listed = {entry["name"] for entry in manifest}
    problems += [f"{path.name} is not in the manifest" for path in sorted(folder.glob("fineweb_*.bin"))
                 if path.name not in listed]
    return problems


def ensure_corpus(spec: SyntheticSpec = DEFAULT_SPEC, cache_dir: str | Path | None = None) -> Path:
    """The corpus folder for `spec` (cache_folder), generated on first use and regenerated
    when it fails corpus_problems (a deleted, truncated or altered shard, or a damaged
    corpus.json), with one line on stderr saying what was wrong.

    Generated into a temporary folder and renamed into place when complete, so a partial
    corpus is never used; a file lock makes concurrent processes (e.g. every rank under
    torchrun) wait for the first one.  Generation is deterministic, so a regenerated corpus
    holds the same tokens as the damaged one did."""
    final = cache_folder(spec, cache_dir)
    if final.is_dir() and not corpus_problems(final):
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        # Checked again under the lock: another process may have (re)generated it meanwhile.
        problems = corpus_problems(final) if final.is_dir() else None
        if problems == []:
            return final
        if problems:
            print(f"speedrun: the cached synthetic corpus {final} is damaged ({'; '.join(problems)}); "
                  f"regenerating it", file=sys.stderr, flush=True)
        # Holding the lock, any partial folder for this spec is a leftover of a killed run.
        for leftover in root.glob(f".{final.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        # Not tempfile.mkdtemp: its mode 0700 would make a shared $SPEEDRUN_CACHE private.
        partial = root / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            started = time.perf_counter()
            print(f"speedrun: generating the synthetic corpus ({spec.train_tokens:,} train + {spec.val_tokens:,} val "
                  f"tokens) in {final} ...", end="", file=sys.stderr, flush=True)
            generate(spec, partial)
            if final.exists():  # the damaged folder reported above: replaced whole
                shutil.rmtree(final)
            os.rename(partial, final)
            print(f" done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final


def entropy_rate_of(folder: str | Path) -> float:
    """The entropy rate (nats/token) recorded in a generated corpus's corpus.json."""
    path = Path(folder) / "corpus.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a generated synthetic corpus")
    return float(json.loads(path.read_text())["entropy_rate"])


def verify(out_dir: Path | None) -> int:
    """The --verify command: 0 if the corpus in out_dir (else the default corpus's cache
    folder) passes corpus_problems, else 1 after printing each problem and how to
    regenerate it."""
    folder = out_dir or cache_folder()
    problems = corpus_problems(folder) if folder.is_dir() else ["the folder does not exist"]
    if not problems:
        print(f"{folder}: ok (every shard matches the size and sha256 in corpus.json)")
        return 0
    for problem in problems:
        print(f"{folder}: {problem}", file=sys.stderr)
    again = f"python -m speedrun.data.synthetic --out {out_dir}" if out_dir else "python -m speedrun.data.synthetic"
    print(f"{folder}: {len(problems)} problem(s); `{again}` regenerates it", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speedrun.data.synthetic",
        description="Generate the embedded synthetic corpus (FineWeb .bin shards of a Markov chain with a known "
                    "entropy rate) and print that rate, the floor of the val loss on it.  In the cache, a corpus "
                    "already there is kept if it matches its manifest and regenerated if not.")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write the corpus here (default: the cache the trainer uses, "
                             "$SPEEDRUN_CACHE or ~/.cache/speedrun)")
    parser.add_argument("--verify", action="store_true",
                        help="generate nothing: check that every shard of the corpus (in DIR, or the cache) has the "
                             "size and sha256 that corpus.json's manifest records and that no shard is missing or "
                             "extra; print ok or what is wrong, and exit 0 if ok, 1 if not")
    args = parser.parse_args(argv)
    if args.verify:
        return verify(args.out)
    folder = generate(DEFAULT_SPEC, args.out) if args.out else ensure_corpus()
    rate = entropy_rate(DEFAULT_SPEC)
    print(f"{folder}: entropy rate {rate:.6f} nats/token ({rate / math.log(2):.6f} bits/token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
