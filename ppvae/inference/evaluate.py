"""``evaluate``: every per-point bound, log p(x) and importance-weight diagnostic in one pass.

For each data point the K = ``num_samples`` log-weights
:math:`\\log w_{kn} = \\log p(x_n, z_k) - \\log q(z_k \\mid x_n)` are drawn once
(:func:`ppvae.inference.importance.log_weights`) and every number is read off them:

.. math::

    \\text{ELBO}_n = \\frac{1}{K} \\sum_k \\log w_{kn}, \\qquad
    \\text{IWAE}^{(k)}_n = \\frac{1}{B} \\sum_{b=1}^{B} \\log \\frac{1}{k}
        \\sum_{j \\in \\text{block } b} w_{jn}, \\quad B = \\lfloor K / k \\rfloor,

    \\log \\hat p(x_n) = \\log \\frac{1}{K} \\sum_k w_{kn}, \\qquad
    \\text{gap}_n = \\log \\hat p(x_n) - \\text{ELBO}_n \\approx \\mathrm{KL}(q(z \\mid x_n)
        \\,\\|\\, p(z \\mid x_n)).

Each rung of the ladder averages the k-sample bound [1] over the B disjoint blocks of the same
particles: an unbiased estimate of :math:`\\mathbb{E}[\\text{IWAE}^{(k)}]` with lower variance than
one k-sample draw. The top rung (k = K) is :math:`\\log \\hat p(x)`, with the delta-method standard
error of ``importance.log_marginal_stderr``. Diagnostics per point: Kish's effective sample size
and the Pareto-smoothed importance sampling shape :math:`\\hat k` [2] of the weights
(``arviz.psislw``); :math:`\\hat k > 0.7` means the log p(x) estimate is not to be trusted [2, 3].

Guides with a continuous point mass (autoencoders: ``Delta``) have no importance weights: their
report carries no bound, says so, and keeps the reconstruction metrics every model gets. A guide
that is one-hot on a discrete latent (a VQ-VAE's) has constant weights: every rung equals the ELBO,
which the report keeps and labels a lower bound, not an estimate of log p(x).

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
[2] Pareto Smoothed Importance Sampling, Vehtari, Simpson, Gelman, Yao, Gabry (JMLR 2024).
[3] Yes, but Did It Work?: Evaluating Variational Inference, Yao, Vehtari, Simpson, Gelman (2018).
"""

from __future__ import annotations

import json
import math
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.distributions import Delta, MaskedDistribution, Unit
from torch import nn
from tqdm.auto import tqdm

from ppvae.checkpoint import atomic_write_text
from ppvae.errors import ContractError, PPVAEError
from ppvae.inference import distributed
from ppvae.inference.collapse import collapse_metrics
from ppvae.inference.importance import (
    base_distribution,
    effective_sample_size,
    forked_rng,
    log_marginal_stderr,
    log_mean_exp,
    log_weights,
    sample_sites,
)
from ppvae.inference.program import ProgramData, program_info, trace_pair
from ppvae.inference.train import resolve_device

DEFAULT_LADDER = (1, 5, 50, 500, 5000)
KHAT_THRESHOLD = 0.7
# arviz fits the Pareto tail to the top min(K/5, 3√K) weights and needs more than 4 of them.
MIN_PSIS_SAMPLES = 25
# Log-weights that differ by less than this many float eps (relative) are equal up to rounding.
CONSTANT_WEIGHT_EPS = 64

POINT_MASS_NOTE = (
    "this model has a point-mass guide (site {sites}): no likelihood bound exists (no ELBO, IWAE "
    "bound or log p(x)); compare it by reconstruction error instead"
)
ONE_HOT_NOTE = (
    "the guide puts all its mass on one value of the discrete site {sites}: every importance "
    "weight is the same, so every bound equals the ELBO and 'log p(x)' is only that lower bound; "
    "its zero standard error and full ESS say nothing about the distance to the true log p(x), "
    "and PSIS k̂ is not estimated"
)

ACTIVE_UNITS_UNDEFINED = "not defined (no continuous latent)"

_PER_POINT = (
    "elbo_per_point",
    "elbo_stderr_per_point",
    "log_px_per_point",
    "log_px_stderr_per_point",
    "gap_per_point",
    "khat_per_point",
    "ess_per_point",
    "reconstruction_mse_per_point",
    "reconstruction_bce_per_point",
)


