"""The ``ppvae`` command line: ``train``, ``evaluate``, ``sample``, ``plot`` (DESIGN §5).

Errors in the user's input print one line and exit with code 2; a run directory holds
``config.json``, ``checkpoint.pt`` (+ ``checkpoint-best.pt``), ``metrics.jsonl``, ``report.json``
and PNG figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from ppvae.errors import PPVAEError

RESUME_OVERRIDABLE = {"epochs", "device", "progress", "eval_samples", "resume", "run_dir"}
DATA_KEYS = ("dataset", "data_dir", "binarize", "val_fraction", "test_fraction", "limit", "seed")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) that points at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text}")
    return value


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="digits",
        help="digits (scikit-learn's bundled 8x8 digits, no files needed), mnist, fashion-mnist, "
        "or a path to a .npy/.npz/.csv array [N, features] or [N, (C,) H, W] (default: digits)",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        help="root holding MNIST/raw or FashionMNIST/raw (default: $PPVAE_DATA, else ./data)",
    )
    group.add_argument(
        "--download", action="store_true", help="download MNIST / Fashion-MNIST if missing (online)"
    )
    group.add_argument(
        "--binarize",
        choices=("dynamic", "static", "none"),
        default="dynamic",
        help="dynamic: new Bernoulli draw of the training set every epoch; static: one seeded "
        "draw; none: grey values (default: dynamic)",
    )
    group.add_argument(
        "--val-fraction", type=_fraction, default=0.1, help="validation share of train (0.1)"
    )
    group.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        help="test share for sources without a test split: digits, arrays (0.2)",
    )
    group.add_argument(
        "--limit", type=_positive_int, default=None, help="use only the first N training points"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from ppvae.models import MODELS

    group = parser.add_argument_group(
        "model (options a model's constructor does not take are refused)"
    )
    group.add_argument("--model", choices=sorted(MODELS), default="vae", help="(default: vae)")
    group.add_argument("--latent-dim", type=_positive_int, default=None, help="latent size")
    group.add_argument(
        "--hidden", type=_positive_int, nargs="+", default=None, help="hidden layer sizes"
    )
    group.add_argument("--activation", default=None, help="relu, tanh, elu, softplus, gelu, ...")
    group.add_argument(
        "--likelihood",
        choices=("bernoulli", "continuous-bernoulli", "gaussian"),
        default=None,
        help="observation model (default: bernoulli)",
    )
    group.add_argument("--net", choices=("mlp", "conv"), default=None, help="network kind (mlp)")
    group.add_argument("--codebook-size", type=_positive_int, default=None, help="VQ-VAE codes")
    group.add_argument(
        "--commitment-beta", type=float, default=None, help="VQ-VAE commitment weight"
    )
    group.add_argument("--ema-decay", type=float, default=None, help="VQ-VAE EMA decay (0: off)")
    group.add_argument(
        "--num-positions", type=_positive_int, default=None, help="VQ-VAE codes per data point"
    )
    group.add_argument(
        "--dead-code-restart",
        type=int,
        default=None,
        help="VQ-VAE: restart a code unused for this many steps (0: never)",
    )
    group.add_argument(
        "--latent-dim2", type=_positive_int, default=None, help="HVAE: size of the top latent z2"
    )
    group.add_argument(
        "--hidden2",
        type=_positive_int,
        nargs="+",
        default=None,
        help="HVAE: hidden sizes between z1 and z2",
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=50, help="total epochs (default: 50)")
    group.add_argument("--batch-size", type=_positive_int, default=100, help="(default: 100)")
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    group.add_argument(
        "--objective",
        choices=("elbo", "mean-field", "iwae", "iwae-dreg"),
        default="elbo",
        help="elbo: Trace_ELBO; mean-field: analytic KL (TraceMeanField_ELBO); iwae: the "
        "importance-weighted bound with --num-particles K; iwae-dreg: the same bound with "
        "doubly-reparameterised guide gradients (default: elbo)",
    )
    group.add_argument(
        "--num-particles",
        type=_positive_int,
        default=1,
        help="particles per data point for the objective (K of the IWAE bound; default: 1)",
    )
    group.add_argument(
        "--beta", type=float, default=1.0, help="weight of the KL term (beta-VAE; default: 1)"
    )
    group.add_argument(
        "--kl-warmup",
        type=int,
        default=0,
        help="raise the KL weight linearly to --beta over this many epochs (default: 0, off)",
    )
    group.add_argument(
        "--free-bits",
        type=float,
        default=0.0,
        help="floor on the batch-mean KL per latent dimension, in nats (default: 0, off)",
    )
    group.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=1000,
        help="importance samples for the final test log p(x) (default: 1000)",
    )


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ppvae",
        description="Latent-variable models as Pyro programs: train with SVI, evaluate log p(x) "
        "and the ELBO gap, sample and plot.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    train = commands.add_parser(
        "train",
        help="train a model (default: a VAE on the embedded digits data)",
        description="Train a model with SVI, checkpoint every epoch, then evaluate the best "
        "checkpoint on the test split (ELBO, log p(x), gap) and save figures.",
    )
    _add_data_options(train)
    _add_model_options(train)
    _add_training_options(train)
    _add_common_options(train)
    train.add_argument(
        "--run-dir",
        default=None,
        help="where to write the run (default: runs/MODEL-DATASET-TIMESTAMP)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint, with its saved options "
        "(--epochs, --device may change)",
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="estimate log p(x), IWAE bounds, the ELBO gap and PSIS k-hat for a run",
        description="Evaluate a run's best checkpoint per data point and write report.json "
        "and figures into the run directory.",
    )
    evaluate.add_argument("run", help="run directory written by 'ppvae train'")
    evaluate.add_argument(
        "--num-samples", type=_positive_int, default=5000, help="importance samples K (5000)"
    )
    evaluate.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="(default: test)"
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=100, help="data per batch")
    evaluate.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="(default: best)"
    )
    _add_common_options(evaluate)

    sample = commands.add_parser(
        "sample",
        help="draw samples from the prior of a trained run",
        description="Decode draws from the prior and save them as an image grid (or .npy).",
    )
    sample.add_argument("run", help="run directory written by 'ppvae train'")
    sample.add_argument("--num", type=_positive_int, default=64, help="number of samples (64)")
    sample.add_argument("--label", type=int, default=None, help="class to generate (CVAE)")
    sample.add_argument("--out", default=None, help="output .png or .npy (default: RUN/samples)")
    sample.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="(default: best)"
    )
    _add_common_options(sample)

    plot = commands.add_parser(
        "plot",
        help="draw a run's figures: curves, reconstructions, samples, 2-D latent map",
        description="Redraw the figures of a run; a 2-D latent space also gets a latent map "
        "and a decoded manifold grid.",
    )
    plot.add_argument("run", help="run directory written by 'ppvae train'")
    plot.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="(default: best)"
    )
    _add_common_options(plot)
    return parser


def _explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Names of the options the user typed (as opposed to defaults)."""
    sub = parser._subparsers._group_actions[0].choices[argv[0]]  # noqa: SLF001
    sentinel = object()
    defaults = {action.dest: action.default for action in sub._actions}  # noqa: SLF001
    try:
        for action in sub._actions:  # noqa: SLF001
            action.default = sentinel
        namespace = sub.parse_args(list(argv[1:]))
    finally:
        for action in sub._actions:  # noqa: SLF001
            action.default = defaults[action.dest]
    return {k for k, v in vars(namespace).items() if v is not sentinel}


