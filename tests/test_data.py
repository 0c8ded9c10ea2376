"""The IDX reader, its validation, and the data module's splits and batches."""

from __future__ import annotations

import gc
import gzip
import struct
import weakref

import lightning.pytorch as pl
import pytest
import torch

from conftest import idx_bytes, synthetic_split, write_idx
from fmnist_lab.data import (
    FILES,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    DataError,
    DeviceLoader,
    FashionMNISTDataModule,
    load_split,
    read_idx,
)
from fmnist_lab.data.augment import Augment
from fmnist_lab.data.datamodule import Tensors
from fmnist_lab.models import Classifier


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_raw_and_gz(tmp_path, suffix):
    images, labels = synthetic_split(7, seed=0)
    assert torch.equal(read_idx(write_idx(tmp_path / f"i{suffix}", images, IMAGE_MAGIC), IMAGE_MAGIC), images)
    assert torch.equal(read_idx(write_idx(tmp_path / f"l{suffix}", labels, LABEL_MAGIC), LABEL_MAGIC), labels)


def test_wrong_magic_is_rejected(tmp_path):
    images, _ = synthetic_split(3, seed=0)
    path = write_idx(tmp_path / "labels-as-images.gz", images, LABEL_MAGIC)
    with pytest.raises(DataError, match=r"labels-as-images.gz has magic number 2049, expected 2051"):
        read_idx(path, IMAGE_MAGIC)


