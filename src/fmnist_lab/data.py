"""FashionMNIST: find and validate the IDX files, split them, and serve batches.

Two backends serve the same batches (float32 images in [0, 1] shaped [B, 1, 28, 28], int64 labels):
- ``device``: every split is one uint8 tensor on the training device; an epoch is a seeded permutation,
  each batch one gather + float conversion. No per-sample Python work, no host-to-device copies per step.
- ``dataloader``: a torchvision dataset with transforms behind a torch DataLoader, for augmentation.

Normalization is not done here: it lives inside the model, so checkpoints and exports take raw pixels.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import VisionDataset

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
HOW_TO_GET = (
    "Get the data set with `make data` (installs Debian's `dataset-fashion-mnist` package into "
    f"{DEBIAN_ROOT}), or `apt-get install dataset-fashion-mnist`, or copy the four IDX files "
    "(.gz or raw) into a folder and pass `data.root=<folder>`, or, when online, add `data.download=true`."
)


class DataError(RuntimeError):
    """The data set is missing or its files are not valid FashionMNIST IDX files."""


def default_root() -> Path:
    return DEBIAN_ROOT if DEBIAN_ROOT.is_dir() else Path("data")


def find_file(root: Path, stem: str) -> Path:
    """The file `stem` (raw or .gz) in `root` or in torchvision's download layout below it."""
    candidates = [folder / name for folder in (root, root / "FashionMNIST" / "raw") for name in (stem + ".gz", stem)]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"FashionMNIST file `{stem}[.gz]` not found in data.root={root} (looked for "
                    f"{', '.join(str(c) for c in candidates)}). {HOW_TO_GET}")


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """Read one IDX file (raw or gzip) into a uint8 tensor, checking magic number, dimensions and size.

    The payload is decompressed straight into the tensor's memory: no intermediate copies of the file.
    """
    kind = "image" if magic == IMAGE_MAGIC else "label"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            header = f.read(8)
            if len(header) < 8:
                raise DataError(f"{path} is too short to be an IDX file ({len(header)} bytes). {HOW_TO_GET}")
            found, count = struct.unpack(">II", header)
            if found != magic:
                raise DataError(f"{path} has magic number {found}, expected {magic} for an IDX {kind} file. "
                                "Is it the right file?")
            dims = (count,)
            if magic == IMAGE_MAGIC:
                size = f.read(8)
                if len(size) < 8:
                    raise DataError(f"{path} is truncated: its header is incomplete. {HOW_TO_GET}")
                rows, cols = struct.unpack(">II", size)
                if (rows, cols) != (28, 28):
                    raise DataError(f"{path} holds {rows}x{cols} images; FashionMNIST images are 28x28.")
                dims = (count, 28, 28)
            data = torch.empty(dims, dtype=torch.uint8)
            view, got = memoryview(data.numpy()).cast("B"), 0
            while got < len(view):  # in chunks: gzip's readinto decompresses a whole request into a temporary
                chunk = f.readinto(view[got:got + (1 << 20)])
                if not chunk:
                    break
                got += chunk
            if got != data.numel() or f.read(1):
                raise DataError(f"{path}: its header promises {count} {kind}s ({data.numel()} bytes of data) but "
                                f"it holds {'more' if got == data.numel() else got}: the file is truncated or "
                                f"corrupt. {HOW_TO_GET}")
    except (OSError, EOFError, gzip.BadGzipFile) as err:  # truncated or corrupt archive
        raise DataError(f"Cannot read {path}: {err}. The file is damaged; replace it. {HOW_TO_GET}") from err
    return data


