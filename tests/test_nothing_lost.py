"""Nothing lost under ordinary accidents and hostile input: concurrent first use of a store,
an unloadable model, a trainer killed hard, two trainers for one run, MNIST altered after
extraction, and user mistakes that must be one line. Real processes, a real SQLite store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow.mlrun import lease_of, lease_tags
from mnist_mlflow.registry import PRODUCTION
from mnist_mlflow.schema import LEASE_TAG, checkpoint_artifact
from tests.conftest import tiny_config, use_store
from tests.helpers import run_cli, runs_of, train_one
from tests.test_interrupt import mnist_mlflow, wait_for_epoch

TINY = ["--train-limit", "256", "--test-limit", "128", "--epochs", "1", "--device", "cpu",
        "--threads", "1"]
# Epochs of about 2 s, so that a process can be caught training.
SLOW = ["--train-limit", "6144", "--test-limit", "256", "--epochs", "3", "--device", "cpu",
        "--threads", "1"]


def slow_trainer(store: str, mnist_root: Path, experiment: str) -> subprocess.Popen[str]:
    """`mnist-mlflow train` in a subprocess, slow enough (epochs of ~2 s) to catch training."""
    return mnist_mlflow(store, "train", *SLOW, "--data-dir", str(mnist_root),
                        "--experiment", experiment)


def all_runs() -> list[mlflow.entities.Run]:
    return MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])


def test_mlflow_server_creating_a_new_store_while_a_command_opens_it_both_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two processes migrating one new SQLite file fail ("table ... already exists"), which
    # crashed `mlflow ui` started beside a first sweep, or the sweep.
    import requests

    from benchmarks.common import free_port

    database = tmp_path / "mlflow.db"
    store = f"sqlite:///{database}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not database.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the server has begun creating the store: open it now
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        code, out, err = run_cli(["runs"], capsys, monkeypatch)
        assert code == 0, err
        answer = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/"
                                      "search?max_results=1", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert server.poll() is None, server.communicate()[0][-3000:]
        assert answer is not None and answer.status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_four_trainings_started_at_once_on_a_new_store_all_finish(
        tmp_path: Path, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "mnist_mlflow", "train", *TINY, "--seed", str(seed),
         "--data-dir", str(mnist_root)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for seed in range(1, 5)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
        assert "Traceback" not in err
    client = MlflowClient(store)
    [experiment] = [e for e in client.search_experiments() if e.name == "mnist-optimization"]
    finished = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in finished) == ["FINISHED"] * 4
    # The store is usable afterwards (by this process).
    use_store(tmp_path, monkeypatch)
    code, _, err = run_cli(["compare", "--no-register"], capsys, monkeypatch)
    assert code == 0, err[-2000:]


def test_compare_never_points_production_at_a_model_that_does_not_load(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = train_one(tiny_config(epochs=1), mnist_root, "unloadable", progress=False)
    code, _, err = run_cli(["compare", "--experiment", "unloadable", "--model-name",
                            "guarded-cnn"], capsys, monkeypatch)
    assert code == 0, err
    second = train_one(tiny_config(epochs=3, lr=0.05), mnist_root, "unloadable",
                           progress=False)
    # The better run's model files are gone (deleted by hand, a lost disk...).
    [model] = mlflow.search_logged_models(
        [MlflowClient().get_run(second.run_id).info.experiment_id],
        f"source_run_id = '{second.run_id}'", output_format="list")
    shutil.rmtree(model.artifact_location.removeprefix("file://"))

    client = MlflowClient()
    experiment_id = client.get_run(second.run_id).info.experiment_id
    for _ in range(2):  # and again: a broken run blocks no later compare
        code, out, err = run_cli(["compare", "--experiment", "unloadable", "--model-name",
                                  "guarded-cnn", "--force", "--filter",
                                  f"attributes.run_id = '{second.run_id}'"], capsys,
                                 monkeypatch)

        assert code == 0, err
        # The run named, what is wrong with it, and what to do.
        name = client.get_run(second.run_id).info.run_name
        assert (f"run {name} ({second.run_id}) cannot be registered: its model files are "
                f"gone (models:/{model.model_id})" in out), out
        assert "leave it out with `mnist-mlflow doctor --repair`" in out
        assert ("Not registered: no run of opt e3 lr0.05 val256 n512 t256, seed 1 has a model "
                "that can be registered (see the notes above). Production stays as it was."
                in out), out
        production = client.get_model_version_by_alias("guarded-cnn", PRODUCTION)
        assert production.run_id == first.run_id
        versions = client.search_model_versions("name = 'guarded-cnn'")
        assert [str(v.version) for v in versions] == ["1"]
    comparisons = [r for r in client.search_runs([experiment_id])
                   if r.data.tags.get("mnist_mlflow.role") == "comparison"]
    assert sorted(r.info.status for r in comparisons) == ["FINISHED"] * 3


def test_a_run_being_trained_cannot_be_resumed_and_a_killed_trainer_is_found_stale(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    trainer = slow_trainer(tracking_store, mnist_root, "leases")
    try:
        run_id = wait_for_epoch(client, trainer, "leases", 1)
        assert lease_of(client.get_run(run_id)).pid == trainer.pid
        code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                               capsys, monkeypatch)
        assert code == 2 and f"run {run_id} is being trained right now (pid {trainer.pid}" in err
        assert err.count("\n") == 1
    finally:
        trainer.kill()  # kill -9: no handler runs, the run stays RUNNING
        trainer.communicate()
    assert client.get_run(run_id).info.status == "RUNNING"

    code, out, _ = run_cli(["runs", "--stale"], capsys, monkeypatch)
    assert code == 0 and run_id in out and "gone: stale" in out
    # The experiment by the name a user knows it by, not its id.
    [row] = [line for line in out.splitlines() if run_id in line]
    assert "| leases " in row
    code, out, _ = run_cli(["runs", "--stale", "--mark-killed"], capsys, monkeypatch)
    assert code == 0 and f"run {run_id} marked KILLED" in out
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and "process gone" in killed.data.tags[
        "failure_reason"]

    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)
    assert code == 0, err
    steps = [m.step for m in client.get_metric_history(run_id, "test_acc")]
    assert sorted(steps) == [1, 2, 3]  # no epoch twice, none missing
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_trainer_killed_before_its_first_checkpoint_starts_over_in_the_same_run(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    trainer = slow_trainer(tracking_store, mnist_root, "early-kill")
    deadline = time.monotonic() + 120
    run_id = None
    while run_id is None and time.monotonic() < deadline:
        for run in runs_of("early-kill"):  # created, with its lease and its params
            if LEASE_TAG in run.data.tags and "num_params" in run.data.params:
                run_id = run.info.run_id
        time.sleep(0.05)
    trainer.send_signal(signal.SIGKILL)
    trainer.communicate()
    assert run_id is not None
    assert client.list_artifacts(run_id, "checkpoints") == []
    run_cli(["runs", "--stale", "--mark-killed"], capsys, monkeypatch)

    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)

    assert code == 0, err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_acc")) == [1, 2, 3]


@pytest.mark.parametrize(("name", "damage", "said"), [
    ("train-images-idx3-ubyte", "middle", "fails its checksum"),
    ("train-labels-idx1-ubyte", "middle", "fails its checksum"),
    # The header: torchvision would assert on it (a 43-line traceback) if it read it first.
    ("train-images-idx3-ubyte", "header", "fails its checksum"),
    # Cut to 1 MB: torchvision took it for missing ("put the four .gz files there").
    ("t10k-images-idx3-ubyte", "cut", "is 1048576 bytes, expected 7840016"),
])
def test_mnist_altered_after_extraction_is_named_before_any_run(
        tracking_store: str, mnist_root: Path, tmp_path: Path, name: str, damage: str,
        said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(mnist_root / "MNIST", root / "MNIST")
    path = root / "MNIST" / "raw" / name
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[:1 << 20]
    else:
        data[3 if damage == "header" else len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = run_cli(["train", *TINY, "--data-dir", str(root)], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert f"MNIST file {path} {said}" in err and "delete it, and it is extracted again" in err
    assert all_runs() == []


def test_mnist_without_its_gz_files_still_verifies_what_it_reads(
        tracking_store: str, mnist_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(mnist_root / "MNIST", root / "MNIST")
    for gz in (root / "MNIST" / "raw").glob("*.gz"):
        gz.unlink()
    code, _, err = run_cli(["train", *TINY, "--data-dir", str(root)], capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize(("args", "named"), [
    (["train", "--seed", "99999999999999999"], "invalid seed"),
    (["train", "--seed", "2e19"], "--seed"),
    (["train", "--seed", "-1"], "invalid seed"),
    (["train", "--lr", "inf"], "invalid lr: must be a finite number"),
    (["train", "--lr", "1e309"], "invalid lr: must be a finite number"),
    (["train", "--weight-decay", "inf"], "invalid weight_decay: must be a finite number"),
    (["train", "--dropout", "nan"], "invalid dropout: must be a finite number"),
    (["train", "--experiment", ""], "invalid --experiment: the name is empty"),
    (["sweep", "--experiment", " "], "invalid --experiment: the name is empty"),
    (["models", "--model-name", "x' OR '1'='1"], "invalid --model-name"),
    (["compare", "--model-name", ""], "invalid --model-name: the name is empty"),
    (["compare", "--model-name", "it's"], "invalid --model-name"),
    (["compare", "--report", "/dev/null/x"], "invalid --report /dev/null/x"),
    (["compare", "--results", "/nonexistent/dir/R.md"], "folder /nonexistent/dir does not exist"),
    (["promote", "--version", "1", "--model-name", "a/b"], "invalid --model-name"),
    (["runs", "--mark-killed"], "--mark-killed needs --stale"),
])
def test_user_mistakes_are_one_line_exit_2_and_create_nothing(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, args: list[str], named: str) -> None:
    if args[0] in ("train", "sweep"):
        args = [*args, *TINY, "--data-dir", str(mnist_root)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and named in lines[0], err
    assert all_runs() == []
    assert not Path("/nonexistent").exists()


def cut(client: MlflowClient, run_id: str, artifact: str, folder: Path) -> bytes:
    """Replace the run's `artifact` with its first 1000 bytes; what it held."""
    path = Path(client.download_artifacts(run_id, artifact, str(folder)))
    whole = path.read_bytes()
    path.write_bytes(whole[:1000])
    client.log_artifact(run_id, str(path), "checkpoints")
    return whole


