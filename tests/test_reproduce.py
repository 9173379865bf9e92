"""Reproduce: a run rebuilt from its record (settings, how it ran, code, data) into a new run,
and proven the same, or shown to differ with what could explain it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow.schema import (
    CODE_DIRTY_TAG,
    CODE_SOURCE_TAG,
    PATCH_ARTIFACT,
    REPRODUCES_TAG,
    ROLE_TAG,
)
from tests.conftest import REPO, tiny_config
from tests.helpers import craft_run, run_cli, runs_of, train_one
from tests.test_interrupt import mnist_mlflow, wait_for_epoch

EXPERIMENT = "reproduce"


@pytest.fixture(scope="module")
def original(store_dir: Path, mnist_root: Path) -> str:
    """One tiny finished run of three epochs, and it registered as production."""
    with pytest.MonkeyPatch.context() as patch:
        from tests.conftest import use_store

        use_store(store_dir, patch)
        run_id = train_one(tiny_config(epochs=3, threads=1), mnist_root, EXPERIMENT,
                               progress=False).run_id
        from mnist_mlflow.registry import move_production, register_run

        register_run(run_id, "reproduced-cnn", "final_val_acc", "for the reproduce tests")
        move_production("reproduced-cnn", "1", "for the reproduce tests")
        return run_id


def reproduce(args: list[str], mnist_root: Path, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    return run_cli(["reproduce", *args, "--data-dir", str(mnist_root)], capsys, monkeypatch)


def new_run(out: str) -> str:
    return out.split("New run ")[1].split()[0]


def test_a_finished_run_reproduces_identically_into_a_new_run(
        store: str, original: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = reproduce([original], mnist_root, capsys, monkeypatch)

    assert code == 0, err
    assert out.startswith(f"Reproducing run s1 opt e3 val256 n512 t256 ({original}): 3 of 3 "
                          "epochs, cpu, 1 thread(s); today's code is the recorded code")
    assert "Verdict: identical (every value of the 3 epoch(s) is equal)" in out
    assert "environment: the same in every recorded respect" in out
    client = MlflowClient()
    rerun = client.get_run(new_run(out))
    assert rerun.info.experiment_id == client.get_run(original).info.experiment_id
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags[REPRODUCES_TAG] == original
    assert rerun.data.tags["reproduced"] == "identical"
    assert rerun.data.tags[ROLE_TAG] == "reproduction"  # never a candidate of compare
    assert f"#/experiments/{rerun.info.experiment_id}/runs/{original}" in (
        rerun.data.tags["mlflow.note.content"])
    for name in ("train_loss", "val_acc", "test_acc"):
        assert ([m.value for m in client.get_metric_history(rerun.info.run_id, name)]
                == [m.value for m in client.get_metric_history(original, name)])


def test_the_production_model_reproduces_and_its_version_says_so(
        store: str, original: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = reproduce(["models:/reproduced-cnn@production"], mnist_root, capsys,
                               monkeypatch)

    assert code == 0, err
    assert out.startswith(f"Reproducing reproduced-cnn version 1, run s1 opt e3 val256 n512 t256 "
                          f"({original})")
    assert "Verdict: identical" in out
    version = MlflowClient().get_model_version("reproduced-cnn", "1")
    assert version.tags["reproduced"] == "identical"
    assert new_run(out) in version.tags["reproduced_at"]
    code, out, err = run_cli(["models", "--model-name", "reproduced-cnn"], capsys, monkeypatch)
    assert code == 0, err
    assert f"identical ({version.tags['reproduced_at']})" in out


def test_epochs_k_reproduces_only_the_first_k_epochs(
        store: str, original: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = reproduce([original, "--epochs", "1"], mnist_root, capsys, monkeypatch)

    assert code == 0, err
    assert "1 of 3 epochs" in out and "Verdict: identical (every value of the 1 epoch(s)" in out
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(new_run(out), "test_acc")] == [1]
    # The first epoch of the whole recipe: the learning rate is the original's.
    assert (client.get_metric_history(new_run(out), "lr")[0].value
            == client.get_metric_history(original, "lr")[0].value)


def test_another_thread_count_differs_and_says_why(
        store: str, original: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/reproduce.md promises: one thread and two sum in other orders."""
    code, out, err = reproduce([original, "--epochs", "1", "--threads", "2"], mnist_root,
                               capsys, monkeypatch)

    assert code == 1, err
    assert "Verdict: differs" in out
    assert "environment differs: threads: 2 here, 1 in the original" in out
    assert "largest difference in train_loss:" in out


@pytest.mark.parametrize("case", ["unknown-run", "unknown-version", "running", "killed",
                                  "before-records", "other-data", "missing-commit"])
