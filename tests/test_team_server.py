"""A shared `mlflow server` on PostgreSQL with basic-auth, as docs/team-setup.md runs it:
credentials from the environment, permissions that read well, many writers at once, and a
server restart while a run trains.

Needs a PostgreSQL role that may create databases, named by MNIST_TEST_POSTGRES_URI
(`.ci/run` starts the cluster and sets it); skipped without one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from benchmarks.common import free_port, team_auth_config, team_server_env
from mnist_mlflow.comparison import compare
from mnist_mlflow.mlrun import lease_of
from tests.helpers import run_cli
from tests.test_interrupt import wait_for_epoch

POSTGRES = os.environ.get("MNIST_TEST_POSTGRES_URI", "")
pytestmark = pytest.mark.skipif(not POSTGRES, reason="MNIST_TEST_POSTGRES_URI is not set")
ADMIN_PASSWORD = "admin-password-1234"
READER, READER_PASSWORD = "reader", "reader-password-1234"
START_LIMIT_S = 120
# MLflow's retries made short (two tries, 2 s apart) instead of its four minutes, one thread.
SHORT_RETRIES = {"OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
TINY = ["--epochs", "2", "--train-limit", "512", "--test-limit", "256", "--val-size", "256",
        "--device", "cpu", "--threads", "1"]


@dataclass
class Server:
    """A running `mlflow server`: its URI, the command that (re)starts it, its process."""

    uri: str
    command: list[str]
    env: dict[str, str]
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(self.command, env=self.env, cwd=self.folder,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{self.log()[-3000:]}")
            try:
                requests.get(f"{self.uri}/health", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server did not answer in {START_LIMIT_S} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return (self.folder / "server.log").read_text()


def fresh_database() -> str:
    """A new, empty database on the test PostgreSQL; its URI."""
    import psycopg

    name = f"mnist_mlflow_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return POSTGRES.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               fresh_database(), "--artifacts-destination", str(folder / "artifacts"),
               "--serve-artifacts", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    # As docs/team-setup.md: users and grants in PostgreSQL too, credentials cached.
    config = folder / "basic_auth.ini"
    config.write_text(team_auth_config(fresh_database()))
    env = {**os.environ, **team_server_env(), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_AUTH_CONFIG_PATH": str(config)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    running = Server(f"http://127.0.0.1:{port}", command, env, folder)
    running.start()
    yield running
    running.stop()


def as_user(monkeypatch: pytest.MonkeyPatch, server: Server, user: str | None,
            password: str | None) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for name, value in (("MLFLOW_TRACKING_USERNAME", user),
                        ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    import mlflow

    mlflow.set_tracking_uri(server.uri)


def train_at_once(mnist_root: Path, experiment: str, seeds: tuple[int, ...]) -> None:
    """One training process per seed, all at once, logging to the server."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "mnist_mlflow", "train", *TINY,
                                   "--seed", str(seed), "--data-dir", str(mnist_root),
                                   "--experiment", experiment], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for seed in seeds]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]


@pytest.fixture(scope="module")
def production(server: Server, mnist_root: Path) -> str:
    """As admin: four seeds trained at once, compared, registered as mnist-cnn; the reader
    may READ the model and the experiment. The experiment's id."""
    with pytest.MonkeyPatch.context() as patch:
        as_user(patch, server, "admin", ADMIN_PASSWORD)
        train_at_once(mnist_root, "team", (1, 2, 3, 4))
        compare("team", data_dir=mnist_root, register=True)  # here: no process to start
        from mlflow.server import get_app_client

        auth = get_app_client("basic-auth", tracking_uri=server.uri)
        auth.create_user(READER, READER_PASSWORD)
        experiment_id = MlflowClient().get_experiment_by_name("team").experiment_id
        auth.grant_user_permission(READER, "experiment", experiment_id, "READ")
        auth.grant_user_permission(READER, "registered_model", "mnist-cnn", "READ")
        return experiment_id


