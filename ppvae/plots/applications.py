"""Figures of the applications: anomaly-score histograms by label, ROC curves, and
clean / corrupted / restored / uncertainty rows of a purification."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

SCORE_TITLES = {
    "neg_log_marginal": "−log p(x)",
    "neg_elbo": "−ELBO",
    "reconstruction": "reconstruction error",
    "likelihood_ratio": "likelihood ratio",
    "complexity": "input complexity",
}


def _row(images: torch.Tensor, image_shape: Sequence[int]) -> np.ndarray:
    """``[n, C*H*W]`` -> one ``[H, n*(W+1)]`` grey (or ``[..., 3]`` RGB) strip, 1-pixel gaps."""
    channels, height, width = (int(d) for d in image_shape)
    images = images.detach().float().cpu().clamp(0, 1).reshape(-1, channels, height, width)
    strip = torch.ones(channels, height, images.shape[0] * (width + 1) - 1)
    for index, image in enumerate(images):
        strip[:, :, index * (width + 1) : index * (width + 1) + width] = image
    return (strip[0] if channels == 1 else strip.permute(1, 2, 0)).numpy()


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().double().numpy()


def plot_score_histograms(
    scores: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    path: str | Path,
    *,
    label_names: Mapping[int, str] | None = None,
    bins: int = 40,
) -> Path:
    """One panel per score, one histogram (density) per label value."""
    labels = labels.detach().cpu().numpy()
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        array = _numpy(values)
        finite = np.isfinite(array)
        edges = np.histogram_bin_edges(array[finite], bins=bins)
        for label in np.unique(labels):
            chosen = (labels == label) & finite
            text = (label_names or {}).get(int(label), str(label))
            ax.hist(array[chosen], bins=edges, density=True, alpha=0.5, label=text)
        ax.set_title(SCORE_TITLES.get(name, name))
        ax.set_xlabel("score (higher = more anomalous)")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_roc_curves(
    scores: Mapping[str, torch.Tensor], is_anomaly: torch.Tensor, path: str | Path
) -> Path:
    """ROC curve of each score (anomalies positive), AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = is_anomaly.detach().cpu().numpy().astype(bool)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, values in scores.items():
        array = _numpy(values)
        fpr, tpr, _ = roc_curve(labels, array)
        auc = roc_auc_score(labels, array)
        ax.plot(fpr, tpr, label=f"{SCORE_TITLES.get(name, name)} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize="small", title="score (AUROC)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_purification(
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    restored: torch.Tensor,
    uncertainty: torch.Tensor | None,
    image_shape: Sequence[int],
    path: str | Path,
    *,
    num: int = 8,
    title: str = "",
) -> Path:
    """Rows: clean, corrupted, restored and (when given) per-pixel uncertainty, ``num`` images."""
    rows = [("clean", clean), ("corrupted", corrupted), ("restored", restored)]
    if uncertainty is not None:
        peak = float(uncertainty[:num].max().clamp(min=1e-12))
        rows.append((f"uncertainty (sd, max {peak:.2f})", uncertainty / peak))
    fig, axes = plt.subplots(len(rows), 1, figsize=(num * 0.9, 1.1 * len(rows) + 0.4))
    for ax, (name, images) in zip(np.atleast_1d(axes), rows, strict=True):
        ax.imshow(_row(images[:num], image_shape), cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
