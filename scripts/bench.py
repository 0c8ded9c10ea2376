#!/usr/bin/env python
"""Training speed side by side: the seed tutorial's loop, the conventional Lightning pipeline, raw PyTorch
loops over device-resident batches, and fmnist_lab as users run it.

    python scripts/bench.py --device cpu --epochs 3 --batch-size 64 [--rounds 2] [--out bench.md]

Every pipeline runs in its own process, one after the other and alternating over `--rounds`, so each gets
the same machine and its own peak memory. s/epoch is the median over epochs 2..N of all rounds (epoch 1
pays for warm-up); `process s` is the whole process (start-up, data, training, evaluation and, for
fmnist_lab, checkpoints, test and ONNX export). `peak RSS MB` is the process's own peak when its work is
done; `with exit MB` also counts the interpreter's exit, where the CUDA build of torch's library destructors
add 50-130 MB to any pipeline. All pipelines train on the same 55,000 images (the official train split less
the validation set) and report accuracy on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = {
    "seed": "(a) seed tutorial loop: DataLoader + ToTensor",
    "lightning": "(b) Lightning + DataLoader, self.log every step",
    "raw": "(c) raw PyTorch loop, device-resident batches",
    "raw_graph": "(d) raw loop, whole step as one CUDA graph",
    "fmnist_lab": "(e) fmnist_lab (python -m fmnist_lab)",
}
TRAIN_IMAGES = 55_000


# --- the pipelines (each runs in a child process: `bench.py --child NAME`) --------------------------------


def load(args):
    import torch

    from fmnist_lab.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(root=args.root, backend="dataloader", seed=0)
    return torch.device("cuda" if args.device == "cuda" else "cpu"), {s: data.tensors(s) for s in ("train", "test")}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def test_accuracy(net, images, labels, device) -> float:
    import torch

    from fmnist_lab.data.idx import to_float

    net.eval()
    with torch.no_grad():
        correct = sum(int((net(to_float(x).to(device)).argmax(1) == y.to(device)).sum())
                      for x, y in zip(images.split(1000), labels.split(1000), strict=True))
    return correct / len(labels)


def seed_tutorial(args) -> dict:
    """The PyTorch quickstart's training loop as written there (our files instead of its download)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.transforms import ToTensor

    from fmnist_lab.data import FashionMNISTImages

    device, splits = load(args)
    training_data = FashionMNISTImages(*splits["train"], transform=ToTensor())
    train_dataloader = DataLoader(training_data, batch_size=args.batch_size)

    class NeuralNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            self.flatten = nn.Flatten()
            self.linear_relu_stack = nn.Sequential(
                nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10), nn.ReLU()
            )

        def forward(self, x):
            return self.linear_relu_stack(self.flatten(x))

    model = NeuralNetwork().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train(dataloader, model, loss_fn, optimizer):
        model.train()
        for batch, (X, y) in enumerate(dataloader):
            if args.limit and batch == args.limit:
                break
            X, y = X.to(device), y.to(device)
            pred = model(X)
            loss = loss_fn(pred, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if batch % 100 == 0:
                loss = loss.item()  # the tutorial prints the loss every 100 batches

    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        train(train_dataloader, model, loss_fn, optimizer)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"epoch_seconds": times, "test_acc": test_accuracy(model, *splits["test"], device)}


