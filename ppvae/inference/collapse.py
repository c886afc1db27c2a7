"""Posterior-collapse diagnostics: active units [1] and KL per latent dimension.

For every latent site of the guide, with :math:`\\mu_d(x) = \\mathbb{E}_{q(z \\mid x)}[z_d]`,

.. math::

    A_d = \\operatorname{Var}_{x}\\big(\\mu_d(x)\\big) > \\text{threshold}
        \\;(10^{-2}\\text{ in [1]}), \\qquad
    \\text{KL}_{nd} = \\mathbb{E}_{q}\\big[\\log q(z_d \\mid x_n, \\cdot)
        - \\log p(z_d \\mid \\cdot)\\big].

A unit whose posterior mean does not move with x carries no information about x (it has
collapsed onto the prior); its KL is ~0. Active units are defined for continuous latents only:
sites with discrete support (or without a finite mean) are left out, and with no continuous
latent the count is ``None``, not 0.

The KL of site :math:`s` is the closed form :math:`\\mathrm{KL}(q(s \\mid \\cdot) \\,\\|\\,
p(s \\mid \\cdot))` only where that is its expectation given the draws made before :math:`s`:
every latent that precedes :math:`s` in the model precedes it in the guide too
(:func:`closed_form_sites`), and ``torch.distributions.kl_divergence`` knows the pair. Otherwise
it is the Monte Carlo estimate :math:`\\log q(z) - \\log p(z)`. In the HVAE, with
:math:`q(z_1 \\mid x) q(z_2 \\mid z_1)` and :math:`p(z_2) p(z_1 \\mid z_2)`, :math:`z_2` is closed
form and :math:`z_1` Monte Carlo: :math:`\\mathrm{KL}(q(z_1 \\mid x) \\,\\|\\, p(z_1 \\mid z_2))`
at :math:`z_2 \\sim q(z_2 \\mid z_1)` is biased. :func:`kl_terms` holds this rule for these
diagnostics and for ``ppvae.inference.objectives.KLWeighted_ELBO``. The KL is per dimension when
guide and prior factorise over the site's event (``Independent`` of a univariate family), else
one group per site (``G = 1``, e.g. a ``MultivariateNormal``). Diagnostics average over
``num_samples`` draws in a particle plate to the left of the ``"data"`` plate.

Shapes: ``N`` data points; ``G`` = number of elements of a site's event (times the elements of
any plate nested inside ``"data"``), or 1 for a site that does not factorise.

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015), section 5.2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from torch.distributions import Independent, kl_divergence

from ppvae.errors import ContractError, PPVAEError
from ppvae.inference.importance import DEFAULT_CHUNK_BUDGET, base_distribution
from ppvae.inference.program import (
    VECTORISED,
    ProgramData,
    density_sites,
    forked_rng,
    program_info,
)

DIAGNOSTIC_PLATE = "_ppvae_diagnostic_particles"
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2015)


def latent_sites(trace):
    """``(name, site)`` for the latent sample sites (not observed, subsample, deterministic or
    auxiliary)."""
    for name, site in density_sites(trace):
        if not site["is_observed"] and not site["infer"].get("is_auxiliary"):
            yield name, site


def data_dim(site, data_plate: str) -> int:
    """The (negative) batch dimension of ``data_plate`` at ``site``."""
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame.dim
    raise ContractError(
        f"site {site['name']!r} is outside the {data_plate!r} plate; per-point diagnostics and "
        f"objectives need every site inside pyro.plate({data_plate!r}, len(x))"
    )


def _univariate_base(fn):
    """The univariate family under ``Independent`` wrappers; None if ``fn`` does not factorise."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if fn.event_shape == torch.Size() else None


def site_kl(guide_site, model_site, *, analytic: bool = True) -> tuple[torch.Tensor, int]:
    """KL(q || p) of one latent site, elementwise where possible.

    Returns ``(kl, event_ndim)``: ``kl`` has the site's batch shape followed by its event shape
    when guide and prior both factorise over the same event (``event_ndim`` = event rank), else
    just the batch shape (``event_ndim = 0``, one value for the whole site). Analytic when
    ``analytic`` and ``kl_divergence`` knows the pair; otherwise the one-sample Monte Carlo
    estimate ``log q(z) − log p(z)`` at the guide's sample ``z``. Site masks are applied; scale
    factors are left to the caller. Whether the closed form is valid for the site is the caller's
    question: use :func:`kl_terms`, which asks :func:`closed_form_sites`.
    """
    q, p, z = guide_site["fn"], model_site["fn"], guide_site["value"]
    q_base, p_base = _univariate_base(q), _univariate_base(p)
    if q_base is not None and p_base is not None and q.event_shape == p.event_shape:
        q, p, event_ndim = q_base, p_base, len(guide_site["fn"].event_shape)
    else:
        event_ndim = 0
    kl = None
    if analytic:
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            kl = None
    if kl is None:
        kl = q.log_prob(z) - p.log_prob(z)
    mask = guide_site["mask"]
    if mask is not None and not isinstance(mask, bool):
        kl = kl * mask.reshape(mask.shape + (1,) * event_ndim)
    elif mask is False:
        kl = torch.zeros_like(kl)
    return kl, event_ndim


