"""ELBO vs IWAE training, in the style of Table 1 of Burda et al. [1].

One architecture (a Gaussian-latent VAE with a Bernoulli likelihood) is trained with the ELBO
(``Trace_ELBO``, k = 1) and with the IWAE bound at each k of ``--ks`` (default 5 and 50), plus
the DReG gradient estimator [2] at the largest k with ``--dreg``. Every run has the same seed,
initialisation, epochs, batch size and learning rate. Each trained model is then evaluated on the
test split with ``ppvae.inference.evaluate`` (one draw of K = ``--eval-samples`` importance
samples per point; every rung of the ladder is read off the same draws) and with the
posterior-collapse diagnostics:

- the test ELBO, IWAE_5, IWAE_50 and log p(x) (the K-sample bound with K = 5000), in nats,
- the gap log p(x) − ELBO,
- active units (Cov_x(E_q[z_d]) > 0.01) out of the latent dimension.

It prints one table and writes ``table.md``, ``results.json`` and ``bound_ladders.png`` (one panel
per trained model: mean k-sample bound against k) to ``--out``. The default budget (digits, 100
epochs) takes a few minutes on a CPU; on MNIST use e.g.

    .venv/bin/python benchmarks/elbo_vs_iwae.py --dataset mnist --data-dir ../shared/data \\
        --latent-dim 50 --hidden 200 200 --epochs 50 --dreg --device cuda

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
[2] Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives, Tucker et al. (2018).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ppvae.data import load_data  # noqa: E402
from ppvae.inference import fit  # noqa: E402
from ppvae.inference.collapse import active_units  # noqa: E402
from ppvae.inference.evaluate import evaluate  # noqa: E402
from ppvae.inference.objectives import make_objective  # noqa: E402
from ppvae.inference.train import resolve_device  # noqa: E402
from ppvae.models import VAE  # noqa: E402

TABLE_KS = (5, 50)
LADDER = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--binarize", default="dynamic", choices=("dynamic", "static"))
    parser.add_argument("--limit", type=int, default=None, help="keep this many training points")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 50], help="IWAE training k")
    parser.add_argument("--dreg", action="store_true", help="also train IWAE-DReG at max k")
    parser.add_argument("--eval-samples", type=int, default=5000, help="K for log p(x)")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (small nets run fastest on one)"
    )
    parser.add_argument("--out", default="runs/elbo_vs_iwae")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def runs_to_train(args) -> list[tuple[str, str, int]]:
    """(label, objective name, k) for each model."""
    runs = [("ELBO", "elbo", 1)]
    runs += [("IWAE", "iwae", k) for k in args.ks]
    if args.dreg:
        runs.append(("IWAE-DReG", "iwae-dreg", max(args.ks)))
    return runs


def train_and_evaluate(args, data, device, label: str, objective: str, k: int) -> dict:
    torch.manual_seed(args.seed)
    module = VAE(data.input_dim, args.latent_dim, hidden=args.hidden, activation=args.activation)
    tic = time.perf_counter()
    fit(
        module,
        data.train,
        loss=make_objective(objective, num_particles=k),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=device,
        seed=args.seed,
        progress=args.progress,
    )
    train_seconds = time.perf_counter() - tic
    test_x, test_y = data.split("test")
    report = evaluate(
        module,
        test_x,
        num_samples=args.eval_samples,
        ladder=[k for k in (*LADDER, *TABLE_KS) if k <= args.eval_samples],
        batch_size=args.eval_batch_size,
        device=device,
        seed=args.seed,
        progress=args.progress,
    )
    units = active_units(module, test_x)
    return {
        "label": label,
        "objective": objective,
        "k": k,
        "elbo": report.elbo,
        "iwae": {str(key): value for key, value in report.ladder.items()},
        "log_px": report.log_px,
        "log_px_stderr": report.log_px_stderr,
        "gap": report.gap,
        "active_units": units.num_active,
        "latent_units": units.num_units,
        "train_seconds": train_seconds,
    }


def format_table(results: list[dict], eval_samples: int) -> str:
    header = [
        "objective",
        "k",
        "test ELBO",
        *(f"IWAE_{k}" for k in TABLE_KS),
        f"log p(x) (K={eval_samples})",
        "gap",
        "active units",
        "train s",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r["label"],
                str(r["k"]),
                f"{r['elbo']:.2f}",
                *(f"{r['iwae'][str(k)]:.2f}" if str(k) in r["iwae"] else "-" for k in TABLE_KS),
                f"{r['log_px']:.2f} ± {r['log_px_stderr']:.3f}",
                f"{r['gap']:.2f}",
                f"{r['active_units']}/{r['latent_units']}",
                f"{r['train_seconds']:.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: (
        "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    )
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def plot_ladders(results: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(
        1, len(results), figsize=(3.2 * len(results), 3.4), sharey=True, squeeze=False
    )
    for ax, r in zip(axes[0], results, strict=True):
        ks = sorted(int(k) for k in r["iwae"])
        ax.plot(ks, [r["iwae"][str(k)] for k in ks], "o-", color="C0", label="k-sample bound")
        ax.axhline(r["log_px"], color="C3", ls="--", lw=1, label="log p(x)")
        ax.axvline(r["k"], color="grey", ls=":", lw=1, label="training k")
        ax.set_xscale("log")
        ax.set_xlabel("k (evaluation)")
        ax.set_title(f"trained with {r['label']}" + (f", k={r['k']}" if r["k"] > 1 else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test bound (nats per point)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_data(
        args.dataset,
        data_dir=args.data_dir,
        binarize=args.binarize,
        limit=args.limit,
        seed=args.seed,
    )
    print(data.summary())
    print(
        f"VAE latent {args.latent_dim}, hidden {args.hidden} ({args.activation}); "
        f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
        f"device {device}"
    )
    results = []
    for label, objective, k in runs_to_train(args):
        results.append(train_and_evaluate(args, data, device, label, objective, k))
        r = results[-1]
        print(f"  {label} k={k}: log p(x) {r['log_px']:.2f} ({r['train_seconds']:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, args.eval_samples)
    print("\nTest-set bounds in nats per point (higher is better):\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2) + "\n"
    )
    figure = plot_ladders(results, out / "bound_ladders.png")
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {figure}")


if __name__ == "__main__":
    main()
