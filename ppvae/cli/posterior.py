"""``ppvae posterior RUN``: the posterior p(z | x) of chosen points of a trained run, drawn by the
guide, by PSIS importance resampling and by NUTS (:func:`ppvae.inference.posterior.posterior`),
written into ``RUN/posterior/<split>/`` (or ``--out``): ``<method>.nc`` (ArviZ ``InferenceData``
as netCDF: ``arviz.from_netcdf``), ``comparison.json`` (guide against the reference) and figures."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import matplotlib

from ppvae.cli.options import (
    add_checkpoint_option,
    add_common_options,
    add_run_argument,
    print_table,
    typed,
)
from ppvae.errors import PPVAEError
from ppvae.runs import Run
from ppvae.runs.config import COUNT, POSITIVE_INT

METHODS = ("guide", "importance", "nuts")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "posterior",
        help="draw the posterior p(z|x) of chosen points (guide, importance resampling, NUTS)",
        description="Draw the posterior of the latents of chosen points by the guide q(z|x), by "
        "Pareto-smoothed importance resampling and by NUTS with the decoder fixed; write each as "
        "ArviZ InferenceData (netCDF), the guide's error against the reference (NUTS, else "
        "importance) and figures (k-hat per point, pair plots, guide-vs-reference overlays).",
    )
    add_run_argument(parser)
    parser.add_argument(
        "--points",
        type=typed(COUNT),
        nargs="+",
        default=[0, 1, 2, 3],
        help="indices of the points in --split (default: 0 1 2 3)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="split the points are taken from (default: %(default)s)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        nargs="+",
        default=list(METHODS),
        help="how to draw: guide, importance, nuts (default: all three)",
    )
    parser.add_argument(
        "--num-samples",
        type=typed(POSITIVE_INT),
        default=500,
        help="draws per chain and point (default: %(default)s)",
    )
    parser.add_argument(
        "--num-chains",
        type=typed(POSITIVE_INT),
        default=4,
        help="chains (NUTS; independent blocks of draws otherwise) (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=typed(COUNT),
        default=None,
        help="NUTS adaptation steps per chain (default: --num-samples)",
    )
    parser.add_argument(
        "--num-proposals",
        type=typed(POSITIVE_INT),
        default=None,
        help="guide draws per point that importance resampling draws from "
        "(default: --num-samples x --num-chains)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder; created if missing (default: RUN/posterior/SPLIT)",
    )
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def _write_netcdf(idata, path: Path) -> None:
    """Written beside and renamed: a killed run leaves no half file under the final name."""
    partial = path.with_name(path.name + ".partial")
    idata.to_netcdf(str(partial))
    os.replace(partial, path)


def _number(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3g}"


def run(args: argparse.Namespace) -> int:
    matplotlib.use("Agg")
    from ppvae.inference.posterior import compare_posteriors, posterior
    from ppvae.plots.posterior import write_posterior_figures

    training = Run.load(args.run, checkpoint=args.checkpoint, device=args.device)
    x, y = training.data.split(args.split)
    wrong = [p for p in args.points if p >= len(x)]
    if wrong:
        raise PPVAEError(
            f"--points {' '.join(map(str, wrong))} out of range: the {args.split} split has "
            f"{len(x)} points (0..{len(x) - 1})"
        )
    if len(set(args.points)) != len(args.points):
        raise PPVAEError("--points has repeated indices; give each point once")
    methods = list(dict.fromkeys(args.method))
    module = training.module
    device = next(module.parameters()).device
    x = x[args.points].to(device)
    y = None if y is None else y[args.points].to(device)
    folder = Path(args.out) if args.out else training.path / "posterior" / args.split
    drawn = {}
    for method in methods:
        drawn[method] = posterior(
            module,
            x,
            y,
            method=method,
            num_samples=args.num_samples,
            num_chains=args.num_chains,
            warmup=args.warmup,
            num_proposals=args.num_proposals,
            seed=args.seed,
            point_coords=args.points,
            progress=args.progress and method == "nuts",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PPVAEError(f"cannot create --out {folder}: {error.strerror or error}") from None
    written = []
    for method, idata in drawn.items():
        _write_netcdf(idata, folder / f"{method}.nc")
        written.append(folder / f"{method}.nc")
    reference = next((m for m in ("nuts", "importance") if m in drawn), None)
    rows = []
    if reference is not None and "guide" in drawn and reference != "guide":
        comparison = compare_posteriors(drawn["guide"], drawn[reference])
        document = {
            "candidate": "guide",
            "reference": reference,
            "points": list(args.points),
            "sites": {
                site: {key: result[key].values.tolist() for key in result.data_vars}
                for site, result in comparison.items()
            },
        }
        (folder / "comparison.json").write_text(json.dumps(document, indent=1))
        written.append(folder / "comparison.json")
        for site, result in comparison.items():
            shift = abs(result["mean_shift"]).max().item()
            ratio = result["variance_ratio"]
            rows.append(
                (
                    f"guide vs {reference}, {site}",
                    f"max |mean shift| {shift:.3g} sd, variance ratio "
                    f"{ratio.min().item():.3g}..{ratio.max().item():.3g}",
                )
            )
    written += write_posterior_figures(
        drawn, folder, reference=reference, candidate="guide", max_overlays=len(args.points)
    )
    for method, idata in drawn.items():
        stats = idata.sample_stats
        for key in ("khat", "ess", "rhat"):
            if key in stats:
                values = " ".join(_number(float(v)) for v in stats[key].values)
                rows.append((f"{method} {key} per point", values))
    print(f"ppvae: posterior of {args.split} points {' '.join(map(str, args.points))}")
    print_table(rows)
    for path in written:
        print(f"ppvae: wrote {path}")
    return 0
