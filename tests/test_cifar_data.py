"""CIFAR data on CPU: the download's checksum handling and parsing (a local fake tarball, no
network), the restricted unpickler, the synthetic set, and the augmentations checked exactly
against an independent (numpy) reflect-pad crop."""
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from speedrun.cifar import data


# ---- the download, checked and cached --------------------------------------------------

def _batch(rng, n):
    return {b"batch_label": b"fake", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def _fake_tarball(path, batches):
    """A tarball laid out like cifar-10-python.tar.gz: cifar-10-batches-py/<name> pickles."""
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            payload = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"data_batch_1": 3, "data_batch_2": 4, "data_batch_3": 2, "data_batch_4": 5, "data_batch_5": 1,
             "test_batch": 6}
    batches = {name: _batch(rng, n) for name, n in sizes.items()}
    tarball = tmp_path / "served" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    return tarball, _fake_tarball(tarball, batches), batches


def test_good_md5_is_accepted_parsed_and_cached_then_reused(tmp_path, fake_cifar):
    tarball, md5, batches = fake_cifar
    folder = data.ensure_cifar10(tmp_path / "cache", url=tarball.as_uri(), md5=md5)
    assert folder == tmp_path / "cache" / "cifar10"
    splits = data.load_cifar10(tmp_path / "cache", fetch=_refuse)  # cached: no second fetch
    train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    for split, rows, labels in (("train", train_rows, train_labels),
                                ("test", batches["test_batch"][b"data"], batches["test_batch"][b"labels"])):
        images = splits[split]["images"]
        assert images.dtype == torch.uint8 and images.shape == (len(rows), 32, 32, 3)
        # A row is three 32x32 planes (R, G, B); the cache holds HWC.
        assert torch.equal(images, torch.from_numpy(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()))
        assert splits[split]["labels"].tolist() == labels
    assert not [p for p in folder.iterdir() if "partial" in p.name]


def _refuse(url, destination):
    raise AssertionError("fetched although the cache was complete")


def test_bad_md5_is_rejected_with_a_clear_message_and_nothing_is_kept(tmp_path, fake_cifar):
    tarball, md5, _ = fake_cifar
    wrong = "0" * 32
    with pytest.raises(ValueError, match=f"md5 {md5}, expected {wrong}.*corrupt"):
        data.ensure_cifar10(tmp_path / "cache", url=tarball.as_uri(), md5=wrong)
    assert os.listdir(tmp_path / "cache" / "cifar10") == []


def test_an_unreachable_source_says_how_to_supply_the_tarball_by_hand(tmp_path):
    missing = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()
    with pytest.raises(RuntimeError, match="could not download CIFAR-10.*by hand"):
        data.ensure_cifar10(tmp_path / "cache", url=missing)
    assert os.listdir(tmp_path / "cache" / "cifar10") == []


def test_a_corrupt_cached_tarball_is_named_and_fetched_again(tmp_path, fake_cifar, capsys):
    tarball, md5, _ = fake_cifar
    folder = tmp_path / "cache" / "cifar10"
    folder.mkdir(parents=True)
    (folder / data.TARBALL).write_bytes(b"truncated")
    fetched = []

    def fetch(url, destination):
        fetched.append(url)
        data.fetch(url, destination)

    data.ensure_cifar10(tmp_path / "cache", url=tarball.as_uri(), md5=md5, fetch=fetch)
    assert fetched == [tarball.as_uri()] and (folder / "train.pt").is_file()
    # The hand-placed file is named with its wrong md5, not replaced silently.
    bad_md5 = hashlib.md5(b"truncated").hexdigest()
    assert f"{folder / data.TARBALL} has md5 {bad_md5}, expected {md5}" in capsys.readouterr().err


def test_a_tarball_without_the_cifar_members_is_refused(tmp_path):
    path = tmp_path / "other.tar.gz"
    md5 = _fake_tarball(path, {"data_batch_1": _batch(np.random.default_rng(1), 2)})
    with pytest.raises(ValueError, match="no member named data_batch_2"):
        data.ensure_cifar10(tmp_path / "cache", url=path.as_uri(), md5=md5)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_the_unpickler_rebuilds_arrays_but_refuses_any_other_callable():
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    rebuilt = data._ArraysOnly(io.BytesIO(pickle.dumps({b"data": array}, protocol=2)), encoding="bytes").load()
    assert np.array_equal(rebuilt[b"data"], array)
    with pytest.raises(pickle.UnpicklingError, match="not a plain array file"):
        data._ArraysOnly(io.BytesIO(pickle.dumps({b"data": _Evil()})), encoding="bytes").load()


# ---- the synthetic set --------------------------------------------------------------------

def test_synthetic_set_is_cifar_shaped_deterministic_and_balanced():
    first, again = data.synthetic(600, 200, seed=3), data.synthetic(600, 200, seed=3)
    assert first["train"]["images"].shape == (600, 32, 32, 3) and first["train"]["images"].dtype == torch.uint8
    assert first["test"]["images"].shape == (200, 32, 32, 3)
    for split in ("train", "test"):
        assert torch.equal(first[split]["images"], again[split]["images"])
        assert torch.equal(first[split]["labels"], again[split]["labels"])
    assert not torch.equal(first["train"]["images"][:200], first["test"]["images"])
    assert not torch.equal(data.synthetic(600, 200, seed=4)["train"]["images"], first["train"]["images"])
    counts = torch.bincount(first["train"]["labels"], minlength=10)
    assert counts.min() > 30  # 600 uniform draws over 10 classes: ~60 each
    # Pixels spread over the byte range around CIFAR's mean (normalization then gives ~N(0, 1)).
    pixels = first["train"]["images"].float() / 255
    assert abs(pixels.mean().item() - 0.47) < 0.05 and 0.15 < pixels.std().item() < 0.35


