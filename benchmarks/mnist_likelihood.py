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

Named protocols (``--protocols``, issue 18) reproduce two open references at their own, smaller
budgets; see ``PROTOCOLS`` below and BENCHMARKS.md §9 for every difference from the published
settings:

    python benchmarks/mnist_likelihood.py --data-dir ../shared/data --protocols short-mean-field

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
[2] [P] in BENCHMARKS.md §9: Pythae (clementchadebec/benchmark_VAE),
    examples/scripts/reproducibility/vae.py and its reproducibility table: VAE on binary MNIST,
    test NLL 89.78 with 200 importance samples.
[3] [J]: jaanli/variational-autoencoder, train_variational_autoencoder_pytorch.py, README:
    mean-field VAE, test log p(x) -100.31 after 30,000 steps and -97.10 as the final number.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------
# Named protocols (issue 18): open reproductions at their own budgets.

PROTOCOL_ROOT = "benchmarks/results/mnist_reproduction"
TRAIN_POINTS = 50_000  # the size of Larochelle's binary-MNIST training split, which [2] and [3] use
SNAPSHOT = "snapshot-epoch{epoch:03d}.pt"
CURVE_FILE = "curve.jsonl"


@dataclass(frozen=True)
class Protocol:
    """One named run: architecture, optimiser, budget and the published numbers it is set against.

    ``published``: {K: test NLL in nats} as the reference reports it; ``anchor_epochs``: epochs
    whose weights are kept (a small model-only snapshot) and evaluated like the final one;
    ``curve_epochs``: epochs evaluated on the learning-curve subset while training.
    """

    latent: int
    hidden: tuple[int, ...]
    batch_size: int
    epochs: int
    optimizer: str  # "adam" or "rmsprop-centered"
    lr: float
    objective: str = "elbo"
    k: int = 1
    milestones: tuple[int, ...] = ()  # lr × 10^(-1/5) after each ([2]'s MultiStepLR)
    published: dict[int, float] = field(default_factory=dict)
    anchor_epochs: tuple[int, ...] = ()
    curve_epochs: tuple[int, ...] = ()
    reference: str = ""

    def learning_rate(self, epoch: int) -> float:
        passed = sum(epoch > m for m in self.milestones)
        return self.lr * 10 ** (-passed / 5)

    def build_optimizer(self):
        if self.optimizer == "adam":  # torch's defaults, as [2] uses them
            return pyro.optim.Adam({"lr": self.lr})
        return pyro.optim.RMSprop({"lr": self.lr, "centered": True})  # [3]

    def build_model(self) -> VAE:
        return VAE(784, latent_dim=self.latent, hidden=self.hidden, activation="relu")


_REPRODUCTION = dict(
    latent=40,
    hidden=(400,),
    batch_size=100,
    epochs=500,
    optimizer="adam",
    lr=1e-4,
    milestones=(200, 350),
    curve_epochs=(1, 5, 10, 25, 50, 75, 100, 150, 200, 300, 400, 500),
    reference="[2] pythae VAE reproduction: 784-400-40, batch 100, Adam 1e-4, 500 epochs",
)
PROTOCOLS = {
    "reproduction-vae": Protocol(**_REPRODUCTION, published={200: 89.78}),
    "reproduction-iwae5": Protocol(**_REPRODUCTION, objective="iwae", k=5),
    "short-mean-field": Protocol(
        latent=128,
        hidden=(256, 256),
        batch_size=128,
        epochs=166,
        optimizer="rmsprop-centered",
        lr=1e-3,
        published={128: 100.31},  # [3]: after 30,000 steps (76.8 epochs); 97.10 final
        anchor_epochs=(77, 166),
        curve_epochs=(1, 5, 10, 20, 40, 60, 77, 100, 120, 140, 166),
        reference="[3] mean-field VAE: latent 128, 2×256 ReLU, batch 128, centered RMSprop 1e-3",
    ),
}
ANCHOR_NLL = {("short-mean-field", 77): 100.31, ("short-mean-field", 166): 97.10}


