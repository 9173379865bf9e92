"""The shape the code keeps: one module builds the MLflow client, every key a run records is
written in schema.py alone, and the import layers hold (lint-imports checks them in CI)."""

from __future__ import annotations

import ast
from pathlib import Path

from mnist_mlflow.config import TrainConfig
from mnist_mlflow.schema import RECORD

PACKAGE = Path(__file__).resolve().parents[1] / "mnist_mlflow"
# What is not code that writes to a store: the key catalogue itself, and the page renderer.
KEY_HOMES = {"schema.py", "reference.py"}


def modules() -> list[tuple[str, ast.Module]]:
    return [(path.name, ast.parse(path.read_text())) for path in sorted(PACKAGE.glob("*.py"))]


def docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)):
            found.add(id(body[0].value))
    return found


def test_one_module_builds_the_mlflow_client() -> None:
    builders = {name for name, tree in modules() for node in ast.walk(tree)
                if isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "MlflowClient"}
    assert builders == {"store.py"}, f"MlflowClient() built in {sorted(builders)}"


def test_no_recorded_key_is_spelled_outside_schema() -> None:
    # Settings are TrainConfig's fields, named in config.py (and `lr` is torch's key too);
    # one-word keys (`verdict`, `seeds`) are also everyday names, which the writers' check
    # below covers where they are written.
    keys = {r.key for r in RECORD if "_" in r.key or "." in r.key} - set(
        TrainConfig.field_names())
    found = []
    for name, tree in modules():
        if name in KEY_HOMES:
            continue
        skip = docstrings(tree)
        found += [f"{name}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in skip and node.value in keys]
    assert not found, "keys spelled outside schema.py: " + ", ".join(found)


# What writes a run's, a version's or an experiment's keys: a dict literal given to one of
# these has its keys from schema.py, never spelled.
WRITERS = {"set_tags", "log_metrics", "log_new_params", "log_params", "create",
           "create_or_adopt", "adopt", "register_run"}
KEY_SETTERS = {"set_tag": 0, "set_model_version_tag": 2, "set_experiment_tag": 1}


def spelled_keys(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = getattr(call.func, "attr", getattr(call.func, "id", ""))
        if name in WRITERS:
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                found += [(key.lineno, key.value) for d in ast.walk(arg)
                          if isinstance(d, ast.Dict) for key in d.keys
                          if isinstance(key, ast.Constant) and isinstance(key.value, str)]
        position = KEY_SETTERS.get(name)
        if position is not None and len(call.args) > position:
            key = call.args[position]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.append((key.lineno, key.value))
    return found


def test_every_key_written_comes_from_schema() -> None:
    found = [f"{name}:{line} {key!r}" for name, tree in modules() if name not in KEY_HOMES
             for line, key in spelled_keys(tree)]
    assert not found, "keys written without schema.py's name: " + ", ".join(found)


def test_the_guard_finds_a_spelled_key() -> None:
    """The scan above sees a literal where one is written."""
    tree = ast.parse('run.set_tags({"config_group": "x", KEY: 1})\n'
                     'client.set_model_version_tag(name, version, "verdict", text)')
    keys = {r.key for r in RECORD}
    assert sorted(n.value for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in keys) == ["config_group", "verdict"]
    assert sorted(spelled_keys(tree)) == [(1, "config_group"), (2, "verdict")]
