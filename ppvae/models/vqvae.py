"""The vector-quantised VAE [1] as a Pyro program, trained with SVI like every other model.

The encoder maps x to ``num_positions`` continuous vectors :math:`z_e(x)_p \\in \\mathbb{R}^C`
(``C = latent_dim``); the latent is the index :math:`k_p` of a codebook row
:math:`e_{k_p}` at every position, with a uniform prior over the ``K = codebook_size`` rows:

.. math::

    p(k) = \\prod_p \\tfrac{1}{K}, \\qquad p_θ(x \\mid k) = \\text{likelihood}(x; f_θ(e_k)),

    q_φ(k \\mid x) = \\prod_p \\mathbb{1}[k_p = \\arg\\min_j \\lVert z_e(x)_p - e_j \\rVert].

Because q is one-hot, :math:`\\log q = 0` and every importance weight is
:math:`\\log w = \\log p_θ(x \\mid e_k) - P \\log K`: a valid (if loose) bound on log p(x), the
same for every particle, so the ELBO, the IWAE bounds and ``log_marginal`` coincide.

Training adds, per data point, the codebook loss :math:`\\lVert \\mathrm{sg}[z_e] - e_k \\rVert^2`
and the commitment loss :math:`β \\lVert z_e - \\mathrm{sg}[e_k] \\rVert^2` as
``ppvae.contract.auxiliary_loss`` sites of the model (factor sites marked training-only):
``Trace_ELBO`` sums every model site into the training loss, while ``ppvae.inference.log_weights``
skips sites so marked, so the losses shape training but never enter a likelihood bound.

Straight-through gradient: the guide chooses the code, the model decodes
:math:`z_q = \\mathrm{sg}[e_k] + (z_e - \\mathrm{sg}[z_e])`. The bracket is exactly zero in value,
so the model's density is exactly :math:`p_θ(x \\mid e_k)`; its only effect is to pass the
decoder's gradient with respect to :math:`z_q` to the encoder unchanged. To build it the model
evaluates the encoder on ``x`` itself (stateless: nothing is carried from the guide to the
model besides the sampled code), as it does for the two losses above.

Train it with ``Trace_ELBO`` (``fit``'s default). Objectives built on ``log_weights``, such as
the IWAE objective, skip these marked sites and so would drop both losses (and with a one-hot guide
the IWAE bound equals the ELBO anyway).

With ``ema_decay > 0`` the codebook is not a gradient parameter: it follows exponential moving
averages of the encoder outputs assigned to each code (appendix of [1], with Laplace smoothing),
and the codebook-loss factor is dropped. With ``dead_code_restart = n > 0`` (default 20; 0 turns
it off), a code that no training batch has used for ``n`` consecutive steps is moved onto a
randomly chosen encoder output of the current batch [2]; on digits this lifts codebook usage from
about a third to over 90%. Both updates run in the guide, outside autograd, only when the module
is in training mode with gradients enabled, once per training step: a guide call whose encoder
outputs equal those of the last update (the further particles of one step, or its particle
chunks) does not update again, so "steps unused" counts steps, not particles. (Steps that see
the same batch with an unchanged encoder are counted once.) They draw from torch's global RNG, so
a seeded ``fit`` reproduces them exactly.

[1] Neural Discrete Representation Learning, van den Oord, Vinyals, Kavukcuoglu (2017).
[2] Jukebox: A Generative Model for Music, Dhariwal et al. (2020), section 3.2 (code restarts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppvae.contract import auxiliary_loss, register_module
from ppvae.errors import PPVAEError
from ppvae.models.likelihoods import (
    check_likelihood,
    check_observations,
    observation_dist,
    observation_mean,
)
from ppvae.nets import make_net

EMA_EPSILON = 1e-5  # Laplace smoothing of the EMA code counts


class VQVAE(nn.Module):
    """``num_positions`` codes per point: rows of a ``codebook_size`` x ``latent_dim`` table."""

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 16,
        num_positions: int = 4,
        codebook_size: int = 64,
        commitment_beta: float = 0.25,
        ema_decay: float = 0.0,
        dead_code_restart: int = 20,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        net: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if codebook_size < 2 or num_positions < 1 or latent_dim < 1:
            raise PPVAEError(
                f"the VQ-VAE needs codebook_size >= 2, num_positions >= 1 and latent_dim >= 1, "
                f"got {codebook_size}, {num_positions} and {latent_dim}"
            )
        if commitment_beta < 0:
            raise PPVAEError(f"commitment_beta must be >= 0, got {commitment_beta}")
        if not 0.0 <= ema_decay < 1.0:
            raise PPVAEError(f"ema_decay must lie in [0, 1) (0 = no EMA), got {ema_decay}")
        if dead_code_restart < 0:
            raise PPVAEError(f"dead_code_restart must be >= 0 (0 = off), got {dead_code_restart}")
        self.hparams = dict(
            input_dim=input_dim,
            latent_dim=latent_dim,
            num_positions=num_positions,
            codebook_size=codebook_size,
            commitment_beta=commitment_beta,
            ema_decay=ema_decay,
            dead_code_restart=dead_code_restart,
            hidden=list(hidden),
            activation=activation,
            likelihood=check_likelihood(likelihood),
            net=net,
            image_shape=None if image_shape is None else list(image_shape),
        )
        self.code_dim = latent_dim
        self.num_positions = num_positions
        self.codebook_size = codebook_size
        self.commitment_beta = commitment_beta
        self.ema_decay = ema_decay
        self.dead_code_restart = dead_code_restart
        self.likelihood = likelihood
        width = num_positions * latent_dim
        self.encoder = make_net(net, input_dim, width, hidden, activation, image_shape)
        self.decoder = make_net(
            net, width, input_dim, list(hidden)[::-1], activation, image_shape, decoder=True
        )
        self.raw_obs_scale = (
            nn.Parameter(torch.zeros(input_dim)) if likelihood == "gaussian" else None
        )
        codebook = torch.empty(codebook_size, latent_dim).uniform_(
            -1.0 / codebook_size, 1.0 / codebook_size
        )
        if ema_decay > 0:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_counts", torch.ones(codebook_size))
            self.register_buffer("ema_sums", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self._last_update_input: torch.Tensor | None = None  # z_e of the last update

    # the Pyro program ---------------------------------------------------------------------
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("vqvae", self)
        uniform = x.new_zeros(self.num_positions, self.codebook_size)  # logits of p(k)
        with pyro.plate("data", x.shape[0]):
            code = pyro.sample("code", dist.Categorical(logits=uniform).to_event(1))  # [..., N, P]
            e = self.codebook[code]  # [..., N, P, C]
            z_e = self.encoder_output(x)  # [N, P, C]
            if self.ema_decay == 0:
                auxiliary_loss("codebook_loss", -squared_distance(z_e.detach(), e))
            auxiliary_loss(
                "commitment_loss", -self.commitment_beta * squared_distance(z_e, e.detach())
            )
            z_q = e.detach() + (z_e - z_e.detach())  # straight-through: value e, gradient to z_e
            out = self.decoder(z_q.flatten(-2))  # [..., N, D]
            pyro.sample("x", observation_dist(self.likelihood, out, self.raw_obs_scale), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register_module("vqvae", self)
        with pyro.plate("data", x.shape[0]):
            z_e = self.encoder_output(x)
            nearest = self.quantize(z_e)  # [N, P]
            if self.training and torch.is_grad_enabled() and self._new_step(z_e):
                self.update_codebook(z_e.detach(), nearest)
            point_mass = torch.full(
                (*nearest.shape, self.codebook_size), -math.inf, dtype=x.dtype, device=x.device
            ).scatter_(-1, nearest.unsqueeze(-1), 0.0)
            pyro.sample("code", dist.Categorical(logits=point_mass).to_event(1))

    # quantisation -------------------------------------------------------------------------
    def encoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """z_e(x): ``[..., N, num_positions, latent_dim]``."""
        return self.encoder(x).unflatten(-1, (self.num_positions, self.code_dim))

    @torch.no_grad()
    def quantize(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row at every position: ``[..., P, C] -> [..., P]``."""
        distances = (
            (z_e * z_e).sum(-1, keepdim=True)
            - 2.0 * z_e @ self.codebook.T
            + (self.codebook * self.codebook).sum(-1)
        )  # [..., P, K]
        return distances.argmin(dim=-1)

    @torch.no_grad()
    def _new_step(self, z_e: torch.Tensor) -> bool:
        """False when ``z_e`` equals the encoder output of the last update (same batch, same
        encoder: another particle of the same step); else remember it and return True."""
        last = self._last_update_input
        if (
            last is not None
            and last.shape == z_e.shape
            and last.device == z_e.device
            and last.dtype == z_e.dtype
            and torch.equal(last, z_e)
        ):
            return False
        self._last_update_input = z_e.detach()
        return True

    @torch.no_grad()
    def update_codebook(self, z_e: torch.Tensor, nearest: torch.Tensor) -> None:
        """EMA codebook update and dead-code restarts for one training batch."""
        flat = z_e.reshape(-1, self.code_dim)  # [N*P, C]
        index = nearest.reshape(-1)
        counts = torch.bincount(index, minlength=self.codebook_size).to(flat.dtype)  # [K]
        if self.ema_decay > 0:
            sums = torch.zeros_like(self.ema_sums).index_add_(0, index, flat)  # [K, C]
            self.ema_counts.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
            self.ema_sums.mul_(self.ema_decay).add_(sums, alpha=1.0 - self.ema_decay)
            total = self.ema_counts.sum()
            smoothed = (
                (self.ema_counts + EMA_EPSILON) / (total + self.codebook_size * EMA_EPSILON) * total
            )
            self.codebook.copy_(self.ema_sums / smoothed.unsqueeze(-1))
        if self.dead_code_restart > 0:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.steps_unused >= self.dead_code_restart).nonzero().squeeze(-1)
            if dead.numel():
                pick = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
                self.codebook[dead] = flat[pick]
                if self.ema_decay > 0:
                    self.ema_counts[dead] = 1.0
                    self.ema_sums[dead] = flat[pick]
                self.steps_unused[dead] = 0

    # the common model interface -----------------------------------------------------------
    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output z_e ``[N, P, C]`` and its nearest codes ``[N, P]``."""
        z_e = self.encoder_output(x)
        return z_e, self.quantize(z_e)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|k] for integer codes ``z`` ``[..., P]``."""
        return observation_mean(self.likelihood, self.decoder(self.codebook[z].flatten(-2)))

    def sample_prior(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Draws of E[x|k] with codes uniform over the codebook: ``[num_samples, D]``."""
        codes = torch.randint(
            self.codebook_size, (num_samples, self.num_positions), device=self.codebook.device
        )
        return self.decode(codes)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|k] at the nearest codes of x."""
        return self.decode(self.encode(x)[1])

    @torch.no_grad()
    def evaluation_metrics(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Codebook usage (the fraction of codes that x uses), the perplexity of the code
        histogram, exp(−Σ_k f_k log f_k): 1 when one code is used, ``codebook_size`` when all are
        used equally often, and the codebook size (so reports can say "k of K codes")."""
        codes = self.encode(x)[1]
        counts = torch.bincount(codes.reshape(-1), minlength=self.codebook_size).double()
        frequency = counts / counts.sum()
        entropy = -(frequency * torch.log(frequency.clamp_min(1e-300))).sum()
        return {
            "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(entropy)),
            "codebook_size": float(self.codebook_size),
        }

    def check_data(self, x: torch.Tensor) -> None:
        check_observations(self.likelihood, x)


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over positions and coordinates of (a − b)²: ``[..., P, C] -> [...]``."""
    return ((a - b) ** 2).sum(dim=(-2, -1))
