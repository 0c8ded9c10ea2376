"""The report of a run: per-class accuracy, macro F1, calibration, the confusion matrix and the most confident
mistakes, from the run's RunReport callback (metrics.json, PNGs, TensorBoard) and from `evaluate report=true`."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_cfg
from fmnist_lab.data import CLASSES
from fmnist_lab.evaluate import comparison
from fmnist_lab.evaluate import main as evaluate_main
from fmnist_lab.report import (
    confusion_figure,
    misclassified_figure,
    most_confident_mistakes,
    per_class_table,
    pyplot,
    summarize,
    write_report,
)
from fmnist_lab.train import train

ABC = ("a", "b", "c")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    pyplot().close("all")


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is `probabilities` (each row sums to 1)."""
    return torch.tensor(probabilities).log()


def test_summarize_against_hand_computed_numbers():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = 5.0 * F.one_hot(predicted, 3).float()
    summary = summarize(logits, labels, ABC)

    assert list(summary["test/per_class_acc"]) == list(ABC)
    assert summary["test/per_class_acc"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0}, abs=1e-6)
    assert summary["test/acc"] == pytest.approx(4 / 6, abs=1e-6)
    assert summary["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # F1 = 2 TP / (2 TP + FP + FN): a 2 right, 1 missed; b 1 right, 1 missed, 1 taken from a; c 1 right, 1 from b
    assert summary["test/macro_f1"] == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3, abs=1e-6)
    # every prediction has the same confidence, so one bin: |accuracy - confidence|
    confidence = math.exp(5) / (math.exp(5) + 2)
    assert summary["test/ece"] == pytest.approx(abs(4 / 6 - confidence), abs=1e-5)
    right, wrong = -math.log(confidence), -math.log(1 / (math.exp(5) + 2))
    assert summary["test/loss"] == pytest.approx((4 * right + 2 * wrong) / 6, abs=1e-5)


def test_ece_of_calibrated_extremes_and_of_logits_inside_0_1():
    labels = torch.arange(10).repeat(5)
    perfect = summarize(100.0 * F.one_hot(labels, 10).float(), labels, CLASSES)
    assert perfect["test/ece"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["test/acc"] == perfect["test/macro_f1"] == 1.0  # exactly: no float32 1.0000001
    # Logits that all lie in [0, 1] are still logits: the confidence is softmax's 0.13, not the raw 0.3.
    logits = torch.zeros(10, 10)
    logits[:, 0] = 0.3
    labels = torch.tensor([0] * 5 + [1] * 5)
    confidence = math.exp(0.3) / (math.exp(0.3) + 9)
    assert summarize(logits, labels, CLASSES)["test/ece"] == pytest.approx(0.5 - confidence, abs=1e-5)


def test_ece_is_over_15_equal_bins_as_documented():
    """Confidences 0.62 and 0.68 fall into one bin of a 10-bin ECE (0.6-0.7) but into two of the documented 15
    (the boundary 10/15 = 0.667 lies between them): 0.22 by hand, where 10 bins would give 0.10."""
    rows = [[0.62, 0.19, 0.19]] * 2 + [[0.68, 0.16, 0.16]] * 2
    labels = torch.tensor([0, 1, 0, 0])  # 0.62: one right of two; 0.68: both right
    ece = summarize(logits_of(rows), labels, ABC)["test/ece"]
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.62) + 0.5 * abs(1.0 - 0.68), abs=1e-5)


def test_per_class_table_lists_accuracy_and_image_count():
    summary = summarize(5.0 * F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float(), torch.tensor([0, 0, 0, 1, 1, 2]),
                        ABC)
    assert per_class_table(summary, ABC).splitlines() == ["class  accuracy  images",
                                                          "a        0.6667       3",
                                                          "b        0.5000       2",
                                                          "c        1.0000       1"]


