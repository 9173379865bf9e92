import pytest
import torch
from torch import nn

from mnist_mlflow.models import MODELS, InferenceModel, build_model, count_parameters


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_seed_network_has_6132_parameters(dropout: float) -> None:
    assert count_parameters(build_model("opt", dropout)) == 6132


def test_dropout_follows_every_conv_block_but_the_first() -> None:
    dropouts = [m for m in build_model("opt", 0.05).modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 and all(m.p == 0.05 for m in dropouts)
    assert not any(isinstance(m, nn.Dropout) for m in build_model("opt", 0.0).modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_model_returns_probabilities(name: str) -> None:
    model = InferenceModel(build_model(name, 0.0)).eval()
    probabilities = model(torch.rand(3, 1, 28, 28))
    assert probabilities.shape == (3, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
