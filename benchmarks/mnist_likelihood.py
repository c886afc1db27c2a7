"""MNIST test log-likelihood under the protocol of Burda, Grosse & Salakhutdinov (2015) [1].

Dynamically binarised MNIST (all 60k training images, a fresh Bernoulli draw every epoch), a
784-200-200 tanh encoder to 50 latents and a mirrored decoder (two stochastic layers: 100-100 to
z1=100, 50-50 to z2=50), Bernoulli output, Adam(β1=0.9, β2=0.999, ε=1e-4), batch 20, learning
rate 1e-3·10^(−i/7) for 3^i epochs, i = 0…7 (3,280 epochs in all); test log p(x) by importance
sampling with K=5000 on one seeded binarisation of the test set.

A budget (``--stages`` or ``--minutes``) stops the schedule early; the report names the stage and
epoch reached, so a CPU run gives an honest partial point. Runs are checkpointed under
``--run-root`` and resume where they stopped.

    python benchmarks/mnist_likelihood.py --data-dir ../shared/data --runs vae iwae5 --stages 2

Published test NLL (Table 1 of [1]), nats: VAE 86.76, IWAE k=5 85.54, IWAE k=50 84.78;
two stochastic layers: VAE 85.33, IWAE k=50 82.90.

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pyro.optim
import torch

from ppvae.data import DynamicBinarization, bernoulli_draw, load_data
from ppvae.errors import PPVAEError
from ppvae.inference import evaluate, fit, make_objective
from ppvae.inference.train import LAST_CHECKPOINT, resolve_device
from ppvae.models import HVAE, VAE

PUBLISHED_NLL = {"vae": 86.76, "iwae5": 85.54, "iwae50": 84.78, "hvae": 85.33, "hiwae50": 82.90}
RUNS = {  # name: (model, objective, K)
    "vae": ("vae", "elbo", 1),
    "iwae5": ("vae", "iwae", 5),
    "iwae50": ("vae", "iwae", 50),
    "hvae": ("hvae", "elbo", 1),
    "hiwae50": ("hvae", "iwae", 50),
}


def stage_of_epoch(epoch: int) -> int:
    """Stage i holds epochs sum_{j<i} 3^j + 1 … sum_{j<=i} 3^j (1-based)."""
    stage, last = 0, 1
    while epoch > last:
        stage += 1
        last += 3**stage
    return stage


def epochs_through(stage: int) -> int:
    return sum(3**i for i in range(stage + 1))


def learning_rate(epoch: int) -> float:
    return 1e-3 * 10 ** (-stage_of_epoch(epoch) / 7)


def build(model: str):
    if model == "vae":
        return VAE(784, latent_dim=50, hidden=(200, 200), activation="tanh")
    return HVAE(784)  # 100-100 to z1=100, 50-50 to z2=50, tanh: the paper's sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MNIST root (default: $PPVAE_DATA)")
    parser.add_argument("--runs", nargs="+", default=["vae", "iwae5"], choices=list(RUNS))
    parser.add_argument("--stages", type=int, default=7, help="last stage i to run (0..7)")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per run")
    parser.add_argument("--eval-points", type=int, default=10000, help="test points for log p(x)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K for log p(x)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--run-root", default="runs/mnist_likelihood")
    parser.add_argument("--out", default="benchmarks/results/mnist_likelihood.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not 0 <= args.stages <= 7:
        raise SystemExit("--stages must be in 0..7")
    device = resolve_device(args.device)

    grey = load_data("mnist", data_dir=args.data_dir, binarize="none", seed=args.seed)
    train = DynamicBinarization(torch.cat([grey.train_x, grey.val_x]), seed=args.seed)
    test_generator = torch.Generator().manual_seed(12345)
    test_x = bernoulli_draw(grey.test_x, test_generator)[: args.eval_points]

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.runs:
        model_name, objective, k = RUNS[name]
        torch.manual_seed(args.seed)
        module = build(model_name)
        run_dir = Path(args.run_root) / name
        total_epochs = epochs_through(args.stages)
        deadline = None if args.minutes is None else time.time() + 60 * args.minutes

        def stop_when_over_budget(record, deadline=deadline):
            if deadline is not None and time.time() > deadline:
                raise KeyboardInterrupt

        tic = time.time()
        try:
            fit(
                module,
                train,
                loss=make_objective(objective, num_particles=k),
                optimizer=pyro.optim.Adam({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-4}),
                lr_schedule=learning_rate,
                epochs=total_epochs,
                batch_size=20,
                device=device,
                run_dir=run_dir,
                resume=(run_dir / LAST_CHECKPOINT).exists(),
                seed=args.seed,
                progress=False,
                on_epoch_end=stop_when_over_budget,
            )
        except KeyboardInterrupt:
            pass
        except PPVAEError as error:
            raise SystemExit(f"{name}: {error}") from None
        train_seconds = time.time() - tic
        checkpoint = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
        epoch = checkpoint["epoch"]
        report = evaluate(
            module,
            test_x,
            num_samples=args.num_samples,
            ladder=(1, 5, 50),
            batch_size=50,
            device=device,
            progress=False,
            seed=args.seed,
        )
        results[name] = {
            "model": model_name,
            "objective": objective,
            "k": k,
            "epochs": epoch,
            "stage": stage_of_epoch(epoch),
            "stage_complete": epoch == epochs_through(stage_of_epoch(epoch)),
            "train_seconds_this_call": train_seconds,
            "test_points": int(test_x.shape[0]),
            "num_samples": args.num_samples,
            "test_elbo": report.elbo,
            "test_iwae": {str(k): v for k, v in report.ladder.items()},
            "test_nll": -report.log_px,
            "test_nll_stderr": report.log_px_stderr,
            "published_nll": PUBLISHED_NLL[name],
            "device": str(device),
            "date": time.strftime("%Y-%m-%d"),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        r = results[name]
        print(
            f"{name:8s} epoch {epoch:4d} (stage {r['stage']}): test NLL {r['test_nll']:.2f} "
            f"± {r['test_nll_stderr']:.2f} on {r['test_points']} points (K={args.num_samples}); "
            f"published {r['published_nll']:.2f} after 3,280 epochs"
        )


if __name__ == "__main__":
    main()
