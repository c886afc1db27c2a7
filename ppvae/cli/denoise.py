"""``ppvae denoise RUN``: corrupt inputs and restore them with a trained run
(``ppvae.applications.purification``); the errors to the clean inputs before and after go to
``RUN/denoise/<name>/table.json`` with one figure per corruption and method."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppvae.cli.anomaly import add_data_argument, load_inputs
from ppvae.cli.options import (
    add_checkpoint_option,
    add_common_options,
    add_run_argument,
    print_table,
    typed,
)
from ppvae.errors import PPVAEError
from ppvae.runs import Run
from ppvae.runs.config import POSITIVE_INT


def _level(text: str) -> tuple[str, float]:
    from ppvae.applications import CORRUPTIONS

    kind, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if kind not in CORRUPTIONS or number is None:
        raise argparse.ArgumentTypeError(
            f"expected CORRUPTION=VALUE with CORRUPTION one of {', '.join(CORRUPTIONS)}, "
            f"got {text!r}"
        )
    return kind, number


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ppvae.applications import CORRUPTIONS, METHODS
    from ppvae.applications.purification import DEFAULT_LEVELS

    parser = subparsers.add_parser(
        "denoise",
        help="corrupt inputs and restore them with a trained run (purification)",
        description="Corrupt clean inputs (Gaussian noise, salt-and-pepper, an occluded square, "
        "missing pixels) and restore them: decode the encoder mean, iterate encode-decode, the "
        "importance-sampling posterior mean (with per-pixel sd), and Bayesian imputation of "
        "removed pixels under a masked likelihood. Reports MSE, BCE and PSNR to the clean input "
        "before and after. Writes RUN/denoise/NAME/.",
    )
    add_run_argument(parser)
    add_data_argument(parser, num=200)
    parser.add_argument(
        "--corruptions",
        nargs="+",
        choices=CORRUPTIONS,
        default=list(CORRUPTIONS),
        help="corruptions to apply (default: all)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="restorations (impute only for occlusion and missing-pixels; default: all)",
    )
    parser.add_argument(
        "--level",
        type=_level,
        nargs="+",
        default=[],
        metavar="CORRUPTION=VALUE",
        help="noise sd, salt-and-pepper share, occluded side share, missing share (default: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_LEVELS.items())
        + ")",
    )
    parser.add_argument(
        "--num-particles",
        type=typed(POSITIVE_INT),
        default=500,
        help="importance samples of the importance and impute restorations (default: %(default)s)",
    )
    parser.add_argument(
        "--iterations",
        type=typed(POSITIVE_INT),
        default=5,
        help="encode-decode steps of the iterate restoration (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: RUN/denoise/NAME)")
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ppvae.applications import purification_table
    from ppvae.plots.applications import plot_purification
    from ppvae.plots.figures import is_conditional

    training = Run.load(args.run, checkpoint=args.checkpoint, device=args.device)
    x, y, image_shape, name = load_inputs(training, args)
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise PPVAEError("the corruptions need inputs in [0, 1]; rescale the data")
    if "occlusion" in args.corruptions and image_shape is None:
        raise PPVAEError("the occlusion corruption needs images; drop it from --corruptions")
    module = training.module
    device = next(module.parameters()).device
    rows, examples = purification_table(
        module,
        x.to(device),
        y.to(device) if y is not None and is_conditional(module) else None,
        corruptions=args.corruptions,
        methods=args.methods,
        levels=dict(args.level),
        image_shape=image_shape,
        num_particles=args.num_particles,
        iterations=args.iterations,
        seed=args.seed,
    )
    folder = Path(args.out) if args.out else training.path / "denoise" / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PPVAEError(f"cannot create --out {folder}: {error.strerror or error}") from None
    (folder / "table.json").write_text(json.dumps({"num_inputs": len(x), "rows": rows}, indent=1))
    written = [folder / "table.json"]
    if image_shape is not None:
        for (kind, method), (corrupted, restored, uncertainty) in examples.items():
            written.append(
                plot_purification(
                    x,
                    corrupted,
                    restored,
                    uncertainty,
                    image_shape,
                    folder / f"{kind}-{method}.png",
                    title=f"{kind}, restored by {method}",
                )
            )
    print(f"ppvae denoise: {len(x)} inputs of {name}; MSE / PSNR (dB) to the clean inputs")
    table = []
    for row in rows:
        key = f"{row['corruption']} → {row['method']}"
        if "skipped" in row:
            table.append((key, f"skipped: {row['skipped']}"))
            continue
        table.append(
            (
                key,
                f"MSE {row['mse_before']:.4f} → {row['mse_after']:.4f}   "
                f"PSNR {row['psnr_before']:.2f} → {row['psnr_after']:.2f}",
            )
        )
    print_table(table)
    print_table([("wrote", f"{len(written)} files"), ("in", str(folder))])
    return 0
