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

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Bernoulli, Delta, Independent
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from torch.distributions import constraints
from torch.distributions.utils import _sum_rightmost, broadcast_all
from torch.nn import functional as F

from ppvae.errors import ContractError, PPVAEError
from ppvae.inference.program import (
    PARTICLE_PLATE,
    VECTORISED,
    ProgramData,
    ProgramInfo,
    check_inputs,
    forked_rng,
    is_deterministic,
    program_info,
    trace_pair,
)
from ppvae.inference.program import density_sites as density_sites

# Default particle chunk: at most this many (particle, data point) pairs per forward pass.
DEFAULT_CHUNK_BUDGET = 16384


def sample_sites(trace):
    """Sample sites that enter the density (see :func:`ppvae.inference.program.density_sites`)."""
    return density_sites(trace)


def base_distribution(fn):
    while hasattr(fn, "base_dist"):  # Independent, Masked, Expanded wrappers
        fn = fn.base_dist
    return fn


def _check_point_masses(guide_trace) -> None:
    for name, site in sample_sites(guide_trace):
        if not site["is_observed"] and isinstance(base_distribution(site["fn"]), Delta):
            raise ContractError(
                f"guide site {name!r} is a point mass (Delta): a deterministic encoder has no "
                "importance weights, so no ELBO, IWAE bound or log p(x) exists for this model "
                "(an autoencoder); compare it by reconstruction error instead"
            )


def site_log_prob(
    site,
    data_plate: str,
    particle_dim: int | None,
    num_particles: int,
    num_data: int,
    scaled: bool,
):
    """log density of one site summed to ``[num_particles, num_data]``.

    ``particle_dim``: the particle plate's dim, or None when the particles are replicated along
    the data plate (row ``k * num_data + n`` of the data dim is particle k of point n).
    """
    log_prob = _log_prob(site["fn"], site["value"])
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    if scaled and site["scale"] is not None:
        log_prob = log_prob * site["scale"]
    data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == data_plate)
    return _to_points(log_prob, data_dim, particle_dim, num_particles, num_data, site["name"])


