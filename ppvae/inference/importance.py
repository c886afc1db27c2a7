"""Per-data-point importance weights and the bounds built on them.

For a model/guide pair following DESIGN §1 and particles :math:`z_k \\sim q_φ(z \\mid x_n)`,

.. math::

    \\log w_{kn} = \\log p_θ(x_n, z_k) - \\log q_φ(z_k \\mid x_n),

    \\text{ELBO}_n = \\frac{1}{K} \\sum_k \\log w_{kn}, \\qquad
    \\text{IWAE}_n^{(K)} = \\log \\frac{1}{K} \\sum_k w_{kn} \\;\\le\\; \\log p_θ(x_n),

and :math:`\\mathbb{E}[\\text{ELBO}] \\le \\mathbb{E}[\\text{IWAE}^{(K)}] \\le
\\mathbb{E}[\\text{IWAE}^{(K+1)}] \\le \\log p(x)` [1]. ``log_marginal`` is the IWAE estimate with
large K; its standard error comes from the delta method on the normalised weights
:math:`\\tilde w_k = w_k / \\sum_j w_j`:
:math:`\\mathrm{se} = \\sqrt{(K \\sum_k \\tilde w_k^2 - 1)/K}`.

:func:`log_weights` is the one implementation of this math; every bound, objective and diagnostic
in ppvae calls it. Particles are vectorised in a plate to the left of the ``"data"`` plate and
drawn in chunks, so peak memory is set by ``chunk_size``, not by K.

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from ppvae.contract import AUXILIARY_LOSS
from ppvae.errors import ContractError

PARTICLE_PLATE = "_ppvae_particles"
# Default particle chunk: at most this many (particle, data point) pairs per forward pass.
DEFAULT_CHUNK_BUDGET = 16384


def _trace_pair(model: Callable, guide: Callable, x, y):
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    return model_trace, guide_trace


def sample_sites(trace):
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and not site["infer"].get(AUXILIARY_LOSS)
            and not site_is_subsample(site)
        ):
            yield name, site


_NESTING_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _nesting_key(model: Callable, guide: Callable, y):
    """(owner, key) for bound methods of one object, e.g. ``module.model``/``module.guide``."""
    owner = getattr(model, "__self__", None)
    if owner is None or getattr(guide, "__self__", None) is not owner:
        return None, None
    try:
        weakref.ref(owner)
    except TypeError:
        return None, None
    return owner, (model.__func__, guide.__func__, y is None)


def plate_nesting(model: Callable, guide: Callable, x: torch.Tensor, y=None) -> int:
    """``max_plate_nesting`` of a model/guide pair, read off a trace once and cached for bound
    methods of the same module."""
    owner, key = _nesting_key(model, guide, y)
    if owner is not None:
        cached = _NESTING_CACHE.setdefault(owner, {})
        if key not in cached:
            cached[key] = _probe_plate_nesting(model, guide, x, y)
        return cached[key]
    return _probe_plate_nesting(model, guide, x, y)


def forked_rng(where: torch.Tensor | torch.device):
    """torch's RNG forked for a block (the CPU's, and the CUDA device of ``where`` — a tensor or
    a device — when it has one): draws inside it do not shift the caller's random stream."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _probe_plate_nesting(model: Callable, guide: Callable, x: torch.Tensor, y=None) -> int:
    """``max_plate_nesting`` read off one trace of model and guide (never hard-coded).

    The probe runs on a forked RNG, so it does not shift the particles drawn afterwards.
    """
    with torch.no_grad(), forked_rng(x):
        traces = _trace_pair(model, guide, x[:1], None if y is None else y[:1])
    nesting = 0
    for trace in traces:
        for _, site in sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
    return nesting


def base_distribution(fn):
    while hasattr(fn, "base_dist"):  # Independent, Masked, Expanded wrappers
        fn = fn.base_dist
    return fn


def _check_contract(model_trace, guide_trace, data_plate: str, num_data: int) -> None:
    model_latents = {n for n, s in sample_sites(model_trace) if not s["is_observed"]}
    guide_latents = {n for n, s in sample_sites(guide_trace) if not s["is_observed"]}
    if model_latents != guide_latents:
        raise ContractError(
            f"the guide must sample exactly the model's latent sites: model has "
            f"{sorted(model_latents)}, guide has {sorted(guide_latents)}"
        )
    for name, site in sample_sites(guide_trace):
        if isinstance(base_distribution(site["fn"]), Delta):
            raise ContractError(
                f"guide site {name!r} is a point mass (Delta): a deterministic encoder has no "
                "importance weights, so no ELBO, IWAE bound or log p(x) exists for this model "
                "(an autoencoder); compare it by reconstruction error instead"
            )
    if not any(s["is_observed"] for _, s in sample_sites(model_trace)):
        raise ContractError("the model observes no site; pass the data as obs=x inside the model")
    for trace, role in ((model_trace, "model"), (guide_trace, "guide")):
        for name, site in sample_sites(trace):
            frames = [f for f in site["cond_indep_stack"] if f.name == data_plate]
            if not frames:
                kind = "observed" if site["is_observed"] else "latent"
                raise ContractError(
                    f"{role} {kind} site {name!r} is outside the {data_plate!r} plate (a global "
                    f"latent or unplated site); per-point estimators need every site inside "
                    f"pyro.plate({data_plate!r}, len(x)) — or pass data_plate= to name yours"
                )
            if frames[0].size != num_data:
                raise ContractError(
                    f"plate {data_plate!r} has size {frames[0].size} at site {name!r} but x holds "
                    f"{num_data} points; the plate size must be len(x) (no subsample)"
                )