def conventional_lightning(args) -> dict:
    """What most Lightning code looks like: DataLoader, automatic optimization, self.log every step."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision.transforms import ToTensor

    from fmnist_lab.callbacks import EpochTimer
    from fmnist_lab.data import FashionMNISTImages
    from fmnist_lab.models import MLP

    class LitMLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    device, splits = load(args)
    loader = DataLoader(FashionMNISTImages(*splits["train"], transform=ToTensor()), batch_size=args.batch_size,
                        shuffle=True)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                             max_epochs=args.epochs, default_root_dir=logs, callbacks=[timer],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_train_batches=args.limit or 1.0)
        model = LitMLP()
        trainer.fit(model, loader)
    return {"epoch_seconds": timer.metrics["epoch_seconds"],
            "test_acc": test_accuracy(model.net.to(device), *splits["test"], device)}


def raw_loop(args, cuda_graph: bool = False) -> dict:
    """The floor without a framework: batches sliced from tensors already on the device."""
    import torch
    import torch.nn.functional as F

    from fmnist_lab.data import DeviceLoader
    from fmnist_lab.models import MLP

    device, splits = load(args)
    torch.manual_seed(0)
    train = tuple(t.to(device) for t in splits["train"])
    loader = DeviceLoader(lambda: train, args.batch_size, shuffle=True, drop_last=cuda_graph,
                          seed=0)  # a graph replays one static shape
    net = MLP().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step(x, y):
        optimizer.zero_grad(set_to_none=not cuda_graph)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    if cuda_graph:  # PyTorch's "whole network capture" recipe: warm up on a side stream, then capture
        static_x, static_y = next(iter(loader))
        static_x, static_y = static_x.clone(), static_y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(static_x, static_y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static_x, static_y)

    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if args.limit and i == args.limit:
                break
            if cuda_graph:
                static_x.copy_(x)
                static_y.copy_(y)
                graph.replay()
            else:
                step(x, y)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"epoch_seconds": times, "test_acc": test_accuracy(net, *splits["test"], device)}


def interleaved(args) -> None:
    """The CPU overhead question without the noise of separate processes: in one process, alternate the raw
    loop with fmnist_lab's own training (`fmnist_lab.build.build` on the default config plus `overrides`),
    `args.steps` steps each, `args.interleave` times, and print each variant's median step time against the raw
    loop's."""
    import statistics

    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from fmnist_lab.build import build
    from fmnist_lab.callbacks import EpochTimer
    from fmnist_lab.cli import config_dir
    from fmnist_lab.data import DeviceLoader
    from fmnist_lab.logs import quiet_libraries
    from fmnist_lab.models import MLP

    _, splits = load(args)

    def raw() -> float:
        net = MLP()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        start = time.perf_counter()
        loader = DeviceLoader(lambda: splits["train"], args.batch_size, shuffle=True)
        for _, (x, y) in zip(range(args.steps), loader, strict=False):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        return time.perf_counter() - start

    def fmnist_lab(*overrides: str) -> float:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[
                "device=cpu", "epochs=1", f"batch_size={args.batch_size}", f"trainer.limit_train_batches={args.steps}",
                "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0",
                f"paths.output_dir={tempfile.mkdtemp()}", *([f"data.root={args.root}"] if args.root else []),
                *overrides])
        datamodule, model, trainer = build(cfg)
        timer = EpochTimer()  # the epoch's training steps only, as in metrics.json: no validation, no saving
        trainer.callbacks.append(timer)
        trainer.fit(model, datamodule=datamodule)
        return timer.metrics["epoch_seconds"][0]

    quiet_libraries()
    variants = {"raw loop": raw, "fmnist_lab": fmnist_lab, "without callbacks and logger":
                lambda: fmnist_lab("callbacks=none", "logger=none")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.interleave):
        for name, run in variants.items():
            times[name].append(run())
    raw_median = statistics.median(times["raw loop"])
    print(f"\n{args.interleave} x {args.steps} steps, batch {args.batch_size}, alternating in one process:\n\n"
          "| variant | ms/step (median) | vs raw loop |\n|---|---|---|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median * 1000 / args.steps:.2f} | {median / raw_median:.2f}x |")


def fmnist_lab_cli(args) -> dict:
    """fmnist_lab as users run it: `python -m fmnist_lab` (run here through runpy, which is what `-m` does, so
    the child can read its own peak memory), the default config with epochs, batch size and seed fixed."""
    import runpy

    out = Path(args.result).with_name("fmnist_lab_run")
    sys.argv = ["fmnist_lab", f"epochs={args.epochs}", f"batch_size={args.batch_size}", f"hydra.run.dir={out}",
                f"device={'gpu' if args.device == 'cuda' else 'cpu'}", "seed=0"]
    sys.argv += [f"data.root={args.root}"] if args.root else []
    sys.argv += [f"trainer.limit_train_batches={args.limit}"] if args.limit else []
    runpy.run_module("fmnist_lab", run_name="__main__", alter_sys=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"epoch_seconds": metrics["epoch_seconds"], "test_acc": metrics["test/acc"]}


