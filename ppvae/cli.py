"""The ``ppvae`` command line: ``train``, ``evaluate``, ``sample``, ``plot`` (DESIGN §5).

Errors in the user's input print one line and exit with code 2, before anything is written; a run
directory holds ``config.json``, ``checkpoint.pt`` (+ ``checkpoint-best.pt``), ``metrics.jsonl``,
``report.json`` and PNG figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ppvae.errors import PPVAEError

RESUME_OVERRIDABLE = {"epochs", "device", "progress", "eval_samples", "resume", "run_dir"}
DATA_KEYS = ("dataset", "data_dir", "binarize", "val_fraction", "test_fraction", "limit", "seed")
SAMPLE_SUFFIXES = (".png", ".npy")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) that points at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], wanted: str):
    """An argparse ``type`` that converts with ``convert`` and refuses values ``accept`` rejects
    (NaN fails every comparison, so it is refused too)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_count = _checked(int, lambda v: v >= 0, "an integer >= 0")
_seed = _checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
_positive_float = _checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
_nonnegative_float = _checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
_fraction = _checked(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
_decay = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _model_default(key: str) -> str:
    """``(default: 8 for ae, cvae, vae; 16 for vqvae ...)`` from the models' constructors."""
    from ppvae.models import MODELS

    by_value: dict[str, list[str]] = {}
    for name, cls in sorted(MODELS.items()):
        parameter = inspect.signature(cls).parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        value = parameter.default
        text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        by_value.setdefault(text, []).append(name)
    return "(default: " + "; ".join(f"{v} for {', '.join(n)}" for v, n in by_value.items()) + ")"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="digits",
        help="digits (scikit-learn's bundled 8x8 digits, no files needed), mnist, fashion-mnist, "
        "or a path to a .npy/.npz/.csv array [N, features] or [N, (C,) H, W] "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        help="root holding MNIST/raw or FashionMNIST/raw (default: $PPVAE_DATA, else ./data)",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="download MNIST / Fashion-MNIST if missing (online; default: off)",
    )
    group.add_argument(
        "--binarize",
        choices=("dynamic", "static", "none"),
        default="dynamic",
        help="dynamic: new Bernoulli draw of the training set every epoch; static: one seeded "
        "draw; none: grey values (default: %(default)s)",
    )
    group.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        help="validation share of the training split (default: %(default)s)",
    )
    group.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        help="test share for sources without a test split: digits, arrays (default: %(default)s)",
    )
    group.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="use only the first N training points (default: all)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from ppvae.models import MODELS
    from ppvae.models.likelihoods import LIKELIHOODS
    from ppvae.nets import ACTIVATIONS

    group = parser.add_argument_group(
        "model (options a model's constructor does not take are refused)"
    )
    group.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="vae",
        help="model to train (default: %(default)s)",
    )
    options: dict[str, tuple[dict, str]] = {
        "latent_dim": ({"type": _positive_int}, "latent size; VQ-VAE: size of each code vector"),
        "hidden": ({"type": _positive_int, "nargs": "+"}, "hidden layer sizes"),
        "activation": ({"choices": sorted(ACTIVATIONS)}, "nonlinearity of the networks"),
        "likelihood": ({"choices": LIKELIHOODS}, "observation model p(x|z)"),
        "net": ({"choices": ("mlp", "conv")}, "network kind, conv for images only"),
        "codebook_size": ({"type": _positive_int}, "VQ-VAE: number of codes"),
        "commitment_beta": ({"type": _nonnegative_float}, "VQ-VAE: commitment weight"),
        "ema_decay": (
            {"type": _decay},
            "VQ-VAE: EMA decay of the codebook, 0 for gradient updates",
        ),
        "num_positions": ({"type": _positive_int}, "VQ-VAE: codes per data point"),
        "dead_code_restart": (
            {"type": _count},
            "VQ-VAE: restart a code unused for this many steps, 0 for never",
        ),
        "latent_dim2": ({"type": _positive_int}, "HVAE: size of the top latent z2"),
        "hidden2": ({"type": _positive_int, "nargs": "+"}, "HVAE: hidden sizes between z1 and z2"),
    }
    for key in MODEL_KEYS:
        kwargs, text = options[key]
        group.add_argument(
            "--" + key.replace("_", "-"),
            default=None,
            help=f"{text} {_model_default(key)}",
            **kwargs,
        )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs", type=_positive_int, default=50, help="total epochs (default: %(default)s)"
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=100,
        help="data points per SVI step (default: %(default)s)",
    )
    group.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: %(default)s)"
    )
    group.add_argument(
        "--objective",
        choices=("elbo", "mean-field", "iwae", "iwae-dreg"),
        default="elbo",
        help="elbo: Trace_ELBO (Monte Carlo KL); mean-field: the ELBO with closed-form KL terms "
        "where they are exact; iwae: the importance-weighted bound with --num-particles K; "
        "iwae-dreg: the same bound with doubly-reparameterised guide gradients "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--num-particles",
        type=_positive_int,
        default=1,
        help="particles per data point for the objective (K of the IWAE bound, at least 2 "
        "there; default: %(default)s)",
    )
    group.add_argument(
        "--beta",
        type=_nonnegative_float,
        default=1.0,
        help="weight of the KL term (beta-VAE; elbo and mean-field only; default: %(default)s)",
    )
    group.add_argument(
        "--kl-warmup",
        type=_count,
        default=0,
        help="raise the KL weight linearly to --beta over this many epochs "
        "(default: %(default)s, off)",
    )
    group.add_argument(
        "--free-bits",
        type=_nonnegative_float,
        default=0.0,
        help="floor on the batch-mean KL per latent dimension, in nats (default: %(default)s, off)",
    )
    group.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=1000,
        help="importance samples for the final test log p(x) (default: %(default)s)",
    )


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present), cpu or cuda[:N] (default: %(default)s)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide progress bars (default: shown on a terminal)",
    )


