"""`reproduce`: retrain a run, or a registered version's run, from what it recorded (every
setting, how it ran, its code, its data) into a new run, and say whether the numbers are the
same: identical, within seed noise, or different, with every difference in the environment
that could explain it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from mnist_mlflow import codestate, store
from mnist_mlflow.config import TrainConfig, UserError
from mnist_mlflow.mlrun import MlflowRun
from mnist_mlflow.queries import search_all
from mnist_mlflow.registry import check_model_name
from mnist_mlflow.schema import (
    BROKEN_TAG,
    CODE_DIRTY_TAG,
    CODE_SOURCE_TAG,
    CODE_VERSION_TAG,
    COMPILED_TAG,
    CONFIG_GROUP_TAG,
    CPU_TAG,
    DESCRIPTION_TAG,
    DEVICE_TAG,
    EPOCH_METRICS,
    EPOCH_SECONDS,
    MLFLOW_VERSION_TAG,
    MNIST_MD5_TAG_PREFIX,
    PATCH_ARTIFACT,
    PRECISION_TAG,
    RECORD_TAGS,
    REPRODUCED_AT_TAG,
    REPRODUCED_CODE_TAG,
    REPRODUCED_EPOCHS_TAG,
    REPRODUCED_TAG,
    REPRODUCED_VERSION_TAG,
    REPRODUCES_TAG,
    REPRODUCTION_ENVIRONMENT_TAG,
    REPRODUCTION_LARGEST_TAG,
    REPRODUCTION_MEASURE_TAG,
    REPRODUCTION_ROLE,
    ROLE_TAG,
    TORCH_THREADS_TAG,
    TORCH_VERSION_TAG,
    TORCHVISION_VERSION_TAG,
    TRAIN_ROLE,
    config_from_params,
    rounded,
    settings_of,
)
from mnist_mlflow.store import absolute_uri, open_store

IDENTICAL, WITHIN_NOISE, DIFFERS = "identical", "within-noise", "differs"
# A difference is seed noise when it is within this many standard deviations of the
# original's group's seeds at that epoch.
NOISE_SDS = 2.0
# Compared per epoch: everything the loop measures but its duration.
COMPARED = [name for name in EPOCH_METRICS if name != EPOCH_SECONDS]


@dataclass(frozen=True)
class Target:
    """The run to reproduce, and the registered version that named it (if one did)."""

    run: Run
    model_name: str = ""
    version: str = ""

    def describe(self) -> str:
        name = f"run {self.run.info.run_name} ({self.run.info.run_id})"
        return f"{self.model_name} version {self.version}, {name}" if self.version else name


def resolve_target(text: str) -> Target:
    """A run id, `models:/NAME@ALIAS` or `models:/NAME/VERSION`; UserError when unknown."""
    client = store.client()
    version = None
    if text.startswith("models:/"):
        name, sep, which = text.removeprefix("models:/").rpartition("@")
        if not sep:
            name, _, which = text.removeprefix("models:/").rpartition("/")
        if not name or not which:
            raise UserError(f"invalid TARGET {text!r}: a run id, models:/NAME@ALIAS or "
                            "models:/NAME/VERSION")
        check_model_name(name)
        try:
            version = (client.get_model_version_by_alias(name, which) if sep
                       else client.get_model_version(name, which))
        except MlflowException:
            what = f"alias {which!r}" if sep else f"version {which!r}"
            raise UserError(f"registered model {name!r} has no {what}; see "
                            f"`mnist-mlflow models --model-name {name}`") from None
        run_id = version.run_id
    else:
        run_id = text
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in the tracking store {client.tracking_uri}"
                        ) from None
    if version is None:
        return Target(run)
    return Target(run, version.name, str(version.version))


def recorded_config(run: Run) -> TrainConfig:
    """Everything the run trained with, how it ran included; UserError naming what its
    record lacks, or why it cannot be rebuilt (unfinished, not a training run)."""
    name = f"run {run.info.run_name} ({run.info.run_id})"
    if run.data.tags.get(ROLE_TAG, TRAIN_ROLE) != TRAIN_ROLE:
        raise UserError(f"{name} is a {run.data.tags[ROLE_TAG]} run, not a training run")
    if run.info.status == "RUNNING":
        raise UserError(f"{name} is still RUNNING: reproduce a run once it has finished")
    if run.info.status != "FINISHED":
        raise UserError(f"{name} never finished ({run.info.status}): there is no result to "
                        "reproduce; resume it first (mnist-mlflow train --resume)")
    missing = [tag for tag in RECORD_TAGS if tag not in run.data.tags]
    if not any(key.startswith(MNIST_MD5_TAG_PREFIX) for key in run.data.tags):
        missing.append(f"{MNIST_MD5_TAG_PREFIX}*")
    if missing:
        raise UserError(f"{name} was logged before runs recorded what reproducing needs: "
                        f"it has no tag {', '.join(missing)}")
    config = config_from_params(run.info.run_id, settings_of(run), {})
    tags = run.data.tags
    # How it ran, as resolved then (device `auto` may mean another device here).
    # The count torch had: `auto` may find other cores free today.
    threads = tags.get(TORCH_THREADS_TAG) or tags.get("threads", "0")
    return dataclasses.replace(
        config, device=tags[DEVICE_TAG].split(":")[0],
        precision=tags[PRECISION_TAG],
        compile="on" if tags[COMPILED_TAG] == "true" else "off", threads=threads)


def check_data(run: Run, md5s: Mapping[str, str]) -> None:
    """UserError when an MNIST file here differs from the one the run trained on."""
    for key, value in run.data.tags.items():
        if key.startswith(MNIST_MD5_TAG_PREFIX):
            name = key.removeprefix(MNIST_MD5_TAG_PREFIX) + ".gz"
            if md5s.get(name) != value:
                raise UserError(f"MNIST file {name} here has md5 {md5s.get(name, 'missing')}, "
                                f"but run {run.info.run_id} trained on md5 {value}: not the "
                                "same data")


def environment(tags: Mapping[str, str]) -> dict[str, str]:
    """What could make a rerun's numbers differ, as a run recorded it."""
    found = {"torch": tags.get(TORCH_VERSION_TAG, "?"),
             "torchvision": tags.get(TORCHVISION_VERSION_TAG, "?"),
             "mlflow": tags.get(MLFLOW_VERSION_TAG, "?"), "device": tags.get(DEVICE_TAG,
                                                                            "?"),
             "precision": tags.get(PRECISION_TAG, "?"),
             "compiled": tags.get(COMPILED_TAG, "?"),
             "threads": tags.get(TORCH_THREADS_TAG, tags.get("threads", "?")),
             "CPU": tags.get(CPU_TAG, "?"),
             "commit": tags.get(MLFLOW_GIT_COMMIT, tags.get(CODE_VERSION_TAG, "?")),
             "uncommitted changes": tags.get(CODE_DIRTY_TAG, "?")}
    found |= {f"MNIST {k.removeprefix(MNIST_MD5_TAG_PREFIX)}": v for k, v in tags.items()
              if k.startswith(MNIST_MD5_TAG_PREFIX)}
    return found