@dataclass
class EvaluationReport:
    """Per-point tensors ``[N]`` (CPU) and their means; bound fields are None without a bound.

    ``ladder`` maps k to the mean k-sample bound (its top, k = ``num_samples``, is ``log_px``).
    ``log_px_stderr`` is the standard error of the mean ``log_px``; ``mean_log_px_stderr`` the
    average per-point standard error. ``khat_per_point`` is -inf where all weights are equal up
    to rounding (a perfect guide) and NaN when ``num_samples`` is too small for PSIS or the guide
    is one-hot. ``point_mass_sites`` names guide sites with all their mass on one value: a
    continuous one (Delta) leaves no bound (``likelihood_available`` False, ``num_samples`` 0); a
    discrete one-hot site leaves only the ELBO (``note`` says so). ``active_units`` /
    ``latent_units`` count continuous latents only: None (and "not defined" in the table) for a
    guide without one, such as a VQ-VAE's codes.
    """

    num_points: int
    num_samples: int
    likelihood_available: bool
    note: str | None = None
    point_mass_sites: list[str] = field(default_factory=list)
    seed: int | None = None
    split_points: int | None = None  # points in the split before a num_points subset
    observed_sites: list[str] = field(default_factory=list)  # what log p(...) is of
    density_name: str = "log p(x)"  # "log p(x, y)" when the model observes x and y
    particle_path: str | None = None  # "vectorised" or "replicated" (see program_info)
    elbo: float | None = None
    log_px: float | None = None
    log_px_stderr: float | None = None
    mean_log_px_stderr: float | None = None
    gap: float | None = None
    ladder: dict[int, float] = field(default_factory=dict)
    khat_threshold: float = KHAT_THRESHOLD
    khat_share_above: float | None = None
    mean_ess: float | None = None
    reconstruction_site: str | None = None
    reconstruction_mse: float | None = None
    reconstruction_bce: float | None = None
    reconstruction_note: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    active_units: int | None = None  # Burda et al.: Var_x(E_q[z_d]) > 0.01, continuous z only
    latent_units: int | None = None
    kl: float | None = None  # mean over points of KL(q(z|x) || p(z))
    kl_per_dim: dict[str, list[float]] = field(default_factory=dict)
    elbo_per_point: torch.Tensor | None = None
    elbo_stderr_per_point: torch.Tensor | None = None
    log_px_per_point: torch.Tensor | None = None
    log_px_stderr_per_point: torch.Tensor | None = None
    gap_per_point: torch.Tensor | None = None
    ladder_per_point: dict[int, torch.Tensor] = field(default_factory=dict)
    khat_per_point: torch.Tensor | None = None
    ess_per_point: torch.Tensor | None = None
    reconstruction_mse_per_point: torch.Tensor | None = None
    reconstruction_bce_per_point: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: floats, strings, lists; NaN becomes None and ±inf the strings "inf" /
        "-inf" (a k̂ of equal weights), so a loaded report keeps them apart."""
        out: dict[str, Any] = {}
        per_point: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _PER_POINT:
                per_point[f.name.removesuffix("_per_point")] = _json_value(value)
            elif f.name == "ladder_per_point":
                per_point["ladder"] = {str(k): _json_value(v) for k, v in value.items()}
            elif f.name == "ladder":
                out["ladder"] = {str(k): _json_value(v) for k, v in value.items()}
            else:
                out[f.name] = _json_value(value)
        out["per_point"] = per_point
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict` (None in per-point lists comes back as NaN)."""
        kwargs = {k: v for k, v in data.items() if k not in ("per_point", "ladder")}
        kwargs["ladder"] = {int(k): v for k, v in data.get("ladder", {}).items()}
        per_point = data.get("per_point", {})
        for name in _PER_POINT:
            values = per_point.get(name.removesuffix("_per_point"))
            kwargs[name] = None if values is None else _tensor(values)
        kwargs["ladder_per_point"] = {
            int(k): _tensor(v) for k, v in per_point.get("ladder", {}).items()
        }
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text, also written atomically to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(text, path)
        return text

    @property
    def one_hot_note(self) -> str:
        """Why a one-hot guide's report shows the ELBO alone."""
        sites = ", ".join(repr(name) for name in self.point_mass_sites)
        return f"every IWAE bound equals it: the guide is one-hot on {sites}; no log p(x) or gap"

    def summary_table(self) -> str:
        """A short table for people: bounds, log p(x) ± s.e., gap, k̂ and ESS (or the note)."""
        rows = [("points", f"{self.num_points}")]
        if self.split_points is not None and self.split_points != self.num_points:
            rows[0] = (
                "points",
                f"{self.num_points} of {self.split_points} (seeded subset, seed {self.seed})",
            )
        if not self.likelihood_available:
            rows.append(("likelihood bound", "none"))
        elif self.point_mass_sites:
            rows.append(("ELBO", f"{self.elbo:.3f} ({self.one_hot_note})"))
        else:
            rows.append(("importance samples K", f"{self.num_samples}"))
            rows.append(("ELBO", f"{self.elbo:.3f}"))
            for k, bound in self.ladder.items():
                if 1 < k < self.num_samples:
                    rows.append((f"IWAE bound, k={k}", f"{bound:.3f}"))
            rows.append(
                (
                    self.density_name,
                    f"{self.log_px:.3f} ± {self.log_px_stderr:.3f} (s.e. of the mean; "
                    f"{self.mean_log_px_stderr:.3f} per point on average)",
                )
            )
            rows.append((f"gap {self.density_name} − ELBO", f"{self.gap:.3f}"))
            if self.khat_share_above is not None:
                rows.append(
                    (
                        f"PSIS k̂ > {self.khat_threshold}",
                        f"{100 * self.khat_share_above:.1f}% of points",
                    )
                )
            rows.append(("mean ESS", f"{self.mean_ess:.1f} of {self.num_samples}"))
        if self.reconstruction_mse is not None:
            rows.append(
                (f"reconstruction MSE ({self.reconstruction_site})", _fmt(self.reconstruction_mse))
            )
        if self.reconstruction_bce is not None:
            rows.append(
                (f"reconstruction BCE ({self.reconstruction_site})", _fmt(self.reconstruction_bce))
            )
        if self.kl is not None:
            rows.append(
                (
                    "active units",
                    ACTIVE_UNITS_UNDEFINED
                    if self.active_units is None
                    else f"{self.active_units} of {self.latent_units}",
                )
            )
            rows.append(("KL(q(z|x) || p(z))", f"{self.kl:.3f} nats"))
        extra = dict(self.extra)
        if "codebook_usage" in extra and "codebook_size" in extra:
            usage, size = extra.pop("codebook_usage"), int(extra.pop("codebook_size"))
            rows.append(
                ("codebook usage", f"{round(usage * size)} of {size} codes ({100 * usage:.0f} %)")
            )
        rows += [(name, _fmt(value)) for name, value in extra.items()]
        width = max(_display_width(name) for name, _ in rows)
        lines = [f"{name}{' ' * (width - _display_width(name))}  {value}" for name, value in rows]
        lines += [f"note: {text}" for text in (self.note, self.reconstruction_note) if text]
        return "\n".join(lines)