def test_a_header_promising_billions_of_images_is_rejected_before_allocating(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", IMAGE_MAGIC, 2**32 - 1, 28, 28))  # 3.4 TB of pixels, in 16 bytes
    with pytest.raises(DataError, match="claims 4,294,967,295 images; no FashionMNIST split has more than 60,000"):
        read_idx(path, IMAGE_MAGIC)


def test_truncated_gz_is_rejected(tmp_path):
    images, _ = synthetic_split(50, seed=0)
    whole = gzip.compress(idx_bytes(images, IMAGE_MAGIC))
    path = tmp_path / "cut.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"Cannot read .*cut.gz.*damaged"):
        read_idx(path, IMAGE_MAGIC)


def test_truncated_raw_file_is_rejected(tmp_path):
    images, _ = synthetic_split(5, seed=0)
    path = tmp_path / "cut"
    path.write_bytes(idx_bytes(images, IMAGE_MAGIC)[:-100])
    with pytest.raises(DataError, match=r"header promises 5 images .* truncated or corrupt"):
        read_idx(path, IMAGE_MAGIC)


def test_wrong_image_size_is_rejected(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(idx_bytes(torch.zeros(2, 32, 32, dtype=torch.uint8), IMAGE_MAGIC))
    with pytest.raises(DataError, match=r"32x32 images"):
        read_idx(path, IMAGE_MAGIC)


def _write_split(root, images, labels, split="test"):
    write_idx(root / FILES[split][0], images, IMAGE_MAGIC)
    write_idx(root / FILES[split][1], labels, LABEL_MAGIC)


def test_image_label_count_mismatch_is_rejected(tmp_path):
    images, labels = synthetic_split(10, seed=0)
    _write_split(tmp_path, images, labels[:9])
    with pytest.raises(DataError, match=r"holds 10 images but .* holds 9 labels"):
        load_split(tmp_path, "test")


def test_label_outside_0_9_is_rejected(tmp_path):
    images, labels = synthetic_split(10, seed=0)
    labels[3] = 12
    _write_split(tmp_path, images, labels)
    with pytest.raises(DataError, match=r"contains label 12; FashionMNIST labels are 0-9"):
        load_split(tmp_path, "test")


def test_partial_data_set_is_rejected(tmp_path):
    images, labels = synthetic_split(100, seed=0)
    _write_split(tmp_path, images, labels)
    with pytest.raises(DataError, match=r"holds 100 images; the official test split has 10000"):
        load_split(tmp_path, "test", 10_000)


def test_missing_files_say_where_we_looked_and_how_to_get_them(tmp_path):
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")
    message = str(err.value)
    assert f"data.root={tmp_path}" in message and "make data" in message and "data.download=true" in message


@pytest.mark.parametrize("backend", ["device", "dataloader"])
def test_official_splits_and_batch_format(synthetic_root, backend):
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=64, backend=backend, seed=1)
    dm.setup("fit")
    assert {split: len(dm.tensors(split)[1]) for split in ("train", "val", "test")} == \
        {"train": 55_000, "val": 5_000, "test": 10_000}
    for loader, size in ((dm.train_dataloader(), 64), (dm.val_dataloader(), 1000), (dm.test_dataloader(), 1000)):
        x, y = next(iter(loader))
        assert x.shape == (size, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.shape == (size,) and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == -(-55_000 // 64)


def test_backends_serve_identical_evaluation_batches(synthetic_root):
    """Same split, same pixel values: the device path is exactly ToTensor on the same images."""
    batches = []
    for backend in ("device", "dataloader"):
        dm = FashionMNISTDataModule(root=str(synthetic_root), backend=backend, seed=3)
        dm.setup("fit")
        batches.append(next(iter(dm.val_dataloader())))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


def quick_trainer(**options) -> pl.Trainer:
    return pl.Trainer(**{**dict(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False), **options})


def test_fit_releases_train_and_val_before_testing(synthetic_root):
    """Testing and the ONNX export need only the test split, so the train and val tensors are freed after fit
    (nothing, not even the loader Lightning keeps, holds them); a later fit loads them again."""
    dm = FashionMNISTDataModule(root=str(synthetic_root), batch_size=64)
    train_images = weakref.ref(dm.tensors("train")[0])
    test_images = weakref.ref(dm.tensors("test")[0])
    model = Classifier({"_target_": "fmnist_lab.models.MLP", "hidden": [16]},
                       {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01})
    trainer = quick_trainer()
    trainer.fit(model, datamodule=dm)
    gc.collect()
    assert train_images() is None and test_images() is not None
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    with torch.no_grad():  # the test ran on the whole test split, which is still there
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.test_dataloader())
    assert result["test/acc"] == pytest.approx(right / 10_000, abs=1e-6) and test_images() is not None
    again = quick_trainer(max_epochs=2)
    again.fit(model, datamodule=dm)
    assert again.global_step == 6 and len(dm.tensors("train")[1]) == 55_000


def test_train_and_validation_are_disjoint_and_cover_the_training_set(tmp_path):
    """Every training image lands in exactly one of train and val: the images carry their own index in their
    first two pixels, so the two splits can be checked index by index (and labels stay with their images)."""
    index = torch.arange(60_000)
    images = torch.zeros(60_000, 28, 28, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = (index // 256).to(torch.uint8), (index % 256).to(torch.uint8)
    _write_split(tmp_path, images, (index % 10).to(torch.uint8), split="train")
    _write_split(tmp_path, *synthetic_split(10_000, seed=1))
    dm = FashionMNISTDataModule(root=str(tmp_path), seed=5)
    seen = {}
    for split in ("train", "val"):
        x, y = dm.tensors(split)
        ids = x[:, 0, 0].long() * 256 + x[:, 0, 1].long()
        assert torch.equal(y, ids % 10)
        seen[split] = set(ids.tolist())
        assert len(seen[split]) == len(ids)  # no image twice within a split either
    assert (len(seen["train"]), len(seen["val"])) == (55_000, 5_000)
    assert not seen["train"] & seen["val"] and seen["train"] | seen["val"] == set(range(60_000))


def test_validation_split_is_seeded(synthetic_root):
    def val_images(seed):
        return FashionMNISTDataModule(root=str(synthetic_root), seed=seed).tensors("val")[0]

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(42))


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images whose pixels hold their own index, and labels 0..n-1."""
    return torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1).expand(n, 28, 28), torch.arange(n)


def test_device_loader_covers_each_epoch_once_in_a_seeded_order():
    images, labels = numbered(10)
    loader = DeviceLoader(lambda: (images, labels), batch_size=4, shuffle=True, seed=5)
    epoch0 = torch.cat([y for _, y in loader])
    epoch1 = torch.cat([y for _, y in loader])
    assert sorted(epoch0.tolist()) == list(range(10)) and not torch.equal(epoch0, epoch1)
    # an epoch's order depends only on (seed, epoch): a new loader told it is epoch 1 serves epoch 1 again
    same = DeviceLoader(lambda: (images, labels), batch_size=4, shuffle=True, seed=5, epoch=lambda: 1)
    assert torch.equal(torch.cat([y for _, y in same]), epoch1)
    assert len(loader) == 3 and len(DeviceLoader(lambda: (images, labels), 4, drop_last=True)) == 2
    assert all(torch.equal((x[:, 0, 0, 0] * 255).round().long(), y) for x, y in loader)  # pairs stay together


def test_device_loader_state_continues_an_epoch_where_it_stopped():
    """Lightning's stateful-iterable protocol: the state after k batches puts a new loader (as in a resumed
    process) at batch k of the same epoch; a finished epoch's state starts the next epoch from its beginning."""
    images, labels = numbered(100)

    def loader(**options):
        return DeviceLoader(lambda: (images, labels), batch_size=8, shuffle=True, seed=3, **options)

    first = loader()
    epochs = [[y for _, y in first], [y for _, y in first]]
    stopped = loader()
    it = iter(stopped)
    for _ in range(5):
        next(it)
    state = stopped.state_dict()
    assert state == {"epoch": 0, "batches": 5}
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip([y for _, y in resumed], epochs[0][5:], strict=True))

    ended = loader(epoch=lambda: 1)  # the trainer is at epoch 1 after a checkpoint from the end of epoch 0
    ended.load_state_dict({"epoch": 0, "batches": len(ended)})
    assert all(torch.equal(a, b) for a, b in zip([y for _, y in ended], epochs[1], strict=True))


def first_batch(dm: FashionMNISTDataModule, split: str) -> Tensors:
    return next(iter(getattr(dm, f"{split}_dataloader")()))


AUGMENT = {"crop_padding": 2, "flip": 0.5, "erase": 0.5}


@pytest.mark.parametrize("backend", ["device", "dataloader"])
def test_augmentation_changes_training_batches_and_never_validation_or_test(synthetic_root, backend):
    plain = FashionMNISTDataModule(root=str(synthetic_root), backend=backend, seed=3)
    augmented = FashionMNISTDataModule(root=str(synthetic_root), backend=backend, seed=3, augment=AUGMENT)
    for split in ("val", "test"):
        a, b = first_batch(plain, split), first_batch(augmented, split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), split
    torch.manual_seed(0)
    a, b = first_batch(plain, "train"), first_batch(augmented, "train")
    assert torch.equal(a[1], b[1]) and a[0].shape == b[0].shape  # same images, same order, same labels
    changed = (a[0] != b[0]).flatten(1).any(1).float().mean()
    assert changed > 0.7  # unchanged only where no crop shift, flip or erasing was drawn


@pytest.mark.parametrize("backend", ["device", "dataloader"])
@pytest.mark.parametrize("option", ["crop_padding", "flip", "erase"])
def test_each_augmentation_option_does_what_it_says_on_either_backend(synthetic_root, backend, option):
    """One option alone, on a real training batch of the data module: crops shift images by up to the padding
    (and really move them), flips mirror them, erasing blanks one rectangle of each."""
    value = {"crop_padding": 2, "flip": 1.0, "erase": 1.0}[option]
    plain = FashionMNISTDataModule(root=str(synthetic_root), backend=backend, seed=3)
    augmented = FashionMNISTDataModule(root=str(synthetic_root), backend=backend, seed=3, augment={option: value})
    torch.manual_seed(0)
    (a, _), (b, _) = first_batch(plain, "train"), first_batch(augmented, "train")
    a, b = a.float(), b.float()
    if option == "flip":
        assert torch.equal(b, a.flip(-1))
    elif option == "crop_padding":
        padded = torch.nn.functional.pad(a, (2, 2, 2, 2))
        windows = [padded[:, :, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
        found = torch.stack([(b == w).flatten(1).all(1) for w in windows], 1)
        assert found.any(1).all()  # each image is one window of the padded original
        assert (b != a).flatten(1).any(1).float().mean() > 0.8  # and most were moved: 24 of 25 windows shift
    else:
        changed = (b != a)[:, 0]
        box = changed.any(2)[:, :, None] & changed.any(1)[:, None, :]  # the rectangle around what changed
        assert (b[:, 0][box] == 0).all() and changed.flatten(1).any(1).float().mean() > 0.9


def test_device_augmentation_does_what_each_option_says():
    x = torch.rand(64, 1, 28, 28)
    torch.manual_seed(0)
    assert torch.equal(Augment(flip=1.0)(x), x.flip(-1)) and torch.equal(Augment()(x), x) and not Augment()
    flipped = (Augment(flip=0.5)(x) != x).flatten(1).any(1).float().mean()
    assert 0.3 < flipped < 0.7

    cropped = Augment(crop_padding=2)(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [padded[:, :, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
    found = torch.stack([(cropped == w).flatten(1).all(1) for w in windows], 1)  # [64, 25]: which window it is
    assert found.any(1).all() and found.float().sum(0).max() < 20  # every image one window, the windows vary

    ones = torch.ones(256, 1, 28, 28)
    erased = Augment(erase=1.0)(ones)[:, 0] == 0
    counts = erased.flatten(1).sum(1)
    assert (counts >= 1).all() and (counts <= 28 * 28 * 0.33 * 1.2).all() and counts.float().mean() > 28 * 28 * 0.1
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)
    assert torch.equal(rows * cols, counts)  # each erased area is one rectangle

    torch.manual_seed(1)
    first = Augment(**AUGMENT)(x)
    torch.manual_seed(1)
    assert torch.equal(Augment(**AUGMENT)(x), first)  # seeded by torch's generator: exact resume draws the same


@pytest.mark.parametrize(("augment", "message"), [
    ({"flip": 2}, r"data.augment.flip=2 is not valid: use a probability from 0 to 1"),
    ({"crop_padding": -1}, r"data.augment.crop_padding=-1 is not valid"),
    ([{"_target_": "torchvision.transforms.RandomHorizontalFlip"}], r"data.augment=.* data.transforms"),
])
def test_bad_augmentation_is_named(augment, message):
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(root="unused", augment=augment)