@dataclass(frozen=True)
class Verdict:
    """How a rerun's epochs compare with the original's."""

    kind: str  # IDENTICAL, WITHIN_NOISE or DIFFERS
    epochs: int
    largest: dict[str, tuple[int, float]]  # metric -> (epoch, rerun − original) of the largest
    measure: str
    environment: list[str]  # what differs between the two runs' environments

    def lines(self) -> list[str]:
        out = [f"Verdict: {self.kind} ({self.measure})"]
        out += [f"  largest difference in {name}: {diff:+.6g} at epoch {epoch}"
                for name, (epoch, diff) in self.largest.items() if diff]
        out += [f"  environment differs: {line}" for line in self.environment] or [
            "  environment: the same in every recorded respect"]
        return out


def compare_histories(original: Mapping[str, Mapping[int, float]],
                      rerun: Mapping[str, Mapping[int, float]], epochs: int,
                      seed_sd: Mapping[str, Mapping[int, float]], seeds: int,
                      environment_differences: list[str]) -> Verdict:
    """`rerun` against `original` (metric -> epoch -> value) over the first `epochs`."""
    largest, noise = {}, True
    for name in COMPARED:
        if name not in original:
            continue
        worst = (0, 0.0)
        for epoch in range(1, epochs + 1):
            diff = rerun.get(name, {}).get(epoch, math.nan) - original[name].get(epoch, math.nan)
            if not math.isfinite(diff) or abs(diff) > abs(worst[1]):
                worst = (epoch, diff)
            spread = seed_sd.get(name, {}).get(epoch, math.nan)
            if not abs(diff) <= NOISE_SDS * spread:
                noise = False
        largest[name] = worst
    if all(diff == 0 for _, diff in largest.values()):
        kind, measure = IDENTICAL, f"every value of the {epochs} epoch(s) is equal"
    elif seeds < 2:
        kind, measure = DIFFERS, ("not identical, and its group has one seed: no seed spread "
                                  "to call it noise")
    elif noise:
        kind, measure = WITHIN_NOISE, (f"every difference within {NOISE_SDS:g} sd of its "
                                       f"group's {seeds} seeds at that epoch")
    else:
        kind, measure = DIFFERS, (f"a difference beyond {NOISE_SDS:g} sd of its group's "
                                  f"{seeds} seeds at that epoch")
    return Verdict(kind, epochs, largest, measure, environment_differences)


