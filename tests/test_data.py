"""speedrun.data: the .bin shard format, TokenLoader against the record's generator, the
synthetic corpus against its stated entropy rate, and the downloader CLI (no network)."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from speedrun.data import fineweb, synthetic
from speedrun.data.fineweb import OutOfData, TokenLoader, read_shard, shard_token_count, write_shard

# A corpus small enough to generate in ~0.1 s but with enough tokens for tight statistics.
TINY = synthetic.SyntheticSpec(K=64, q=1 / 50, num_offsets=8, zipf=1.3, train_tokens=2_000_000,
                               val_tokens=50_000, shard_tokens=1_000_000)


# ---------------------------------------------------------------------------- the format

@pytest.mark.parametrize("count", [0, 1, 2, 255, 257, 513, 65537])
def test_shard_round_trip(tmp_path, count):
    rng = np.random.default_rng(count)
    tokens = rng.integers(0, 65536, size=count)
    if count >= 2:
        tokens[:2] = 0, 65535  # the extremes of uint16
    path = write_shard(tmp_path / "s.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [fineweb.MAGIC, fineweb.VERSION, count] and not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * count
    back = read_shard(path)
    assert back.dtype == torch.uint16 and back.device.type == "cpu"
    assert np.array_equal(back.numpy(), tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temporary left behind


def test_write_shard_accepts_tensors_and_lists(tmp_path):
    write_shard(tmp_path / "a.bin", torch.tensor([5, 50256, 7]))
    write_shard(tmp_path / "b.bin", [5, 50256, 7])
    assert read_shard(tmp_path / "a.bin").tolist() == read_shard(tmp_path / "b.bin").tolist() == [5, 50256, 7]


@pytest.mark.parametrize("tokens, error", [([-1, 3], ValueError), ([65536], ValueError), ([1.5], TypeError),
                                           ([[1, 2]], ValueError)])
def test_write_shard_rejects_bad_tokens(tmp_path, tokens, error):
    with pytest.raises(error, match="s.bin"):
        write_shard(tmp_path / "s.bin", np.array(tokens))
    assert not list(tmp_path.iterdir())


def _raw_shard(path, header_ints, token_count):
    header = np.zeros(256, dtype="<i4")
    header[:len(header_ints)] = header_ints
    path.write_bytes(header.tobytes() + np.arange(token_count, dtype="<u2").tobytes())
    return path


@pytest.mark.parametrize("make, error, message", [
    (lambda p: p, FileNotFoundError, r"no such FineWeb \.bin shard.*speedrun\.data\.fineweb --train-shards N"),
    (lambda p: _raw_shard(p, [12345, 1, 4], 4), ValueError, r"not a FineWeb \.bin shard \(magic 12345"),
    (lambda p: _raw_shard(p, [fineweb.MAGIC, 7, 4], 4), ValueError, r"unsupported FineWeb \.bin shard version 7"),
    (lambda p: (p.write_bytes(b"\0" * 100), p)[1], ValueError, r"truncated header: the file is 100 bytes"),
    (lambda p: _raw_shard(p, [fineweb.MAGIC, 1, 10], 9), ValueError, r"header says 10 tokens but the file holds 9"),
    (lambda p: _raw_shard(p, [fineweb.MAGIC, 1, 10], 11), ValueError, r"header says 10 tokens but the file holds 11"),
])
def test_shard_errors_name_the_path(tmp_path, make, error, message):
    path = make(tmp_path / "fineweb_train_000001.bin")
    for read in (read_shard, shard_token_count):
        with pytest.raises(error, match=message) as info:
            read(path)
        assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- the loader

def record_generator(shards, batch_size, rank, world_size):
    """The 2025-01-26 record's distributed_data_generator, transcribed (CPU, no dist); it
    stops where the record's `next(file_iter)` would raise StopIteration."""
    local_batch_size = batch_size // world_size
    file_iter = iter(shards)
    tokens, pos = next(file_iter), 0
    while True:
        if pos + batch_size + 1 >= len(tokens):
            try:
                tokens, pos = next(file_iter), 0
            except StopIteration:
                return
        buf = tokens[pos + rank * local_batch_size:][:local_batch_size + 1]
        yield buf[:-1].to(dtype=torch.int32), buf[1:].to(dtype=torch.int64)
        pos += batch_size


