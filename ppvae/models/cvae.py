"""The conditional VAE [1]: a VAE whose decoder and encoder both see the label y.

.. math::

    p(z) = \\mathcal{N}(0, I), \\qquad p_θ(x \\mid z, y) = \\text{likelihood}(x; f_θ(z, y)),
    \\qquad q_φ(z \\mid x, y) = \\mathcal{N}(μ_φ(x, y), \\operatorname{diag} σ_φ^2(x, y)).

The label enters as a one-hot vector: concatenated to z for the decoder, and to x for the MLP
encoder (as ``num_classes`` constant image planes for the conv encoder). Every bound is a bound on
the conditional likelihood log p(x | y). ``sample_prior(n, y)`` generates the classes in ``y``.

[1] Learning Structured Output Representation using Deep Conditional Generative Models,
    Sohn, Lee, Yan (2015).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppvae.contract import register_module
from ppvae.errors import PPVAEError
from ppvae.models.likelihoods import (
    check_likelihood,
    check_observations,
    observation_dist,
    observation_mean,
)
from ppvae.nets import make_net, split_gaussian


class CVAE(nn.Module):
    """Gaussian-latent VAE conditioned on integer labels ``y`` in ``0 .. num_classes - 1``."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        net: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise PPVAEError(f"the CVAE needs at least 2 classes, got num_classes={num_classes}")
        self.hparams = dict(
            input_dim=input_dim,
            num_classes=num_classes,
            latent_dim=latent_dim,
            hidden=list(hidden),
            activation=activation,
            likelihood=check_likelihood(likelihood),
            net=net,
            image_shape=None if image_shape is None else list(image_shape),
        )
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.net = net
        if net == "conv" and image_shape is not None and len(image_shape) == 3:
            channels, height, width = image_shape
            self.image_shape = (channels, height, width)
            encoder_shape = (channels + num_classes, height, width)
            encoder_in = (channels + num_classes) * height * width
        else:
            self.image_shape = None
            encoder_shape = image_shape
            encoder_in = input_dim + num_classes
        self.encoder = make_net(net, encoder_in, 2 * latent_dim, hidden, activation, encoder_shape)
        self.decoder = make_net(
            net,
            latent_dim + num_classes,
            input_dim,
            list(hidden)[::-1],
            activation,
            image_shape,
            decoder=True,
        )
        self.raw_obs_scale = (
            nn.Parameter(torch.zeros(input_dim)) if likelihood == "gaussian" else None
        )

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("cvae", self)
        label = self.one_hot(y, x.shape[0], x.dtype)  # [N, num_classes]
        zeros = x.new_zeros(self.latent_dim)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))  # [..., N, latent_dim]
            logits = self.decoder(_concat_label(z, label))
            pyro.sample("x", observation_dist(self.likelihood, logits, self.raw_obs_scale), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("cvae", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x, y)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def one_hot(self, y: torch.Tensor | None, num_data: int, dtype: torch.dtype) -> torch.Tensor:
        """``[N]`` integer labels -> ``[N, num_classes]``; a one-line error when unusable."""
        if y is None:
            raise PPVAEError(
                "the CVAE needs labels y for every data point; use a data set with labels"
            )
        if y.shape != (num_data,):
            raise PPVAEError(f"labels must have shape [{num_data}], got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise PPVAEError(
                f"labels must lie in 0..{self.num_classes - 1}, got values in "
                f"{int(y.min())}..{int(y.max())}"
            )
        return F.one_hot(y.long(), self.num_classes).to(dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Mean and scale of q(z|x, y)."""
        label = self.one_hot(y, x.shape[0], x.dtype)
        if self.image_shape is not None:  # conv: the label as constant image planes
            channels, height, width = self.image_shape
            planes = label[:, :, None, None].expand(-1, -1, height, width)
            images = x.reshape(-1, channels, height, width)
            inputs = torch.cat([images, planes], dim=1).reshape(x.shape[0], -1)
        else:
            inputs = torch.cat([x, label], dim=-1)
        return split_gaussian(self.encoder(inputs))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z, y] for ``z`` ``[..., N, latent_dim]`` and labels ``y`` ``[N]``."""
        label = self.one_hot(y, z.shape[-2], z.dtype)
        return observation_mean(self.likelihood, self.decoder(_concat_label(z, label)))

    def sample_prior(self, num_samples: int, y: torch.Tensor | int | None = None) -> torch.Tensor:
        """Draws of E[x|z, y], z ~ p(z): ``[num_samples, D]``.

        ``y``: labels ``[num_samples]``, one class for all, or ``None`` for 0, 1, 2, ... in turn.
        """
        device = self.decoder_device
        if y is None:
            y = torch.arange(num_samples, device=device) % self.num_classes
        elif isinstance(y, int):
            y = torch.full((num_samples,), y, dtype=torch.long, device=device)
        z = torch.randn(num_samples, self.latent_dim, device=device)
        return self.decode(z, y.to(device))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z, y] at the guide's mean code."""
        return self.decode(self.encode(x, y)[0], y)

    def check_data(self, x: torch.Tensor) -> None:
        check_observations(self.likelihood, x)

    @property
    def decoder_device(self) -> torch.device:
        return next(self.decoder.parameters()).device


def _concat_label(z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``[..., N, Z]``, ``[N, C]`` -> ``[..., N, Z + C]``: the label broadcast over particles."""
    return torch.cat([z, label.expand(*z.shape[:-1], label.shape[-1])], dim=-1)
