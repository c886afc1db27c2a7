"""Figures of the latent space of any run: the latent map, the decoder's manifold and
interpolations, for any number of latent dimensions.

**Latent map**: the guide means :math:`μ_n = \\mathbb{E}_{q(z \\mid x_n)}[z]` of one latent site.
With two latent dimensions they are drawn as they are (exact); with more, projected on their two
leading principal directions :math:`u_1, u_2` (the top right-singular vectors of the centred
means), :math:`(u_1^\\top (μ_n - \\bar μ), u_2^\\top (μ_n - \\bar μ))`, and the title says how much
of the means' variance the two directions hold.

**Manifold**: the decoder's means :math:`\\mathbb{E}[x \\mid z]` on the grid
:math:`z_{ij} = \\bar μ + a_i s_1 u_1 + b_j s_2 u_2` through the means' mean, with :math:`s_k` the
means' standard deviation along :math:`u_k` and :math:`a_i, b_j` the 5 %…95 % standard-normal
quantiles: the slice of the decoder that the data occupy (for a 2-D latent, the exact plane).

**Interpolation**: decoded paths between pairs of test inputs
(:func:`ppvae.inference.regularity.interpolate`), the inputs themselves at both ends.

Every ``*_figure`` function returns a matplotlib ``Figure`` (the caller saves or closes it);
:func:`write_latent_figures` writes the PNGs of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ppvae.errors import PPVAEError
from ppvae.inference.regularity import (
    decode,
    encoded_means,
    interpolate_pairs,
    latent_site,
)
from ppvae.plots.samples import _tile

PROJECTIONS = ("auto", "exact", "pca")


@dataclass
class LatentProjection:
    """A 2-D view of codes ``[N, d]``: ``project(z) = (z − centre) Dᵀ`` with orthonormal rows
    ``directions`` ``[2, d]``; ``mean`` and ``scales`` (standard deviations along the two
    directions) place the manifold grid; ``explained``: the share of the codes' variance on the
    two directions (1 for an exact 2-D map)."""

    centre: torch.Tensor
    directions: torch.Tensor
    mean: torch.Tensor
    scales: torch.Tensor
    explained: float
    exact: bool

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.centre) @ self.directions.T

    def lift(self, coords: torch.Tensor) -> torch.Tensor:
        """Latent points ``[..., d]`` at grid coordinates ``[..., 2]`` through ``mean``."""
        return self.mean + coords @ self.directions


def latent_projection(codes: torch.Tensor, *, method: str = "auto") -> LatentProjection:
    """``exact`` (2-D codes drawn as they are), ``pca`` (two leading principal directions) or
    ``auto`` (exact for 2-D codes, else pca). Each principal direction's sign is fixed so that its
    largest-magnitude entry is positive."""
    if method not in PROJECTIONS:
        raise PPVAEError(f"unknown projection {method!r}; use one of {', '.join(PROJECTIONS)}")
    codes = codes.detach().double().cpu()
    if codes.dim() != 2 or codes.shape[1] < 2:
        raise PPVAEError(
            f"a latent map needs codes [N, d] with d >= 2, got shape {tuple(codes.shape)}"
        )
    if method == "exact" and codes.shape[1] != 2:
        raise PPVAEError(f"an exact latent map needs 2 latent dimensions, got {codes.shape[1]}")
    mean = codes.mean(dim=0)
    centred = codes - mean
    total = float(centred.pow(2).sum().clamp_min(1e-300))
    if method == "exact" or (method == "auto" and codes.shape[1] == 2):
        directions = torch.eye(2, dtype=codes.dtype)
        centre = torch.zeros(2, dtype=codes.dtype)
    else:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        directions = vh[:2]
        largest = directions.abs().argmax(dim=1)
        signs = torch.sign(directions[torch.arange(2), largest])
        directions = directions * signs[:, None]
        centre = mean
    along = centred @ directions.T  # [N, 2]
    scales = along.std(dim=0).clamp_min(1e-12)
    explained = float(along.pow(2).sum() / total)
    return LatentProjection(
        centre, directions, mean, scales, explained, exact=codes.shape[1] == 2 and method != "pca"
    )


def grid_coordinates(steps: int, scales: torch.Tensor) -> torch.Tensor:
    """``[steps, steps, 2]``: the first coordinate grows along columns, the second up the rows,
    at the 5 %…95 % standard-normal quantiles times ``scales``."""
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, steps))
    first, second = torch.meshgrid(quantiles.double(), quantiles.flip(0).double(), indexing="xy")
    return torch.stack([first, second], dim=-1) * scales.to(torch.float64)


def manifold_grid(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    projection: LatentProjection,
    *,
    steps: int = 15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent points ``[steps, steps, d]`` of the manifold grid and their decoded means
    ``[steps, steps, D]`` (``decode_fn``: ``[M, d] -> [M, D]``)."""
    z = projection.lift(grid_coordinates(steps, projection.scales))
    images = decode_fn(z.reshape(-1, z.shape[-1]))  # float64 codes: decode_fn casts them
    return z, images.reshape(steps, steps, -1)


def _needs_labels(module) -> bool:
    return "num_classes" in getattr(module, "hparams", {})


def _module_device(module) -> torch.device:
    parameter = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return torch.device("cpu") if parameter is None else parameter.device


