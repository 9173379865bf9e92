"""`compare`: group the runs, judge the best against production over seeds and images,
register and promote as the verdict says, and log the whole report as a comparison run.

The jobs live in their own modules: the MLflow queries (queries.py), the selection rule
(selection.py), the statistics (stats.py), the verdict (promotion.py), the text (report.py),
the registry's aliases (registry.py). This one runs them in order and records what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow.entities import RunStatus

from mnist_mlflow import promotion, queries, registry, store
from mnist_mlflow.config import UserError
from mnist_mlflow.idx import read_images
from mnist_mlflow.mlrun import MlflowRun, inline_figure
from mnist_mlflow.plots import plot_comparison, plot_gallery, plot_pareto, thumbnail
from mnist_mlflow.report import (
    Comparison,
    render_report,
    verdict_lines,
    version_description,
)
from mnist_mlflow.schema import (
    AGAINST_MEAN,
    AGAINST_N,
    CHOSEN_CONFUSION,
    CHOSEN_GROUP_TAG,
    CHOSEN_HIGH,
    CHOSEN_LOW,
    CHOSEN_MEAN,
    CHOSEN_MISTAKES,
    CHOSEN_N,
    CHOSEN_RUN_NAME_TAG,
    CHOSEN_RUN_TAG,
    COMPARISON_PARAMS,
    COMPARISON_ROLE,
    COMPARISON_RUN_TAG,
    CONFUSION_FILE,
    CURVES_DIR,
    DEFAULT_MIN_EFFECT,
    DIFFERENCE,
    DIFFERENCE_HIGH,
    DIFFERENCE_LOW,
    DIFFERENCE_P,
    FINAL_TEST_ACC,
    MCNEMAR_NEW_TAG,
    MCNEMAR_P_TAG,
    MCNEMAR_PRODUCTION_TAG,
    MISTAKES_FILE,
    PRODUCTION_ALIAS_TAG,
    RECORDED_METRICS,
    REGISTERED_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    REPORT_DISAGREEMENTS,
    REPORT_FILE,
    REPORT_PARETO,
    REPORT_PLOT,
    ROLE_TAG,
    RUN_VERDICT_TAG,
    SELECTED_ON_TAG,
    THUMBS_DIR,
    VERSION_GROUP_INTERVAL_TAG,
    VERSION_GROUP_MEAN_TAG,
    VERSION_GROUP_TAG,
    VERSION_VERDICT_TAG,
)
from mnist_mlflow.selection import (
    Group,
    RunSummary,
    SelectionRule,
    find_group,
    group_runs,
    metric_text,
    on_test_set,
    rank,
    ranking_reason,
    top,
)
from mnist_mlflow.stats import CONFIDENCE, POWER, interval, mcnemar, seeds_to_decide
from mnist_mlflow.store import store_error

# Images shown in the comparison's gallery of disagreements.
DISAGREEMENTS_SHOWN = 24


def _reference(runs: Sequence[RunSummary], metric: str, production: RunSummary | None) -> str:
    """The images the comparison judges `metric` on: those most runs were measured on
    (production's, of those that tie). A production measured elsewhere cannot be judged."""
    keys = Counter(r.scored_on(metric) for r in runs if metric in r.metrics)
    if not keys:
        return ""
    most = max(keys.values())
    tied = [key for key, count in keys.items() if count == most]
    if production is not None and metric in production.metrics:
        if production.scored_on(metric) in tied:
            return production.scored_on(metric)
    return tied[0]


def _same_images(runs: list[RunSummary], metric: str, reference: str
                 ) -> tuple[list[RunSummary], list[str]]:
    """The runs measured on the reference images; a line for those that were not."""
    kept, left_out = [], []
    for run in runs:
        if metric in run.metrics and run.scored_on(metric) != reference:
            left_out.append(f"leaving out run {run.name} ({run.run_id}): its {metric} is "
                            f"measured on other images ({run.scored_on(metric)}; this "
                            f"comparison's: {reference})")
        else:
            kept.append(run)
    return kept, left_out


def _production(model_name: str, rule: SelectionRule) -> tuple[promotion.Production | None,
                                                             RunSummary | None]:
    """Production's version, its group (or why it cannot be judged) and its run."""
    version = registry.production_version(model_name)
    if version is None:
        return None, None
    group, problem = queries.group_of_run(version.run_id, rule.metric)
    run = next((r for r in group.runs if r.run_id == version.run_id), None) if group else None
    if group is not None and run is None:  # a rerun of its seed replaced it in the group
        found, _ = queries.training_runs([store.client().get_run(version.run_id)], rule.metric)
        run = found[0] if found else None
    if group is not None and not group.has(rule.metric):
        problem = (f"its group {group.label()} has no {rule.metric} (made with --val-size 0, "
                   "or before validation metrics existed)")
        group = None
    return promotion.Production(str(version.version), version.run_id,
                                run.name if run else version.run_id, group, problem,
                                registry.looks_of(version)), run


def compare(experiment: str, filter_string: str = "", rule: SelectionRule | None = None,
            top_groups: int = 5, report_dir: Path | None = None,
            runner_run_id: str | None = None, diffs: Sequence[tuple[str, str]] = (),
            data_dir: Path | str = "data", register: bool = False,
            model_name: str = "mnist-cnn", force: bool = False,
            min_effect: float = DEFAULT_MIN_EFFECT, share: float = 1.0) -> Comparison:
    """Compare the experiment's FINISHED training runs and act on the verdict.

    Groups over seeds, ranked by the rule; each group's intervals and the differences asked
    for count seeds and images (per-image records, computed from the logged model with the
    MNIST files in `data_dir` for runs made before them). The verdict against production
    (promotion.decide) is acted on when `register`: the chosen run is registered, production
    moves if the verdict (or `force`) says so, and a comparison run records it all. Under
    `mlflow run` (`runner_run_id`) the experiment is the one the runner put its run in.
    `share`: of this look's error allowance, what is left to the verdict (a sequential
    sweep's last round spends its share).
    """
    if runner_run_id:
        client = store.client()
        experiment = client.get_experiment(
            client.get_run(runner_run_id).info.experiment_id).name
    comparison, shown, production_run = assess(
        experiment, filter_string, rule, top_groups, diffs, data_dir, register, model_name,
        force, min_effect, share)
    comparison.histories = queries.mean_histories(shown)
    # No run of the chosen group has a model to register: it reports, registering nothing.
    register = register and not comparison.unregistrable
    _record(comparison, shown, production_run, register, runner_run_id, data_dir, report_dir)
    return comparison


def assess(experiment: str, filter_string: str = "", rule: SelectionRule | None = None,
           top_groups: int = 5, diffs: Sequence[tuple[str, str]] = (),
           data_dir: Path | str = "data", register: bool = False,
           model_name: str = "mnist-cnn", force: bool = False,
           min_effect: float = DEFAULT_MIN_EFFECT, share: float = 1.0
           ) -> tuple[Comparison, list[Group], RunSummary | None]:
    """compare() up to its verdict, with nothing logged or registered: the comparison, the
    groups it shows and production's run."""
    rule = rule or SelectionRule()
    if not min_effect > 0:
        raise UserError(f"invalid --min-effect: must be > 0 points, got {min_effect}")
    if top_groups < 1:
        raise UserError(f"invalid --top: must be >= 1, got {top_groups}")
    if rule.max_params < 1:
        raise UserError(f"invalid --max-params: must be >= 1, got {rule.max_params}")
    runs, skipped = queries.find_runs(experiment, filter_string, rule.metric)
    if skipped and not runs:
        raise UserError(f"none of the {len(skipped)} FINISHED runs has every metric the "
                        f"comparison needs ({', '.join(queries.REQUIRED_METRICS)}); "
                        "check --filter")
    production, production_run = _production(model_name, rule)
    runs, left_out = _same_images(runs, rule.metric, _reference(runs, rule.metric,
                                                                production_run))
    groups = group_runs(runs)
    pairs = [(find_group(groups, a), find_group(groups, b)) for a, b in diffs]
    top(groups, rule)  # one line when nothing qualifies, before anything is read or logged
    ranked = rank(groups, rule)
    comparison = Comparison(experiment, rule, filter_string, ranked, skipped + left_out,
                            model_name=model_name)
    eligible = comparison.eligible
    if production is not None and production.group is not None and production_run is not None:
        if production_run.scored_on(rule.metric) != eligible[0].runs[0].scored_on(rule.metric):
            production = promotion.Production(
                production.version, production.run_id, production.run_name, None,
                f"its {rule.metric} is measured on other images "
                f"({production_run.scored_on(rule.metric)}) than the challengers' "
                f"({eligible[0].runs[0].scored_on(rule.metric)})", production.looks)
    shown = ranked[:top_groups]
    named = [g for pair in pairs for g in pair]
    _read_records(comparison, [*shown, *named], production, production_run, data_dir)
    base = production.group if production is not None else None
    comparison.pooled = {rule.metric: promotion.pooled_over([*ranked, base], rule.metric),
                         FINAL_TEST_ACC: promotion.pooled_over(ranked, FINAL_TEST_ACC)}
    verdict = promotion.decide(eligible, rule, comparison.pooled[rule.metric], production,
                               share)
    if register:  # before anything is logged: a broken candidate is passed over, not fatal
        verdict, register = _registrable(comparison, verdict, model_name)
    verdict = promotion.check_models(verdict, _mcnemar(verdict, production_run))
    comparison.verdict = promotion.forced(verdict) if force else verdict
    comparison.reason = _reason(comparison)
    if len(eligible) > 1:
        pairs.insert(0, (eligible[0], eligible[1]))
    for a, b in pairs:
        comparison.differences.append(comparison.difference_sentence(a, b, rule.metric))
        if rule.metric != FINAL_TEST_ACC and a.has(FINAL_TEST_ACC) and b.has(FINAL_TEST_ACC):
            comparison.differences.append(comparison.difference_sentence(
                a, b, FINAL_TEST_ACC) + " (reported, not used to choose)")
    comparison.seeds = _seeds_line(comparison, min_effect)
    return comparison, shown, production_run


def _read_records(comparison: Comparison, shown: Sequence[Group],
                  production: promotion.Production | None, production_run: RunSummary | None,
                  data_dir: Path | str) -> None:
    """Per-image records for the runs whose intervals are shown (in the tables or in a
    --diff) or that can win, and production's; runs made before records are scored from
    their models, or named."""
    rule = comparison.rule
    scored = list(dict.fromkeys([*filter(None, [RECORDED_METRICS.get(rule.metric)]), "test"]))
    base = production.group if production is not None else None
    # Only groups better than production's mean can beat it; the others need no records
    # (nor do any but the shown ones when there is no production to beat).
    can_win = [g for g in comparison.eligible if base is not None
               and rule.better(g.mean(rule.metric), base.mean(rule.metric))]
    groups = {id(g): g for g in [*shown, *can_win, *([base] if base else [])]}
    runs = [r for g in groups.values() for r in g.runs]
    runs += [production_run] if production_run is not None else []
    lacking = queries.load_records(runs, scored)
    if not lacking:
        return
    failed = queries.score_runs(lacking, scored, data_dir)
    scored_now = len(lacking) - len(failed)
    if scored_now:
        comparison.notes.append(
            f"{scored_now} run(s) without per-image records (made before them, or their "
            f"records gone) were scored now from their logged models on the MNIST files in "
            f"{data_dir} (and the records logged to them)")
    for line in failed:
        comparison.notes.append(
            f"could not score {line}; its group's image term is binomial and unpaired "
            "(wider: nothing cancels), or it has none where no run of it has records")


def _registrable(comparison: Comparison, verdict: promotion.Verdict, model_name: str
                 ) -> tuple[promotion.Verdict, bool]:
    """The verdict with the chosen group's best run that can be registered, and whether
    any can. Runs passed over (their model missing or unreadable) are named in the notes;
    with none left nothing is registered, production stays, and the comparison still
    reports, so a broken run never blocks `compare`."""
    ordered = comparison.rule.best_runs(verdict.group)
    run_id, passed_over = registry.registrable([(r.run_id, r.name) for r in ordered],
                                               model_name, comparison.rule.metric)
    for passed, line in passed_over.items():
        # One line per broken run: what its records lacking means joins what to do.
        unscored = next((n for n in comparison.notes if n.startswith("could not score ")
                         and f"({passed})" in n), None)
        if unscored is not None:
            comparison.notes.remove(unscored)
            line += "; without its records, its group's image term is binomial and unpaired"
        comparison.notes.append(line)
    if run_id is None:
        comparison.unregistrable = (f"no run of {verdict.group.label()} has a model that "
                                    "can be registered (see the notes above)")
        return verdict, False
    return dataclasses.replace(verdict, run=next(r for r in ordered if r.run_id == run_id)), True


def _seeds_line(c: Comparison, min_effect: float) -> str:
    """When the verdict's difference is within noise: the seeds per group that would likely
    decide it, at the observed difference and at `min_effect`, or that no number of seeds
    can (the validation images' own noise). Empty when decided or nothing to weigh."""
    numbers = c.numbers()
    found = numbers.difference
    if numbers.against is None or (found is not None and found.real):
        return ""
    judgement = c.verdict.judgement if numbers.against_is_production else None
    # The level the verdict is held to: this look's share of the error budget against
    # production, else the 95% interval's one side.
    alpha = judgement.needed() if judgement is not None else (1 - CONFIDENCE) / 2
    ours = c.verdict.group.sample(c.rule.metric)
    theirs = numbers.against.sample(c.rule.metric)
    against = "production" if numbers.against_is_production else "the runner-up"
    plans = [seeds_to_decide(ours, theirs, numbers.pooled, effect, alpha)
             for effect in (abs(found.delta), min_effect)]
    if plans[0].why:
        return f"against {against}: {plans[0].why}."
    now = f"now {ours.n} and {theirs.n}"
    parts = []
    for plan, label in zip(plans, (f"the observed {plans[0].effect:.2f} points",
                                    f"--min-effect {min_effect:g} points"), strict=True):
        if plan.seeds is None:
            parts.append(f"at {label}, more seeds cannot decide: the images' own noise "
                         f"(standard error {plan.floor:.2f} points, which seeds do not "
                         "shrink) is too large; only more validation images would")
        else:
            parts.append(f"at {label}, about {plan.seeds} seeds per group ({now})")
    return (f"within noise against {against}; for {POWER:.0%} power at one-sided "
            f"level {alpha:.3g}, " + "; ".join(parts) + ".")


def _verdict_metrics(c: Comparison) -> dict[str, float]:
    """The verdict in numbers on the selection metric (Comparison.numbers): the chosen group
    with its interval, what it was judged against (production's group, else the runner-up)
    and the difference with its interval and p."""
    numbers = c.numbers()
    ours, against, found = numbers.ours, numbers.against, numbers.difference
    values = {CHOSEN_MEAN: ours.mean, CHOSEN_N: ours.n}
    if ours.low is not None:
        values |= {CHOSEN_LOW: ours.low, CHOSEN_HIGH: ours.high}
    if against is not None:
        # Means as judged: from the per-image records where there are (exact, not rounded).
        values |= {AGAINST_MEAN: numbers.against_interval.mean, AGAINST_N: against.n,
                   DIFFERENCE: found.delta}
        if found.known:
            values |= {DIFFERENCE_LOW: found.low, DIFFERENCE_HIGH: found.high,
                       DIFFERENCE_P: found.p_better}
    # To the digits they mean: points to 0.001, p to 4 significant digits.
    return {name: float(f"{value:.4g}") if name == DIFFERENCE_P else round(float(value), 3)
            for name, value in values.items()}


def _mcnemar(verdict: promotion.Verdict, production_run: RunSummary | None):  # noqa: ANN202
    """McNemar's test of the registered run's model against production's, image by image
    on the validation set, from their records (None when either lacks them)."""
    if verdict.production is None or production_run is None:
        return None
    new, old = verdict.run.records.get("validation"), production_run.records.get("validation")
    if new is None or old is None or not new.aligned_with(old):
        return None
    return mcnemar(new.correct, old.correct)


def _reason(comparison: Comparison) -> str:
    verdict, rule = comparison.verdict, comparison.rule
    text = ranking_reason(verdict.group, comparison.eligible, rule)
    if verdict.kind == promotion.GAIN and verdict.group is not comparison.eligible[0]:
        top = comparison.eligible[0]
        theirs = verdict.judgement.differences.get(top.name)
        if theirs is not None and top.name in verdict.judgement.beats:
            why = (f"its gain is less sure (lower 95% bound {theirs.low:+.2f} points, this "
                   f"group's {verdict.difference.low:+.2f})")
        else:
            why = "it does not beat production"
        text += (f"; of the groups that beat production it is the surest gain: {top.label()} "
                 f"has the higher mean but {why}")
    elif verdict.kind == promotion.FIRST and verdict.group is not comparison.eligible[0]:
        top = comparison.eligible[0]
        pooled = comparison.pooled[rule.metric]
        ours, theirs = (interval(g.sample(rule.metric), pooled) for g in (verdict.group, top))
        bound, ours_at, theirs_at = (("lower", ours.low, theirs.low) if rule.higher_is_better
                                     else ("upper", ours.high, theirs.high))
        text += (f"; the first promotion goes to the surest group: {top.label()} has the "
                 f"higher mean but on fewer seeds its {bound} 95% bound is "
                 f"{metric_text(rule.metric, theirs_at)}, this group's "
                 f"{metric_text(rule.metric, ours_at)}")
    return text


def _record(comparison: Comparison, shown: Sequence[Group], production_run: RunSummary | None,
            register: bool, runner_run_id: str | None, data_dir: Path | str,
            report_dir: Path | None) -> None:
    """The comparison run, the registry's changes, and the report that says what they were.

    The run is made first, so that the version's description can name it; it ends FINISHED
    with the report once the registry is done, or FAILED with the reason if that fails."""
    c = comparison
    run = MlflowRun.create_or_adopt(
        runner_run_id, c.experiment, f"comparison-{c.compared_at:%Y-%m-%d-%H%M}",
        tags={ROLE_TAG: COMPARISON_ROLE, CHOSEN_RUN_TAG: c.chosen.run_id,
              CHOSEN_RUN_NAME_TAG: c.chosen.name, CHOSEN_GROUP_TAG: c.chosen_group.name,
              SELECTED_ON_TAG: "test" if on_test_set(c.rule.metric) else "validation"},
        description="Comparing; the report follows when it is done.")
    c.comparison_run_id = run.run_id
    try:
        run.log_new_params(dict(zip(COMPARISON_PARAMS, (
            c.rule.metric, c.rule.max_params, c.rule.higher_is_better, c.filter_string,
            len(c.ranked), len(c.groups), register), strict=True)))
        if register:
            _act(c)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            files = [REPORT_FILE, REPORT_PLOT, REPORT_PARETO]
            if _plot_disagreements(c, production_run, data_dir, folder / REPORT_DISAGREEMENTS):
                files.append(REPORT_DISAGREEMENTS)
            files += _chosen_pictures(c.chosen.run_id, folder)
            c.files = files
            c.report = render_report(c, shown)
            (folder / REPORT_FILE).write_text(c.report)
            plot_comparison(c.histories, folder / REPORT_PLOT,
                            f"{c.experiment}: {len(shown)} of {len(c.groups)} groups, "
                            "mean over seeds")
            plot_pareto([(g.label(), g.num_params, c.interval(g, FINAL_TEST_ACC))
                         for g in c.groups], folder / REPORT_PARETO,
                        f"{c.experiment}: test accuracy against size, one point per group")
            for name in files:
                run.log_artifact(folder / name)
                if name in (REPORT_PLOT, REPORT_PARETO, REPORT_DISAGREEMENTS):  # shown inline
                    run.log_artifact(thumbnail(folder / name), THUMBS_DIR)
            if report_dir is not None:
                report_dir.mkdir(parents=True, exist_ok=True)
                for name in files:
                    (report_dir / name).write_bytes((folder / name).read_bytes())
        run.log_metrics(_verdict_metrics(c), step=0)
        run.set_tags(_outcome_tags(c))
        # The description shows the figures where they are: among the run's artifacts.
        run.describe(render_report(c, shown, inline_figure(run.run_id)))
    except BaseException as err:
        reason = f"{type(err).__name__}: {store_error(err)}"
        with contextlib.suppress(Exception):  # the store may be what failed: the error stays
            run.describe(f"Comparison failed: {store_error(err)}")
            run.end(RunStatus.FAILED, reason)
            if not c.registered_version and not runner_run_id:
                # It registered nothing, and each retry would leave one more FAILED run:
                # deleted (MLflow keeps it, `mlflow runs restore` brings it back). One that
                # registered a version stays: the version's description links it. Under
                # `mlflow run` the run is the runner's.
                run.client.delete_run(run.run_id)
        raise
    run.end(RunStatus.FINISHED)


def _act(comparison: Comparison) -> None:
    """Register the verdict's run, move production if the verdict says so, and write down
    the looks and the verdict where the registry's readers see them."""
    c, verdict, metric = comparison, comparison.verdict, comparison.rule.metric
    found = c.interval(verdict.group, metric)
    tags = {VERSION_GROUP_TAG: verdict.group.name,
            VERSION_GROUP_MEAN_TAG: f"{verdict.group.mean(metric):.2f}",
            VERSION_GROUP_INTERVAL_TAG: found.format() if found else "",
            VERSION_VERDICT_TAG: ("production: " if verdict.moves
                                  or verdict.kind == promotion.ALREADY else "not production: ")
            + verdict.kind, COMPARISON_RUN_TAG: c.comparison_run_id}
    if verdict.mcnemar is not None:
        tags |= {MCNEMAR_NEW_TAG: str(verdict.mcnemar.new_only),
                 MCNEMAR_PRODUCTION_TAG: str(verdict.mcnemar.old_only),
                 MCNEMAR_P_TAG: f"{verdict.mcnemar.p:.4g}"}
    version = registry.register_run(verdict.run.run_id, c.model_name, metric,
                                    "Registered by `mnist-mlflow compare`; the verdict follows.",
                                    tags)
    c.registered_version = str(version.version)
    if verdict.judgement is not None and verdict.production is not None:
        registry.record_looks(c.model_name, verdict.production.version, verdict.judgement.looks)
    if verdict.moves:
        c.promotion = registry.move_production(c.model_name, c.registered_version,
                                               verdict.kind).message
    elif verdict.kind == promotion.ALREADY:
        c.promotion = f"version {c.registered_version} is already production"
    elif verdict.production is not None:
        c.promotion = f"production stays at version {verdict.production.version}"
    registry.describe_version(c.model_name, c.registered_version, version_description(c))


def _chosen_pictures(run_id: str, folder: Path) -> list[str]:
    """The chosen run's confusion matrix and most confident mistakes, copied into `folder`
    under the names the report gives them (runs made before them have none)."""
    client = store.client()
    present = {a.path for a in client.list_artifacts(run_id, CURVES_DIR)}
    copied = []
    for source, name in ((CONFUSION_FILE, CHOSEN_CONFUSION), (MISTAKES_FILE, CHOSEN_MISTAKES)):
        if f"{CURVES_DIR}/{source}" in present:
            path = client.download_artifacts(run_id, f"{CURVES_DIR}/{source}",
                                             str(folder / "chosen"))
            Path(path).rename(folder / name)
            copied.append(name)
    return copied


def _outcome_tags(comparison: Comparison) -> dict[str, str]:
    c = comparison
    tags = {RUN_VERDICT_TAG: " ".join(verdict_lines(c))}
    if c.registered_version:
        tags |= {REGISTERED_MODEL_TAG: c.model_name,
                 REGISTERED_VERSION_TAG: c.registered_version, PRODUCTION_ALIAS_TAG: c.promotion}
    return tags


def _plot_disagreements(comparison: Comparison, production_run: RunSummary | None,
                        data_dir: Path | str, path: Path) -> bool:
    """The validation images on which the registered run's model and production's answer
    differently, those only one of them gets right first; False when there is nothing to
    draw (no production, no records, no MNIST files to show)."""
    verdict = comparison.verdict
    if verdict.production is None or production_run is None:
        return False
    new, old = verdict.run.records.get("validation"), production_run.records.get("validation")
    if new is None or old is None or not new.aligned_with(old):
        return False
    differ = np.flatnonzero(new.predicted != old.predicted)
    one_right = new.correct[differ] != old.correct[differ]
    shown = np.concatenate([differ[one_right], differ[~one_right]])[:DISAGREEMENTS_SHOWN]
    comparison.disagreements = len(differ)
    try:
        images = read_images(Path(data_dir) / "MNIST" / "raw", "train")
    except (OSError, ValueError) as err:
        comparison.notes.append(f"no gallery of disagreements: MNIST images not readable in "
                                f"{data_dir} ({err})")
        return False
    captions = [f"#{new.index[i]}, true {new.label[i]}\nnew {new.predicted[i]}"
                f"{'✓' if new.correct[i] else '✗'}  prod {old.predicted[i]}"
                f"{'✓' if old.correct[i] else '✗'}" for i in shown]
    new_name = f"version {comparison.registered_version}" if comparison.registered_version \
        else "the candidate"
    plot_gallery(images[new.index[shown]], captions, path,
                 f"{new_name} ({verdict.run.name}, new) vs version "
                 f"{verdict.production.version} ({production_run.name}, production): "
                 f"{len(differ)} validation images answered differently, {len(shown)} shown, "
                 "those only one gets right first")
    return True
