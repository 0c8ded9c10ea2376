"""The report of a tested model: per-class accuracy, macro F1, calibration, the confusion matrix and the test
images it is most confidently wrong about. Shared by the run's RunReport callback and `fmnist_lab.evaluate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fmnist_lab.run_dir import atomic_write

CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"


def predict_split(net: nn.Module, loader, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Logits [N, C] float32, labels [N] int64 and images [N, 1, 28, 28] float32 of every batch `loader` yields
    (float images in [0, 1], labels), all on the CPU; the images are kept to draw the misclassified ones."""
    dtype = next(net.parameters()).dtype  # "16-true" or "64-true" precision converts the weights; inputs follow
    logits, labels, images = [], [], []
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                logits.append(net(x.to(device, dtype)).float().cpu())
                labels.append(y.cpu().long())
                images.append(x.cpu().float())
    finally:
        net.train(training)
    return torch.cat(logits), torch.cat(labels), torch.cat(images)


def summarize(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """Accuracy, mean cross-entropy, accuracy of each true class, macro F1, expected calibration error (15
    bins, L1) and the confusion matrix (true = rows, predicted = columns) as plain Python values."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_confusion_matrix,
        multiclass_f1_score,
    )

    # Probabilities, not logits: torchmetrics applies softmax only when some value lies outside [0, 1], so
    # logits that happen to lie inside it would be taken for probabilities.
    probs, n = logits.float().softmax(1), len(classes)
    per_class = multiclass_accuracy(probs, labels, num_classes=n, average=None)

    def number(value: torch.Tensor) -> float:  # torchmetrics computes in float32: a perfect F1 is 1.0000001
        return round(float(value), 6)

    return {
        "test/acc": number(multiclass_accuracy(probs, labels, num_classes=n, average="micro")),
        "test/loss": number(F.cross_entropy(logits.float(), labels)),
        "test/per_class_acc": {name: number(acc) for name, acc in zip(classes, per_class, strict=True)},
        "test/macro_f1": number(multiclass_f1_score(probs, labels, num_classes=n, average="macro")),
        "test/ece": number(multiclass_calibration_error(probs, labels, num_classes=n, n_bins=15, norm="l1")),
        "confusion": multiclass_confusion_matrix(probs, labels, num_classes=n).tolist(),
    }


def per_class_table(summary: dict, classes: Sequence[str]) -> str:
    """Class, accuracy and number of test images of that class, one line each."""
    width = max(len("class"), *(len(name) for name in classes))
    lines = [f"{'class':<{width}}  accuracy  images"]
    for name, row in zip(classes, summary["confusion"], strict=True):
        lines.append(f"{name:<{width}}  {summary['test/per_class_acc'][name]:>8.4f}  {sum(row):>6,}")
    return "\n".join(lines)


def most_confident_mistakes(labels: torch.Tensor, logits: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of up to `count` wrongly predicted images, the highest predicted probability first (ties: the
    lower index first)."""
    confidence, predicted = logits.float().softmax(1).max(1)
    wrong = (predicted != labels).nonzero().squeeze(1)
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order[:count]]


def pyplot():
    """matplotlib's pyplot, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str]):
    """The counts in the cells, coloured by the fraction of each true class (row), so that every class's
    mistakes stand out however many images it has."""
    plt = pyplot()
    counts = torch.tensor(confusion, dtype=torch.float64)
    fractions = counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    image = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:,}", ha="center", va="center", fontsize=8,
                    color="white" if fractions[i, j] > 0.5 else "black")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test set)")
    fig.tight_layout()
    return fig


def misclassified_figure(images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: Sequence[str],
                         count: int = 32):
    """The `count` images the model is most confidently wrong about, in rows of 8, each titled
    "<true> → <predicted> <probability>"."""
    plt = pyplot()
    chosen = most_confident_mistakes(labels, logits, count)
    confidence, predicted = logits.float().softmax(1).max(1)
    columns = 8
    rows = max(1, -(-len(chosen) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen.tolist(), strict=False):
        ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{classes[int(labels[i])]} → {classes[int(predicted[i])]} {float(confidence[i]):.2f}", fontsize=8)
    if not len(chosen):
        axes[0, 0].text(0, 0.5, "no misclassified test images", fontsize=12)
    fig.suptitle("most confident mistakes (true → predicted, probability)")
    fig.tight_layout()
    return fig


def write_report(folder: Path, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                 classes: Sequence[str]) -> dict:
    """confusion_matrix.png and misclassified.png into `folder`; returns `summarize`'s numbers."""
    plt = pyplot()
    summary = summarize(logits, labels, classes)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {CONFUSION_PNG: confusion_figure(summary["confusion"], classes),
               MISCLASSIFIED_PNG: misclassified_figure(images, labels, logits, classes)}
    try:
        for name, fig in figures.items():
            atomic_write(folder / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100))
    finally:
        for fig in figures.values():
            plt.close(fig)
    return summary