def _display_width(text: str) -> int:
    return sum(not unicodedata.combining(char) for char in text)  # k̂ is two code points


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (
            [_json_value(v) for v in value.tolist()] if value.dim() else _json_value(value.item())
        )
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):  # k̂ of equal weights: kept apart from "not estimated"
            return "inf" if value > 0 else "-inf"
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _tensor(values: list) -> torch.Tensor:
    return torch.tensor(
        [math.nan if v is None else float(v) for v in values], dtype=torch.float64
    )


# --- per-batch pieces ---------------------------------------------------------------------------


def ladder_bounds(log_w: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
    """For each k, the k-sample bound averaged over the ⌊K/k⌋ disjoint blocks: ``{k: [N]}``."""
    num_particles = log_w.shape[0]
    bounds = {}
    for k in ks:
        blocks = num_particles // k
        grouped = log_w[: blocks * k].reshape(blocks, k, *log_w.shape[1:])  # [blocks, k, N]
        bounds[k] = log_mean_exp(grouped, dim=1).mean(dim=0)
    return bounds


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def pareto_khat(log_w: torch.Tensor) -> torch.Tensor:
    """PSIS shape k̂ of each point's weights [2], ``[K, N] -> [N]`` (float64, CPU).

    -inf where the weights are equal up to rounding (nothing to smooth: the guide is exact there);
    NaN when K < 25, too few for the tail fit.
    """
    num_particles, num_data = log_w.shape
    if num_particles < MIN_PSIS_SAMPLES:
        return torch.full((num_data,), math.nan, dtype=torch.float64)
    log_w = log_w.detach()
    spread = (log_w.max(dim=0).values - log_w.min(dim=0).values).cpu().double()
    scale = log_w.abs().max(dim=0).values.cpu().double().clamp(min=1.0)
    constant = spread <= CONSTANT_WEIGHT_EPS * torch.finfo(log_w.dtype).eps * scale
    khat = torch.full((num_data,), -math.inf, dtype=torch.float64)
    if constant.all():
        return khat
    varying = (~constant).nonzero().squeeze(1)
    # arviz wants samples on the last axis: [points, K]
    array = log_w[:, varying.to(log_w.device)].to("cpu", torch.float64).T.contiguous().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, fitted = _arviz().psislw(array, reff=1.0)
    khat[varying] = torch.as_tensor(np.asarray(fitted, dtype=np.float64)).reshape(-1)
    return khat


@dataclass
class _Reconstruction:
    site: str | None
    mse: torch.Tensor | None  # [N]
    bce: torch.Tensor | None  # [N], for a Bernoulli observation
    point_mass_sites: list[str]  # continuous point masses (Delta): no bound exists
    one_hot_sites: list[str]  # discrete guide sites with all mass on the drawn value


def _data_axis(site, data_plate: str, role: str) -> int:
    frames = [f for f in site["cond_indep_stack"] if f.name == data_plate]
    if not frames:
        raise ContractError(
            f"{role} site {site['name']!r} is outside the {data_plate!r} plate; put every site "
            f"inside pyro.plate({data_plate!r}, len(x)) — or pass data_plate= to name yours"
        )
    return frames[0].dim - len(site["fn"].event_shape)  # negative index into the value


def _per_point(values: torch.Tensor, axis: int, reduce: str) -> torch.Tensor:
    values = values.movedim(axis, 0)
    values = values.reshape(values.shape[0], -1)
    return values.mean(dim=1) if reduce == "mean" else values.sum(dim=1)


def _is_one_hot(site) -> bool:
    """A discrete guide site whose drawn value has probability 1 at every data point."""
    fn = site["fn"]
    if not getattr(fn.support, "is_discrete", False):
        return False
    return bool((fn.log_prob(site["value"]) == 0).all())


def _observation_mask(site, value_shape) -> torch.Tensor | None:
    """1 where an observed element counts: the site's ``poutine.mask`` times every
    ``.mask()`` of its distribution, broadcast to the value; None when nothing is masked."""
    masks = []
    if site["mask"] is not None:
        masks.append((site["mask"], len(site["fn"].event_shape)))
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        if isinstance(fn, MaskedDistribution):
            masks.append((fn._mask, len(fn.event_shape)))  # noqa: SLF001
        fn = fn.base_dist
    if not masks:
        return None
    total = torch.ones(value_shape)
    for mask, event_ndim in masks:
        mask = torch.as_tensor(mask, dtype=total.dtype)
        total = total.to(mask.device) * mask.reshape(mask.shape + (1,) * event_ndim)
    return total


def reconstruction(model, guide, x, y=None, *, data_plate: str | None = None) -> _Reconstruction:
    """One guide draw, the model replayed on it, and the mean of the observed site's p(x|z).

    ``x`` (and ``y``): the data as the program takes them (see ``log_weights``). The observed
    site is ``"x"`` when the model observes one, else its first observed site with a mean
    (factors have none). MSE is averaged over the site's unmasked elements, BCE (Bernoulli only)
    summed over them: nats per point.
    """
    data = ProgramData.of(x, y)
    data_plate = program_info(model, guide, data, data_plate).data_plate
    model_trace, guide_trace = trace_pair(model, guide, data)
    latents = [(n, s) for n, s in sample_sites(guide_trace) if not s["is_observed"]]
    point_mass = [n for n, s in latents if isinstance(base_distribution(s["fn"]), Delta)]
    one_hot = [n for n, s in latents if _is_one_hot(s)]
    observed = [(name, site) for name, site in sample_sites(model_trace) if site["is_observed"]]
    if not observed:
        raise ContractError("the model observes no site; pass the data as obs=x inside the model")
    observed = [(n, s) for n, s in observed if not isinstance(base_distribution(s["fn"]), Unit)]
    if not observed:  # only factors
        return _Reconstruction(None, None, None, point_mass, one_hot)
    name, site = next(((n, s) for n, s in observed if n == "x"), observed[0])
    axis = _data_axis(site, data_plate, "model observed")
    base = base_distribution(site["fn"])
    try:
        mean = base.mean
    except NotImplementedError:
        return _Reconstruction(None, None, None, point_mass, one_hot)
    value, mean = torch.broadcast_tensors(site["value"], mean)
    mask = _observation_mask(site, value.shape)
    weight = torch.ones_like(value) if mask is None else mask.expand(value.shape).to(value)
    counted = _per_point(weight, axis, "sum").clamp(min=1.0)
    mse = _per_point(weight * (value - mean) ** 2, axis, "sum") / counted
    bce = None
    if isinstance(base, torch.distributions.Bernoulli):
        nll = torch.broadcast_to(-base.log_prob(site["value"]), value.shape)
        bce = _per_point(weight * nll, axis, "sum")
    return _Reconstruction(name, mse, bce, point_mass, one_hot)


# --- the whole split ----------------------------------------------------------------------------


def _program_data(data, y) -> ProgramData:
    """``evaluate``'s data: a tensor, an ``(x, y)`` pair or tuple, a dict, plus ``y``."""
    if isinstance(data, (tuple, list)) and y is not None:
        raise PPVAEError("pass labels either as data=(x, y) or as y=, not both")
    data = ProgramData.of(data, y)
    sizes = {v.shape[0] for v in data.args if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(data.args) == 2 and len(sizes) > 1:
        x, y = data.args
        raise PPVAEError(f"x has {x.shape[0]} points but y has {y.shape[0]}; they must match")
    return data


def subset_index(size: int, num_points: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a seeded subset of ``num_points`` of ``size`` rows, in their original order
    (None: all rows). Its own generator: the same (size, num_points, seed), the same points."""
    if num_points is None or num_points >= size:
        return None
    if num_points < 1:
        raise PPVAEError(f"num_points must be >= 1, got {num_points}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:num_points].sort().values


def subset_points(
    x: torch.Tensor, y: torch.Tensor | None, num_points: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A seeded subset of ``num_points`` of the rows of ``x`` (and ``y``), in their original
    order; all rows when ``num_points`` is None or not smaller. The draw uses its own generator,
    so the same (size, ``num_points``, seed) always gives the same points."""
    index = subset_index(x.shape[0], num_points, seed)
    if index is None:
        return x, y
    return x[index.to(x.device)], None if y is None else y[index.to(y.device)]


def _normalise_ladder(ladder, num_samples: int) -> list[int]:
    ks = [int(k) for k in ladder]
    if any(k < 1 for k in ks):
        raise PPVAEError(f"ladder entries must be >= 1, got {list(ladder)}")
    return sorted({k for k in ks if k <= num_samples} | {num_samples})


def _tensor_device(module) -> torch.device | None:
    """The device of the module's first parameter (or buffer); None for a module without any."""
    if not isinstance(module, nn.Module):
        return None
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return None if tensor is None else tensor.device


@contextmanager
def _on_device(module, device: torch.device) -> Iterator[torch.device]:
    """``module`` moved to ``device`` (in eval mode) for the block, then back where it was."""
    original = _tensor_device(module)
    was_training = module.training if isinstance(module, nn.Module) else False
    if isinstance(module, nn.Module):
        module.to(device)
    try:
        if was_training:
            module.eval()
        yield _tensor_device(module) or device
    finally:
        if was_training:
            module.train()
        if original is not None:
            module.to(original)


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's CPU RNG (and ``device``'s, if CUDA) seeded with ``seed`` for the block, the
    caller's RNG states restored after it."""
    with forked_rng(device):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def evaluate(
    module,
    data,
    y: torch.Tensor | None = None,
    *,
    num_samples: int = 5000,
    ladder=DEFAULT_LADDER,
    batch_size: int = 100,
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    data_plate: str | None = None,
    num_points: int | None = None,
) -> EvaluationReport:
    """ELBO, the IWAE ladder, log p(x) ± s.e., gap, PSIS k̂ and ESS per data point.

    ``module``: any object with ``model(x, y)`` and ``guide(x, y)`` (DESIGN §1); an ``nn.Module``
    is moved to ``device`` and put in eval mode for the call, then moved back to its device and
    mode. ``data``: a tensor ``[N, ...]`` or a pair ``(x, y)``. Each point's K = ``num_samples``
    log-weights are drawn once, ``batch_size`` points at a time and ``chunk_size`` particles at a
    time (peak memory is set by these, not by K); every rung of ``ladder`` (entries above K are
    dropped; K itself is added) is read off them. Draws come from torch's RNG seeded with ``seed``
    inside a fork: a rerun with the same arguments is identical, and the caller's RNG state (a
    training loop's) is the same after the call as before it. A module method
    ``evaluation_metrics(x, y) -> dict`` is called on the whole split and its numbers stored in
    ``report.extra``. ``num_points``: evaluate a seeded subset of that many points
    (:func:`subset_points` with ``seed``); ``report.split_points`` keeps the split's size.
    ``progress``: a progress bar, shown only when stderr is a terminal. Inside a
    ``torch.distributed`` process group the batches are dealt to the ranks, each batch's draws
    seeded from ``(seed, batch index)``, and every rank returns the whole report in point order
    (:mod:`ppvae.inference.distributed`).
    """
    if not (callable(getattr(module, "model", None)) and callable(getattr(module, "guide", None))):
        raise PPVAEError("module must have model(x, y) and guide(x, y) methods (DESIGN §1)")
    if num_samples < 1 or batch_size < 1:
        raise PPVAEError(
            f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}"
        )
    data = _program_data(data, y)
    split_points = data.num_points
    index = subset_index(split_points, num_points, seed)
    if index is not None:
        data = data.select(index.to(data.device))
    ks = _normalise_ladder(ladder, num_samples)
    parts: dict[str, list[torch.Tensor]] = {}
    ladder_parts: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    likelihood_available, site_name, point_mass, one_hot = True, None, [], []

    def keep(name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            parts.setdefault(name, []).append(value.detach().to("cpu", torch.float64))

    with (
        _on_device(module, resolve_device(device)) as device,
        _seeded_rng(seed, device),
        torch.no_grad(),
    ):
        check = getattr(module, "check_data", None)
        if check is not None:
            check(data.first)
        info = program_info(module.model, module.guide, data.to(device), data_plate)
        with tqdm(
            total=data.num_points,
            disable=None if progress else True,  # None: shown on a terminal only
            unit="pt",
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            bar.set_description(f"evaluate (K={num_samples})")
            starts = distributed.batch_starts(data.num_points, batch_size)  # this rank's
            for start in distributed.reseeded(starts, seed, batch_size, device):
                batch = data.select(slice(start, start + batch_size)).to(device)
                recon = reconstruction(module.model, module.guide, batch, data_plate=data_plate)
                if start == starts[0]:
                    site_name, point_mass = recon.site, recon.point_mass_sites
                    likelihood_available, one_hot = not point_mass, recon.one_hot_sites
                one_hot = [name for name in one_hot if name in recon.one_hot_sites]
                keep("reconstruction_mse", recon.mse)
                keep("reconstruction_bce", recon.bce)
                if likelihood_available:
                    log_w = log_weights(
                        module.model,
                        module.guide,
                        batch,
                        num_particles=num_samples,
                        chunk_size=chunk_size,
                        data_plate=data_plate,
                    )  # [K, B]
                    _keep_bounds(keep, ladder_parts, log_w, ks)
                bar.update(batch.num_points)
        first = (site_name, point_mass, likelihood_available, one_hot)  # a group: all ranks'
        parts, ladder_parts, first = distributed.gather_batches(
            parts, ladder_parts, first, seed, device
        )
        site_name, point_mass, likelihood_available, one_hot = first
        extra = _extra_metrics(module, data, device)
        collapse = _collapse_metrics(module, data, device) if likelihood_available else {}

    per_point = {name: torch.cat(values) for name, values in parts.items()}
    report = EvaluationReport(
        num_points=data.num_points,
        num_samples=num_samples,
        likelihood_available=likelihood_available,
        seed=seed,
        split_points=split_points,
        observed_sites=list(info.observed),
        density_name=info.density_name,
        particle_path=info.particles if not info.particle_note else info.particle_note,
        point_mass_sites=point_mass + one_hot,
        reconstruction_site=site_name,
        reconstruction_mse_per_point=per_point.get("reconstruction_mse"),
        reconstruction_bce_per_point=per_point.get("reconstruction_bce"),
        reconstruction_mse=_mean(per_point.get("reconstruction_mse")),
        reconstruction_bce=_mean(per_point.get("reconstruction_bce")),
        reconstruction_note=(
            "reconstruction at the guide's point mass (exact)"
            if point_mass or one_hot
            else "reconstruction from one draw z ~ q(z|x), decoded to the mean of p(x|z)"
        ),
        extra=extra,
        active_units=collapse.get("active_units"),
        latent_units=collapse.get("latent_units"),
        kl=collapse.get("kl"),
        kl_per_dim=collapse.get("kl_per_dim", {}),
    )
    sites = ", ".join(repr(name) for name in point_mass + one_hot)
    if not likelihood_available:
        report.note = POINT_MASS_NOTE.format(sites=sites)
        report.num_samples = 0
        return report
    _fill_bounds(report, per_point, ladder_parts)
    if one_hot:
        report.khat_per_point = torch.full_like(report.khat_per_point, math.nan)
        report.khat_share_above = None
        report.note = ONE_HOT_NOTE.format(sites=sites)
    return report


def _keep_bounds(keep, ladder_parts, log_w: torch.Tensor, ks: list[int]) -> None:
    num_particles = log_w.shape[0]
    bounds = ladder_bounds(log_w, ks)
    for k in ks:
        ladder_parts[k].append(bounds[k].detach().to("cpu", torch.float64))
    elbo = bounds[1] if 1 in bounds else log_w.mean(dim=0)
    keep("elbo", elbo)
    if num_particles > 1:
        keep("elbo_stderr", log_w.std(dim=0) / math.sqrt(num_particles))
    keep("log_px", bounds[num_particles])
    keep("log_px_stderr", log_marginal_stderr(log_w))
    keep("ess", effective_sample_size(log_w))
    keep("khat", pareto_khat(log_w))


def _fill_bounds(report: EvaluationReport, per_point, ladder_parts) -> None:
    report.elbo_per_point = per_point["elbo"]
    report.elbo_stderr_per_point = per_point.get("elbo_stderr")
    report.log_px_per_point = per_point["log_px"]
    report.log_px_stderr_per_point = per_point["log_px_stderr"]
    report.gap_per_point = report.log_px_per_point - report.elbo_per_point
    report.khat_per_point = per_point["khat"]
    report.ess_per_point = per_point["ess"]
    report.ladder_per_point = {k: torch.cat(v) for k, v in ladder_parts.items()}
    report.ladder = {k: _mean(v) for k, v in report.ladder_per_point.items()}
    report.elbo = _mean(report.elbo_per_point)
    report.log_px = _mean(report.log_px_per_point)
    stderr = report.log_px_stderr_per_point
    report.log_px_stderr = float(stderr.pow(2).sum().sqrt() / stderr.numel())
    report.mean_log_px_stderr = _mean(stderr)
    report.gap = _mean(report.gap_per_point)
    report.mean_ess = _mean(report.ess_per_point)
    khat = report.khat_per_point
    if not torch.isnan(khat).all():
        report.khat_share_above = float((khat > report.khat_threshold).double().mean())
    else:
        report.note = f"PSIS k̂ needs at least {MIN_PSIS_SAMPLES} importance samples"


def _mean(values: torch.Tensor | None) -> float | None:
    return None if values is None else float(values.mean())


def _collapse_metrics(module, data: ProgramData, device) -> dict:
    """Active units and KL per latent dimension (posterior-collapse diagnostics), where they
    exist; on a forked RNG so the bounds above are unaffected."""
    try:
        return collapse_metrics(module, data.to(device))
    except PPVAEError:
        return {}


def _extra_metrics(module, data: ProgramData, device) -> dict[str, float]:
    metrics = getattr(module, "evaluation_metrics", None)
    if metrics is None:
        return {}
    values = data.to(device).call(metrics)
    return {str(k): float(v) for k, v in dict(values).items()}
