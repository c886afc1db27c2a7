"""``ppvae evaluate RUN --ais [--ais-steps N] [--gaps]``: annealed importance sampling and the gap
split on the points the evaluation used, written beside its report.

Not a command: ``ppvae.cli.evaluate`` adds these options and calls :func:`run_ais` after its own
evaluation. Writes ``ais.json`` (per point and means), ``ais_vs_iwae.png`` (the report's IWAE-k
ladder and the AIS estimate against their cost in evaluations of log p(x, z) per point) and, with
``--gaps``, ``gaps.png`` (the two gaps stacked); adds their means to ``report.json``'s ``extra``.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from ppvae.checkpoint import atomic_write_text
from ppvae.cli.options import typed
from ppvae.errors import PPVAEError
from ppvae.inference.ais import ais_log_marginal
from ppvae.inference.evaluate import subset_points
from ppvae.inference.gaps import gap_decomposition
from ppvae.runs.config import POSITIVE_INT

AIS_FILE = "ais.json"


def add_ais_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("annealed importance sampling and the gap split")
    group.add_argument(
        "--ais",
        action="store_true",
        help="also estimate log p(x) by annealed importance sampling from the guide (HMC; "
        "costs chains x 1.2 steps x leapfrog model evaluations per point; default: off)",
    )
    group.add_argument(
        "--ais-steps",
        type=typed(POSITIVE_INT),
        default=200,
        help="annealing steps T (default: %(default)s)",
    )
    group.add_argument(
        "--ais-chains",
        type=typed(POSITIVE_INT),
        default=8,
        help="AIS chains per point (default: %(default)s)",
    )
    group.add_argument(
        "--ais-leapfrog",
        type=typed(POSITIVE_INT),
        default=5,
        help="leapfrog steps per HMC transition (default: %(default)s)",
    )
    group.add_argument(
        "--gaps",
        action="store_true",
        help="split log p(x) - ELBO into approximation and amortisation gaps with a local "
        "q*(z) per point (diagonal-Normal guides); log p(x) from AIS with --ais, else from "
        "importance sampling with --num-samples (default: off)",
    )


def run_ais(args: argparse.Namespace, run, evaluation) -> list[tuple[str, str]]:
    """AIS and/or gaps on the evaluated points; returns rows for the summary table."""
    report = evaluation.report
    if not report.likelihood_available or report.point_mass_sites:
        raise PPVAEError(
            "--ais and --gaps need a likelihood bound, and this model's guide is a point mass "
            "or one-hot; drop --ais/--gaps for this run"
        )
    x, y = run.data.split(args.split)
    x, y = subset_points(x, y, args.eval_points, args.seed)
    module = run.module
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    options = dict(
        num_steps=args.ais_steps, num_chains=args.ais_chains, leapfrog_steps=args.ais_leapfrog
    )
    results, per_point = [], {}
    num_batches = -(-x.shape[0] // args.batch_size)
    with tqdm(
        total=num_batches * (args.ais * args.ais_steps + args.gaps),  # annealing steps, fits
        disable=None if args.progress else True,  # None: shown on a terminal only
        unit="step",
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, x.shape[0], args.batch_size):
            rows = slice(start, start + args.batch_size)
            xb = x[rows].to(device)
            yb = None if y is None else y[rows].to(device)
            seed = args.seed + start
            ais = None
            if args.ais:
                bar.set_description(f"AIS (T={args.ais_steps})")
                ais = ais_log_marginal(
                    module.model,
                    module.guide,
                    xb,
                    yb,
                    seed=seed,
                    progress=lambda step, total: bar.update(1),
                    **options,
                )
                _append(per_point, "ais_log_px", ais.log_marginal)
                _append(per_point, "ais_log_px_stderr", ais.stderr)
                _append(per_point, "ais_acceptance", ais.acceptance)
                results.append(ais)
            if args.gaps:
                bar.set_description("gaps (local q*)")
                gaps = gap_decomposition(
                    module.model,
                    module.guide,
                    xb,
                    yb,
                    log_marginal_method=ais if ais is not None else "is",
                    num_samples=args.num_samples,
                    seed=seed,
                )
                bar.update(1)
                _append(per_point, "approximation_gap", gaps.approximation_gap)
                _append(per_point, "amortisation_gap", gaps.amortisation_gap)
                per_point.setdefault("_method", gaps.log_marginal_method)
    return _write(args, evaluation, per_point, results)


def _append(per_point: dict, key: str, value: torch.Tensor) -> None:
    per_point.setdefault(key, []).extend(value.detach().cpu().tolist())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _write(args, evaluation, per_point: dict, results) -> list[tuple[str, str]]:
    from ppvae.plots.ais import ais_cost, plot_ais_vs_iwae, plot_gap_bars

    report, folder = evaluation.report, evaluation.folder
    method = per_point.pop("_method", None)
    means = {key: _mean(values) for key, values in per_point.items()}
    rows, extra = [], {}
    figures = []
    if args.ais:
        first = results[0]
        cost = ais_cost(args.ais_steps, args.ais_chains, args.ais_leapfrog, first.num_warmup_steps)
        extra["ais_log_px"] = means["ais_log_px"]
        extra["ais_minus_is_log_px"] = means["ais_log_px"] - report.log_px
        label = f"log p(x), AIS (T={args.ais_steps}, {args.ais_chains} chains)"
        rows.append((label, f"{means['ais_log_px']:.3f} ± {means['ais_log_px_stderr']:.3f}"))
        rows.append(("AIS − IS log p(x)", f"{extra['ais_minus_is_log_px']:+.3f}"))
        figures.append(
            plot_ais_vs_iwae(
                {int(k): float(v) for k, v in report.ladder.items()},
                {args.ais_steps: (cost, means["ais_log_px"])},
                folder / "ais_vs_iwae.png",
            )
        )
    if args.gaps:
        extra["approximation_gap"] = means["approximation_gap"]
        extra["amortisation_gap"] = means["amortisation_gap"]
        rows.append(("approximation gap", f"{means['approximation_gap']:.3f} ({method})"))
        rows.append(("amortisation gap", f"{means['amortisation_gap']:.3f}"))
        gap_pair = (means["approximation_gap"], means["amortisation_gap"])
        figures.append(plot_gap_bars({"this run": gap_pair}, folder / "gaps.png"))
    payload = {
        "settings": {
            "ais_steps": args.ais_steps,
            "ais_chains": args.ais_chains,
            "ais_leapfrog": args.ais_leapfrog,
            "gaps_log_marginal": method,
        },
        "mean": means,
        "per_point": per_point,
    }
    atomic_write_text(json.dumps(payload, indent=2) + "\n", folder / AIS_FILE)
    shown = dict(report.extra)  # the table prints the new means once, from ``rows``
    report.extra.update(extra)
    report.to_json(folder / "report.json")
    report.extra.clear()
    report.extra.update(shown)
    evaluation.written.extend([folder / AIS_FILE, *figures])
    return rows