# -- runs ---------------------------------------------------------------------------------------
def build_model(name: str, data, options: dict, explicit: set[str] | None = None):
    """The model class for ``name`` with the data's sizes and the options its constructor takes."""
    from ppvae.models import MODELS

    cls = MODELS[name]
    parameters = inspect.signature(cls).parameters
    rejected = sorted(k for k in (explicit or set()) & set(MODEL_KEYS) if k not in parameters)
    if rejected:
        flags = ", ".join("--" + k.replace("_", "-") for k in rejected)
        raise PPVAEError(f"{flags} does not apply to --model {name}; drop it or pick another model")
    kwargs = {k: v for k, v in options.items() if k in parameters and v is not None}
    derived = {
        "input_dim": data.input_dim,
        "image_shape": data.image_shape,
        "num_classes": data.num_classes,
    }
    for key, value in derived.items():
        if key in parameters:
            if key == "num_classes" and value is None:
                raise PPVAEError(f"--model {name} needs labels; use a data set that has them")
            kwargs[key] = value
    if kwargs.get("net") == "conv" and data.image_shape is None:
        raise PPVAEError("--net conv needs image data; use --net mlp for flat arrays")
    return cls(**kwargs)


MODEL_KEYS = (
    "latent_dim",
    "hidden",
    "activation",
    "likelihood",
    "net",
    "codebook_size",
    "commitment_beta",
    "ema_decay",
    "num_positions",
    "dead_code_restart",
    "latent_dim2",
    "hidden2",
)


