"""``ppvae anomaly RUN``: per-input anomaly scores of a trained run (``ppvae.applications``),
written into ``RUN/anomaly/<name>/``: ``scores.csv``, ``scores.json`` (with AUROC/AUPRC when
anomalous labels are given), score histograms by label and ROC curves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ppvae.cli.options import (
    add_checkpoint_option,
    add_common_options,
    add_run_argument,
    print_table,
    typed,
)
from ppvae.errors import PPVAEError
from ppvae.runs import Run
from ppvae.runs.config import FRACTION, POSITIVE_INT

BUILTIN = ("digits", "mnist", "fashion-mnist")


def add_data_argument(parser: argparse.ArgumentParser, num: int | None = None) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="inputs to use: digits, mnist or fashion-mnist (their --split, loaded and "
        "binarised as the run's data), or a .npy/.npz/.csv file of inputs [N, ...] (an .npz may "
        "hold labels 'y') with the run's input size (default: the run's own data)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="split of a data set (default: %(default)s)",
    )
    parser.add_argument(
        "--binarize-file",
        action="store_true",
        help="one seeded Bernoulli draw of a --data file's grey values, for Bernoulli runs "
        "(default: used as they are)",
    )
    parser.add_argument(
        "--num",
        type=typed(POSITIVE_INT),
        default=num,
        help=f"use only the first N inputs (default: {num or 'all'})",
    )


def load_inputs(run: Run, args: argparse.Namespace):
    """(x ``[N, D]``, labels or None, image shape or None, a name for the output folder)."""
    from ppvae.data import _check_labels, _flatten_inputs, _read_array, load_data

    source = args.data
    if source is None or source in BUILTIN:
        options = run.config.data_options()
        if source is not None:
            options["name"] = source
        data = run.data if source is None else load_data(**options)
        x, y = data.split(args.split)
        image_shape, name = data.image_shape, f"{source or run.config.dataset}-{args.split}"
    else:
        path = Path(source).expanduser()
        array, labels = _read_array(path)
        x, image_shape = _flatten_inputs(array, str(path))
        y = _check_labels(labels, x.shape[0], str(path))
        if args.binarize_file:
            if float(x.min()) < 0 or float(x.max()) > 1:
                raise PPVAEError(f"--binarize-file needs values in [0, 1]; {path} has others")
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(args.seed))
        image_shape = image_shape or run.data.image_shape
        name = path.stem
    if x.shape[1] != run.data.input_dim:
        raise PPVAEError(
            f"--data has {x.shape[1]} values per input but the run's model takes "
            f"{run.data.input_dim}; pass inputs of the run's shape"
        )
    if args.num is not None:
        x, y = x[: args.num], None if y is None else y[: args.num]
    return x, y, image_shape, name


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "anomaly",
        help="score inputs for anomaly / out-of-distribution detection with a trained run",
        description="Per-input scores (higher = more anomalous): -log p(x) with its standard "
        "error and PSIS k-hat, -ELBO, reconstruction error, input complexity (-log p(x) minus a "
        "compressor's code length) and, with --likelihood-ratio, the likelihood ratio against a "
        "background model trained on perturbed inputs. Writes RUN/anomaly/NAME/.",
    )
    add_run_argument(parser)
    add_data_argument(parser)
    parser.add_argument(
        "--anomalous-labels",
        type=int,
        nargs="+",
        default=None,
        help="labels that mark an input anomalous: gives AUROC/AUPRC and ROC curves "
        "(default: none)",
    )
    parser.add_argument(
        "--num-samples",
        type=typed(POSITIVE_INT),
        default=1000,
        help="importance samples K for log p(x) and the ELBO (default: %(default)s)",
    )
    parser.add_argument(
        "--compressor",
        choices=("png", "zlib", "none"),
        default="png",
        help="lossless compressor of the input-complexity score (default: %(default)s)",
    )
    parser.add_argument(
        "--likelihood-ratio",
        action="store_true",
        help="train a background model (the run's model and options) on the run's training "
        "data with entries replaced at --perturb-rate, and add the likelihood-ratio score "
        "(default: off)",
    )
    parser.add_argument(
        "--perturb-rate",
        type=typed(FRACTION),
        default=0.2,
        help="share of entries replaced by uniform noise for the background (default: %(default)s)",
    )
    parser.add_argument(
        "--background-epochs",
        type=typed(POSITIVE_INT),
        default=None,
        help="epochs of the background model (default: the run's epochs)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: RUN/anomaly/NAME)")
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ppvae.applications import anomaly_scores, detection_metrics, train_background
    from ppvae.plots.applications import plot_roc_curves, plot_score_histograms
    from ppvae.plots.figures import is_conditional

    training = Run.load(args.run, checkpoint=args.checkpoint, device=args.device)
    x, y, image_shape, name = load_inputs(training, args)
    is_anomaly = None
    if args.anomalous_labels is not None:
        if y is None:
            raise PPVAEError("--anomalous-labels needs labelled inputs; these have no labels")
        is_anomaly = torch.isin(y, torch.tensor(args.anomalous_labels))
    module = training.module
    device = next(module.parameters()).device
    background = None
    if args.likelihood_ratio:
        background = training.build_module()
        train_background(
            background,
            training.data.train,
            rate=args.perturb_rate,
            epochs=args.background_epochs or training.config.epochs,
            batch_size=training.config.batch_size,
            lr=training.config.lr,
            seed=args.seed,
            device=device,
            progress=args.progress,
        )
        background.eval()
    scores = anomaly_scores(
        module,
        x.to(device),
        y.to(device) if y is not None and is_conditional(module) else None,
        num_samples=args.num_samples,
        background=background,
        compressor=None if args.compressor == "none" else args.compressor,
        image_shape=image_shape,
        seed=args.seed,
    )
    metrics = None
    if is_anomaly is not None:
        metrics = detection_metrics(scores.scores(), is_anomaly)
    folder = Path(args.out) if args.out else training.path / "anomaly" / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PPVAEError(f"cannot create --out {folder}: {error.strerror or error}") from None
    written = [scores.to_csv(folder / "scores.csv", y)]
    document = {**scores.to_dict(), "labels": None if y is None else y.tolist()}
    document["metrics"] = metrics
    (folder / "scores.json").write_text(json.dumps(document))
    written.append(folder / "scores.json")
    if y is not None or is_anomaly is not None:
        labels = is_anomaly.long() if is_anomaly is not None else y
        names = {0: "normal", 1: "anomalous"} if is_anomaly is not None else None
        written.append(
            plot_score_histograms(
                scores.scores(), labels, folder / "histograms.png", label_names=names
            )
        )
    if is_anomaly is not None:
        written.append(plot_roc_curves(scores.scores(), is_anomaly, folder / "roc.png"))
    rows = []
    for score_name, values in scores.scores().items():
        text = f"mean {values.mean().item():.3f}"
        if metrics is not None:
            text += f"   AUROC {metrics[score_name]['auroc']:.3f}"
            text += f"   AUPRC {metrics[score_name]['auprc']:.3f}"
        rows.append((score_name, text))
    print(f"ppvae anomaly: {len(x)} inputs of {name}, K = {args.num_samples}")
    print_table(rows)
    for note in scores.notes:
        print(f"  note: {note}")
    print_table([("wrote", ", ".join(p.name for p in written)), ("in", str(folder))])
    return 0