def protocol_data(data_dir, seed: int):
    """Static binarisation: one seeded Bernoulli draw of the grey images (ppvae's ``static``),
    not Larochelle's files; 50,000 training points (a seeded split of the 60k, the references'
    split size), the other 10,000 unused; the 10,000 official test images, one seeded draw."""
    data = load_data(
        "mnist",
        data_dir=data_dir,
        binarize="static",
        val_fraction=1 - TRAIN_POINTS / 60_000,
        seed=seed,
    )
    assert data.train_x.shape[0] == TRAIN_POINTS, data.summary()
    return data.train_x, data.test_x


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def protocol_eval(module, test_x, *, epoch, num_samples, num_points, seed, device) -> dict:
    """NLL ± s.e., the ladder (K=128/200 rungs), k̂ share and wall time of one evaluation."""
    ladder = sorted({1, 5, 50, 128, 200, 500} & set(range(1, num_samples + 1)))
    tic = time.time()
    report = evaluate(
        module,
        test_x,
        num_samples=num_samples,
        ladder=ladder,
        batch_size=100 if num_samples <= 500 else 10,
        device=device,
        progress=False,
        seed=seed,
        num_points=num_points,
    )
    return {
        "epoch": epoch,
        "num_samples": num_samples,
        "test_points": report.num_points,
        "nll": -report.log_px,
        "nll_stderr": report.log_px_stderr,  # importance sampling only
        # the test points' own spread: sd over points of log p(x_n) / sqrt(N)
        "nll_points_stderr": float(report.log_px_per_point.std()) / math.sqrt(report.num_points),
        "elbo": report.elbo,
        "ladder_nll": {str(k): -v for k, v in report.ladder.items()},
        "khat_share_above_0.7": report.khat_share_above,
        "active_units": report.active_units,
        "eval_seconds": time.time() - tic,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_protocol(name: str, args, device) -> None:
    protocol = PROTOCOLS[name]
    run_dir = Path(args.run_root) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    train_x, test_x = protocol_data(args.data_dir, args.seed)
    config = {
        "protocol": name,
        **{k: v for k, v in protocol.__dict__.items() if k != "published"},
        "published": {str(k): v for k, v in protocol.published.items()},
        "train_points": int(train_x.shape[0]),
        "test_points": int(test_x.shape[0]),
        "binarisation": f"static: one seeded draw (ppvae load_data, seed {args.seed})",
        "seed": args.seed,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=list))
    curve = run_dir / CURVE_FILE
    target = min(protocol.epochs, args.epochs or protocol.epochs)
    torch.manual_seed(args.seed)
    module = protocol.build_model()
    last = run_dir / LAST_CHECKPOINT
    done = torch.load(last, weights_only=True)["epoch"] if last.exists() else 0
    if (run_dir / SNAPSHOT.format(epoch=protocol.epochs)).exists():
        done = protocol.epochs  # the whole budget ran; its weights are kept without checkpoint.pt
    deadline = None if args.minutes is None else time.time() + 60 * args.minutes
    stop_at = None if args.stop_at is None else _utc_today(args.stop_at)

    def on_epoch_end(record, module=module):
        epoch = record["epoch"]
        if epoch in protocol.anchor_epochs:  # weights only: small enough to keep
            torch.save(module.state_dict(), run_dir / SNAPSHOT.format(epoch=epoch))
        if epoch in protocol.curve_epochs and args.curve_points:
            entry = protocol_eval(
                module,
                test_x,
                epoch=epoch,
                num_samples=args.curve_samples,
                num_points=args.curve_points,
                seed=args.seed,
                device=device,
            )
            entry["train_loss"] = record["train_loss"]
            entry["epoch_seconds"] = record["seconds"]
            _append_jsonl(curve, entry)
            print(f"{name} epoch {epoch}: NLL {entry['nll']:.2f} ± {entry['nll_stderr']:.2f}")
        now = time.time()
        if (deadline is not None and now > deadline) or (stop_at is not None and now > stop_at):
            raise KeyboardInterrupt

    tic = time.time()
    if done < target:
        try:
            fit(
                module,
                train_x,
                loss=make_objective(protocol.objective, num_particles=protocol.k),
                optimizer=protocol.build_optimizer(),
                lr_schedule=protocol.learning_rate,
                epochs=target,
                batch_size=protocol.batch_size,
                device=device,
                run_dir=run_dir,
                resume=last.exists(),
                seed=args.seed,
                config=config,
                progress=False,
                on_epoch_end=on_epoch_end,
            )
        except KeyboardInterrupt:
            pass
        except PPVAEError as error:
            raise SystemExit(f"{name}: {error}") from None
    print(f"{name}: trained {time.time() - tic:.0f} s this call")
    if args.final_samples:
        final_evaluations(name, protocol, module, test_x, run_dir, args, device)


def _utc_today(hhmm: str) -> float:
    hours, minutes = (int(part) for part in hhmm.split(":"))
    today = time.gmtime()
    midnight = time.time() - (today.tm_hour * 3600 + today.tm_min * 60 + today.tm_sec)
    return midnight + 3600 * hours + 60 * minutes