def history(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """metric -> epoch -> value (see exact_history)."""
    return exact_history(client, run_id)[0]


def exact_history(client: MlflowClient, run_id: str
                  ) -> tuple[dict[str, dict[int, float]], bool]:
    """metric -> epoch -> value, and whether unrounded: from the run's checkpoint (logged
    metrics are rounded to the digits they mean, which would hide small differences); the
    logged metrics for a run without one (made before checkpoints, or its files gone)."""
    from mnist_mlflow.record import load_checkpoint

    try:
        records = load_checkpoint(client, run_id)["history"]
    except (UserError, MlflowException, OSError, KeyError):
        return {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
                for name in COMPARED}, False
    return {name: {int(r["epoch"]): float(r[name]) for r in records if name in r}
            for name in COMPARED}, True


def as_logged(found: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """A history rounded as its metrics are logged."""
    return {name: {epoch: rounded(name, value) for epoch, value in values.items()}
            for name, values in found.items()}


def seed_spread(client: MlflowClient, run: Run) -> tuple[dict[str, dict[int, float]], int]:
    """Per metric and epoch, the sd over the FINISHED seeds of the run's group (its
    configuration, in its experiment), and how many seeds that is."""
    group = run.data.tags.get(CONFIG_GROUP_TAG, "")
    peers = [r for r in search_all(client, run.info.experiment_id,
                                   "attributes.status = 'FINISHED'")
             if r.data.tags.get(CONFIG_GROUP_TAG) == group
             and REPRODUCES_TAG not in r.data.tags]
    latest: dict[str, Run] = {}
    for peer in peers:  # one run per seed, as compare counts them
        latest[peer.data.params.get("seed", "")] = peer
    histories = [history(client, peer.info.run_id) for peer in latest.values()]
    spread: dict[str, dict[int, float]] = {}
    for name in COMPARED:
        by_epoch: dict[int, list[float]] = {}
        for found in histories:
            for epoch, value in found.get(name, {}).items():
                by_epoch.setdefault(epoch, []).append(value)
        spread[name] = {epoch: statistics.stdev(values) for epoch, values in by_epoch.items()
                        if len(values) > 1}
    return spread, len(latest)


@dataclass(frozen=True)
class Outcome:
    target: Target
    run_id: str
    verdict: Verdict
    code_note: str


def reproduce(text: str, data_dir: Path | str, epochs: int = 0, experiment: str = "",
              at_commit: bool = False, overrides: Mapping[str, object] | None = None,
              progress: bool = True, say=print) -> Outcome:  # noqa: ANN001 - a printer
    """Retrain TARGET's run from its record into a new run and judge the rerun.

    Every check happens before the new run is created; `say` reports what will differ
    before training starts (today's code, another device)."""
    from mnist_mlflow.data import load_mnist
    from mnist_mlflow.tracking import Destination, Training, train

    open_store()
    client = store.client()
    target = resolve_target(text)
    original = target.run
    config = dataclasses.replace(recorded_config(original), **(overrides or {}))
    if BROKEN_TAG in original.data.tags:
        # A check of a broken run is still a check: its metrics and record are whole.
        say(f"Note: run {original.info.run_name} ({original.info.run_id}) is tagged broken "
            f"({original.data.tags[BROKEN_TAG]}); reproducing it from its record all the same")
    recorded_epochs = config.epochs
    if epochs < 0 or epochs > recorded_epochs:
        raise UserError(f"invalid --epochs: must be in [1, {recorded_epochs}] (the run "
                        f"trained {recorded_epochs}), got {epochs}")
    epochs = epochs or recorded_epochs
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"run {original.info.run_id} trained on CUDA, which is not "
                            "available here; add --device cpu to rerun it on the CPU (its "
                            "numbers will differ)")
    config = config.validate()
    data = load_mnist(data_dir, config.train_limit, config.test_limit, config.val_size)
    check_data(original, data.md5s)
    tags = original.data.tags
    here = codestate.current()
    recorded_commit = tags.get(MLFLOW_GIT_COMMIT, "")
    patch = _recorded_patch(client, original) if tags.get(CODE_DIRTY_TAG) == "true" else ""
    if at_commit:
        if tags.get(CODE_SOURCE_TAG) != "git" or not recorded_commit:
            raise UserError(f"run {original.info.run_id} was made from an installed package "
                            f"({tags.get(CODE_VERSION_TAG, '?')}), not a git checkout: there "
                            "is no commit to rebuild")
        if here.root is None:
            raise UserError("--at-commit needs this code to be a git checkout (it builds a "
                            "worktree of the recorded commit from it)")
        if not codestate.has_commit(here.root, recorded_commit):
            raise UserError(f"commit {recorded_commit} is not in the repository at "
                            f"{here.root}: fetch it, or reproduce without --at-commit")
        code_note = (f"trained the recorded code: commit {recorded_commit[:7]}"
                     + (" with its recorded patch" if patch else "")
                     + ", in a temporary git worktree")
    elif here.commit == recorded_commit and here.patch == patch:
        code_note = f"today's code is the recorded code ({here.describe()})"
    else:
        recorded = (f"commit {recorded_commit[:7]}" + (" with uncommitted changes" if patch
                                                       else "")
                    if recorded_commit else tags.get(CODE_VERSION_TAG, "?"))
        code_note = (f"today's code ({here.describe()}) is not the recorded code ({recorded}); "
                     "training today's code (--at-commit trains the recorded one)")
    say(f"Reproducing {target.describe()}: {epochs} of {recorded_epochs} epochs, "
        f"{config.device}, {config.threads if config.threads != '0' else 'default'} thread(s); "
        f"{code_note}")
    experiment = experiment or client.get_experiment(original.info.experiment_id).name
    run = MlflowRun.create(experiment, f"{original.info.run_name} reproduced",
                           tags={REPRODUCES_TAG: original.info.run_id,
                                 REPRODUCED_EPOCHS_TAG: str(epochs),
                                 REPRODUCED_CODE_TAG: code_note},
                           description=f"Reproducing {_link(original)}: training.")
    # Not a candidate of `compare`: a rerun of a seed would replace the original in its group.
    role = {ROLE_TAG: REPRODUCTION_ROLE, REPRODUCES_TAG: original.info.run_id}
    if at_commit:
        _train_recorded_code(run, config, original, data_dir, recorded_commit, patch, here)
        run.set_tags(role)  # that code marked it a training run
    else:
        train(Training((config,), (run.run_id,), tags=role, until=epochs), data_dir,
              Destination(experiment, patient=True), progress)
    rerun = client.get_run(run.run_id)
    spread, seeds = seed_spread(client, original)
    differences = [f"{key}: {value} here, {theirs} in the original"
                   for key, theirs in environment(original.data.tags).items()
                   if (value := environment(rerun.data.tags).get(key, "?")) != theirs]
    theirs, exact = exact_history(client, original.info.run_id)
    ours = history(client, run.run_id)
    if not exact:  # the original's checkpoint is gone: compare at the digits it logged
        ours = as_logged(ours)
    verdict = compare_histories(theirs, ours, epochs, spread, seeds, differences)
    _record(client, target, run, verdict, code_note)
    return Outcome(target, run.run_id, verdict, code_note)


def _link(run: Run) -> str:
    """A link to `run` that MLflow's UI follows from a description."""
    return (f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/"
            f"{run.info.run_id})")


def _recorded_patch(client: MlflowClient, run: Run) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run.info.run_id, PATCH_ARTIFACT, tmp)
                        ).read_text()
        except (MlflowException, OSError):
            raise UserError(f"run {run.info.run_id} was made from uncommitted changes, but "
                            f"its {PATCH_ARTIFACT} is missing: the code cannot be rebuilt"
                            ) from None


