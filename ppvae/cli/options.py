"""Option groups shared by the commands, and the argparse types built from the checks of
:class:`ppvae.RunConfig` (one definition of what a valid value is, for the CLI and for Python).

Options that configure a run default to ``None`` in the parser, so a command can tell what the
user typed (:func:`given_run_options`) from what the configuration fills in: that is how
``train`` refuses model options a model does not take and how ``train --resume`` refuses changed
options. Their help states the configuration's default.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from ppvae.runs.config import (
    COUNT,
    FRACTION,
    MODEL_OPTIONS,
    NONNEGATIVE_FLOAT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SEED,
    Check,
    RunConfig,
)

DEFAULTS = RunConfig.__dataclass_fields__  # the defaults the help texts state


def typed(check: Check):
    """An argparse ``type`` from a configuration check (its message on refusal)."""

    def parse(text: str):
        try:
            return check.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = check.wanted  # argparse names the type in some messages
    return parse


def default(name: str) -> Any:
    return DEFAULTS[name].default


def training_default(name: str) -> str:
    """``50; 100 for hvae``: the field's default and the models' ``training_defaults``."""
    from ppvae.models import MODELS

    special = [
        f"{value} for {model}"
        for model, cls in sorted(MODELS.items())
        for key, value in getattr(cls, "training_defaults", {}).items()
        if key == name
    ]
    return "; ".join([str(default(name)), *special])


def given_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options (fields of ``RunConfig`` and model options) the user typed."""
    names = [n for n in DEFAULTS if n != "model_options"] + list(MODEL_OPTIONS)
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def model_default(key: str) -> str:
    """``(default: 8 for ae, cvae, vae; 16 for vqvae ...)`` from the models' constructors."""
    from ppvae.models import MODELS

    by_value: dict[str, list[str]] = {}
    for name, cls in sorted(MODELS.items()):
        parameter = inspect.signature(cls).parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        value = parameter.default
        text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        by_value.setdefault(text, []).append(name)
    return "(default: " + "; ".join(f"{v} for {', '.join(n)}" for v, n in by_value.items()) + ")"


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=None,
        help="digits (scikit-learn's bundled 8x8 digits, no files needed), mnist, fashion-mnist, "
        "or a path to a .npy/.npz/.csv array [N, features] or [N, (C,) H, W] "
        f"(default: {default('dataset')})",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        help="root holding MNIST/raw or FashionMNIST/raw (default: $PPVAE_DATA, else ./data)",
    )
    group.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download MNIST / Fashion-MNIST if missing (online; default: off)",
    )
    group.add_argument(
        "--binarize",
        choices=("dynamic", "static", "none"),
        default=None,
        help="dynamic: new Bernoulli draw of the training set every epoch; static: one seeded "
        f"draw; none: grey values (default: {default('binarize')})",
    )
    group.add_argument(
        "--val-fraction",
        type=typed(FRACTION),
        default=None,
        help=f"validation share of the training split (default: {default('val_fraction')})",
    )
    group.add_argument(
        "--test-fraction",
        type=typed(FRACTION),
        default=None,
        help="test share for sources without a test split: digits, arrays "
        f"(default: {default('test_fraction')})",
    )
    group.add_argument(
        "--limit",
        type=typed(POSITIVE_INT),
        default=None,
        help="use only the first N training points (default: all)",
    )