def closed_form_sites(model_trace, guide_trace) -> set[str]:
    """Latent sites whose closed-form KL is the expectation of ``log q − log p`` given the draws
    before them: every latent that precedes the site in the model trace also precedes it in the
    guide trace, so the parents of its prior are fixed when the guide draws it (a sufficient rule,
    read off the traces' order; not a necessary one)."""
    guide_position = {name: i for i, (name, _) in enumerate(latent_sites(guide_trace))}
    closed, preceding = set(), []
    for name, _ in latent_sites(model_trace):
        position = guide_position.get(name)
        if position is not None and all(
            guide_position.get(parent, position) < position for parent in preceding
        ):
            closed.add(name)
        preceding.append(name)
    return closed


def kl_terms(
    model_trace, guide_trace, *, analytic: bool = True
) -> Iterator[tuple[str, dict, torch.Tensor, int]]:
    """``(name, guide site, kl, event_ndim)`` for every latent site of the guide (see
    :func:`site_kl`): closed form where ``analytic`` and :func:`closed_form_sites` allow it,
    Monte Carlo otherwise. The one implementation of this choice, for objectives and
    diagnostics."""
    closed = closed_form_sites(model_trace, guide_trace) if analytic else set()
    for name, guide_site in latent_sites(guide_trace):
        kl, event_ndim = site_kl(guide_site, model_trace.nodes[name], analytic=name in closed)
        yield name, guide_site, kl, event_ndim


def points_by_dimension(
    values: torch.Tensor,
    event_ndim: int,
    data_dim: int,
    num_data: int,
    particle_dim: int | None = None,
) -> torch.Tensor:
    """``[...batch..., *event]`` -> ``[S, N, G]``: particles, data points, flattened dimensions.

    ``data_dim`` / ``particle_dim`` are the (negative) plate dims relative to the batch shape;
    without a particle plate ``S = 1``. Every other batch dim (nested plates) joins ``G``.
    """
    batch_ndim = values.dim() - event_ndim
    needed = max(-data_dim, 0 if particle_dim is None else -particle_dim)
    if batch_ndim < needed:
        values = values.reshape((1,) * (needed - batch_ndim) + tuple(values.shape))
        batch_ndim = needed
    data_pos = batch_ndim + data_dim
    if particle_dim is None:
        values, data_pos, particle_pos = values.unsqueeze(0), data_pos + 1, 0
    else:
        particle_pos = batch_ndim + particle_dim
    values = values.movedim((particle_pos, data_pos), (0, 1))
    if values.shape[1] != num_data:
        values = values.expand(values.shape[0], num_data, *values.shape[2:])
    return values.reshape(values.shape[0], num_data, -1)


# diagnostics -----------------------------------------------------------------------------


def _device_of(module) -> torch.device | None:
    parameters = getattr(module, "parameters", None)
    if parameters is None:
        return None
    first = next(iter(parameters()), None)
    return None if first is None else first.device


