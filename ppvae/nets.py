"""Neural networks used by the models: plain torch, no Pyro.

Every network maps ``[..., in_dim] -> [..., out_dim]`` and broadcasts over any leading dimensions,
so a model runs unchanged under a particle plate (``[K, N, D]`` inputs) as DESIGN §1 requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ppvae.errors import PPVAEError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky-relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}
MIN_SCALE = 1e-5


def activation_class(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise PPVAEError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Sequential):
    """``in_dim -> hidden[0] -> ... -> out_dim`` with an activation after every hidden layer."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "relu"):
        act = activation_class(activation)
        layers: list[nn.Module] = []
        sizes = [in_dim, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(sizes[-1], out_dim))
        super().__init__(*layers)


def _check_conv_shape(image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3 or image_shape[1] % 4 or image_shape[2] % 4:
        raise PPVAEError(
            f"the conv networks need images whose height and width divide by 4, got "
            f"{image_shape}; use --net mlp"
        )
    return tuple(int(s) for s in image_shape)


class ConvEncoderNet(nn.Module):
    """Two stride-2 convolutions then a linear layer: ``[..., C*H*W] -> [..., out_dim]``."""

    def __init__(self, image_shape: Sequence[int], hidden: int, out_dim: int, activation: str):
        super().__init__()
        self.image_shape = _check_conv_shape(image_shape)
        channels, height, width = self.image_shape
        act = activation_class(activation)
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1),
            act(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            act(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(64 * (height // 4) * (width // 4), hidden), act(), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        features = self.conv(x.reshape(-1, *self.image_shape))
        return self.head(features).reshape(*leading, -1)


class ConvDecoderNet(nn.Module):
    """Mirror of :class:`ConvEncoderNet`: ``[..., in_dim] -> [..., C*H*W]``."""

    def __init__(self, image_shape: Sequence[int], hidden: int, in_dim: int, activation: str):
        super().__init__()
        self.image_shape = _check_conv_shape(image_shape)
        channels, height, width = self.image_shape
        act = activation_class(activation)
        self.grid = (64, height // 4, width // 4)
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden),
            act(),
            nn.Linear(hidden, 64 * (height // 4) * (width // 4)),
            act(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        leading = z.shape[:-1]
        grid = self.head(z).reshape(-1, *self.grid)
        return self.deconv(grid).reshape(*leading, -1)


def make_net(
    kind: str,
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int],
    activation: str,
    image_shape: Sequence[int] | None = None,
    *,
    decoder: bool = False,
) -> nn.Module:
    """An MLP or conv network; the conv kind uses the first hidden size for its dense layer."""
    if kind == "mlp":
        return MLP(in_dim, hidden, out_dim, activation)
    if kind == "conv":
        width = hidden[0] if hidden else 256
        if decoder:
            return ConvDecoderNet(image_shape, width, in_dim, activation)
        return ConvEncoderNet(image_shape, width, out_dim, activation)
    raise PPVAEError(f"unknown network kind {kind!r}; use mlp or conv")


def split_gaussian(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 2Z]`` network output -> (loc, scale) with a softplus scale bounded away from 0."""
    loc, raw_scale = raw.chunk(2, dim=-1)
    return loc, F.softplus(raw_scale) + MIN_SCALE
