"""RESULTS.md: one table per phase, from the tracked runs, with the commands that made them,
how each recipe was chosen, whether the differences within a phase are real, and the
targets judged on recipes chosen on validation.

Runs of a phase are grouped by `config_group` (the same settings but for the seed and how they
ran). Each row gives the group's validation and test accuracy with 95% intervals over seeds
and images, and its worst-of-the-last-3-epochs test accuracy, the figure the "≥ 99.4% at each
of the last 3 epochs" target is read from.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from itertools import combinations
from pathlib import Path

from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlflow import store
from mnist_mlflow.config import AUTO_THREADS, TrainConfig, UserError
from mnist_mlflow.phases import PHASES
from mnist_mlflow.queries import load_records, score_runs, search_all, training_runs
from mnist_mlflow.report import interval_cell, markdown_table
from mnist_mlflow.schema import (
    CHOSEN_CONFUSION,
    CHOSEN_MISTAKES,
    COMMAND_TAG,
    DEVICE_TAG,
    FINAL_TEST_ACC,
    FINAL_VAL_ACC,
    LAST3_METRIC,
    MEAN_EPOCH_SECONDS,
    PHASE_TAG,
    REPORT_DISAGREEMENTS,
    REPORT_PARETO,
    TORCH_THREADS_TAG,
    settings_from_params,
    settings_of,
)
from mnist_mlflow.selection import SEED_PROTOCOL, Group, contrast, group_runs
from mnist_mlflow.stats import METHOD, Pooled, difference, interval
from mnist_mlflow.store import experiment_id

# The seed's next target: at least this at each of the last 3 epochs, for every seed.
TARGET_ACC = 99.40
TARGET_PARAMS = 8000
TARGET_EPOCHS = 15
TARGET_SEEDS = 3


def meets_target(group: Group) -> bool:
    return (group.num_params < TARGET_PARAMS and group.config.epochs <= TARGET_EPOCHS
            and group.n >= TARGET_SEEDS and min(group.values(LAST3_METRIC)) >= TARGET_ACC)


def how_run(run: Run) -> str:
    """Device and torch threads, like `cpu, 1 thread`."""
    settings = settings_of(run)
    # A tag since runs record how they ran as tags; a param in runs made before.
    device = run.data.tags.get(DEVICE_TAG) or settings.get(DEVICE_TAG, "?")
    # The count torch had (`auto` or 0 say only how it was chosen); what runs made before
    # that tag asked for.
    counted = run.data.tags.get(TORCH_THREADS_TAG) or str(settings.get("threads", "0"))
    threads = int(float(counted)) if counted != AUTO_THREADS else 0
    if not threads:
        return device
    return f"{device}, {threads} thread{'s' if threads > 1 else ''}"


# The registered run's pictures, in the order RESULTS.md shows them.
CAPTIONS = {CHOSEN_CONFUSION: "Confusion matrix of the registered run's validation images",
            CHOSEN_MISTAKES: "The registered run's most confident mistakes",
            REPORT_DISAGREEMENTS: "Images the new and the production model answer differently"}

HEADER = ["Variant", "Recipe", "Recipe chosen", "Params", "Epochs", "Seeds",
          "Final val acc, 95% CI", "Final test acc, 95% CI", "Last-3 min, mean",
          "Last-3 min, min", "Last-3 min per seed", "s/epoch", "Device",
          f"Target met (< {TARGET_PARAMS:,}, ≤ {TARGET_EPOCHS} ep, ≥ {TARGET_ACC:.2f}%)"]


def group_interval(group: Group, metric: str, pooled: Pooled) -> str:
    sample = group.sample(metric)
    return interval_cell(interval(sample, pooled)) if sample else SEED_PROTOCOL


def group_row(group: Group, runs: dict[str, Run], chosen_by: str,
              pooled: dict[str, Pooled]) -> list[str]:
    last3 = group.values(LAST3_METRIC)
    seconds = group.values(MEAN_EPOCH_SECONDS) if group.has(MEAN_EPOCH_SECONDS) else []
    return [group.config.variant_name, group.config.recipe(), chosen_by,
            f"{group.num_params:,}", str(group.config.epochs), ",".join(map(str, group.seeds)),
            group_interval(group, FINAL_VAL_ACC, pooled[FINAL_VAL_ACC]),
            group_interval(group, FINAL_TEST_ACC, pooled[FINAL_TEST_ACC]),
            f"{sum(last3) / len(last3):.2f}", f"{min(last3):.2f}",
            " / ".join(f"{v:.2f}" for v in last3),
            f"{sum(seconds) / len(seconds):.1f}" if seconds else "?",
            how_run(runs[group.runs[0].run_id]), "yes" if meets_target(group) else "no"]


def phase_runs(experiment: str) -> dict[str, list[Run]]:
    """FINISHED training runs of `experiment` by phase tag, oldest first."""
    client = store.client()
    by_phase: dict[str, list[Run]] = {}
    for run in search_all(client, experiment_id(experiment, client),
                          "attributes.status = 'FINISHED'"):
        phase = run.data.tags.get(PHASE_TAG)
        if phase and LAST3_METRIC in run.data.metrics and MLFLOW_PARENT_RUN_ID in run.data.tags:
            by_phase.setdefault(phase, []).append(run)
    if not by_phase:
        raise UserError(f"experiment {experiment!r} has no finished runs of a phase; "
                        "train one with `mnist-mlflow sweep --phase NAME`")
    return by_phase


def sweep_commands(runs: Sequence[Run]) -> list[str]:
    """The command of each sweep these runs belong to, in the order they ran, each followed
    by what it trained (a phase may have been redefined since)."""
    client = store.client()
    trained: dict[str, list[Run]] = {}
    for run in runs:
        trained.setdefault(run.data.tags[MLFLOW_PARENT_RUN_ID], []).append(run)
    lines = []
    for parent, children in trained.items():
        command = client.get_run(parent).data.tags.get(COMMAND_TAG) or f"(sweep run {parent})"
        configs = [TrainConfig(**settings_from_params(settings_of(r))) for r in children]
        variants = dict.fromkeys(c.variant_name for c in configs)
        recipes = dict.fromkeys(c.recipe() for c in configs)
        lines.append(f"{command}\n    # trained {', '.join(variants)}: {' | '.join(recipes)}")
    return lines


def pooled_over(groups: Sequence[Group]) -> dict[str, Pooled]:
    """The seed variance pooled over `groups`, per accuracy (what one-seed groups borrow)."""
    return {metric: Pooled.of([g.sample(metric) for g in groups if g.has(metric)])
            for metric in (FINAL_VAL_ACC, FINAL_TEST_ACC)}


def differences(groups: Sequence[Group], pooled: dict[str, Pooled]) -> list[str]:
    """Each later variant of a phase against each earlier one of the same network (the phase
    lists its baseline first), on validation (what selection reads) and, reported, on test:
    a gain, and whether seeds and images explain it."""
    lines = []
    for base, change in combinations(groups, 2):
        if base.config.model != change.config.model:
            continue  # different networks: the table and the Pareto view compare those
        label = contrast(change.config, base.config)
        for metric in (FINAL_VAL_ACC, FINAL_TEST_ACC):
            if change.has(metric) and base.has(metric):
                lines.append(difference(change.sample(metric), base.sample(metric),
                                        pooled[metric]).sentence(f"{label}, {metric}"))
    return lines


def targets_on_validation(groups: Sequence[Group]) -> list[str]:
    """Per model with validated recipes: the recipe with the highest mean final_val_acc, and
    whether it meets the target on the test set."""
    lines = []
    models = dict.fromkeys(g.config.model for g in groups if g.has(FINAL_VAL_ACC))
    for model in models:
        candidates = [g for g in groups if g.config.model == model and g.has(FINAL_VAL_ACC)]
        chosen = max(candidates, key=lambda g: (g.summary(FINAL_VAL_ACC).mean, g.n))
        last3 = chosen.values(LAST3_METRIC)
        others = "; ".join(f"{g.config.variant_name}, {g.config.recipe()}: "
                           f"{g.summary(FINAL_VAL_ACC).mean:.2f}"
                           for g in candidates if g is not chosen) or "none"
        lines.append(
            f"- **{model}** ({chosen.num_params:,} parameters): chosen on validation from "
            f"{len(candidates)} recipe(s): {chosen.config.variant_name}, "
            f"{chosen.config.recipe()} (mean final_val_acc "
            f"{chosen.summary(FINAL_VAL_ACC).mean:.2f}, n = {chosen.n}; others: {others}). "
            f"Test, worst of the last 3 epochs per seed: {' / '.join(f'{v:.2f}' for v in last3)}"
            f": target {'met' if meets_target(chosen) else 'NOT met'} ({margin(chosen)}).")
    return lines


def margin(group: Group) -> str:
    """How far the group's worst last-3 accuracy is from the target, in test images: a
    target met by one image is met by chance as easily as by the recipe."""
    images = group.runs[0].images("test")
    worst = min(group.values(LAST3_METRIC))
    count = round((worst - TARGET_ACC) / 100 * images)
    side = "above" if count >= 0 else "below"
    return (f"its lowest, {worst:.2f}, is {abs(count)} test image"
            f"{'' if abs(count) == 1 else 's'} (of {images:,}) {side} {TARGET_ACC:.2f}%")


def render_results(experiment: str, command: str, figures: Path | None = None,
                   data_dir: Path | str = "data", shown: Sequence[str] = ()) -> str:
    """RESULTS.md for every phase trained in `experiment` (runs made before per-image
    records are scored from their models on the MNIST files in `data_dir`); `figures` is the
    folder of the comparison's report, relative to RESULTS.md, holding the files `shown`."""
    lines = ["# Results", "",
             f"Generated by `{command}` on {datetime.now():%Y-%m-%d %H:%M} from the finished "
             f"runs of experiment `{experiment}`; nothing here is typed by hand.", "",
             "Every run holds out the same validation images (`--val-size`, a fixed split "
             "seed) unless it says \"" + SEED_PROTOCOL + "\". Between the recipes of this "
             "file, choices are made on validation accuracy alone; the column \"Recipe "
             "chosen\" says how each recipe came to be one of them, and says so where that "
             "looked at test images.", "",
             "Per group (one configuration over its seeds): final validation and test "
             "accuracy as the mean over the seeds with its 95% interval [low, high] over seeds "
             "and images, and "
             f"\"Last-3 min\": `{LAST3_METRIC}`, a run's lowest test accuracy (%, on all "
             "10,000 test images unless the recipe names a slice) over its last 3 epochs. "
             f"\"Target met\": fewer than {TARGET_PARAMS:,} parameters, at most "
             f"{TARGET_EPOCHS} epochs, and last-3 min ≥ {TARGET_ACC:.2f}% for every one of "
             f"at least {TARGET_SEEDS} seeds. s/epoch is training plus evaluation, on the "
             "device and threads shown. \"Recipe chosen\" says how the recipe was picked, "
             "and on which images.", "", f"Method: {METHOD}. Differences: the difference "
             "of group means with that interval, paired per image; \"within noise\" when it "
             "holds zero.", ""]
    all_groups: list[Group] = []
    phases = phase_runs(experiment)
    summaries = {phase: training_runs(runs)[0] for phase, runs in phases.items()}
    everything = [s for found in summaries.values() for s in found]
    unscored = score_runs(load_records(everything, ["validation", "test"]),
                          ["validation", "test"], data_dir)
    groups_of = {phase: group_runs(found) for phase, found in summaries.items()}
    pooled = pooled_over([g for groups in groups_of.values() for g in groups])
    for phase, runs in phases.items():
        groups = groups_of[phase]
        all_groups += groups
        by_id = {run.info.run_id: run for run in runs}
        known = PHASES.get(phase)
        lines += [f"## Phase `{phase}`", ""]
        if known:
            lines += [f"{known.description[0].upper()}{known.description[1:]}.", ""]
        chosen_by = known.chosen_by if known else "?"
        rows = [HEADER, *(group_row(g, by_id, chosen_by, pooled) for g in groups)]
        lines += [markdown_table(rows), ""]
        found = differences(groups, pooled)
        if found:
            lines += ["Is the difference real?", "", *(f"- {line}" for line in found), ""]
        lines += ["Commands:", "", "```", *sweep_commands(runs), "```", ""]
    if unscored:
        lines += ["Runs without per-image records (their image term is binomial, unpaired):",
                  "", *(f"- {line}" for line in unscored), ""]
    chosen = targets_on_validation(all_groups)
    if chosen:
        lines += ["## Targets, for the recipe validation picks", "",
                  "For each model, validation picks among its recipes above; a recipe that "
                  "became a candidate by a test figure (its \"Recipe chosen\" says so) keeps "
                  "optimistic test accuracy.", "", *chosen, ""]
    if figures is not None:
        lines += ["## Accuracy against size", "",
                  f"![Test accuracy against parameters, one point per group]"
                  f"({figures / REPORT_PARETO})", "",
                  "Group means with their 95% intervals over seeds and images; the dashed line "
                  "joins the groups no other beats on both size and accuracy.", "",
                  "## The registered model's mistakes", "",
                  "What the run `compare` registered got wrong among the validation images: "
                  "its confusion matrix and its most confident mistakes (from its per-image "
                  "records), and, where production was judged against, the images on which "
                  "the two models answer differently.", "",
                  *(f"![{CAPTIONS[name]}]({figures / name})\n" for name in CAPTIONS
                    if name in shown)]
    defaults = TrainConfig()
    lines += [f"Defaults (the seed's recipe): StepLR lr {defaults.lr:g} ×{defaults.gamma:g} every "
              f"{defaults.step_size} epochs, SGD momentum {defaults.momentum:g}, batch "
              f"{defaults.batch_size}, rotation ±{defaults.rotation:g}°, validation split of "
              f"{defaults.val_size:,} training images.", ""]
    return "\n".join(lines)
