"""fmnist_lab: train, checkpoint and export FashionMNIST classifiers with Lightning + Hydra."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `fmnist_lab.predict` on an ONNX model never imports torch.
    if name == "load_model":
        from fmnist_lab.artifacts import load_model

        return load_model
    raise AttributeError(f"module 'fmnist_lab' has no attribute {name!r}")
