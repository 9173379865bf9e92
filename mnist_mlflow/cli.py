"""Command line: `mnist-mlflow train ...`. Thin: parses options, calls the modules, maps errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from mnist_mlflow.config import DEVICES, PIPELINES, TrainConfig, UserError
from mnist_mlflow.models import MODELS
from mnist_mlflow.training import TrainingDiverged

DEFAULTS = TrainConfig()


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every training command shares, with the seed's defaults."""
    options = [
        click.option("--model", default=DEFAULTS.model, show_default=True,
                     help=f"Model variant: {', '.join(sorted(MODELS))}."),
        click.option("--dropout", type=float, default=DEFAULTS.dropout, show_default=True,
                     help="Dropout probability after each conv block but the first, in [0, 1)."),
        click.option("--epochs", type=int, default=DEFAULTS.epochs, show_default=True),
        click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True,
                     help="SGD learning rate."),
        click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True),
        click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True),
        click.option("--step-size", type=int, default=DEFAULTS.step_size, show_default=True,
                     help="StepLR: epochs between learning-rate decays."),
        click.option("--gamma", type=float, default=DEFAULTS.gamma, show_default=True,
                     help="StepLR: factor of each decay."),
        click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                     show_default=True),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True),
        click.option("--device", default=DEFAULTS.device, show_default=True,
                     help=f"{'|'.join(DEVICES)}; auto picks CUDA when available."),
        click.option("--pipeline", default=DEFAULTS.pipeline, show_default=True,
                     help=f"Input pipeline: {'|'.join(PIPELINES)} (torchvision is the seed's)."),
        click.option("--train-limit", type=int, default=0, show_default=True,
                     help="Train on the first N examples only (0: all)."),
        click.option("--test-limit", type=int, default=0, show_default=True,
                     help="Evaluate on the first N test examples only (0: all)."),
        click.option("--data-dir", default=lambda: os.environ.get("MNIST_DATA_DIR", "data"),
                     show_default="data/ or $MNIST_DATA_DIR",
                     help="Folder holding MNIST/raw (downloaded there when missing)."),
        click.option("--experiment", default="mnist-optimization", show_default=True,
                     help="MLflow experiment (under `mlflow run`, its --experiment-name wins)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def config_from(options: dict[str, Any]) -> TrainConfig:
    """Build the TrainConfig from the parsed options (ignoring those that are not settings)."""
    return TrainConfig(**{k: v for k, v in options.items() if k in TrainConfig.field_names()})


@click.group()
def cli() -> None:
    """Train, compare and promote compact MNIST CNNs, tracked with MLflow."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@cli.command()
@training_options
def train(**options: Any) -> None:
    """Train one variant as one MLflow run."""
    from mnist_mlflow.tracking import train_tracked

    config = config_from(options).validate()
    result = train_tracked(config, options["data_dir"], options["experiment"])
    click.echo(f"run {result.run_id} finished: final test_acc "
               f"{result.history[-1].test_acc:.2f}%")


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, no traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"Error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except TrainingDiverged as err:
        click.echo(f"Error: training diverged: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