def _batches(module, x, y, num_samples: int, batch_size: int | None):
    data = ProgramData.of(x, y)
    if num_samples < 1:
        raise PPVAEError(f"num_samples must be >= 1, got {num_samples}")
    device = _device_of(module)
    if device is not None:
        data = data.to(device)
    batch_size = batch_size or max(1, DEFAULT_CHUNK_BUDGET // num_samples)
    for start in range(0, data.num_points, batch_size):
        yield data.select(slice(start, start + batch_size))


def _diagnostic_traces(module, data: ProgramData, num_samples: int, data_plate, *, run_model):
    """Guide (and replayed model) traces with ``num_samples`` particles left of every plate,
    the particle dim and the data plate."""
    info = program_info(module.model, module.guide, data, data_plate)
    if info.particles != VECTORISED:
        raise ContractError(
            "collapse diagnostics need a program that broadcasts over a particle dimension; "
            f"this one does not ({info.particle_note})"
        )
    with pyro.plate(DIAGNOSTIC_PLATE, num_samples, dim=info.particle_dim):
        guide_trace = poutine.trace(module.guide).get_trace(*data.args, **data.kwargs)
        model_trace = None
        if run_model:
            replayed = poutine.replay(module.model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(*data.args, **data.kwargs)
    return guide_trace, model_trace, info.particle_dim, info.data_plate


def kl_per_dimension(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_samples: int = 10,
    batch_size: int | None = None,
    analytic: bool = True,
    data_plate: str | None = None,
) -> dict[str, torch.Tensor]:
    """KL(q(z|x_n) || p(z)) per latent site and dimension: ``{site: Tensor[N, G]}``.

    Averaged over ``num_samples`` guide draws (exact for a mean-field Gaussian guide with a fixed
    prior, where one draw would do); closed form or Monte Carlo per site as :func:`kl_terms`
    decides (``analytic=False``: Monte Carlo everywhere). Runs without gradients and without
    advancing the global RNG.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), forked_rng(ProgramData.of(x, y).device):
        for batch in _batches(module, x, y, num_samples, batch_size):
            guide_trace, model_trace, particle_dim, plate = _diagnostic_traces(
                module, batch, num_samples, data_plate, run_model=True
            )
            for name, guide_site in latent_sites(guide_trace):
                if isinstance(base_distribution(guide_site["fn"]), Delta):
                    raise ContractError(
                        f"guide site {name!r} is a point mass: KL(q || p) does not exist for a "
                        "deterministic encoder"
                    )
            for name, guide_site, kl, event_ndim in kl_terms(
                model_trace, guide_trace, analytic=analytic
            ):
                per_point = points_by_dimension(
                    kl, event_ndim, data_dim(guide_site, plate), batch.num_points, particle_dim
                )
                parts.setdefault(name, []).append(per_point.mean(dim=0))  # [N_batch, G]
    return {name: torch.cat(chunks, dim=0) for name, chunks in parts.items()}


@dataclass
class ActiveUnits:
    """Var_x(E_q[z_d]) per continuous latent site and dimension (``{site: Tensor[G]}``), the
    threshold, and the sites left out (``{site: reason}``: discrete support, no finite mean).

    ``num_active`` / ``num_units`` are None when no continuous latent exists: active units are
    not defined there.
    """

    variances: dict[str, torch.Tensor] = field(default_factory=dict)
    threshold: float = ACTIVE_UNIT_THRESHOLD
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> dict[str, torch.Tensor]:
        """``{site: BoolTensor[G]}``: which units are active."""
        return {name: v > self.threshold for name, v in self.variances.items()}

    @property
    def num_active(self) -> int | None:
        if not self.variances:
            return None
        return int(sum(int(a.sum()) for a in self.active.values()))

    @property
    def num_units(self) -> int | None:
        if not self.variances:
            return None
        return int(sum(v.numel() for v in self.variances.values()))

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "num_active": self.num_active,
            "num_units": self.num_units,
            "variances": {name: v.tolist() for name, v in self.variances.items()},
            "excluded": dict(self.excluded),
        }


def _is_discrete(fn) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except NotImplementedError:
        return False


def active_units(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    num_samples: int = 10,
    batch_size: int | None = None,
    data_plate: str | None = None,
) -> ActiveUnits:
    """Active units [1]: ``Var_x(E_q[z_d | x]) > threshold`` for every continuous latent
    dimension.

    ``E_q[z | x]`` is the guide distribution's analytic mean where it has one (the sample
    otherwise), averaged over ``num_samples`` draws of the sites it depends on; the variance over
    the N data points uses the unbiased (N − 1) normaliser, like ``numpy.cov``. Sites with
    discrete support or a non-finite mean are left out (``ActiveUnits.excluded``).
    """
    if ProgramData.of(x, y).num_points < 2:
        raise PPVAEError("active units need at least 2 data points (a variance over x)")
    means: dict[str, list[torch.Tensor]] = {}
    excluded: dict[str, str] = {}
    with torch.no_grad(), forked_rng(ProgramData.of(x, y).device):
        for batch in _batches(module, x, y, num_samples, batch_size):
            guide_trace, _, particle_dim, plate = _diagnostic_traces(
                module, batch, num_samples, data_plate, run_model=False
            )
            for name, site in latent_sites(guide_trace):
                if name in excluded:
                    continue
                if _is_discrete(site["fn"]):
                    excluded[name] = "discrete support"
                    continue
                value = site["value"]
                try:
                    mean = site["fn"].mean.expand(value.shape)
                except (NotImplementedError, RuntimeError):
                    mean = value
                if not torch.isfinite(mean).all():
                    excluded[name] = "no finite mean"
                    continue
                per_point = points_by_dimension(
                    mean,
                    len(site["fn"].event_shape),
                    data_dim(site, plate),
                    batch.num_points,
                    particle_dim,
                )
                means.setdefault(name, []).append(per_point.mean(dim=0))  # [N_batch, G]
    variances = {
        name: torch.cat(m, dim=0).var(dim=0) for name, m in means.items() if name not in excluded
    }
    return ActiveUnits(variances=variances, threshold=threshold, excluded=excluded)


def collapse_metrics(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    num_samples: int = 10,
    batch_size: int | None = None,
    data_plate: str | None = None,
) -> dict:
    """JSON-ready summary for ``fit(epoch_metrics=...)`` and reports.

    ``{"active_units": int, "latent_units": int, "kl": mean over points of the total KL,
    "kl_per_dim": {site: [mean over points of KL_d, ...]}}``; the two unit counts are None when
    the guide has no continuous latent (active units are not defined for discrete codes).
    """
    units = active_units(
        module,
        x,
        y,
        threshold=threshold,
        num_samples=num_samples,
        batch_size=batch_size,
        data_plate=data_plate,
    )
    kl = kl_per_dimension(
        module, x, y, num_samples=num_samples, batch_size=batch_size, data_plate=data_plate
    )
    return {
        "active_units": units.num_active,
        "latent_units": units.num_units,
        "kl": float(sum(v.sum(dim=1).mean() for v in kl.values())),
        "kl_per_dim": {name: v.mean(dim=0).tolist() for name, v in kl.items()},
    }
