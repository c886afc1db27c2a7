"""The posterior p(z | x_n) of chosen data points as ArviZ ``InferenceData``, three ways.

For a model/guide pair (DESIGN §1) and points x_1 … x_N, :func:`posterior` draws latents from

* ``"guide"``: the amortised guide, :math:`z \\sim q_φ(z \\mid x_n)`;
* ``"importance"``: sampling-importance-resampling [1] from M guide draws with the weights
  :math:`\\log w_m = \\log p_θ(x_n, z_m) - \\log q_φ(z_m \\mid x_n)` Pareto-smoothed (PSIS [2],
  ``arviz.psislw``), then resampled with replacement: consistent as M → ∞, and reliable at
  practical M where :math:`\\hat k < 0.7` [2];
* ``"nuts"``: the No-U-Turn sampler [3] (Pyro's) on :math:`p_θ(z \\mid x_n) ∝ p_θ(x_n, z)` with
  the decoder fixed — the reference that does not trust the guide.

Every method reads the program through :class:`~ppvae.inference.importance.PosteriorTarget`, the
one implementation of :math:`\\log p(x_n, z)` and :math:`\\log q(z \\mid x_n)` as functions of
flat latents. The result has one layout whatever the method:

* ``posterior``: one variable per latent site with dims
  ``("chain", "draw", "point", "<site>_dim_0", ...)`` — ArviZ's leading (chain, draw), then the
  data point, then the site's per-point shape; coords ``point`` are the points' labels
  (``point_coords``, default 0 … N−1). ``"guide"`` and ``"importance"`` draws are independent, laid
  out as ``num_chains`` × ``num_samples`` so that every ArviZ function applies (their R-hat is 1
  by construction and says nothing).
* ``sample_stats``: ``lp`` = :math:`\\log p(x_n, z)` of every draw (chain, draw, point);
  ``log_weight`` (guide and importance: the draw's raw log-weight); ``khat`` and ``ess`` per point
  — the PSIS :math:`\\hat k` and Kish's effective sample size :math:`(\\sum w)^2 / \\sum w^2` of the
  guide draws' weights (guide, importance; NaN :math:`\\hat k` below 25 draws, −inf when the weights
  are equal: the guide is exact there), or for NUTS ArviZ's bulk ESS (the smallest over the point's
  latents), ``rhat`` (the largest rank-normalised split R-hat [4]) and ``diverging`` (chain, draw).
* ``observed_data``: the program's data arguments (``x``, ``y``; ``arg<i>`` / keyword names for
  tuple and dict data), dims ``("point", "<name>_dim_0", ...)``.

``posterior.attrs`` records ``method`` and the sampler's settings.

[1] Using the SIR algorithm to simulate posterior distributions, Rubin (1988).
[2] Pareto Smoothed Importance Sampling, Vehtari, Simpson, Gelman, Yao, Gabry (JMLR 2024).
[3] The No-U-Turn Sampler, Hoffman, Gelman (JMLR 2014).
[4] Rank-normalization, folding, and localization: an improved R-hat, Vehtari, Gelman, Simpson,
    Carpenter, Bürkner (Bayesian Analysis 2021).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ppvae.errors import PPVAEError
from ppvae.inference.evaluate import pareto_khat
from ppvae.inference.importance import (
    PosteriorTarget,
    default_chunk_size,
    effective_sample_size,
    forked_rng,
)

METHODS = ("guide", "importance", "nuts")


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23 announces its 1.0 refactor
        import arviz

    return arviz


def resolve_module(model_or_run: Any):
    """The model/guide pair of a module, a run object (``.module``) or a run directory path."""
    if isinstance(model_or_run, (str, os.PathLike)):
        import ppvae

        load_run = getattr(ppvae, "load_run", None)
        if load_run is None:
            raise PPVAEError("this ppvae cannot open run directories; pass the module instead")
        model_or_run = load_run(model_or_run)
    module = getattr(model_or_run, "module", model_or_run)
    if not (callable(getattr(module, "model", None)) and callable(getattr(module, "guide", None))):
        raise PPVAEError(
            f"{type(model_or_run).__name__} has no model/guide pair; pass a module with model and "
            "guide methods, a ppvae.Run, or a run directory"
        )
    return module


def _point_shapes(target: PosteriorTarget) -> dict[str, tuple[slice, tuple[int, ...]]]:
    """site -> (its slice of the flat latents, its value shape for one point and one draw)."""
    shapes = {}
    for name, (where, rest) in target.site_shapes.items():
        if math.prod(rest) != where.stop - where.start:  # broadcast dims: keep it flat
            rest = (where.stop - where.start,)
        shapes[name] = (where, rest)
    return shapes


def _guide_draws(target: PosteriorTarget, num: int, chunk_size: int | None):
    """``z [num, N, D]`` from the guide and their ``log p(x, z)``, ``log w`` (``[num, N]``)."""
    chunk = chunk_size or default_chunk_size(num, target.num_data)
    zs, lps, lws = [], [], []
    with torch.no_grad():
        for start in range(0, num, chunk):
            z, log_q = target.sample_guide(min(chunk, num - start))
            log_p = target.log_joint(z)
            zs.append(z)
            lps.append(log_p)
            lws.append(log_p - log_q)
    return torch.cat(zs), torch.cat(lps), torch.cat(lws)


def _resample(log_w: torch.Tensor, khat: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """Indices ``[num, N]`` drawn with replacement with the Pareto-smoothed weights of
    ``log_w [M, N]`` (plain normalised weights where k̂ is undefined: equal or too few)."""
    array = log_w.detach().to("cpu", torch.float64).numpy()  # [M, N]
    log_p = array - np.logaddexp.reduce(array, axis=0)
    smooth = np.isfinite(khat.numpy())
    if smooth.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smoothed, _ = _arviz().psislw(array[:, smooth].T.copy(), reff=1.0)
        log_p[:, smooth] = np.asarray(smoothed).reshape(smooth.sum(), -1).T
    rng = np.random.default_rng(seed)
    probs = np.exp(log_p - np.logaddexp.reduce(log_p, axis=0))
    columns = [rng.choice(len(array), size=num, p=p / p.sum()) for p in probs.T]
    return torch.as_tensor(np.stack(columns, axis=1))


def _nuts_chain(
    target: PosteriorTarget,
    init: torch.Tensor,
    num_samples: int,
    warmup: int,
    options: dict,
    progress: bool,
):
    """One NUTS chain on all points' latents at once: ``([num_samples, N, D], divergent idx)``."""
    from pyro.infer.mcmc import MCMC, NUTS

    num_data, dim = target.num_data, target.dim

    def potential(params):
        return -target.log_joint(params["z"].reshape(1, num_data, dim)).sum()

    mcmc = MCMC(
        NUTS(potential_fn=potential, **options),
        num_samples=num_samples,
        warmup_steps=warmup,
        initial_params={"z": init.reshape(-1)},
        disable_progbar=not progress,
    )
    mcmc.run()
    draws = mcmc.get_samples()["z"].detach().reshape(num_samples, num_data, dim)
    divergent = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
    return draws, list(divergent)


