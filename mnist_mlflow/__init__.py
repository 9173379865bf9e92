"""MLflow-tracked experiment registry for compact MNIST CNNs."""

__version__ = "0.2.0"
