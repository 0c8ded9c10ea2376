"""fmnist_lab: train, checkpoint and export FashionMNIST classifiers with Lightning + Hydra."""

__version__ = "0.1.0"
