"""Runs side by side: one row per run, with its latent map, samples from its prior and its
interpolations between the same test pairs (``ppvae compare``). A panel a model cannot have (no
prior for an autoencoder, no distances between a VQ-VAE's discrete codes) says why instead."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ppvae.errors import PPVAEError
from ppvae.plots.latent import interpolation_figure, latent_map_figure, show_images
from ppvae.plots.samples import prior_samples_layout

COLUMNS = ("latent map", "samples from the prior", "interpolations")


@dataclass
class Entry:
    """One run to draw: ``x`` test inputs, ``labels`` (colours) and ``y`` (what a conditional
    model is conditioned on, else None)."""

    name: str
    module: object
    x: torch.Tensor
    labels: torch.Tensor | None = None
    y: torch.Tensor | None = None
    num_classes: int | None = None


def _say(ax, text: str) -> None:
    text = "\n".join(textwrap.fill(line, 48) for line in text.splitlines())
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def comparison_figure(entries: Sequence[Entry], image_shape: Sequence[int] | None) -> Figure:
    """``len(entries)`` rows × 3 panels (:data:`COLUMNS`); without images, latent maps only."""
    columns = COLUMNS if image_shape is not None else COLUMNS[:1]
    fig, axes = plt.subplots(
        len(entries), len(columns), figsize=(4.2 * len(columns), 3.9 * len(entries)), squeeze=False
    )
    for row, entry in zip(axes, entries, strict=True):
        try:
            latent_map_figure(entry.module, entry.x, entry.labels, entry.y, ax=row[0])
        except PPVAEError as error:
            _say(row[0], f"no latent map:\n{error}")
        row[0].set_title(f"{entry.name}\n{row[0].get_title()}", fontsize=8)
        if image_shape is None:
            continue
        labels = None
        if entry.y is not None and entry.num_classes:
            labels = torch.arange(40, device=entry.x.device) % entry.num_classes
        try:
            samples = entry.module.sample_prior(40, labels)
            ncols, title = prior_samples_layout(labels)
            show_images(row[1], samples.cpu(), image_shape, ncols)
            row[1].set_title(f"{entry.name}: {title}", fontsize=8)
        except PPVAEError as error:
            _say(row[1], f"{entry.name}: {error}")
        try:
            interpolation_figure(
                entry.module, entry.x, image_shape, entry.y, num_pairs=5, steps=8, ax=row[2]
            )
            row[2].set_title(f"{entry.name}: {row[2].get_title()}", fontsize=8)
        except PPVAEError as error:
            _say(row[2], f"{entry.name}: no interpolation:\n{error}")
    return fig
