"""The same 4-child sweep with `--executor local` and `--executor ray --cpus-per-run 1`, on this
machine idle and beside one competing CPU-bound process; wall times and their ratios, measured
in one run of this script.

    python benchmarks/sweep_throughput.py [--epochs 3] [--train-limit 0] [--data-dir data]

Targets: idle, Ray's wall time at most 1.0x the local one's; beside a
busy process, at most 0.6x. Each sweep runs as a user runs it (`mnist-mlflow sweep` in a fresh
process) into its own SQLite store; per-child epoch times are read from the runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient


def burn(stop: multiprocessing.synchronize.Event) -> None:
    """One CPU-bound process: the competing job."""
    value = 0
    while not stop.is_set():
        for index in range(100_000):
            value = (value * 31 + index) % 1_000_003


def sweep(folder: Path, executor: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Wall seconds of one 4-child sweep, and each child's mean epoch seconds."""
    store = f"sqlite:///{folder / 'mlflow.db'}"
    command = [sys.executable, "-m", "mnist_mlflow", "sweep", "--variant", "opt:0,opt:0.05",
               "--seeds", "1,2", "--epochs", str(args.epochs), "--train-limit",
               str(args.train_limit), "--device", "cpu", "--data-dir", str(args.data_dir),
               "--experiment", "throughput", "--executor", executor]
    # Local: one child at a time with torch's default threads (both cores); Ray: one core each.
    command += ["--cpus-per-run", "1"] if executor == "ray" else []
    began = time.perf_counter()
    subprocess.run(command, env={**os.environ, "MLFLOW_TRACKING_URI": store}, cwd=folder,
                   check=True, capture_output=True)
    wall = time.perf_counter() - began
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("throughput")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("mnist_mlflow.role") == "train"]
    return wall, [r.data.metrics["mean_epoch_seconds"] for r in children]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=0, help="0: all of MNIST")
    parser.add_argument("--data-dir", type=Path, default=Path("data").resolve())
    args = parser.parse_args()
    args.data_dir = args.data_dir.resolve()
    results = {}
    for busy in (False, True):
        stop = multiprocessing.Event()
        competitor = multiprocessing.Process(target=burn, args=(stop,)) if busy else None
        if competitor:
            competitor.start()
        try:
            for executor in ("local", "ray"):
                with tempfile.TemporaryDirectory() as tmp:
                    wall, epochs = sweep(Path(tmp), executor, args)
                results[busy, executor] = wall
                print(f"{'busy' if busy else 'idle'} {executor:5}: {wall:7.1f} s wall; child "
                      f"epoch seconds {', '.join(f'{e:.1f}' for e in epochs)} (median "
                      f"{statistics.median(epochs):.1f})", flush=True)
        finally:
            if competitor:
                stop.set()
                competitor.join()
    for busy, target in ((False, 1.0), (True, 0.6)):
        ratio = results[busy, "ray"] / results[busy, "local"]
        print(f"{'beside a busy process' if busy else 'idle'}: ray / local = {ratio:.2f} "
              f"(target <= {target}): {'met' if ratio <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
