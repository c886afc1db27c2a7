"""Figures of posteriors drawn by :func:`ppvae.inference.posterior.posterior`: the guide's draws
over a reference (NUTS, importance resampling) for one point, ArviZ's pair plot of one point, PSIS
k̂ per point (``az.plot_khat``), and the per-point summary of :func:`compare_posteriors`.

Functions return a matplotlib ``Figure`` (shown inline in a notebook);
:func:`write_posterior_figures` writes them as PNG files for the CLI.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

from ppvae.errors import PPVAEError
from ppvae.inference.posterior import compare_posteriors

KHAT_THRESHOLD = 0.7


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _site(idata, var_name: str | None) -> str:
    names = list(idata.posterior.data_vars)
    if var_name is None:
        return names[0]
    if var_name not in names:
        raise PPVAEError(f"no latent site {var_name!r}; the posterior has {', '.join(names)}")
    return var_name


def point_draws(idata, point: Any, var_name: str | None = None) -> np.ndarray:
    """The draws of one point's latent site, chains pooled and the site flattened: ``[S, d]``."""
    name = _site(idata, var_name)
    values = idata.posterior[name]
    if point not in list(values["point"].values):
        raise PPVAEError(f"point {point!r} is not in the posterior; its points are the coords")
    values = values.sel(point=point)
    array = np.asarray(values.transpose("chain", "draw", ...))
    return array.reshape(array.shape[0] * array.shape[1], -1)


def plot_overlay(
    posteriors: Mapping[str, Any],
    point: Any,
    *,
    var_name: str | None = None,
    dims: Sequence[int] = (0, 1),
    max_draws: int = 1000,
    ax=None,
):
    """Draws of one point's posterior by several methods on one plane (two flat latent
    dimensions ``dims``; a histogram for a one-dimensional site), e.g. ``{"guide": g,
    "NUTS": n}``: where the guide's cloud leaves the reference's, the amortised guide is wrong."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4))
    else:
        fig = ax.figure
    name = None
    for label, idata in posteriors.items():
        name = _site(idata, var_name)
        draws = point_draws(idata, point, name)[:max_draws]
        if draws.shape[1] == 1:
            ax.hist(draws[:, 0], bins=40, density=True, alpha=0.5, label=label)
        else:
            ax.scatter(draws[:, dims[0]], draws[:, dims[1]], s=3, alpha=0.35, label=label)
    if draws.shape[1] == 1:
        ax.set_xlabel(f"{name}")
        ax.set_ylabel("density")
    else:
        ax.set_xlabel(f"{name}[{dims[0]}]")
        ax.set_ylabel(f"{name}[{dims[1]}]")
    ax.set_title(f"point {point}")
    ax.legend(markerscale=4, fontsize="small")
    return fig


def plot_pair(
    idata,
    point: Any,
    *,
    var_names: Sequence[str] | None = None,
    kind: str = "scatter",
    marginals: bool = True,
):
    """ArviZ's pair plot (``az.plot_pair``) of one point's latents, with marginal histograms."""
    az = _arviz()
    one = idata.posterior.sel(point=point)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = az.plot_pair(
            one,
            var_names=list(var_names) if var_names else None,
            kind=kind,
            marginals=marginals,
            scatter_kwargs={"alpha": 0.3},
        )
    fig = np.asarray(axes).ravel()[0].figure
    fig.suptitle(f"point {point}")
    return fig


def plot_khat(idata, *, ax=None):
    """PSIS k̂ of every point's importance weights (``az.plot_khat``) with the 0.7 line above
    which the guide is not a usable proposal for that point."""
    if "khat" not in idata.sample_stats:
        raise PPVAEError("this posterior has no k̂ (NUTS); draw it with method='guide'")
    az = _arviz()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    khat = np.asarray(idata.sample_stats["khat"], dtype=float)
    khat = np.where(np.isfinite(khat), khat, np.nan)
    if np.isnan(khat).all():
        raise PPVAEError("k̂ is undefined for every point (equal weights or fewer than 25 draws)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_khat(np.nan_to_num(khat, nan=-1.0), show_hlines=True, ax=ax)
    points = [str(p) for p in idata.sample_stats["point"].values]
    if len(points) <= 30:
        ax.set_xticks(range(len(points)), points)
    ax.set_xlabel("point")
    ax.set_title("PSIS k̂ of each point's importance weights")
    return fig


def plot_comparison(comparison: Mapping[str, Any], *, var_name: str | None = None):
    """:func:`compare_posteriors` per point and latent dimension: the mean shift in reference sds,
    the variance ratio (log scale, 1 is right) and the standardised Wasserstein distance."""
    name = var_name or next(iter(comparison))
    result = comparison[name]
    points = [str(p) for p in result["point"].values]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharex=True)
    location = np.arange(len(points))
    for ax, key, ylabel in zip(
        axes,
        ("mean_shift", "variance_ratio", "wasserstein"),
        ("mean shift (reference sds)", "variance ratio", "W1 / reference sd"),
        strict=True,
    ):
        values = np.asarray(result[key]).reshape(len(points), -1)
        for dim in range(values.shape[1]):
            ax.plot(location, values[:, dim], "o", alpha=0.7, label=f"{name}[{dim}]")
        ax.axhline(1.0 if key == "variance_ratio" else 0.0, color="k", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("point")
        if key == "variance_ratio":
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    axes[0].set_xticks(location, points, rotation=90 if len(points) > 12 else 0)
    if values.shape[1] <= 8:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_posterior_figures(
    posteriors: Mapping[str, Any],
    out_dir: str | Path,
    *,
    reference: str | None = None,
    candidate: str = "guide",
    max_overlays: int = 4,
) -> list[Path]:
    """PNG files in ``out_dir``: ``khat.png`` (of the first posterior with k̂),
    ``pair-<point>.png`` for the reference, ``overlay-<point>.png`` (every method) for the first
    ``max_overlays`` points, and ``comparison.png`` of ``candidate`` against ``reference`` when
    both are given. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)

    with_khat = [i for i in posteriors.values() if "khat" in i.sample_stats]
    if with_khat and np.isfinite(np.asarray(with_khat[0].sample_stats["khat"])).any():
        save(plot_khat(with_khat[0]), "khat.png")
    main = posteriors[reference] if reference else next(iter(posteriors.values()))
    for point in list(main.posterior["point"].values)[:max_overlays]:
        save(plot_overlay(posteriors, point), f"overlay-{point}.png")
        save(plot_pair(main, point), f"pair-{point}.png")
    if reference and candidate in posteriors and candidate != reference:
        comparison = compare_posteriors(posteriors[candidate], posteriors[reference])
        save(plot_comparison(comparison), "comparison.png")
    return written