def posterior(
    model_or_run: Any,
    x,
    y: torch.Tensor | None = None,
    *,
    method: str = "guide",
    num_samples: int = 1000,
    num_chains: int = 4,
    warmup: int | None = None,
    num_proposals: int | None = None,
    seed: int = 0,
    point_coords: Sequence | None = None,
    data_plate: str | None = None,
    chunk_size: int | None = None,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    progress: bool = False,
):
    """Draws from the posterior of each point of ``x`` as ``arviz.InferenceData`` (layout in the
    module docstring): ``num_chains`` × ``num_samples`` draws per point.

    ``model_or_run``: a module with ``model``/``guide``, a run object (its ``.module``) or a run
    directory (opened with ``ppvae.load_run``). ``x``/``y``: the points, as the program takes them.

    ``"importance"`` resamples ``num_samples × num_chains`` draws from ``num_proposals`` guide
    draws per point (default: as many). ``"nuts"`` runs ``num_chains`` chains one after the other,
    each ``warmup`` adaptation steps (default ``num_samples``) then ``num_samples`` draws, started
    at distinct draws of the guide. One chain moves the latents of all N points at once: the
    points are independent given the decoder, so :math:`\\prod_n p(z_n \\mid x_n)` is the target,
    but the step size and tree depth are then shared and the worst-conditioned point sets them
    (the diagonal mass matrix is still per latent); pass one point at a time for separate tuning.
    It needs latents on the real line (``method="importance"`` for the others).
    The caller's random stream is left alone: draws use a forked RNG seeded with ``seed``.
    """
    if method not in METHODS:
        raise PPVAEError(f"unknown posterior method {method!r}; use one of {', '.join(METHODS)}")
    for name, value in (("num_samples", num_samples), ("num_chains", num_chains)):
        if not isinstance(value, int) or value < 1:
            raise PPVAEError(f"{name} must be an integer >= 1, got {value!r}")
    if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
        raise PPVAEError(f"warmup must be an integer >= 0, got {warmup!r}")
    if num_proposals is not None and (not isinstance(num_proposals, int) or num_proposals < 1):
        raise PPVAEError(f"num_proposals must be an integer >= 1, got {num_proposals!r}")
    module = resolve_module(model_or_run)
    total = num_chains * num_samples
    device = _first_tensor(x).device
    with forked_rng(device):
        torch.manual_seed(seed)
        target = PosteriorTarget(module.model, module.guide, x, y, data_plate=data_plate)
        num_data = target.num_data
        stats: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        attrs: dict[str, Any] = {"method": method}
        if method == "guide":
            z, log_p, log_w = _guide_draws(target, total, chunk_size)
            stats["log_weight"] = (("chain", "draw", "point"), log_w)
            stats["khat"] = (("point",), pareto_khat(log_w))
            stats["ess"] = (("point",), effective_sample_size(log_w))
        elif method == "importance":
            proposals = num_proposals or total
            pool, pool_log_p, pool_log_w = _guide_draws(target, proposals, chunk_size)
            khat = pareto_khat(pool_log_w)
            index = _resample(pool_log_w, khat, total, seed).to(pool.device)  # [total, N]
            z = pool.gather(0, index.unsqueeze(-1).expand(-1, -1, target.dim))
            log_p = pool_log_p.gather(0, index)
            stats["log_weight"] = (("chain", "draw", "point"), pool_log_w.gather(0, index))
            stats["khat"] = (("point",), khat)
            stats["ess"] = (("point",), effective_sample_size(pool_log_w))
            attrs["num_proposals"] = proposals
        else:
            z, log_p, diverging = _nuts(
                target,
                num_samples,
                num_chains,
                num_samples if warmup is None else warmup,
                dict(max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob),
                progress,
            )
            stats["diverging"] = (("chain", "draw"), diverging)
            attrs.update(
                num_warmup=num_samples if warmup is None else warmup,
                max_tree_depth=max_tree_depth,
                target_accept_prob=target_accept_prob,
            )
        stats["lp"] = (("chain", "draw", "point"), log_p)
    attrs.update(num_chains=num_chains, num_samples=num_samples, seed=seed)
    points = list(range(num_data)) if point_coords is None else list(point_coords)
    if len(points) != num_data:
        raise PPVAEError(f"point_coords has {len(points)} labels for {num_data} points")
    idata = _inference_data(target, z, stats, x, y, points, num_chains, num_samples, attrs)
    if method == "nuts":
        _add_mcmc_diagnostics(idata)
    return idata


