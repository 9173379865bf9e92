"""The documentation held to the code: commands and options that exist, links that resolve,
the run record reference equal to what schema.py declares, one version everywhere."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import mnist_mlflow
from mnist_mlflow.cli import cli
from mnist_mlflow.phases import PHASES
from mnist_mlflow.reference import OPTIONS_PAGE, RUN_RECORD_PAGE, run_record, with_options

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted([README, REPO / "RESULTS.md", REPO / "CHANGELOG.md",
                REPO / "benchmarks" / "README.md", *(REPO / "docs").rglob("*.md")])
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Where a command's options end on a line: another command, a comment, a pipe.
COMMAND_END = re.compile(r"&&|\|\||;|\||#|\$\(")


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def code_of(text: str) -> list[str]:
    """The lines of fenced blocks and the inline code spans: where commands are written."""
    blocks = [line for block in FENCE.findall(text) for line in block.splitlines()]
    prose = FENCE.sub("", text)
    return blocks + INLINE.findall(prose)


def commands_in(code: str) -> list[tuple[str, list[str]]]:
    """Each `mnist-mlflow SUBCOMMAND --opt ...` in a line of code: the subcommand and the
    options given to it."""
    found = []
    for match in re.finditer(r"mnist-mlflow((?:\s+--?[a-z][\w-]*)*)(?:\s+([a-z][a-z-]*))?",
                             code):
        rest = code[match.end():]
        rest = rest[:end.start()] if (end := COMMAND_END.search(rest)) else rest
        leading = match.group(1).split()
        options = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
        found.append((match.group(2) or "", leading + options))
    return found


def options_of(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


def test_readme_opens_with_the_two_commands_and_stays_short() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first, second = FENCE.findall(text)[:2]
    assert "pip install -e ." in first and "mlflow run ." in first, first
    assert 'pip install -e ".[test]"' in second and "pytest" in second, second
    # Nothing but the title, one paragraph and a sentence before the first command.
    assert text.index("```") < 1200


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_command_and_option_named_exists(page: Path) -> None:
    problems = []
    for code in code_of(page.read_text()):
        for sub, options in commands_in(code):
            if sub and sub not in cli.commands:
                problems.append(f"`mnist-mlflow {sub}`: no such command")
                continue
            known = options_of(cli.commands[sub]) if sub else options_of(cli) | {"--version"}
            problems += [f"`mnist-mlflow {sub} {option}`: no such option"
                         for option in options if option not in known]
    assert not problems, f"{_name(page)}: " + "; ".join(problems)


def test_the_commands_and_options_found_are_the_ones_written() -> None:
    """The parser above finds commands where they are: a guard for the test itself."""
    assert commands_in("mnist-mlflow sweep --phase gap --seeds 1,2 && pytest -q") == [
        ("sweep", ["--phase", "--seeds"])]
    assert commands_in("mnist-mlflow --version") == [("", ["--version"])]
    assert commands_in("see `mnist-mlflow compare` # --nope") == [("compare", [])]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_mlflow_run_parameter_named_exists(page: Path) -> None:
    text = (REPO / "MLproject").read_text()
    project = yaml.safe_load(text)
    known = {name for entry in project["entry_points"].values()
             for name in entry.get("parameters", {})}
    # Undeclared parameters that MLproject's comments say are passed on (MLflow appends them).
    known |= {name for comment in re.findall(r"#.*", text)
              for name in re.findall(r"-P (\w+)=", comment)}
    named = {name for code in code_of(page.read_text()) if "mlflow run" in code
             for name in re.findall(r"-P\s+(\w+)=", code)}
    assert named <= known, f"{_name(page)}: unknown -P {sorted(named - known)}"


def slug(title: str) -> str:
    """A heading's anchor as GitHub and MkDocs both make it."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text.replace("`", "")).strip().lower()
    return re.sub(r"[\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(title) for title in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves(page: Path) -> None:
    problems = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            problems.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            problems.append(f"{target}: no heading #{anchor}")
    assert not problems, f"{_name(page)}: " + "; ".join(problems)


def test_the_run_record_reference_is_what_schema_declares() -> None:
    assert RUN_RECORD_PAGE.read_text() == run_record(), (
        "docs/run-record.md is stale: run python -m mnist_mlflow.reference --write")


def test_the_train_options_table_is_what_the_command_has() -> None:
    page = OPTIONS_PAGE.read_text()
    assert page == with_options(page), (
        "the options table of docs/training.md is stale: run "
        "python -m mnist_mlflow.reference --write")


def test_every_docs_page_is_in_the_site_nav() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)

    def leaves(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, dict):
            return [page for value in nav.values() for page in leaves(value)]
        return [page for item in nav for page in leaves(item)]

    in_nav = set(leaves(config["nav"]))
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages <= in_nav, f"not in mkdocs.yml's nav: {sorted(pages - in_nav)}"


def test_one_version_everywhere() -> None:
    # tomllib is Python 3.11's: the [project] table's version line, read plainly.
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert declared and declared.group(1) == mnist_mlflow.__version__
    assert result.output.strip() == f"mnist-mlflow, version {mnist_mlflow.__version__}"
    assert f"## [{mnist_mlflow.__version__}]" in (REPO / "CHANGELOG.md").read_text()


def test_results_say_how_each_recipe_was_chosen() -> None:
    """RESULTS.md prints each phase's `chosen_by` as phases.py says it (test figures named)."""
    results = (REPO / "RESULTS.md").read_text()
    for name, phase in PHASES.items():
        if f"## Phase `{name}`" in results:
            assert phase.chosen_by in results, name
