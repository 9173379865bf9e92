"""Per-seed epoch time with stacked seeds (`sweep --stack-seeds`): 1, 10 and 50 seeds in one
pass, against one seed trained alone as `train` trains it (on CUDA: compiled, CUDA graphs).

A 6,000-parameter net leaves a GPU mostly idle with one seed per pass; stacking S seeds
(torch.func, vmap) fills it, so that the time per seed falls as S grows. In one process,
each setting trains one pass over the first `--images` training examples (after a warm-up
pass of `--warmup` steps), timed to the device's end and scaled to a 60,000-image epoch;
the fastest of `--repeats` is kept. Evaluation is left out: it is the same per seed.

    python benchmarks/gpu.py                          # CUDA when present, else the CPU
    python benchmarks/gpu.py --device cpu --images 3200 --stacks 1,4 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import EPOCH_IMAGES  # noqa: E402

from mnist_mlflow.config import TrainConfig  # noqa: E402
from mnist_mlflow.data import build_pipeline, epoch_seed, load_mnist  # noqa: E402
from mnist_mlflow.runtime import resolve, torch_threads  # noqa: E402
from mnist_mlflow.stacked import StackedSeeds  # noqa: E402
from mnist_mlflow.training import SoloSeed, create_state, train_one_epoch  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solo_seconds(config: TrainConfig, pipeline, runtime, warmup: int) -> float:  # noqa: ANN001
    """One seed alone, as `train` trains it: seconds per 60k-image epoch."""
    solo = SoloSeed(config, create_state(config, runtime, pipeline.steps_per_epoch))
    batches = itertools.islice(pipeline.train_batches(epoch_seed(config.seed, 0)), warmup)
    train_one_epoch(solo, batches)
    synchronize(runtime.device)
    start = time.perf_counter()
    train_one_epoch(solo, pipeline.train_batches(epoch_seed(config.seed, 1)))
    synchronize(runtime.device)
    return (time.perf_counter() - start) * EPOCH_IMAGES / pipeline.num_train


def stacked_seconds(config: TrainConfig, pipeline, runtime, seeds: int) -> float:  # noqa: ANN001
    """`seeds` seeds stacked: seconds per seed per 60k-image epoch."""
    configs = [dataclasses.replace(config, seed=seed) for seed in range(1, seeds + 1)]
    stack = StackedSeeds(configs, dataclasses.replace(runtime, compile=False),
                         pipeline.steps_per_epoch)
    train_one_epoch(stack, stack.batches(pipeline, 0))  # warm-up: kernels, allocator
    synchronize(runtime.device)
    start = time.perf_counter()
    train_one_epoch(stack, stack.batches(pipeline, 1))
    synchronize(runtime.device)
    return (time.perf_counter() - start) * EPOCH_IMAGES / pipeline.num_train / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--stacks", default="1,10,50")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--model", default="opt")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    args = parser.parse_args()
    config = TrainConfig(device=args.device, model=args.model, dropout=args.dropout,
                         train_limit=args.images, val_size=0, epochs=1).validate()
    runtime = resolve(config)
    data = load_mnist(args.data_dir, config.train_limit, 0, 0)
    pipeline = build_pipeline(config, data, runtime)
    name = (torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
            else f"CPU, {runtime.threads or torch.get_num_threads()} threads")
    print(f"{name}; torch {torch.__version__}; {args.model} dropout {args.dropout}, batch "
          f"{config.batch_size}, {pipeline.num_train} images per timed pass, scaled to 60k")
    with torch_threads(runtime.threads):
        alone = min(solo_seconds(config, pipeline, runtime, args.warmup)
                    for _ in range(args.repeats))
        print(f"alone ({runtime.describe()}): {alone:8.2f} s per epoch")
        for seeds in (int(s) for s in args.stacks.split(",")):
            per_seed = min(stacked_seconds(config, pipeline, runtime, seeds)
                           for _ in range(args.repeats))
            print(f"{seeds:>3} stacked (eager, vmap): {per_seed:8.2f} s per seed per epoch, "
                  f"{alone / per_seed:5.2f}x alone", flush=True)


if __name__ == "__main__":
    main()