def _add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best validation epoch or last epoch (default: %(default)s)",
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
        "(--epochs, --device, --eval-samples may change; default: off)",
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="estimate log p(x), IWAE bounds, the ELBO gap and PSIS k-hat for a run",
        description="Evaluate a run's best checkpoint per data point and write report.json "
        "and figures into the run directory.",
    )
    evaluate.add_argument("run", help="run directory written by 'ppvae train'")
    evaluate.add_argument(
        "--num-samples",
        type=_positive_int,
        default=5000,
        help="importance samples K (default: %(default)s)",
    )
    evaluate.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="data split to evaluate (default: %(default)s)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=_positive_int,
        default=100,
        help="data points per batch (default: %(default)s)",
    )
    _add_checkpoint_option(evaluate)
    _add_common_options(evaluate)

    sample = commands.add_parser(
        "sample",
        help="draw samples from the prior of a trained run",
        description="Decode draws from the prior and save them as an image grid (or .npy).",
    )
    sample.add_argument("run", help="run directory written by 'ppvae train'")
    sample.add_argument(
        "--num", type=_positive_int, default=64, help="number of samples (default: %(default)s)"
    )
    sample.add_argument(
        "--label",
        type=int,
        default=None,
        help="class to generate, for a conditional model (cvae) (default: none)",
    )
    sample.add_argument(
        "--out",
        default=None,
        help=f"output file, one of {', '.join(SAMPLE_SUFFIXES)}; missing folders are created "
        "(default: RUN/samples.png, or RUN/samples_labelL.png with --label)",
    )
    _add_checkpoint_option(sample)
    _add_common_options(sample)

    plot = commands.add_parser(
        "plot",
        help="draw a run's figures: curves, reconstructions, samples, 2-D latent map",
        description="Redraw the figures of a run; a 2-D latent space also gets a latent map "
        "and a decoded manifold grid.",
    )
    plot.add_argument("run", help="run directory written by 'ppvae train'")
    _add_checkpoint_option(plot)
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


def _restore(run: Path, config: dict, data, checkpoint: str, device: str):
    """The run's model with the weights of its ``best`` (else last) or ``last`` checkpoint."""
    from ppvae.checkpoint import load_checkpoint, restore_module
    from ppvae.inference.train import BEST_CHECKPOINT, LAST_CHECKPOINT, resolve_device

    module = build_model(config["model"], data, config)
    path = run / (BEST_CHECKPOINT if checkpoint == "best" else LAST_CHECKPOINT)
    if checkpoint == "best" and not path.exists():
        path = run / LAST_CHECKPOINT
    restore_module(module, load_checkpoint(path), source=str(path))
    return module.to(resolve_device(device)).eval()


def load_run(run: str | Path, checkpoint: str = "best", device: str = "auto"):
    """(config, data, module) of a run directory, the module restored from its checkpoint."""
    run = Path(run)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise PPVAEError(f"{run} is not a ppvae run directory (no config.json); pass one")
    config = json.loads(config_path.read_text())
    data = _load_data(config)
    return config, data, _restore(run, config, data, checkpoint, device)


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


def _train_config(args, explicit: set[str]) -> tuple[dict, Path]:
    """The run's configuration and directory: the saved one with ``--resume``, else the options."""
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
                "(only --epochs, --device and --eval-samples may change) — start a new --run-dir "
                "instead"
            )
        config = {**saved, **{k: getattr(args, k) for k in explicit & {"epochs", "eval_samples"}}}
        return config, Path(args.run_dir)
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
            f"{run_dir} already holds a run; add --resume to continue it, or pick a new --run-dir"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise PPVAEError(f"--run-dir {run_dir} is a file; pick a directory")
    config["run_dir"] = str(run_dir)
    return config, run_dir