def test_most_confident_mistakes_order():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    logits = logits_of([[0.8, 0.1, 0.1],     # right
                        [0.9, 0.05, 0.05],   # wrong, 0.9
                        [0.6, 0.3, 0.1],     # wrong, 0.6
                        [0.005, 0.99, 0.005],  # wrong, 0.99
                        [0.005, 0.99, 0.005],  # right, 0.99
                        [0.3, 0.6, 0.1],     # wrong, 0.6: after index 2 (a tie goes by index)
                        [0.1, 0.2, 0.7]])    # wrong, 0.7
    assert most_confident_mistakes(labels, logits, 32).tolist() == [3, 1, 6, 2, 5]
    assert most_confident_mistakes(labels, logits, 3).tolist() == [3, 1, 6]
    assert most_confident_mistakes(labels[[0, 4]], logits[[0, 4]], 32).tolist() == []


def test_misclassified_figure_titles_follow_the_mistakes_by_confidence():
    labels = torch.tensor([6, 0, 9, 6])
    logits = torch.full((4, 10), -10.0)
    logits[0, 0] = 3.0  # Shirt -> T-shirt/top, very sure
    logits[1, 0] = 3.0  # right
    logits[2, 7] = 1.0  # Ankle boot -> Sneaker, less sure
    logits[3, 6] = 3.0  # right
    images = torch.rand(4, 1, 28, 28)
    fig = misclassified_figure(images, labels, logits, CLASSES)
    probability = logits.softmax(1).max(1).values
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"Shirt → T-shirt/top {probability[0]:.2f}", f"Ankle boot → Sneaker {probability[2]:.2f}",
                      *[""] * 6]  # one row of 8, the rest empty
    assert float(probability[0]) > float(probability[2]) > 0.5
    assert torch.equal(torch.tensor(fig.axes[0].images[0].get_array()), images[0, 0])  # the image that is wrong


def test_confusion_figure_counts_and_row_normalized_colours():
    confusion = [[8, 2, 0], [0, 1, 3], [0, 0, 0]]
    fig = confusion_figure(confusion, ABC)
    ax = fig.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(i, j): str(confusion[i][j]) for i in range(3) for j in range(3)}
    colours = torch.tensor(ax.images[0].get_array()).flatten().tolist()
    assert colours == pytest.approx([0.8, 0.2, 0, 0, 0.25, 0.75, 0, 0, 0])  # a class with no images stays blank
    assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in ax.get_yticklabels()] == list(ABC)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")


def test_write_report_writes_both_pngs(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (200,), generator=generator)
    logits = torch.randn(200, 10, generator=generator)
    images = torch.rand(200, 1, 28, 28, generator=generator)
    summary = write_report(tmp_path / "new", logits, labels, images, CLASSES)
    assert summary == summarize(logits, labels, CLASSES)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["confusion_matrix.png", "misclassified.png"]
    with Image.open(tmp_path / "new" / "confusion_matrix.png") as confusion:
        assert confusion.format == "PNG" and 600 <= confusion.height <= confusion.width <= 1200
    with Image.open(tmp_path / "new" / "misclassified.png") as mistakes:  # 4 rows of 8: 32 of ~180 mistakes
        assert mistakes.format == "PNG" and 1200 <= mistakes.width <= 2400 and mistakes.width > 1.5 * mistakes.height
    assert pyplot().get_fignums() == []  # every figure closed


class BrokenLogger(Logger):
    """A logger that fails to record the report, as one with a full disk or an unreachable server would."""

    name, version = "broken", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if any(key.startswith("test/acc_") for key in metrics):
            raise OSError("no space left on device")


SHORT_RUN = ["device=cpu", "debug=limit", "epochs=1", "lr=0.01", "trainer.limit_train_batches=3",
             "trainer.log_every_n_steps=1", "~callbacks.onnx_export", "logger=tensorboard",
             "+logger.broken._target_=test_report.BrokenLogger"]


