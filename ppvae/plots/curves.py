"""Training curves from ``metrics.jsonl`` records, readable for any run length.

Left panel: the training objective per point (−loss) and the validation ELBO (or loss, for
models without a likelihood bound) against the epoch, with the best epoch — the one whose
checkpoint ``checkpoint-best.pt`` holds — marked. Right panel, where the records have them: the
mean KL(q(z|x) ‖ p(z)) on validation data and the number of active units [1] (the collapse
diagnostics of :mod:`ppvae.inference.collapse`), with the KL weight of a warm-up or β schedule.
Every point carries a marker, so a one-epoch run shows its values rather than an empty axis.

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015), section 5.2.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def best_epoch(history: list[dict]) -> tuple[int, str, float] | None:
    """(epoch, metric, value) of the best validation record: highest ``val_elbo``, else lowest
    ``val_loss``; the earliest on ties (as ``fit`` keeps it). None without validation."""
    for metric, sign in (("val_elbo", 1.0), ("val_loss", -1.0)):
        scored = [(sign * r[metric], -r["epoch"], r) for r in history if _finite(r.get(metric))]
        if scored:
            record = max(scored, key=lambda item: item[:2])[2]
            return record["epoch"], metric, record[metric]
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in history if _finite(r.get(key))]
    return [e for e, _ in pairs], [v for _, v in pairs]


def training_curves_figure(history: list[dict], *, title: str = "training") -> Figure:
    """One panel (objective and validation) or two (plus KL and active units) — see the module
    docstring. ``history``: the records of ``metrics.jsonl``."""
    has_collapse = any(_finite(r.get("kl")) or _finite(r.get("active_units")) for r in history)
    fig, axes = plt.subplots(
        1, 2 if has_collapse else 1, figsize=(10 if has_collapse else 5.5, 3.8)
    )
    axes = list(axes) if has_collapse else [axes]
    ax = axes[0]
    epochs, train = _series(history, "train_loss")
    ax.plot(epochs, [-v for v in train], marker="o", markersize=3, label="train (−loss per point)")
    best = best_epoch(history)
    for metric, label in (("val_elbo", "validation ELBO"), ("val_loss", "validation −loss")):
        epochs_v, values = _series(history, metric)
        if values:
            sign = 1.0 if metric == "val_elbo" else -1.0
            ax.plot(epochs_v, [sign * v for v in values], marker="o", markersize=3, label=label)
    if best is not None:
        epoch, metric, value = best
        value = value if metric == "val_elbo" else -value
        ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        ax.plot([epoch], [value], marker="*", markersize=12, color="black", linestyle="none")
        late = len(history) > 1 and epoch > (history[0]["epoch"] + history[-1]["epoch"]) / 2
        ax.annotate(
            f"best: epoch {epoch}\n{value:.3f}",
            (epoch, value),
            fontsize=8,
            textcoords="offset points",
            xytext=(-8, -24) if late else (6, -24),
            ha="right" if late else "left",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend(fontsize=8, loc="lower right")
    if has_collapse:
        _collapse_panel(axes[1], history)
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(history) == 1:
            axis.set_xlim(history[0]["epoch"] - 1, history[0]["epoch"] + 1)
    runs = f"{len(history)} epoch" + ("" if len(history) == 1 else "s")
    fig.suptitle(f"{title} ({runs})" if title else runs, fontsize=10)
    return fig


def _collapse_panel(ax, history: list[dict]) -> None:
    epochs, kl = _series(history, "kl")
    lines = ax.plot(epochs, kl, marker="o", markersize=3, color="C2", label="KL(q(z|x) || p(z))")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point (validation)")
    epochs_w, weight = _series(history, "kl_weight")
    if weight and len(set(weight)) > 1:
        twin_w = ax.twinx()
        twin_w.spines["right"].set_position(("outward", 42))
        lines += twin_w.plot(epochs_w, weight, color="C4", linestyle="--", label="KL weight")
        twin_w.set_ylabel("KL weight")
    epochs_a, units = _series(history, "active_units")
    if units:
        twin = ax.twinx()
        total = next((r["latent_units"] for r in history if r.get("latent_units")), None)
        lines += twin.step(
            epochs_a,
            units,
            where="mid",
            marker="o",
            markersize=3,
            color="C3",
            label="active units" + (f" (of {total})" if total else ""),
        )
        twin.set_ylabel("active units")
        twin.set_ylim(0, (total or max(units) or 1) * 1.05)
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    ax.set_title("KL and active units", fontsize=9)