def site_log_prob(
    site, data_plate: str, particle_dim: int, num_particles: int, num_data: int, scaled: bool
):
    """log density of one site summed to ``[num_particles, num_data]``."""
    log_prob = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    if scaled and site["scale"] is not None:
        log_prob = log_prob * site["scale"]
    data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == data_plate)
    ndim = -particle_dim
    if log_prob.dim() > ndim:
        raise ContractError(
            f"site {site['name']!r} has log-prob shape {tuple(log_prob.shape)} with more batch "
            f"dimensions than plates; declare extra dimensions with .to_event()"
        )
    log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
    other_dims = [d for d in range(-ndim, 0) if d not in (particle_dim, data_dim)]
    if other_dims:
        log_prob = log_prob.sum(dim=other_dims, keepdim=True)
    log_prob = log_prob.reshape(log_prob.shape[0], log_prob.shape[data_dim])
    return log_prob.expand(num_particles, num_data)


def _chunk_log_weights(
    model, guide, x, y, num_particles: int, nesting: int, data_plate: str, scaled: bool
) -> torch.Tensor:
    particle_dim = -(nesting + 1)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        model_trace, guide_trace = _trace_pair(model, guide, x, y)
    num_data = x.shape[0]
    _check_contract(model_trace, guide_trace, data_plate, num_data)
    total = x.new_zeros(num_particles, num_data)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for _, site in sample_sites(trace):
            total = total + sign * site_log_prob(
                site, data_plate, particle_dim, num_particles, num_data, scaled
            )
    return total  # [num_particles, N]


