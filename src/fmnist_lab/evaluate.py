"""Re-test a trained model on the 10,000 official test images.

usage: python -m fmnist_lab.evaluate run=<run dir|.ckpt|.pth> [data.root=<folder>] [device=auto|cpu|gpu]
                                     [report=false|true] [out=<folder>]

  run=        the model: a run directory, or a .ckpt or .pth file (a .pth needs its model.json beside it)
  data.root=  the folder holding the FashionMNIST files (default: the one the run trained on, else
              /usr/share/datasets/fashion-mnist or ./data)
  device=     auto (a CUDA GPU when one is visible), cpu or gpu (default: auto)
  report=     true also writes confusion_matrix.png and misclassified.png (default: false)
  out=        the folder report=true writes to (default: the run directory, or the folder holding the model file)
  -h, --help  print this help and exit
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from fmnist_lab.predict import UsageError, asked_for_help, parse_args
from fmnist_lab.run_dir import RunDir

USAGE = __doc__.split("\n\n")[1].removeprefix("usage: ")


def evaluate(run: str | Path, root: str | None = None, device: str = "auto", out: Path | None = None) -> dict:
    """The model at `run` on the official test split: `fmnist_lab.report.summarize`'s numbers (accuracy, mean
    cross-entropy, per-class accuracy, macro F1, ECE, confusion matrix) and `count`. With `out`, the report's
    two figures are written there too."""
    import torch

    from fmnist_lab.artifacts import load_model
    from fmnist_lab.data import CLASSES, FashionMNISTDataModule
    from fmnist_lab.report import predict_split, summarize, write_report

    if device == "gpu" and not torch.cuda.is_available():
        raise UsageError("device=gpu, but no CUDA GPU is visible; use device=cpu or device=auto.")
    target = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    net = load_model(run).to(target)
    data = FashionMNISTDataModule(root=root)
    data.setup("test")
    logits, labels, images = predict_split(net, data.test_dataloader(), target)
    summary = write_report(out, logits, labels, images, CLASSES) if out else summarize(logits, labels, CLASSES)
    return {**summary, "count": len(labels)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if asked_for_help(argv, __doc__):  # before the imports below, which load torch
        return 0
    try:
        # report is a string here: parse_args types a value like its default, and bool("false") is True
        options, extra, flags = parse_args(argv,
                                           {"run": None, "data.root": "", "device": "auto", "report": "false",
                                            "out": ""}, USAGE)
        if extra or flags:
            raise UsageError(f"unexpected {' '.join([*extra, *flags])}.\nusage: {USAGE}")
        if options["report"].lower() not in ("true", "false"):
            raise UsageError(f"report={options['report']!r}: expected true or false.")
        if options["out"] and options["report"].lower() != "true":
            raise UsageError(f"out={options['out']} is where report=true writes its figures, and report is off: "
                             "add report=true, or drop out=.")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fmnist_lab.data import CLASSES, DataError  # torch: only once the arguments are known to be good
    from fmnist_lab.report import CONFUSION_PNG, MISCLASSIFIED_PNG, per_class_table

    run = Path(options["run"])
    out = None
    if options["report"].lower() == "true":
        out = Path(options["out"]) if options["out"] else run if run.is_dir() else run.parent
    try:
        recorded_root, recorded = None, {}
        if run.is_dir() and RunDir(run).config.is_file():  # test on the same files the run used
            recorded_root = RunDir(run).load_config().data.get("root")
        if run.is_dir():
            recorded = RunDir(run).read_metrics()
        result = evaluate(run, options["data.root"] or recorded_root, options["device"], out)
    # BadFileError and a refused network are ValueErrors; OSError: a missing file, or an `out` it cannot write
    except (OSError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"test/acc {result['test/acc']:.4f}  test/loss {result['test/loss']:.4f}  "
          f"({result['count']:,} test images, model {run})")
    if recorded.get("status", "ok") != "ok":
        print(f"the run is marked {recorded['status']} ({recorded.get('error', 'no reason recorded')}), so it "
              "recorded no test/acc to compare with; this is the checkpoint it left")
    elif recorded.get("test/acc") is not None:
        print(f"the run recorded test/acc {recorded['test/acc']:.4f} "
              f"(difference {100 * (result['test/acc'] - recorded['test/acc']):+.2f} points)")
    print(f"test/macro_f1 {result['test/macro_f1']:.4f}  test/ece {result['test/ece']:.4f}")
    print(per_class_table(result, CLASSES))
    if out:
        print(f"report: {out / CONFUSION_PNG}, {out / MISCLASSIFIED_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
