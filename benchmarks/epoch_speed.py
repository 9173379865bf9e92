"""Seconds per 60,000-image training epoch, fast pipeline vs the seed's, and tracking overhead.

In one process on one device, both pipelines train the `opt` variant on the same first
`--images` training examples (interleaved, `--repeats` times, the fastest kept: other jobs
only ever add time); the figure is scaled to 60,000 images. The torchvision pipeline is the
reference and trains as the seed did (eager, fp32); `--precision` and `--compile` apply to
the fast pipeline (default auto: bf16 and compiled on CUDA, fp32 and eager on the CPU).
Then one whole tracked run (`tracking.train`, SQLite store in a temporary folder) is timed
against the same training untracked (`fit` with no MLflow). On a shared machine pass
`--threads 1`: with torch's default threads, OpenMP waits on descheduled threads and times
grow 10-40x.

    python benchmarks/epoch_speed.py                      # CPU or CUDA (auto), ~3 min on 2 cores
    python benchmarks/epoch_speed.py --device cuda --images 60000 --repeats 3
    python benchmarks/epoch_speed.py --compile on --overhead-epochs 0    # compiled, on the CPU
    python benchmarks/epoch_speed.py --overhead-epochs 20 --overhead-images 0   # a full run
    python benchmarks/epoch_speed.py --dropout-cost 0.05 --images 19200 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import build_pipeline, epoch_seed, load_mnist
from mnist_mlflow.models import Dropout
from mnist_mlflow.runtime import resolve
from mnist_mlflow.training import SoloSeed, create_state, fit, train_one_epoch

EPOCH_IMAGES = 60_000
WARMUP_STEPS = 20
SEED_SETTINGS = {"precision": "fp32", "compile": "off"}  # how the reference trains


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader's workers)."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def seconds_per_epoch(config: TrainConfig, data_dir: str, images: int,
                      repeat: int) -> tuple[float, float]:
    """One pass over `images` examples with `config.pipeline`: (wall, CPU) seconds per 60k.

    CPU seconds are what the pass costs whatever else the machine runs; on a busy machine
    the wall figure mostly measures the others.
    """
    runtime = resolve(config)
    data = load_mnist(data_dir, images, config.test_limit)
    pipeline = build_pipeline(config, data, runtime)
    solo = SoloSeed(config, create_state(config, runtime, pipeline.steps_per_epoch))

    def one_pass(seed: int, steps: int | None = None) -> None:
        batches = itertools.islice(pipeline.train_batches(seed), steps)
        train_one_epoch(solo, batches)

    # Warm-up: oneDNN/cuDNN kernels, compilation, CUDA graph capture. `images` is a whole
    # number of batches, so the timed pass meets no new batch shape.
    one_pass(epoch_seed(config.seed, 0), WARMUP_STEPS)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    one_pass(epoch_seed(config.seed, repeat + 1))  # its .item() waits for the device
    scale = EPOCH_IMAGES / pipeline.num_train
    return (time.perf_counter() - start) * scale, (cpu_seconds() - cpu_start) * scale


def untracked_seconds(config: TrainConfig, data_dir: str) -> float:
    """Wall time of what tracking.train does, without MLflow: load, build, fit."""
    start = time.perf_counter()
    runtime = resolve(config)
    data = load_mnist(data_dir, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config, data, runtime)
    fit(config, create_state(config, runtime, pipeline.steps_per_epoch), pipeline,
        progress=False)
    return time.perf_counter() - start


def tracked_seconds(config: TrainConfig, data_dir: str) -> float:
    """Wall time of one whole tracked run (params, metrics, plots, log, model)."""
    from mnist_mlflow.tracking import Destination, Training, train

    start = time.perf_counter()
    train(Training((config,)), data_dir, Destination("epoch-speed"), progress=False)
    return time.perf_counter() - start


@contextlib.contextmanager
def torch_dropout_mask(enabled: bool) -> Iterator[None]:
    """Dropout layers draw nn.Dropout's own (Bernoulli) mask for the block: the baseline."""
    if not enabled:
        yield
        return
    fast = Dropout.forward
    Dropout.forward = nn.Dropout.forward
    try:
        yield
    finally:
        Dropout.forward = fast


