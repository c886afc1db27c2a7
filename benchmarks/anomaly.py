"""Anomaly detection with a VAE on MNIST: leave-one-digit-out and offline out-of-distribution sets.

Leave-one-digit-out (the protocol of Tonnaer's thesis, Table 3.3): for each held-out digit h, a VAE
is trained on the training images of the nine other digits; every test image is scored and the
test images of digit h are the anomalies. AUROC and AUPRC per held-out digit for each score of
``ppvae.applications.anomaly_scores`` (−log p(x), −ELBO, reconstruction error, the likelihood ratio
against a background model trained on perturbed inputs [Ren et al. 2019], input complexity with PNG
code lengths [Serrà et al. 2020]), at a 2-D and a 32-D latent.

Out-of-distribution sets: a VAE trained on all ten digits scores the MNIST test images (normal)
against sets made offline: uniform noise, all-black and all-white images, inverted digits (1 − x),
and scikit-learn's 8×8 digits upsampled bilinearly to 20×20 and padded to 28×28 (MNIST's digit
box). Every set is binarised with one seeded Bernoulli draw, like the MNIST test set.

The default is a stated subset that ran in 13 minutes on 2 CPU cores shared with other jobs
(about 10 alone): held-out digits
0, 1, 7; the first 10,000 training images; 10 epochs; 2,000 test images; K = 100 importance
samples. ``--full`` runs every digit on all training images for 50 epochs, the whole test set
and K = 1000.

``--purification`` instead measures the restorations of ``ppvae.applications.purification`` on
MNIST: a continuous-Bernoulli VAE (latent 16) trained on grey images, every corruption and
restoration on 500 test images, MSE/BCE/PSNR to the clean images before and after.

    PPVAE_DATA=/path/with/MNIST/raw python benchmarks/anomaly.py [--full | --purification]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ppvae.applications import (
    anomaly_scores,
    corrupt,
    detection_metrics,
    purification_table,
    restoration_errors,
    restore,
    train_background,
)
from ppvae.data import DynamicBinarization, load_data
from ppvae.inference import fit
from ppvae.models import VAE
from ppvae.plots.applications import plot_purification, plot_roc_curves, plot_score_histograms

RESULTS = Path(__file__).parent / "results"
PUBLISHED = {  # Tonnaer's thesis, Table 3.3: ELBO-score AUROC, mean over the ten held-out digits
    2: {"mean": 0.855, "digit 1": 0.09},
    32: {"mean": 0.718},
}

DEFAULT = dict(digits=[0, 1, 7], train_limit=10_000, epochs=10, test_limit=2_000, num_samples=100)
FULL = dict(digits=list(range(10)), train_limit=None, epochs=50, test_limit=None, num_samples=1000)


def seeded_binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.bernoulli(x.clamp(0, 1), generator=torch.Generator().manual_seed(seed))


def ood_sets(mnist_test_grey: torch.Tensor, num: int, seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    generator = torch.Generator().manual_seed(seed)
    small = torch.as_tensor(load_digits().images[:num] / 16.0, dtype=torch.float32)
    upsampled = F.interpolate(small[:, None], size=(20, 20), mode="bilinear", align_corners=False)
    upsampled = F.pad(upsampled, (4, 4, 4, 4)).reshape(len(small), -1)
    grey = {
        "uniform noise": torch.rand(num, 784, generator=generator),
        "all black": torch.zeros(num, 784),
        "all white": torch.ones(num, 784),
        "inverted digits": 1 - mnist_test_grey[:num],
        "8x8 digits upsampled": upsampled,
    }
    return {name: seeded_binarize(x, seed + i + 1) for i, (name, x) in enumerate(grey.items())}


def train_pair(train, latent_dim: int, epochs: int, seed: int):
    torch.manual_seed(seed)  # the initial weights
    vae = VAE(784, latent_dim=latent_dim, hidden=(256,))
    fit(vae, train, epochs=epochs, batch_size=100, lr=1e-3, progress=False, seed=seed)
    background = VAE(784, latent_dim=latent_dim, hidden=(256,))
    train_background(background, train, rate=0.2, epochs=epochs, lr=1e-3, seed=seed)
    return vae, background


def score(vae, background, x, num_samples: int, seed: int):
    return anomaly_scores(
        vae, x, num_samples=num_samples, background=background, image_shape=(1, 28, 28), seed=seed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole protocol (hours on a CPU)")
    parser.add_argument("--latents", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--purification", action="store_true", help="the restorations instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON (default: results/anomaly*.json)")
    args = parser.parse_args()
    if args.purification:
        purification(args.seed, Path(args.out or RESULTS / "anomaly_purification.json"))
        return
    args.out = args.out or str(RESULTS / "anomaly.json")
    config = {**(FULL if args.full else DEFAULT), "latents": args.latents, "seed": args.seed}
    data = load_data("mnist", binarize="dynamic", seed=args.seed)
    test_order = torch.randperm(len(data.test_x), generator=torch.Generator().manual_seed(1))
    test_order = test_order[: config["test_limit"]]
    test_x, test_y = data.test_x[test_order], data.test_y[test_order]
    test_grey = load_data("mnist", binarize="none", seed=args.seed).test_x[test_order]
    results = {"leave_one_digit_out": {}, "ood": {}}
    tic = time.perf_counter()
    for latent in args.latents:
        per_digit = results["leave_one_digit_out"][str(latent)] = {}
        for digit in config["digits"]:
            keep = data.train_y != digit
            train = DynamicBinarization(
                data.train_x[keep][: config["train_limit"]], None, seed=args.seed
            )
            vae, background = train_pair(train, latent, config["epochs"], args.seed)
            scores = score(vae, background, test_x, config["num_samples"], args.seed)
            anomalous = test_y == digit
            per_digit[str(digit)] = detection_metrics(scores.scores(), anomalous)
            per_digit[str(digit)]["khat_above_0.7"] = float((scores.khat > 0.7).float().mean())
            if digit == 1 and latent == min(args.latents):
                RESULTS.mkdir(exist_ok=True)
                plot_roc_curves(scores.scores(), anomalous, RESULTS / "anomaly_roc_digit1.png")
                plot_score_histograms(
                    scores.scores(),
                    anomalous.long(),
                    RESULTS / "anomaly_hist_digit1.png",
                    label_names={0: "other digits", 1: "digit 1 (held out)"},
                )
            print(f"latent {latent} digit {digit}: {time.perf_counter() - tic:.0f} s", flush=True)
        train = DynamicBinarization(data.train_x[: config["train_limit"]], None, seed=args.seed)
        vae, background = train_pair(train, latent, config["epochs"], args.seed)
        sets = ood_sets(test_grey, min(1000, len(test_x)), args.seed)
        normal = test_x[: min(1000, len(test_x))]
        normal_scores = score(vae, background, normal, config["num_samples"], args.seed).scores()
        per_set = results["ood"][str(latent)] = {}
        for name, x in sets.items():
            odd = score(vae, background, x, config["num_samples"], args.seed).scores()
            both = {k: torch.cat([normal_scores[k], odd[k]]) for k in normal_scores}
            labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(x))])
            per_set[name] = detection_metrics(both, labels)
        print(f"latent {latent} OOD sets: {time.perf_counter() - tic:.0f} s", flush=True)
    results["config"] = config
    results["seconds"] = time.perf_counter() - tic
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    results["published"] = PUBLISHED
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)


def purification(seed: int, out: Path) -> None:
    tic = time.perf_counter()
    data = load_data("mnist", binarize="none", seed=seed, limit=10_000)
    torch.manual_seed(seed)  # the initial weights
    vae = VAE(784, latent_dim=16, hidden=(256,), likelihood="continuous-bernoulli")
    fit(vae, data.train, epochs=10, batch_size=100, lr=1e-3, progress=False, seed=seed)
    clean = data.test_x[:500]
    # the model's own floor: the clean images through encoder and decoder
    floor = restoration_errors(
        clean, restore(vae, corrupt(clean, "missing-pixels", level=0.0), "encoder-mean")[0]
    )
    rows, examples = purification_table(
        vae, clean, image_shape=(1, 28, 28), num_particles=500, iterations=5, seed=seed
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("gaussian-noise", "occlusion"):
        method = "importance" if kind == "gaussian-noise" else "impute"
        corrupted, restored, uncertainty = examples[(kind, method)]
        plot_purification(
            clean,
            corrupted,
            restored,
            uncertainty,
            (1, 28, 28),
            out.parent / f"anomaly_purification_{kind}.png",
            title=f"MNIST, {kind}, restored by {method}",
        )
    config = dict(train_limit=10_000, epochs=10, latent=16, test=500, num_particles=500)
    floor = {name: float(values.mean()) for name, values in floor.items()}
    document = {"config": config, "clean_floor": floor, "rows": rows}
    document["seconds"] = time.perf_counter() - tic
    out.write_text(json.dumps(document, indent=1))
    print("| corruption | method | MSE before → after | BCE before → after | PSNR before → after |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['corruption']} | {r['method']} | {r['mse_before']:.4f} → {r['mse_after']:.4f} "
            f"| {r['bce_before']:.3f} → {r['bce_after']:.3f} "
            f"| {r['psnr_before']:.2f} → {r['psnr_after']:.2f} |"
        )
    print(
        f"| none (clean) | encoder-mean | 0 → {floor['mse']:.4f} | → {floor['bce']:.3f} "
        f"| → {floor['psnr']:.2f} |"
    )
    print(f"{document['seconds']:.0f} s")


def print_tables(results: dict) -> None:
    names = ["neg_elbo", "neg_log_marginal", "reconstruction", "likelihood_ratio", "complexity"]
    print("| latent | held-out digit | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for latent, per_digit in results["leave_one_digit_out"].items():
        for digit, metrics in per_digit.items():
            cells = [f"{metrics[n]['auroc']:.3f} / {metrics[n]['auprc']:.3f}" for n in names]
            print(f"| {latent} | {digit} | " + " | ".join(cells) + " |")
        means = [sum(m[n]["auroc"] for m in per_digit.values()) / len(per_digit) for n in names]
        print(f"| {latent} | mean AUROC | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    print()
    print("| latent | OOD set | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for latent, per_set in results["ood"].items():
        for name, metrics in per_set.items():
            cells = [f"{metrics[n]['auroc']:.3f} / {metrics[n]['auprc']:.3f}" for n in names]
            print(f"| {latent} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