def _make_objective(config: dict):
    from ppvae.inference.objectives import make_objective

    return make_objective(
        config.get("objective", "elbo"),
        num_particles=config.get("num_particles", 1),
        beta=config.get("beta", 1.0),
        kl_warmup=config.get("kl_warmup", 0),
        free_bits=config.get("free_bits", 0.0),
    )


def _describe_objective(config: dict) -> str:
    from ppvae.inference.objectives import reweights_kl

    text = f"--objective {config.get('objective', 'elbo')}"
    reweighted = reweights_kl(
        config.get("beta", 1.0), config.get("kl_warmup", 0), config.get("free_bits", 0.0)
    )
    return text + (" and --beta/--kl-warmup/--free-bits" if reweighted else "")


def _preflight(module, objective, data, config: dict) -> bool:
    """Check every split as ``fit`` checks its data and evaluate the objective once on a few
    validation points, so that bad data or a model the objective cannot train fail before the
    run directory is written. Returns whether the model has training-only auxiliary losses."""
    import pyro
    import pyro.poutine as poutine
    import torch

    from ppvae.contract import AUXILIARY_LOSS
    from ppvae.inference.train import check_training_data

    check_training_data(module, data.train, validation=data.split("val"))  # what fit checks
    check_training_data(module, data.split("test"))  # the split of the final evaluation
    x, y = data.split("val")
    x, y = x[:8], None if y is None else y[:8]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the module is on the CPU here
            try:
                objective.loss(module.model, module.guide, x, y)
            except PPVAEError as error:
                what = f"--model {config['model']} with {_describe_objective(config)}"
                raise PPVAEError(f"{what} cannot be trained: {error}") from None
            guide_trace = poutine.trace(module.guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace))
            model_trace = model_trace.get_trace(x, y)
    finally:
        module.train(was_training)
        pyro.clear_param_store()
    return any(
        site["infer"].get(AUXILIARY_LOSS)
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
    )


def cmd_train(args, explicit: set[str]) -> int:
    import torch

    from ppvae.checkpoint import atomic_write_json
    from ppvae.inference.train import fit, resolve_device

    config, run_dir = _train_config(args, explicit)
    device = resolve_device(args.device)
    # everything that can fail on bad input happens before anything is written
    data = _load_data(config)
    torch.manual_seed(config["seed"])
    module = build_model(config["model"], data, config, explicit)
    objective = _make_objective(config)
    auxiliary = _preflight(module, objective, data, config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PPVAEError(f"cannot create --run-dir {run_dir}: {error.strerror}") from None
    if not args.resume:
        atomic_write_json(config, run_dir / "config.json")

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
        epoch_metrics=_epoch_metrics(
            objective, val_x[:1000], None if val_y is None else val_y[:1000]
        ),
        run_dir=run_dir,
        resume=args.resume,
        seed=config["seed"],
        config=config,
        progress=args.progress,
    )
    train_seconds = time.perf_counter() - tic

    best = _restore(run_dir, config, data, "best", str(device))
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
    written = [run_dir / "checkpoint.pt", run_dir / "checkpoint-best.pt", run_dir / "metrics.jsonl"]
    written += report_files
    written += _figures(best, data, run_dir, result.history)
    rows = [
        _epochs_row(result, train_seconds),
        _train_row(objective, result, report, auxiliary),
        _validation_row(result),
        *report_rows(report),
        ("wrote", ", ".join(p.name for p in written)),
        ("in", str(run_dir)),
    ]
    print(f"ppvae: done (test rows: the best checkpoint on the test split of {data.name})")
    _print_table(rows)
    return 0


def _epoch_metrics(objective, x, y) -> Callable:
    """Per-epoch extras for ``metrics.jsonl``: the objective's KL weight where it has one, and
    the KL per latent dimension and active units on validation data (none for point-mass guides;
    active units are ``null`` for discrete codes, where they are not defined)."""
    from ppvae.inference.collapse import collapse_metrics

    state = {"collapse": True}

    def metrics(module) -> dict:
        record = {}
        if hasattr(objective, "kl_weight"):
            record["kl_weight"] = float(objective.kl_weight)
        if state["collapse"]:
            device = next(module.parameters()).device
            try:
                record.update(
                    collapse_metrics(module, x.to(device), None if y is None else y.to(device))
                )
            except PPVAEError:
                state["collapse"] = False
        return record

    return metrics


