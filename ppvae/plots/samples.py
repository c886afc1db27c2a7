"""Figures of what a trained model generates: reconstructions, prior samples, 2-D latent maps and
decoded manifold grids, and training curves. Image figures need ``image_shape``; other data get
only the curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch


def _tile(images: torch.Tensor, image_shape: Sequence[int], ncols: int) -> torch.Tensor:
    """``[N, C*H*W]`` -> one ``[rows*H, ncols*W]`` (grey) or ``[..., 3]`` array."""
    channels, height, width = image_shape
    images = images.detach().float().cpu().clamp(0, 1).reshape(-1, channels, height, width)
    rows = -(-images.shape[0] // ncols)
    canvas = torch.ones(channels, rows * (height + 1), ncols * (width + 1))
    for index, image in enumerate(images):
        r, c = divmod(index, ncols)
        canvas[
            :,
            r * (height + 1) : r * (height + 1) + height,
            c * (width + 1) : c * (width + 1) + width,
        ] = image
    return (canvas[0] if channels == 1 else canvas.permute(1, 2, 0)).numpy()


def save_image_grid(
    images: torch.Tensor,
    image_shape: Sequence[int],
    path: str | Path,
    *,
    ncols: int = 8,
    title: str = "",
) -> Path:
    fig, ax = plt.subplots(figsize=(ncols * 0.9, max(1, -(-images.shape[0] // ncols)) * 0.9 + 0.4))
    ax.imshow(
        _tile(images, image_shape, ncols), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def plot_reconstructions(module, x, y, image_shape, path, *, num: int = 16) -> Path:
    """Top row: data; bottom row: reconstructions at the guide's mean code."""
    x = x[:num]
    y = None if y is None else y[:num]
    x, recon = x.cpu(), module.reconstruct(x, y).cpu()
    # data rows sit above their reconstruction rows in an 8-column layout
    rows = [torch.cat([x[i : i + 8], recon[i : i + 8]]) for i in range(0, len(x), 8)]
    return save_image_grid(
        torch.cat(rows), image_shape, path, title="data (odd rows) / reconstructions"
    )


def prior_samples_layout(y: torch.Tensor | None) -> tuple[int, str]:
    """Columns and title of a prior-sample grid: labels that cycle 0, 1, ..., C−1 get one column
    per label ("column c: label c"); one label for all says which; otherwise labels are as given."""
    if y is None:
        return 8, "samples from the prior"
    y = y.reshape(-1).cpu()
    if bool((y == y[0]).all()):
        return 8, f"samples from the prior, label {int(y[0])}"
    classes = int(y.max()) + 1
    if torch.equal(y, torch.arange(len(y)) % classes):
        return classes, f"samples from the prior: column c has label c (0–{classes - 1})"
    return 8, "samples from the prior, one label per sample (as given)"


@torch.no_grad()
def plot_prior_samples(module, image_shape, path, *, num: int = 64, y=None) -> Path:
    samples = module.sample_prior(num, y)
    ncols, title = prior_samples_layout(y)
    return save_image_grid(samples, image_shape, path, ncols=ncols, title=title)


def plot_training_curves(history: list[dict], path: str | Path, *, title: str = "training") -> Path:
    """:func:`ppvae.plots.curves.training_curves_figure`, saved to ``path``."""
    from ppvae.plots.curves import training_curves_figure

    fig = training_curves_figure(history, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def plot_latent_map(module, x, labels, path, *, y=None) -> Path:
    """Guide means of a 2-D latent space, coloured by label."""
    loc = module.encode(x, y)[0].cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    scatter = ax.scatter(
        loc[:, 0], loc[:, 1], c=None if labels is None else labels.cpu().numpy(), s=4, cmap="tab10"
    )
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.set_title("latent map (guide means)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def plot_manifold_grid(module, image_shape, path, *, steps: int = 15) -> Path:
    """Decoded images on a grid of the 2-D latent space at standard-normal quantiles."""
    normal = torch.distributions.Normal(0.0, 1.0)
    quantiles = normal.icdf(torch.linspace(0.05, 0.95, steps))
    z1, z2 = torch.meshgrid(quantiles, quantiles.flip(0), indexing="xy")
    grid = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1)
    device = next(module.parameters()).device
    images = module.decode(grid.to(device))
    return save_image_grid(images, image_shape, path, ncols=steps, title="decoded latent grid")
