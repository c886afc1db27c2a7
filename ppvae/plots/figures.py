"""The figure set of a run: training curves, a latent map (any continuous latent: exact in 2-D,
else on two principal directions), and for image data reconstructions, prior samples, the
decoder's manifold along the latent map's directions and interpolations.

``ppvae train`` writes them beside the run's checkpoints; ``ppvae plot`` (``Run.figures``)
redraws them into a folder of their own. Each figure is drawn only where the model has what it
needs (an autoencoder has no prior to sample from).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ppvae.errors import PPVAEError

EVALUATION_POINTS = 2000  # test points behind reconstructions and latent maps


def is_conditional(module) -> bool:
    """Conditional models (CVAE) are built with ``num_classes``."""
    return "num_classes" in getattr(module, "hparams", {})


def run_figures(
    module,
    data,
    out_dir: str | Path,
    history: list[dict] | None,
    *,
    left_out: list[str] | None = None,
) -> list[Path]:
    """Draw the figures of ``module`` trained on ``data`` (a ``DataSplits``) into ``out_dir``;
    ``history`` is the run's ``metrics.jsonl`` records (no curves without it). Returns the
    paths written; ``left_out``, if given, receives one line per figure not drawn, saying why."""
    from ppvae.plots.latent import write_latent_figures
    from ppvae.plots.samples import (
        plot_prior_samples,
        plot_reconstructions,
        plot_training_curves,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if history:
        title = f"{type(module).__name__} on {data.name}"
        written.append(plot_training_curves(history, out_dir / "training_curves.png", title=title))
    device = next(module.parameters()).device
    x, y = data.split("test")
    x = x[:EVALUATION_POINTS].to(device)
    y = None if y is None else y[:EVALUATION_POINTS].to(device)
    if data.image_shape is not None:
        written.append(
            plot_reconstructions(module, x, y, data.image_shape, out_dir / "reconstructions.png")
        )
        labels = None
        if is_conditional(module):
            labels = (torch.arange(64) % data.num_classes).to(device)
        try:
            written.append(
                plot_prior_samples(module, data.image_shape, out_dir / "samples.png", y=labels)
            )
        except PPVAEError as error:  # no prior to sample from (an autoencoder)
            if left_out is not None:
                left_out.append(f"no prior samples: {error}")
    # latent map for any continuous latent (exact in 2-D, else on two principal directions);
    # decoder manifold and interpolations for images (ppvae.plots.latent)
    latent, reasons = write_latent_figures(module, x, y, data.image_shape, out_dir)
    if left_out is not None:
        left_out.extend(reasons)
    return written + latent
