"""The tracking layer: one run lifecycle, one schema, one list of settings, a sweep executor
seam, and runs that read well in the MLflow UI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.mlrun import MlflowRun
from mnist_mlflow.schema import (
    DESCRIPTION_TAG,
    EPOCH_METRICS,
    PLAN_ARTIFACT,
    ROLE_TAG,
    SUMMARY_METRICS,
    SUMMARY_STEP,
    TRAIN_ROLE,
    rounded,
)
from mnist_mlflow.sweep import (
    ChildJob,
    ChildOutcome,
    run_sweep,
    sweep_configs,
    sweep_name,
    train_child,
)
from tests.conftest import REPO, empty_store, tiny_config
from tests.helpers import children_of, train_one

# --- one list of settings ---------------------------------------------------------------------


def mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


@pytest.mark.parametrize(("entry", "beside", "left_out"), [
    # Not threads: how a run runs is a tag, and MLflow logs every declared parameter.
    ("main", set(), {"threads"}),
    ("sweep", {"phase", "variants", "seeds", "executor", "ray_address",
               "cpus_per_run", "gpus_per_run"}, {"model", "dropout", "threads"}),
    ("until_decided", {"phase", "variants", "seeds", "executor", "ray_address", "cpus_per_run",
                       "gpus_per_run", "first_round", "round_seeds", "max_seeds", "min_effect",
                       "model_name"}, {"model", "dropout", "threads"}),
])
def test_mlproject_entry_points_expose_exactly_the_settings_with_their_defaults(
        entry: str, beside: set[str], left_out: set[str]) -> None:
    point = mlproject()["entry_points"][entry]
    parameters = point["parameters"]
    settings = set(TrainConfig.field_names()) - left_out
    assert set(parameters) == settings | beside
    defaults = TrainConfig()
    for name in settings:
        default = getattr(defaults, name)
        given = parameters[name]["default"]
        if isinstance(default, bool):
            assert str(given).lower() == str(default).lower(), name
        elif isinstance(default, (int, float)):
            assert float(given) == float(default), name
        else:
            assert given == default, name
        # Each parameter reaches its option.
        assert f"--{name.replace('_', '-')} {{{name}}}" in point["command"], name


def test_every_setting_is_an_option_with_its_help_and_choices() -> None:
    from mnist_mlflow.cli import train

    options = {p.name: p for p in train.params}
    for field in dataclasses.fields(TrainConfig):
        option = options[field.name]
        assert option.default == field.default and option.help == field.metadata["help"]
        if field.metadata["choices"]:
            assert tuple(option.type.choices) == field.metadata["choices"]


# --- no torch where nothing trains ------------------------------------------------------------

IMPORTS = textwrap.dedent("""
    import sys
    from mnist_mlflow.cli import main
    sys.argv = ["mnist-mlflow", *sys.argv[1:]]
    try:
        main()
    except SystemExit:
        pass
    print("torch loaded" if "torch" in sys.modules else "no torch")
