"""Faults a user causes, measured on real processes: (1) interrupt short runs at random
moments, resume them, and count those that end identical to the same run left alone, and the
cost of one checkpoint; (2) four trainings started at once on a new SQLite store, repeated;
(3) SIGINT at evenly spread moments of one short run, from before its first epoch to after
its model is logged: each must end FINISHED, or KILLED and then resumed to FINISHED, and none
may stay RUNNING.

Each of `--runs` runs (seed 1, 2, ...) is a real `mnist-mlflow train` subprocess against a
SQLite store in a temporary folder. Once the run exists it gets SIGINT or SIGTERM (chosen at
random) after a random delay within its expected training time; `train --resume` then
finishes it. Its per-epoch metrics (all but epoch_seconds) are compared, to 1e-6, with its
twin: the same settings trained uninterrupted in this process. A signal that lands before
the first checkpoint leaves nothing to resume and is reported as such (the run is KILLED).
On a shared machine keep `--threads 1` (see epoch_speed.py).

    python benchmarks/faults.py                           # all three parts
    python benchmarks/faults.py --part resume --runs 10 --epochs 4 --random-seed 7
    python benchmarks/faults.py --part concurrent --repeats 10
    python benchmarks/faults.py --part signals --moments 20
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.data import build_pipeline, load_mnist
from mnist_mlflow.mlrun import MlflowRun
from mnist_mlflow.record import log_checkpoint, signals_deferred
from mnist_mlflow.runtime import resolve
from mnist_mlflow.training import EpochMetrics, create_state, fit

COMPARED = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
EXPERIMENT = "faults"


def twin_history(config: TrainConfig, data_dir: str) -> list[EpochMetrics]:
    """The run left alone: same settings, trained here without MLflow."""
    runtime = resolve(config)
    data = load_mnist(data_dir, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config, data, runtime)
    return fit(config, create_state(config, runtime, pipeline.steps_per_epoch), pipeline,
               progress=False)


def train_args(config: TrainConfig) -> list[str]:
    return ["--epochs", str(config.epochs), "--seed", str(config.seed),
            "--train-limit", str(config.train_limit), "--test-limit", str(config.test_limit),
            "--device", config.device, "--threads", str(config.threads)]


def cli(store: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mnist_mlflow", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_run(client: MlflowClient, process: subprocess.Popen[str], seed: int) -> str | None:
    """The id of the run the subprocess started for `seed`, once it exists (None: it exited)."""
    while process.poll() is None:
        found = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([found.experiment_id], f"params.seed = '{seed}'") if found else []
        if runs:
            return runs[0].info.run_id
        time.sleep(0.05)
    return None


def identical(client: MlflowClient, run_id: str, twin: list[EpochMetrics]) -> bool:
    """Every epoch logged once, each compared metric within 1e-6 of the twin's."""
    for name in COMPARED:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        if [step for step, _ in history] != [m.epoch for m in twin]:
            return False
        if any(abs(value - getattr(m, name)) > 1e-6 for (_, value), m in zip(history, twin,
                                                                             strict=True)):
            return False
    return client.get_run(run_id).info.status == "FINISHED"