def _load_data(config: dict):
    from ppvae.data import load_data

    return load_data(
        config["dataset"],
        data_dir=config["data_dir"],
        binarize=config["binarize"],
        val_fraction=config["val_fraction"],
        test_fraction=config["test_fraction"],
        limit=config["limit"],
        seed=config["seed"],
        download=config.get("download", False),
    )


def load_run(run: str | Path, checkpoint: str = "best", device: str = "auto"):
    """(config, data, module) of a run directory, the module restored from its checkpoint."""
    from ppvae.checkpoint import load_checkpoint, restore_module
    from ppvae.inference.train import BEST_CHECKPOINT, LAST_CHECKPOINT, resolve_device

    run = Path(run)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise PPVAEError(f"{run} is not a ppvae run directory (no config.json); pass one")
    config = json.loads(config_path.read_text())
    data = _load_data(config)
    module = build_model(config["model"], data, config)
    path = run / (BEST_CHECKPOINT if checkpoint == "best" else LAST_CHECKPOINT)
    if checkpoint == "best" and not path.exists():
        path = run / LAST_CHECKPOINT
    restore_module(module, load_checkpoint(path), source=str(path))
    module.to(resolve_device(device)).eval()
    return config, data, module


def _figures(module, data, run_dir: Path, history: list[dict] | None) -> list[Path]:
    from ppvae.plots.samples import (
        plot_latent_map,
        plot_manifold_grid,
        plot_prior_samples,
        plot_reconstructions,
        plot_training_curves,
    )

    written = []
    if history:
        written.append(plot_training_curves(history, run_dir / "training_curves.png"))
    if data.image_shape is None:
        return written
    device = next(module.parameters()).device
    x, y = data.split("test")
    x = x[:2000].to(device)
    y = None if y is None else y[:2000].to(device)
    written.append(
        plot_reconstructions(module, x, y, data.image_shape, run_dir / "reconstructions.png")
    )
    conditional = is_conditional(module)
    labels = (torch_arange(64) % data.num_classes).to(device) if conditional else None
    try:
        written.append(
            plot_prior_samples(module, data.image_shape, run_dir / "samples.png", y=labels)
        )
    except PPVAEError:  # no prior to sample from (an autoencoder)
        pass
    if getattr(module, "latent_dim", None) == 2:
        written.append(
            plot_latent_map(module, x, y, run_dir / "latent_map.png", y=y if conditional else None)
        )
        if not conditional:
            written.append(
                plot_manifold_grid(module, data.image_shape, run_dir / "manifold_grid.png")
            )
    return written


def is_conditional(module) -> bool:
    """Conditional models (CVAE) are built with ``num_classes``."""
    return "num_classes" in getattr(module, "hparams", {})


def torch_arange(n: int):
    import torch

    return torch.arange(n)