""")


@pytest.mark.parametrize("args", [
    ["--help"], ["train", "--help"], ["sweep", "--help"], ["compare", "--help"],
    ["models"], ["promote", "--version", "1"], ["compare", "--experiment", "none-here"],
])
def test_commands_that_do_not_train_import_no_torch(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": empty_store(tmp_path)}
    done = subprocess.run([sys.executable, "-c", IMPORTS, *args], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "no torch", done.stderr[-2000:]


# --- one run lifecycle ------------------------------------------------------------------------


def test_runs_the_project_creates_carry_mlflow_context_tags(store: str) -> None:
    run = MlflowRun.create("lifecycle", "made-by-client", description="what it is")
    tags = MlflowClient().get_run(run.run_id).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    assert tags["mlflow.source.type"] == "LOCAL"
    # The commit of the code that ran (this checkout), whatever script started it.
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=REPO).stdout.strip()
    if head:  # a checkout, as in CI
        assert tags["mlflow.source.git.commit"] == head
    assert tags[DESCRIPTION_TAG] == "what it is"
    run.end(mlflow.entities.RunStatus.FINISHED)
    assert MlflowClient().get_run(run.run_id).info.status == "FINISHED"


# --- runs that read well ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(store_dir: Path, mnist_root: Path) -> mlflow.entities.Run:
    with pytest.MonkeyPatch.context() as patch:
        from tests.conftest import use_store

        use_store(store_dir, patch)
        result = train_one(tiny_config(dropout=0.05, threads=1), mnist_root, "reads-well",
                               progress=False)
        return MlflowClient().get_run(result.run_id)


def test_summary_metrics_are_at_step_0_and_rounded(store: str,
                                                   tracked: mlflow.entities.Run) -> None:
    client = MlflowClient()
    for name in SUMMARY_METRICS:
        history = client.get_metric_history(tracked.info.run_id, name)
        assert {m.step for m in history} == {SUMMARY_STEP}, name
        value = tracked.data.metrics[name]
        assert value == rounded(name, value), name
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(tracked.info.run_id, name)] == [1, 2]


def test_plumbing_is_tags_and_settings_are_params(store: str,
                                                  tracked: mlflow.entities.Run) -> None:
    params, tags = tracked.data.params, tracked.data.tags
    plumbing = {"threads", "resolved_device", "resolved_precision", "resolved_compile",
                "torch_version", "torchvision_version", "data_dir", "resume"}
    assert not plumbing & set(params)
    assert set(params) == (set(TrainConfig.field_names()) - {"threads"}) | {
        "num_params", "val_split_digest"}
    assert tags["threads"] == "1" and tags["resolved_device"] == "cpu"
    assert tags[ROLE_TAG] == TRAIN_ROLE
    # What reproduce compares: where it ran and which code (a sweep's child records its own).
    assert tags["torch_threads"] == "1" and tags["cpu_model"] and tags["mlflow_version"]
    assert tags["mnist_mlflow.code.source"] in ("git", "package")
    if tags["mnist_mlflow.code.source"] == "git":
        assert tags["mnist_mlflow.code.dirty"] in ("true", "false")
        assert len(tags["mlflow.source.git.commit"]) == 40


def test_the_run_describes_itself_and_names_its_dataset_and_model(
        store: str, tracked: mlflow.entities.Run) -> None:
    description = tracked.data.tags[DESCRIPTION_TAG]
    assert description.startswith("opt-dropout0.05, seed 1: 6,132 parameters, 2 epochs of")
    assert f"Finished: test accuracy {tracked.data.metrics['final_test_acc']:.2f}%" in description
    assert tracked.info.run_name == "s1 opt d0.05 e2 val256 n512 t256"
    inputs = {d.tags[0].value: d.dataset for d in tracked.inputs.dataset_inputs}
    assert inputs["train"].name == "mnist-train-val256[:512]"
    assert inputs["validation"].name == "mnist-validation[256]"
    assert inputs["test"].name == "mnist-test[:256]"
    assert inputs["validation"].digest == tracked.data.params["val_split_digest"]
    assert len({d.digest for d in inputs.values()}) == 3
    [model] = mlflow.search_logged_models([tracked.info.experiment_id],
                                          f"source_run_id = '{tracked.info.run_id}'",
                                          output_format="list")
    assert model.name == "s1-opt-d0_05-e2-val256-n512-t256"
    carried = {m.key: m.value for m in model.metrics}
    assert carried["final_test_acc"] == tracked.data.metrics["final_test_acc"]


def test_the_experiment_says_what_it_holds(store: str, tracked: mlflow.entities.Run) -> None:
    experiment = MlflowClient().get_experiment(tracked.info.experiment_id)
    assert "tags.mnist_mlflow.role = 'train'" in experiment.tags[DESCRIPTION_TAG]


@pytest.mark.parametrize(("seeds", "name"), [([1, 2, 3], "sweep gap: opt s1-3"),
                                             ([1], "sweep gap: opt s1"),
                                             ([1, 5], "sweep gap: opt s1,5")])
def test_sweep_parents_are_named_for_what_they_train(seeds: list[int], name: str) -> None:
    configs = [TrainConfig(seed=seed) for seed in seeds]
    assert sweep_name("gap", configs) == name
    assert sweep_name("", configs[:1]) == "sweep opt s1"


# --- the executor seam ------------------------------------------------------------------------


class ReversedExecutor:
    """Another executor: the jobs last first, recording what it was handed."""

    def __init__(self) -> None:
        self.statuses: list[str] = []

    def run(self, jobs: Sequence[ChildJob], data_dir: Path | str,
            progress: bool) -> Iterator[ChildOutcome]:
        for job in reversed(jobs):
            self.statuses.append(MlflowClient().get_run(job.run_id).info.status)
            yield train_child(job, data_dir, progress)


def test_children_are_created_before_they_train_and_outcomes_come_back_as_data(
        store: str, mnist_root: Path) -> None:
    configs = sweep_configs(tiny_config(epochs=1, threads=1), [("opt", 0.0), ("opt", 0.05)])
    failing = dataclasses.replace(configs[1], lr=1e6)  # diverges: a real failure
    executor = ReversedExecutor()

    result = run_sweep([configs[0], failing], mnist_root, "executor", progress=False,
                       executor=executor)

    # Each job's run existed, waiting, before the executor ran it.
    assert executor.statuses == ["SCHEDULED", "SCHEDULED"]
    outcomes = {c.config: c for c in result.children}
    assert outcomes[configs[0]].status == "FINISHED"
    assert outcomes[failing].status == "FAILED"
    assert "TrainingDiverged" in outcomes[failing].error
    children = {c.info.run_id: c for c in children_of("executor", result.parent_run_id)}
    for outcome in result.children:  # the outcome is in the store too, by the same run id
        assert children[outcome.run_id].info.status == outcome.status
    parent = MlflowClient().get_run(result.parent_run_id)
    assert (parent.data.tags["children_finished"], parent.data.tags["children_failed"]) == (
        "1", "1")


class StopAfterFirst:
    """An executor interrupted (as by Ctrl-C) once the first job is done."""

    def run(self, jobs: Sequence[ChildJob], data_dir: Path | str,
            progress: bool) -> Iterator[ChildOutcome]:
        yield train_child(jobs[0], data_dir, progress)
        raise KeyboardInterrupt


@pytest.mark.parametrize("plan", ["kept", "gone"])
def test_an_interrupted_sweep_leaves_the_children_it_did_not_start_scheduled(
        store: str, mnist_root: Path, plan: str, caplog: pytest.LogCaptureFixture) -> None:
    from mnist_mlflow.sweep import resume_sweep

    experiment = f"interrupted-sweep-plan-{plan}"
    configs = sweep_configs(tiny_config(epochs=1, threads=1), [("opt", 0.0), ("opt", 0.05)])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, mnist_root, experiment, progress=False,
                  executor=StopAfterFirst())
    [parent] = [r for r in mlflow.search_runs(experiment_names=[experiment],
                                              output_format="list")
                if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert parent.info.status == "KILLED"
    assert parent.data.tags["children_scheduled"] == "1"
    first, second = children_of(experiment, parent.info.run_id)
    assert (first.info.status, second.info.status) == ("FINISHED", "SCHEDULED")
    if plan == "gone":  # deleted by a cleanup job: the children it made stand for it
        (Path(parent.info.artifact_uri.removeprefix("file://")) / PLAN_ARTIFACT).unlink()

    result = resume_sweep(parent.info.run_id, mnist_root, progress=False)

    assert [c.status for c in result.children] == ["FINISHED", "FINISHED"]
    # The child that never began trained in its own run: no extra child appeared.
    assert [c.info.run_id for c in children_of(experiment, parent.info.run_id)] == [
        first.info.run_id, second.info.run_id]
    assert (f"its {PLAN_ARTIFACT} is gone; going on with the 2 children it made"
            in caplog.text) == (plan == "gone")
    assert MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"