def _train_recorded_code(run: MlflowRun, config: TrainConfig, original: Run,
                         data_dir: Path | str, commit: str, patch: str,
                         here: codestate.CodeState) -> None:
    """Train in a subprocess running the recorded code (a worktree at `commit` with `patch`)
    with this Python, into `run`, which that code adopts as it adopts the run `mlflow run`
    makes. It trains every epoch: older code has no way to stop early."""
    params = original.data.params
    options = []
    for name in TrainConfig.field_names():
        if name in params or name in original.data.tags:  # the options that code knew
            value = getattr(config, name)
            options += [f"--{name.replace('_', '-')}", str(value).lower()
                        if isinstance(value, bool) else str(value)]
    with codestate.worktree(here.root, commit, patch) as tree:
        env = {**os.environ, "MLFLOW_RUN_ID": run.run_id, "PYTHONPATH": str(tree),
               "MLFLOW_TRACKING_URI": absolute_uri(run.client.tracking_uri)}
        done = subprocess.run([sys.executable, "-m", "mnist_mlflow", "train", *options,
                               "--data-dir", str(Path(data_dir).resolve())],
                              cwd=tree, env=env, check=False)
    if done.returncode:
        status = run.client.get_run(run.run_id).info.status
        if status == "RUNNING":
            run.end(RunStatus.FAILED, f"the recorded code exited {done.returncode}")
        if done.returncode in (130, 143):
            raise KeyboardInterrupt
        raise UserError(f"the recorded code (commit {commit[:7]}) failed to train "
                        f"(exit {done.returncode}); its output is above")


