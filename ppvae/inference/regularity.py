"""Regularity of a latent space, measured: interpolation, continuity, completeness, and the
aggregate posterior against the prior ("ELBO surgery").

An autoencoder's code space need not be *continuous* (nearby codes decode to similar data) nor
*complete* (codes drawn from a prior decode to data); the KL term of the ELBO is what is meant to
buy both for a VAE [1]. Everything here reads a model through its Pyro program — one latent site
of the guide (the first one unless ``site=`` names another) and the matching site of the model —
and decodes with ``module.decode(z, y)`` when the module has one, else by running the model with
the site conditioned on ``z`` and reading the mean of its observed site.

**Interpolation** between two inputs with guide means :math:`a, b`: linear,
:math:`z(t) = (1 - t) a + t b`, or spherical [2],
:math:`z(t) = \\frac{\\sin((1 - t) ω)}{\\sin ω} a + \\frac{\\sin(t ω)}{\\sin ω} b` with
:math:`\\cos ω = a^\\top b / (\\|a\\| \\|b\\|)`, at T equally spaced t in [0, 1].

**Continuity**: along each path, the decoded change per step,
:math:`s_i = \\|\\bar x(t_{i+1}) - \\bar x(t_i)\\|_2 / \\sqrt{D}` (root mean square over the D
output elements, :math:`\\bar x = \\mathbb{E}[x \\mid z]`). Reported, averaged over paths: the
largest step and the mean step; their ratio (1 for a morph that changes evenly, up to T − 1 for
one that jumps at one step); and the detour :math:`\\sum_i s_i / \\|\\bar x(1) - \\bar x(0)\\|`
(1 for a straight, even morph; larger when the path passes through other images on the way).
The ratio and the detour are scale-free: comparable across models whatever the scale of their
codes or the sharpness of their reconstructions.

**Completeness**: one code per data point, :math:`z_n \\sim q(z \\mid x_n)` (the code itself for
a point-mass encoder), and as many reference draws :math:`\\tilde z_j` from the prior p(z) (or,
with an improper prior such as an AE's, from the Gaussian with the codes' mean and covariance).
The latent score is the nearest-neighbour distance ratio

.. math::

    C_z = \\frac{\\operatorname{median}_j \\min_n \\|\\tilde z_j - z_n\\|}
        {\\operatorname{median}_n \\min_{m \\ne n} \\|z_n - z_m\\|},

≈ 1 when the draws land where the encoder puts data (q(z) = p(z)) and large when they fall in
holes between the data's codes. :math:`C_x` is the same ratio between the decoded draws and the
decoded codes (distances in the output space).

**ELBO surgery** [3]: with the aggregate posterior :math:`q(z) = \\frac{1}{N} \\sum_n
q(z \\mid x_n)` over the N given points,

.. math::

    \\frac{1}{N} \\sum_n \\mathrm{KL}(q(z \\mid x_n) \\,\\|\\, p(z))
        = I_q(n; z) + \\mathrm{KL}(q(z) \\,\\|\\, p(z)),

    I_q(n; z) = \\mathbb{E}_{n, z \\sim q(z \\mid x_n)}[\\log q(z \\mid x_n) - \\log q(z)]
        \\le \\log N, \\qquad
    \\mathrm{KL}(q(z) \\,\\|\\, p(z)) = \\mathbb{E}[\\log q(z) - \\log p(z)].

Estimator: S draws :math:`z_{ns} \\sim q(z \\mid x_n)` per point; :math:`\\log q(z_{ns})` is the
exact log-density of the N-component mixture (all N points, chunked); each term is the mean of
its N S per-draw values. The average over the N points is exact, so the standard error counts
the spread over draws only, :math:`\\sqrt{\\overline{\\operatorname{Var}_s} / (S N)}` (with
S = 1, the spread over all draws: conservative). The identity holds draw by draw, so the two
terms add up to the Monte Carlo average KL exactly and to the closed-form average KL within the
error. For a point-mass encoder (an AE) q(z|x) has no density: the average KL is infinite and
KL(q(z) ‖ p(z)) undefined (an empirical measure against an improper prior); what is defined is
I(n; z) = H(codes), log N when the codes are distinct — reported with a note.

[1] Auto-Encoding Variational Bayes, Kingma, Welling (2014).
[2] Sampling Generative Networks, White (2016).
[3] ELBO surgery: yet another way to carve up the variational evidence lower bound,
    Hoffman, Johnson (NIPS 2016 Workshop on Advances in Approximate Bayesian Inference).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro.poutine as poutine
import torch
from pyro.distributions import Delta, ImproperUniform
from pyro.poutine.util import site_is_subsample

from ppvae.errors import PPVAEError

INTERPOLATIONS = ("linear", "spherical")
# elements of a [chunk, N, ...] log-density table held at once
_CHUNK_ELEMENTS = 2**24


# --- reading the program -------------------------------------------------------------------------


def _args(x: torch.Tensor, y: torch.Tensor | None) -> tuple:
    return (x,) if y is None else (x, y)


def _base(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _latents(trace) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _site(module, x, y, site: str | None):
    """(name, guide site) of the latent studied; one-line errors for programs without one."""
    latents = _latents(poutine.trace(module.guide).get_trace(*_args(x, y)))
    if not latents:
        raise PPVAEError("the guide samples no latent site; there is no code space to measure")
    name = next(iter(latents)) if site is None else site
    if name not in latents:
        raise PPVAEError(f"the guide has no latent site {name!r}; use one of {', '.join(latents)}")
    return name, latents[name]


def latent_site(module, x: torch.Tensor, y: torch.Tensor | None = None, site: str | None = None):
    """The name of the latent site studied: ``site``, else the guide's first latent site."""
    return _site(module, x[:1], None if y is None else y[:1], site)[0]