def _log_prob(fn, value) -> torch.Tensor:
    """``fn.log_prob(value)``. Without gradients (evaluation), ``Bernoulli.to_event`` is summed
    as −Σ BCE instead of Σ (−BCE): the same numbers bit for bit (negation is exact, the sum's
    order unchanged) with one pass over the ``[K, N, D]`` elements fewer."""
    if type(fn) is Independent and type(fn.base_dist) is Bernoulli and not torch.is_grad_enabled():
        base = fn.base_dist
        if base._validate_args:  # noqa: SLF001
            base._validate_sample(value)  # noqa: SLF001
        logits, value = broadcast_all(base.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -_sum_rightmost(bce, fn.reinterpreted_batch_ndims)
    return fn.log_prob(value)


def _to_points(log_prob, data_dim, particle_dim, num_particles, num_data, name) -> torch.Tensor:
    """Sum every dim but the particle and data dims: ``[num_particles, num_data]``."""
    if particle_dim is None:
        ndim = max(-data_dim, log_prob.dim())
        log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
        other_dims = [d for d in range(-ndim, 0) if d != data_dim]
        if other_dims:
            log_prob = log_prob.sum(dim=other_dims, keepdim=True)
        log_prob = log_prob.reshape(-1).expand(num_particles * num_data)
        return log_prob.reshape(num_particles, num_data)
    ndim = -particle_dim
    if log_prob.dim() > ndim:
        raise ContractError(
            f"site {name!r} has log-prob shape {tuple(log_prob.shape)} with more batch "
            f"dimensions than plates; declare extra dimensions with .to_event()"
        )
    log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
    other_dims = [d for d in range(-ndim, 0) if d not in (particle_dim, data_dim)]
    if other_dims:
        log_prob = log_prob.sum(dim=other_dims, keepdim=True)
    log_prob = log_prob.reshape(log_prob.shape[0], log_prob.shape[data_dim])
    return log_prob.expand(num_particles, num_data)


def _enumerated_log_weights(
    model_trace, guide_trace, data_plate, particle_dim, num_particles, num_data, scaled
):
    """log W = log Σ_e p(x, e, z_e) / q(z_e | x, e) over every enumerated value e (guide- and
    model-side), contracted plate by plate with Pyro's tensor message passing: ``[K, N]``.

    E_q[W] = Σ_e p(x, e) = p(x), so W is an importance weight with the discrete latents summed
    out exactly (Rao-Blackwellised)."""
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob(site_filter=lambda name, site: not is_deterministic(site))
    model_trace.pack_tensors()
    guide_trace.pack_tensors(model_trace.plate_to_symbol)
    plate_to_symbol = model_trace.plate_to_symbol
    tree: OrderedDict = OrderedDict()
    terms = []
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for _, site in sample_sites(trace):
            if sign < 0 and (
                site["is_observed"] or site["infer"].get("_enumerate_dim") is not None
            ):
                continue  # q(e | x) of an enumerated guide site cancels in W
            term = packed.scale_and_mask(
                site["packed"]["unscaled_log_prob"],
                scale=site["scale"] if scaled else 1.0,
                mask=site["packed"]["mask"],
            )
            if sign < 0:
                dims = term._pyro_dims
                term = -term
                term._pyro_dims = dims
            ordinal = frozenset(
                plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            tree.setdefault(ordinal, []).append(term)
            terms.append(term)
    sum_dims = {d for term in terms for d in term._pyro_dims} - set(plate_to_symbol.values())
    target = {plate_to_symbol[data_plate]}
    if particle_dim is not None:
        target.add(plate_to_symbol[PARTICLE_PLATE])
    result = contract_to_tensor(tree, sum_dims, target_ordinal=frozenset(target), ring=LogRing())
    symbol_to_dim = {symbol: dim for symbol, dim in model_trace.symbol_to_dim.items()}
    result = packed.unpack(result, symbol_to_dim)
    data_dim = symbol_to_dim[plate_to_symbol[data_plate]]
    return _to_points(result, data_dim, particle_dim, num_particles, num_data, "enumerated")


def chunk_log_weights(
    model: Callable,
    guide: Callable,
    data: ProgramData,
    num_particles: int,
    info: ProgramInfo,
    *,
    scaled: bool = False,
    keep_values: bool = False,
    keep_traces: bool = False,
    guide_values: dict | None = None,
    point_masses_refused: bool = True,
):
    """``(log_w [num_particles, N], latent values)`` of one particle chunk, on the path ``info``
    chose: particles in a plate left of the program's plates (``vectorised``), or the data
    replicated along the data plate (``replicated``). ``keep_traces``: return the model and guide
    traces (``(model_trace, guide_trace)``); ``keep_values``: return the guide's latent
    values and sites (``{name: (value, site)}``), else None."""
    num_data = data.num_points
    if info.particles == VECTORISED:
        particles = num_particles
        enum_dim = info.particle_dim - 1 if info.enumerated else None
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=info.particle_dim):
            model_trace, guide_trace = trace_pair(model, guide, data, enum_dim, guide_values)
    else:
        particles = None
        enum_dim = info.particle_dim if info.enumerated else None
        tiled = data.tile(num_particles)
        model_trace, guide_trace = trace_pair(model, guide, tiled, enum_dim, guide_values)
    if point_masses_refused:
        _check_point_masses(guide_trace)
    if info.enumerated:
        log_w = _enumerated_log_weights(
            model_trace,
            guide_trace,
            info.data_plate,
            info.particle_dim if particles is not None else None,
            num_particles,
            num_data,
            scaled,
        )
    else:
        particle_dim = info.particle_dim if particles is not None else None
        log_w = data.first.new_zeros(num_particles, num_data)
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for _, site in sample_sites(trace):
                if sign < 0 and site["is_observed"]:
                    continue
                log_w = log_w + sign * site_log_prob(
                    site, info.data_plate, particle_dim, num_particles, num_data, scaled
                )
    if keep_traces:
        return log_w, (model_trace, guide_trace)
    values = None
    if keep_values:
        values = {
            name: (site["value"], site)
            for name, site in sample_sites(guide_trace)
            if not site["is_observed"] and site["infer"].get("_enumerate_dim") is None
        }
    return log_w, values


def default_chunk_size(num_particles: int, num_data: int) -> int:
    return max(1, min(num_particles, DEFAULT_CHUNK_BUDGET // max(num_data, 1)))


def log_weights(
    model: Callable,
    guide: Callable,
    x,
    y: torch.Tensor | None = None,
    *,
    num_particles: int,
    chunk_size: int | None = None,
    data_plate: str | None = None,
    scaled: bool = False,
) -> torch.Tensor:
    """log p(x_n, z_k) − log q(z_k | x_n) for z_k ~ q(z | x_n): ``[num_particles, N]``.

    ``x``: the data as the program takes them — a tensor, a tuple of positional arguments, a
    dict of keyword arguments (or a :class:`~ppvae.inference.program.ProgramData`); ``y``, when
    given, is one more positional argument. The data plate is found (``data_plate`` overrides
    it). Enumerated discrete latents are summed out exactly, so the weights are
    Rao-Blackwellised. Differentiable (objectives use it); wrap in ``torch.no_grad()`` for
    evaluation. ``scaled`` applies each site's ``poutine.scale`` factor (β, annealing); log p(x)
    estimators leave it off.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise PPVAEError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    if chunk_size is not None and chunk_size < 1:
        raise PPVAEError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    data = ProgramData.of(x, y)
    check_inputs(model, guide, data)
    info = program_info(model, guide, data, data_plate)
    if info.subsampled and not scaled:
        raise ContractError(
            f"plate {info.data_plate!r} subsamples inside the program ({info.subsampled}); "
            "per-point estimators need every point of the batch: pass the points to evaluate "
            "as the data instead of subsampling inside"
        )
    return chunked_log_weights(model, guide, data, info, num_particles, chunk_size, scaled=scaled)


def chunked_log_weights(
    model: Callable,
    guide: Callable,
    data: ProgramData,
    info: ProgramInfo,
    num_particles: int,
    chunk_size: int | None = None,
    *,
    scaled: bool = False,
) -> torch.Tensor:
    """:func:`chunk_log_weights` over ``num_particles`` in chunks: ``[num_particles, N]``.

    Pyro's argument and support checks (when enabled) run on the first chunk only: the data are
    the same in every chunk, and a NaN in a later chunk's particles still shows in its weights.
    """
    chunk = chunk_size or default_chunk_size(num_particles, data.num_points)
    chunks = []
    for start in range(0, num_particles, chunk):
        size = min(chunk, num_particles - start)
        with contextlib.nullcontext() if start == 0 else _validation_off():
            chunks.append(chunk_log_weights(model, guide, data, size, info, scaled=scaled)[0])
    return torch.cat(chunks, dim=0)


@contextlib.contextmanager
def _validation_off():
    """Pyro's (and torch's) distribution checks off for a block, both flags restored after it."""
    torch_flag = torch.distributions.Distribution._validate_args  # noqa: SLF001
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_flag)


def elbo(
    model,
    guide,
    x,
    y=None,
    *,
    num_particles: int = 1,
    chunk_size: int | None = None,
    data_plate: str | None = None,
) -> torch.Tensor:
    """Monte Carlo ELBO per data point, ``[N]`` (enumerated latents summed out inside)."""
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
    data_plate: str | None = None,
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
    data_plate: str | None = None,
    return_stderr: bool = False,
):
    """Importance-sampling estimate of log p(x_n), ``[N]`` (and its standard error if asked).

    With several observed sites it is log p of all of them (``program_info(...).density_name``
    names it, e.g. ``log p(x, y)``)."""
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
    The program runs on the particle path :func:`~ppvae.inference.program.program_info` chose
    (vectorised or replicated), like every estimator.
    """

    def __init__(
        self, model: Callable, guide: Callable, x, y=None, *, data_plate: str | None = None
    ):
        self.model, self.guide = model, guide
        self.data = ProgramData.of(x, y)
        check_inputs(model, guide, self.data)
        self.info = program_info(model, guide, self.data, data_plate)
        if self.info.enumerated:
            raise ContractError(
                "this program enumerates discrete latents; samplers move continuous latents "
                "only (use the importance-sampling estimators, which sum them out)"
            )
        self.data_plate = self.info.data_plate
        self.num_data = self.data.num_points
        self.vectorised = self.info.particles == VECTORISED
        with torch.no_grad(), forked_rng(self.data.device):
            _, values = chunk_log_weights(model, guide, self.data, 1, self.info, keep_values=True)
        # name -> (value shape with one particle, index of the data axis, flat slice)
        self.sites: dict[str, tuple[tuple[int, ...], int, slice]] = {}
        offset = 0
        self.real_support = True
        for name, (value, site) in values.items():
            event_dim = len(site["fn"].event_shape)
            data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == self.data_plate)
            shape = tuple(value.shape)
            if self.vectorised:
                batch_ndim = self.info.nesting + 1
                shape = (1,) * (batch_ndim + event_dim - len(shape)) + shape
            else:
                batch_ndim = len(shape) - event_dim
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
    def x(self) -> torch.Tensor:
        return self.data.first

    @property
    def site_shapes(self) -> dict[str, tuple[slice, tuple[int, ...]]]:
        """``{site: (slice of the flat vector, shape of the site per point and draw)}``."""
        shapes = {}
        for name, (shape, axis, where) in self.sites.items():
            skip = (0, axis) if self.vectorised else (axis,)
            shapes[name] = (where, tuple(n for i, n in enumerate(shape) if i not in skip))
        return shapes

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Site values (as the sites take them with K particles) -> ``[K, N, D]``."""
        parts = []
        for name, (shape, axis, _) in self.sites.items():
            value = values[name]
            if self.vectorised:
                value = value.reshape((1,) * (len(shape) - value.dim()) + tuple(value.shape))
                num = value.shape[0]
                value = value.movedim(axis, 1)
            else:
                num = value.shape[axis] // self.num_data
                value = value.unflatten(axis, (num, self.num_data)).movedim(axis, 0)
                value = value.movedim(axis + 1, 1)
            parts.append(value.reshape(num, self.num_data, -1))
        return torch.cat(parts, dim=-1)

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[K, N, D]`` -> site values in the shapes the sites take with K particles."""
        num = z.shape[0]
        values = {}
        for name, (shape, axis, where) in self.sites.items():
            rest = [size for i, size in enumerate(shape) if i not in (0, axis)]
            if self.vectorised:
                value = z[..., where].reshape([num, self.num_data] + rest).movedim(1, axis)
            else:
                rest = [size for i, size in enumerate(shape) if i != axis]
                value = z[..., where].reshape([num, self.num_data] + rest)
                value = value.movedim(1, axis + 1).movedim(0, axis).flatten(axis, axis + 1)
            values[name] = value
        return values

    def sample_guide(self, num_particles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``z ~ q(z | x_n)``: ``([K, N, D], log q(z | x_n) [K, N])``."""
        trace = self._trace(self.guide, num_particles)
        z = self.pack({n: s["value"] for n, s in sample_sites(trace) if not s["is_observed"]})
        return z, self._sum(trace, num_particles)

    def _trace(self, fn: Callable, num_particles: int, values: dict | None = None):
        fn = fn if values is None else poutine.condition(fn, data=values)
        if self.vectorised:
            with pyro.plate(PARTICLE_PLATE, num_particles, dim=self.info.particle_dim):
                return poutine.trace(fn).get_trace(*self.data.args, **self.data.kwargs)
        data = self.data.tile(num_particles)
        return poutine.trace(fn).get_trace(*data.args, **data.kwargs)

    def _sum(self, trace, num_particles: int) -> torch.Tensor:
        particle_dim = self.info.particle_dim if self.vectorised else None
        total = self.x.new_zeros(num_particles, self.num_data)
        for _, site in sample_sites(trace):
            total = total + site_log_prob(
                site, self.data_plate, particle_dim, num_particles, self.num_data, False
            )
        return total

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log p(x_n, z_kn), ``[K, N]``."""
        return self._sum(self._trace(self.model, z.shape[0], self.unpack(z)), z.shape[0])

    def _prior_model(self) -> Callable:
        """The model with its observed sites hidden: its trace holds p(z) only."""
        return poutine.block(self.model, hide_fn=lambda msg: msg["is_observed"])

    def sample_prior(self, num_particles: int) -> torch.Tensor:
        """``z ~ p(z)`` (the model's latent sites drawn from their priors): ``[K, N, D]``. Every
        latent needs a proper prior."""
        trace = self._trace(self._prior_model(), num_particles)
        return self.pack({name: trace.nodes[name]["value"] for name in self.sites})

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z_kn) of the latent sites alone, ``[K, N]``."""
        trace = self._trace(self._prior_model(), z.shape[0], self.unpack(z))
        return self._sum(trace, z.shape[0])

    def guide_distributions(self) -> dict[str, object]:
        """The guide's distribution at every latent site, one draw per point (no particle
        dimension): ``{site: fn}`` with batch shape ``[N, ...]``."""
        trace = poutine.trace(self.guide).get_trace(*self.data.args, **self.data.kwargs)
        return {n: s["fn"] for n, s in sample_sites(trace) if not s["is_observed"]}

    def log_guide(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z_kn | x_n), ``[K, N]``."""
        return self._sum(self._trace(self.guide, z.shape[0], self.unpack(z)), z.shape[0])