def test_a_cut_checkpoint_is_passed_over_for_the_epoch_before_and_no_epoch_is_logged_twice(
        tracking_store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient()
    trainer = slow_trainer(tracking_store, mnist_root, "truncated")
    run_id = wait_for_epoch(client, trainer, "truncated", 2)
    trainer.send_signal(signal.SIGINT)
    trainer.communicate(timeout=120)
    first = cut(client, run_id, checkpoint_artifact(1), tmp_path / "1")
    cut(client, run_id, checkpoint_artifact(2), tmp_path / "2")

    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)

    # With no checkpoint that reads: one error line (after MLflow's download progress bar),
    # no traceback, and the run is left as it was.
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert f"no checkpoint of run {run_id} can be read" in errors[0]
    assert client.get_run(run_id).info.status == "KILLED"

    # The epoch before reads again: the resume goes on from it.
    (tmp_path / "epoch-001.pt").write_bytes(first)
    client.log_artifact(run_id, str(tmp_path / "epoch-001.pt"), "checkpoints")
    code, _, err = run_cli(["train", "--resume", run_id, "--data-dir", str(mnist_root)],
                           capsys, monkeypatch)

    assert code == 0, err
    said = caplog.text  # the CLI's log goes to stderr
    assert f"{checkpoint_artifact(2)}: " in said
    assert f"going on from {checkpoint_artifact(1)}" in said
    assert client.get_run(run_id).info.status == "FINISHED"
    for name in ("test_acc", "val_acc", "train_loss"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3]
    # Epoch 2 was trained again and its checkpoint written whole.
    for epoch in (1, 2, 3):
        torch.load(client.download_artifacts(run_id, checkpoint_artifact(epoch),
                                             str(tmp_path / f"after-{epoch}")),
                   weights_only=True)