def _epochs_row(result, seconds: float) -> tuple[str, str]:
    now = result.epochs_this_call
    resumed = (
        f" after resuming at epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    )
    return (
        "epochs",
        f"{now} trained now{resumed}, {len(result.history)} in total ({seconds:.1f} s; "
        f"best validation epoch {result.best_epoch})",
    )


def _train_row(objective, result, report, auxiliary: bool) -> tuple[str, str]:
    """The last epoch's training objective, named for what it is."""
    from ppvae.inference.objectives import IWAE_ELBO, KLWeighted_ELBO

    loss = result.history[-1]["train_loss"]
    if result.validation_metric == "val_loss" or not report.likelihood_available:
        return ("train loss", f"{loss:.3f} nats/point (last epoch; no ELBO exists for this model)")
    if auxiliary:
        name, what = "train objective", "the ELBO less the model's auxiliary training losses"
    elif isinstance(objective, IWAE_ELBO):
        name, what = f"train IWAE bound (K={objective.num_particles})", None
    elif isinstance(objective, KLWeighted_ELBO) and objective.reweighted:
        name, what = "train weighted ELBO", "KL term weighted by --beta/--kl-warmup/--free-bits"
    else:
        name, what = "train ELBO", None
    detail = "−train loss per point, last epoch" + (f"; {what}" if what else "")
    return (name, f"{-loss:.3f} ({detail})")


def _validation_row(result) -> tuple[str, str]:
    if result.validation_metric == "val_loss":
        return ("val loss", f"{-result.best_validation:.3f} nats/point (best epoch)")
    return ("val ELBO", f"{result.best_validation:.3f} (best epoch)")


def report_rows(report) -> list[tuple[str, str]]:
    """Rows for an ``EvaluationReport``: log p(x) and the gap only where they are estimates."""
    if not report.likelihood_available:
        rows = [("likelihood", report.note)]
    elif report.point_mass_sites:
        rows = [("test ELBO", f"{report.elbo:.3f} ({report.one_hot_note})")]
    else:
        rows = [
            ("test ELBO", f"{report.elbo:.3f}"),
            ("test log p(x)", f"{report.log_px:.3f} (K={report.num_samples})"),
            ("ELBO gap", f"{report.gap:.3f} nats"),
        ]
        if report.active_units is not None:
            rows.append(("active units", f"{report.active_units} of {report.latent_units}"))
        return rows
    if report.reconstruction_mse is not None:
        rows.append(("recon MSE", f"{report.reconstruction_mse:.4f}"))
    if report.reconstruction_bce is not None:
        rows.append(("recon BCE", f"{report.reconstruction_bce:.3f} nats/point"))
    rows += [(name.replace("_", " "), f"{value:.4g}") for name, value in report.extra.items()]
    return rows


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


def _sample_path(args) -> Path:
    if args.out is None:
        suffix = "" if args.label is None else f"_label{args.label}"
        return Path(args.run) / f"samples{suffix}.png"
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise PPVAEError(f"--out {args.out} is a directory; name a file in it")
    if out.suffix.lower() not in SAMPLE_SUFFIXES:
        kind = f"{out.suffix} files" if out.suffix else "a file without a suffix"
        raise PPVAEError(
            f"--out {args.out}: cannot write {kind}; use one of {', '.join(SAMPLE_SUFFIXES)}"
        )
    return out


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from ppvae.plots.samples import save_image_grid

    out = _sample_path(args)
    config, data, module = load_run(args.run, args.checkpoint, args.device)
    if args.label is not None:
        if not is_conditional(module):
            raise PPVAEError(
                f"--label needs a conditional model (cvae); this run is {config['model']}"
            )
        if not 0 <= args.label < data.num_classes:
            raise PPVAEError(f"--label must be in 0..{data.num_classes - 1}, got {args.label}")
    if out.suffix.lower() != ".npy" and data.image_shape is None:
        raise PPVAEError("these data are not images; pass --out FILE.npy to save the samples")
    torch.manual_seed(args.seed)
    device = next(module.parameters()).device
    labels = None
    if args.label is not None:
        labels = torch.full((args.num,), args.label, dtype=torch.long, device=device)
    with torch.no_grad():
        samples = module.sample_prior(args.num, labels).cpu()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".npy":
            with open(out, "wb") as handle:  # np.save(path) would append ".npy" to ".NPY"
                np.save(handle, samples.numpy())
        else:
            title = f"{args.num} samples" + ("" if args.label is None else f", label {args.label}")
            save_image_grid(samples, data.image_shape, out, title=title)
    except OSError as error:
        raise PPVAEError(f"cannot write --out {out}: {error.strerror or error}") from None
    print(f"ppvae: wrote {out}")
    return 0


def cmd_plot(args) -> int:
    from ppvae.inference.train import read_metrics

    _, data, module = load_run(args.run, args.checkpoint, args.device)
    history = read_metrics(Path(args.run)) or None
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
