"""``ppvae plot RUN``: redraw a run's figures into ``RUN/figures/<checkpoint>/``."""

from __future__ import annotations

import argparse

from ppvae.cli.options import add_checkpoint_option, add_common_options, add_run_argument
from ppvae.runs import Run


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plot",
        help="draw a run's figures: curves, reconstructions, samples, 2-D latent map",
        description="Redraw the figures of a run into RUN/figures/CHECKPOINT (a 2-D latent space "
        "also gets a latent map and a decoded manifold grid); the figures written by training "
        "stay as they are.",
    )
    add_run_argument(parser)
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    written = Run.load(args.run, checkpoint=args.checkpoint, device=args.device).figures()
    print("ppvae: wrote " + ", ".join(str(p) for p in written))
    return 0
