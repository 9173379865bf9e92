"""The fast input pipeline against the seed's: same rotation, every example once, both log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from torchvision import transforms
from torchvision.transforms import functional as TF

from mnist_mlflow.config import TrainConfig, UserError
from mnist_mlflow.data import (
    Augmentation,
    FastPipeline,
    MnistData,
    affine_batch,
    build_pipeline,
    chunk_images,
    load_mnist,
)
from mnist_mlflow.runtime import resolve
from mnist_mlflow.training import EpochMetrics, create_state, fit
from tests.conftest import tiny_config, use_store
from tests.helpers import train_one

ANGLES = [-7.0, -3.3, 0.0, 1.7, 5.0, 7.0]
# Nearest-neighbour rotations disagree only where a sampling point falls on a pixel edge.
# Measured on 256 digits: identical to torchvision's tensor rotate, and at most 0.11% of
# pixels differ from PIL's (which rounds its inverse matrix differently).
MAX_DIFFERING_PIXELS = 0.01


@pytest.fixture(scope="module")
def data(mnist_root: Path) -> MnistData:
    return load_mnist(mnist_root, train_limit=3000, test_limit=500)


@pytest.fixture(scope="module")
def digits(data: MnistData) -> torch.Tensor:
    """Sixteen test digits as uint8 (16, 1, 28, 28)."""
    return data.test_tensors()[0][:16].unsqueeze(1)


def ours(digits: torch.Tensor, angle: float) -> torch.Tensor:
    rotated = affine_batch(digits.float(), torch.full((len(digits),), angle))
    return rotated.round().to(torch.uint8)


def differing_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


@pytest.mark.parametrize("angle", ANGLES)
def test_batched_rotation_matches_torchvision_tensor_rotate(digits: torch.Tensor,
                                                            angle: float) -> None:
    reference = TF.rotate(digits, angle, interpolation=TF.InterpolationMode.NEAREST, fill=0)
    assert differing_fraction(ours(digits, angle), reference) <= MAX_DIFFERING_PIXELS


@pytest.mark.parametrize("angle", ANGLES)
def test_batched_rotation_matches_the_seeds_pil_random_rotation(digits: torch.Tensor,
                                                                angle: float) -> None:
    # The seed's transform, pinned to one angle, on PIL images as its DataLoader sees them.
    rotation = transforms.RandomRotation((angle, angle), fill=0)
    reference = torch.stack([TF.pil_to_tensor(rotation(TF.to_pil_image(d))) for d in digits])
    assert differing_fraction(ours(digits, angle), reference) <= MAX_DIFFERING_PIXELS


def test_rotation_turns_counter_clockwise() -> None:
    # A dot right of centre goes up (smaller row index) for a positive angle, as in torchvision.
    image = torch.zeros(1, 1, 29, 29)
    image[0, 0, 14, 24] = 1.0
    rotated = affine_batch(image, torch.tensor([90.0]))
    assert rotated[0, 0, 4, 14] == 1.0 and rotated.sum() == 1.0


@pytest.mark.parametrize(("angle", "scale", "shift"), [
    (0.0, 1.0, (3, -2)), (5.0, 1.1, (0, 0)), (-7.0, 0.9, (-3, 4)), (3.0, 1.08, (2, -2)),
])
def test_batched_affine_matches_torchvision_affine(digits: torch.Tensor, angle: float,
                                                   scale: float, shift: tuple[int, int]) -> None:
    reference = TF.affine(digits, angle=angle, translate=list(shift), scale=scale, shear=[0.0],
                          interpolation=TF.InterpolationMode.NEAREST, fill=0)
    count = len(digits)
    # TF.affine turns clockwise for a positive angle, rotate (and ours) counter-clockwise;
    # RandomAffine draws angles symmetric about 0, so the two augment alike.
    ours = affine_batch(digits.float(), torch.full((count,), -angle),
                        torch.full((count,), scale), torch.tensor([shift] * count).float())
    assert differing_fraction(ours.round().to(torch.uint8), reference) <= MAX_DIFFERING_PIXELS


def test_affine_augmentation_keeps_every_example_once_and_follows_the_seed(
        data: MnistData) -> None:
    augmentation = Augmentation(rotation=7.0, translate=0.1, scale=0.1)
    pipeline = FastPipeline(data, 256, torch.device("cpu"), augmentation)
    plain = FastPipeline(data, 256, torch.device("cpu"))
    first, again = list(pipeline.train_batches(3)), list(pipeline.train_batches(3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    served = torch.cat([labels for _, labels in first])
    assert torch.equal(served, torch.cat([labels for _, labels in plain.train_batches(3)]))
    # Shifts of up to 2.8 pixels and zoom move ink that rotation alone leaves in place.
    assert not torch.equal(first[0][0], next(plain.train_batches(3))[0])


def id_labelled(data: MnistData, batch_size: int) -> FastPipeline:
    """A fast pipeline whose labels are the examples' indices, to see which ones it serves."""
    pipeline = FastPipeline(data, batch_size, torch.device("cpu"))
    pipeline.train_labels = torch.arange(pipeline.num_train)
    return pipeline