CHILDREN = {"seed": seed_tutorial, "lightning": conventional_lightning, "raw": raw_loop,
            "raw_graph": lambda args: raw_loop(args, cuda_graph=True), "fmnist_lab": fmnist_lab_cli}


def child(args) -> None:
    import resource

    import torch

    # Every pipeline starts from the same seed, so its accuracy column is the same from one bench to the next
    # (the tutorial and conventional Lightning code seed nothing themselves).
    torch.manual_seed(0)
    result = CHILDREN[args.child](args)
    result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    result["rss_peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(args.result).write_text(json.dumps(result))


# --- the parent: run every pipeline in its own process, alternating, and tabulate ------------------------


def run_one(name: str, args, workdir: Path) -> dict:
    result_file = workdir / f"{name}.json"
    command = [sys.executable, __file__, "--child", name, "--result", str(result_file), "--device", args.device,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    command += ["--root", args.root] if args.root else []
    command += ["--limit", str(args.limit)] if args.limit else []
    start = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start  # the whole process: start-up, training, evaluation, files
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (workdir / f"{name}.log").read_text()[-2000:]
        raise SystemExit(f"bench: pipeline {name} failed:\n{tail}")
    result = json.loads(result_file.read_text())
    # The peak again, now with the interpreter's exit: torch's library destructors touch pages never used
    # while running.
    result["rss_exit_kb"], result["process_seconds"] = usage.ru_maxrss, seconds
    return result


def table(results: dict[str, list[dict]], args) -> str:
    rows, medians = [], {}
    for name, runs in results.items():
        later = [t for r in runs for t in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
        medians[name] = statistics.median(later)
    images = min(args.limit * args.batch_size, TRAIN_IMAGES) if args.limit else TRAIN_IMAGES
    header = ("| pipeline | s/epoch (median) | samples/s | vs (c) raw | vs (d) graph | process s | peak RSS MB "
              "| with exit MB | peak CUDA MB | test acc |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        m = medians[name]
        cuda = max((r["cuda_peak_bytes"] or 0) for r in runs)
        graph = f"{m / medians['raw_graph']:.2f}x" if "raw_graph" in medians else "n/a"
        rows.append(f"| {PIPELINES[name]} | {m:.3f} | {images / m:,.0f} | {m / medians['raw']:.2f}x | {graph} | "
                    f"{statistics.median(r['process_seconds'] for r in runs):.1f} | "
                    f"{max(r['rss_peak_kb'] for r in runs) / 1024:.0f} | "
                    f"{max(r['rss_exit_kb'] for r in runs) / 1024:.0f} | {f'{cuda / 2**20:.0f}' if cuda else 'n/a'} | "
                    f"{statistics.mean(r['test_acc'] for r in runs):.4f} |")
    return "\n".join([header, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternating sequence this many times")
    parser.add_argument("--root", default=None, help="data folder (default: the data module's)")
    parser.add_argument("--limit", type=int, default=0, help="train batches per epoch (0 = all); for smoke tests")
    parser.add_argument("--only", nargs="*", choices=list(PIPELINES), help="run only these pipelines")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="instead: alternate the raw loop and fmnist_lab's training N times in one process (CPU)")
    parser.add_argument("--steps", type=int, default=400, help="steps per --interleave measurement")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.interleave:
        return interleaved(args)

    names = [n for n in (args.only or PIPELINES) if n != "raw_graph" or args.device == "cuda"]
    names = names if "raw" in names else ["raw", *names]  # every ratio is against (c)
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in names:
                print(f"round {round_ + 1}/{args.rounds}: {PIPELINES[name]}", file=sys.stderr, flush=True)
                results[name].append(run_one(name, args, Path(tmp)))
    import torch

    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    text = (f"{card}; torch {torch.__version__}; batch {args.batch_size}, {args.epochs} epochs x {args.rounds} "
            f"rounds{f', {args.limit} batches/epoch' if args.limit else ''}\n\n{table(results, args)}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