def default_chunk_size(num_particles: int, num_data: int) -> int:
    return max(1, min(num_particles, DEFAULT_CHUNK_BUDGET // max(num_data, 1)))


def log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_particles: int,
    chunk_size: int | None = None,
    data_plate: str = "data",
    scaled: bool = False,
) -> torch.Tensor:
    """log p(x_n, z_k) − log q(z_k | x_n) for z_k ~ q(z | x_n): ``[num_particles, N]``.

    Differentiable (objectives use it); wrap in ``torch.no_grad()`` for evaluation. ``scaled``
    applies each site's ``poutine.scale`` factor (β, annealing); log p(x) estimators leave it off.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one data point along dim 0, got {tuple(x.shape)}")
    nesting = plate_nesting(model, guide, x, y)
    chunk = chunk_size or default_chunk_size(num_particles, x.shape[0])
    chunks = []
    for start in range(0, num_particles, chunk):
        size = min(chunk, num_particles - start)
        chunks.append(_chunk_log_weights(model, guide, x, y, size, nesting, data_plate, scaled))
    return torch.cat(chunks, dim=0)


def elbo(
    model,
    guide,
    x,
    y=None,
    *,
    num_particles: int = 1,
    chunk_size: int | None = None,
    data_plate: str = "data",
) -> torch.Tensor:
    """Monte Carlo ELBO per data point, ``[N]``."""
    log_w = log_weights(
        model,
        guide,
        x,
        y,
        num_particles=num_particles,
        chunk_size=chunk_size,
        data_plate=data_plate,
    )
    return log_w.mean(dim=0)


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def iwae_bound(
    model,
    guide,
    x,
    y=None,
    *,
    num_particles: int,
    chunk_size: int | None = None,
    data_plate: str = "data",
) -> torch.Tensor:
    """The K-sample importance-weighted bound per data point, ``[N]``."""
    log_w = log_weights(
        model,
        guide,
        x,
        y,
        num_particles=num_particles,
        chunk_size=chunk_size,
        data_plate=data_plate,
    )
    return log_mean_exp(log_w)


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """w_k / Σ_j w_j along the particle dimension."""
    return torch.softmax(log_w, dim=0)


def log_marginal_stderr(log_w: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of log((1/K) Σ w_k), ``[N]``."""
    num = log_w.shape[0]
    w = normalized_weights(log_w)
    return torch.sqrt(torch.clamp(num * (w * w).sum(dim=0) - 1.0, min=0.0) / num)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's ESS = 1 / Σ_k w̃_k², ``[N]``."""
    w = normalized_weights(log_w)
    return 1.0 / (w * w).sum(dim=0)


def log_marginal(
    model,
    guide,
    x,
    y=None,
    *,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    data_plate: str = "data",
    return_stderr: bool = False,
):
    """Importance-sampling estimate of log p(x_n), ``[N]`` (and its standard error if asked)."""
    with torch.no_grad():
        log_w = log_weights(
            model,
            guide,
            x,
            y,
            num_particles=num_samples,
            chunk_size=chunk_size,
            data_plate=data_plate,
        )
    estimate = log_mean_exp(log_w)
    return (estimate, log_marginal_stderr(log_w)) if return_stderr else estimate


class PosteriorTarget:
    """log p(x_n, z) and log q(z | x_n) of a batch of points as functions of the latent values,
    for samplers that move the latents themselves (AIS, HMC, NUTS, local SVI).

    The latents of every site are packed into one flat vector per (particle, point):
    ``z: [K, N, D]`` with ``D`` the total number of latent elements (site order: the guide's).
    ``log_joint(z)`` and ``log_guide(z)`` return ``[K, N]`` and are differentiable in ``z``;
    values are in each site's support (``real_support`` says whether every site lives in R^D).
    """

    def __init__(
        self, model: Callable, guide: Callable, x: torch.Tensor, y=None, *, data_plate="data"
    ):
        self.model, self.guide, self.x, self.y = model, guide, x, y
        self.data_plate = data_plate
        self.num_data = x.shape[0]
        self.nesting = plate_nesting(model, guide, x, y)
        with torch.no_grad(), forked_rng(x):
            latents, _ = self._sample(1)
        # name -> (value shape under a 1-particle plate, index of the data axis, flat slice)
        self.sites: dict[str, tuple[tuple[int, ...], int, slice]] = {}
        offset = 0
        self.real_support = True
        for name, site in latents.items():
            event_dim = len(site["fn"].event_shape)
            value = site["value"]
            batch_ndim = -self.particle_dim
            shape = tuple(value.shape)
            shape = (1,) * (batch_ndim + event_dim - len(shape)) + shape
            data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == data_plate)
            axis = batch_ndim + data_dim
            size = math.prod(shape) // shape[axis]
            self.sites[name] = (shape, axis, slice(offset, offset + size))
            offset += size
            support = site["fn"].support
            while hasattr(support, "base_constraint"):  # independent(real, 1)
                support = support.base_constraint
            self.real_support = self.real_support and support is constraints.real
        self.dim = offset

    @property
    def particle_dim(self) -> int:
        return -(self.nesting + 1)

    def _sample(self, num_particles: int):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=self.particle_dim):
            model_trace, guide_trace = _trace_pair(self.model, self.guide, self.x, self.y)
        _check_contract(model_trace, guide_trace, self.data_plate, self.num_data)
        latents = {n: s for n, s in sample_sites(guide_trace) if not s["is_observed"]}
        return latents, guide_trace

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Site values (as the sites take them under a K-particle plate) -> ``[K, N, D]``."""
        num_particles = next(iter(values.values())).shape[0]
        parts = []
        for name, (shape, axis, _) in self.sites.items():
            full = list(shape)
            full[0], full[axis] = num_particles, self.num_data
            value = values[name].expand(full).movedim(axis, 1)
            parts.append(value.reshape(num_particles, self.num_data, -1))
        return torch.cat(parts, dim=-1)

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[K, N, D]`` -> site values in the shapes the sites take under a K-particle plate."""
        num_particles = z.shape[0]
        values = {}
        for name, (shape, axis, where) in self.sites.items():
            moved = list(shape)
            moved[0], moved[axis] = num_particles, self.num_data
            moved.insert(1, moved.pop(axis))
            values[name] = z[..., where].reshape(moved).movedim(1, axis)
        return values

    def sample_guide(self, num_particles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``z ~ q(z | x_n)``: ``([K, N, D], log q(z | x_n) [K, N])``."""
        latents, guide_trace = self._sample(num_particles)
        z = self.pack({name: site["value"] for name, site in latents.items()})
        return z, self._sum(guide_trace, num_particles)

    def _sum(self, trace, num_particles: int) -> torch.Tensor:
        total = self.x.new_zeros(num_particles, self.num_data)
        for _, site in sample_sites(trace):
            total = total + site_log_prob(
                site, self.data_plate, self.particle_dim, num_particles, self.num_data, False
            )
        return total

    def _log_density(self, fn: Callable, z: torch.Tensor) -> torch.Tensor:
        num_particles = z.shape[0]
        conditioned = poutine.condition(fn, data=self.unpack(z))
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=self.particle_dim):
            trace = poutine.trace(conditioned).get_trace(self.x, self.y)
        return self._sum(trace, num_particles)

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log p(x_n, z_kn), ``[K, N]``."""
        return self._log_density(self.model, z)

    def log_guide(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z_kn | x_n), ``[K, N]``."""
        return self._log_density(self.guide, z)