def _record(client: MlflowClient, target: Target, run: MlflowRun, verdict: Verdict,
            code_note: str) -> None:
    """The verdict on the new run (tags, description) and on the registered version."""
    when = f"{datetime.now():%Y-%m-%d %H:%M}"
    largest = "; ".join(f"{name} {diff:+.4g} (epoch {epoch})"
                        for name, (epoch, diff) in verdict.largest.items() if diff)
    run.set_tags({REPRODUCED_TAG: verdict.kind, REPRODUCTION_MEASURE_TAG: verdict.measure,
                  REPRODUCTION_LARGEST_TAG: largest or "none",
                  REPRODUCTION_ENVIRONMENT_TAG: "; ".join(verdict.environment) or "the same"})
    original = target.run
    run.set_tags({DESCRIPTION_TAG: (
        f"Reproduction of {_link(original)} ({target.describe()}), its first "
        f"{verdict.epochs} epoch(s): **{verdict.kind}** ({verdict.measure}). Code: "
        f"{code_note}. " + (f"Largest differences: {largest}. " if largest else "")
        + ("Environment differences: " + "; ".join(verdict.environment) + "."
           if verdict.environment else "Environment: the same in every recorded respect."))})
    if target.version:
        client.set_model_version_tag(target.model_name, target.version, REPRODUCED_VERSION_TAG,
                                     verdict.kind)
        client.set_model_version_tag(target.model_name, target.version, REPRODUCED_AT_TAG,
                                     f"{when}, run {run.run_id}")
