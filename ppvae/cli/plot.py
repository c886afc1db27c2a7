"""``ppvae plot RUN``: redraw a run's figures into ``RUN/figures/<checkpoint>/``."""

from __future__ import annotations

import argparse

from ppvae.cli.options import add_checkpoint_option, add_common_options, add_run_argument
from ppvae.runs import Run


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plot",
        help="draw a run's figures: curves, reconstructions, samples, latent map, manifold",
        description="Redraw the figures of a run into RUN/figures/CHECKPOINT: training curves, "
        "reconstructions, prior samples, the latent map (exact for 2-D latents, else on two "
        "principal directions), the decoder's manifold and interpolations; it says which "
        "figures a model cannot have and why. The figures written by training stay as they are.",
    )
    add_run_argument(parser)
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    left_out: list[str] = []
    run = Run.load(args.run, checkpoint=args.checkpoint, device=args.device)
    written = run.figures(left_out=left_out)
    print("ppvae: wrote " + ", ".join(str(p) for p in written))
    for line in left_out:
        print(f"ppvae: {line}")
    return 0
