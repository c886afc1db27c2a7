"""Figures for AIS and the gap split: log p(x) estimates against their cost (IWAE-k bounds and
AIS at several budgets, both per data point in evaluations of log p(x, z)), and a stacked bar of
the approximation and amortisation gaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def ais_cost(num_steps: int, num_chains: int, leapfrog_steps: int, warmup_steps: int) -> int:
    """Gradient evaluations of log p(x, z) per data point of one AIS run with its warm-up."""
    return num_chains * (num_steps + warmup_steps) * leapfrog_steps


def plot_ais_vs_iwae(
    iwae: dict[int, float],
    ais: dict[int, tuple[int, float]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """``iwae``: k -> mean k-sample bound; ``ais``: steps -> (cost per point, mean AIS
    estimate). Both are plotted against evaluations of log p(x, z) per point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(iwae)
    ax.plot(ks, [iwae[k] for k in ks], marker="o", label="IWAE-k bound (k guide draws)")
    steps = sorted(ais)
    ax.plot(
        [ais[t][0] for t in steps],
        [ais[t][1] for t in steps],
        marker="s",
        label="AIS (cost incl. warm-up and leapfrog)",
    )
    for t in steps:
        ax.annotate(f"T={t}", ais[t], textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("evaluations of log p(x, z) per data point")
    ax.set_ylabel("mean estimate of log p(x) (nats)")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_gap_bars(gaps: dict[str, tuple[float, float]], path: str | Path) -> Path:
    """``gaps``: label -> (mean approximation gap, mean amortisation gap), stacked per label."""
    labels = list(gaps)
    approximation = [gaps[k][0] for k in labels]
    amortisation = [gaps[k][1] for k in labels]
    fig, ax = plt.subplots(figsize=(1.8 + 1.2 * len(labels), 4))
    ax.bar(labels, approximation, label="approximation gap (family)")
    ax.bar(labels, amortisation, bottom=approximation, label="amortisation gap (encoder)")
    for i, (a, b) in enumerate(zip(approximation, amortisation, strict=True)):
        ax.text(i, a + b, f"{a + b:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("nats per data point")
    ax.set_title("log p(x) − ELBO, split")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
