"""The LightningDataModule: the official 60k train / 10k test splits, a seeded validation split, and batches.

Two backends serve the same batches (float32 images in [0, 1] shaped [B, 1, 28, 28], int64 labels):
- ``device``: every split is one uint8 tensor on the training device and `DeviceLoader` gathers each batch
  from a seeded permutation: no per-sample Python work, no host-to-device copy per step.
- ``dataloader``: a torchvision dataset with transforms behind a torch DataLoader (worker processes, your own
  torchvision transforms in `transforms`).

`augment` (random crop with padding, horizontal flip, random erasing) changes training batches only, on either
backend: on the device path a whole batch at once where it lives (`Augment`), on the dataloader path as the
equivalent torchvision transforms. Validation and test batches are never augmented.

Normalization is not done here: it lives inside the model, so checkpoints and exports take raw pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import VisionDataset

from fmnist_lab.data.augment import Augment
from fmnist_lab.data.idx import FILES, TEST_SIZE, TRAIN_SIZE, DataError, default_root, find_file, load_split, to_float

Tensors = tuple[torch.Tensor, torch.Tensor]


class DeviceLoader:
    """Batches gathered from uint8 images [N, 28, 28] and labels that already live on the training device.

    Lightning takes it as it takes a DataLoader (an iterable with a length) and, because it has `state_dict` /
    `load_state_dict` (Lightning's stateful-iterable protocol), saves its position in every checkpoint: a run
    resumed in the middle of an epoch continues with exactly the batches that were left.

    Epoch e's order is a permutation seeded by (seed, e), so it depends on nothing else. `epoch` says which
    epoch a pass is (the data module passes the trainer's current epoch); alone, the loader counts its passes.

    Under DDP each of `world` processes takes every `world`-th index of the same permutation (`rank`), so one
    step's batches across all ranks are exactly one single-process batch of `world` x batch_size images. `pad`
    (training) repeats the permutation's first indices when the images do not divide evenly, so every rank
    runs the same number of steps, as DDP requires.

    `tensors` is asked for the split at each pass, so the loader holds no data between passes: the data module
    can release the training split once fit ends although Lightning keeps the loader.

    `transform` (the training loader's `Augment`) is applied to each float batch on its device.
    """

    def __init__(self, tensors: Callable[[], Tensors], batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world: int = 1, pad: bool = False,
                 epoch: Callable[[], int] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.tensors, self.batch_size, self.shuffle, self.drop_last = tensors, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world, self.pad, self.epoch = seed, rank, world, pad, epoch
        self.transform = transform
        self.passes = 0
        self.position = {"epoch": 0, "batches": 0}  # the pass in progress and the batches it has handed out
        self.resume_at: dict[str, int] = {}

    def shard_size(self) -> int:
        n = len(self.tensors()[1])
        return -(-n // self.world) if self.pad else len(range(self.rank, n, self.world))

    def __len__(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tensors]:
        images, labels = self.tensors()
        epoch = self.epoch() if self.epoch else self.passes
        self.passes += 1
        skip = self.resume_at["batches"] if self.resume_at.get("epoch") == epoch else 0
        self.resume_at = {}
        self.position = {"epoch": epoch, "batches": skip}
        n, order = len(labels), None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=generator).to(labels.device)
        if self.world > 1:
            order = torch.arange(n, device=labels.device) if order is None else order
            if self.pad:
                order = torch.cat([order, order[: -n % self.world]])
            order = order[self.rank::self.world]
        size = self.batch_size
        for start in range(skip * size, len(self) * size, size):
            index = slice(start, start + size) if order is None else order[start:start + size]
            self.position["batches"] += 1  # counted when handed out: Lightning asks for a batch only to train it
            # uint8 at rest, float per batch: 4x less memory than a float copy of the split, same values
            x = to_float(images[index])
            yield (self.transform(x) if self.transform else x), labels[index]

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)


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
    """Official 60k train / 10k test; `val_size` images of train held out with a split seeded by `seed`."""

    def __init__(self, root: str | None = None, batch_size: int = 128, val_size: int = 5000,
                 backend: str = "device", seed: int = 42, download: bool = False, num_workers: int = 0,
                 pin_memory: bool = False, eval_batch_size: int = 1000, drop_last: bool = False,
                 augment: Mapping | None = None, transforms: Sequence | None = None) -> None:
        super().__init__()
        if augment and not isinstance(augment, Mapping):  # an empty list: a run saved before augment was a mapping
            raise ValueError(f"data.augment={augment!r} is not valid: it takes crop_padding, flip and erase (e.g. "
                             "data.augment.flip=0.5); torchvision transforms for the dataloader backend go in "
                             "data.transforms.")
        self.root = Path(root) if root else default_root()
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.backend, self.seed, self.download, self.drop_last = backend, seed, download, drop_last
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.augment, self.transforms = Augment(**(augment or {})), list(transforms or [])
        self.splits: dict[str, Tensors] = {}

    def prepare_data(self) -> None:
        if self.download:
            try:
                find_file(self.root, FILES["test"][1])
            except DataError:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(self.root), train=True, download=True)
                FashionMNIST(str(self.root), train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        # teardown releases train and val after fit; load again only what this stage is missing
        if "test" in self.splits and (stage == "test" or "train" in self.splits):
            return
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

    def tensors(self, split: str) -> Tensors:
        """uint8 images [N, 28, 28] and int64 labels of `train`, `val` or `test`, loaded when not yet held."""
        if split not in self.splits:
            self.setup("test" if split == "test" else "fit")
        return self.splits[split]

    def loader(self, split: str) -> DeviceLoader | DataLoader:
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        # overfit_batches means "the same few batches every epoch": no shuffling then.
        shuffle = train and not (self.trainer and self.trainer.overfit_batches)
        if self.backend == "device":
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            epoch = (lambda: self.trainer.current_epoch) if self.trainer else None
            return DeviceLoader(lambda: self.tensors(split), batch_size, shuffle=shuffle, seed=self.seed,
                                drop_last=train and self.drop_last, rank=rank, world=world, pad=train, epoch=epoch,
                                transform=self.augment if train and self.augment else None)
        from torchvision import transforms

        steps = [*self.transforms, *self.augment.torchvision()] if train else [transforms.ToTensor()]
        transform = transforms.Compose(steps)
        return DataLoader(FashionMNISTImages(*self.tensors(split), transform), batch_size=batch_size,
                          shuffle=shuffle, drop_last=train and self.drop_last, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self):
        return self.loader("train")

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")
