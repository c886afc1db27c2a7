"""``ppvae sample RUN``: decode draws from a trained run's prior into an image grid or array."""

from __future__ import annotations

import argparse

from ppvae.cli.options import add_checkpoint_option, add_common_options, add_run_argument, typed
from ppvae.runs import Run
from ppvae.runs.config import POSITIVE_INT
from ppvae.runs.run import SAMPLE_SUFFIXES


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample",
        help="draw samples from the prior of a trained run",
        description="Decode draws from the prior and save them as an image grid (or .npy).",
    )
    add_run_argument(parser)
    parser.add_argument(
        "--num",
        type=typed(POSITIVE_INT),
        default=64,
        help="number of samples (default: %(default)s)",
    )
    parser.add_argument(
        "--label",
        type=int,
        default=None,
        help="class to generate, for a conditional model (cvae) (default: none)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"output file, one of {', '.join(SAMPLE_SUFFIXES)}; missing folders are created "
        "(default: RUN/samples/samples.png, or RUN/samples/samples_labelL.png with --label)",
    )
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    training = Run.load(args.run, checkpoint=args.checkpoint, device=args.device)
    out = training.sample(args.num, label=args.label, out=args.out, seed=args.seed)
    print(f"ppvae: wrote {out}")
    return 0
