"""MNIST on disk (verified), and the two input pipelines that feed the training loop.

`torchvision`: the seed's DataLoader with a per-sample PIL RandomRotation; kept as the reference.
`fast`: all of MNIST as one uint8 tensor on the training device; each batch is gathered by
index, rotated as a batch with `affine_grid`/`grid_sample` and normalized there.
Both derive their data order and augmentation from one integer seed per epoch, so an epoch
can be replayed exactly (resume) and two runs with the same seed see the same data.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import calculate_md5

from mnist_mlflow.config import (
    DISK_FULL_ERRNOS,
    MNIST_TRAIN_IMAGES,
    TrainConfig,
    UserError,
    mount_of,
)
from mnist_mlflow.models import MNIST_MEAN, MNIST_STD
from mnist_mlflow.runtime import Runtime

IMAGE_SIZE = 28

# The four original files: name -> (md5, bytes). torchvision checks the same MD5s.
RAW_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", 28881),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", 1648877),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", 4542),
}

# What torchvision extracts them to, and reads: name -> (md5, bytes) of the decompressed
# originals. Training reads these, so these are checked on every load: a file altered after
# extraction is caught even when the .gz files are fine, or gone.
EXTRACTED_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7840016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10008),
}
EXTRACTED_MIB = round(sum(size for _, size in EXTRACTED_FILES.values()) / 2**20)

Batch = tuple[torch.Tensor, torch.Tensor]

# The validation split's own seed: not the run's, so that every run of every variant holds
# out the same images and their validation accuracies compare.
VAL_SPLIT_SEED = 20_251_129


def validation_split(val_size: int, total: int = MNIST_TRAIN_IMAGES
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of MNIST's training images, each ascending.

    The validation images are the first `val_size` of one fixed permutation, so a smaller
    split is part of a larger one.
    """
    order = torch.randperm(total, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    held_out = torch.zeros(total, dtype=torch.bool)
    held_out[order[:val_size]] = True
    return (~held_out).nonzero().squeeze(1), held_out.nonzero().squeeze(1)


def split_digest(indices: torch.Tensor) -> str:
    """A short SHA-256 of the validation indices: equal digests, the same images."""
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Augmentation:
    """Random affine of each training image: the seed's is a rotation within ±7 degrees.

    `translate` is the largest shift as a fraction of the image size (whole pixels, as
    torchvision's RandomAffine); `scale` s draws a zoom factor from [1 - s, 1 + s].
    """

    rotation: float = 7.0
    translate: float = 0.0
    scale: float = 0.0

    @classmethod
    def of(cls, config: TrainConfig) -> Augmentation:
        return cls(config.rotation, config.translate, config.scale)

    @property
    def affine(self) -> bool:
        return self.translate > 0 or self.scale > 0

    def torchvision_transform(self) -> transforms.RandomRotation | transforms.RandomAffine:
        """The per-sample PIL equivalent: the seed's RandomRotation, or RandomAffine."""
        degrees = (-self.rotation, self.rotation)
        if not self.affine:
            return transforms.RandomRotation(degrees, fill=0)
        return transforms.RandomAffine(
            degrees, translate=(self.translate, self.translate) if self.translate else None,
            scale=(1 - self.scale, 1 + self.scale) if self.scale else None, fill=0)


# Held while MNIST is extracted or opened, beside the files.
EXTRACT_LOCK = ".extract.lock"


def verify_files(raw_dir: Path, files: dict[str, tuple[str, int]],
                 how_to_fix: str) -> dict[str, str]:
    """MD5 of each of `files` present in `raw_dir`; UserError naming a file that is wrong."""
    found = {}
    for name, (md5, size) in files.items():
        path = raw_dir / name
        if not path.is_file():
            continue
        actual_size = path.stat().st_size
        if actual_size != size:
            raise UserError(f"MNIST file {path} is {actual_size} bytes, expected {size}: "
                            f"truncated or replaced; {how_to_fix}")
        actual_md5 = calculate_md5(str(path))
        if actual_md5 != md5:
            raise UserError(f"MNIST file {path} fails its checksum (md5 {actual_md5}, "
                            f"expected {md5}); {how_to_fix}")
        found[name] = actual_md5
    return found


def verify_raw_files(raw_dir: Path) -> dict[str, str]:
    """MD5 of each MNIST archive present in `raw_dir`; UserError naming a file that is wrong."""
    return verify_files(raw_dir, RAW_FILES, "copy the original file there again")


@dataclass
class MnistData:
    """Verified MNIST: torchvision datasets plus the raw uint8 tensors (on the CPU).

    `val_size` training images are held out (`validation_split`); `train_limit` slices what
    is left.
    """

    root: Path
    train: datasets.MNIST
    test: datasets.MNIST
    md5s: dict[str, str]
    train_limit: int = 0
    test_limit: int = 0
    val_size: int = 0

    @cached_property
    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn once: the pipelines, the digest and the dataset inputs all read it.
        return validation_split(self.val_size, len(self.train.targets))

    @property
    def train_indices(self) -> torch.Tensor:
        """Indices into MNIST's training images of those trained on."""
        return _first(self._split[0], self.train_limit)

    @property
    def val_indices(self) -> torch.Tensor:
        return self._split[1]

    @property
    def val_digest(self) -> str:
        return split_digest(self.val_indices)

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.train_indices
        return self.train.data[index], self.train.targets[index]

    def val_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.val_indices
        return self.train.data[index], self.train.targets[index]

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _first(self.test.data, self.test_limit), _first(self.test.targets, self.test_limit)


def _first(tensor: torch.Tensor, limit: int) -> torch.Tensor:
    return tensor[:limit] if limit else tensor


def load_mnist(root: Path | str, train_limit: int = 0, test_limit: int = 0,
               val_size: int = 0) -> MnistData:
    """Verify (or, with network, download) MNIST under `root`/MNIST/raw and open it."""
    root = Path(root)
    raw_dir = root / "MNIST" / "raw"
    md5s = verify_raw_files(raw_dir)
    extracted = all((raw_dir / name).is_file() for name in EXTRACTED_FILES)
    if not extracted and raw_dir.is_dir() and not os.access(raw_dir, os.W_OK):
        raise UserError(f"MNIST folder {raw_dir} cannot be written: the .gz files must be "
                        "extracted there once; make it writable, or point --data-dir at a "
                        "writable copy")
    fix = "delete it, and it is extracted again from the verified .gz file"
    try:
        # Children of a parallel sweep start together: one extracts, the others wait, and
        # none reads a file another is still writing. (A read-only folder was extracted.)
        with (FileLock(raw_dir / EXTRACT_LOCK) if os.access(raw_dir, os.W_OK)
              else contextlib.nullcontext()):
            # What training reads, checked before torchvision opens it: an extracted file
            # altered since (the .gz files may be fine, or gone) is named, not parsed
            # (torchvision asserts on a damaged header, or reads a cut file as missing).
            checked = verify_files(raw_dir, EXTRACTED_FILES, fix)
            train = datasets.MNIST(root, train=True, download=True)
        test = datasets.MNIST(root, train=False)
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise _unopenable(raw_dir, err) from None
        # Extraction stopped mid-file: remove what it wrote, so that the next try, with
        # space, extracts it whole instead of finding it cut.
        for name, (_, size) in EXTRACTED_FILES.items():
            path = raw_dir / name
            if path.is_file() and path.stat().st_size != size:
                path.unlink()
        raise UserError(f"no space left on device extracting MNIST in {raw_dir} (disk "
                        f"{mount_of(raw_dir)}; the four files need {EXTRACTED_MIB} MiB): free "
                        "space, or point --data-dir at another disk") from None
    except RuntimeError as err:
        raise _unopenable(raw_dir, err) from None
    md5s.update(verify_raw_files(raw_dir))
    # And those extracted just now.
    verify_files(raw_dir, {name: expected for name, expected in EXTRACTED_FILES.items()
                           if name not in checked}, fix)
    return MnistData(root, train, test, md5s, train_limit, test_limit, val_size)


def _unopenable(raw_dir: Path, err: BaseException) -> UserError:
    """What to say when torchvision can neither open nor download MNIST."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    missing = [str(raw_dir / name) for name in RAW_FILES if not (raw_dir / name).is_file()]
    what = f"MNIST file {', '.join(missing)} is missing" if missing else (
        f"MNIST in {raw_dir} cannot be opened")
    return UserError(f"{what} and could not be downloaded ({reason}); "
                     f"put the four original .gz files in {raw_dir}")


def eval_batch_size(device: torch.device) -> int:
    """Test batch size: the whole test set on CUDA; 500 on the CPU, where activations of
    larger batches fall out of cache (500 evaluated 2.5x faster than 2000 here)."""
    return 10_000 if device.type == "cuda" else 500


def chunk_images(device: torch.device) -> int:
    """Training images rotated and normalized in one go, so that a step only slices them.

    On CUDA the whole epoch (fewer launches, 200 MB); on the CPU 1024, which stays in cache
    (measured 20% less time per epoch than per batch, and 3x less than 16k at a time).
    """
    return 65_536 if device.type == "cuda" else 1024


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed that decides data order, augmentation and dropout of one epoch."""
    return seed * 1_000_003 + epoch


class TorchvisionPipeline:
    """The seed's pipeline: DataLoader, per-sample PIL rotation, host-to-device copies."""

    def __init__(self, data: MnistData, batch_size: int, device: torch.device,
                 augmentation: Augmentation = Augmentation(), num_workers: int = 1) -> None:
        normalize = transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))
        train_tf = transforms.Compose([
            augmentation.torchvision_transform(),
            transforms.ToTensor(),
            normalize,
        ])
        test_tf = transforms.Compose([transforms.ToTensor(), normalize])
        train_set = datasets.MNIST(data.root, train=True, transform=train_tf)
        test_set = datasets.MNIST(data.root, train=False, transform=test_tf)
        self.train_set = Subset(train_set, data.train_indices.tolist())
        # Validation images are training images, seen as the test images are: no augmentation.
        self.val_set = Subset(datasets.MNIST(data.root, train=True, transform=test_tf),
                              data.val_indices.tolist())
        self.test_set = _limited(test_set, data.test_limit)
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    def train_batches(self, seed: int) -> Iterator[Batch]:
        # The generator decides the shuffle and the workers' seeds (hence the rotations).
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        yield from self._to_device(loader)

    @property
    def num_val(self) -> int:
        return len(self.val_set)

    def val_batches(self) -> Iterator[Batch]:
        yield from self._evaluation_batches(self.val_set)

    def test_batches(self) -> Iterator[Batch]:
        yield from self._evaluation_batches(self.test_set)

    def _evaluation_batches(self, dataset: Subset | datasets.MNIST) -> Iterator[Batch]:
        loader = DataLoader(dataset, eval_batch_size(self.device), num_workers=self.num_workers)
        yield from self._to_device(loader)

    def _to_device(self, loader: DataLoader) -> Iterator[Batch]:
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def _limited(dataset: datasets.MNIST, limit: int) -> datasets.MNIST | Subset:
    return Subset(dataset, range(limit)) if limit else dataset