def test_resume_refuses_another_experiment(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    run = client.create_run(client.create_experiment("somewhere"))
    code, _, err = run_cli(["train", "--resume", run.info.run_id, "--experiment", "elsewhere",
                            "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code == 2
    assert "--experiment elsewhere conflicts with run" in err and "somewhere" in err


def test_a_tracking_store_that_is_not_a_database_is_one_line(
        tmp_path: Path, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "mlflow.db"
    bad.write_bytes(b"this is not an SQLite database" * 100)
    use_store(tmp_path, monkeypatch)
    for args in (["train", *TINY, "--data-dir", str(mnist_root)], ["models"],
                 ["compare"], ["promote", "--version", "1"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and f"tracking store sqlite:///{bad} cannot be opened" in err
    assert bad.read_bytes() == b"this is not an SQLite database" * 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="trains on the CPU")
def test_sigint_while_finishing_ends_finished_and_says_so(
        tracking_store: str, mnist_root: Path) -> None:
    """Ctrl-C after the last epoch (while the model is logged) is neither swallowed nor
    turns a finished run KILLED or RUNNING."""
    client = MlflowClient()
    trainer = mnist_mlflow(tracking_store, "train", *SLOW[:4], "--epochs", "1", "--device",
                           "cpu", "--threads", "1", "--data-dir", str(mnist_root),
                           "--experiment", "finishing")
    run_id = wait_for_epoch(client, trainer, "finishing", 1)
    trainer.send_signal(signal.SIGINT)  # right after the epoch's metrics: while finishing
    _, err = trainer.communicate(timeout=120)
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        assert trainer.returncode in (0, 130), err
        if trainer.returncode == 130:
            assert f"while run {run_id} was finishing; it ended FINISHED" in err
    else:  # the signal came before the last epoch was done
        assert run.info.status == "KILLED" and "resume it with" in err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_sweep_resume_treats_a_child_whose_process_is_gone_as_killed(
        store: str, mnist_root: Path) -> None:
    """A child left RUNNING by a trainer killed hard (its pid gone) is trained on in its own
    run by `sweep --resume`: no second child, nothing left RUNNING."""
    from mnist_mlflow.mlrun import MlflowRun
    from mnist_mlflow.sweep import resume_sweep, run_sweep, sweep_configs
    from tests.helpers import children_of
    from tests.test_tracking_layer import StopAfterFirst

    configs = sweep_configs(tiny_config(epochs=1, threads=1), [("opt", 0.0), ("opt", 0.05)])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, mnist_root, "stale-sweep", progress=False, executor=StopAfterFirst())
    [parent] = [r for r in runs_of("stale-sweep") if r.data.tags.get("mnist_mlflow.role") ==
                "sweep"]
    first, second = children_of("stale-sweep", parent.info.run_id)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    child = MlflowRun(second.info.run_id)
    child.reopen()  # as a worker that began, then was killed -9 before its first checkpoint
    child.set_tags(lease_tags(int(gone)))

    result = resume_sweep(parent.info.run_id, mnist_root, progress=False)

    assert [c.status for c in result.children] == ["FINISHED", "FINISHED"]
    assert [c.info.run_id for c in children_of("stale-sweep", parent.info.run_id)] == [
        first.info.run_id, second.info.run_id]
    assert all(r.info.status == "FINISHED" for r in runs_of("stale-sweep"))


@pytest.fixture
def remountable(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A tmpfs at tmp_path/ro, and a function that remounts it read-only.

    Root ignores file modes, so a read-only file system is the honest way to make a store or
    a data folder read-only. Skipped, with the reason, where mounting is not allowed."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): "
                    "a read-only file system is needed")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_store_is_one_line_for_every_command_and_stays_as_it_was(
        tmp_path: Path, mnist_root: Path, remountable: Callable[[], None],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    made = tmp_path / "made"
    made.mkdir()
    use_store(made, monkeypatch)
    train_one(tiny_config(epochs=1), mnist_root, "before", progress=False)
    # A copy of that store on a file system then made read-only (the first one stays open
    # in this process, which a read-only remount would refuse).
    folder = tmp_path / "ro"
    shutil.copy(made / "mlflow.db", folder / "mlflow.db")
    before = (folder / "mlflow.db").read_bytes()
    remountable()
    use_store(folder, monkeypatch)
    for args in (["train", *TINY, "--data-dir", str(mnist_root)],
                 ["sweep", *TINY, "--data-dir", str(mnist_root)],
                 ["compare", "--experiment", "before"], ["promote", "--version", "1"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert code != 0 and len(errors) == 1 and "Traceback" not in err, (args, err)
        assert "tracking store" in errors[0] and "is read-only: " in errors[0], err
    assert (folder / "mlflow.db").read_bytes() == before


def test_a_read_only_data_folder_that_needs_extracting_is_named_as_such(
        tmp_path: Path, mnist_root: Path, tracking_store: str,
        remountable: Callable[[], None], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "ro" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    remountable()
    code, _, err = run_cli(["train", *TINY, "--data-dir", str(tmp_path / "ro")], capsys,
                           monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert f"MNIST folder {raw} cannot be written" in err
    assert all_runs() == []
