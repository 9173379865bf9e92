"""Where a sequential sweep stands after a round (rounds.call_round), on groups whose per-image
records are drawn with a known truth; and the share of the error allowance each round spends."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.promotion import Production, pooled_over
from mnist_mlflow.records import Records
from mnist_mlflow.rounds import (
    BEATEN,
    BEHIND,
    DECIDED,
    EQUAL,
    MORE,
    MOST,
    OPEN,
    PRODUCTION,
    SETTLED,
    UNDECIDABLE,
    call_round,
)
from mnist_mlflow.schema import FINAL_GAP, FINAL_VAL_ACC
from mnist_mlflow.selection import Group, RunSummary, SelectionRule, rank
from mnist_mlflow.stats import Looks, round_seeds, round_shares

IMAGES = 2000
RULE = SelectionRule()


def group(lr: float, error: float, seeds: int, rng: np.random.Generator) -> Group:
    """`seeds` runs of one recipe that err on each validation image with probability `error`,
    each seed on its own images."""
    config = TrainConfig(lr=lr, val_size=IMAGES)
    runs = []
    for seed in range(1, seeds + 1):
        wrong = rng.random(IMAGES) < error
        records = Records(np.arange(IMAGES), np.zeros(IMAGES, dtype=np.int64),
                          wrong.astype(np.int64), np.full(IMAGES, 0.9, dtype=np.float32))
        runs.append(RunSummary(f"lr{lr}-{seed}", f"lr{lr}-{seed}", seed, "FINISHED", 6132, {},
                               {FINAL_VAL_ACC: records.accuracy, FINAL_GAP: 0.0},
                               TrainConfig(lr=lr, seed=seed, val_size=IMAGES), "same",
                               {"validation": records}))
    return Group(config.config_group, tuple(runs))


def call(groups: list[Group], production: Group | None = None, out: frozenset[str] = frozenset(),
         share: float = 1.0, min_effect: float = 0.10, max_seeds: int = 10):  # noqa: ANN201
    eligible = rank(groups, RULE)
    pooled = pooled_over([*eligible, production], FINAL_VAL_ACC)
    judged = Production("1", "p", "p", production, "", Looks()) if production else None
    return call_round(eligible, out, RULE, pooled, judged, share, min_effect, max_seeds)


def test_a_clear_winner_is_decided_and_the_beaten_group_can_no_longer_win() -> None:
    rng = np.random.default_rng(1)
    a, b = group(0.01, 0.01, 3, rng), group(0.02, 0.04, 3, rng)
    found = call([b, a])
    assert found.kind == DECIDED and found.done
    assert found.best.name == a.name
    assert [p.state for p in found.pairs] == [BEATEN]
    assert found.out == (b.name,) and found.more == ()
    assert "beats it" in found.sentence(0.10)


def test_a_close_call_gets_more_seeds_while_the_most_allowed_would_likely_decide_it() -> None:
    rng = np.random.default_rng(2)
    a, b = group(0.01, 0.020, 3, rng), group(0.02, 0.025, 3, rng)
    found = call([a, b], share=0.4)
    assert found.kind == MORE and not found.done
    assert [p.state for p in found.pairs] == [OPEN]
    assert set(found.more) == {a.name, b.name} and found.out == ()
    # The same evidence when the groups have every seed allowed: it ends, undecided.
    capped = call([a, b], share=0.4, max_seeds=3)
    assert capped.kind == MOST and capped.more == () and capped.done


def test_no_difference_worth_acting_on_or_none_seeds_can_show_ends_the_rounds() -> None:
    rng = np.random.default_rng(3)
    a, b = group(0.01, 0.02, 4, rng), group(0.02, 0.02, 4, rng)
    equal = call([a, b], min_effect=1.5)
    assert equal.kind == SETTLED and [p.state for p in equal.pairs] == [EQUAL]
    assert "no difference as large as 1.5 points" in equal.sentence(1.5)
    # Where even a difference a standard error larger than the one seen needs more seeds than
    # allowed: more would likely not decide it.
    beyond = call([a, b], min_effect=0.01, max_seeds=5)
    assert beyond.kind == SETTLED and [p.state for p in beyond.pairs] == [UNDECIDABLE]
    assert "more seeds would likely not decide it" in beyond.sentence(0.01)


def test_production_is_one_more_side_to_beat_and_a_better_production_ends_it() -> None:
    rng = np.random.default_rng(4)
    a, b = group(0.01, 0.01, 3, rng), group(0.02, 0.04, 3, rng)
    worse = group(0.03, 0.05, 3, rng)
    found = call([a, b], production=worse)
    assert found.kind == DECIDED
    assert [(p.other, p.state) for p in found.pairs] == [(b.name, BEATEN), (PRODUCTION, BEATEN)]
    # Production as good: no gain as large as 1.5 points over it can remain, whatever its sign.
    alike = group(0.05, 0.01, 3, rng)
    found = call([a, b], production=alike, min_effect=1.5)
    assert found.kind == SETTLED
    assert dict((p.other, p.state) for p in found.pairs)[PRODUCTION] == EQUAL
    assert "no gain as large as 1.5 points over it" in found.sentence(1.5)
    better = group(0.04, 0.002, 3, rng)
    found = call([a, b], production=better)
    assert found.kind == SETTLED
    assert dict((p.other, p.state) for p in found.pairs)[PRODUCTION] == BEHIND


def test_groups_out_of_contention_are_not_judged_again() -> None:
    rng = np.random.default_rng(5)
    a, b, c = (group(0.01, 0.020, 3, rng), group(0.02, 0.025, 3, rng),
               group(0.03, 0.06, 3, rng))
    found = call([a, b, c], out=frozenset({c.name}), share=0.4)
    assert [p.other for p in found.pairs] == [b.name]
    assert c.name not in found.more


def test_the_rounds_shares_spend_the_whole_allowance_front_loaded() -> None:
    assert round_seeds(3, 2, 10) == [3, 5, 7, 9, 10]
    assert round_seeds(3, 2, 3) == [3] and round_seeds(2, 5, 4) == [2, 4]
    shares = round_shares(round_seeds(3, 2, 10))
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] > 0.4 and all(later > 0 for later in shares)
    assert shares == sorted(shares, reverse=True)
