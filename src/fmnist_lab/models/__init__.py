"""The networks (`mlp`) and the LightningModule that trains any of them (`classifier`)."""

from fmnist_lab.models.classifier import Classifier
from fmnist_lab.models.mlp import MLP

__all__ = ["MLP", "Classifier"]
