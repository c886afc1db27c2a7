"""Training speed: ``ppvae.inference.fit`` against a hand-written PyTorch loop and a plain Pyro
``SVI`` loop (as in Pyro's VAE example), same model, same data, same machine, one run.

Variants: ``hand-written`` (the same VAE and loss in plain PyTorch with ``torch.optim.Adam`` as
a user writes it: the reference), ``hand-written-fused`` (the same with torch's fused Adam
kernel, which ``fit`` also uses), ``pyro-svi`` (``SVI(model, guide, Adam, Trace_ELBO())`` as in
Pyro's VAE example) and ``ppvae-fit``.

Each variant trains the identical VAE (same initial weights) for one pass over the same
pre-binarised MNIST training points; variants are interleaved and repeated, and the median
seconds are reported, scaled to a full 60,000-point epoch when ``--num-points`` is smaller.
``fit``'s epoch is its steady state (the epoch's own seconds in fit's history); the one-off setup
of a ``fit`` call (data checks, the contract probe, building the step) is reported apart
(``setup_seconds_per_call``), not scaled.

    python benchmarks/train_speed.py --data-dir ../shared/data            # all three settings
    python benchmarks/train_speed.py --settings iwae-arch --repeats 5 --num-points 6000

Settings: ``iwae-arch`` = 784-200-200-50 tanh (Burda et al.) at batch 20, ``wide`` = 784-400-50
relu at batch 128; ``iwae-k50`` = the iwae-arch network trained with the IWAE bound, K=50, batch 20,
ppvae's ``IWAE_ELBO`` against a hand-written IWAE loss.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from run_record import (  # benchmarks/run_record.py, beside this script
    commit,
    cpu_name,
    load_average,
)
from torch.nn import functional as F

from ppvae.data import load_data
from ppvae.inference import fit
from ppvae.inference.objectives import IWAE_ELBO
from ppvae.models import VAE

SETTINGS = {
    "iwae-arch": dict(hidden=(200, 200), latent_dim=50, activation="tanh", batch_size=20, k=1),
    "wide": dict(hidden=(400,), latent_dim=50, activation="relu", batch_size=128, k=1),
    "iwae-k50": dict(hidden=(200, 200), latent_dim=50, activation="tanh", batch_size=20, k=50),
}


def hand_written_epoch(
    module: VAE, x: torch.Tensor, batch_size: int, k: int, lr: float, fused: bool = False
) -> None:
    """The reference: the same VAE and loss in plain PyTorch, no framework in between
    (``torch.optim.Adam`` as a user writes it; ``fused=True``: torch's fused Adam kernel)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, fused=fused)
    order = torch.randperm(x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        xb = x[order[start : start + batch_size]]
        loc, scale = module.encode(xb)
        eps = torch.randn((k, *loc.shape))
        z = loc + scale * eps  # [k, B, z_dim]
        logits = module.decoder(z)
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, xb.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_w = log_px_z + log_pz - log_qz  # [k, B]
        bound = torch.logsumexp(log_w, 0) - math.log(k) if k > 1 else log_w[0]
        loss = -bound.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def plain_svi_epoch(module: VAE, x: torch.Tensor, batch_size: int, k: int, lr: float) -> None:
    """Pyro's VAE example loop: ``SVI(model, guide, Adam, Trace_ELBO()).step`` per batch."""
    pyro.clear_param_store()
    loss = Trace_ELBO() if k == 1 else IWAE_ELBO(k)
    svi = SVI(module.model, module.guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    order = torch.randperm(x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        svi.step(x[order[start : start + batch_size]])


def ppvae_epoch(module: VAE, x: torch.Tensor, batch_size: int, k: int, lr: float) -> float:
    """One ``fit`` call of one epoch; returns the epoch's own seconds (fit's record), which leave
    out the one-off setup of the call (data checks, the contract probe, building the step)."""
    loss = None if k == 1 else IWAE_ELBO(k)
    result = fit(
        module, x, loss=loss, lr=lr, epochs=1, batch_size=batch_size, device="cpu", progress=False
    )
    return result.history[-1]["seconds"]


def hand_written_fused_epoch(module: VAE, x, batch_size: int, k: int, lr: float) -> None:
    hand_written_epoch(module, x, batch_size, k, lr, fused=True)


VARIANTS = {
    "hand-written": hand_written_epoch,
    "hand-written-fused": hand_written_fused_epoch,
    "pyro-svi": plain_svi_epoch,
    "ppvae-fit": ppvae_epoch,
}


def run_setting(name: str, x: torch.Tensor, repeats: int, lr: float) -> dict:
    spec = SETTINGS[name]
    torch.manual_seed(0)
    reference = VAE(
        784, spec["latent_dim"], hidden=spec["hidden"], activation=spec["activation"]
    ).state_dict()
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steady: dict[str, list[float]] = {v: [] for v in VARIANTS}  # whole call less its setup
    warm = x[: spec["batch_size"] * 5]
    for epoch in VARIANTS.values():  # warm-up: first-call costs stay out of the timings
        module = VAE(784, spec["latent_dim"], hidden=spec["hidden"], activation=spec["activation"])
        module.load_state_dict(reference)
        epoch(module, warm, spec["batch_size"], spec["k"], lr)
    for repeat in range(repeats):
        for variant, epoch in VARIANTS.items():  # interleaved, so drifts hit every variant alike
            module = VAE(
                784, spec["latent_dim"], hidden=spec["hidden"], activation=spec["activation"]
            )
            module.load_state_dict(reference)
            torch.manual_seed(repeat)
            tic = time.perf_counter()
            epoch_seconds = epoch(module, x, spec["batch_size"], spec["k"], lr)
            seconds[variant].append(time.perf_counter() - tic)
            steady[variant].append(seconds[variant][-1] if epoch_seconds is None else epoch_seconds)
    # steady state scaled to 60k points; a one-off setup (fit's) is paid once per call, not per
    # 3,000 points, so it is reported apart and not scaled
    scale = 60000 / x.shape[0]
    medians = {v: statistics.median(s) * scale for v, s in steady.items()}
    setup = {
        v: statistics.median(a - b for a, b in zip(seconds[v], steady[v], strict=True))
        for v in VARIANTS
    }
    return {
        "setting": name,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
        "seconds_per_epoch": medians,
        "ratio_to_hand_written": {v: m / medians["hand-written"] for v, m in medians.items()},
        "ratio_to_hand_written_fused": {
            v: m / medians["hand-written-fused"] for v, m in medians.items()
        },
        "setup_seconds_per_call": setup,
        "raw_seconds": seconds,
        "raw_steady_seconds": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MNIST root (default: $PPVAE_DATA)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--num-points", type=int, default=6000, help="points timed per epoch")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data("mnist", data_dir=args.data_dir, binarize="static", seed=0)
    x = data.train_x[: args.num_points].contiguous()
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    load_at_start = load_average()
    print(f"machine: {machine}; torch {torch.__version__}, pyro {pyro.__version__}")
    results = []
    for name in args.settings:
        result = run_setting(name, x, args.repeats, args.lr)
        results.append(result)
        row = "  ".join(
            f"{v} {s:7.2f} s ({result['ratio_to_hand_written'][v]:.2f}x)"
            for v, s in result["seconds_per_epoch"].items()
        )
        print(f"{name:10s} batch {result['batch_size']:3d}, K={result['k']:2d}: {row}")
        fit_ratio = result["ratio_to_hand_written_fused"]["ppvae-fit"]
        fit_setup = result["setup_seconds_per_call"]["ppvae-fit"]
        print(f"{'':10s} ppvae-fit / hand-written-fused {fit_ratio:.2f}x, setup {fit_setup:.3f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "date": time.strftime("%Y-%m-%d"),
                "num_points": args.num_points,
                "repeats": args.repeats,
                "commit": commit(),
                "command": " ".join(["python", *sys.argv]),
                "load_average_at_start": load_at_start,
                "load_average_at_end": load_average(),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
