"""Figures for BENCHMARKS.md from the JSON the benchmark scripts write.

    python benchmarks/plot_results.py                      # both figures, from benchmarks/results/

``train_speed.png``: seconds per MNIST epoch of each variant, per setting (one run of
``train_speed.py``). ``mnist_likelihood.png``: test NLL reached by each run of
``mnist_likelihood.py`` against the published value of Burda et al. (2015), Table 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_train_speed(results: dict, out: Path) -> None:
    settings = results["results"]
    variants = list(settings[0]["seconds_per_epoch"])
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6))
    for ax, setting in zip(axes if len(settings) > 1 else [axes], settings, strict=True):
        seconds = [setting["seconds_per_epoch"][v] for v in variants]
        bars = ax.bar(range(len(variants)), seconds, color=["0.55", "0.75", "tab:red", "tab:blue"])
        for bar, variant in zip(bars, variants, strict=True):
            ratio = setting["ratio_to_hand_written"][variant]
            ax.annotate(
                f"{ratio:.2f}×",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{setting['setting']}: batch {setting['batch_size']}, K={setting['k']}")
        ax.set_ylabel("seconds per 60k-image epoch")
    fig.suptitle(f"training speed, {results['machine']} ({results['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_mnist_likelihood(results: dict, out: Path) -> None:
    names = list(results)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    reached = [results[n]["test_nll"] for n in names]
    errors = [results[n]["test_nll_stderr"] for n in names]
    published = [results[n]["published_nll"] for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], reached, 0.4, yerr=errors, label="ppvae (budget run)")
    ax.bar([x + 0.2 for x in xs], published, 0.4, color="0.6", label="Burda et al., 3,280 epochs")
    labels = [f"{n}\n(epoch {results[n]['epochs']}, stage {results[n]['stage']})" for n in names]
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylim(min(published) - 5, max(reached) + 5)
    ax.set_ylabel("test NLL, nats (K = 5000)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    root = Path(args.results)
    for name, plot in (
        ("train_speed", plot_train_speed),
        ("mnist_likelihood", plot_mnist_likelihood),
    ):
        source = root / f"{name}.json"
        if source.exists():
            plot(json.loads(source.read_text()), root / f"{name}.png")
            print(f"wrote {root / f'{name}.png'}")


if __name__ == "__main__":
    main()
