"""CIFAR-10 for the trainer: the download and its cache, the synthetic stand-in, and the on-device loader.

1. CIFAR-10 (`--data cifar10`).  The python tarball from its canonical source, checked
   against its md5, read (a restricted unpickler: only numpy arrays may be rebuilt) and
   cached as uint8 tensors in <cache>/cifar10/{train,test}.pt, where <cache> is --data-dir,
   else $SPEEDRUN_CACHE, else ~/.cache/speedrun.  Images are [N, 32, 32, 3] uint8 (HWC, as
   the record keeps them), labels [N] int64.  Later runs load the .pt files only.

2. The synthetic set (`--data synthetic`, the default).  CIFAR-shaped (50,000 + 10,000
   32x32 RGB uint8 images, 10 classes), generated on the CPU from a seed, deterministic and
   offline.  Each class is a plaid of one spatial frequency and orientation family painted
   in one colour, at a random phase (so translations keep the class) and mirror-symmetric
   (so flips keep it too); over it lies a weaker plaid of a random class in a random colour,
   a per-image colour cast, and pixel noise.  A convnet learns it; its accuracy SAYS NOTHING
   ABOUT CIFAR-10: it exists so that the trainer runs, and can be timed at CIFAR-10's
   shapes, without a download.

3. `Loader`: the whole split on the device as `dtype` images in [0, 1] (channels_last);
   per epoch, with the record's augmentations: normalize; in epoch 0 a random mirror of
   each image, and then every odd epoch the whole (pre-mirrored) set mirrored again
   ("alternating flip"); reflect-pad by `translate` pixels and crop back to 32x32 at a
   random offset in [-translate, translate]^2 per image, drawn anew every epoch; then
   batches of a fresh permutation.  The crop is one gather over an unfold view of the
   padded set (`crop_gather`); the record's per-offset masked copies are `crop_masks`,
   the `--kernels augment=torch` choice.  Both give the same images from the same draws.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_MEMBER = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)  # the record's normalization, per channel
STD = (0.2470, 0.2435, 0.2616)


# ---- 1. CIFAR-10: download, check, parse, cache -----------------------------------------

def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("SPEEDRUN_CACHE") or Path.home() / ".cache" / "speedrun")


def fetch(url: str, destination: Path) -> None:
    """Copy `url` (https:// or file://) to `destination`."""
    print(f"speedrun: downloading {url} -> {destination}", file=sys.stderr, flush=True)
    urllib.request.urlretrieve(url, destination)


def md5_of(path: Path) -> str:
    with open(path, "rb") as f:  # hashlib reads the file in chunks itself (Python >= 3.11)
        return hashlib.file_digest(f, "md5").hexdigest()


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and refuses anything else."""

    # _codecs.encode: how a Python 3 protocol-2 pickle spells an array's raw bytes (str -> bytes).
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}: not a plain array file")
        return super().find_class(module, name)


def _read_batch(tar: tarfile.TarFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == name), None)
    if member is None:
        raise ValueError(f"{tar.name}: no member named {name}; not the CIFAR-10 python tarball")
    batch = _ArraysOnly(io.BytesIO(tar.extractfile(member).read()), encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{tar.name}:{member.name}: data {data.shape} / {len(labels)} labels is not CIFAR-10's "
                         "[N, 3072] uint8 with N labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < 10):
        raise ValueError(f"{tar.name}:{member.name}: labels outside 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW planes -> HWC
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def read_tarball(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"train": {"images", "labels"}, "test": {...}} from the python tarball."""
    with tarfile.open(path, "r:gz") as tar:
        train = [_read_batch(tar, name) for name in TRAIN_MEMBERS]
        test_images, test_labels = _read_batch(tar, TEST_MEMBER)
    return {"train": {"images": torch.cat([i for i, _ in train]), "labels": torch.cat([l for _, l in train])},
            "test": {"images": test_images, "labels": test_labels}}


def _save_atomically(obj, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(obj, partial)
    os.replace(partial, path)


def ensure_cifar10(cache_dir: str | Path | None = None, *, url: str = URL, md5: str = MD5,
                   fetch: Callable[[str, Path], None] = fetch) -> Path:
    """The folder holding train.pt and test.pt, downloading and converting on first use.

    A tarball already in the folder is reused if its md5 is right and fetched again if not;
    a fresh download with the wrong md5 is deleted and a ValueError says so."""
    folder = cache_root(cache_dir) / "cifar10"
    if (folder / "train.pt").is_file() and (folder / "test.pt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tarball = folder / TARBALL
    placed = md5_of(tarball) if tarball.is_file() else None
    if placed != md5:
        # A tarball put there by hand that fails its md5 is named, not silently replaced.
        bad = "" if placed is None else (f"{tarball} has md5 {placed}, expected {md5} (corrupt, truncated or not "
                                         "the CIFAR-10 python tarball), so it is fetched again; ")
        if bad:
            print(f"speedrun: {bad.rstrip('; ')}", file=sys.stderr, flush=True)
        partial = folder / f".{TARBALL}.partial-{os.getpid()}"
        try:
            try:
                fetch(url, partial)
            except OSError as error:  # urllib's URLError/HTTPError are OSErrors
                raise RuntimeError(f"{bad}could not download CIFAR-10 from {url} ({error}); without network "
                                   f"access, copy {TARBALL} (md5 {md5}) into {folder} by hand") from error
            found = md5_of(partial)
            if found != md5:
                raise ValueError(f"CIFAR-10 download from {url} has md5 {found}, expected {md5}: the file is "
                                 "corrupt or not the CIFAR-10 python tarball; it was deleted, try again")
            os.replace(partial, tarball)
        finally:
            partial.unlink(missing_ok=True)
    splits = read_tarball(tarball)
    for split, tensors in splits.items():
        _save_atomically(tensors, folder / f"{split}.pt")
    return folder


def load_cifar10(cache_dir: str | Path | None = None, **download) -> dict[str, dict[str, torch.Tensor]]:
    folder = ensure_cifar10(cache_dir, **download)
    return {split: torch.load(folder / f"{split}.pt", weights_only=True) for split in ("train", "test")}


# ---- 2. the synthetic stand-in ------------------------------------------------------------

SYNTHETIC_NOTE = "SYNTHETIC data: its accuracy says nothing about CIFAR-10"


def _synthetic_split(count: int, seed: int, chunk: int = 5000) -> dict[str, torch.Tensor]:
    palette = torch.nn.functional.normalize(torch.randn(10, 3, generator=torch.Generator().manual_seed(1234)), dim=1)
    frequency = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.5] * 2)   # cycles per image width
    diagonal = torch.tensor([False] * 5 + [True] * 5)          # axis-aligned or diagonal plaid
    grid = torch.arange(32, dtype=torch.float32)
    y, x = grid.view(1, 32, 1), grid.view(1, 1, 32)
    generator = torch.Generator().manual_seed(seed)

    def plaid(cls: torch.Tensor) -> torch.Tensor:  # [B, 32, 32], values in [-1, 1]
        w = (2 * math.pi * frequency[cls] / 32).view(-1, 1, 1)
        u = torch.where(diagonal[cls].view(-1, 1, 1), (x + y) / math.sqrt(2), x)
        v = torch.where(diagonal[cls].view(-1, 1, 1), (x - y) / math.sqrt(2), y)
        phase = 2 * math.pi * torch.rand(2, len(cls), 1, 1, generator=generator)
        return (torch.cos(w * u + phase[0]) + torch.cos(w * v + phase[1])) / 2

    images, labels = [], []
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        cls = torch.randint(0, 10, (n,), generator=generator)
        other = torch.randint(0, 10, (n,), generator=generator)
        other_color = F.normalize(torch.randn(n, 3, generator=generator), dim=1)
        strength = 0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=generator)
        distraction = torch.rand(n, 1, 1, 1, generator=generator)
        picture = (strength * palette[cls].view(n, 3, 1, 1) * plaid(cls).unsqueeze(1)
                   + distraction * other_color.view(n, 3, 1, 1) * plaid(other).unsqueeze(1)
                   + 0.3 * torch.randn(n, 3, 1, 1, generator=generator)
                   + 0.6 * torch.randn(n, 3, 32, 32, generator=generator))
        pixels = (255 * (torch.tensor(MEAN).view(1, 3, 1, 1) + 0.5 * picture)).round().clamp(0, 255)
        images.append(pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous())
        labels.append(cls)
    return {"images": torch.cat(images), "labels": torch.cat(labels)}


