"""Re-test a trained model on the 10,000 official test images.

usage: python -m fmnist_lab.evaluate run=<run dir|.ckpt|.pth|.onnx> [data.root=<folder>] [device=auto|cpu|gpu]
                                     [report=false|true] [out=<folder>]

  run=        the model: a run directory, or a .ckpt, .pth (with its model.json beside it) or .onnx file (run on
              ONNX Runtime, on the CPU)
  data.root=  the folder holding the FashionMNIST files (default: the one the run trained on, else
              /usr/share/datasets/fashion-mnist or ./data)
  device=     auto (a CUDA GPU when one is visible), cpu or gpu (default: auto)
  report=     true also writes confusion_matrix.png and misclassified.png (default: false)
  out=        the folder report=true writes to (default: the run directory, or the folder holding the model file)
  -h, --help  print this help and exit
"""

from __future__ import annotations

import argparse
import math
import reprlib
import sys
from collections.abc import Sequence
from pathlib import Path

from fmnist_lab.predict import INFERENCE_BATCH, KeyValueParser, UsageError, run_main
from fmnist_lab.run_dir import BadFileError, RunDir


def evaluate(run: str | Path, root: str | None = None, device: str = "auto", out: Path | None = None) -> dict:
    """The model at `run` on the official test split: `fmnist_lab.report.summarize`'s numbers (accuracy, mean
    cross-entropy, per-class accuracy, macro F1, ECE, confusion matrix) and `count`. With `out`, the report's
    two figures are written there too."""
    import torch

    from fmnist_lab.data import CLASSES, FashionMNISTDataModule
    from fmnist_lab.report import summarize, write_report

    if device == "gpu" and not torch.cuda.is_available():
        raise UsageError("device=gpu, but no CUDA GPU is visible; use device=cpu or device=auto.")
    if Path(run).suffix == ".onnx" and device == "gpu":
        raise UsageError(f"device=gpu: {run} runs on ONNX Runtime's CPU provider here; use device=cpu or auto.")
    target = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    classify = model_function(run, target)
    data = FashionMNISTDataModule(root=root, eval_batch_size=INFERENCE_BATCH)
    data.setup("test")
    logits, labels, images = classify(data.test_dataloader())
    summary = write_report(out, logits, labels, images, CLASSES) if out else summarize(logits, labels, CLASSES)
    return {**summary, "count": len(labels)}


def model_function(run: str | Path, target):
    """A function from a test loader to (logits, labels, images) for the model at `run`: a PyTorch network on
    `target`, or an .onnx file on ONNX Runtime. ValueError naming the file unless it gives 10 logits an image."""
    import torch

    from fmnist_lab.data import CLASSES
    from fmnist_lab.report import predict_split

    if Path(run).suffix == ".onnx":
        from fmnist_lab.predictor import load_predictor

        predict, classes = load_predictor(str(run))

        def classify(loader) -> tuple[torch.Tensor, ...]:
            batches = [(torch.from_numpy(predict(x.float().cpu().numpy())), y.cpu().long(), x.float().cpu())
                       for x, y in loader]
            return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))
    else:
        from fmnist_lab.artifacts import load_classifier

        net, classes = load_classifier(run)  # classes: checked against the network's output width
        net = net.to(target)

        def classify(loader) -> tuple[torch.Tensor, ...]:
            return predict_split(net, loader, target)

    if len(classes) != len(CLASSES):
        raise BadFileError(f"{run} classifies into {len(classes)} classes; the FashionMNIST test has {len(CLASSES)}. "
                           "Give a model trained on FashionMNIST's classes.")
    return classify


def recorded_root(run: RunDir) -> str | None:
    """The data root in the run's saved config (None: the default one); BadFileError naming the file and key
    when it is not a folder name."""
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    config = run.load_config()
    try:
        data = config.get("data")
        root = data.get("root") if isinstance(data, DictConfig) else None
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise BadFileError(f"{run.config}: key data.root cannot be resolved ({type(err).__name__}). Restore the "
                           "file, or give the test files' folder as data.root=<folder>.") from err
    if not (isinstance(data, DictConfig) or data is None) or not (isinstance(root, str) or root is None):
        key, value = ("data.root", root) if isinstance(data, DictConfig) else ("data", data)
        raise BadFileError(f"{run.config}: key {key} is {reprlib.repr(value)}, not what a run saves there (a folder "
                           "name, in the mapping `data`). Restore the file, or give data.root=<folder>.")
    return root or None