def _check_continuous(name: str, guide_site) -> None:
    if getattr(guide_site["fn"].support, "is_discrete", False):
        raise PPVAEError(
            f"latent site {name!r} is discrete: distances between codes are not defined; "
            "interpolation, continuity and completeness need a continuous latent"
        )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's RNG seeded for the block; the caller's RNG state restored after it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _flat(value: torch.Tensor, num_points: int) -> torch.Tensor:
    return value.reshape(num_points, -1)


@torch.no_grad()
def encoded_means(
    module, x: torch.Tensor, y: torch.Tensor | None = None, *, site: str | None = None
) -> torch.Tensor:
    """Mean of q(z|x_n) at the latent site (the code itself for a point mass): ``[N, d]``."""
    name, guide_site = _site(module, x, y, site)
    _check_continuous(name, guide_site)
    fn = guide_site["fn"]
    base = _base(fn)
    mean = base.v if isinstance(base, Delta) else fn.mean
    return _flat(torch.broadcast_to(mean, guide_site["value"].shape), x.shape[0])


@torch.no_grad()
def decode(
    module, z: torch.Tensor, y: torch.Tensor | None = None, *, like: torch.Tensor, site: str
) -> torch.Tensor:
    """E[x|z] ``[M, D]`` for codes ``z`` ``[M, d]``: ``module.decode`` when it exists, else the
    model run with ``site`` conditioned on z, read at its observed site (``like``: any input row,
    used only as a placeholder observation)."""
    method = getattr(module, "decode", None)
    if method is not None:
        return method(z, y).reshape(z.shape[0], -1)
    placeholder = like[:1].expand(z.shape[0], *like.shape[1:])
    conditioned = poutine.condition(module.model, data={site: z})
    trace = poutine.trace(conditioned).get_trace(*_args(placeholder, y))
    observed = [
        node
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and node["is_observed"] and name != site
    ]
    if not observed:
        raise PPVAEError("the model observes no site; pass the data as obs=x inside the model")
    fn = observed[0]["fn"]
    return torch.broadcast_to(fn.mean, observed[0]["value"].shape).reshape(z.shape[0], -1)


# --- interpolation and continuity ---------------------------------------------------------------


