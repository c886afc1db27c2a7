"""The deterministic autoencoder, written as a Pyro program with a point-mass guide.

.. math::

    p(z) \\propto 1 \\;(\\text{improper, flat}), \\qquad
    p_θ(x \\mid z) = \\text{likelihood}(x; f_θ(z)), \\qquad
    q_φ(z \\mid x) = δ(z - g_φ(x)).

With a flat prior and a point-mass guide, ``Trace_ELBO`` reduces to the reconstruction loss
:math:`-\\log p_θ(x \\mid z = g_φ(x))` (binary cross-entropy for the Bernoulli likelihood, a
Gaussian negative log-likelihood for the Gaussian one), so SVI trains the classic autoencoder [1].

No likelihood bound exists for this model: the point mass has no density with respect to the
prior's measure and the prior is improper, so ``log_weights`` (and with it every ELBO, IWAE bound
and log p(x) estimate) refuses it with a :class:`~ppvae.errors.ContractError`. Compare it by
reconstruction error (:meth:`AE.evaluation_metrics`). It also has no prior to sample from.

[1] Reducing the Dimensionality of Data with Neural Networks, Hinton, Salakhutdinov (2006).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ppvae.contract import register_module
from ppvae.errors import PPVAEError
from ppvae.models.likelihoods import (
    check_likelihood,
    check_observations,
    observation_dist,
    observation_mean,
)
from ppvae.nets import make_net


def reconstruction_nll(
    likelihood: str, decoder_out: torch.Tensor, x: torch.Tensor, raw_obs_scale=None
) -> float:
    """Mean over data points of −log p(x|ẑ) in nats, at the code ẑ the encoder gives x."""
    return float(-observation_dist(likelihood, decoder_out, raw_obs_scale).log_prob(x).mean())


class AE(nn.Module):
    """Deterministic autoencoder: ``z = g(x)`` (a ``Delta`` guide), ``x ~ likelihood(f(z))``."""

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
        self.encoder = make_net(net, input_dim, latent_dim, hidden, activation, image_shape)
        self.decoder = make_net(
            net, latent_dim, input_dim, list(hidden)[::-1], activation, image_shape, decoder=True
        )
        self.raw_obs_scale = (
            nn.Parameter(torch.zeros(input_dim)) if likelihood == "gaussian" else None
        )

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("ae", self)
        flat = dist.ImproperUniform(constraints.real, (), (self.latent_dim,))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", flat)  # [..., N, latent_dim]
            pyro.sample(
                "x", observation_dist(self.likelihood, self.decoder(z), self.raw_obs_scale), obs=x
            )

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("ae", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x), event_dim=1))

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z|x): the code g(x) and zeros (a point mass)."""
        code = self.encoder(x)
        return code, torch.zeros_like(code)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z]."""
        return observation_mean(self.likelihood, self.decoder(z))

    def sample_prior(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        raise PPVAEError(
            "the autoencoder (ae) has no prior to sample from (its code prior is an improper flat "
            "density); look at its reconstructions, or train a vae to generate samples"
        )

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z] at the code z = g(x)."""
        return self.decode(self.encoder(x))

    @torch.no_grad()
    def evaluation_metrics(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> dict[str, float]:
        """The training objective, −log p(x|z = g(x)) per point: the autoencoder's reconstruction
        error under its likelihood (no likelihood bound exists for it)."""
        out = self.decoder(self.encoder(x))
        return {
            "reconstruction_nll": reconstruction_nll(self.likelihood, out, x, self.raw_obs_scale)
        }

    def check_data(self, x: torch.Tensor) -> None:
        check_observations(self.likelihood, x)