def _evaluate_and_report(
    module, data, run_dir: Path, *, split, num_samples, batch_size, device, progress, seed
):
    from ppvae.inference.evaluate import evaluate
    from ppvae.plots.evaluation import plot_report

    x, y = data.split(split)
    ladder = tuple(k for k in (1, 5, 50, 500, 5000) if k < num_samples) + (num_samples,)
    report = evaluate(
        module,
        (x, y),
        num_samples=num_samples,
        ladder=ladder,
        batch_size=batch_size,
        device=device,
        seed=seed,
        progress=progress,
    )
    report.to_json(run_dir / "report.json")
    return report, [run_dir / "report.json", *plot_report(report, run_dir)]


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def cmd_train(args, explicit: set[str]) -> int:
    import torch

    from ppvae.checkpoint import atomic_write_json
    from ppvae.inference.objectives import make_objective
    from ppvae.inference.train import fit, resolve_device

    if args.resume:
        if args.run_dir is None:
            raise PPVAEError("--resume needs --run-dir pointing at the run to continue")
        config_path = Path(args.run_dir) / "config.json"
        if not config_path.is_file():
            raise PPVAEError(f"cannot resume: {config_path} does not exist; check --run-dir")
        saved = json.loads(config_path.read_text())
        changed = sorted(
            k for k in explicit - RESUME_OVERRIDABLE if k in saved and getattr(args, k) != saved[k]
        )
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise PPVAEError(
                f"{flags} differ from the run being resumed; resume uses its saved options "
                "(only --epochs and --device may change) — start a new --run-dir instead"
            )
        config = {**saved, **{k: getattr(args, k) for k in explicit & {"epochs", "eval_samples"}}}
        run_dir = Path(args.run_dir)
    else:
        config = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "progress")}
        if config["data_dir"] is not None:
            config["data_dir"] = str(Path(config["data_dir"]).expanduser().resolve())
        if args.run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = Path(args.dataset).stem if args.dataset not in ("digits",) else args.dataset
            run_dir = Path("runs") / f"{args.model}-{name}-{stamp}"
        else:
            run_dir = Path(args.run_dir)
        if (run_dir / "checkpoint.pt").exists():
            raise PPVAEError(
                f"{run_dir} already holds a run; add --resume to continue it, "
                "or pick a new --run-dir"
            )
        config["run_dir"] = str(run_dir)
    if config["epochs"] < 1:
        raise PPVAEError("--epochs must be at least 1")
    device = resolve_device(args.device)

    # everything that can fail on bad input happens before anything is written
    data = _load_data(config)
    torch.manual_seed(config["seed"])
    module = build_model(config["model"], data, config, explicit)
    if hasattr(module, "check_data"):
        module.check_data(data.split("val")[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        atomic_write_json(config, run_dir / "config.json")

    objective = make_objective(
        config["objective"],
        num_particles=config["num_particles"],
        beta=config["beta"],
        kl_warmup=config["kl_warmup"],
        free_bits=config["free_bits"],
    )
    val_x, val_y = data.split("val")
    print(f"ppvae: {data.summary()}")
    print(f"ppvae: {type(module).__name__} on {device}, run directory {run_dir}")
    tic = time.perf_counter()
    result = fit(
        module,
        data.train,
        loss=objective,
        lr=config["lr"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        device=device,
        validation=(val_x, val_y),
        epoch_metrics=_collapse_logger(val_x[:1000], None if val_y is None else val_y[:1000]),
        run_dir=run_dir,
        resume=args.resume,
        seed=config["seed"],
        config=config,
        progress=args.progress,
    )
    train_seconds = time.perf_counter() - tic

    _, _, best = load_run(run_dir, "best", str(device))
    written = [run_dir / "checkpoint.pt", run_dir / "checkpoint-best.pt", run_dir / "metrics.jsonl"]
    rows = [
        (
            "epochs",
            f"{result.epochs_run} run now, {config['epochs']} in total "
            f"({train_seconds:.1f} s; best validation epoch {result.best_epoch})",
        ),
        ("train loss", f"{result.history[-1]['train_loss']:.3f} nats/point (last epoch)"),
        _validation_row(result),
    ]
    report, report_files = _evaluate_and_report(
        best,
        data,
        run_dir,
        split="test",
        num_samples=config["eval_samples"],
        batch_size=config["batch_size"],
        device=device,
        progress=args.progress,
        seed=config["seed"],
    )
    written += report_files
    rows += report_rows(report)
    written += _figures(best, data, run_dir, result.history)
    print(f"ppvae: done — test split of {data.name}, best checkpoint:")
    _print_table(rows + [("wrote", ", ".join(p.name for p in written)), ("in", str(run_dir))])
    return 0


def _collapse_logger(x, y):
    """Active units and KL per latent dimension on validation data, for ``metrics.jsonl``;
    silent for models where they do not exist (point-mass or discrete codes)."""
    from ppvae.inference.collapse import collapse_metrics

    state = {"enabled": True}

    def metrics(module) -> dict:
        if not state["enabled"]:
            return {}
        device = next(module.parameters()).device
        try:
            return collapse_metrics(module, x.to(device), None if y is None else y.to(device))
        except PPVAEError:
            state["enabled"] = False
            return {}

    return metrics


def _validation_row(result) -> tuple[str, str]:
    if result.validation_metric == "val_loss":
        return ("val loss", f"{-result.best_validation:.3f} nats/point (best epoch)")
    return ("val ELBO", f"{result.best_validation:.3f} (best epoch)")


def report_rows(report) -> list[tuple[str, str]]:
    if not report.likelihood_available:
        rows = [("likelihood", report.note), ("recon MSE", f"{report.reconstruction_mse:.4f}")]
        if report.reconstruction_bce is not None:
            rows.append(("recon BCE", f"{report.reconstruction_bce:.3f} nats/point"))
        return rows
    return [
        ("test ELBO", f"{report.elbo:.3f}"),
        ("test log p(x)", f"{report.log_px:.3f} (K={report.num_samples})"),
        ("ELBO gap", f"{report.gap:.3f} nats"),
    ]


def cmd_evaluate(args) -> int:
    config, data, module = load_run(args.run, args.checkpoint, args.device)
    report, written = _evaluate_and_report(
        module,
        data,
        Path(args.run),
        split=args.split,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        device=args.device,
        progress=args.progress,
        seed=args.seed,
    )
    print(report.summary_table())
    _print_table([("wrote", ", ".join(p.name for p in written)), ("in", args.run)])
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from ppvae.plots.samples import save_image_grid

    config, data, module = load_run(args.run, args.checkpoint, args.device)
    torch.manual_seed(args.seed)
    device = next(module.parameters()).device
    if args.label is not None:
        if not is_conditional(module):
            raise PPVAEError(
                f"--label needs a conditional model (cvae); this run is {config['model']}"
            )
        if not 0 <= args.label < data.num_classes:
            raise PPVAEError(f"--label must be in 0..{data.num_classes - 1}, got {args.label}")
        labels = torch.full((args.num,), args.label, dtype=torch.long, device=device)
    else:
        labels = None
    with torch.no_grad():
        samples = module.sample_prior(args.num, labels).cpu()
    suffix = "" if args.label is None else f"_label{args.label}"
    out = Path(args.out) if args.out else Path(args.run) / f"samples{suffix}.png"
    if out.suffix == ".npy":
        np.save(out, samples.numpy())
    elif data.image_shape is None:
        raise PPVAEError("these data are not images; pass --out FILE.npy to save the samples")
    else:
        save_image_grid(samples, data.image_shape, out, title=f"{args.num} samples{suffix}")
    print(f"ppvae: wrote {out}")
    return 0


def cmd_plot(args) -> int:
    from ppvae.inference.train import METRICS_FILE

    _, data, module = load_run(args.run, args.checkpoint, args.device)
    metrics = Path(args.run) / METRICS_FILE
    history = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if (metrics.exists())
        else None
    )
    written = _figures(module, data, Path(args.run), history)
    print("ppvae: wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
    try:
        if args.command == "train":
            return cmd_train(args, _explicit_options(parser, argv))
        return {"evaluate": cmd_evaluate, "sample": cmd_sample, "plot": cmd_plot}[args.command](
            args
        )
    except PPVAEError as error:
        print(f"ppvae {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"ppvae {args.command}: interrupted; completed epochs are checkpointed — "
            "continue with 'ppvae train --run-dir RUN --resume'",
            file=sys.stderr,
        )
        return 130
