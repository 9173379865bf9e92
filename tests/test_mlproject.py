"""`mlflow run . --env-manager local` end to end, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from mnist_mlflow.store import open_store
from tests.conftest import REPO

TINY = ["-P", "train_limit=256", "-P", "test_limit=128", "-P", "epochs=2"]


def mlflow_run(tracking_store: str, *args: str) -> subprocess.CompletedProcess[str]:
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # A user's shell: no run or experiment chosen by an earlier in-process test.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["MLFLOW_TRACKING_URI"] = tracking_store
    return subprocess.run([str(mlflow_cli), "run", str(REPO), "--env-manager", "local",
                           "--experiment-name", "projects", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def only_run(tracking_store: str):
    client = MlflowClient(tracking_store)
    experiment = client.get_experiment_by_name("projects")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_run_trains_and_logs_into_the_run_it_created(
    tracking_store: str, mnist_root: Path
) -> None:
    done = mlflow_run(tracking_store, *TINY, "-P", "dropout=0.05",
                      "-P", f"data_dir={mnist_root}")
    assert done.returncode == 0, done.stderr[-2000:]
    client, run = only_run(tracking_store)
    assert run.info.status == "FINISHED"
    assert run.data.params["dropout"] == "0.05" and run.data.params["num_params"] == "6132"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert run.info.run_name.startswith("s1 opt d0.05 ")
    assert run.data.tags["mnist_mlflow.code.source"] in ("git", "package")  # its code
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_acc"))
    assert steps == [1, 2]
    assert {"training.log", "model_summary.txt"} <= {
        f.path for f in client.list_artifacts(run.info.run_id)}


def test_bad_parameter_under_mlflow_run_fails_the_run_and_logs_nothing(
    tracking_store: str, mnist_root: Path
) -> None:
    done = mlflow_run(tracking_store, *TINY, "-P", "dropout=1.5", "-P", f"data_dir={mnist_root}")
    assert done.returncode != 0
    assert "Error: invalid dropout: must be in [0, 1), got 1.5" in done.stderr
    client, run = only_run(tracking_store)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {}
    assert "num_params" not in run.data.params
    assert client.list_artifacts(run.info.run_id) == []


def test_mlflow_run_sweep_entry_point_trains_a_phase(tracking_store: str,
                                                      mnist_root: Path) -> None:
    done = mlflow_run(tracking_store, "-e", "sweep", "-P", "phase=gap", "-P", "seeds=2",
                      *TINY, "-P", f"data_dir={mnist_root}")
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(tracking_store)
    experiment = client.get_experiment_by_name("projects")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["mnist_mlflow.phase"] == "gap"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # Named seed first, then what sets the configuration apart.
    assert sorted(r.info.run_name.split()[:2] for r in children) == [
        ["s2", "gap5k"], ["s2", "gap8k"]]
    for child in children:
        # The phase's recipe; the -P values that differ from the defaults on top of it.
        assert child.data.params["scheduler"] == "onecycle"
        assert child.data.params["epochs"] == "2"
        assert child.data.params["train_limit"] == "256"


def test_ctrl_c_under_mlflow_run_ends_the_run_with_the_resume_command(
        tracking_store: str, mnist_root: Path) -> None:
    """Ctrl-C in the terminal reaches the whole process group, the entry point too, and
    MLflow's runner then sends it SIGTERM as well: the second signal must not cut the ending
    short. The run ends KILLED and the message names `-P resume=` (the runner then
    overwrites the status with FAILED; the reason stays)."""
    import signal
    import time

    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env |= {"MLFLOW_TRACKING_URI": tracking_store, "OMP_NUM_THREADS": "1"}
    # Created now, not by the subprocess while this test's client polls it: two processes
    # creating one new SQLite store race in MLflow's migrations (`duplicate column name`),
    # and only mnist-mlflow's commands take the lock that orders them.
    open_store()
    runner = subprocess.Popen(
        [str(mlflow_cli), "run", str(REPO), "--env-manager", "local", "--experiment-name",
         "projects", "-P", "train_limit=6144", "-P", "test_limit=256", "-P", "epochs=4",
         "-P", "threads=1", "-P", f"data_dir={mnist_root}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = MlflowClient(tracking_store)
    deadline = time.monotonic() + 240
    run_id = None
    while run_id is None and time.monotonic() < deadline and runner.poll() is None:
        experiment = client.get_experiment_by_name("projects")
        for run in client.search_runs([experiment.experiment_id]) if experiment else []:
            if client.get_metric_history(run.info.run_id, "test_acc"):
                run_id = run.info.run_id
        time.sleep(0.1)
    if runner.poll() is not None:
        raise AssertionError(f"mlflow run ended before its first epoch was logged "
                             f"(exit {runner.returncode}): {runner.communicate()[1][-2000:]}")
    os.killpg(runner.pid, signal.SIGINT)  # as the terminal does
    _, err = runner.communicate(timeout=120)
    assert run_id is not None, err[-2000:]
    assert f"mlflow run . -e main -P resume={run_id}" in err
    assert "Traceback" not in err.split("Interrupted")[0][-2000:]
    run = client.get_run(run_id)
    assert run.info.status in ("KILLED", "FAILED")  # FAILED: MLflow's runner overwrites it
    reason = run.data.tags["failure_reason"]
    assert reason.startswith(("interrupted (SIGINT) after epoch",
                              "interrupted (SIGTERM) after epoch")), reason
