import pytest
import torch
from torch import nn

from mnist_mlflow.data import build_pipeline, load_mnist
from mnist_mlflow.models import MODELS, GlobalAvgPool, InferenceModel, build_model, count_parameters
from mnist_mlflow.runtime import resolve
from mnist_mlflow.training import create_state, fit
from tests.conftest import tiny_config

# Every variant's parameter count, and the budget it was designed for.
PARAMETERS = {"opt": (6132, 8000), "gap8k": (7580, 8000), "gap5k": (4974, 5000)}


def test_every_variant_has_its_parameter_count() -> None:
    assert set(PARAMETERS) == set(MODELS)
    for name, (count, budget) in PARAMETERS.items():
        for dropout in (0.0, 0.05):  # dropout adds no parameters
            assert count_parameters(build_model(name, dropout)) == count < budget, name


def test_docstrings_state_the_parameter_count() -> None:
    for name, (count, _) in PARAMETERS.items():
        builder = MODELS[name]
        doc = builder.__doc__ or type(builder(0.0)).__doc__ or ""
        assert f"{count:,}" in doc, name


def test_dropout_follows_every_conv_block_but_the_first() -> None:
    dropouts = [m for m in build_model("opt", 0.05).modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 and all(m.p == 0.05 for m in dropouts)
    assert not any(isinstance(m, nn.Dropout) for m in build_model("opt", 0.0).modules())


def test_gap_variants_end_in_global_average_pooling_not_a_dense_head() -> None:
    for name in ("gap8k", "gap5k"):
        model = build_model(name, 0.05)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        # A plain mean over height and width (AdaptiveAvgPool2d's CUDA backward is not
        # deterministic); what it computes is checked in test_cuda_ready.
        assert any(isinstance(m, GlobalAvgPool) for m in model.modules())
        assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_model_returns_probabilities(name: str) -> None:
    model = InferenceModel(build_model(name, 0.0)).eval()
    probabilities = model(torch.rand(3, 1, 28, 28))
    assert probabilities.shape == (3, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_variant_trains_one_epoch_on_a_slice(mnist_root, name: str) -> None:
    config = tiny_config(model=name, dropout=0.05, epochs=1, train_limit=2048, test_limit=500,
                         lr=0.05)
    data = load_mnist(mnist_root, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config, data, resolve(config))
    state = create_state(config, resolve(config), pipeline.steps_per_epoch)
    before = [p.detach().clone() for p in state.model.parameters()]
    (epoch,) = fit(config, state, pipeline, progress=False)
    assert epoch.test_acc > 30.0  # far above chance (10%) after one pass over 2,048 digits
    assert all(not torch.equal(a, b) for a, b in zip(before, state.model.parameters(),
                                                         strict=True))
