"""The ELBO gap split into an approximation gap and an amortisation gap, per data point [1].

For an amortised guide :math:`q_φ(z \\mid x)` in a variational family :math:`\\mathcal{Q}` and the
best member of that family for one point, :math:`q^*_n = \\arg\\max_{q \\in \\mathcal{Q}}
\\mathrm{ELBO}(x_n; q)`,

.. math::

    \\log p(x_n) - \\mathrm{ELBO}(x_n; q_φ) =
    \\underbrace{\\log p(x_n) - \\mathrm{ELBO}(x_n; q^*_n)}_{\\text{approximation gap}}
    + \\underbrace{\\mathrm{ELBO}(x_n; q^*_n) - \\mathrm{ELBO}(x_n; q_φ)}
    _{\\text{amortisation gap}}.

The approximation gap is :math:`\\mathrm{KL}(q^*_n \\,\\|\\, p(z \\mid x_n))`, the family's limit;
the amortisation gap is what the encoder loses by sharing one network across points. :math:`q^*_n`
is fitted by SVI on local, non-amortised parameters warm-started at the guide's output for
:math:`x_n`, with the reparameterised ELBO :math:`\\mathbb{E}_{ε}[\\log p(x_n, μ_n + σ_n ⊙ ε)]
+ \\sum_i \\log σ_{ni} + \\tfrac{D}{2}(1 + \\log 2π)`
built from ``PosteriorTarget.log_joint``. Supported family: guides whose every latent site is a
diagonal ``Normal`` (wrapped or not in ``Independent``/``to_event``); others are refused.
:math:`\\log p(x_n)` comes from AIS (``log_marginal_method="ais"``) or from importance sampling
with the guide (``"is"``), and the result says which. Since the fitted :math:`q^*_n` can only
be as good as the optimiser, the approximation gap is an upper estimate and the amortisation
gap a lower one.

[1] Inference Suboptimality in Variational Autoencoders, Cremer, Li, Duvenaud (2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch

from ppvae.errors import ContractError, PPVAEError
from ppvae.inference.ais import AISResult, ais_log_marginal
from ppvae.inference.importance import (
    PosteriorTarget,
    base_distribution,
    default_chunk_size,
    elbo,
    log_marginal,
)
from ppvae.inference.program import ProgramData, forked_rng

LOG_MARGINAL_METHODS = ("ais", "is")


@dataclass
class GapResult:
    """Per-point gaps, ``[N]`` each; ``approximation_gap + amortisation_gap`` equals
    ``log_marginal - elbo_amortised`` exactly."""

    log_marginal: torch.Tensor
    elbo_local: torch.Tensor  # ELBO of the locally fitted q*
    elbo_amortised: torch.Tensor  # ELBO of the guide q_φ
    log_marginal_method: str  # e.g. "ais (1000 steps x 16 chains)" or "is (K=5000)"
    local_steps: int
    num_particles: int
    local_loc: torch.Tensor  # [N, D], q*'s location (flat latents, PosteriorTarget order)
    local_scale: torch.Tensor  # [N, D]
    details: dict = field(default_factory=dict)

    @property
    def approximation_gap(self) -> torch.Tensor:
        return self.log_marginal - self.elbo_local

    @property
    def amortisation_gap(self) -> torch.Tensor:
        return self.elbo_local - self.elbo_amortised

    @property
    def total_gap(self) -> torch.Tensor:
        return self.log_marginal - self.elbo_amortised

    def to_dict(self) -> dict:
        per_point = {
            "log_marginal": self.log_marginal,
            "elbo_local": self.elbo_local,
            "elbo_amortised": self.elbo_amortised,
            "approximation_gap": self.approximation_gap,
            "amortisation_gap": self.amortisation_gap,
        }
        out = {key: value.tolist() for key, value in per_point.items()}
        out.update({f"mean_{key}": float(value.mean()) for key, value in per_point.items()})
        out.update(
            log_marginal_method=self.log_marginal_method,
            local_steps=self.local_steps,
            num_particles=self.num_particles,
            details=self.details,
        )
        return out


def guide_normal_parameters(target: PosteriorTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and scale of a diagonal-Normal guide at every point, packed as ``[N, D]``."""
    with torch.no_grad():
        guide = target.guide_distributions()
    locs, scales = {}, {}
    for name, fn in guide.items():
        base = base_distribution(fn)
        if type(base) is not dist.Normal:
            raise ContractError(
                f"gap_decomposition fits a local q*(z) of the guide's family and supports "
                f"diagonal Normal guide sites; site {name!r} is {type(base).__name__} (use "
                f"ais_log_marginal or log_marginal for the total gap)"
            )
        shape = fn.batch_shape + fn.event_shape
        locs[name] = torch.broadcast_to(base.loc, shape)
        scales[name] = torch.broadcast_to(base.scale, shape)
    return target.pack(locs)[0], target.pack(scales)[0]