def interpolation_path(
    a: torch.Tensor, b: torch.Tensor, steps: int, method: str = "linear"
) -> torch.Tensor:
    """Codes along the path from ``a`` to ``b`` (``[P, d]`` each): ``[P, steps, d]``."""
    if method not in INTERPOLATIONS:
        choices = ", ".join(INTERPOLATIONS)
        raise PPVAEError(f"unknown interpolation {method!r}; use one of {choices}")
    if steps < 2:
        raise PPVAEError(f"an interpolation path needs at least 2 steps, got {steps}")
    t = torch.linspace(0, 1, steps, dtype=a.dtype, device=a.device)[None, :, None]  # [1, T, 1]
    linear = (1 - t) * a[:, None] + t * b[:, None]
    if method == "linear":
        return linear
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    omega = torch.acos(cosine)[:, None, None]  # [P, 1, 1]
    sin = torch.sin(omega)
    spherical = (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / sin
    return torch.where(sin.abs() > 1e-6, spherical, linear)  # parallel codes: the line


@dataclass
class Interpolation:
    """Codes ``z`` ``[P, T, d]`` and decoded means ``images`` ``[P, T, D]`` of P paths."""

    z: torch.Tensor
    images: torch.Tensor
    method: str


@torch.no_grad()
def interpolate(
    module,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    y_a: torch.Tensor | None = None,
    y_b: torch.Tensor | None = None,
    *,
    steps: int = 10,
    method: str = "linear",
    site: str | None = None,
) -> Interpolation:
    """Decoded paths between the guide means of ``x_a[p]`` and ``x_b[p]``. A conditional model
    decodes the whole path with the label of its start, ``y_a``."""
    if x_a.shape != x_b.shape:
        raise PPVAEError(f"x_a and x_b must have the same shape, got {x_a.shape} and {x_b.shape}")
    name, _ = _site(module, x_a[:1], None if y_a is None else y_a[:1], site)
    a = encoded_means(module, x_a, y_a, site=name)
    b = encoded_means(module, x_b, y_b if y_b is not None else y_a, site=name)
    z = interpolation_path(a, b, steps, method)  # [P, T, d]
    labels = None if y_a is None else y_a.repeat_interleave(steps)
    images = decode(module, z.reshape(-1, z.shape[-1]), labels, like=x_a, site=name)
    return Interpolation(z, images.reshape(*z.shape[:2], -1), method)


def random_pairs(num_points: int, num_pairs: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``num_pairs`` seeded index pairs (i, j), i ≠ j, of ``num_points`` points."""
    if num_points < 2:
        raise PPVAEError(f"pairs need at least 2 data points, got {num_points}")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(num_points, (num_pairs,), generator=generator)
    shift = torch.randint(1, num_points, (num_pairs,), generator=generator)
    return first, (first + shift) % num_points


def interpolate_pairs(
    module, x, y=None, *, num_pairs: int, seed: int = 0, steps: int, method: str, site=None
):
    """``(first, second, path)``: ``num_pairs`` seeded pairs of points of ``x`` and the decoded
    interpolation path between each pair (:func:`interpolate`)."""
    first, second = random_pairs(x.shape[0], num_pairs, seed)
    path = interpolate(
        module,
        x[first],
        x[second],
        None if y is None else y[first],
        None if y is None else y[second],
        steps=steps,
        method=method,
        site=site,
    )
    return first, second, path


@dataclass
class Continuity:
    """Decoded change per step along interpolation paths (RMS per output element)."""

    max_step: float  # mean over paths of the largest step
    mean_step: float  # mean over paths and steps
    max_to_mean: float  # mean over paths of largest / mean step: 1 = even change
    detour: float  # mean over paths of path length / distance between its decoded ends
    num_pairs: int
    steps: int
    method: str
    max_step_per_path: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict:
        keys = ("max_step", "mean_step", "max_to_mean", "detour", "num_pairs", "steps", "method")
        return {key: getattr(self, key) for key in keys}


@torch.no_grad()
def continuity(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_pairs: int = 200,
    steps: int = 16,
    method: str = "linear",
    seed: int = 0,
    site: str | None = None,
) -> Continuity:
    """Continuity along ``num_pairs`` seeded interpolation paths between points of ``x``."""
    _, _, path = interpolate_pairs(
        module, x, y, num_pairs=num_pairs, seed=seed, steps=steps, method=method, site=site
    )
    images = path.images.double()
    step = (images[:, 1:] - images[:, :-1]).norm(dim=-1) / math.sqrt(images.shape[-1])  # [P, T-1]
    largest = step.max(dim=1).values
    ratio = largest / step.mean(dim=1).clamp_min(1e-12)
    chord = (images[:, -1] - images[:, 0]).norm(dim=-1) / math.sqrt(images.shape[-1])
    detour = step.sum(dim=1) / chord.clamp_min(1e-12)
    return Continuity(
        max_step=float(largest.mean()),
        mean_step=float(step.mean()),
        max_to_mean=float(ratio.mean()),
        detour=float(detour.mean()),
        num_pairs=num_pairs,
        steps=steps,
        method=method,
        max_step_per_path=largest.float(),
    )


# --- completeness --------------------------------------------------------------------------------


def nearest_distance(queries: torch.Tensor, points: torch.Tensor, *, exclude_self: bool = False):
    """Euclidean distance from each row of ``queries`` to its nearest row of ``points``: ``[M]``.
    With ``exclude_self`` (queries is points) a row's distance to itself is left out."""
    out = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, points.shape[0]))
    for start in range(0, queries.shape[0], chunk):
        distance = torch.cdist(queries[start : start + chunk].double(), points.double())
        if exclude_self:
            rows = torch.arange(distance.shape[0], device=distance.device)
            distance[rows, rows + start] = math.inf
        out.append(distance.min(dim=1).values)
    return torch.cat(out)


