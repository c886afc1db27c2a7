"""The variational autoencoder [1] as a Pyro model/guide pair.

.. math::

    p(z) = \\mathcal{N}(0, I), \\qquad p_θ(x \\mid z) = \\text{likelihood}(x; f_θ(z)), \\qquad
    q_φ(z \\mid x) = \\mathcal{N}(μ_φ(x), \\operatorname{diag} σ_φ^2(x))

with a Bernoulli, continuous Bernoulli [2] or Gaussian (learned per-dimension scale) likelihood.

[1] Auto-Encoding Variational Bayes, Kingma, Welling (2014).
[2] The continuous Bernoulli: fixing a pervasive error in variational autoencoders,
    Loaiza-Ganem, Cunningham (2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppvae.contract import register_module
from ppvae.models.likelihoods import (
    check_likelihood,
    check_observations,
    observation_dist,
    observation_mean,
)
from ppvae.nets import make_net, split_gaussian


class VAE(nn.Module):
    """Gaussian-latent VAE; ``net="conv"`` uses the small conv nets for image inputs."""

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        net: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.hparams = dict(
            input_dim=input_dim,
            latent_dim=latent_dim,
            hidden=list(hidden),
            activation=activation,
            likelihood=check_likelihood(likelihood),
            net=net,
            image_shape=None if image_shape is None else list(image_shape),
        )
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.encoder = make_net(net, input_dim, 2 * latent_dim, hidden, activation, image_shape)
        self.decoder = make_net(
            net, latent_dim, input_dim, list(hidden)[::-1], activation, image_shape, decoder=True
        )
        self.raw_obs_scale = (
            nn.Parameter(torch.zeros(input_dim)) if likelihood == "gaussian" else None
        )

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("vae", self)
        zeros = x.new_zeros(self.latent_dim)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))  # [..., N, latent_dim]
            pyro.sample(
                "x", observation_dist(self.likelihood, self.decoder(z), self.raw_obs_scale), obs=x
            )

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("vae", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale of q(z|x)."""
        return split_gaussian(self.encoder(x))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z]."""
        return observation_mean(self.likelihood, self.decoder(z))

    def sample_prior(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Draws of E[x|z] with z ~ p(z): ``[num_samples, D]`` (``y`` is ignored)."""
        z = torch.randn(num_samples, self.latent_dim, device=self.decoder_device)
        return self.decode(z)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z] at the guide's mean code (``y`` is ignored)."""
        return self.decode(self.encode(x)[0])

    def check_data(self, x: torch.Tensor) -> None:
        check_observations(self.likelihood, x)

    @property
    def decoder_device(self) -> torch.device:
        return next(self.decoder.parameters()).device
