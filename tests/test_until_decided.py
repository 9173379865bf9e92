"""`sweep --until-decided`: seeds trained in rounds until the call is made, each round visible
on the parent and its children, a stopped sweep resumed round by round, the last compare
registering as `compare --register` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.phases import over_seeds
from mnist_mlflow.schema import ROLE_TAG, ROUND_BEST, ROUND_TAG, ROUNDS_ARTIFACT, ROUNDS_TAG
from mnist_mlflow.sequential import Rounds, run_until_decided
from mnist_mlflow.sweep import LocalExecutor, parse_variants, sweep_configs
from tests.helpers import children_of, run_cli, runs_of

# Dropout 0.5 after one epoch of a slice trails no dropout by tens of points, with seeds far
# apart: two seeds do not settle it at the first round's share, four do.
SLICE = {"epochs": 1, "train_limit": 2048, "test_limit": 300, "val_size": 1000, "lr": 0.05,
         "threads": "1", "device": "cpu"}
ROUNDS = Rounds(first=2, per_round=1, max_seeds=5, min_effect=1.0)


class StopsAtRound(LocalExecutor):
    """Trains in this process, as `--workers 1` does, and is stopped (as by Ctrl-C) when
    round `at` begins."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.rounds, self.at = 0, at

    def run(self, jobs, data_dir, progress):  # noqa: ANN001, ANN201
        self.rounds += 1
        if self.rounds == self.at:
            raise KeyboardInterrupt
        yield from super().run(jobs, data_dir, progress)


def test_a_stopped_sequential_sweep_resumes_its_rounds_until_decided_and_registers(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = "until-decided"
    configs = over_seeds(sweep_configs(TrainConfig(**SLICE),
                                       parse_variants(["opt:0", "opt:0.5"])), [1, 2])
    with pytest.raises(KeyboardInterrupt):
        run_until_decided(configs, ROUNDS, mnist_root, experiment, progress=False,
                          executor=StopsAtRound(2))
    (parent,) = [r for r in runs_of(experiment) if r.data.tags.get(ROLE_TAG) == "sweep"]
    parent_id = parent.info.run_id
    # Stopped as round 2 began: round 1 called and shown, round 2's children waiting.
    assert parent.info.status == "KILLED"
    assert parent.data.tags[ROUNDS_TAG].startswith("round 1 of at most 4: more seeds; next: 1 "
                                                   "more seeds for ")
    assert ("**Until decided**: round 1 of at most 4: more seeds; next: 1 more seeds for "
            in parent.data.tags["mlflow.note.content"])
    assert "\n- Round 1 (2 seeds a group, 52% of" in parent.data.tags["mlflow.note.content"]
    waiting = [c for c in children_of(experiment, parent_id) if c.data.tags[ROUND_TAG] == "2"]
    assert len(waiting) == 2 and {c.info.status for c in waiting} == {"SCHEDULED"}

    code, out, err = run_cli(["sweep", "--resume", parent_id, "--workers", "1",
                              "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code == 0, err
    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    calls = json.loads(Path(client.download_artifacts(parent_id, ROUNDS_ARTIFACT)).read_text())
    assert len(calls) >= 2 and [c["round"] for c in calls] == list(range(1, len(calls) + 1))
    assert [c["kind"] for c in calls[:-1]] == ["more seeds"] * (len(calls) - 1)
    assert calls[-1]["kind"] == "decided" and calls[-1]["best"].startswith("opt e1")
    for call in calls:
        assert f"Round {call['round']}: {call['sentence']}" in out
    # Every child trained once, seeds in order, each tagged with its round.
    children = children_of(experiment, parent_id)
    assert {c.info.status for c in children} == {"FINISHED"}
    by_group: dict[str, list[tuple[int, str]]] = {}
    for child in children:
        by_group.setdefault(child.data.tags["config_group"], []).append(
            (int(child.data.params["seed"]), child.data.tags[ROUND_TAG]))
    for seeds in by_group.values():
        assert [s for s, _ in sorted(seeds)] == list(range(1, len(seeds) + 1))
        assert [r for _, r in sorted(seeds)][:2] == ["1", "1"]
        assert [int(r) for _, r in sorted(seeds)][2:] == list(range(2, len(seeds)))
    most = max(len(seeds) for seeds in by_group.values())
    assert parent.info.run_name == f"sweep opt, opt d0.5 s1-{most}"
    # The leader's mean by round, and where it ended, on the parent.
    history = client.get_metric_history(parent_id, ROUND_BEST)
    assert [m.step for m in history] == list(range(1, len(calls) + 1))
    beaten = TrainConfig(**SLICE, dropout=0.5).config_group
    assert parent.data.tags[ROUNDS_TAG] == (f"round {len(calls)} of at most 4: decided "
                                            f"({beaten}: beaten)")
    # The last compare registered the winner and, the registry being empty, promoted it.
    assert "Registered run: s" in out and "Production -> version 1" in out
    comparison = [r for r in runs_of(experiment) if r.data.tags.get(ROLE_TAG) == "comparison"]
    assert len(comparison) == 1
    assert comparison[0].data.params["filter"] == f"tags.`mlflow.parentRunId` = '{parent_id}'"
    version = client.get_model_version_by_alias("mnist-cnn", "production")
    assert client.get_run(version.run_id).data.tags["config_group"] == calls[-1]["best"]


@pytest.mark.parametrize(("args", "says"), [
    (["--first-round", "1"], "invalid --first-round: at least 2 seeds"),
    (["--round-seeds", "0"], "invalid --round-seeds: at least 1"),
    (["--max-seeds", "2"], "invalid --max-seeds: at least the first round's 3"),
    (["--min-effect", "0"], "invalid --min-effect: must be > 0 points"),
    (["--seeds", "1,2", "--max-seeds", "1"], "invalid --max-seeds: at least the first round's 2"),
])
def test_bad_rounds_are_one_line_before_any_run(
        args: list[str], says: str, store: str, mnist_root: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["sweep", "--until-decided", *args, "--experiment", "bad-rounds",
                            "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code != 0
    assert says in err and len(err.strip().splitlines()) == 1
    assert runs_of("bad-rounds") == []


def test_the_rounds_options_without_until_decided_are_one_line(
        store: str, mnist_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["sweep", "--max-seeds", "6", "--min-effect", "0.2", "--experiment",
                            "no-rounds", "--data-dir", str(mnist_root)], capsys, monkeypatch)
    assert code != 0
    assert "--max-seeds, --min-effect apply only with --until-decided" in err
    assert len(err.strip().splitlines()) == 1 and runs_of("no-rounds") == []
