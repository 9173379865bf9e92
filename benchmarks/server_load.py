"""Load on the team's tracking server: K concurrent writers, then `compare` over 10,000 runs.

    python benchmarks/server_load.py --postgres postgresql://USER:PASSWORD@127.0.0.1/postgres \
        [--writers 4,8,16] [--seconds 20] [--runs 10000]

Starts the README's Team setup server (PostgreSQL backend store in a new database, proxied
artifacts, basic-auth, MLflow's default workers) on a free port of 127.0.0.1. Then, for each
K, K writer processes log what a training epoch logs (one batch of the 8 per-epoch metrics,
then the heartbeat tag) as fast as the server takes it for `--seconds`: epochs and metrics
per second, request latency, errors (expected: none), and a read-back that every step of
every writer is in the store. Last, it fills an experiment with `--runs` finished runs of
20 epochs (as `benchmarks/compare_runs.py` makes them) and times `mnist-mlflow compare
--no-register` on it, a new process as a user runs it. The role in `--postgres` must be
allowed to create databases; the database made is left for inspection (its name printed).
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
import uuid
from pathlib import Path

import psycopg
import requests
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port  # noqa: E402
from compare_runs import EXPERIMENT, create_runs  # noqa: E402

from mnist_mlflow.schema import HEARTBEAT_TAG  # noqa: E402

ADMIN_PASSWORD = "benchmark-admin-password"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                 "lr", "epoch_seconds")
RUN_CHUNKS = 8  # processes filling the 10,000-run experiment


def start_server(postgres: str, folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """The Team setup server on a fresh database; its process, URI and database name."""
    database = f"mnist_mlflow_load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    port = free_port()
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         postgres.rsplit("/", 1)[0] + f"/{database}", "--artifacts-destination",
         str(folder / "artifacts"), "--serve-artifacts", "--app-name", "basic-auth",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited:\n{(folder / 'server.log').read_text()[-3000:]}")
        try:
            requests.get(f"{uri}/health", timeout=2)
            return server, uri, database
        except requests.ConnectionError:
            time.sleep(0.5)
    sys.exit("mlflow server did not answer in 180 s")


def writer(experiment_id: str, seconds: float, start_at: float,
           results: multiprocessing.Queue) -> None:
    """One training run's logging, epoch after epoch, until `seconds` have passed."""
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    latencies, errors, step = [], [], 0
    while time.time() < start_at:
        time.sleep(0.01)
    deadline = start_at + seconds
    while time.time() < deadline:
        step += 1
        began = time.perf_counter()
        now = int(time.time() * 1000)
        try:
            client.log_batch(run_id, metrics=[Metric(k, step * 0.01, now, step)
                                              for k in EPOCH_METRICS])
            client.log_batch(run_id, tags=[RunTag(HEARTBEAT_TAG, str(now // 1000))])
        except Exception as err:  # noqa: BLE001 - counted and reported, not raised
            errors.append(f"{type(err).__name__}: {str(err)[:200]}")
            step -= 1
        latencies.append(time.perf_counter() - began)
    client.set_terminated(run_id)
    results.put((run_id, step, latencies, errors))


def load(experiment_id: str, writers: int, seconds: float) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 10  # every writer has imported MLflow and made its run
    processes = [context.Process(target=writer, args=(experiment_id, seconds, start_at, results))
                 for _ in range(writers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=seconds + 300) for _ in processes]
    for process in processes:
        process.join()
    client = MlflowClient()
    missing = 0
    for run_id, steps, _, _ in outcomes:
        for name in EPOCH_METRICS[:2]:
            logged = {m.step for m in client.get_metric_history(run_id, name)}
            missing += len(set(range(1, steps + 1)) - logged)
    epochs = sum(o[1] for o in outcomes)
    latencies = sorted(x for o in outcomes for x in o[2])
    errors = [e for o in outcomes for e in o[3]]
    return {"epochs_per_s": epochs / seconds,
            "metrics_per_s": epochs * len(EPOCH_METRICS) / seconds,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            "errors": len(errors), "missing_steps": missing,
            "first_error": errors[0] if errors else ""}


def fill(uri: str, experiment_id: str, count: int) -> None:
    """`count` finished runs, made by RUN_CHUNKS processes at once."""
    context = multiprocessing.get_context("spawn")
    chunk = -(-count // RUN_CHUNKS)
    processes = [context.Process(target=fill_chunk,
                                 args=(experiment_id, first, min(chunk, count - first)))
                 for first in range(0, count, chunk)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            sys.exit("creating the runs failed")


def fill_chunk(experiment_id: str, first: int, count: int) -> None:
    create_runs(MlflowClient(), experiment_id, count, epochs=20, first=first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True,
                        help="a PostgreSQL URI whose role may create databases")
    parser.add_argument("--writers", default="4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server, uri, database = start_server(args.postgres, Path(tmp))
        os.environ.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin",
                           "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD})
        try:
            print(f"server {uri}, database {database}; {os.cpu_count()} CPUs here, shared by "
                  "the server, PostgreSQL and the writers")
            client = MlflowClient()
            for writers in (int(k) for k in args.writers.split(",")):
                experiment_id = client.create_experiment(f"load-{writers}")
                r = load(experiment_id, writers, args.seconds)
                print(f"K={writers:>2}: {r['epochs_per_s']:7.1f} epochs/s "
                      f"{r['metrics_per_s']:7.0f} metrics/s, latency p50 {r['p50_ms']:.0f} ms "
                      f"p95 {r['p95_ms']:.0f} ms, errors {r['errors']}, "
                      f"missing steps {r['missing_steps']} {r['first_error']}")
            began = time.perf_counter()
            fill(uri, client.create_experiment(EXPERIMENT), args.runs)
            print(f"created {args.runs} runs x 20 epochs in {time.perf_counter() - began:.0f} s")
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "mnist_mlflow", "compare",
                                   "--experiment", EXPERIMENT, "--no-register"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"compare failed:\n{done.stderr[-2000:]}")
            print(f"mnist-mlflow compare --no-register over {args.runs} runs on the server "
                  f"(new process): {time.perf_counter() - began:.1f} s")
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