# ---- augmentations ------------------------------------------------------------------------

def _loader(n, *, flip, translate, crop="ours", seed=0):
    generator = torch.Generator().manual_seed(seed)
    split = {"images": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator),
             "labels": torch.arange(n)}
    return data.Loader(split, batch_size=7, device="cpu", dtype=torch.float32, flip=flip, translate=translate,
                       crop=crop)


def _reflect_crops(image: np.ndarray, radius: int) -> dict:
    """{(dy, dx): the 32x32 crop of the reflect-padded image at offset (dy, dx)} (numpy's own pad)."""
    padded = np.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    return {(dy, dx): padded[:, radius + dy:radius + dy + 32, radius + dx:radius + dx + 32]
            for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)}


def _matches(out: np.ndarray, image: np.ndarray, radius: int) -> set:
    """Every (mirrored, dy, dx) whose crop equals `out` exactly."""
    found = set()
    for mirrored, source in ((False, image), (True, image[:, :, ::-1])):
        found |= {(mirrored, *shift) for shift, crop in _reflect_crops(source, radius).items()
                  if np.array_equal(crop, out)}
    return found


def test_flip_alternates_each_image_mirrored_at_random_in_epoch_0_then_all_every_odd_epoch():
    torch.manual_seed(0)
    loader = _loader(200, flip=True, translate=0)
    plain = loader.normalize(loader.images)
    epochs = [loader.epoch(e) for e in range(4)]
    mirrored = torch.tensor([torch.equal(epochs[0][n], plain[n].flip(-1)) for n in range(200)])
    unchanged = torch.tensor([torch.equal(epochs[0][n], plain[n]) for n in range(200)])
    assert bool((mirrored ^ unchanged).all())      # each image exactly itself or its mirror
    assert 60 < int(mirrored.sum()) < 140          # ~half mirrored (binomial(200, 1/2): 100 +- 7)
    assert torch.equal(epochs[1], epochs[0].flip(-1)) and torch.equal(epochs[3], epochs[0].flip(-1))
    assert torch.equal(epochs[2], epochs[0])


def test_translation_is_an_exact_reflect_pad_crop_within_two_pixels_and_both_crops_agree():
    torch.manual_seed(1)
    loader = _loader(400, flip=False, translate=2)
    plain = loader.normalize(loader.images).numpy()
    out = loader.epoch(0)
    assert out.shape == (400, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    shifts = []
    for n in range(400):
        found = _matches(out[n].numpy(), plain[n], 2)
        unmirrored = [s for s in found if not s[0]]
        assert unmirrored, f"image {n} is no reflect-pad crop within +-2 px"
        shifts.append(unmirrored[0][1:])
    assert set(shifts) == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # 400 draws hit all 25
    # The gather and the record's masked copies cut the same images from the same draws.
    padded = torch.nn.functional.pad(loader.normalize(loader.images), (2,) * 4, mode="reflect")
    draws = data.random_shifts(400, 2, "cpu")
    assert torch.equal(data.crop_gather(padded, draws, 32), data.crop_masks(padded, draws, 32))
    # A new epoch draws new offsets.
    assert not torch.equal(loader.epoch(1), out)


def test_flip_and_translation_together_mirror_every_image_again_in_odd_epochs():
    torch.manual_seed(2)
    loader = _loader(60, flip=True, translate=2)
    plain = loader.normalize(loader.images).numpy()
    first, second = loader.epoch(0).numpy(), loader.epoch(1).numpy()
    for n in range(60):
        # An image whose crop is ambiguous (mirror vs offset) would make this vacuous: random pixels are not.
        mirror_0 = {m for m, *_ in _matches(first[n], plain[n], 2)}
        mirror_1 = {m for m, *_ in _matches(second[n], plain[n], 2)}
        assert len(mirror_0) == 1 and len(mirror_1) == 1
        assert mirror_1 == {not next(iter(mirror_0))}


def test_later_epochs_need_epoch_zero_and_batches_cover_a_permutation():
    loader = _loader(30, flip=False, translate=0)
    with pytest.raises(RuntimeError, match="epoch\\(0\\) must run"):
        loader.epoch(1)
    images = loader.epoch(0)
    order = loader.permutation()
    assert len(loader) == 4  # 30 // 7, the partial batch dropped
    batches = [loader.batch(images, order, i) for i in range(len(loader))]
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(labels, order[:28]) and len(set(order.tolist())) == 30
    assert torch.equal(torch.cat([b[0] for b in batches]), images[labels])  # labels are image indices here


def test_the_trainer_reads_cifar10_from_the_cache_folder(tmp_path, fake_cifar):
    from speedrun.cifar import train

    tarball, md5, _ = fake_cifar
    data.ensure_cifar10(tmp_path / "cache", url=tarball.as_uri(), md5=md5)  # 15 train, 6 test images
    run_dir = tmp_path / "run"
    assert train.main(["--data", "cifar10", "--data-dir", str(tmp_path / "cache"), "--device", "cpu", "--runs", "1",
                       "--epochs", "1", "--batch-size", "5", "--widths", "4,4,4", "--whiten-images", "15",
                       "--run-dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"] == "CIFAR-10" and len(results["runs"][0]["epochs"]) == 1
    assert "SYNTHETIC" not in (run_dir / "log.txt").read_text()
