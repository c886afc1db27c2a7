"""log p(x) of an MNIST VAE beyond importance sampling: IS-5000 against AIS at several budgets,
a BDMC sandwich on simulated data, and the gap split into approximation and amortisation.

Protocol (defaults; every one is an option): a VAE with the IWAE paper's one-layer-of-latents
architecture (784-200-200 tanh to 50 latents, mirrored decoder, Bernoulli output) trained with the
ELBO on dynamically binarised MNIST (60k images) for ``--epochs`` epochs, batch 100, Adam 1e-3 —
far shorter than the papers' training, to fit this shared 2-core machine; the checkpoint is cached
under ``--run-dir`` and reused. Evaluated on the first ``--points`` images of one seeded
binarisation of the test set:

- ELBO (1000 draws), IWAE-k bounds for k = 1, 5, 50, 500, 5000 (one set of 5000 draws);
- AIS from the guide, sigmoid schedule, HMC with ``--leapfrog`` leapfrog steps, ``--chains``
  chains, step sizes adapted in a warm-up run of T/5 steps, for each T in ``--ais-steps``;
- BDMC on ``--bdmc-points`` images simulated from the trained model, ``--bdmc-steps`` steps;
- the gap split of [3] with a local diagonal-Normal q* fitted for ``--local-steps`` steps, using
  the largest AIS budget's log p(x).

    OMP_NUM_THREADS=1 python benchmarks/ais.py --data-dir ../shared/data [--points 50]

The default (20 points) takes about 7 minutes on a shared 2-core VM once the checkpoint exists
(training adds about 5); BENCHMARKS.md's table used ``--points 50`` (19 minutes in all).

References for the comparison in BENCHMARKS.md: [1] Wu, Burda, Salakhutdinov, Grosse (2017), On
the Quantitative Analysis of Decoder-Based Generative Models; [2] Grosse, Ghahramani, Adams (2015),
Sandwiching the marginal likelihood using bidirectional Monte Carlo; [3] Cremer, Li, Duvenaud
(2018), Inference Suboptimality in Variational Autoencoders.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from ppvae.data import DynamicBinarization, bernoulli_draw, load_data
from ppvae.inference import fit
from ppvae.inference.ais import ais_log_marginal, bdmc
from ppvae.inference.gaps import gap_decomposition
from ppvae.inference.importance import log_marginal_stderr, log_mean_exp, log_weights
from ppvae.inference.train import LAST_CHECKPOINT
from ppvae.models import VAE
from ppvae.plots.ais import plot_ais_vs_iwae, plot_gap_bars

LADDER = (1, 5, 50, 500, 5000)


def train(args) -> VAE:
    torch.manual_seed(args.seed)
    module = VAE(784, latent_dim=50, hidden=(200, 200), activation="tanh")
    run_dir = Path(args.run_dir)
    if (run_dir / LAST_CHECKPOINT).exists():
        checkpoint = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)
        if checkpoint["epoch"] >= args.epochs:
            module.load_state_dict(checkpoint["state_dict"])
            print(f"reusing {run_dir} (epoch {checkpoint['epoch']})")
            return module.eval()
    grey = load_data("mnist", data_dir=args.data_dir, binarize="none", seed=args.seed)
    train_set = DynamicBinarization(torch.cat([grey.train_x, grey.val_x]), seed=args.seed)
    tic = time.time()
    fit(
        module,
        train_set,
        epochs=args.epochs,
        batch_size=100,
        lr=1e-3,
        device="cpu",
        run_dir=run_dir,
        resume=(run_dir / LAST_CHECKPOINT).exists(),
        seed=args.seed,
        progress=False,
    )
    print(f"trained {args.epochs} epochs in {time.time() - tic:.0f} s")
    return module.eval()


def importance_ladder(module, x) -> dict:
    tic = time.time()
    with torch.no_grad():
        log_w = log_weights(module.model, module.guide, x, num_particles=max(LADDER))  # [K, N]
        elbo = log_weights(module.model, module.guide, x, num_particles=1000).mean(0)
    seconds = time.time() - tic
    ladder = {k: float(log_mean_exp(log_w[:k]).mean()) for k in LADDER}
    return {
        "elbo": float(elbo.mean()),
        "iwae": ladder,
        "is5000_per_point": log_mean_exp(log_w).tolist(),
        "is5000_stderr_mean": float(log_marginal_stderr(log_w).mean()),
        "seconds_per_point": seconds / x.shape[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MNIST root (default: $PPVAE_DATA)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--points", type=int, default=20, help="test points evaluated")
    parser.add_argument("--ais-steps", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--bdmc-points", type=int, default=20)
    parser.add_argument("--bdmc-steps", type=int, default=300)
    parser.add_argument("--local-steps", type=int, default=300)
    parser.add_argument("--run-dir", default="runs/ais_benchmark")
    parser.add_argument("--out", default="benchmarks/results/ais.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.time()
    module = train(args)
    grey = load_data("mnist", data_dir=args.data_dir, binarize="none", seed=args.seed)
    x = bernoulli_draw(grey.test_x, torch.Generator().manual_seed(12345))[: args.points]

    results: dict = {
        "settings": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    torch.manual_seed(args.seed)
    results["importance"] = importance_ladder(module, x)
    print(f"ELBO {results['importance']['elbo']:.2f}, IWAE ladder {results['importance']['iwae']}")

    results["ais"] = {}
    largest = None
    for steps in args.ais_steps:
        ais = ais_log_marginal(
            module.model,
            module.guide,
            x,
            num_steps=steps,
            num_chains=args.chains,
            leapfrog_steps=args.leapfrog,
            seed=args.seed,
        )
        largest = ais
        is5000 = torch.tensor(results["importance"]["is5000_per_point"])
        results["ais"][str(steps)] = {
            "mean_log_marginal": float(ais.log_marginal.mean()),
            "mean_stderr": float(ais.stderr.mean()),
            "mean_minus_is5000": float((ais.log_marginal - is5000).mean()),
            "points_above_is5000": float((ais.log_marginal > is5000).float().mean()),
            "acceptance": float(ais.acceptance.mean()),
            "seconds_per_point": ais.seconds / x.shape[0],
            "evaluations_per_point": ais.evaluations_per_point,
            "per_point": ais.log_marginal.tolist(),
        }
        r = results["ais"][str(steps)]
        print(
            f"AIS T={steps}: {r['mean_log_marginal']:.2f} ± {r['mean_stderr']:.2f} "
            f"({r['mean_minus_is5000']:+.2f} vs IS-5000), acceptance {r['acceptance']:.2f}, "
            f"{r['seconds_per_point']:.2f} s/point"
        )

    sandwich = bdmc(
        module.model,
        module.guide,
        x,
        num_points=args.bdmc_points,
        num_steps=args.bdmc_steps,
        num_chains=args.chains,
        leapfrog_steps=args.leapfrog,
        seed=args.seed,
    )
    with torch.no_grad():
        log_w_sim = log_weights(module.model, module.guide, sandwich.x, num_particles=5000)
    results["bdmc"] = {
        "mean_lower": float(sandwich.lower.mean()),
        "mean_upper": float(sandwich.upper.mean()),
        "mean_width": float(sandwich.width.mean()),
        "median_width": float(sandwich.width.median()),
        "is5000_on_simulated": float(log_mean_exp(log_w_sim).mean()),
        "seconds": sandwich.forward.seconds + sandwich.reverse.seconds,
    }
    print(f"BDMC T={args.bdmc_steps}: {results['bdmc']}")

    gaps = gap_decomposition(
        module.model,
        module.guide,
        x,
        local_steps=args.local_steps,
        lr=0.05,
        num_particles=1000,
        log_marginal_method=largest,
        seed=args.seed,
    )
    results["gaps"] = {
        key: value for key, value in gaps.to_dict().items() if key.startswith("mean_")
    } | {"log_marginal_method": gaps.log_marginal_method, "local_steps": gaps.local_steps}
    print(f"gaps: {results['gaps']}")
    results["total_seconds"] = time.time() - start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    costs = {
        int(t): (r["evaluations_per_point"], r["mean_log_marginal"])
        for t, r in results["ais"].items()
    }
    plot_ais_vs_iwae(
        {int(k): v for k, v in results["importance"]["iwae"].items()},
        costs,
        out.with_suffix(".png"),
        title=f"MNIST VAE, {args.epochs} epochs, {args.points} test points",
    )
    plot_gap_bars(
        {
            "VAE (ELBO)": (
                results["gaps"]["mean_approximation_gap"],
                results["gaps"]["mean_amortisation_gap"],
            )
        },
        out.with_name(out.stem + "_gaps.png"),
    )
    print(f"wrote {out} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
