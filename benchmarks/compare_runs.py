"""Time `compare` over many synthetic FINISHED runs in one SQLite store (target: < 5 s for 1,000).

    python benchmarks/compare_runs.py [--runs 1000] [--epochs 20] [--store DIR]

Each run carries what a training run logs (params, per-epoch metrics, summary metrics,
tags), written with one `log_batch` per run. Creating them is not timed; then it times
`compare()` in this process (imports done) and `mnist-mlflow compare --no-register` as a
user runs it (a fresh process, imports included).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

EXPERIMENT = "benchmark"


SEEDS = 5


def create_runs(client: MlflowClient, experiment_id: str, count: int, epochs: int,
                first: int = 0) -> None:
    """`count` finished runs with plausible, varied values (some over the parameter limit):
    count / 5 configurations, each over 5 seeds, as a search over recipes would leave them.
    Runs `first` to `first + count - 1` of such a search, so that processes can share one."""
    rng = random.Random(first)
    start = int(time.time() * 1000) - (first + count) * 60_000
    for index in range(first, first + count):
        config = index // SEEDS
        config_rng = random.Random(config)  # the same for each seed of a configuration
        dropout = config_rng.choice([0.0, 0.05, 0.1])
        lr = round(config_rng.uniform(0.005, 0.1), 4)
        num_params = config_rng.randrange(4_000, 12_000)
        run = client.create_run(experiment_id, start_time=start + index * 60_000,
                                run_name=f"synthetic-{config}-dropout{dropout:g}-seed{index}")
        params = {"model": "opt", "dropout": dropout, "epochs": epochs, "lr": lr,
                  "batch_size": 64, "momentum": 0.9, "seed": index % SEEDS, "val_size": 5000,
                  "num_params": num_params}
        timestamp = start + index * 60_000
        metrics, train_acc, test_acc = [], 0.0, 0.0
        best = (0.0, 0)
        for epoch in range(1, epochs + 1):
            train_acc = 99.6 - 8 / epoch + rng.uniform(-0.1, 0.1)
            test_acc = 99.4 - 7 / epoch + rng.uniform(-0.15, 0.15)
            best = max(best, (test_acc, -epoch))
            val_acc = 99.3 - 7 / epoch + rng.uniform(-0.15, 0.15)
            values = {"train_loss": 0.3 / epoch, "train_acc": train_acc, "test_loss": 0.25 / epoch,
                      "test_acc": test_acc, "val_acc": val_acc, "lr": lr, "epoch_seconds": 10.0}
            metrics += [Metric(k, v, timestamp + epoch, epoch) for k, v in values.items()]
        summary = {"best_test_acc": best[0], "best_epoch": -best[1],
                   "final_gap": train_acc - test_acc, "final_test_acc": test_acc,
                   "final_val_acc": val_acc}
        metrics += [Metric(k, v, timestamp + epochs, epochs) for k, v in summary.items()]
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("variant", "opt")])
        client.set_terminated(run.info.run_id, "FINISHED", end_time=timestamp + epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--store", type=Path, default=None,
                        help="Folder for mlflow.db (default: a temporary folder).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.store or Path(tmp)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.chdir(folder)  # artifacts (the comparison report) go next to the store
        client = MlflowClient(uri)
        if client.get_experiment_by_name(EXPERIMENT) is None:
            began = time.perf_counter()
            create_runs(client, client.create_experiment(EXPERIMENT), args.runs, args.epochs)
            print(f"created {args.runs} runs x {args.epochs} epochs in "
                  f"{time.perf_counter() - began:.1f} s")

        from mnist_mlflow.comparison import compare  # not timed: imports

        began = time.perf_counter()
        result = compare(EXPERIMENT)
        in_process = time.perf_counter() - began
        print(f"compare() over {len(result.ranked)} runs in {len(result.groups)} groups: "
              f"{in_process:.2f} s "
              f"(chose {result.chosen.name}, {result.rule.metric} "
              f"{result.chosen.metrics[result.rule.metric]:.2f})")

        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mnist_mlflow", "compare", "--experiment",
                               EXPERIMENT, "--no-register"], capture_output=True, text=True)
        end_to_end = time.perf_counter() - began
        if done.returncode != 0:
            sys.exit(f"mnist-mlflow compare failed:\n{done.stderr[-2000:]}")
        print(f"mnist-mlflow compare --no-register (new process, imports included): "
              f"{end_to_end:.2f} s")
        print(f"target < 5 s for compare(): {'met' if in_process < 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
