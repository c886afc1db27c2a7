"""Figures of what a trained model generates: reconstructions, prior samples, 2-D latent maps and
decoded manifold grids, and training curves. Image figures need ``image_shape``; other data get
only the curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


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


@torch.no_grad()
def plot_prior_samples(module, image_shape, path, *, num: int = 64, y=None) -> Path:
    samples = module.sample_prior(num, y)
    title = "samples from the prior" + ("" if y is None else f" (label {int(y[0])})")
    return save_image_grid(samples, image_shape, path, title=title)


def plot_training_curves(history: list[dict], path: str | Path) -> Path:
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [-r["train_loss"] for r in history], label="train (−loss per point)")
    if history and "val_elbo" in history[0]:
        ax.plot(epochs, [r["val_elbo"] for r in history], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend()
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