@pytest.mark.parametrize(("user", "password", "message"), [
    (None, None, "the server needs credentials: set MLFLOW_TRACKING_USERNAME and "
                 "MLFLOW_TRACKING_PASSWORD"),
    (READER, "wrong", "the server refused the credentials of user 'reader'"),
])
def test_without_valid_credentials_every_command_says_what_to_set(
        server: Server, production: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], user: str | None, password: str | None,
        message: str) -> None:
    as_user(monkeypatch, server, user, password)
    for args in (["models"], ["compare", "--experiment", "team"], ["runs"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code != 0 and err.count("\n") == 1, err
        assert message in err and server.uri in err


def test_a_reader_predicts_with_production_but_cannot_compare_or_promote(
        server: Server, production: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from PIL import Image

    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    client = MlflowClient()
    # A second version that the reader might try to promote.
    first = client.get_model_version("mnist-cnn", "1")
    import mlflow

    mlflow.register_model(first.source, "mnist-cnn")
    before = ({a: str(v) for a, v in client.get_registered_model("mnist-cnn").aliases.items()},
              len(client.search_model_versions("name = 'mnist-cnn'")))
    as_user(monkeypatch, server, READER, READER_PASSWORD)

    one = Image.new("L", (28, 28))
    one.paste(255, (13, 6, 15, 22))  # a "1": framing needs ink
    one.save(tmp_path / "one.png")
    code, out, err = run_cli(["predict", str(tmp_path / "one.png")], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'one.png'}: ")

    code, _, err = run_cli(["compare", "--experiment", "team"], capsys, monkeypatch)
    assert code != 0 and err.count("\n") == 1, err
    assert "permission denied: user 'reader' may not create runs in this experiment" in err
    code, _, err = run_cli(["promote", "--version", "2"], capsys, monkeypatch)
    assert code != 0 and err.count("\n") == 1, err
    assert "permission denied: user 'reader' may not move this model's aliases" in err

    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    after = ({a: str(v) for a, v in client.get_registered_model("mnist-cnn").aliases.items()},
             len(client.search_model_versions("name = 'mnist-cnn'")))
    assert after == before


def test_concurrent_trainings_lose_nothing(server: Server, production: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The four trainings of `production` ran at once: every param, step and artifact."""
    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    client = MlflowClient()
    runs = [r for r in client.search_runs([production])
            if r.data.tags.get("mnist_mlflow.role") == "train"]
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2", "3", "4"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["val_size"] == "256" and "num_params" in run.data.params
        for name in ("train_loss", "val_acc", "test_acc", "lr", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
        assert "final_val_acc" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"training.log", "model_summary.txt", "plots", "checkpoints"} <= artifacts


def train_through_epoch_1(mnist_root: Path, experiment: str, env: dict[str, str]
                          ) -> tuple[MlflowClient, subprocess.Popen[str], str]:
    """`train` of two 2-second epochs in a subprocess, once it has logged its first: the
    client, the process and its run."""
    trainer = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlflow", "train", "--epochs", "2", "--train-limit", "6144",
         "--test-limit", "256", "--val-size", "256", "--device", "cpu", "--threads", "1",
         "--data-dir", str(mnist_root), "--experiment", experiment], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient()
    return client, trainer, wait_for_epoch(client, trainer, experiment, 1)


def test_a_server_restart_while_training_loses_no_epoch(
        server: Server, production: str, mnist_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    client, trainer, run_id = train_through_epoch_1(mnist_root, "restart", env)
    server.stop()
    time.sleep(2)  # down about 10 s in all: starting again takes the rest
    server.start()
    _, err = trainer.communicate(timeout=600)
    run = client.get_run(run_id)
    assert "Traceback" not in err, err[-3000:]
    if trainer.returncode == 0:
        assert run.info.status == "FINISHED"
        for name in ("train_loss", "val_acc", "test_acc"):
            assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2]
    else:  # it could not go on: a clear reason, and a checkpoint to resume from
        assert run.info.status in ("FAILED", "KILLED"), run.info.status
        assert run.data.tags.get("failure_reason")
        assert "checkpoints" in {a.path for a in client.list_artifacts(run_id)}


def stderr_while_away(server: Server, process: subprocess.Popen[str]) -> str:
    """Stop the server until `process` has ended (it must, within 180 s), then start it
    again; what the process wrote on stderr."""
    server.stop()
    try:
        return process.communicate(timeout=180)[1]
    finally:
        server.start()


def test_a_server_away_longer_than_the_retries_is_one_line_and_the_run_resumes_after(
        server: Server, production: str, mnist_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    env = {**os.environ, **SHORT_RETRIES}
    client, trainer, run_id = train_through_epoch_1(mnist_root, "away", env)
    err = stderr_while_away(server, trainer)

    assert trainer.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "Retrying (" not in err, err[-3000:]
    assert err.count("does not answer") == 1, err[-3000:]
    assert f"tracking server {server.uri} does not answer (Connection refused); trying again " \
           "for up to about 2 s (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, " in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: the tracking server {server.uri} did not answer "
                           "(Connection refused) through MLflow's retries"), last
    assert last.endswith(f"run {run_id} could not be marked KILLED and shows RUNNING until "
                         "resumed, its checkpoints up to epoch 1 of 2 kept; once the server "
                         f"is back, resume with: mnist-mlflow train --resume {run_id}"), last
    assert client.get_run(run_id).info.status == "RUNNING"

    # In this process: the server is back, MLflow's retries no longer matter.
    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    for name in ("train_loss", "val_acc", "test_acc"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2]


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_a_parallel_sweep_whose_server_stays_away_stops_in_one_line_and_can_resume(
        executor: str, server: Server, production: str, mnist_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Children side by side (worker processes, Ray tasks) when the server is gone for longer
    than MLflow's retries: the sweep stops them all and says so in one line, and leaves each
    child as `sweep --resume` goes on from. (That resume is run after a Ctrl-C in
    test_parallel_sweep and test_ray_sweep, and after a server away in the `train` test
    above: here it would only start the same processes once more.)"""
    if executor == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed")
    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    env = {**os.environ, **SHORT_RETRIES}
    experiment = f"away-{executor}"
    side_by_side = ["--workers", "2"] if executor == "process" else ["--executor", "ray"]
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlflow", "sweep", "--variant", "opt:0,opt:0.05",
         "--epochs", "2", "--train-limit", "6144", "--test-limit", "256", "--val-size", "256",
         "--device", "cpu", "--threads", "1", "--data-dir", str(mnist_root), "--experiment",
         experiment, *side_by_side], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    client = MlflowClient()
    # Logged by a worker process or Ray task: with the driver's credentials, which only the
    # driver was given (the server refuses a request without them).
    through_epoch_1 = wait_for_epoch(client, sweeper, experiment, 1)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent_id = next(r.info.run_id for r in runs if r.data.tags["mnist_mlflow.role"] == "sweep")
    err = stderr_while_away(server, sweeper)

    assert sweeper.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "Retrying (" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: the tracking server {server.uri} did not answer "), last
    assert last.endswith("once the server is back, resume with: mnist-mlflow sweep --resume "
                         f"{parent_id}"), last
    children = [r for r in client.search_runs([runs[0].info.experiment_id])
                if r.data.tags.get("mnist_mlflow.role") == "train"]
    assert len(children) == 2
    for child in children:
        assert child.data.tags["mlflow.user"] == "admin"
        # KILLED, or RUNNING under a lease whose process is gone (the server took no last
        # request): either is what `sweep --resume` trains on from its checkpoint.
        lease = lease_of(child)
        assert child.info.status == "KILLED" or (
            child.info.status == "RUNNING" and lease is not None and not lease.alive), (
            child.info.status, lease)
    assert "checkpoints/epoch-001.pt" in {
        a.path for a in client.list_artifacts(through_epoch_1, "checkpoints")}


def test_runs_logging_the_same_new_dataset_at_once_all_link_it(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's children start together and log the same new dataset: MLflow's store
    inserts it from each of them, and all but one insert hit the unique key."""
    import threading

    import mlflow.data
    import numpy as np

    from mnist_mlflow.mlrun import MlflowRun

    as_user(monkeypatch, server, "admin", ADMIN_PASSWORD)
    writers, rounds = 8, 12  # 3 rounds did not always collide without the retry; 20 did
    runs = [MlflowRun.create("dataset-race", f"writer-{i}") for i in range(writers)]
    failures: list[BaseException] = []
    for round_ in range(rounds):
        dataset = mlflow.data.from_numpy(np.arange(16) + round_, name=f"shared-{round_}")
        barrier = threading.Barrier(writers)

        def log(run: MlflowRun, barrier: threading.Barrier = barrier,
                dataset: object = dataset) -> None:
            barrier.wait()
            try:
                MlflowRun(run.run_id).log_inputs({"train": dataset})
            except BaseException as err:  # noqa: BLE001 - reported below
                failures.append(err)

        threads = [threading.Thread(target=log, args=(run,)) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[0]
    client = MlflowClient()
    for run in runs:
        names = {d.dataset.name for d in client.get_run(run.run_id).inputs.dataset_inputs}
        assert names == {f"shared-{r}" for r in range(rounds)}