MODEL_HELP = {
    "latent_dim": "latent size; VQ-VAE: size of each code vector",
    "hidden": "hidden layer sizes",
    "activation": "nonlinearity of the networks",
    "likelihood": "observation model p(x|z)",
    "net": "network kind, conv for images only",
    "codebook_size": "VQ-VAE: number of codes",
    "commitment_beta": "VQ-VAE: commitment weight",
    "ema_decay": "VQ-VAE: EMA decay of the codebook, 0 for gradient updates",
    "num_positions": "VQ-VAE: codes per data point",
    "dead_code_restart": "VQ-VAE: restart a code unused for this many steps, 0 for never",
    "latent_dim2": "HVAE: size of the top latent z2",
    "hidden2": "HVAE: hidden sizes between z1 and z2",
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from ppvae.models import MODELS
    from ppvae.runs.config import Choice, ListOf, model_option_checks

    group = parser.add_argument_group(
        "model (options a model's constructor does not take are refused)"
    )
    group.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=None,
        help=f"model to train (default: {default('model')})",
    )
    for key, check in model_option_checks().items():
        if isinstance(check, Choice):
            kwargs: dict[str, Any] = {"choices": check.choices}
        elif isinstance(check, ListOf):
            kwargs = {"type": typed(check.item), "nargs": "+"}
        else:
            kwargs = {"type": typed(check)}
        group.add_argument(
            "--" + key.replace("_", "-"),
            default=None,
            help=f"{MODEL_HELP[key]} {model_default(key)}",
            **kwargs,
        )


def add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs",
        type=typed(POSITIVE_INT),
        default=None,
        help=f"total epochs (default: {training_default('epochs')})",
    )
    group.add_argument(
        "--batch-size",
        type=typed(POSITIVE_INT),
        default=None,
        help=f"data points per SVI step (default: {default('batch_size')})",
    )
    group.add_argument(
        "--lr",
        type=typed(POSITIVE_FLOAT),
        default=None,
        help=f"Adam learning rate (default: {training_default('lr')})",
    )
    group.add_argument(
        "--objective",
        choices=("elbo", "mean-field", "iwae", "iwae-dreg"),
        default=None,
        help="elbo: Trace_ELBO (Monte Carlo KL); mean-field: the ELBO with closed-form KL terms "
        "where they are exact; iwae: the importance-weighted bound with --num-particles K; "
        "iwae-dreg: the same bound with doubly-reparameterised guide gradients "
        f"(default: {default('objective')})",
    )
    group.add_argument(
        "--num-particles",
        type=typed(POSITIVE_INT),
        default=None,
        help="particles per data point for the objective (K of the IWAE bound, at least 2 "
        f"there; default: {default('num_particles')})",
    )
    group.add_argument(
        "--beta",
        type=typed(NONNEGATIVE_FLOAT),
        default=None,
        help="weight of the KL term (beta-VAE; elbo and mean-field only; "
        f"default: {default('beta')})",
    )
    group.add_argument(
        "--kl-warmup",
        type=typed(COUNT),
        default=None,
        help="raise the KL weight linearly to --beta over this many epochs "
        f"(default: {default('kl_warmup')}, off)",
    )
    group.add_argument(
        "--free-bits",
        type=typed(NONNEGATIVE_FLOAT),
        default=None,
        help="floor on the batch-mean KL per latent dimension, in nats "
        f"(default: {default('free_bits')}, off)",
    )
    group.add_argument(
        "--eval-samples",
        type=typed(POSITIVE_INT),
        default=None,
        help=f"importance samples for the final test log p(x) (default: {default('eval_samples')})",
    )
    group.add_argument(
        "--eval-points",
        type=typed(POSITIVE_INT),
        default=None,
        help="test points for the final evaluation, a seeded subset (default: "
        f"{default('eval_points')}; all when the test split is smaller)",
    )


def add_common_options(parser: argparse.ArgumentParser, *, run_options: bool = False) -> None:
    """``--device``, ``--seed``, ``--no-progress``. With ``run_options`` (train) the first two
    default to None and are taken from the run's configuration."""
    parser.add_argument(
        "--device",
        default=None if run_options else "auto",
        help="auto (CUDA when present), cpu or cuda[:N] (default: auto)",
    )
    parser.add_argument(
        "--seed",
        type=typed(SEED),
        default=None if run_options else 0,
        help="random seed (default: 0)",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide progress bars (default: shown on a terminal)",
    )


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory written by 'ppvae train'")


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best validation epoch or last epoch (default: %(default)s)",
    )


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