def checkpoint_seconds(config: TrainConfig, store: str, repeats: int) -> tuple[float, int]:
    """Median seconds to save and log one checkpoint (as every epoch does), and its bytes."""
    mlflow.set_tracking_uri(store)
    state = create_state(config, resolve(config), steps_per_epoch=1)
    values = {"train_loss": 0.1, "train_acc": 99.0, "test_loss": 0.1, "test_acc": 99.0,
              "lr": 0.01, "epoch_seconds": 1.0}
    history = [EpochMetrics(e, values) for e in range(1, 21)]
    times = []
    run = MlflowRun.create("checkpoint-cost", "checkpoint-cost")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            with signals_deferred():
                log_checkpoint(run, state, history, Path(tmp))
            times.append(time.perf_counter() - start)
        size = max(a.file_size for a in run.client.list_artifacts(run.run_id, "checkpoints"))
    run.end(RunStatus.FINISHED)
    return sorted(times)[len(times) // 2], size


def resume_part(args: argparse.Namespace) -> None:
    moments = random.Random(args.random_seed)
    identical_count = resumed = early = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(store)
        for seed in range(1, args.runs + 1):
            config = TrainConfig(epochs=args.epochs, seed=seed, train_limit=args.train_limit,
                                 test_limit=args.test_limit, device="cpu", threads=args.threads)
            twin = twin_history(config, args.data_dir)
            training_seconds = sum(m.epoch_seconds for m in twin)
            signum = moments.choice([signal.SIGINT, signal.SIGTERM])
            delay = moments.uniform(0, training_seconds)
            process = cli(store, "train", *train_args(config), "--data-dir", args.data_dir,
                          "--experiment", EXPERIMENT)
            run_id = wait_for_run(client, process, seed)
            time.sleep(delay)
            process.send_signal(signum)
            process.communicate()
            epochs_logged = len(client.get_metric_history(run_id, "test_acc"))
            has_checkpoint = bool(client.list_artifacts(run_id, "checkpoints"))
            if process.returncode == 0:
                outcome = "finished before the signal"
            elif not has_checkpoint:
                early += 1
                print(f"seed {seed}: {signal.Signals(signum).name} after {delay:.1f}s, before "
                      "the first checkpoint: nothing to resume", flush=True)
                continue
            else:
                resume = cli(store, "train", "--resume", run_id, "--threads",
                             str(args.threads), "--data-dir", args.data_dir)
                _, err = resume.communicate()
                if resume.returncode != 0:
                    raise SystemExit(f"resume of {run_id} failed: {err.strip()[-500:]}")
                resumed += 1
                outcome = (f"{signal.Signals(signum).name} after {delay:.1f}s, in epoch "
                           f"{epochs_logged + 1} (exit {process.returncode}), resumed")
            same = identical(client, run_id, twin)
            identical_count += same
            print(f"seed {seed}: {outcome}; identical to its twin: {same}", flush=True)
        cost, size = checkpoint_seconds(TrainConfig(device="cpu"), store, repeats=20)
    interrupted = args.runs - early
    print(f"\n{identical_count} of {interrupted} interrupted-and-resumed runs ended identical "
          f"to their uninterrupted twins ({resumed} resumed, {early} stopped before any "
          f"checkpoint).")
    epoch_seconds = sum(m.epoch_seconds for m in twin) / len(twin)
    print(f"Checkpoint cost per epoch: {cost * 1000:.1f} ms ({size / 1024:.0f} KiB, saved and "
          f"logged to a local SQLite/file store); the tiny epochs here took {epoch_seconds:.2f} s.")


def concurrent_part(args: argparse.Namespace) -> None:
    """Four `train` processes started together on a new store, `--repeats` times."""
    good = 0
    for repeat in range(1, args.repeats + 1):
        with tempfile.TemporaryDirectory() as tmp:
            store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            tiny = ["--epochs", "1", "--train-limit", "512", "--test-limit", "256",
                    "--device", "cpu", "--threads", "1", "--data-dir", args.data_dir,
                    "--experiment", EXPERIMENT]
            processes = [cli(store, "train", *tiny, "--seed", str(seed)) for seed in range(1, 5)]
            errors = [p.communicate()[1] for p in processes]
            codes = [p.returncode for p in processes]
            try:
                client = MlflowClient(store)
                found = client.get_experiment_by_name(EXPERIMENT)
                statuses = sorted(r.info.status for r in client.search_runs(
                    [found.experiment_id])) if found else []
                usable = client.create_experiment("usable-after") is not None
            except Exception as err:  # the store itself broke: what this part looks for
                statuses, usable = [f"store broken: {err}"], False
            ok = codes == [0] * 4 and statuses == ["FINISHED"] * 4 and usable
            good += ok
            tracebacks = sum("Traceback" in e for e in errors)
            print(f"repeat {repeat}: exit codes {codes}, runs {statuses}, store usable "
                  f"{usable}, tracebacks {tracebacks}: {'ok' if ok else 'LOST WORK'}",
                  flush=True)
    print(f"\n{good} of {args.repeats}: all 4 runs FINISHED and the store usable.")


def signals_part(args: argparse.Namespace) -> None:
    """SIGINT at `--moments` moments spread over one short run's whole life."""
    tiny = ["--epochs", "2", "--train-limit", "2048", "--test-limit", "256", "--device",
            "cpu", "--threads", "1", "--data-dir", args.data_dir, "--experiment", EXPERIMENT]
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(store)
        start = time.perf_counter()
        whole = cli(store, "train", *tiny, "--seed", "1000")
        whole.communicate()
        life = time.perf_counter() - start  # process start to exit, model logged
        outcomes: dict[str, int] = {}
        for index in range(args.moments):
            seed = 2000 + index
            moment = life * index / (args.moments - 1) if args.moments > 1 else 0.0
            process = cli(store, "train", *tiny, "--seed", str(seed))
            time.sleep(moment)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate()
            found = client.get_experiment_by_name(EXPERIMENT)
            runs = client.search_runs([found.experiment_id], f"params.seed = '{seed}'")
            if not runs:
                outcome = "no run yet"
            else:
                run = runs[0]
                outcome = run.info.status
                if outcome == "KILLED":
                    resume = cli(store, "train", "--resume", run.info.run_id, "--threads", "1",
                                 "--data-dir", args.data_dir)
                    resume.communicate()
                    final = client.get_run(run.info.run_id).info.status
                    outcome = f"KILLED, resumed to {final}"
            if "Traceback" in err or "Exception ignored" in err:
                outcome += " (traceback printed)"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            last = err.strip().splitlines()[-1][:110] if err.strip() else ""
            print(f"SIGINT at {moment:5.1f} s of {life:.1f} s: {outcome} (exit "
                  f"{process.returncode}); {last}", flush=True)
    good = sum(n for o, n in outcomes.items() if o in (
        "FINISHED", "KILLED, resumed to FINISHED", "no run yet"))
    print(f"\n{good} of {args.moments} moments ended FINISHED, KILLED-and-resumed to FINISHED, "
          f"or before any run existed; {dict(sorted(outcomes.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["resume", "concurrent", "signals", "all"],
                        default="all")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=4096)
    parser.add_argument("--test-limit", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-seed", type=int, default=0, help="Seeds the moments chosen.")
    parser.add_argument("--repeats", type=int, default=10, help="concurrent: repetitions")
    parser.add_argument("--moments", type=int, default=20, help="signals: moments")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    args = parser.parse_args()
    parts = {"resume": resume_part, "concurrent": concurrent_part, "signals": signals_part}
    for name, part in parts.items():
        if args.part in (name, "all"):
            print(f"== {name}", flush=True)
            part(args)


if __name__ == "__main__":
    main()