def affine_batch(images: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor | None = None,
                 shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate (N, 1, H, W) images counter-clockwise by per-image `degrees`, zoom by `scales`
    and shift by `shifts` (N, 2) pixels (x right, y down), about the centre; black fill.

    Same geometry as torchvision's `rotate`/`affine` (nearest neighbour).
    """
    radians = degrees * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # affine_grid maps each output position to the input position it samples: the inverse.
    inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    if scales is not None:
        inverse = inverse / scales[:, None, None]
    offset = torch.zeros_like(inverse[:, :, 0])
    if shifts is not None:
        height, width = images.shape[-2:]
        normalized = shifts * torch.tensor([2 / width, 2 / height], device=shifts.device)
        offset = -(inverse @ normalized.unsqueeze(2)).squeeze(2)
    theta = torch.cat([inverse, offset.unsqueeze(2)], 2).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class FastPipeline:
    """MNIST resident on the training device; batches gathered, rotated and normalized there."""

    def __init__(self, data: MnistData, batch_size: int, device: torch.device,
                 augmentation: Augmentation = Augmentation(), channels_last: bool = False) -> None:
        self.batch_size = batch_size
        self.device = device
        self.augmentation = augmentation
        self.channels_last = channels_last
        train_images, train_labels = data.train_tensors()
        self.train_images = train_images.to(device).unsqueeze(1)  # uint8 (N, 1, 28, 28)
        self.train_labels = train_labels.to(device)
        self.val_images, self.val_labels = self._evaluation_set(*data.val_tensors())
        self.test_images, self.test_labels = self._evaluation_set(*data.test_tensors())
        # A whole number of batches, so that chunks never split one.
        self.chunk = batch_size * max(1, chunk_images(device) // batch_size)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    def train_batches(self, seed: int) -> Iterator[Batch]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        order = torch.randperm(self.num_train, device=self.device, generator=generator)
        angles, scales, shifts = self._draw_affines(generator)
        for chunk_start in range(0, self.num_train, self.chunk):
            index = order[chunk_start:chunk_start + self.chunk]
            images = self.train_images[index].float().div_(255)
            images = affine_batch(images, angles[index],
                                  None if scales is None else scales[index],
                                  None if shifts is None else shifts[index])
            # Black stays black after the affine; normalize afterwards, as torchvision does.
            images = self._laid_out(_normalize_float(images))
            labels = self.train_labels[index]
            for start in range(0, len(index), self.batch_size):
                yield images[start:start + self.batch_size], labels[start:start + self.batch_size]

    def _draw_affines(self, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-image angle, zoom and shift; the seed's rotation draws the angles alone."""
        aug, count, device = self.augmentation, self.num_train, self.device

        def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
            return torch.rand(*shape, device=device, generator=generator) * 2 - 1

        angles = uniform(count) * aug.rotation
        scales = 1 + uniform(count) * aug.scale if aug.scale else None
        shifts = (torch.round(uniform(count, 2) * (aug.translate * IMAGE_SIZE))
                  if aug.translate else None)
        return angles, scales, shifts

    def _evaluation_set(self, images: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized once, on the device: evaluation sees the same tensors every epoch."""
        return (self._laid_out(_normalize(images.to(self.device).unsqueeze(1))),
                labels.to(self.device))

    @property
    def num_val(self) -> int:
        return len(self.val_labels)

    def val_batches(self) -> Iterator[Batch]:
        yield from self._evaluation_batches(self.val_images, self.val_labels)

    def test_batches(self) -> Iterator[Batch]:
        yield from self._evaluation_batches(self.test_images, self.test_labels)

    def _evaluation_batches(self, images: torch.Tensor, labels: torch.Tensor
                            ) -> Iterator[Batch]:
        size = eval_batch_size(self.device)
        for start in range(0, len(labels), size):
            yield images[start:start + size], labels[start:start + size]

    def _laid_out(self, images: torch.Tensor) -> torch.Tensor:
        # As the model is (Runtime.channels_last); for one channel this only relabels
        # strides, no copy, but a compiled model is specialized on them.
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images


def _normalize(images_u8: torch.Tensor) -> torch.Tensor:
    return _normalize_float(images_u8.float().div_(255))


def _normalize_float(images: torch.Tensor) -> torch.Tensor:
    return images.sub_(MNIST_MEAN).div_(MNIST_STD)


Pipeline = TorchvisionPipeline | FastPipeline


def build_pipeline(config: TrainConfig, data: MnistData, runtime: Runtime) -> Pipeline:
    """The input pipeline `config.pipeline` names ('fast' or 'torchvision'), on the device
    and in the layout `runtime` trains with."""
    augmentation = Augmentation.of(config)
    if config.pipeline == "torchvision":
        return TorchvisionPipeline(data, config.batch_size, runtime.device, augmentation)
    return FastPipeline(data, config.batch_size, runtime.device, augmentation,
                        runtime.channels_last)
