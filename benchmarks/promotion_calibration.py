"""How often `compare` promotes by mistake, and how often it finds a real gain: the project's
own decision code (promotion.decide, with per-image records and the looks of one production
version) on simulated groups whose truth is known.

The simulated world: a population of digits, each with a hardness; a recipe (group) errs on
an image with a probability set by the hardness plus a recipe-specific twist (recipes fail on
different images), and each seed of the recipe errs on it independently with that
probability. Every replicate draws fresh validation images from the population, so image
sampling varies as well as seeds; accuracies are whole images out of N. The model's numbers
are fitted to real full-MNIST runs: by default to the per-image records shipped in
benchmarks/data/ (which validation images each seed of the seed phase got wrong), or to a
store's runs (--fit-store), or given (--world); see docs/compare.md.

Under "no true difference" every group has the same recipe quality, so any promotion is
false. Power: one challenger is truly better by +0.20 or +0.30 points on the population.
`sweep --until-decided` is run the same way, round after round (rounds.call_round).

    python benchmarks/promotion_calibration.py --replicates 1000
    python benchmarks/promotion_calibration.py --fit-store sqlite:///mlflow.db \
        --fit-experiment NAME --export benchmarks/data/seed_phase_records.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_mlflow.config import TrainConfig  # noqa: E402
from mnist_mlflow.promotion import Production, check_models, decide, pooled_over  # noqa: E402
from mnist_mlflow.records import Records  # noqa: E402
from mnist_mlflow.rounds import DECIDED, call_round  # noqa: E402
from mnist_mlflow.schema import FINAL_GAP, FINAL_VAL_ACC  # noqa: E402
from mnist_mlflow.selection import Group, RunSummary, SelectionRule, rank  # noqa: E402
from mnist_mlflow.sequential import Rounds  # noqa: E402
from mnist_mlflow.stats import Looks, mcnemar  # noqa: E402

KS = (1, 2, 5, 10)
NS = (1, 2, 3, 5)
GAINS = (0.20, 0.30)
CALLS = 5  # successive `compare` calls, k new groups each
# One-seed challengers are judged with the seed spread pooled from this production group.
ONE_SEED_AGAINST = 3
TARGET_FALSE = 5.0
TARGET_POWER = 80.0
DEFAULT_ROUNDS = Rounds()  # sweep --until-decided's own defaults


@dataclass(frozen=True)
class World:
    """A population of digits and recipes that err on them, fitted to real runs.

    Image hardness ~ N(mean, sd) on the logit scale of the error; a recipe errs on image i
    with probability q_i = expit(hardness_i + shift + twist * u_i), u_i its own twist per
    image (recipes fail on different images). A seed of the recipe misses K images, K the
    expected count on these images plus seed noise (sd `seed_sd` images), chosen without
    replacement with weights q_i: real seeds disagree on many images while their totals
    spread little, which independent per-image errors cannot produce."""

    mean: float
    sd: float
    twist: float
    seed_sd: float  # images
    images: int = 5000

    def recipe_errors(self, hardness: np.ndarray, shift: float,
                      rng: np.random.Generator) -> np.ndarray:
        """One recipe's error probability per image (a shift < 0 is a better recipe)."""
        return expit(hardness + shift + self.twist * rng.normal(size=hardness.shape))

    def seed_wrong(self, errors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Which images one seed of the recipe misses."""
        count = int(np.clip(round(errors.sum() + self.seed_sd * rng.normal()), 0, len(errors)))
        wrong = np.zeros(len(errors), dtype=bool)
        wrong[rng.choice(len(errors), count, replace=False, p=errors / errors.sum())] = True
        return wrong

    def describe(self, rng: np.random.Generator, draws: int = 20) -> dict[str, float]:
        """What a recipe scores in this world: mean accuracy, the seeds' sd, and on how many
        of N images two seeds, or two recipes, disagree (averaged over `draws` image sets)."""
        found = {"accuracy": [], "seed_sd": [], "disagree_seeds": [], "disagree_recipes": []}
        for _ in range(draws):
            hardness = rng.normal(self.mean, self.sd, self.images)
            a, b = (self.recipe_errors(hardness, 0, rng) for _ in range(2))
            seeds = [self.seed_wrong(a, rng) for _ in range(4)]
            found["accuracy"].append(100 * (1 - np.mean(seeds)))
            found["seed_sd"].append(np.std([100 * w.mean() for w in seeds], ddof=1))
            found["disagree_seeds"].append(np.sum(seeds[0] != seeds[1]))
            found["disagree_recipes"].append(np.sum(seeds[2] != self.seed_wrong(b, rng)))
        return {name: float(np.mean(values)) for name, values in found.items()}

    def shift_for(self, gain: float, rng: np.random.Generator) -> float:
        """The recipe shift whose population accuracy is `gain` points higher."""
        hardness = rng.normal(self.mean, self.sd, 400_000)
        twist = self.twist * rng.normal(size=hardness.size)
        base = expit(hardness + twist).mean()
        return brentq(lambda s: 100 * (base - expit(hardness + twist + s).mean()) - gain,
                      -5, 0)


def make_group(name: str, lr: float, errors: np.ndarray, seeds: int, world: World,
               rng: np.random.Generator, grown: Group | None = None) -> Group:
    """A group of `seeds` runs of one recipe, with per-image records of the validation set
    (the runs of `grown` and new seeds up to `seeds`)."""
    index = np.arange(len(errors), dtype=np.int64)
    label = np.zeros(len(errors), dtype=np.int64)
    confidence = np.full(len(errors), 0.9, dtype=np.float32)
    runs = list(grown.runs) if grown is not None else []
    for seed in range(len(runs) + 1, seeds + 1):
        records = Records(index, label, world.seed_wrong(errors, rng).astype(np.int64),
                          confidence)
        config = TrainConfig(lr=lr, seed=seed)
        runs.append(RunSummary(f"{name}-{seed}", f"{name}-{seed}", seed, "FINISHED", 6132, {},
                               {FINAL_VAL_ACC: records.accuracy, FINAL_GAP: 0.0}, config,
                               "sim", {"validation": records}))
    return Group(TrainConfig(lr=lr).config_group, tuple(runs))


@dataclass(frozen=True)
class Adaptive:
    """How one sequential sweep (or several in a row) ended: whether production moved, and
    the seeds trained per challenger group in the first sweep."""

    promoted: bool
    seeds: float


def until_decided(world: World, k: int, rng: np.random.Generator, gain_shift: float = 0.0,
                  calls: int = 1, base_n: int = 5, rounds: Rounds = DEFAULT_ROUNDS,
                  production: bool = True) -> Adaptive:
    """`sweep --until-decided` as the project runs it (rounds.call_round after each round,
    promotion.decide at the last round's share), `calls` times in a row with k new groups
    each against one production group of `base_n` seeds (the first group of the first sweep
    better by `gain_shift`). Without `production`: whether the first sweep called a sure
    winner among groups that are all alike."""
    rule = SelectionRule()
    hardness = rng.normal(world.mean, world.sd, world.images)
    base = (make_group("production", 1.0, world.recipe_errors(hardness, 0, rng), base_n,
                       world, rng) if production else None)
    looks, seeds = Looks(), 0.0
    for call in range(calls):
        lrs = [round(2 + call * k + j, 3) for j in range(k)]
        errors = {lr: world.recipe_errors(hardness, gain_shift if call == 0 and j == 0 else 0.0,
                                          rng) for j, lr in enumerate(lrs)}
        names = {TrainConfig(lr=lr).config_group: lr for lr in lrs}
        groups: dict[float, Group] = {}
        out: set[str] = set()
        more = list(names)
        judged = (Production("1", "production-1", "production-1", base, "", looks)
                  if base is not None else None)
        for target, share in zip(rounds.seeds, rounds.shares, strict=True):
            for name in more:
                lr = names[name]
                groups[lr] = make_group(f"g{lr}", lr, errors[lr], min(
                    groups[lr].n + rounds.per_round if lr in groups else target,
                    rounds.max_seeds), world, rng, groups.get(lr))
            eligible = [g for g in rank(list(groups.values()), rule) if rule.eligible(g)]
            pooled = pooled_over([*eligible, base], rule.metric)
            found = call_round(eligible, out, rule, pooled, judged, share, rounds.min_effect,
                               rounds.max_seeds)
            out |= set(found.out)
            more = list(found.more)
            if found.done:
                break
        if call == 0:
            seeds = sum(g.n for g in groups.values()) / k
        if base is None:
            return Adaptive(found.kind == DECIDED, seeds)
        verdict = decide(eligible, rule, pooled, judged, share)
        if verdict.moves:
            return Adaptive(True, seeds)
        looks = verdict.judgement.looks if verdict.judgement else looks
    return Adaptive(False, seeds)


def adaptive(world: World, replicates: int, seed: int, **kwargs: object
             ) -> tuple[float, float]:
    """(% of replicates that promoted, mean seeds per group to the call)."""
    rng = np.random.default_rng(seed)
    found = [until_decided(world, rng=rng, **kwargs) for _ in range(replicates)]
    return (100.0 * sum(f.promoted for f in found) / replicates,
            float(np.mean([f.seeds for f in found])))


def promotes(world: World, k: int, n: int, rng: np.random.Generator, gain_shift: float = 0.0,
             calls: int = 1, challenger_n: int = 0, gate: dict[str, int] | None = None,
             gain_call: int = 0) -> bool:
    """Whether any of `calls` successive compares promotes one of k new challengers per call
    over a production group of n seeds (the first challenger better by `gain_shift`); the
    challengers have `challenger_n` seeds each (0: n); the better one comes with call
    `gain_call` (0: the first). The verdict goes through McNemar's
    gate as compare's does (the registered run's model against production's run, the
    group's best, image by image); `gate` counts the promotions it vetoed."""
    rule = SelectionRule()
    hardness = rng.normal(world.mean, world.sd, world.images)
    base = make_group("production", 1.0, world.recipe_errors(hardness, 0, rng), n, world,
                      rng)
    looks, challengers = Looks(), []
    for call in range(calls):
        for j in range(k):
            shift = gain_shift if call == gain_call and j == 0 else 0.0
            lr = round(2 + call * k + j, 3)  # one recipe per group
            challengers.append(make_group(f"g{lr}", lr, world.recipe_errors(hardness, shift, rng),
                                          challenger_n or n, world, rng))
        production = Production("1", "production-1", "production-1", base, "", looks)
        eligible = [g for g in rank([*challengers, base], rule) if rule.eligible(g)]
        verdict = decide(eligible, rule, pooled_over([*eligible, base], rule.metric),
                         production)
        if verdict.moves:
            new, old = (rule.best_run(g).records["validation"] for g in (verdict.group, base))
            if check_models(verdict, mcnemar(new.correct, old.correct)).moves:
                return True
            if gate is not None:
                gate["vetoed"] = gate.get("vetoed", 0) + 1
        looks = verdict.judgement.looks if verdict.judgement else looks
    return False


def rate(world: World, replicates: int, seed: int, **kwargs: object) -> float:
    rng = np.random.default_rng(seed)
    return 100.0 * sum(promotes(world, rng=rng, **kwargs) for _ in range(replicates)) / replicates


def store_records(store: str, experiment: str) -> dict[str, np.ndarray]:
    """Which validation images each seed got wrong, by group (seeds × images, bool), for the
    groups of 2 or more seeds with per-image records among `experiment`'s runs in `store`."""
    import mlflow

    from mnist_mlflow.queries import find_runs, load_records

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mnist_mlflow.selection import group_runs

    mlflow.set_tracking_uri(store)
    runs, _ = find_runs(experiment, "")
    load_records(runs, ["validation"])
    groups = [g for g in group_runs(runs) if g.n >= 2 and g.recorded(FINAL_VAL_ACC)]
    return {g.name: np.stack([~r.records["validation"].correct for r in g.runs])
            for g in groups}


def fit_world(wrong: dict[str, np.ndarray], source: str) -> World:
    """The world whose recipes look like these runs (`store_records`): accuracy, seed sd and
    disagreements between seeds and between recipes."""
    accuracy = np.mean([100 * (1 - w.mean()) for w in wrong.values()])
    seed_sd = np.sqrt(np.mean([np.var(100 * (1 - w.mean(1)), ddof=1) for w in wrong.values()]))
    same = np.mean([np.sum(w[0] != w[1]) for w in wrong.values()])
    pairs = [(a, b) for i, a in enumerate(wrong.values()) for b in list(wrong.values())[i + 1:]]
    across = np.mean([np.sum(a[0] != b[0]) for a, b in pairs]) if pairs else same
    images = next(iter(wrong.values())).shape[1]
    print(f"real runs ({source}: {len(wrong)} groups of "
          f"{', '.join(str(len(w)) for w in wrong.values())} seeds, {images} validation "
          f"images): accuracy {accuracy:.2f}%, seed sd {seed_sd:.3f} points, two seeds of a "
          f"recipe disagree on {same:.1f} images, two recipes on {across:.1f}")
    rng = np.random.default_rng(0)
    best, best_loss = None, np.inf
    seed_images = seed_sd / 100 * images
    for mean in np.arange(-16, -3.9, 0.5):
        for sd in np.arange(1.0, 7.1, 0.5):
            for twist in np.arange(0.0, 2.1, 0.5):
                found = World(mean, sd, twist, seed_images, images).describe(rng, draws=4)
                loss = (((found["accuracy"] - accuracy) / 0.03) ** 2
                        + ((found["disagree_seeds"] - same) / 2) ** 2
                        + ((found["disagree_recipes"] - across) / 2) ** 2)
                if loss < best_loss:
                    best, best_loss = World(mean, sd, twist, seed_images, images), loss
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=float, nargs=4,
                        metavar=("MEAN", "SD", "TWIST", "SEED_SD"),
                        default=None, help="the simulated world (default: fitted to the "
                                           "shipped records)")
    parser.add_argument("--fit-store", default="", help="fit the world to the runs of this "
                                                        "tracking store")
    parser.add_argument("--fit-experiment", default="validated")
    parser.add_argument("--fit-file", default="",
                        help=f"fit the world to the per-image records in this file (default: "
                             f"{SHIPPED.relative_to(REPO)}, the records of real full-MNIST runs)")
    parser.add_argument("--export", default="", metavar="FILE",
                        help="with --fit-store: write its runs' records to FILE (.npz) and stop")
    parser.add_argument("--quick", action="store_true", help="k = 1 and 5 only")
    parser.add_argument("--sequential-only", action="store_true",
                        help="only the tables of `sweep --until-decided`")
    parser.add_argument("--first-round", type=int, default=DEFAULT_ROUNDS.first,
                        help="the sequential sweeps' first round, seeds per group")
    parser.add_argument("--epoch-seconds", type=float, default=EPOCH_SECONDS,
                        help="seconds an epoch of full MNIST takes, for the CPU hours")
    args = parser.parse_args()
    if args.export:
        wrong = store_records(args.fit_store, args.fit_experiment)
        np.savez_compressed(args.export, **wrong)
        print(f"wrote the records of {len(wrong)} groups to {args.export}")
        return
    if args.world:
        world = World(*args.world)
    elif args.fit_store:
        world = fit_world(store_records(args.fit_store, args.fit_experiment), args.fit_store)
    else:
        path = Path(args.fit_file) if args.fit_file else SHIPPED
        with np.load(path) as shipped:
            world = fit_world({name: shipped[name] for name in shipped.files}, path.name)
    shown = world.describe(np.random.default_rng(1))
    print(f"simulated world: hardness N({world.mean:g}, {world.sd:g}), recipe twist "
          f"{world.twist:g}, seed sd {world.seed_sd:.2f} images, {world.images} images: "
          f"accuracy {shown['accuracy']:.2f}%, seed sd "
          f"{shown['seed_sd']:.3f} points, seeds disagree on {shown['disagree_seeds']:.1f} "
          f"images, recipes on {shown['disagree_recipes']:.1f}")
    ks = (1, 5) if args.quick else KS
    began = time.perf_counter()
    rounds = dataclasses.replace(DEFAULT_ROUNDS, first=args.first_round).validate()
    worst, power_at_target = sequential_tables(world, args.replicates, args.seed,
                                               args.epoch_seconds, rounds)
    if args.sequential_only:
        print(f"\nsequential sweeps: worst false promotion {worst:.1f}% (target <= "
              f"{TARGET_FALSE:.0f}%), lowest power at +0.30 {power_at_target:.1f}% (target >= "
              f"{TARGET_POWER:.0f}%); {time.perf_counter() - began:.0f} s")
        return
    print(f"\nFalse promotions (%) under no true difference, {args.replicates} replicates each"
          f" (one compare | {CALLS} successive compares, k new groups each):")
    print("| k \\ n | " + " | ".join(f"n = {n}" for n in NS) + " |")
    print("|---|" + "---|" * len(NS))
    for k in ks:
        cells = []
        for n in NS:
            once = rate(world, args.replicates, args.seed + 10 * k + n, k=k, n=n)
            many = rate(world, args.replicates, args.seed + 1000 + 10 * k + n, k=k, n=n,
                        calls=CALLS)
            worst = max(worst, once, many)
            cells.append(f"{once:.1f} \\| {many:.1f}")
        print(f"| k = {k} | " + " | ".join(cells) + " |")
    print(f"\nOne-seed challengers against a production of {ONE_SEED_AGAINST} seeds, false "
          f"promotions (%), one compare | {CALLS} successive compares:")
    print("| k | one compare | " + f"{CALLS} compares |")
    print("|---|---|---|")
    for k in ks:
        once = rate(world, args.replicates, args.seed + 3000 + k, k=k, n=ONE_SEED_AGAINST,
                    challenger_n=1)
        many = rate(world, args.replicates, args.seed + 4000 + k, k=k, n=ONE_SEED_AGAINST,
                    challenger_n=1, calls=CALLS)
        worst = max(worst, once, many)
        print(f"| {k} | {once:.1f} | {many:.1f} |")
    print("\nPower (%): one challenger truly better, k = 1 and k = 5 (the others no better):")
    print("| gain | k | " + " | ".join(f"n = {n}" for n in NS) + " |")
    print("|---|---|" + "---|" * len(NS))
    for gain in GAINS:
        shift = world.shift_for(gain, np.random.default_rng(2))
        for k in (1, 5):
            cells = []
            for n in NS:
                found = rate(world, args.replicates, args.seed + 5000 + int(gain * 100) + n,
                             k=k, n=n, gain_shift=shift)
                if gain == 0.30 and n == 5 and k == 1:
                    power_at_target = min(power_at_target, found)
                cells.append(f"{found:.1f}")
            print(f"| +{gain:.2f} | {k} | " + " | ".join(cells) + " |")
    print("\nPower (%) at a later look: one challenger truly better by +0.30 arrives at look t "
          "(after t - 1 compares of one challenger no better), n = 5:")
    print("| t | " + " | ".join(f"t = {t}" for t in range(1, CALLS + 1)) + " |")
    print("|---|" + "---|" * CALLS)
    shift = world.shift_for(0.30, np.random.default_rng(2))
    cells = [rate(world, args.replicates, args.seed + 6500 + t, k=1, n=5, gain_shift=shift,
                  calls=t, gain_call=t - 1) for t in range(1, CALLS + 1)]
    print("| power | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print("\nMcNemar's gate, k = 1, n = 5: promotions made (%) and those the seed-and-image "
          "judgement made that the gate vetoed (its own model worse than production's image "
          "by image):")
    print("| gain | promoted | vetoed |")
    print("|---|---|---|")
    for gain in (0.0, *GAINS):
        shift = world.shift_for(gain, np.random.default_rng(2)) if gain else 0.0
        gate: dict[str, int] = {}
        found = rate(world, args.replicates, args.seed + 6000 + int(gain * 100), k=1, n=5,
                     gain_shift=shift, gate=gate)
        print(f"| +{gain:.2f} | {found:.1f} | "
              f"{100.0 * gate.get('vetoed', 0) / args.replicates:.1f} |")
    print(f"\nworst false-promotion rate {worst:.1f}% (target <= {TARGET_FALSE:.0f}%), "
          "sequential sweeps included: "
          f"{'met' if worst <= TARGET_FALSE else 'NOT met'}; power at +0.30, n = 5, k = 1, "
          f"and of the sequential sweeps (the lowest): {power_at_target:.1f}% "
          f"(target >= {TARGET_POWER:.0f}%): "
          f"{'met' if power_at_target >= TARGET_POWER else 'NOT met'}; "
          f"{time.perf_counter() - began:.0f} s")


def sequential_tables(world: World, replicates: int, seed: int, epoch_seconds: float,
                      rounds: Rounds) -> tuple[float, float]:
    """The tables of `sweep --until-decided` with these rounds; (the worst false promotion
    rate, the lowest power at +0.30), in %."""
    print(f"\nSequential sweeps (`sweep --until-decided`: {rounds.first} seeds, then "
          f"{rounds.per_round} a round to the groups in contention, at most "
          f"{rounds.max_seeds}; --min-effect {rounds.min_effect:g}), against a production of "
          f"{SEQUENTIAL_BASE} seeds, {replicates} replicates each.")
    print(f"\nFalse promotions (%) under no true difference: one sweep | {CALLS} successive "
          "sweeps (k new groups each), and the seeds per group it took:")
    print("| k | one sweep | 5 sweeps | seeds per group |")
    print("|---|---|---|---|")
    worst = 0.0
    null_seeds = {}
    for k in SEQUENTIAL_KS:
        once, null_seeds[k] = adaptive(world, replicates, seed + 7000 + k, k=k,
                                       base_n=SEQUENTIAL_BASE, rounds=rounds)
        many, _ = adaptive(world, replicates, seed + 8000 + k, k=k, base_n=SEQUENTIAL_BASE,
                           calls=CALLS, rounds=rounds)
        worst = max(worst, once, many)
        print(f"| {k} | {once:.1f} | {many:.1f} | {null_seeds[k]:.2f} |")
    print("\nPower (%) with one group truly better, and the seeds per group to the call, "
          f"against a fixed design of {FIXED_N} seeds (one compare; the ratio is the seeds "
          f"to the call over {FIXED_N}; CPU hours per group at {EPOCH_SECONDS_NOTE}):")
    print("| gain | k | power | seeds per group | fixed n = 5: power | seeds ratio | CPU h per "
          "group, sequential vs fixed |")
    print("|---|---|---|---|---|---|---|")
    lowest = 100.0
    hours = 20 * epoch_seconds / 3600  # one seed: 20 epochs
    for gain in (0.0, *GAINS):
        shift = world.shift_for(gain, np.random.default_rng(2)) if gain else 0.0
        for k in SEQUENTIAL_KS:
            if gain:
                power, seeds = adaptive(world, replicates, seed + 9000 + int(gain * 100) + k,
                                        k=k, base_n=SEQUENTIAL_BASE, gain_shift=shift,
                                        rounds=rounds)
                fixed = rate(world, replicates, seed + 9500 + int(gain * 100) + k, k=k,
                             n=FIXED_N, gain_shift=shift)
                if gain == 0.30:
                    lowest = min(lowest, power)
                cells = f"{power:.1f} | {seeds:.2f} | {fixed:.1f}"
            else:
                seeds = null_seeds[k]
                cells = f"(none to find) | {seeds:.2f} | -"
            print(f"| +{gain:.2f} | {k} | {cells} | {seeds / FIXED_N:.2f} | "
                  f"{seeds * hours:.2f} vs {FIXED_N * hours:.2f} |")
    print("\nNo production (the first promotion waits for the same call): a sure winner "
          "called (%) among groups that are all alike:")
    print("| k | called |")
    print("|---|---|")
    for k in (2, 5):
        # No promotion can be false here (the first goes to some group): by design at most
        # 5%, each round's one-sided level on either side of a pair; not a false promotion.
        called, _ = adaptive(world, replicates, seed + 9900 + k, k=k, production=False,
                             rounds=rounds)
        print(f"| {k} | {called:.1f} |")
    return worst, lowest


SEQUENTIAL_KS = (1, 2, 5)
SEQUENTIAL_BASE = 5
FIXED_N = 5
# A full-MNIST epoch of the 6,132-parameter network on one CPU thread (RESULTS.md, opt).
EPOCH_SECONDS = 28.0
EPOCH_SECONDS_NOTE = "20 epochs of --epoch-seconds each"

REPO = Path(__file__).resolve().parents[1]
# The per-image validation records of real full-MNIST runs the world is fitted to by
# default: which of the 5,000 validation images each seed got wrong, by group.
SHIPPED = REPO / "benchmarks" / "data" / "seed_phase_records.npz"

if __name__ == "__main__":
    main()