def show_images(ax, images: torch.Tensor, image_shape: Sequence[int], ncols: int) -> None:
    ax.imshow(
        _tile(images, image_shape, ncols), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def latent_map_figure(
    module,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    site: str | None = None,
    method: str = "auto",
    ax=None,
) -> Figure:
    """One panel: the guide means of ``x`` (exact or projected), coloured by ``labels``.
    ``y``: what the guide is conditioned on (a CVAE's labels), if anything."""
    codes = encoded_means(module, x, y, site=site)
    projection = latent_projection(codes, method=method)
    points = projection.project(codes.double().cpu()).numpy()
    fig = ax.figure if ax is not None else plt.figure(figsize=(5.2, 4.5))
    ax = ax if ax is not None else fig.add_subplot()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=5)
    else:
        colours = labels.cpu().numpy()
        scatter = ax.scatter(points[:, 0], points[:, 1], c=colours, s=5, cmap="tab10")
        fig.colorbar(scatter, ax=ax, label="label")
    if projection.exact:
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
        ax.set_title(f"latent map: guide means of {len(points)} points")
    else:
        ax.set_xlabel("first principal direction")
        ax.set_ylabel("second principal direction")
        ax.set_title(
            f"latent map ({codes.shape[1]}-D guide means, {len(points)} points)\n"
            f"on 2 principal directions: {100 * projection.explained:.0f}% of their variance",
            fontsize=9,
        )
    return fig


@torch.no_grad()
def manifold_figure(
    module,
    x: torch.Tensor,
    image_shape: Sequence[int],
    y: torch.Tensor | None = None,
    *,
    label: int | None = None,
    steps: int = 15,
    site: str | None = None,
    method: str = "auto",
    ax=None,
) -> Figure:
    """One panel: the decoded grid along the latent map's two directions through the codes'
    mean (module docstring). A conditional model decodes the grid with one ``label``."""
    codes = encoded_means(module, x, y, site=site)
    projection = latent_projection(codes, method=method)
    name = latent_site(module, x, y, site)
    device = codes.device
    grid_labels = None
    if label is not None:
        grid_labels = torch.full((steps * steps,), int(label), dtype=torch.long, device=device)

    def decode_fn(z: torch.Tensor) -> torch.Tensor:
        z = z.to(device=device, dtype=codes.dtype)
        return decode(module, z, grid_labels, like=x, site=name).cpu()

    _, images = manifold_grid(decode_fn, projection, steps=steps)
    fig = ax.figure if ax is not None else plt.figure(figsize=(6, 6.3))
    ax = ax if ax is not None else fig.add_subplot()
    show_images(ax, images.reshape(steps * steps, -1), image_shape, steps)
    where = (
        "the latent plane"
        if projection.exact
        else f"2 principal directions ({100 * projection.explained:.0f}% of variance)"
    )
    suffix = "" if label is None else f", label {label}"
    ax.set_title(f"decoder manifold over {where}{suffix}", fontsize=9)
    return fig


@torch.no_grad()
def interpolation_figure(
    module,
    x: torch.Tensor,
    image_shape: Sequence[int],
    y: torch.Tensor | None = None,
    *,
    num_pairs: int = 6,
    steps: int = 10,
    method: str = "linear",
    seed: int = 0,
    site: str | None = None,
    ax=None,
) -> Figure:
    """One panel: ``num_pairs`` rows, each the first input, the decoded path between the guide
    means of two seeded test inputs (``steps`` codes), and the second input."""
    first, second, path = interpolate_pairs(
        module, x, y, num_pairs=num_pairs, seed=seed, steps=steps, method=method, site=site
    )
    rows = torch.cat([x[first, None].cpu(), path.images.cpu(), x[second, None].cpu()], dim=1)
    fig = ax.figure if ax is not None else plt.figure(figsize=((steps + 2) * 0.6, num_pairs * 0.7))
    ax = ax if ax is not None else fig.add_subplot()
    show_images(ax, rows.reshape(-1, rows.shape[-1]), image_shape, steps + 2)
    conditioned = "" if y is None else ", decoded with the first label"
    ax.set_title(f"{method} interpolation in z (ends: the inputs){conditioned}", fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def write_latent_figures(
    module,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    image_shape: Sequence[int] | None,
    out_dir: str | Path,
    *,
    max_points: int = 2000,
) -> tuple[list[Path], list[str]]:
    """``latent_map.png`` (any continuous latent), ``manifold_grid.png`` and
    ``interpolation.png`` (image data) of a run. Returns the paths written and one line per figure
    left out, saying why (a discrete latent, no images)."""
    out_dir = Path(out_dir)
    device = _module_device(module)
    x = x[:max_points].to(device)
    labels = None if labels is None else labels[:max_points].to(device)
    y = labels if _needs_labels(module) else None
    written: list[Path] = []
    try:
        fig = latent_map_figure(module, x, labels, y)
    except PPVAEError as error:
        return written, [f"no latent map: {error}"]
    written.append(save_figure(fig, out_dir / "latent_map.png"))
    if image_shape is None:
        return written, ["no manifold or interpolation figures: the data are not images"]
    label = None if y is None else int(y[0])
    written.append(
        save_figure(
            manifold_figure(module, x, image_shape, y, label=label), out_dir / "manifold_grid.png"
        )
    )
    written.append(
        save_figure(interpolation_figure(module, x, image_shape, y), out_dir / "interpolation.png")
    )
    return written, []