def recorded_metrics(run: RunDir) -> dict:
    """metrics.json's numbers to compare with ({} when there is none); BadFileError naming the file and key
    when one is not what a run writes."""
    metrics = run.read_metrics()  # a mapping, or BadFileError
    checks = {"status": (lambda v: isinstance(v, str), "a string"),
              "error": (lambda v: isinstance(v, str), "a string"),
              "task": (lambda v: isinstance(v, str), "a string"),
              "test/acc": (lambda v: number(v) and 0 <= v <= 1, "an accuracy from 0 to 1"),
              "test_images": (lambda v: number(v) and v == int(v) > 0, "a number of images")}
    for key, (ok, what) in checks.items():
        if metrics.get(key) is not None and not ok(metrics[key]):
            raise BadFileError(f"{run.metrics}: key {key} is {reprlib.repr(metrics[key])}, not {what}. Restore the "
                               f"file, or give the model file itself as run= (e.g. run={run.weights}).")
    return metrics


def number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def comparison(recorded: dict, result: dict) -> str | None:
    """What the run itself recorded, next to this evaluation."""
    if recorded.get("status") not in (None, "ok"):
        return (f"the run is marked {recorded['status']} ({recorded.get('error', 'no reason recorded')}), so it "
                "recorded no test/acc to compare with; this is the checkpoint it left")
    if recorded.get("test/acc") is None:
        return None
    tested = recorded.get("test_images")
    if tested is not None and tested != result["count"]:  # e.g. debug=limit tests a slice
        task = f" (task {recorded['task']})" if recorded.get("task") else ""
        return (f"the run{task} recorded test/acc {recorded['test/acc']:.4f} over {int(tested):,} test images, not "
                f"{result['count']:,}: the two are not compared")
    return (f"the run recorded test/acc {recorded['test/acc']:.4f} "
            f"(difference {points(result['test/acc'] - recorded['test/acc'])} points)")


def points(difference: float) -> str:
    """An accuracy difference in percentage points, signed (+0.13, -0.13), one that rounds to zero as 0.00: a
    difference of -0.00 would read as a loss that is not there."""
    text = f"{100 * difference:+.2f}"
    return "0.00" if float(text) == 0 else text


def command_line() -> KeyValueParser:
    parser = KeyValueParser(__doc__)
    parser.add_option("run", required=True)
    parser.add_option("data.root")
    parser.add_option("device", default="auto")
    parser.add_option("report", default="false")
    parser.add_option("out")
    return parser


def parse_arguments(parser: KeyValueParser, argv: Sequence[str]) -> argparse.Namespace | None:
    """`parser.parse(argv)` with `report` as a bool, and `out` only with report=true; UsageError otherwise."""
    args = parser.parse(argv)
    if args is None:
        return None
    if args.report.lower() not in ("true", "false"):
        raise UsageError(f"report={args.report!r}: expected true or false.")
    args.report = args.report.lower() == "true"
    if args.out and not args.report:
        raise UsageError(f"out={args.out} is where report=true writes its figures, and report is off: "
                         "add report=true, or drop out=.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_line()
    try:
        args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args is None:  # answered before the imports below, which load torch
        parser.print_help()
        return 0
    from fmnist_lab.data import DataError  # torch: only once the arguments are known to be good

    run = Path(args.run)
    out = None
    if args.report:
        out = Path(args.out) if args.out else run if run.is_dir() else run.parent
    try:
        root, recorded = args.data_root or None, {}
        if run.is_dir():
            if root is None and RunDir(run).config.exists():  # test on the same files the run used
                root = recorded_root(RunDir(run))
            recorded = recorded_metrics(RunDir(run))
        result = evaluate(run, root, args.device, out)
    # BadFileError and a refused network are ValueErrors; OSError: a missing file, or an `out` it cannot write
    except (OSError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_result(result, run, comparison(recorded, result), out)
    return 0


def print_result(result: dict, run: Path, compared: str | None, out: Path | None) -> None:
    """Accuracy and loss, the run's own record beside them, per-class accuracy and the report's files."""
    from fmnist_lab.data import CLASSES
    from fmnist_lab.report import CONFUSION_PNG, MISCLASSIFIED_PNG, per_class_table

    print(f"test/acc {result['test/acc']:.4f}  test/loss {result['test/loss']:.4f}  "
          f"({result['count']:,} test images, model {run})")
    if compared:
        print(compared)
    print(f"test/macro_f1 {result['test/macro_f1']:.4f}  test/ece {result['test/ece']:.4f}")
    print(per_class_table(result, CLASSES))
    if out:
        print(f"report: {out / CONFUSION_PNG}, {out / MISCLASSIFIED_PNG}")


if __name__ == "__main__":
    run_main(main)
