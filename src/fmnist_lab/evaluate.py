"""Re-test a trained model on the 10,000 official test images.

    python -m fmnist_lab.evaluate run=<run dir|.ckpt|.pth> [data.root=<folder>] [device=auto|cpu|gpu]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from fmnist_lab.predict import UsageError, parse_args
from fmnist_lab.run_dir import RunDir

USAGE = __doc__.split("\n\n")[1].strip()


def evaluate(run: str | Path, root: str | None = None, device: str = "auto") -> dict[str, float]:
    """Test accuracy and mean cross-entropy of the model at `run` on the official test split."""
    import torch
    import torch.nn.functional as F

    from fmnist_lab.artifacts import load_model
    from fmnist_lab.data import FashionMNISTDataModule

    if device == "gpu" and not torch.cuda.is_available():
        raise UsageError("device=gpu, but no CUDA GPU is visible; use device=cpu or device=auto.")
    target = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    net = load_model(run).to(target)
    data = FashionMNISTDataModule(root=root)
    data.setup("test")
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            logits = net(x.to(target))
            loss += float(F.cross_entropy(logits, y.to(target), reduction="sum"))
            correct += int((logits.argmax(1) == y.to(target)).sum())
            count += len(y)
    return {"test/acc": correct / count, "test/loss": loss / count, "count": count}


def main(argv: Sequence[str] | None = None) -> int:
    from fmnist_lab.data import DataError

    try:
        options, extra, flags = parse_args(sys.argv[1:] if argv is None else argv,
                                           {"run": None, "data.root": "", "device": "auto"}, USAGE)
        if extra or flags:
            raise UsageError(f"unexpected {' '.join([*extra, *flags])}.\nusage: {USAGE}")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = Path(options["run"])
    try:
        recorded_root, recorded = None, {}
        if run.is_dir() and RunDir(run).config.is_file():  # test on the same files the run used
            recorded_root = RunDir(run).load_config().data.get("root")
        if run.is_dir():
            recorded = RunDir(run).read_metrics()
        result = evaluate(run, options["data.root"] or recorded_root, options["device"])
    except (FileNotFoundError, ValueError, DataError) as err:  # BadFileError and a refused network are ValueErrors
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