def _first_tensor(x) -> torch.Tensor:
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else [x]
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise PPVAEError("the data hold no tensor; pass the data points as a tensor [N, ...]")


def _nuts(target, num_samples, num_chains, warmup, options, progress):
    if not target.real_support:
        raise PPVAEError(
            "method='nuts' moves latents on the real line, and this model has constrained or "
            "discrete latent sites; use method='importance'"
        )
    with torch.no_grad():
        inits, _ = target.sample_guide(num_chains)  # [C, N, D]: distinct starts
    chains, diverging = [], np.zeros((num_chains, num_samples), dtype=bool)
    for chain in range(num_chains):
        draws, divergent = _nuts_chain(target, inits[chain], num_samples, warmup, options, progress)
        chains.append(draws)
        diverging[chain, divergent] = True
    z = torch.cat(chains)  # [C * S, N, D]
    with torch.no_grad():
        log_p = torch.cat([target.log_joint(draws) for draws in chains])
    return z, log_p, diverging


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _data_arguments(x, y) -> dict[str, torch.Tensor]:
    if isinstance(x, torch.Tensor):
        named = {"x": x}
    elif isinstance(x, (tuple, list)):
        named = {f"arg{i}": value for i, value in enumerate(x)}
    elif isinstance(x, dict):
        named = dict(x)
    else:
        named = {}
    if y is not None:
        named["y"] = y
    num = _first_tensor(x).shape[0]
    return {
        name: value
        for name, value in named.items()
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num
    }


def _inference_data(target, z, stats, x, y, points, num_chains, num_samples, attrs):
    import xarray as xr

    az = _arviz()
    num_data = target.num_data
    base = {"chain": np.arange(num_chains), "draw": np.arange(num_samples), "point": points}
    z = _to_numpy(z).reshape(num_chains, num_samples, num_data, -1)
    variables, coords = {}, dict(base)
    for name, (where, shape) in _point_shapes(target).items():
        dims = [f"{name}_dim_{i}" for i in range(len(shape))]
        coords.update({dim: np.arange(size) for dim, size in zip(dims, shape, strict=True)})
        value = z[..., where].reshape(num_chains, num_samples, num_data, *shape)
        variables[name] = (("chain", "draw", "point", *dims), value)
    posterior_ds = xr.Dataset(variables, coords=coords, attrs=attrs)
    stat_vars = {}
    for name, (dims, value) in stats.items():
        array = _to_numpy(value)
        if dims[:2] == ("chain", "draw") and len(dims) > 2:
            array = array.reshape(num_chains, num_samples, *array.shape[1:])
        stat_vars[name] = (dims, array)
    stats_ds = xr.Dataset(stat_vars, coords={d: base[d] for d in ("chain", "draw", "point")})
    observed, observed_coords = {}, {"point": points}
    for name, value in _data_arguments(x, y).items():
        dims = [f"{name}_dim_{i}" for i in range(value.dim() - 1)]
        observed_coords.update(
            {d: np.arange(s) for d, s in zip(dims, value.shape[1:], strict=True)}
        )
        observed[name] = (("point", *dims), _to_numpy(value))
    observed_ds = xr.Dataset(observed, coords=observed_coords)
    return az.InferenceData(
        posterior=posterior_ds, sample_stats=stats_ds, observed_data=observed_ds
    )


