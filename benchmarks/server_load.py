"""Load on the team's tracking server: K concurrent writers, then `compare` over 10,000 runs.

    python benchmarks/server_load.py --postgres postgresql://USER:PASSWORD@127.0.0.1/postgres \
        [--writers 4,8,16] [--seconds 20] [--runs 10000]

Starts the Team setup server (docs/team-setup.md) (PostgreSQL backend store in a new database,
proxied artifacts, basic-auth with its credential cache on, MLflow's default workers) on a
free port of 127.0.0.1. For each K, K writer processes log what a training epoch logs (one
batch of the 8 per-epoch metrics, then the heartbeat tag) as fast as the server takes it
for `--seconds`: epochs and metrics per second, latency per epoch (two requests), errors
(expected: none), and a read-back that every step of every writer is in the store. It fills
an experiment with `--runs` finished runs of 20 epochs (as `benchmarks/compare_runs.py`
makes them) and times `mnist-mlflow compare --no-register` on it through the server, a new
process as a user runs it. Then the writers again on the same database with MLflow's
default basic-auth (no credential cache) and with no auth, to show what checking
credentials costs. The role in `--postgres` must be allowed to create databases; the
database made is left for inspection (its name printed).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
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
from common import free_port, team_auth_config, team_server_env  # noqa: E402
from compare_runs import EXPERIMENT, create_runs  # noqa: E402

from mnist_mlflow.mlrun import lease_tags  # noqa: E402
from mnist_mlflow.schema import EPOCH_METRICS, LEASE_TAG  # noqa: E402

ADMIN_PASSWORD = "benchmark-admin-password"
RUN_CHUNKS = 8  # processes filling the 10,000-run experiment


def new_database(postgres: str) -> str:
    """A new, empty database on the PostgreSQL of `postgres`; its URI."""
    database = f"mnist_mlflow_load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    return postgres.rsplit("/", 1)[0] + f"/{database}"


# How the server checks credentials: the Team setup's (basic-auth with its credential
# cache on), MLflow's default basic-auth (every request hashes the password: scrypt, about
# 100 ms of CPU here), and no auth at all.
AUTH_MODES = {"basic-auth, cache 60 s": 60, "basic-auth, no cache": 0, "no auth": None}


def auth_config(folder: Path, cache_seconds: int) -> Path:
    """The Team setup's basic_auth.ini, its users kept beside it in SQLite."""
    path = folder / f"basic_auth_{cache_seconds}.ini"
    path.write_text(team_auth_config(f"sqlite:///{folder / 'basic_auth.db'}", cache_seconds))
    return path


def start_server(store: str, folder: Path,
                 cache_seconds: int | None) -> tuple[subprocess.Popen[bytes], str]:
    """The Team setup server on `store` (basic-auth unless `cache_seconds` is None); its
    process and URI."""
    port = free_port()
    env = {**os.environ, **team_server_env(), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    auth = cache_seconds is not None
    if auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(folder, cache_seconds))
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port)]
        + (["--app-name", "basic-auth"] if auth else []),
        env=env, cwd=folder, stdout=(folder / "server.log").open("a"),
        stderr=subprocess.STDOUT, start_new_session=True)  # its workers go with it
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited:\n{(folder / 'server.log').read_text()[-3000:]}")
        try:
            requests.get(f"{uri}/health", timeout=2)
            return server, uri
        except requests.ConnectionError:
            time.sleep(0.5)
    sys.exit("mlflow server did not answer in 180 s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


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
            client.log_batch(run_id, tags=[RunTag(LEASE_TAG, lease_tags()[LEASE_TAG])])
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
        for name in list(EPOCH_METRICS)[:2]:
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


def fill(store: str, experiment_id: str, count: int) -> None:
    """`count` finished runs, written by RUN_CHUNKS processes straight into the server's
    database: through the server they would take an hour (3 requests a run), and how the
    runs got there does not change what `compare` reads."""
    context = multiprocessing.get_context("spawn")
    chunk = -(-count // RUN_CHUNKS)
    processes = [context.Process(target=fill_chunk,
                                 args=(store, experiment_id, first, min(chunk, count - first)))
                 for first in range(0, count, chunk)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            sys.exit("creating the runs failed")


def fill_chunk(store: str, experiment_id: str, first: int, count: int) -> None:
    create_runs(MlflowClient(store), experiment_id, count, epochs=20, first=first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True,
                        help="a PostgreSQL URI whose role may create databases")
    parser.add_argument("--writers", default="4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()

    store = new_database(args.postgres)
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin",
                       "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD})
    print(f"database {store.rsplit('/', 1)[1]}; {os.cpu_count()} CPUs here, shared by the "
          "server, PostgreSQL and the writers")
    with tempfile.TemporaryDirectory() as tmp:
        for mode, cache_seconds in AUTH_MODES.items():
            server, uri = start_server(store, Path(tmp), cache_seconds)
            os.environ["MLFLOW_TRACKING_URI"] = uri
            try:
                client = MlflowClient()
                for writers in (int(k) for k in args.writers.split(",")):
                    experiment_id = client.create_experiment(f"load-{writers}-{cache_seconds}")
                    r = load(experiment_id, writers, args.seconds)
                    print(f"{mode:>22} K={writers:>2}: "
                          f"{r['epochs_per_s']:5.1f} epochs/s {r['metrics_per_s']:5.0f} "
                          f"metrics/s, latency per epoch p50 {r['p50_ms']:.0f} ms p95 "
                          f"{r['p95_ms']:.0f} ms, errors {r['errors']}, missing steps "
                          f"{r['missing_steps']} {r['first_error']}", flush=True)
                if cache_seconds:
                    began = time.perf_counter()
                    fill(store, client.create_experiment(EXPERIMENT), args.runs)
                    print(f"created {args.runs} runs x 20 epochs in "
                          f"{time.perf_counter() - began:.0f} s (straight into the database)")
                    began = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "mnist_mlflow", "compare",
                                           "--experiment", EXPERIMENT, "--no-register"],
                                          capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"compare failed:\n{done.stderr[-2000:]}")
                    print(f"mnist-mlflow compare --no-register over {args.runs} runs through "
                          f"the server ({mode}; a new process): "
                          f"{time.perf_counter() - began:.1f} s", flush=True)
            finally:
                stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