class Warnings(logging.Handler):
    """The warnings logged while it is attached (caplog is per test; the run is shared by the module)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def reported_run(synthetic_root, tmp_path_factory):
    """One short run with TensorBoard and a logger that fails. Three steps at a low learning rate leave a model
    that still confuses some classes, so the report has mistakes to show."""
    run = tmp_path_factory.mktemp("reported_run")
    warnings, source = Warnings(), logging.getLogger("fmnist_lab.callbacks")
    source.addHandler(warnings)
    try:
        metrics = train(compose_cfg(f"data.root={synthetic_root}", *SHORT_RUN, output_dir=run))
    finally:
        source.removeHandler(warnings)
    return run, metrics, warnings.messages


def test_run_reports_per_class_metrics_figures_and_tensorboard(reported_run):
    run, returned, warnings = reported_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/per_class_acc"] == returned["test/per_class_acc"]
    per_class = metrics["test/per_class_acc"]
    assert list(per_class) == list(CLASSES) and all(0 <= v <= 1 for v in per_class.values())
    assert min(per_class.values()) < 0.9 < max(per_class.values())  # a model with mistakes to show
    assert 0 < metrics["test/macro_f1"] < 1 and 0 < metrics["test/ece"] < 1
    for name in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.width >= 600
    # the failing logger cost a warning, not the run
    assert metrics.get("status", "ok") == "ok"
    assert [w for w in warnings if "BrokenLogger could not record the test report" in w and "no space left" in w]

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"test/confusion_matrix", "test/misclassified"} <= set(events.Tags()["images"])
    assert events.Images("test/confusion_matrix")[-1].width >= 600
    scalars = {tag: events.Scalars(tag)[-1] for tag in events.Tags()["scalars"] if tag.startswith("test/acc_")}
    assert sorted(scalars) == sorted(f"test/acc_{name.replace('/', '_').replace(' ', '_')}" for name in CLASSES)
    assert scalars["test/acc_T-shirt_top"].value == pytest.approx(per_class["T-shirt/top"], abs=1e-6)
    assert scalars["test/acc_Ankle_boot"].value == pytest.approx(per_class["Ankle boot"], abs=1e-6)
    assert scalars["test/acc_Ankle_boot"].step == metrics["global_step"]


def test_evaluate_report_matches_the_run(reported_run, synthetic_root, tmp_path, capsys):
    run, _, _ = reported_run
    out = tmp_path / "eval"
    assert evaluate_main([f"run={run}", f"data.root={synthetic_root}", "device=cpu", "report=true", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    per_class = json.loads((run / "metrics.json").read_text())["test/per_class_acc"]
    rows = {line[:11].strip(): line[11:].split() for line in printed.splitlines()[-12:-1]}
    assert rows.pop("class") == ["accuracy", "images"]
    assert {name: row[0] for name, row in rows.items()} == {name: f"{acc:.4f}" for name, acc in per_class.items()}
    assert sum(int(row[1].replace(",", "")) for row in rows.values()) == 10_000
    assert printed.splitlines()[-1] == f"report: {out / 'confusion_matrix.png'}, {out / 'misclassified.png'}"
    # the same weights on the same images draw the same figures
    for name in ("confusion_matrix.png", "misclassified.png"):
        assert (out / name).read_bytes() == (run / name).read_bytes()


def test_evaluate_refuses_a_bad_report_value(tmp_path, capsys):
    assert evaluate_main([f"run={tmp_path}", "report=maybe"]) == 2
    err = capsys.readouterr().err
    assert err == "error: report='maybe': expected true or false.\n"
    assert not list(tmp_path.iterdir())


def test_evaluate_prints_a_difference_that_rounds_to_zero_without_a_sign():
    def difference(recorded: float, measured: float) -> str:
        text = comparison({"test/acc": recorded}, {"test/acc": measured, "count": 10_000})
        return text.split("difference ")[1]

    assert difference(0.9, 0.9 - 1e-9) == difference(0.9, 0.9 + 1e-9) == difference(0.9, 0.9) == "0.00 points)"
    assert difference(0.9, 0.9 - 0.00004) == "0.00 points)"  # -0.004 points
    assert difference(0.9, 0.9013) == "+0.13 points)" and difference(0.9013, 0.9) == "-0.13 points)"
