"""The FashionMNIST files: where they are, reading IDX (raw or gzip), and checking that they are whole."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
    import torch  # here: DataError and the file names are imported by checks that answer before torch loads

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
            if count > TRAIN_SIZE:  # checked before the tensor is allocated: a header can promise 4 billion
                raise DataError(f"{path} claims {count:,} {kind}s; no FashionMNIST split has more than "
                                f"{TRAIN_SIZE:,}. The file is corrupt or not FashionMNIST's. {HOW_TO_GET}")
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