def synthetic(train_size: int = 50_000, test_size: int = 10_000, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The synthetic set, same layout as `load_cifar10`; the same seed gives the same images."""
    return {"train": _synthetic_split(train_size, 2 * seed), "test": _synthetic_split(test_size, 2 * seed + 1)}


# ---- 3. the on-device loader and its augmentations ------------------------------------------

def flip_random(images: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    mirror = (torch.rand(len(images), device=images.device) < 0.5).view(-1, 1, 1, 1)
    return torch.where(mirror, images.flip(-1), images)


def random_shifts(count: int, radius: int, device) -> torch.Tensor:
    """[count, 2] (row, column) offsets, uniform in [-radius, radius]."""
    return torch.randint(-radius, radius + 1, size=(count, 2), device=device)


def crop_gather(padded: torch.Tensor, shifts: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, size, size]: image n cut from padded[n] at offset shifts[n] from the centre, in one gather."""
    radius = (padded.size(-1) - size) // 2
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # [N, C, 2r+1, 2r+1, size, size], a view
    rows = torch.arange(len(padded), device=padded.device)
    return windows[rows, :, shifts[:, 0] + radius, shifts[:, 1] + radius]


def crop_masks(padded: torch.Tensor, shifts: torch.Tensor, size: int) -> torch.Tensor:
    """The record's crop: one masked copy per possible offset (a Python loop over (2r+1)^2 offsets)."""
    radius = (padded.size(-1) - size) // 2
    out = torch.empty((len(padded), padded.size(1), size, size), device=padded.device, dtype=padded.dtype)
    for sy in range(-radius, radius + 1):
        for sx in range(-radius, radius + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[mask] = padded[mask, :, radius + sy:radius + sy + size, radius + sx:radius + sx + size]
    return out


CROPS = {"ours": crop_gather, "torch": crop_masks}


class Loader:
    """One split on `device`: `images` [N, 3, 32, 32] in [0, 1] (channels_last), `labels` [N].

    `epoch(e)` returns the augmented, normalized images of epoch e; `permutation()` and
    `batch(images, order, i)` cut them into shuffled batches.  Epoch 0 must come first: it draws the mirror of
    each image and pads the set once; later epochs reuse that (as the record does)."""

    def __init__(self, split: dict[str, torch.Tensor], *, batch_size: int, device, dtype: torch.dtype,
                 flip: bool = False, translate: int = 0, crop: str = "ours", drop_last: bool = True):
        self.images = (split["images"].to(device).to(dtype) / 255).permute(0, 3, 1, 2)  # NHWC memory: channels_last
        self.labels = split["labels"].to(device)
        self.mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.batch_size, self.flip, self.translate, self.drop_last = batch_size, flip, translate, drop_last
        self.crop = CROPS[crop]
        self._prepared: torch.Tensor | None = None  # epoch 0's normalized, mirrored (and padded) set

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def epoch(self, epoch: int) -> torch.Tensor:
        if epoch == 0:
            prepared = self.normalize(self.images)
            if self.flip:
                prepared = flip_random(prepared)
            if self.translate > 0:
                prepared = F.pad(prepared, (self.translate,) * 4, mode="reflect")
            self._prepared = prepared
        elif self._prepared is None:
            raise RuntimeError("Loader.epoch(0) must run before later epochs: it draws the flips and pads")
        images = self._prepared
        if self.translate > 0:
            shifts = random_shifts(len(images), self.translate, images.device)
            images = self.crop(images, shifts, self.images.size(-1))
        if self.flip and epoch % 2 == 1:
            images = images.flip(-1)
        return images.contiguous(memory_format=torch.channels_last)

    def permutation(self) -> torch.Tensor:
        """A fresh random order of the split (drawn after the epoch's augmentation, as the record)."""
        return torch.randperm(len(self.images), device=self.images.device)

    def batch(self, images: torch.Tensor, order: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of the epoch: the images and labels at order[index * batch_size:][:batch_size]."""
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        return images[chosen], self.labels[chosen]