def collect(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [labels for _images, labels in batches]


@pytest.mark.parametrize("batch_size", [64, 1000, 4096])
def test_fast_loader_visits_every_example_once_per_epoch(data: MnistData,
                                                         batch_size: int) -> None:
    pipeline = id_labelled(data, batch_size)
    assert pipeline.num_train > chunk_images(torch.device("cpu"))  # several chunks
    for seed in (11, 12):
        labels = collect(pipeline.train_batches(seed))
        assert all(len(b) == batch_size for b in labels[:-1]) and len(labels[-1]) <= batch_size
        served = torch.cat(labels)
        assert torch.equal(served.sort().values, torch.arange(pipeline.num_train))


def test_fast_loader_order_and_rotation_come_from_the_seed_alone(data: MnistData) -> None:
    pipeline = id_labelled(data, 64)
    first = list(pipeline.train_batches(5))
    again = list(pipeline.train_batches(5))
    other = collect(pipeline.train_batches(6))
    assert len(first) == len(again)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(collect(iter(first))), torch.cat(other))
    # Chunked preparation serves the same tensors as rotating each batch on its own would.
    generator = torch.Generator().manual_seed(5)
    order = torch.randperm(pipeline.num_train, generator=generator)
    angles = (torch.rand(pipeline.num_train, generator=generator) * 2 - 1) * 7.0
    for step in (0, 17, len(first) - 1):
        index = order[step * 64:(step + 1) * 64]
        expected = affine_batch(pipeline.train_images[index].float().div_(255), angles[index])
        expected = (expected - 0.1307) / 0.3081
        assert torch.equal(first[step][1], index)
        torch.testing.assert_close(first[step][0], expected)


@pytest.mark.parametrize(("option", "value"), [
    ("precision", "fp16"), ("compile", "yes"), ("threads", -1), ("scheduler", "cosine"),
    ("label_smoothing", 1.0), ("rotation", 181.0), ("translate", -0.1), ("scale", 1.5),
])
def test_new_options_are_validated(option: str, value: object) -> None:
    with pytest.raises(UserError, match=f"invalid {option}"):
        TrainConfig(**{option: value}).validate()


def test_compiled_cpu_training_learns_what_eager_does(mnist_root: Path) -> None:
    """`--compile on` (NHWC, fused kernels) changes the speed, not what is learned.

    Not bit for bit: MNIST's flat background makes exact max-pool ties, which convolutions
    computed another way break differently (last-bit differences), routing the gradient
    through another, equally valid, index; from then on the runs drift apart as two seeds
    would.
    """
    data = load_mnist(mnist_root, train_limit=2560, test_limit=500)  # whole batches: one shape

    def run(compile_mode: str) -> tuple[list[EpochMetrics], torch.nn.Module]:
        config = tiny_config(compile=compile_mode, threads=1, train_limit=2560, epochs=3)
        pipeline = build_pipeline(config, data, resolve(config))
        state = create_state(config, resolve(config), pipeline.steps_per_epoch)
        return fit(config, state, pipeline, progress=False), state.model

    eager, eager_model = run("off")
    compiled, compiled_model = run("on")

    def nhwc(model: torch.nn.Module) -> bool:
        weight = model.features[3].weight  # the 10 -> 10 conv; for one channel NHWC is moot
        return weight.is_contiguous(memory_format=torch.channels_last)

    assert nhwc(compiled_model) and not nhwc(eager_model)
    assert compiled[0].train_loss == pytest.approx(eager[0].train_loss, rel=0.02)
    # Evaluation runs the trained module eagerly: its weights and BatchNorm statistics are
    # what the compiled graph learned.
    assert min(compiled[-1].test_acc, eager[-1].test_acc) > 80.0
    assert compiled[-1].test_acc == pytest.approx(eager[-1].test_acc, abs=5.0)


def test_bf16_on_cpu_is_reproducible(data: MnistData) -> None:
    config = tiny_config(precision="bf16", dropout=0.05, threads=1, train_limit=256, epochs=1)

    def run() -> list[tuple[float, float, float]]:
        pipeline = build_pipeline(config, data, resolve(config))
        state = create_state(config, resolve(config), pipeline.steps_per_epoch)
        return [(m.train_loss, m.test_loss, m.test_acc)
                for m in fit(config, state, pipeline, progress=False)]

    assert run() == run()


@pytest.fixture(scope="module")
def tracked_runs(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, mlflow.entities.Run]:
    """One tiny tracked run per pipeline, in one SQLite store (creating one costs seconds)."""
    folder = tmp_path_factory.mktemp("pipelines")
    with pytest.MonkeyPatch.context() as patch:
        use_store(folder, patch)
        runs = {}
        for pipeline in ("fast", "torchvision"):
            result = train_one(tiny_config(pipeline=pipeline), mnist_root,
                               experiment="pipelines", progress=False)
            runs[pipeline] = mlflow.get_run(result.run_id)
        yield runs


@pytest.mark.parametrize("pipeline", ["fast", "torchvision"])
def test_both_pipelines_train_and_log(tracked_runs: dict[str, mlflow.entities.Run],
                                      pipeline: str) -> None:
    run = tracked_runs[pipeline]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["pipeline"] == pipeline
    assert (params["precision"], params["compile"], run.data.tags["threads"]) == (
        "auto", "auto", "auto")
    # What `--threads auto` chose, and why (the tests' OMP_NUM_THREADS=1 stands).
    assert run.data.tags["threads_reason"].startswith("auto: ")
    assert int(run.data.tags["torch_threads"]) >= 1
    tags = run.data.tags
    assert (tags["resolved_precision"], tags["resolved_compile"],
            tags["resolved_channels_last"]) == ("fp32", "false", "false")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["train_acc"] > 10.0  # better than chance after 2 tiny epochs
