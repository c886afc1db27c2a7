"""``ppvae compare RUN RUN ...``: runs side by side on the same test points — bounds, log p(x),
gap, active units, the aggregate posterior against the prior, continuity, completeness and
reconstruction error in one table, and their latent maps, prior samples and interpolations in one
figure (``compare.png``, numbers in ``compare.json``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ppvae.cli.options import add_checkpoint_option, add_common_options, typed
from ppvae.errors import PPVAEError
from ppvae.runs.config import POSITIVE_INT

NOT_DEFINED = "n/a"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="compare runs: one table of bounds and regularity measures, figures side by side",
        description="Evaluate each run's checkpoint on the same seeded subset of its test split "
        "(runs on the same data share the points) and print one table: ELBO, IWAE-k ladder, "
        "log p(x), gap, active units, I(x;z) and KL(q(z)||p(z)) (ELBO surgery), continuity, "
        "completeness and reconstruction error. Writes compare.json and compare.png into --out.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories to compare")
    parser.add_argument(
        "--num-samples",
        type=typed(POSITIVE_INT),
        default=1000,
        help="importance samples K per point (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-points",
        type=typed(POSITIVE_INT),
        default=1000,
        help="test points, a seeded subset (default: %(default)s; all if the split is smaller)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for compare.json and compare.png (default: runs/compare-TIMESTAMP)",
    )
    add_checkpoint_option(parser)
    add_common_options(parser)
    return parser


def measure_run(run, *, num_samples: int, eval_points: int, seed: int, progress: bool) -> dict:
    """The numbers of one run on a seeded subset of its test split (JSON-ready)."""
    from ppvae.inference.evaluate import evaluate, subset_points
    from ppvae.inference.regularity import regularity_summary
    from ppvae.plots.figures import is_conditional

    module = run.module
    device = next(module.parameters()).device
    x, labels = run.data.split("test")
    x, labels = subset_points(x, labels, eval_points, seed)
    y = labels if is_conditional(module) else None
    ladder = tuple(k for k in (1, 5, 50, 500, 5000) if k < num_samples) + (num_samples,)
    try:
        report = evaluate(
            module,
            (x, labels),
            num_samples=num_samples,
            ladder=ladder,
            seed=seed,
            progress=progress,
            device=device,
        ).to_dict()
        report.pop("per_point", None)
    except PPVAEError as error:
        report = {"note": str(error)}
    x = x.to(device)
    y = None if y is None else y.to(device)
    return {
        "run": str(run.path),
        "model": run.config.model,
        "objective": run.config.describe_objective(),
        "points": int(x.shape[0]),
        "report": report,
        **regularity_summary(module, x, y, seed=seed),
    }


def _fmt(value, digits: int = 3, stderr=None) -> str:
    if value is None:
        return NOT_DEFINED
    text = f"{value:.{digits}f}"
    return text if stderr is None else f"{text} ± {stderr:.{digits}f}"


def table_rows(results: list[dict]) -> list[tuple[str, list[str]]]:
    """(metric, one cell per run): the comparison table."""

    def cells(read) -> list[str]:
        out = []
        for result in results:
            try:
                out.append(read(result))
            except (KeyError, TypeError):
                out.append(NOT_DEFINED)
        return out

    def report(key):
        return lambda r: _fmt(r["report"].get(key))

    def one_hot(r) -> bool:
        return bool(r["report"].get("point_mass_sites")) and r["report"].get("likelihood_available")

    top = {r["report"].get("num_samples") for r in results}
    ladders = [r["report"].get("ladder", {}) for r in results]
    ks = sorted({int(k) for ladder in ladders for k in ladder if 1 < int(k) and int(k) not in top})
    rows = [
        ("model", cells(lambda r: r["model"])),
        ("test points", cells(lambda r: str(r["points"]))),
        ("ELBO", cells(report("elbo"))),
    ]
    for k in ks:
        rows.append(
            (
                f"IWAE k={k}",
                cells(
                    lambda r, k=k: (
                        NOT_DEFINED if one_hot(r) else _fmt(r["report"]["ladder"][str(k)])
                    )
                ),
            )
        )
    rows += [
        (
            "log p(x)",
            cells(
                lambda r: (
                    NOT_DEFINED
                    if one_hot(r)
                    else _fmt(r["report"]["log_px"], stderr=r["report"]["log_px_stderr"])
                )
            ),
        ),
        (
            "gap log p(x) − ELBO",
            cells(lambda r: NOT_DEFINED if one_hot(r) else _fmt(r["report"]["gap"])),
        ),
        (
            "active units",
            cells(
                lambda r: (
                    NOT_DEFINED
                    if r["report"]["active_units"] is None
                    else f"{r['report']['active_units']} of {r['report']['latent_units']}"
                )
            ),
        ),
        (
            "I(x; z)",
            cells(
                lambda r: _fmt(
                    r["elbo_surgery"]["mutual_information"],
                    stderr=r["elbo_surgery"]["mutual_information_stderr"],
                )
            ),
        ),
        (
            "KL(q(z) || p(z))",
            cells(
                lambda r: _fmt(
                    r["elbo_surgery"]["marginal_kl"], stderr=r["elbo_surgery"]["marginal_kl_stderr"]
                )
            ),
        ),
        ("continuity: detour", cells(lambda r: _fmt(r["continuity"]["detour"]))),
        (
            "continuity: max / mean step",
            cells(
                lambda r: f"{r['continuity']['max_step']:.4f} / {r['continuity']['mean_step']:.4f}"
            ),
        ),
        (
            "completeness C_z / C_x",
            cells(
                lambda r: (
                    f"{r['completeness']['latent_ratio']:.3f} / "
                    f"{r['completeness']['decoded_ratio']:.3f} ({r['completeness']['reference']})"
                )
            ),
        ),
        ("reconstruction", cells(_reconstruction)),
    ]
    return rows


def _reconstruction(result: dict) -> str:
    report = result["report"]
    if report.get("reconstruction_bce") is not None:
        return f"{report['reconstruction_bce']:.3f} BCE"
    return f"{report['reconstruction_mse']:.4f} MSE"


def print_comparison(names: list[str], rows: list[tuple[str, list[str]]]) -> None:
    header = [("", names)] + rows
    first = max(len(metric) for metric, _ in header)
    widths = [max(len(cells[i]) for _, cells in header) for i in range(len(names))]
    for metric, cells in header:
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        print(f"  {metric.ljust(first)}  {line}".rstrip())


def notes(names: list[str], results: list[dict]) -> list[str]:
    """One line per measure a run does not have, saying why."""
    lines = []
    for name, result in zip(names, results, strict=True):
        for key in ("report", "continuity", "completeness", "elbo_surgery"):
            note = result[key].get("note")
            if note:
                lines.append(f"note: {name}: {key.replace('_', ' ')}: {note}")
    return lines


def run(args: argparse.Namespace) -> int:
    from ppvae.plots.compare import Entry, comparison_figure
    from ppvae.plots.figures import is_conditional
    from ppvae.plots.latent import save_figure
    from ppvae.runs import Run

    runs = [Run.load(path, checkpoint=args.checkpoint, device=args.device) for path in args.runs]
    names = [run.path.name for run in runs]
    if len(set(names)) < len(names):
        names = [str(run.path) for run in runs]
    out = Path(args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PPVAEError(f"cannot create --out {out}: {error.strerror}") from None
    results = [
        measure_run(
            run,
            num_samples=args.num_samples,
            eval_points=args.eval_points,
            seed=args.seed,
            progress=args.progress,
        )
        for run in runs
    ]
    print_comparison(names, table_rows(results))
    for line in notes(names, results):
        print(line)
    (out / "compare.json").write_text(json.dumps(dict(zip(names, results, strict=True)), indent=2))

    from ppvae.inference.evaluate import subset_points

    entries, shapes = [], set()
    for name, run in zip(names, runs, strict=True):
        x, labels = run.data.split("test")
        x, labels = subset_points(x, labels, min(args.eval_points, 1000), args.seed)
        device = next(run.module.parameters()).device
        labels = None if labels is None else labels.to(device)
        conditional = is_conditional(run.module)
        entries.append(
            Entry(
                name,
                run.module,
                x.to(device),
                labels,
                labels if conditional else None,
                run.data.num_classes,
            )
        )
        shapes.add(run.data.image_shape)
    image_shape = shapes.pop() if len(shapes) == 1 else None
    figure = save_figure(comparison_figure(entries, image_shape), out / "compare.png", dpi=90)
    print(f"ppvae: wrote {out / 'compare.json'}, {figure}")
    return 0
