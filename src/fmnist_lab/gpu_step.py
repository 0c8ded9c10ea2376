"""The fast training step on a CUDA GPU, from public PyTorch APIs only; the one place CUDA graphs live.

On a GPU this small network's step is bound by kernel launches, not math, so two settings (`gpu.*` in
conf/train.yaml) cut launches:
- `gpu.fused_optimizer` (on by default): optimizers that have a fused CUDA kernel (SGD, Adam, AdamW) update
  every parameter in one launch (`fused=True`).
- `gpu.cuda_graphs` (opt-in): forward and backward of the network are captured as CUDA graphs with
  `torch.cuda.make_graphed_callables` and replayed for every training batch of the captured shape; autograd,
  the optimizer step and every Lightning feature around them stay as they are. Where a capture cannot work
  (no CUDA device, mixed precision, several devices) or fails, the run trains with the eager step after one
  warning.
Neither changes anything on the CPU.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


def optimizer_options(make: Callable, device: torch.device, fused: bool) -> dict:
    """Extra keyword arguments for the optimizer factory `make` (a functools.partial) on `device`."""
    accepts = "fused" in inspect.signature(make.func).parameters
    return {"fused": True} if fused and accepts and device.type == "cuda" else {}


class SameParameters(nn.Module):
    """`net` behind a module of its own: capturing it leaves `net` itself eager (evaluation, other shapes)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def graphed_forward(net: nn.Module, sample: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`net`'s forward and backward captured for inputs shaped like `sample`; other shapes (an epoch's last,
    partial batch) run eagerly on the same parameters."""
    graphed = torch.cuda.make_graphed_callables(SameParameters(net), (sample.clone(),))
    shape = sample.shape
    return lambda x: graphed(x) if x.shape == shape else net(x)


class CudaGraphs(Callback):
    """Sets `pl_module.train_forward` to the captured network at the first training batch, where it can.
    `metrics` (merged into metrics.json) says whether the run trained with the captured graphs."""

    def __init__(self) -> None:
        self.tried = False
        self.metrics = {"cuda_graphs": False}

    def blockers(self, trainer: pl.Trainer, x: torch.Tensor) -> list[str]:
        return [why for why, blocked in (
            ("the batch is not on a CUDA device", x.device.type != "cuda"),
            (f"precision is {trainer.precision} (captures need 32-true)", trainer.precision != "32-true"),
            ("training runs on more than one device", trainer.world_size > 1),
        ) if blocked]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.tried:
            return
        self.tried = True
        x = batch[0]
        why = self.blockers(trainer, x)
        if why:
            warnings.warn(f"gpu.cuda_graphs=true, but {'; '.join(why)}: training with the eager step.", stacklevel=1)
            return
        try:
            pl_module.train_forward = graphed_forward(pl_module.net, x)
            self.metrics["cuda_graphs"] = True
        except Exception as err:  # any capture failure means the same thing: this network needs the eager step
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            warnings.warn(f"gpu.cuda_graphs: capturing the network as a CUDA graph failed ({cause}); training "
                          "continues with the eager step. The network probably does something a graph cannot "
                          "replay (a host sync such as .item(), a shape that depends on the data).", stacklevel=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.train_forward = None  # testing and the export use the network itself
        self.tried = False