def load_split(root: Path, split: str, expected_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of the `train` or `test` split, validated."""
    image_file, label_file = (find_file(root, stem) for stem in FILES[split])
    images, labels = read_idx(image_file, IMAGE_MAGIC), read_idx(label_file, LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} "
                        "labels: the two files do not belong together.")
    if expected_count is not None and len(images) != expected_count:
        raise DataError(f"{image_file} holds {len(images)} images; the official {split} split has "
                        f"{expected_count}. Point data.root at the complete data set.")
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{label_file} contains label {int(labels.max())}; FashionMNIST labels are 0-9.")
    return images, labels.long()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], exactly what torchvision's ToTensor gives."""
    return images.unsqueeze(1).float().div_(255)


class DeviceBatches:
    """Batches gathered from tensors that already live on the training device (uint8 images [N, 28, 28]).

    Each pass draws a new permutation from a generator seeded with (seed, epoch), so an epoch's order
    depends only on the seed and the epoch number: a resumed run sees the same batches.

    Under DDP each of `world` processes takes every `world`-th index of the same permutation (`rank`), so one
    step's batches across all ranks are exactly one single-process batch of `world` x batch_size images, and
    every image is seen once per epoch. `pad` (training) repeats the permutation's first few indices when the
    images do not divide evenly, so every rank runs the same number of steps, as DDP requires.

    With `group=K` (training), each item is a list of up to K (images, labels) batches: Lightning's per-batch
    hooks then run once per K optimizer steps, which `Classifier.training_step` takes one by one. `limit`
    caps the batches (not groups) per pass, so `trainer.limit_train_batches=N` still means N steps.

    `source` (instead of `images` and `labels`) looks the tensors up at each use: the data module passes its
    split, so the loader Lightning keeps after fit holds no data, and a later fit finds the split loaded again.
    """

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor | None, batch_size: int,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 batches_done: Callable[[], int] | None = None, group: int = 1, limit: int | None = None,
                 rank: int = 0, world: int = 1, pad: bool = False,
                 source: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.source = source or (lambda: (images, labels))
        self.rank, self.world, self.pad = rank, world, pad
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.batches_done = batches_done  # asked at each pass: how many batches of this epoch to skip
        self.group, self.limit = group, limit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    batch_sampler = None  # Lightning inspects it next to `sampler`

    @property
    def sampler(self) -> DeviceBatches:
        # Lightning calls `loader.sampler.set_epoch(epoch)` before every epoch (as for a DistributedSampler);
        # answering it keeps the epoch order right after a resume.
        return self

    def shard_size(self) -> int:
        n = len(self.source()[1])
        return -(-n // self.world) if self.pad else len(range(self.rank, n, self.world))

    @property
    def num_batches(self) -> int:
        n = self.shard_size()
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches if self.limit is None else min(batches, self.limit)

    def __len__(self) -> int:
        return -(-self.num_batches // self.group)

    def __iter__(self) -> Iterator:
        images, labels = self.source()
        n, order = len(labels), None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator).to(labels.device)
            self.epoch += 1
        if self.world > 1:
            order = torch.arange(n, device=labels.device) if order is None else order
            if self.pad:
                order = torch.cat([order, order[: -n % self.world]])
            order = order[self.rank::self.world]
        skip = self.batches_done() if self.batches_done else 0  # resuming in the middle of this epoch
        group = []
        for start in range(skip * self.batch_size, self.num_batches * self.batch_size, self.batch_size):
            index = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            # uint8 at rest, float per batch: 4x less memory than a float copy of the split, same values
            batch = to_float(images[index]), labels[index]
            if self.group == 1:
                yield batch
                continue
            group.append(batch)
            if len(group) == self.group:
                yield group
                group = []
        if group:
            yield group


class FashionMNISTImages(VisionDataset):
    """torchvision dataset over validated tensors: PIL image -> transforms, as torchvision's MNIST does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        super().__init__(root=None, transform=transform)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy(), mode="L")
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class FashionMNISTDataModule(pl.LightningDataModule):
    """Official 60k train / 10k test; `val_size` images of train held out with a seeded split."""

    def __init__(self, root: str | None = None, batch_size: int = 128, val_size: int = 5000,
                 backend: str = "device", seed: int = 42, download: bool = False, num_workers: int = 0,
                 pin_memory: bool = False, eval_batch_size: int = 1000, drop_last: bool = False,
                 augment: Sequence | None = None, group_batches: int = 1) -> None:
        super().__init__()
        if backend not in ("device", "dataloader"):
            raise ValueError(f"data.backend={backend!r} is not a backend; use `device` or `dataloader`.")
        self.root = Path(root) if root else default_root()
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.backend, self.seed, self.download, self.drop_last = backend, seed, download, drop_last
        self.num_workers, self.pin_memory, self.augment = num_workers, pin_memory, list(augment or [])
        self.group_batches = group_batches
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare_data(self) -> None:
        if self.download:
            try:
                find_file(self.root, FILES["test"][1])
            except DataError:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(self.root), train=True, download=True)
                FashionMNIST(str(self.root), train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if "test" in self.splits and (stage == "test" or "train" in self.splits):
            return  # what the stage needs is loaded (teardown releases train and val after fit)
        if not 0 < self.val_size < TRAIN_SIZE:
            raise ValueError(f"data.val_size={self.val_size} must be between 1 and {TRAIN_SIZE - 1}.")
        images, labels = load_split(self.root, "train", TRAIN_SIZE)
        # The split is seeded on its own, so it is the same whatever else consumed random numbers.
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size:]
        self.splits = {"train": (images[train_idx], labels[train_idx]), "val": (images[val_idx], labels[val_idx])}
        del images  # before the test split is read: the load's peak is the whole train split, copied once
        self.splits["test"] = load_split(self.root, "test", TEST_SIZE)
        if self.backend == "device":
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def teardown(self, stage: str) -> None:
        # Testing and the ONNX export need only the test split: releasing train and val after fit (47 MB as
        # uint8; device memory on a GPU) makes room for the exporter's ~100 MB of libraries.
        if stage == "fit":
            for split in ("train", "val"):
                self.splits.pop(split, None)

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.splits:  # released at the end of fit (see teardown), asked for again
            self.setup("test" if name == "test" else "fit")
        return self.splits[name]

    def _loader(self, split: str, train: bool):
        batch_size = self.batch_size if train else self.eval_batch_size
        # overfit_batches means "the same few batches every epoch": no shuffling then.
        shuffle = train and not (self.trainer and self.trainer.overfit_batches)
        if self.backend == "device":
            # Lightning counts groups; an int limit (limit_train_batches, overfit_batches, fast_dev_run) is
            # meant in steps, so the loader applies it and Lightning's own count never bites first.
            limit = self.trainer.limit_train_batches if train and self.trainer else None
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            return DeviceBatches(None, None, batch_size, source=lambda: self._split(split), shuffle=shuffle,
                                 drop_last=train and self.drop_last, seed=self.seed,
                                 batches_done=self._batches_done if train else None,
                                 group=self.group_batches if train else 1,
                                 limit=limit if isinstance(limit, int) else None, rank=rank, world=world, pad=train)
        from torchvision import transforms

        transform = transforms.Compose([*(self.augment if train else []), transforms.ToTensor()])
        return DataLoader(FashionMNISTImages(*self._split(split), transform), batch_size=batch_size,
                          shuffle=shuffle, drop_last=train and self.drop_last, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def _batches_done(self) -> int:
        """After a resume from a mid-epoch checkpoint, the batches of that epoch already trained. The epoch's
        order depends only on (seed, epoch), so skipping them continues exactly where training stopped."""
        loop = self.trainer.fit_loop if self.trainer else None
        groups = loop.epoch_loop.batch_progress.current.completed if loop and loop.restarted_mid_epoch else 0
        return groups * self.group_batches

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)
