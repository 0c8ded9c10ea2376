"""FashionMNIST: the IDX files (`idx`) and the LightningDataModule that serves them (`datamodule`)."""

from fmnist_lab.data.datamodule import DeviceLoader, FashionMNISTDataModule, FashionMNISTImages
from fmnist_lab.data.idx import CLASSES, DEBIAN_ROOT, FILES, IMAGE_MAGIC, LABEL_MAGIC, DataError, load_split, read_idx

__all__ = ["CLASSES", "DEBIAN_ROOT", "FILES", "IMAGE_MAGIC", "LABEL_MAGIC", "DataError", "DeviceLoader",
           "FashionMNISTDataModule", "FashionMNISTImages", "load_split", "read_idx"]
