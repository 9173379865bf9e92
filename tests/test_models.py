import pytest
import torch
from torch import nn

from mnist_mlflow.data import build_pipeline, load_mnist
from mnist_mlflow.models import (
    MODELS,
    Dropout,
    GlobalAvgPool,
    InferenceModel,
    build_model,
    count_parameters,
    dropout_mask,
)
from mnist_mlflow.runtime import resolve
from mnist_mlflow.training import create_state, fit
from tests.conftest import tiny_config

# Every variant's parameter count, and the limit it was designed for.
PARAMETERS = {"opt": (6132, 8000), "gap8k": (7580, 8000), "gap5k": (4974, 5000),
              "gap3k": (2800, 3000), "gap3k-late": (2998, 3000)}


def test_every_variant_has_its_parameter_count() -> None:
    assert set(PARAMETERS) == set(MODELS)
    for name, (count, limit) in PARAMETERS.items():
        for dropout in (0.0, 0.05):  # dropout adds no parameters
            assert count_parameters(build_model(name, dropout)) == count < limit, name


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
    for name in (name for name in MODELS if name.startswith("gap")):
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
    config = tiny_config(model=name, dropout=0.05, epochs=1, train_limit=4096, test_limit=500,
                         lr=0.05)
    data = load_mnist(mnist_root, config.train_limit, config.test_limit)
    pipeline = build_pipeline(config, data, resolve(config))
    state = create_state(config, resolve(config), pipeline.steps_per_epoch)
    before = [p.detach().clone() for p in state.model.parameters()]
    (epoch,) = fit(config, state, pipeline, progress=False)
    assert epoch.test_acc > 30.0  # far above chance (10%) after one pass over 4,096 digits
    assert all(not torch.equal(a, b) for a, b in zip(before, state.model.parameters(),
                                                         strict=True))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9, 1e-5])
def test_dropout_masks_drop_each_element_with_probability_p_and_scale_the_rest(
        p: float) -> None:
    torch.manual_seed(0)
    masks = torch.stack([dropout_mask(torch.Size((64, 10, 24, 24)), p) for _ in range(20)])
    values = masks.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - p))]
    dropped = (masks == 0).double()
    # Within 4 standard deviations of p, overall and in each of the 4 lanes of 16 bits drawn
    # from one int64 (a lane with a constant bit would drop at another rate).
    for part in (dropped.flatten(), *dropped.flatten().view(-1, 4).T):
        sd = (p * (1 - p) / part.numel()) ** 0.5
        assert abs(part.mean().item() - p) < 4 * sd, (part.mean().item(), p)
    # Neighbours independent: both dropped as often as p * p.
    pairs = (dropped.flatten()[1:] * dropped.flatten()[:-1])
    assert abs(pairs.mean().item() - p * p) < 4 * (p * p / pairs.numel()) ** 0.5 + 1e-9


def test_the_fast_dropout_is_nn_dropout_to_the_model_and_its_gradient() -> None:
    torch.manual_seed(1)
    layer = Dropout(0.05)
    assert isinstance(layer, nn.Dropout) and layer.state_dict() == {}
    leaf = torch.rand(8, 10, 12, 12, requires_grad=True)
    x = leaf + 0.01  # no zeros of its own: a zero out is a dropped element
    y = layer(x)
    kept = y.detach() != 0
    assert 0.9 < kept.double().mean().item() < 0.99
    assert torch.allclose(y[kept], x[kept] / 0.95)
    y.backward(torch.ones_like(y))
    # What is dropped forward gets no gradient back; the rest the same scale.
    assert torch.allclose(leaf.grad, kept.float() / 0.95)
    layer.eval()
    assert torch.equal(layer(x), x)
    # Same seed, same masks: runs repeat; and a model trained with it saves as nn.Dropout's.
    torch.manual_seed(2)
    first = dropout_mask(x.shape, 0.05)
    torch.manual_seed(2)
    assert torch.equal(first, dropout_mask(x.shape, 0.05))
    fast, plain = build_model("opt", 0.05), build_model("opt", 0.05)
    for index, module in enumerate(plain.features):
        if isinstance(module, Dropout):
            plain.features[index] = nn.Dropout(0.05)
    assert fast.state_dict().keys() == plain.state_dict().keys()
