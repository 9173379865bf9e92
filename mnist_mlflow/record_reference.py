"""The run record reference page, rendered from what `schema.py` declares.

    python -m mnist_mlflow.record_reference > docs/run-record.md

A test renders it again and compares, so the page cannot drift from the code.
"""

from __future__ import annotations

from mnist_mlflow.schema import RECORD, RECORDS

INTRO = """\
# Run record reference

Every tag, param, metric and artifact that mnist-mlflow writes, by what carries it. This page
is generated from `mnist_mlflow/schema.py` (`python -m mnist_mlflow.record_reference >
docs/run-record.md`) and a test fails when the two disagree.

Besides these keys, each training run carries what MLflow records itself: its run name, the
`mlflow.source.*` tags (the git commit among them), its datasets (MNIST train, validation and
test slices, with digests from the files' MD5 and the held-out indices) and its logged model,
named for the run (`models:/<model_id>`), which carries the run's params and summary metrics.
"""

KINDS = ("tag", "param", "metric", "artifact")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The whole page, Markdown."""
    lines = [INTRO]
    for on in RECORDS:
        entries = [r for r in RECORD if r.on == on]
        if not entries:
            continue
        lines += [f"## {on[0].upper()}{on[1:]}", "", "| key | kind | what it holds |",
                  "|---|---|---|"]
        for kind in KINDS:
            lines += [f"| `{r.key}` | {kind} | {_cell(r.meaning)} |"
                      for r in entries if r.kind == kind]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
