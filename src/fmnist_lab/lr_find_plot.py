"""lr_find.png: the loss of Lightning's learning-rate range test against the rate, drawn from the finder's
results so that it reads at a glance: which network and optimizer, where the loss falls, the suggested rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist_lab.report import pyplot
from fmnist_lab.run_dir import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Lightning's finder keeps an exponential moving average of the training loss with this weight on the past.
SMOOTHING = 0.98


def debiased(losses: Sequence[float]) -> list[float]:
    """The finder's smoothed losses without their start-up artefact. Lightning divides its moving average after
    step k by 1 - 0.98^(k+1) where the average of k losses needs 1 - 0.98^k: its k-th value is (1 - 0.98^k) /
    (1 - 0.98^(k+1)) of the average, half of it at the first step, 92% at the tenth, 99% only after 55. Its curve
    so climbs from 1.2 to 2.27 over the first rates, where the network has not yet learnt anything. Leaving out
    the first points would leave out half the curve before the climb was gone, and hide the loss the test starts
    from; undoing the factor gives the average exactly: the untrained network's first 40 values (lr 1e-6 to
    2e-4) then all lie at 2.30, the cross-entropy of an even guess over 10 classes (ln 10). The finder's results
    hold only these averages, so this follows Lightning's smoothing (2.6); the lr_find test in tests/test_cli.py
    checks that a real run's curve starts at ln 10, where a change to that smoothing would show."""
    return [loss * (1 - SMOOTHING ** (k + 1)) / (1 - SMOOTHING ** k) for k, loss in enumerate(losses, start=1)]


def run_title(network: str, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> str:
    """The network's class with its widths (channels, else hidden sizes, as configured) and the optimizer's class
    with the momentum and weight decay it uses: "CNN channels=[32, 64, 128], SGD (momentum=0.9)"."""
    sizes = next((f" {key}={list(model[key])}" for key in ("channels", "hidden")
                  if isinstance(model.get(key), Sequence)), "")
    name = str(optimizer.get("_target_", "optimizer")).rsplit(".", 1)[-1]
    settings = [f"{key}={optimizer[key]:g}" for key in ("momentum", "weight_decay") if optimizer.get(key)]
    return f"{network}{sizes}, {name}" + (f" ({', '.join(settings)})" if settings else "")


def ceiling(losses: Sequence[float]) -> float | None:
    """Where the loss axis ends when the diverging end of the test would squeeze the rest into a strip: as far
    above the starting loss as the fall below it went (a quarter of the start at least). None: no need."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite:
        return None
    start, lowest = finite[0], min(finite)
    top = start + max(start - lowest, 0.25 * abs(start))
    return top if max(finite) > top else None


def lr_find_figure(results: Mapping[str, Sequence[float]], suggestion: float | None, run: str) -> Figure:
    """The debiased loss against the rate on a log axis, with the suggested rate marked on the curve; the title
    names the run (`run_title`) and the suggestion."""
    plt = pyplot()
    lrs, losses = list(results["lr"]), debiased(results["loss"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", label="training loss (moving average)")
    ax.set_xscale("log")  # the finder's rates span decades
    if suggestion is None:
        found = "no suggestion: the loss did not fall"
    else:
        found = f"suggested lr {suggestion:.3g} (steepest fall)"
        at = min(range(len(lrs)), key=lambda i: abs(lrs[i] - suggestion))
        ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([lrs[at]], [losses[at]], "o", color="tab:red", markersize=8, label="suggested rate")
    top = ceiling(losses)
    if top is not None:
        ax.set_ylim(top=top)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr_find: {run}\n{found}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_lr_find_png(path: Path, results: Mapping[str, Sequence[float]], suggestion: float | None,
                      run: str) -> Figure:
    """lr_find.png (`lr_find_figure`), with the run in the PNG's Title; returns the (closed) figure."""
    fig = lr_find_figure(results, suggestion, run)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, metadata={"Title": f"lr_find: {run}"}))
    pyplot().close(fig)
    return fig
