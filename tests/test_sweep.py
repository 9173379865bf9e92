"""`mnist-mlflow sweep`: a parent run with one nested child per variant, failures isolated."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow.schema import ROLE_TAG
from mnist_mlflow.sweep import parse_variants, run_sweep, sweep_configs
from tests.conftest import tiny_config
from tests.helpers import children_of, run_cli, runs_of

TINY = ["--epochs", "1", "--train-limit", "512", "--test-limit", "256", "--device", "cpu"]


def test_default_sweep_trains_the_seeds_two_variants_as_children(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One after another (side by side: tests/test_parallel_sweep.py).
    code, out, err = run_cli(["sweep", *TINY, "--workers", "1", "--data-dir", str(mnist_root),
                              "--experiment", "default-sweep"], capsys, monkeypatch)
    assert code == 0, err
    parents = [r for r in runs_of("default-sweep") if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["variants"] == "opt:0,opt:0.05"
    assert parent.data.params["epochs"] == "1"
    children = children_of("default-sweep", parent.info.run_id)
    assert [c.info.run_name for c in children] == ["s1 opt e1 n512 t256",
                                                   "s1 opt d0.05 e1 n512 t256"]
    assert [c.data.params["dropout"] for c in children] == ["0.0", "0.05"]
    assert "mnist_mlflow.lease" not in parent.data.tags  # ended: bookkeeping gone
    assert parent.data.tags["mnist_mlflow.phase"] == "seed"
    # One epoch, said in the singular on each child's page.
    assert all("1 epoch of " in c.data.tags["mlflow.note.content"] for c in children)
    for child in children:
        assert child.info.status == "FINISHED"
        assert "mnist_mlflow.lease" not in child.data.tags
        assert child.data.params["train_limit"] == "512"  # pass-through options reached it
        assert "best_test_acc" in child.data.metrics
        assert f"run {child.info.run_id} FINISHED" in out
    assert parent.data.tags["children_finished"] == "2"
    assert parent.data.tags["children_failed"] == "0"
    # Its row in the runs table reads: its children's best, mean and best group.
    accs = [c.data.metrics["final_val_acc"] for c in children]
    assert parent.data.metrics["best_child_final_val_acc"] == round(max(accs), 2)
    assert parent.data.metrics["mean_child_final_val_acc"] == round(sum(accs) / 2, 2)
    assert parent.data.metrics["best_group_final_val_acc"] == round(max(accs), 2)
    # The second waited SCHEDULED while the first trained: the wait is its own tag (the UI's
    # Duration counts from creation), and what is left of its Duration is its training.
    first, second = (float(c.data.tags["queued_seconds"]) for c in children)
    trained = (children[0].info.end_time - children[0].info.start_time) / 1000 - first
    assert 0 <= first < second and second >= first + 0.5 * trained


def test_failing_children_are_recorded_and_the_others_still_run(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # lr 1e6 makes the loss non-finite in the first epoch: a real failure, in both children.
    code, _, err = run_cli(["sweep", *TINY, "--lr", "1e6", "--variant", "opt:0",
                            "--variant", "opt:0.1", "--data-dir", str(mnist_root),
                            "--experiment", "diverging-sweep"], capsys, monkeypatch)
    assert code == 1
    assert "2 of 2 sweep children did not finish" in err.strip().splitlines()[-1]
    parent = next(r for r in runs_of("diverging-sweep") if r.data.tags.get(ROLE_TAG) == "sweep")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["children_failed"] == "2"
    children = children_of("diverging-sweep", parent.info.run_id)
    assert [c.info.run_name for c in children] == ["s1 opt e1 lr1e+06 n512 t256",
                                                   "s1 opt d0.1 e1 lr1e+06 n512 t256"]
    # Variants, not a phase: no phase tag (an empty one would read as a phase with no name).
    assert "mnist_mlflow.phase" not in parent.data.tags
    for child in children:
        assert child.info.status == "FAILED"
        assert "TrainingDiverged" in child.data.tags["failure_reason"]
        assert "mnist_mlflow.phase" not in child.data.tags


@pytest.mark.parametrize(("args", "message"), [
    (["--variant", "opt"], "invalid --variant 'opt': expected MODEL:DROPOUT"),
    (["--variant", "opt:x"], "invalid --variant 'opt:x'"),
    (["--variant", "opt:0,opt:0"], "a variant is given twice"),
    (["--variant", "nope:0"], "invalid model"),
    (["--variant", "opt:1.5"], "invalid dropout"),
    (["--dropout", "0.1"], "--dropout does not apply to a sweep"),
    (["--model", "opt"], "--model does not apply to a sweep"),
    (["--phase", "nope"], "invalid --phase 'nope'"),
    (["--phase", "gap", "--variant", "opt:0"], "--phase and --variant exclude each other"),
    (["--seeds", "1,x"], "invalid --seeds '1,x'"),
    (["--seeds", "1,1"], "a seed is given twice"),
    (["--seeds", "1,2", "--seed", "3"], "--seed and --seeds exclude each other"),
    (["--seeds", "1,99999999999999999"], "invalid --seeds '1,99999999999999999': "
                                          "99999999999999999 is not in [0, "),
    (["--seeds", "-1"], "-1 is not in [0, "),
    (["--phase", "gap", "--scheduler", "cosine"], "invalid scheduler"),
])
def test_bad_sweep_options_fail_in_one_line_before_any_run(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    code, out, err = run_cli(["sweep", *TINY, *args, "--data-dir", str(mnist_root),
                              "--experiment", "never-created"], capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert runs_of("never-created") == []


def test_parse_variants_accepts_repeated_and_comma_separated_specs() -> None:
    assert parse_variants(["opt:0", "opt:0.05, opt:0.1"]) == [
        ("opt", 0.0), ("opt", 0.05), ("opt", 0.1)]


def test_a_child_failing_before_its_run_began_still_leaves_a_failed_run(
        store: str, mnist_root: Path, tmp_path: Path) -> None:
    bad_root = tmp_path / "bad-data"
    (bad_root / "MNIST" / "raw").mkdir(parents=True)
    for source in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        (bad_root / "MNIST" / "raw" / source.name).write_bytes(source.read_bytes())
    truncated = bad_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:100])
    configs = sweep_configs(tiny_config(epochs=1), [("opt", 0.0), ("opt", 0.05)])

    result = run_sweep(configs, bad_root, "bad-data-sweep", progress=False)

    assert [c.status for c in result.children] == ["FAILED", "FAILED"]
    children = children_of("bad-data-sweep", result.parent_run_id)
    assert [c.info.run_name for c in children] == [c.run_name for c in configs]
    for child, outcome in zip(children, result.children, strict=True):
        assert child.info.run_id == outcome.run_id
        assert child.info.status == "FAILED"
        assert "t10k-labels-idx1-ubyte.gz" in child.data.tags["failure_reason"]
        assert child.data.params["dropout"] == str(outcome.config.dropout)
    assert MlflowClient().get_run(result.parent_run_id).info.status == "FAILED"