def test_bad_targets_are_one_line_and_create_no_run(
        store: str, original: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    client = MlflowClient()
    target, extra = "", []
    if case == "unknown-run":
        target, expected = "0123456789abcdef", "no run '0123456789abcdef' in the tracking store"
    elif case == "unknown-version":
        target, expected = "models:/reproduced-cnn/7", "has no version '7'"
    elif case in ("running", "killed"):
        target = craft_run(EXPERIMENT, case, 90.0, seed=9,
                           status={"running": "RUNNING", "killed": "KILLED"}[case])
        expected = {"running": "is still RUNNING",
                    "killed": "never finished (KILLED): there is no result"}[case]
    elif case == "before-records":
        target = craft_run(EXPERIMENT, "old", 90.0, seed=8)
        expected = "was logged before runs recorded what reproducing needs: it has no tag " \
                   f"{CODE_SOURCE_TAG}"
    else:
        target = train_one(tiny_config(epochs=1, threads=1, seed=7), mnist_root, EXPERIMENT,
                               progress=False).run_id
        if case == "other-data":
            client.set_tag(target, "mnist_md5.train-images-idx3-ubyte", "0" * 32)
            expected = ("MNIST file train-images-idx3-ubyte.gz here has md5 "
                        "f68b3c2dcbeaaa9fbdd348bbdeb94873, but run")
        else:
            client.set_tag(target, "mlflow.source.git.commit", "f" * 40)
            extra, expected = ["--at-commit"], f"commit {'f' * 40} is not in the repository"
    before = len(runs_of(EXPERIMENT))

    code, out, err = reproduce([target, *extra], mnist_root, capsys, monkeypatch)

    assert code == 2 and err.count("\n") == 1, err
    assert expected in err
    assert len(runs_of(EXPERIMENT)) == before


def git_clone(tmp_path: Path) -> Path:
    """A clone of this repository at its HEAD: a checkout whose code the test may change."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and this repository's history (a git clone)")
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def command(clone: Path, store: str, *args: str) -> subprocess.CompletedProcess[str]:
    """mnist-mlflow with the code of `clone` (this Python, its packages)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(clone),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mnist_mlflow", *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_run_from_a_dirty_tree_carries_its_patch_and_at_commit_rebuilds_it(
        store: str, mnist_root: Path, tmp_path: Path) -> None:
    clone = git_clone(tmp_path)
    models = clone / "mnist_mlflow" / "models.py"
    # A deliberate, uncommitted change that alters every number training produces.
    models.write_text(models.read_text().replace("MNIST_MEAN = 0.1307", "MNIST_MEAN = 0.2"))
    trained = command(clone, store, "train", "--epochs", "2", "--train-limit", "512",
                      "--test-limit", "256", "--val-size", "256", "--threads", "1",
                      "--device", "cpu", "--data-dir", str(mnist_root), "--experiment",
                      "dirty")
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_id = trained.stdout.split("run ")[1].split()[0]
    client = MlflowClient()
    run = client.get_run(run_id)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags[CODE_DIRTY_TAG] == "true"
    patch = Path(client.download_artifacts(run_id, PATCH_ARTIFACT, str(tmp_path / "p")))
    assert "+MNIST_MEAN = 0.2" in patch.read_text()
    subprocess.run(["git", "-C", str(clone), "checkout", "--", "."], check=True)  # clean now

    today = command(clone, store, "reproduce", run_id, "--data-dir", str(mnist_root))

    assert today.returncode == 1, today.stderr[-2000:]
    assert (f"today's code (commit {commit[:7]}) is not the recorded code (commit "
            f"{commit[:7]} with uncommitted changes)") in today.stdout
    assert "Verdict: differs" in today.stdout
    assert "environment differs: uncommitted changes: false here, true in the original" in (
        today.stdout)

    recorded = command(clone, store, "reproduce", run_id, "--at-commit", "--data-dir",
                       str(mnist_root))

    assert recorded.returncode == 0, recorded.stderr[-3000:]
    assert (f"trained the recorded code: commit {commit[:7]} with its recorded patch, in a "
            "temporary git worktree") in recorded.stdout
    assert "Verdict: identical (every value of the 2 epoch(s) is equal)" in recorded.stdout
    rerun = client.get_run(new_run(recorded.stdout))
    assert rerun.data.tags[REPRODUCES_TAG] == run_id and rerun.data.tags[ROLE_TAG] == (
        "reproduction")
    assert "worktree" in rerun.data.tags["reproduced_code"]
    # The worktree is gone.
    listed = subprocess.run(["git", "-C", str(clone), "worktree", "list"], capture_output=True,
                            text=True).stdout
    assert listed.count("\n") == 1


def test_ctrl_c_ends_the_reproduction_killed(store: str, original: str,
                                             mnist_root: Path) -> None:
    client = MlflowClient()
    trained = train_one(tiny_config(epochs=3, threads=1, train_limit=6144, seed=5),
                            mnist_root, "reproduce-killed", progress=False).run_id
    process = mnist_mlflow(store, "reproduce", trained, "--data-dir", str(mnist_root))
    rerun = wait_for_epoch(client, process, "reproduce-killed", 1, ignore={trained})
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 130, err[-2000:]
    assert client.get_run(rerun).info.status == "KILLED"
    assert f"run {rerun} ended KILLED" in err


def test_a_run_whose_checkpoints_are_gone_reproduces_at_the_digits_it_logged(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the original's checkpoints only its logged (rounded) metrics are left: the
    reproduction is compared at those digits, not found to differ by the rounding."""
    run_id = train_one(tiny_config(epochs=2, threads=1, seed=7), mnist_root, EXPERIMENT).run_id
    client = MlflowClient()
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts / "checkpoints")  # a cleanup job's doing

    code, out, err = reproduce([run_id], mnist_root, capsys, monkeypatch)

    assert code == 0, err
    assert "Verdict: identical (every value of the 2 epoch(s) is equal)" in out