def _add_mcmc_diagnostics(idata) -> None:
    """Per point: the smallest bulk ESS and the largest R-hat over the point's latents."""
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess, rhat = az.ess(idata.posterior), az.rhat(idata.posterior)
    for name, reduced, how in (("ess", ess, "min"), ("rhat", rhat, "max")):
        per_site = []
        for variable in reduced.data_vars.values():
            other = [d for d in variable.dims if d != "point"]
            per_site.append(getattr(variable, how)(dim=other) if other else variable)
        combined = per_site[0]
        for value in per_site[1:]:
            combined = np.minimum(combined, value) if how == "min" else np.maximum(combined, value)
        idata.sample_stats[name] = combined.astype(np.float64)


def compare_posteriors(candidate, reference, *, var_names: Sequence[str] | None = None):
    """How far the ``candidate`` posterior (e.g. the guide's) is from the ``reference`` (NUTS,
    importance resampling), per point and latent dimension: ``{site: xarray.Dataset}`` with dims
    ``("point", "<site>_dim_0", ...)`` and

    * ``mean_shift`` :math:`= (\\bar z_{cand} - \\bar z_{ref}) / s_{ref}`, the bias in units of the
      reference posterior sd;
    * ``variance_ratio`` :math:`= s^2_{cand} / s^2_{ref}` (< 1: the candidate is over-confident);
    * ``wasserstein``: the 1-D Wasserstein-1 distance between the two marginal draws,
      :math:`W_1 = \\int_0^1 |F^{-1}_{cand}(u) - F^{-1}_{ref}(u)|\\,du`, divided by :math:`s_{ref}`.
      It sees every difference of the marginal distributions, not only the first two moments;
      for Gaussians with sds :math:`s_c, s_r` and equal means it is
      :math:`|s_c/s_r - 1|\\sqrt{2/π}`, for a pure shift δ it is :math:`|δ|/s_r`.

    Both arguments are ``InferenceData`` from :func:`posterior` (or their ``posterior`` groups)
    over the same points; draws are pooled over chains.
    """
    import xarray as xr

    cand, ref = _posterior_group(candidate), _posterior_group(reference)
    names = list(var_names) if var_names is not None else list(ref.data_vars)
    missing = [n for n in names if n not in cand.data_vars or n not in ref.data_vars]
    if missing:
        raise PPVAEError(f"latent site(s) {missing} are not in both posteriors; pass var_names=")
    if not np.array_equal(np.asarray(cand["point"]), np.asarray(ref["point"])):
        raise PPVAEError("the two posteriors are over different points; draw both for the same x")
    result = {}
    for name in names:
        a = cand[name].stack(sample=("chain", "draw")).transpose("sample", ...)
        b = ref[name].stack(sample=("chain", "draw")).transpose("sample", ...)
        a_values, b_values = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        sd = b_values.std(axis=0, ddof=1)
        dims = [d for d in a.dims if d != "sample"]
        coords = {d: ref[d].values for d in dims}
        result[name] = xr.Dataset(
            {
                "mean_shift": (dims, (a_values.mean(0) - b_values.mean(0)) / sd),
                "variance_ratio": (dims, a_values.var(0, ddof=1) / sd**2),
                "wasserstein": (dims, wasserstein_1d(a_values, b_values) / sd),
            },
            coords=coords,
        )
    return result


def _posterior_group(value):
    group = getattr(value, "posterior", value)
    if not hasattr(group, "data_vars"):
        raise PPVAEError(
            f"expected an InferenceData from ppvae.inference.posterior, got {type(value).__name__}"
        )
    return group


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 between the empirical distributions of ``a [Ma, ...]`` and ``b [Mb, ...]`` along axis 0:
    the mean absolute difference of their quantile functions (exact for sorted equal-size draws,
    quantiles at the midpoints of max(Ma, Mb) equal steps otherwise)."""
    a, b = np.sort(a, axis=0), np.sort(b, axis=0)
    if len(a) != len(b):
        levels = (np.arange(max(len(a), len(b))) + 0.5) / max(len(a), len(b))
        a = np.quantile(a, levels, axis=0)
        b = np.quantile(b, levels, axis=0)
    return np.abs(a - b).mean(axis=0)