def make_shards(folder, sizes, split="train"):
    """Shards whose tokens are consecutive integers, so every token names its position."""
    paths, start = [], 0
    first = 0 if split == "val" else 1
    for i, n in enumerate(sizes):
        paths.append(write_shard(folder / f"fineweb_{split}_{first + i:06d}.bin", np.arange(start, start + n) % 65536))
        start += n
    return paths


def drain(loader):
    batches = []
    with pytest.raises(OutOfData):
        while True:
            batches.append(loader.next_batch())
    return batches


# 33 = 2*16 + 1 tokens: the record's `>=` leaves its second batch to the next shard.
SIZES = [100, 33, 57, 81]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_loader_matches_the_record(tmp_path, world_size):
    paths = make_shards(tmp_path, SIZES)
    shards = [read_shard(p) for p in paths]
    for rank in range(world_size):
        ours = drain(TokenLoader(list(reversed(paths)), 16, rank, world_size))  # sorted by the loader
        theirs = list(record_generator(shards, 16, rank, world_size))
        assert len(ours) == len(theirs) == 6 + 1 + 3 + 4
        for (x, y), (rx, ry) in zip(ours, theirs):
            assert x.dtype == torch.int32 and y.dtype == torch.int64 and x.shape == (16 // world_size,)
            assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fewer_ranks_with_passes_read_the_records_eight_ranks_tokens(tmp_path, world_size):
    # The record's 8 ranks, played by world_size processes of 8 // world_size accumulation
    # passes: rank r's pass k must read what the record's rank r*passes + k reads, shard
    # switches included (16 tokens over 8 virtual ranks: 2 per pass).
    paths = make_shards(tmp_path, SIZES)
    shards = [read_shard(p) for p in paths]
    passes = 8 // world_size
    for rank in range(world_size):
        ours = drain(TokenLoader(paths, 16, rank, world_size, passes=passes))
        record_ranks = [list(record_generator(shards, 16, rank * passes + k, 8)) for k in range(passes)]
        theirs = [record_ranks[k][step] for step in range(len(record_ranks[0])) for k in range(passes)]
        assert len(ours) == len(theirs) == passes * (6 + 1 + 3 + 4)
        for (x, y), (rx, ry) in zip(ours, theirs):
            assert x.shape == (2,) and torch.equal(x, rx) and torch.equal(y, ry)
    # Why passes exist: one process advancing one 2-token pass at a time applies the shard
    # switch rule per pass and leaves the record's order at the first switch.
    per_pass = drain(TokenLoader(paths, 2, 0, 1))
    record_order = [list(record_generator(shards, 16, v, 8))[step] for step in range(14) for v in range(8)]
    assert not all(torch.equal(x, rx) for (x, _), (rx, _) in zip(per_pass, record_order))


def test_a_resume_between_passes_continues_the_step(tmp_path):
    paths = make_shards(tmp_path, SIZES)
    original = TokenLoader(paths, 16, 1, 2, passes=4)
    for _ in range(4 * 5 + 2):  # into the first step after the 100-token shard, 2 passes in
        original.next_batch()
    resumed = TokenLoader(paths, 16, 1, 2, passes=4)
    resumed.load_state_dict(original.state_dict())
    for (x, y), (rx, ry) in zip(drain(original), drain(resumed)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="pass 3 of a step.*2 passes"):
        TokenLoader(paths, 16, 0, 2, passes=2).load_state_dict({**resumed.state_dict(), "pass_index": 3})


def test_ranks_tile_the_global_batch(tmp_path):
    paths = make_shards(tmp_path, SIZES)
    whole = drain(TokenLoader(paths, 16, 0, 1))
    halves = [drain(TokenLoader(paths, 16, rank, 2)) for rank in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(y[:-1], x[1:].long())  # targets are the inputs shifted by one
        assert y0[-1] == x1[0]  # the one token both ranks read: rank 0's last target, rank 1's first input


def test_loader_positions_and_shard_switching(tmp_path):
    loader = TokenLoader(make_shards(tmp_path, SIZES), 16)
    firsts = [int(loader.next_batch()[0][0]) for _ in range(14)]
    # A shard serves pos while pos + 17 < its length.  Shard 0 (tokens 0..99): pos 0..80;
    # shard 1 (100..132): pos 0 only; shard 2 (133..189): pos 0..32; shard 3 (190..270): pos 0..48.
    assert firsts == [0, 16, 32, 48, 64, 80, 100, 133, 149, 165, 190, 206, 222, 238]
    assert loader.tokens_consumed == 14 * 16


def test_loader_runs_out_with_a_clear_error(tmp_path):
    loader = TokenLoader(make_shards(tmp_path, SIZES), 16)
    drain(loader)
    state = loader.state_dict()
    with pytest.raises(OutOfData, match=r"used up after 224 tokens \(14 batches of 16\); more shards are needed"):
        loader.next_batch()
    assert loader.state_dict() == state  # a failed call does not move the position


@pytest.mark.parametrize("batch", [1, 16, 17, 31, 32, 33, 79])  # around shard lengths minus 1 and 2
def test_batches_per_pass_counts_what_the_loader_serves(tmp_path, batch):
    loader = TokenLoader(make_shards(tmp_path, SIZES), batch)
    assert loader.batches_per_pass() == len(drain(loader))


def test_loader_wraps_and_counts_epochs(tmp_path):
    loader = TokenLoader(make_shards(tmp_path, SIZES), 16, wrap=True)
    first_pass = [loader.next_batch()[0] for _ in range(14)]
    assert loader.epoch == 0
    second_pass = [loader.next_batch()[0] for _ in range(14)]
    assert loader.epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(first_pass, second_pass))


@pytest.mark.parametrize("wrap, before", [(False, 6), (True, 17)])
def test_state_dict_resumes_at_the_same_batch(tmp_path, wrap, before):
    paths = make_shards(tmp_path, SIZES)
    original = TokenLoader(paths, 16, 1, 2, wrap=wrap)
    for _ in range(before):
        original.next_batch()
    # Through a checkpoint file, as the trainer stores it.
    torch.save({"train_loader": original.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_loader"]
    resumed = TokenLoader(paths, 16, 1, 2, wrap=wrap)
    resumed.load_state_dict(state)
    for _ in range(5):
        (x, y), (rx, ry) = original.next_batch(), resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == original.state_dict()


def test_load_state_dict_checks_the_shards(tmp_path):
    paths = make_shards(tmp_path, SIZES)
    loader = TokenLoader(paths[:2], 16)
    loader.next_batch()
    longer = TokenLoader(paths, 16)  # more shards downloaded since: same files first, so fine
    longer.load_state_dict(loader.state_dict())
    assert (longer.shard, longer.pos) == (0, 16)
    with pytest.raises(ValueError, match="saved for shards"):
        TokenLoader(paths[1:], 16).load_state_dict(loader.state_dict())


def test_loader_validates_its_arguments(tmp_path):
    paths = make_shards(tmp_path, SIZES)
    with pytest.raises(ValueError, match="multiple of world_size"):
        TokenLoader(paths, 15, 0, 2)
    with pytest.raises(ValueError, match="multiple of world_size x passes"):
        TokenLoader(paths, 16, 0, 2, passes=3)
    with pytest.raises(ValueError, match="passes must be >= 1"):
        TokenLoader(paths, 16, 0, 1, passes=0)
    with pytest.raises(ValueError, match="rank 2"):
        TokenLoader(paths, 16, 2, 2)
    with pytest.raises(ValueError, match="no shard holds more than"):
        TokenLoader(paths, 100)
    with pytest.raises(FileNotFoundError, match="no shard files"):
        TokenLoader([], 16)


def test_from_pattern(tmp_path):
    make_shards(tmp_path, SIZES)
    make_shards(tmp_path, [40], split="val")
    train = TokenLoader.from_pattern(tmp_path, split="train", global_batch_tokens=16)
    val = TokenLoader.from_pattern(tmp_path, split="val", global_batch_tokens=16)
    assert [p.name for p in train.files] == [f"fineweb_train_{i:06d}.bin" for i in range(1, 5)]
    assert [p.name for p in val.files] == ["fineweb_val_000000.bin"]
    pattern = TokenLoader.from_pattern(tmp_path / "fineweb_train_00000[12].bin", global_batch_tokens=16)
    assert len(pattern.files) == 2
    with pytest.raises(FileNotFoundError, match=r"no shards match .*missing; .*--train-shards"):
        TokenLoader.from_pattern(tmp_path / "missing", global_batch_tokens=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no shards match .*empty/fineweb_val_\*\.bin"):
        TokenLoader.from_pattern(tmp_path / "empty", split="val", global_batch_tokens=16)
    with pytest.raises(ValueError, match="split"):
        TokenLoader.from_pattern(tmp_path, split="test", global_batch_tokens=16)


# ---------------------------------------------------------------------------- the synthetic corpus

def markov_entropy_rate(spec):
    """The entropy rate from the chain's full (K+1)x(K+1) transition matrix and its
    stationary distribution by power iteration: independent of the closed form."""
    K, q = spec.K, spec.q
    offsets, probs = synthetic.noise_distribution(spec)
    P = np.zeros((K + 1, K + 1))  # state K is EOT
    for x in range(K):
        P[x, K] = q
        for n, p in zip(offsets, probs):
            P[x, (x + n) % K] += (1 - q) * p
    P[K, :K] = 1 / K
    assert np.allclose(P.sum(1), 1)
    pi = np.full(K + 1, 1 / (K + 1))
    for _ in range(10_000):
        pi, previous = pi @ P, pi
        if np.abs(pi - previous).max() < 1e-15:
            break
    logs = np.log(np.where(P > 0, P, 1.0))
    return float(-(pi[:, None] * P * logs).sum())


@pytest.mark.parametrize("spec", [
    synthetic.SyntheticSpec(K=16, q=0.1, num_offsets=5, zipf=1.3),
    synthetic.SyntheticSpec(K=7, q=0.4, num_offsets=6, zipf=0.5, noise_seed=3),
    synthetic.SyntheticSpec(K=64, q=1 / 400, num_offsets=32),
])
def test_entropy_rate_matches_the_transition_matrix(spec):
    assert synthetic.entropy_rate(spec) == pytest.approx(markov_entropy_rate(spec), abs=1e-10)


def test_default_spec_entropy_rate():
    spec = synthetic.DEFAULT_SPEC
    offsets, probs = synthetic.noise_distribution(spec)
    assert len(set((offsets % spec.K).tolist())) == spec.num_offsets and 0 not in offsets
    assert probs.sum() == pytest.approx(1.0)
    assert synthetic.entropy_rate(spec) == pytest.approx(2.896313, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = synthetic.generate(TINY, tmp_path_factory.mktemp("tiny"))
    tokens = np.concatenate([read_shard(folder / f"fineweb_train_{i:06d}.bin").numpy() for i in (1, 2)])
    return folder, tokens.astype(np.int64)


def test_generation_is_deterministic(tiny_corpus, tmp_path):
    folder, _ = tiny_corpus
    again = synthetic.generate(TINY, tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) == [
        "corpus.json", "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    for name in names:
        assert (folder / name).read_bytes() == (again / name).read_bytes()


def test_corpus_json(tiny_corpus):
    folder, _ = tiny_corpus
    meta = json.loads((folder / "corpus.json").read_text())
    assert meta["entropy_rate"] == synthetic.entropy_rate(TINY) == synthetic.entropy_rate_of(folder)
    assert meta["spec"]["K"] == TINY.K and meta["version"] == TINY.version
    assert meta["shards"] == {"fineweb_val_000000.bin": 50_000, "fineweb_train_000001.bin": 1_000_000,
                              "fineweb_train_000002.bin": 1_000_000}
    assert [(entry["name"], entry["tokens"]) for entry in meta["manifest"]] == list(meta["shards"].items())
    for entry in meta["manifest"]:
        shard = folder / entry["name"]
        assert entry["bytes"] == shard.stat().st_size == 1024 + 2 * entry["tokens"]
        assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_documents_and_token_ids(tiny_corpus):
    _, tokens = tiny_corpus
    is_eot = tokens == synthetic.EOT
    assert is_eot[0]  # every shard starts a document, as FineWeb's do
    assert np.all((tokens < TINY.K) | is_eot)
    assert not np.any(is_eot[:-1] & is_eot[1:])  # no empty documents
    # Documents hold 1/q content tokens on average: within 5 standard errors of a geometric mean.
    lengths = np.diff(np.flatnonzero(is_eot)) - 1
    assert abs(lengths.mean() - 1 / TINY.q) < 5 * math.sqrt((1 - TINY.q) / TINY.q**2 / len(lengths))
    # Inside a document every step is one of the offsets.
    offsets, _ = synthetic.noise_distribution(TINY)
    inside = ~is_eot[:-1] & ~is_eot[1:]
    assert set(np.unique((tokens[1:][inside] - tokens[:-1][inside]) % TINY.K).tolist()) == set(offsets.tolist())


def test_empirical_conditional_entropy_matches_the_rate(tiny_corpus):
    """The data's bigram conditional entropy equals entropy_rate(spec).

    Tolerance: N = 2M transitions.  The surprisal -log P(next | prev) under the true chain
    has a standard deviation s (measured below, ~1 nat), so its mean over the data is within
    5 s/sqrt(N) (~0.004 nats) of the rate except with negligible probability.  The plug-in
    estimate from bigram counts is low by the Miller-Madow bias, (#nonzero cells - #rows)/(2N)
    (~1e-4 here), which is added back; its own fluctuation is of the same s/sqrt(N) size."""
    _, tokens = tiny_corpus
    K, rate = TINY.K, synthetic.entropy_rate(TINY)
    states = np.where(tokens == synthetic.EOT, K, tokens)
    prev, nxt = states[:-1], states[1:]
    N = len(prev)

    # The true transition probabilities, to measure the surprisal's spread.
    offsets, probs = synthetic.noise_distribution(TINY)
    step_prob = np.zeros(K)
    step_prob[offsets] = probs
    true_p = np.where(prev == K, 1 / K, np.where(nxt == K, TINY.q, (1 - TINY.q) * step_prob[(nxt - prev) % K]))
    assert np.all(true_p > 0)  # every observed transition is possible
    surprisal = -np.log(true_p)
    tolerance = 5 * surprisal.std() / math.sqrt(N)
    assert 0.002 < tolerance < 0.006
    assert abs(surprisal.mean() - rate) < tolerance

    counts = np.bincount(prev * (K + 1) + nxt, minlength=(K + 1) ** 2).reshape(K + 1, K + 1).astype(np.float64)
    rows = counts.sum(1, keepdims=True)
    nonzero = counts > 0
    plug_in = -(counts[nonzero] * np.log((counts / np.maximum(rows, 1))[nonzero])).sum() / N
    miller_madow = (nonzero.sum() - (rows > 0).sum()) / (2 * N)
    assert abs(plug_in + miller_madow - rate) < tolerance


# A corpus of three small shards (val 1000 tokens, train 2000 + 1000) for the cache tests.
SMALL = synthetic.SyntheticSpec(K=32, num_offsets=4, train_tokens=3000, val_tokens=1000, shard_tokens=2000)


def test_ensure_corpus_caches(tmp_path, monkeypatch, capsys):
    spec = SMALL
    (tmp_path / f".{synthetic.corpus_name(spec)}.partial-killed").mkdir()  # a killed run's leftover
    folder = synthetic.ensure_corpus(spec, cache_dir=tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("synthetic-v1-")
    assert "generating the synthetic corpus" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folder.name]
    assert synthetic.entropy_rate_of(folder) == synthetic.entropy_rate(spec)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def must_not_run(*args):
        raise AssertionError("the cached corpus was regenerated")
    monkeypatch.setattr(synthetic, "generate", must_not_run)
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    assert synthetic.ensure_corpus(spec) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert capsys.readouterr().err == ""
    # Another spec is another folder.
    assert synthetic.corpus_name(spec) != synthetic.corpus_name(synthetic.SyntheticSpec(K=33, num_offsets=4))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[1024 + 7] ^= 0xFF  # a token's byte: the size stays, the sha256 changes
    path.write_bytes(bytes(data))


def _drop_the_manifest(path):
    """corpus.json as written before it had a manifest."""
    description = json.loads(path.read_text())
    del description["manifest"]
    path.write_text(json.dumps(description))


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "fineweb_train_000001.bin").unlink(), "fineweb_train_000001.bin is missing"),
    (lambda folder: (folder / "fineweb_val_000000.bin").unlink(), "fineweb_val_000000.bin is missing"),
    (lambda folder: os.truncate(folder / "fineweb_train_000002.bin", 1500),
     "fineweb_train_000002.bin has 1500 bytes, the manifest says 3024"),
    (lambda folder: _flip_a_byte(folder / "fineweb_train_000002.bin"),
     "fineweb_train_000002.bin does not match the manifest's sha256"),
    (lambda folder: shutil.copy(folder / "fineweb_train_000002.bin", folder / "fineweb_train_000003.bin"),
     "fineweb_train_000003.bin is not in the manifest"),
    (lambda folder: (folder / "corpus.json").write_text('{"entropy_rate": 2.'), "corpus.json is not valid JSON"),
    (lambda folder: (folder / "corpus.json").unlink(), "corpus.json is missing"),
    (lambda folder: _drop_the_manifest(folder / "corpus.json"), "corpus.json holds no shard manifest"),
])
def test_ensure_corpus_regenerates_a_damaged_corpus(tmp_path, capsys, damage, message):
    folder = synthetic.ensure_corpus(SMALL, cache_dir=tmp_path)
    pristine = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    damage(folder)
    assert synthetic.ensure_corpus(SMALL, cache_dir=tmp_path) == folder
    err = capsys.readouterr().err
    reason = err.splitlines()[0]  # one line says what was wrong, then the usual "generating" line
    assert str(folder) in reason and message in reason and "regenerating" in reason
    assert "generating the synthetic corpus" in err.splitlines()[1]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == pristine  # deterministic: the same corpus again
    train = TokenLoader.from_pattern(folder, split="train", global_batch_tokens=16)
    assert [p.name for p in train.files] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert sum(shard_token_count(p) for p in train.files) == SMALL.train_tokens
    assert synthetic.ensure_corpus(SMALL, cache_dir=tmp_path) == folder and capsys.readouterr().err == ""


def test_verify_names_the_damaged_shard_and_passes_after_regeneration(tmp_path, monkeypatch, capsys):
    folder = synthetic.ensure_corpus(SMALL, cache_dir=tmp_path)
    capsys.readouterr()
    assert synthetic.main(["--verify", "--out", str(folder)]) == 0
    assert f"{folder}: ok" in capsys.readouterr().out
    _flip_a_byte(folder / "fineweb_train_000001.bin")
    assert synthetic.main(["--verify", "--out", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert "fineweb_train_000001.bin does not match the manifest's sha256" in err and "regenerates it" in err
    assert "fineweb_train_000002.bin" not in err and "ok" not in out
    synthetic.ensure_corpus(SMALL, cache_dir=tmp_path)
    assert synthetic.main(["--verify", "--out", str(folder)]) == 0
    # Without --out it checks the default corpus's cache folder, and generates nothing there.
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path / "empty"))
    assert synthetic.main(["--verify"]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "empty").exists()


def test_verify_help():
    result = subprocess.run([sys.executable, "-m", "speedrun.data.synthetic", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--verify" in result.stdout and "sha256" in result.stdout


def test_ensure_corpus_concurrent_processes_generate_once(tmp_path):
    code = ("import sys; from speedrun.data import synthetic; "
            "spec = synthetic.SyntheticSpec(train_tokens=2_000_000, val_tokens=1000, shard_tokens=1_000_000); "
            f"print(synthetic.ensure_corpus(spec, cache_dir={str(tmp_path)!r}))")
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), results
    assert results[0][0] == results[1][0]
    assert sum("generating" in err for _, err in results) == 1


def test_spec_validation():
    with pytest.raises(ValueError, match="K must be"):
        synthetic.SyntheticSpec(K=50257)
    with pytest.raises(ValueError, match="q must be"):
        synthetic.SyntheticSpec(q=1.0)
    with pytest.raises(ValueError, match="num_offsets"):
        synthetic.SyntheticSpec(K=8, num_offsets=8)


# ---------------------------------------------------------------------------- the downloader CLI

def test_downloader_help():
    result = subprocess.run([sys.executable, "-m", "speedrun.data.fineweb", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "--train-shards" in result.stdout and "kjj0/fineweb10B-gpt2" in result.stdout


def test_downloader_without_huggingface_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import raise ImportError
    assert fineweb.main(["--train-shards", "1", "--out", str(tmp_path)]) == 2
    assert "install it with pip install huggingface_hub" in capsys.readouterr().err


def fake_hub(monkeypatch, download):
    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_downloader_offline(tmp_path, monkeypatch, capsys):
    def unreachable(**kwargs):
        raise OSError("[Errno 101] Network is unreachable")
    fake_hub(monkeypatch, unreachable)
    assert fineweb.main(["--train-shards", "2", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "[1/3] fineweb_val_000000.bin" in out
    assert len(err.strip().splitlines()) == 1
    assert "failed" in err and "Network is unreachable" in err and "offline" in err and "synthetic" in err


def test_downloader_fetches_verifies_and_skips(tmp_path, monkeypatch, capsys):
    calls = []

    def download(repo_id, filename, repo_type, local_dir, force_download):
        assert (repo_id, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        calls.append(filename)
        write_shard(f"{local_dir}/{filename}", np.arange(100))
    fake_hub(monkeypatch, download)
    assert fineweb.main(["--train-shards", "2", "--out", str(tmp_path)]) == 0
    assert calls == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert "[3/3] fineweb_train_000002.bin: ok (100 tokens)" in capsys.readouterr().out
    calls.clear()
    assert fineweb.main(["--train-shards", "2", "--out", str(tmp_path)]) == 0
    assert calls == [] and "already present" in capsys.readouterr().out

    def corrupt(repo_id, filename, repo_type, local_dir, force_download):
        with open(f"{local_dir}/{filename}", "wb") as f:
            f.write(b"<html>rate limited</html>")
    fake_hub(monkeypatch, corrupt)
    assert fineweb.main(["--train-shards", "3", "--out", str(tmp_path)]) == 1
    assert "not a valid shard" in capsys.readouterr().err


def test_downloader_rejects_shard_counts(capsys):
    with pytest.raises(SystemExit) as info:
        fineweb.main(["--train-shards", "104"])
    assert info.value.code == 2 and "0..103" in capsys.readouterr().err