def fit_local_normal(
    target: PosteriorTarget,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    num_steps: int,
    num_particles: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise each point's reparameterised ELBO over its own ``loc``, ``log scale`` (Adam).

    Points are independent, so the summed loss gives each its own gradient; only the local
    parameters are differentiated (the model's gradients are left untouched).
    """
    loc0, scale0 = loc.detach(), scale.detach()
    # Coordinates relative to the warm start: Adam's steps (about lr each) are then in units of
    # the guide's own scale, and the step size decays linearly to zero to stop the jitter.
    shift = torch.zeros_like(loc0, requires_grad=True)  # loc = loc0 + scale0 * shift
    log_ratio = torch.zeros_like(loc0, requires_grad=True)  # scale = scale0 * exp(log_ratio)
    optimizer = torch.optim.Adam([shift, log_ratio], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / max(num_steps, 1))
    for _ in range(num_steps):
        with torch.enable_grad():
            loc, scale = loc0 + scale0 * shift, scale0 * log_ratio.exp()
            noise = torch.randn((num_particles,) + tuple(loc.shape), dtype=loc.dtype)
            z = loc + scale * noise.to(loc.device)  # [K, N, D]
            local_elbo = target.log_joint(z).mean(0) + scale.log().sum(-1)  # [N], up to a constant
            grads = torch.autograd.grad(-local_elbo.sum(), [shift, log_ratio])
        for param, grad in zip((shift, log_ratio), grads, strict=True):
            param.grad = grad
        optimizer.step()
        schedule.step()
    loc, log_scale = loc0 + scale0 * shift, scale0.log() + log_ratio
    return loc.detach(), log_scale.detach().exp()


def local_elbo(
    target: PosteriorTarget, loc: torch.Tensor, scale: torch.Tensor, num_particles: int
) -> torch.Tensor:
    """ELBO of q*(z) = N(loc, diag scale²) per point as the mean log-weight, ``[N]``."""
    local = dist.Normal(loc, scale).to_event(1)
    chunk = default_chunk_size(num_particles, loc.shape[0])
    total = torch.zeros_like(loc[:, 0])
    with torch.no_grad():
        for start in range(0, num_particles, chunk):
            z = local.sample((min(chunk, num_particles - start),))  # [k, N, D]
            total = total + (target.log_joint(z) - local.log_prob(z)).sum(0)
    return total / num_particles


def gap_decomposition(
    model: Callable,
    guide: Callable,
    x,
    y=None,
    *,
    local_steps: int = 500,
    local_particles: int = 16,
    lr: float = 0.05,
    num_particles: int = 1000,
    log_marginal_method: str | AISResult = "ais",
    num_samples: int = 5000,
    ais_options: dict | None = None,
    seed: int | None = 0,
    data_plate: str | None = None,
) -> GapResult:
    """Approximation and amortisation gaps per data point (module docstring).

    ``local_steps``, ``local_particles``, ``lr``: the local SVI fit of q* (Adam on coordinates
    relative to the guide's output, so ``lr`` is a fraction of the guide's scale per step, decayed
    linearly to zero); ``num_particles``: the Monte Carlo size of both ELBO estimates;
    ``log_marginal_method``: ``"ais"`` (options in ``ais_options``, passed to
    :func:`~ppvae.inference.ais.ais_log_marginal`), ``"is"`` (importance sampling with
    ``num_samples`` guide draws) or an :class:`AISResult` already computed for these points
    (reused, not recomputed).
    """
    given = log_marginal_method if isinstance(log_marginal_method, AISResult) else None
    if given is None and log_marginal_method not in LOG_MARGINAL_METHODS:
        raise PPVAEError(f"unknown log_marginal_method {log_marginal_method!r}; use ais or is")
    if local_steps < 0 or local_particles < 1 or num_particles < 1 or lr <= 0:
        raise PPVAEError(
            "local_steps must be >= 0, local_particles and num_particles >= 1 and lr > 0"
        )
    data = ProgramData.of(x, y)
    with forked_rng(data.device):
        if seed is not None:
            torch.manual_seed(seed)
        target = PosteriorTarget(model, guide, x, y, data_plate=data_plate)
        loc, scale = guide_normal_parameters(target)
        loc, scale = fit_local_normal(
            target, loc, scale, num_steps=local_steps, num_particles=local_particles, lr=lr
        )
        elbo_local = local_elbo(target, loc, scale, num_particles)
        with torch.no_grad():
            elbo_amortised = elbo(
                model, guide, x, y, num_particles=num_particles, data_plate=data_plate
            )
        details: dict = {}
        if given is not None or log_marginal_method == "ais":
            options = dict(ais_options or {})
            result = given or ais_log_marginal(model, guide, x, y, data_plate=data_plate, **options)
            if result.log_marginal.shape != (target.num_data,):
                raise PPVAEError(
                    f"the AIS result holds {result.log_marginal.shape[0]} points but x holds "
                    f"{target.num_data}; pass the result computed for these points"
                )
            log_px = result.log_marginal
            method = f"ais ({result.num_steps} steps x {result.num_chains} chains)"
            details["log_marginal_stderr"] = result.stderr.tolist()
        else:
            log_px, stderr = log_marginal(
                model,
                guide,
                x,
                y,
                num_samples=num_samples,
                data_plate=data_plate,
                return_stderr=True,
            )
            method = f"is (K={num_samples})"
            details["log_marginal_stderr"] = stderr.tolist()
    return GapResult(
        log_marginal=log_px.detach(),
        elbo_local=elbo_local.detach(),
        elbo_amortised=elbo_amortised.detach(),
        log_marginal_method=method,
        local_steps=local_steps,
        num_particles=num_particles,
        local_loc=loc,
        local_scale=scale,
        details=details,
    )