def dropout_cost(args: argparse.Namespace) -> None:
    """Seconds per 60k-image epoch without dropout, with it, and with nn.Dropout's mask."""
    base = TrainConfig(device=args.device, batch_size=args.batch_size, threads=args.threads,
                       precision=args.precision, compile=args.compile, epochs=1).validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = max(1, args.images // args.batch_size) * args.batch_size
    p = args.dropout_cost
    legs = {"no dropout": (0.0, False), f"dropout {p:g}": (p, False),
            f"dropout {p:g}, nn.Dropout's mask": (p, True)}
    print(f"{resolve(base).describe()}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}; {images} images x {args.repeats} repeats, interleaved")
    times: dict[str, list[float]] = {name: [] for name in legs}
    for repeat in range(args.repeats):
        for name, (dropout, torch_mask) in legs.items():
            with torch_dropout_mask(torch_mask):
                config = dataclasses.replace(base, dropout=dropout)
                times[name].append(seconds_per_epoch(config, args.data_dir, images, repeat)[0])
    plain = min(times["no dropout"])
    for name, values in times.items():
        runs = ", ".join(f"{t:.2f}" for t in values)
        print(f"{name:<36} {min(values):7.2f} s per 60k-image epoch (runs: {runs}); "
              f"{min(values) / plain - 1:+.1%} against no dropout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=6400,
                        help="training images per timed pass (scaled to 60k)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per pipeline; the fastest is reported")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--overhead-epochs", type=int, default=2,
                        help="epochs of the tracked/untracked run (0 skips that part)")
    parser.add_argument("--overhead-images", type=int, default=12800,
                        help="training images of that run (0: all 60,000)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    parser.add_argument("--dropout-cost", type=float, default=0.0, metavar="P",
                        help="instead: the fast pipeline without dropout, with dropout P, and "
                             "with dropout P drawn by nn.Dropout's own mask, interleaved; "
                             "the cost of each")
    args = parser.parse_args()
    if args.dropout_cost:
        dropout_cost(args)
        return

    base = TrainConfig(device=args.device, batch_size=args.batch_size, dropout=args.dropout,
                       precision=args.precision, compile=args.compile, threads=args.threads,
                       epochs=1).validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = resolve(base)
    images = max(1, args.images // args.batch_size) * args.batch_size
    print(f"device {runtime.device} ({torch.get_num_threads()} threads, {os.cpu_count()} "
          f"cpus), torch {torch.__version__}, batch {args.batch_size}, dropout {args.dropout}, "
          f"fast: {runtime.describe()} ({runtime.compile_reason}; {runtime.precision_reason}) "
          f"(torchvision: fp32, eager); {images} images x {args.repeats} repeats")

    configs = {"torchvision": dataclasses.replace(base, pipeline="torchvision", **SEED_SETTINGS),
               "fast": dataclasses.replace(base, pipeline="fast")}
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu_times: dict[str, list[float]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, config in configs.items():
            wall, cpu = seconds_per_epoch(config, args.data_dir, images, repeat)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    best = {name: min(values) for name, values in times.items()}
    cpu = {name: min(values) for name, values in cpu_times.items()}
    for name in configs:
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<12} {best[name]:7.2f} s per 60k-image epoch (runs: {runs}); "
              f"CPU {cpu[name]:.2f} s")
    print(f"fast is {best['torchvision'] / best['fast']:.2f}x faster per epoch "
          f"(wall); {cpu['torchvision'] / cpu['fast']:.2f}x less CPU time")

    if args.overhead_epochs:
        config = dataclasses.replace(base, epochs=args.overhead_epochs,
                                     train_limit=args.overhead_images)
        with tempfile.TemporaryDirectory() as tmp:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
            mlflow.set_experiment("epoch-speed")  # a store exists before a real run starts
            os.environ.pop("MLFLOW_RUN_ID", None)
            plain = untracked_seconds(config, args.data_dir)
            tracked = tracked_seconds(config, args.data_dir)
        images = config.train_limit or EPOCH_IMAGES
        print(f"tracked run {tracked:.1f} s vs untracked {plain:.1f} s "
              f"({config.epochs} epochs x {images} images, fast): ratio {tracked / plain:.3f}, "
              f"overhead {tracked - plain:.1f} s")
        full = 20 * best["fast"]
        print(f"projected, not measured: that overhead on a 20-epoch 60k run of "
              f"~{full:.0f} s training gives a ratio of {(full + tracked - plain) / full:.3f}")


if __name__ == "__main__":
    main()
