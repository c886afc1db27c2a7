"""``ppvae train``: create (or ``--resume``) a run, train it, print a short table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ppvae.cli.options import (
    add_common_options,
    add_data_options,
    add_model_options,
    add_training_options,
    given_run_options,
    print_table,
)
from ppvae.errors import PPVAEError
from ppvae.inference import distributed
from ppvae.inference.regularity import collapse_warning
from ppvae.runs import Run


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a model (default: a VAE on the embedded digits data)",
        description="Train a model with SVI, checkpoint every epoch, then evaluate the best "
        "checkpoint on the test split (ELBO, log p(x), gap) and save figures.",
    )
    add_data_options(parser)
    add_model_options(parser)
    add_training_options(parser)
    add_common_options(parser, run_options=True)
    parser.add_argument(
        "--run-dir",
        default=None,
        help="where to write the run (default: runs/MODEL-DATASET-TIMESTAMP)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint, with its saved options "
        "(--epochs, --lr, --device, --eval-samples may change; default: off)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if distributed.init_from_environment():  # torchrun: rank 0 creates the run, the others open it
        if not distributed.is_writer():
            path = distributed.from_rank0(None, "waiting for rank 0's run", training=False)
            return _other_rank(args, path)
    options = given_run_options(args)
    if options.get("data_dir") is not None:
        options["data_dir"] = str(Path(options["data_dir"]).expanduser().resolve())
    if args.resume:
        if args.run_dir is None:
            raise PPVAEError("--resume needs --run-dir pointing at the run to continue")
        config_path = Path(args.run_dir) / "config.json"
        if not config_path.is_file():
            raise PPVAEError(f"cannot resume: {config_path} does not exist; check --run-dir")
        training = Run.load(args.run_dir).resume_with(**options)
    else:
        training = Run.create(args.run_dir, **options)
    distributed.from_rank0(str(training.path), "sharing the run", training=False)  # config written
    outcome = training.train(
        resume=args.resume, progress=args.progress, log=lambda line: print(f"ppvae: {line}")
    )
    rows = [
        epochs_row(outcome.result, outcome.seconds),
        train_row(outcome.objective, outcome.result, outcome.report, outcome.auxiliary_losses),
        validation_row(outcome.result),
        *report_rows(
            outcome.report, codebook_size=training.config.model_options.get("codebook_size")
        ),
        ("wrote", ", ".join(p.name for p in outcome.written)),
        ("in", str(training.path)),
    ]
    print(f"ppvae: done (test rows: the best checkpoint on the test split of {training.data.name})")
    print_table(rows)
    warning = collapse_warning(outcome.report.active_units, outcome.report.latent_units)
    if warning is not None:
        print(f"ppvae: {warning}", file=sys.stderr)
    return 0


def _other_rank(args: argparse.Namespace, path: str) -> int:
    """A rank other than 0 under torchrun: trains and evaluates its shares of the run rank 0
    created (rank 0 writes every file and prints)."""
    Run.load(path).train(resume=args.resume, progress=False, log=None)
    return 0


def epochs_row(result, seconds: float) -> tuple[str, str]:
    now = result.epochs_this_call
    resumed = (
        f" after resuming at epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    )
    return (
        "epochs",
        f"{now} trained now{resumed}, {len(result.history)} in total ({seconds:.1f} s; "
        f"best validation epoch {result.best_epoch})",
    )


def train_row(objective, result, report, auxiliary: bool) -> tuple[str, str]:
    """The last epoch's training objective, named for what it is."""
    from ppvae.inference.objectives import IWAE_ELBO, KLWeighted_ELBO

    loss = result.history[-1]["train_loss"]
    if result.validation_metric == "val_loss" or not report.likelihood_available:
        return ("train loss", f"{loss:.3f} nats/point (last epoch; no ELBO exists for this model)")
    if auxiliary:
        name, what = "train objective", "the ELBO less the model's auxiliary training losses"
    elif isinstance(objective, IWAE_ELBO):
        name, what = f"train IWAE bound (K={objective.num_particles})", None
    elif isinstance(objective, KLWeighted_ELBO) and objective.reweighted:
        name, what = "train weighted ELBO", "KL term weighted by --beta/--kl-warmup/--free-bits"
    else:
        name, what = "train ELBO", None
    detail = "−train loss per point, last epoch" + (f"; {what}" if what else "")
    return (name, f"{-loss:.3f} ({detail})")


def validation_row(result) -> tuple[str, str]:
    if result.validation_metric == "val_loss":
        return ("val loss", f"{-result.best_validation:.3f} nats/point (best epoch)")
    return ("val ELBO", f"{result.best_validation:.3f} (best epoch)")


def report_rows(report, *, codebook_size: int | None = None) -> list[tuple[str, str]]:
    """Rows for an ``EvaluationReport``: log p(x) and the gap only where they are estimates;
    the test points when they are a seeded subset; codebook usage as "k of K codes (p %)"."""
    rows = []
    split_points = getattr(report, "split_points", None)
    if split_points is not None and split_points != report.num_points:
        rows.append(("test points", f"{report.num_points} of {split_points} (seeded subset)"))
    if not report.likelihood_available:
        rows += [("likelihood", report.note)]
    elif report.point_mass_sites:
        rows += [("test ELBO", f"{report.elbo:.3f} ({report.one_hot_note})")]
    else:
        rows += [
            ("test ELBO", f"{report.elbo:.3f}"),
            ("test log p(x)", f"{report.log_px:.3f} (K={report.num_samples})"),
            ("ELBO gap", f"{report.gap:.3f} nats"),
        ]
        if report.active_units is not None:
            rows.append(("active units", f"{report.active_units} of {report.latent_units}"))
        return rows
    if report.reconstruction_mse is not None:
        rows.append(("recon MSE", f"{report.reconstruction_mse:.4f}"))
    if report.reconstruction_bce is not None:
        rows.append(("recon BCE", f"{report.reconstruction_bce:.3f} nats/point"))
    for name, value in report.extra.items():
        if name == "codebook_size":
            continue  # shown with the usage
        if name == "codebook_usage" and codebook_size:
            used = round(value * codebook_size)
            rows.append(
                ("codebook usage", f"{used} of {codebook_size} codes ({100 * value:.0f} %)")
            )
        else:
            rows.append((name.replace("_", " "), f"{value:.4g}"))
    return rows