def final_evaluations(name, protocol, module, test_x, run_dir, args, device) -> None:
    """The last checkpoint and each anchor snapshot at every K of ``--final-samples``; one JSON
    file per (epoch, K, points), skipped when it exists."""
    weights = {}
    for epoch in protocol.anchor_epochs:
        path = run_dir / SNAPSHOT.format(epoch=epoch)
        if path.exists():
            weights[epoch] = torch.load(path, weights_only=True)
    last = run_dir / LAST_CHECKPOINT
    if last.exists():
        checkpoint = torch.load(last, weights_only=True)
        weights[checkpoint["epoch"]] = checkpoint["state_dict"]
    for epoch, state in sorted(weights.items()):
        module.load_state_dict(state)
        for k, points in zip(args.final_samples, args.final_points, strict=True):
            points = None if points <= 0 or points >= test_x.shape[0] else points
            path = run_dir / f"eval-epoch{epoch:03d}-K{k}-{points or 'all'}.json"
            if path.exists():
                continue
            entry = protocol_eval(
                module,
                test_x,
                epoch=epoch,
                num_samples=k,
                num_points=points,
                seed=args.seed,
                device=device,
            )
            entry["protocol"] = name
            entry["published"] = {str(k): v for k, v in protocol.published.items()}
            if (name, epoch) in ANCHOR_NLL:
                entry["anchor_nll"] = ANCHOR_NLL[(name, epoch)]
            path.write_text(json.dumps(entry, indent=2))
            print(
                f"{name} epoch {epoch}: K={k} on {entry['test_points']} points: NLL "
                f"{entry['nll']:.2f} ± {entry['nll_stderr']:.2f} "
                f"(k̂>0.7: {100 * (entry['khat_share_above_0.7'] or 0):.1f}%, "
                f"{entry['eval_seconds']:.0f} s)"
            )


def summarise(run_root: str, out: str) -> None:
    """Collect every protocol run's curve and final evaluations into one JSON and one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(run_root)
    summary = {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, protocol in PROTOCOLS.items():
        run_dir = root / name
        if not run_dir.is_dir():
            continue
        metrics = _read_jsonl(run_dir / "metrics.jsonl")
        seconds = [r["seconds"] for r in metrics]
        curve = _read_jsonl(run_dir / CURVE_FILE)
        finals = [json.loads(p.read_text()) for p in sorted(run_dir.glob("eval-epoch*.json"))]
        summary[name] = {
            "epochs_reached": len(metrics),
            "epochs_budget": protocol.epochs,
            "median_epoch_seconds": sorted(seconds)[len(seconds) // 2] if seconds else None,
            "train_seconds": sum(seconds),
            "published": {str(k): v for k, v in protocol.published.items()},
            "curve": curve,
            "final": finals,
        }
        if curve:
            points = {c["test_points"] for c in curve}
            ks = {c["num_samples"] for c in curve}
            label = f"{name} ({'/'.join(map(str, points))} test pts, K={'/'.join(map(str, ks))})"
            ax.plot([c["epoch"] for c in curve], [c["nll"] for c in curve], "o-", ms=3, label=label)
    for (_, epoch), nll in ANCHOR_NLL.items():
        ax.plot([epoch], [nll], "kx", ms=8)
        ax.annotate(f"[J] {nll}", (epoch, nll), textcoords="offset points", xytext=(4, 4))
    ax.axhline(89.78, color="grey", ls="--", lw=1)
    ax.annotate("[P] 89.78 (500 epochs)", (1, 89.78), textcoords="offset points", xytext=(2, -12))
    ax.set_xscale("log")
    ax.set_ylim(85, 130)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test NLL (nats), importance sampled")
    ax.set_title("MNIST (static binarisation): ppvae against open reproductions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out).with_suffix(".png"), dpi=120)
    Path(out).write_text(json.dumps(summary, indent=2))
    for name, entry in summary.items():
        print(
            f"{name}: {entry['epochs_reached']}/{entry['epochs_budget']} epochs, "
            f"{entry['median_epoch_seconds']} s/epoch (median)"
        )
        for final in entry["final"]:
            print(
                f"  epoch {final['epoch']} K={final['num_samples']} {final['test_points']} pts: "
                f"{final['nll']:.2f} ± {final['nll_stderr']:.2f}"
            )


def protocols_main(args, device) -> None:
    if args.summarise:
        summarise(args.run_root, args.out)
        return
    for name in args.protocols:
        run_protocol(name, args, device)


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
    named = parser.add_argument_group("named protocols (issue 18); --runs/--stages do not apply")
    named.add_argument("--protocols", nargs="+", default=None, choices=list(PROTOCOLS))
    named.add_argument("--epochs", type=int, default=None, help="train to this epoch at most")
    named.add_argument("--stop-at", default=None, help="HH:MM UTC: stop after the epoch past it")
    named.add_argument("--curve-points", type=int, default=1000, help="0: no curve evaluations")
    named.add_argument("--curve-samples", type=int, default=200)
    named.add_argument("--final-samples", type=int, nargs="*", default=[200, 5000])
    named.add_argument("--final-points", type=int, nargs="*", default=[0, 1000], help="0: all")
    named.add_argument("--summarise", action="store_true", help="table and figure of the runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.protocols or args.summarise:
        if args.run_root == "runs/mnist_likelihood":
            args.run_root = PROTOCOL_ROOT
        if args.out == "benchmarks/results/mnist_likelihood.json":
            args.out = "benchmarks/results/mnist_reproduction.json"
        protocols_main(args, resolve_device(args.device))
        return
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