@dataclass
class Completeness:
    """Nearest-neighbour distance ratios of reference draws to encoded codes (module docstring):
    ``latent_ratio`` C_z and ``decoded_ratio`` C_x, ≈ 1 when draws land among the data."""

    latent_ratio: float
    decoded_ratio: float
    reference: str  # "prior" or "fitted Gaussian" (improper prior)
    num_points: int

    def to_dict(self) -> dict:
        keys = ("latent_ratio", "decoded_ratio", "reference", "num_points")
        return {key: getattr(self, key) for key in keys}


def _prior_draws(module, x, y, name: str):
    """One draw of the site from the model's prior per point, or None for an improper prior."""
    try:
        trace = poutine.trace(module.model).get_trace(*_args(x, y))
    except NotImplementedError:  # a prior that cannot be sampled: ImproperUniform
        return None
    model_site = trace.nodes.get(name)
    if model_site is None or model_site["type"] != "sample":
        raise PPVAEError(f"the model has no sample site {name!r} to match the guide's")
    if _is_improper(model_site["fn"]):
        return None
    return _flat(model_site["value"], x.shape[0])


def _is_improper(fn) -> bool:
    return isinstance(_base(fn), ImproperUniform)


def _fitted_gaussian_draws(codes: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` draws from the Gaussian with the mean and covariance of ``codes``."""
    mean = codes.double().mean(dim=0)
    centred = codes.double() - mean
    cov = centred.T @ centred / max(1, codes.shape[0] - 1)
    cov = cov + 1e-9 * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(cov.shape[0])
    noise = torch.randn(num, codes.shape[1], dtype=torch.float64)
    return (mean + noise @ torch.linalg.cholesky(cov).T).to(codes.dtype)


@torch.no_grad()
def completeness(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    reference: str = "auto",
    seed: int = 0,
    site: str | None = None,
) -> Completeness:
    """C_z and C_x over the points of ``x`` with as many reference draws (module docstring).
    ``reference``: ``"prior"``, ``"fitted"`` (the Gaussian with the codes' mean and covariance)
    or ``"auto"`` (the prior unless it is improper)."""
    if reference not in ("auto", "prior", "fitted"):
        raise PPVAEError(f"unknown reference {reference!r}; use auto, prior or fitted")
    with _seeded(seed, x.device):
        name, guide_site = _site(module, x, y, site)
        _check_continuous(name, guide_site)
        codes = _flat(guide_site["value"], x.shape[0])
        draws = None if reference == "fitted" else _prior_draws(module, x, y, name)
        if draws is None and reference == "prior":
            raise PPVAEError(
                f"the prior of site {name!r} is improper: nothing to draw from; use "
                "reference='fitted' (a Gaussian fitted to the codes)"
            )
        used = "prior" if draws is not None else "fitted Gaussian"
        if draws is None:
            draws = _fitted_gaussian_draws(codes.cpu(), x.shape[0]).to(codes.device)
    spacing = nearest_distance(codes, codes, exclude_self=True).median()
    latent = nearest_distance(draws, codes).median() / spacing
    decoded_codes = decode(module, codes, y, like=x, site=name)
    decoded_draws = decode(module, draws, y, like=x, site=name)
    decoded_spacing = nearest_distance(decoded_codes, decoded_codes, exclude_self=True).median()
    decoded = nearest_distance(decoded_draws, decoded_codes).median() / decoded_spacing
    return Completeness(float(latent), float(decoded), used, x.shape[0])


# --- ELBO surgery -------------------------------------------------------------------------------


@dataclass
class ELBOSurgery:
    """Average KL = I(n; z) + KL(q(z) ‖ p(z)) in nats per point, each ± its standard error;
    None where undefined (``note`` says why)."""

    num_points: int
    num_samples: int
    site: str
    average_kl: float | None = None
    average_kl_stderr: float | None = None
    mutual_information: float | None = None
    mutual_information_stderr: float | None = None
    marginal_kl: float | None = None
    marginal_kl_stderr: float | None = None
    log_num_points: float = 0.0  # the upper bound of I(n; z)
    note: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean of ``[S, N]`` per-draw values and its Monte Carlo standard error: the average over
    the N points is exact, so only the spread over the S draws of each point counts,
    √(mean_n Var_s / (S N)); with S = 1, the spread over all draws (conservative)."""
    values = values.double()
    draws, points = values.shape
    if draws > 1:
        stderr = (values.var(dim=0).mean() / (draws * points)).sqrt()
    else:
        stderr = values.std() / math.sqrt(points) if points > 1 else torch.tensor(0.0)
    return float(values.mean()), float(stderr)


def _mixture_log_density(fn, values: torch.Tensor, num_points: int) -> torch.Tensor:
    """log q(z) = logsumexp_m log q(z | x_m) − log N for each row of ``values`` ``[M, ...]``."""
    out = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_points * values[0].numel()))
    for start in range(0, values.shape[0], chunk):
        part = values[start : start + chunk].unsqueeze(1)  # [c, 1, ...] against batch [N]
        table = fn.log_prob(part)  # [c, N]
        out.append(torch.logsumexp(table.double(), dim=1) - math.log(num_points))
    return torch.cat(out)


def _per_point_fn(fn, num_points: int):
    """The site's distribution with every batch dim right of the data dim folded into the event."""
    batch = fn.batch_shape
    if len(batch) == 0 or batch[0] != num_points:
        raise PPVAEError(
            "ELBO surgery needs the latent site's leftmost batch dimension to be the data plate; "
            f"got batch shape {tuple(batch)} for {num_points} points"
        )
    return fn.to_event(len(batch) - 1) if len(batch) > 1 else fn


@torch.no_grad()
def elbo_surgery(
    module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_samples: int = 4,
    seed: int = 0,
) -> ELBOSurgery:
    """Hoffman & Johnson's split of the average KL over the points of ``x`` (module docstring),
    with ``num_samples`` draws per point. Needs a guide with one latent site."""
    num_points = x.shape[0]
    with _seeded(seed, x.device):
        guide_trace = poutine.trace(module.guide).get_trace(*_args(x, y))
        latents = _latents(guide_trace)
        result = ELBOSurgery(
            num_points, num_samples, ", ".join(latents), log_num_points=math.log(num_points)
        )
        if len(latents) != 1:
            result.note = (
                f"not estimated: the guide has {len(latents)} latent sites ({result.site}); the "
                "split needs one site with a prior that depends on no other latent"
            )
            return result
        ((name, site),) = latents.items()
        if isinstance(_base(site["fn"]), Delta):
            codes = _flat(site["value"], num_points)
            distinct = torch.unique(codes, dim=0).shape[0]
            counts = torch.unique(codes, dim=0, return_counts=True)[1].double() / num_points
            result.mutual_information = float(-(counts * counts.log()).sum())
            result.mutual_information_stderr = 0.0
            result.note = (
                f"point-mass encoder ({name!r}): q(z|x) has no density, so the average KL is "
                "infinite and KL(q(z) || p(z)) undefined; I(n; z) = H(codes) is exact "
                f"({distinct} distinct codes of {num_points})"
            )
            return result
        q_fn = _per_point_fn(site["fn"], num_points)
        log_q, log_p, log_aggregate = [], [], []
        for _sample in range(num_samples):
            trace = poutine.trace(module.guide).get_trace(*_args(x, y))
            model_trace = poutine.trace(poutine.replay(module.model, trace=trace)).get_trace(
                *_args(x, y)
            )
            prior = model_trace.nodes[name]["fn"]
            if _is_improper(prior):
                result.note = f"not estimated: the prior of {name!r} is improper"
                return result
            value = trace.nodes[name]["value"]
            fn = _per_point_fn(trace.nodes[name]["fn"], num_points)
            log_q.append(fn.log_prob(value).double())
            log_p.append(_per_point_fn(prior, num_points).log_prob(value).double())
            log_aggregate.append(_mixture_log_density(q_fn, value, num_points))
    log_q, log_p, log_aggregate = (torch.stack(v) for v in (log_q, log_p, log_aggregate))
    result.average_kl, result.average_kl_stderr = _mean_stderr(log_q - log_p)
    result.mutual_information, result.mutual_information_stderr = _mean_stderr(
        log_q - log_aggregate
    )
    result.marginal_kl, result.marginal_kl_stderr = _mean_stderr(log_aggregate - log_p)
    return result


# --- collapse, in one line -----------------------------------------------------------------------


def collapse_warning(active_units: int | None, latent_units: int | None) -> str | None:
    """A warning line with the fix when at most a tenth of the continuous latent units are active
    (:func:`ppvae.inference.collapse.active_units`); None otherwise or where active units are not
    defined. Measured on the digits, free bits revived a collapsed HVAE that a KL warm-up did not
    (``ppvae.models.hvae``), so they come first."""
    if active_units is None or not latent_units or active_units * 10 > latent_units:
        return None
    return (
        f"warning: posterior collapse: {active_units} of {latent_units} latent units are active, "
        "so the decoder ignores most of z (samples and reconstructions look alike); retrain with "
        "free bits (--free-bits 0.1), a KL warm-up (--kl-warmup 10) or fewer latent units"
    )


# --- everything, for a table ---------------------------------------------------------------------


def regularity_summary(
    module, x: torch.Tensor, y: torch.Tensor | None = None, *, seed: int = 0
) -> dict[str, dict]:
    """:func:`continuity`, :func:`completeness` and :func:`elbo_surgery` on the points of ``x``
    as JSON-ready dicts; a measure that does not exist for the model (a discrete latent, a
    program without one) becomes ``{"note": why}``."""
    out: dict[str, dict] = {}
    measures = {
        "continuity": lambda: continuity(module, x, y, seed=seed).to_dict(),
        "completeness": lambda: completeness(module, x, y, seed=seed).to_dict(),
        "elbo_surgery": lambda: elbo_surgery(module, x, y, seed=seed).to_dict(),
    }
    for name, measure in measures.items():
        try:
            out[name] = measure()
        except PPVAEError as error:
            out[name] = {"note": str(error)}
    return out
