"""Figures of an :class:`~ppvae.inference.evaluate.EvaluationReport`: the bound ladder (mean
k-sample bound against log k, log p(x) as its ceiling), and histograms of the per-point ELBO gap and
of the PSIS k̂ of the importance weights. Only figures of numbers the report has: none without a
likelihood bound (a point-mass guide) or with a one-hot guide (a VQ-VAE's: every rung equals the
ELBO, the gap is 0 and k̂ is not estimated), and no k̂ histogram when K was too small for PSIS."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from ppvae.inference.evaluate import EvaluationReport


def plot_report(report: EvaluationReport | dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``bound_ladder.png``, ``gap_hist.png`` and ``khat_hist.png``; return their paths.

    ``report`` may also be the dict of ``report.to_dict()`` (a loaded ``report.json``).
    """
    if isinstance(report, dict):
        report = EvaluationReport.from_dict(report)
    if not report.likelihood_available or report.point_mass_sites:
        return []  # no bound, or (one-hot guide) every rung equals the ELBO and the gap is 0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _bound_ladder(report, out_dir / "bound_ladder.png"),
        _gap_hist(report, out_dir / "gap_hist.png"),
    ]
    if not torch.isnan(report.khat_per_point).all():  # k̂ needs K >= 25 samples
        written.append(_khat_hist(report, out_dir / "khat_hist.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bound_ladder(report: EvaluationReport, path: Path) -> Path:
    ks = sorted(report.ladder)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, [report.ladder[k] for k in ks], marker="o", label="mean k-sample bound")
    ax.axhline(
        report.log_px,
        color="black",
        linestyle="--",
        label=f"log p(x) (K={report.num_samples}) = {report.log_px:.3f}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("k (importance samples per bound)")
    ax.set_ylabel("nats per data point")
    ax.set_title(f"Bound ladder, {report.num_points} points")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _gap_hist(report: EvaluationReport, path: Path) -> Path:
    gap = report.gap_per_point.double()
    gap = gap[torch.isfinite(gap)]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.hist(gap.numpy(), bins=min(50, max(10, int(math.sqrt(gap.numel())))))
    ax.axvline(report.gap, color="black", linestyle="--", label=f"mean {report.gap:.3f}")
    ax.set_xlabel("log p(x) − ELBO (nats)")
    ax.set_ylabel("data points")
    ax.set_title("ELBO gap per data point")
    ax.legend()
    return _save(fig, path)


def _khat_hist(report: EvaluationReport, path: Path) -> Path:
    khat = report.khat_per_point.double()
    finite = khat[torch.isfinite(khat)]
    constant = int((khat == -math.inf).sum())
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if finite.numel():
        ax.hist(finite.numpy(), bins=min(50, max(10, int(math.sqrt(finite.numel())))))
    ax.axvline(
        report.khat_threshold, color="red", linestyle="--", label=f"k̂ = {report.khat_threshold}"
    )
    ax.set_xlabel("PSIS k̂ of the importance weights")
    ax.set_ylabel("data points")
    title = "Pareto k̂ per data point"
    if report.khat_share_above is not None:
        title += f" ({100 * report.khat_share_above:.1f}% above 0.7)"
    if constant:
        title += f"\n{constant} points with equal weights (exact guide) not shown"
    if torch.isnan(khat).all():
        reason = "one-hot guide" if report.point_mass_sites else f"K={report.num_samples} too small"
        title += f"\nnot estimated ({reason})"
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
