"""``ppvae evaluate RUN``: per-point bounds, log p(x), gap and k-hat of a run, written into
``RUN/evaluations/<split>-K<k>/`` (never over the training run's ``report.json``)."""

from __future__ import annotations

import argparse

from ppvae.cli.ais_report import add_ais_options, run_ais
from ppvae.cli.options import (
    add_checkpoint_option,
    add_common_options,
    add_run_argument,
    print_table,
    typed,
)
from ppvae.inference import distributed
from ppvae.runs import Run
from ppvae.runs.config import POSITIVE_INT


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="estimate log p(x), IWAE bounds, the ELBO gap and PSIS k-hat for a run",
        description="Evaluate a run's checkpoint per data point and write report.json and "
        "figures into RUN/evaluations/SPLIT-KK (RUN/evaluations/SPLIT-KK-last for the last "
        "checkpoint); the training run's own report stays as it is.",
    )
    add_run_argument(parser)
    parser.add_argument(
        "--num-samples",
        type=typed(POSITIVE_INT),
        default=5000,
        help="importance samples K (default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="data split to evaluate (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=typed(POSITIVE_INT),
        default=100,
        help="data points per batch (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-points",
        type=typed(POSITIVE_INT),
        default=None,
        help="evaluate a seeded subset of this many points of the split (default: all)",
    )
    add_ais_options(parser)
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    distributed.init_from_environment()  # torchrun: each rank evaluates its share of the points
    run_ = Run.load(args.run, checkpoint=args.checkpoint, device=args.device)
    evaluation = run_.evaluate(
        split=args.split,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
        num_points=args.eval_points,
    )
    if not distributed.is_writer():  # rank 0 writes, runs AIS and prints
        return 0
    ais_rows = run_ais(args, run_, evaluation) if args.ais or args.gaps else []
    print(evaluation.report.summary_table())
    if ais_rows:
        print_table(ais_rows)
    print_table(
        [("wrote", ", ".join(p.name for p in evaluation.written)), ("in", str(evaluation.folder))]
    )
    return 0
