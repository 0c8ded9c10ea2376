"""FashionMNIST: the IDX files (`idx`) and the LightningDataModule that serves them (`datamodule`).

The data module's names load Lightning on first use: a config or data error answers without it."""

from typing import Any

from fmnist_lab.data.idx import CLASSES, DEBIAN_ROOT, FILES, IMAGE_MAGIC, LABEL_MAGIC, DataError, load_split, read_idx

__all__ = ["CLASSES", "DEBIAN_ROOT", "FILES", "IMAGE_MAGIC", "LABEL_MAGIC", "DataError", "DeviceLoader",
           "FashionMNISTDataModule", "FashionMNISTImages", "load_split", "read_idx"]


def __getattr__(name: str) -> Any:
    if name in ("DeviceLoader", "FashionMNISTDataModule", "FashionMNISTImages"):
        from fmnist_lab.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
