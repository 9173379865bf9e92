"""Model variants by name, the inference wrapper that is logged, and a layer summary."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mnist_mlflow.config import MODEL_CHOICES

# What a served model says when a request's pixels are not finite numbers in [0, 1].
INVALID_PIXELS = "pixels must be finite numbers in [0, 1] (divide 8-bit values by 255)"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


# Dropout masks drawn from 16 random bits per element: 4 per int64 that torch's generator
# draws (its Bernoulli draws one double per element: several times the cost of the whole
# mask here).
MASK_BITS = 16
# Int64s drawn beyond the mask's: the residual draw's uniform and first places.
SPARE_DRAWS = 32


def dropout_mask(shape: torch.Size, p: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 `shape` of 0 (dropped, with probability p) or 1/(1-p), each element drawn
    independently from `generator` (torch's default one when None): the distribution of
    nn.Dropout's mask. On a GPU, torch's Bernoulli draw; on the CPU, as follows.

    16 bits give a drop probability of `low`/65536, the grid point at or below p. The rest,
    p - low/65536 (under 1/65536), drops by a second, independent and sparse draw: a binomial
    count of places (by inverse CDF, from one 53-bit uniform), uniformly chosen; so each
    element drops with probability exactly p. Only float arithmetic touches the whole
    tensor (comparisons into bool are slow on the CPU), and every random number comes from
    one draw: small ops cost more than the mask's arithmetic here.
    """
    scale = 1.0 / (1.0 - p)
    if torch.device(device).type != "cpu":
        # A GPU draws Bernoulli masks fast, and the sparse draw below would read numbers
        # back to the host: a sync per layer and seed.
        return torch.empty(shape, device=device).bernoulli_(1.0 - p, generator=generator
                                                            ).mul_(scale)
    count = math.prod(shape)
    levels = 1 << MASK_BITS
    lanes = (count + 3) // 4
    # All 64 bits: random_() alone leaves the sign bit 0, and with it one int16 in four.
    bits = torch.empty(lanes + SPARE_DRAWS, dtype=torch.int64, device=device).random_(
        -(1 << 63), None, generator=generator)
    low = math.floor(p * levels)
    # Each int16 less the threshold (halfway between two integers, never met), times a
    # margin that rounding cannot cross, clamped: 0 below the threshold, exactly `scale`
    # above. Converted first: an int16 tensor times a float is 40x slower than the four
    # passes together.
    margin = 4.0 * scale
    mask = bits[:lanes].view(torch.int16)[:count].to(torch.float32).sub_(
        low - levels // 2 - 0.5).mul_(margin).clamp_(0.0, scale)
    rest = (p - low / levels) / (1.0 - low / levels)
    if rest > 0:
        spare = bits[lanes:].tolist()
        extra = _binomial(count, rest, (spare[0] & ((1 << 53) - 1)) / (1 << 53))
        chosen: set[int] = set()
        draws = iter(spare[1:])
        while len(chosen) < extra:  # with replacement until distinct: a uniform subset
            drawn = next(draws, None)
            if drawn is None:
                drawn = int(torch.empty(1, dtype=torch.int64, device=device).random_(
                    -(1 << 63), None, generator=generator).item())
            chosen.add(drawn % count)  # bias under count / 2**64
        if chosen:
            mask[torch.tensor(sorted(chosen), device=device)] = 0.0
    return mask.view(shape)


def _binomial(n: int, q: float, uniform: float) -> int:
    """The Binomial(n, q) count at cumulative probability `uniform` (q small: few steps)."""
    k = 0
    term = math.exp(n * math.log1p(-q))  # P(0)
    total = term
    while total <= uniform and k < n:
        term *= (n - k) / (k + 1) * q / (1.0 - q)
        k += 1
        total += term
    return k


# Stacked seeds (mnist_mlflow.stacked): the masks of this forward pass, one per Dropout in
# order, each drawn from its seed's generator as that seed trained alone would draw it.
STACKED_MASKS: contextvars.ContextVar[Iterator[torch.Tensor] | None] = contextvars.ContextVar(
    "stacked_masks", default=None)


class Dropout(nn.Dropout):
    """nn.Dropout, with the mask drawn 3-4x cheaper when training eager on the CPU.

    The same module for everything else (state, eval, CUDA, a compiled graph): a logged
    model holds the same layers and weights as one trained with nn.Dropout. Another mask
    drawing consumes the generator otherwise, so a seed's masks differ from nn.Dropout's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = STACKED_MASKS.get()
        if masks is not None and self.training and self.p:  # stacked seeds: drawn per seed
            return x * next(masks)
        if (not self.training or not self.p or x.device.type != "cpu" or self.inplace
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p).to(x.dtype)


def conv_block(
    in_channels: int, out_channels: int, dropout: float, padding: int = 0
) -> list[nn.Module]:
    """3x3 conv without bias, BatchNorm, ReLU, and Dropout(p) when p > 0."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
    if dropout > 0:
        layers.append(Dropout(dropout))
    return layers


class OptNet(nn.Module):
    """The seed's network (Opt-1/Opt-2): 6,132 parameters, dropout after each block but the first.

    28x28 -> three 3x3 convs (10 channels) -> pool -> two convs (8) -> pool -> two padded
    convs (8) -> 72 features -> Linear(72, 20) -> Linear(20, 10).
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, 10, dropout=0.0),
            *conv_block(10, 10, dropout),
            *conv_block(10, 10, dropout),
            nn.MaxPool2d(2),
            *conv_block(10, 8, dropout),
            *conv_block(8, 8, dropout),
            nn.MaxPool2d(2),
            *conv_block(8, 8, dropout, padding=1),
            *conv_block(8, 8, dropout, padding=1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(72, 20), nn.Linear(20, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GlobalAvgPool(nn.Module):
    """Mean over height and width, keeping them as 1x1: what AdaptiveAvgPool2d(1) computes.

    A plain mean because AdaptiveAvgPool2d's backward has no deterministic CUDA kernel, so
    `--deterministic` could not train the GAP nets on a GPU. No parameters: state dicts and
    checkpoints are those of the AdaptiveAvgPool2d version.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class GapNet(nn.Module):
    """The seed's plan: wider early layers, a 1x1 transition, and GAP instead of the dense head.

    28x28 -> 3x3 convs with `early` channels [22x22] -> max-pool -> 1x1 conv to `transition`
    channels -> 3x3 convs with `late` channels [5x5] -> global average pool -> 1x1 conv to 10.
    BatchNorm and ReLU after every conv but the last; Dropout(p) after each block but the first.
    """

    def __init__(self, dropout: float, early: tuple[int, ...], transition: int,
                 late: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for index, width in enumerate(early):
            layers += conv_block(channels, width, dropout if index else 0.0)
            channels = width
        layers += [nn.MaxPool2d(2), nn.Conv2d(channels, transition, 1, bias=False),
                   nn.BatchNorm2d(transition), nn.ReLU()]
        channels = transition
        for width in late:
            layers += conv_block(channels, width, dropout)
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(GlobalAvgPool(), nn.Conv2d(channels, 10, 1),
                                  nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def gap8k(dropout: float = 0.0) -> GapNet:
    """7,580 parameters: 10-10-16 channels at full resolution, 10-16-16 after the transition.

    Spends what the seed's dense head used (1,670 weights) on early width, where the strokes
    are; the GAP head has 170.
    """
    return GapNet(dropout, early=(10, 10, 16), transition=10, late=(10, 16, 16))


def gap5k(dropout: float = 0.0) -> GapNet:
    """4,974 parameters: gap8k's shape made narrower (8-8-12, then 10-12-12), for < 5k."""
    return GapNet(dropout, early=(8, 8, 12), transition=8, late=(10, 12, 12))


def gap3k(dropout: float = 0.0) -> GapNet:
    """2,800 parameters: 6-6-8 channels at full resolution, 8-8-10 after a 6-channel
    transition: gap5k's shape made narrower again, for < 3k."""
    return GapNet(dropout, early=(6, 6, 8), transition=6, late=(8, 8, 10))


def gap3k_late(dropout: float = 0.0) -> GapNet:
    """2,998 parameters: 4-6-8 channels at full resolution, 8-10-10 after the transition.

    The other way to spend under 3k: fewer channels where the maps are large (and each
    channel costs most compute), more on the 11x11 and smaller maps that see whole strokes.
    """
    return GapNet(dropout, early=(4, 6, 8), transition=6, late=(8, 10, 10))


# config.MODEL_CHOICES name -> constructor taking the dropout probability.
MODELS: dict[str, Callable[[float], nn.Module]] = {
    "opt": OptNet, "gap8k": gap8k, "gap5k": gap5k, "gap3k": gap3k, "gap3k-late": gap3k_late}
if set(MODELS) != set(MODEL_CHOICES):  # the torch-free list of names is the command line's
    raise ImportError(f"models {sorted(MODELS)} differ from config's {sorted(MODEL_CHOICES)}")


def build_model(name: str, dropout: float) -> nn.Module:
    """Instantiate the variant `name` with dropout probability `dropout`."""
    return MODELS[name](dropout)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class InferenceModel(nn.Module):
    """What gets logged: raw [0, 1] pixels in, 10 class probabilities out.

    Normalization lives inside so that a served model takes plain images. Pixels that are
    not finite numbers in [0, 1] are refused rather than answered: NaN in gives NaN
    probabilities, which `mlflow models serve` would send as a 200 whose JSON strict parsers
    reject. The refusal is an assert node, since MLflow logs the model with torch.export,
    which cannot trace a Python `if` on the data; the scoring server answers the
    RuntimeError it raises with a 400 whose stack_trace ends with INVALID_PIXELS.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # NaN fails both comparisons and ±inf one of them: finite is checked too.
        valid = ((images >= 0) & (images <= 1)).all()
        # Checked on the host: a failed assert on a CUDA tensor is a device-side assert,
        # which leaves the CUDA context unusable for every later request.
        torch._assert_async(valid.cpu(), INVALID_PIXELS)
        return torch.softmax(self.net((images - MNIST_MEAN) / MNIST_STD), dim=1)


def model_summary(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> str:
    """A layer table (name, type, output shape, parameters) from one forward pass."""
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue

        def record(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            params = sum(p.numel() for p in mod.parameters())
            rows.append((name, type(mod).__name__, str(list(out.shape)), params))

        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    header = f"{'layer':<24}{'type':<14}{'output shape':<20}{'params':>8}"
    lines = [header, "-" * len(header)]
    lines += [f"{n:<24}{t:<14}{s:<20}{p:>8,}" for n, t, s, p in rows]
    lines += ["-" * len(header), f"{'total trainable parameters':<58}{count_parameters(model):>8,}"]
    return "\n".join(lines) + "\n"
