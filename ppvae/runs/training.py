"""What a run's configuration turns into: the model, the checks before training, the extra
per-epoch metrics, and the outcome of training."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppvae.errors import PPVAEError
from ppvae.runs.config import RunConfig


@dataclass
class TrainOutcome:
    """What :meth:`Run.train` did: the ``FitResult``, the test report of the best checkpoint,
    the files written, the training time, and whether the model has training-only losses."""

    result: Any
    report: Any
    written: list[Path]
    seconds: float
    objective: Any
    auxiliary_losses: bool = False


def build_model(config: RunConfig, data) -> nn.Module:
    """The model of ``config`` with the sizes of ``data`` (a ``DataSplits``)."""
    import inspect

    from ppvae.models import MODELS

    cls = MODELS[config.model]
    parameters = inspect.signature(cls).parameters
    kwargs = dict(config.model_options)
    derived = {
        "input_dim": data.input_dim,
        "image_shape": data.image_shape,
        "num_classes": data.num_classes,
    }
    for key, value in derived.items():
        if key in parameters:
            if key == "num_classes" and value is None:
                raise PPVAEError(
                    f"--model {config.model} needs labels; use a data set that has them"
                )
            kwargs[key] = value
    if kwargs.get("net") == "conv" and data.image_shape is None:
        raise PPVAEError("--net conv needs image data; use --net mlp for flat arrays")
    try:
        return cls(**kwargs)
    except (RuntimeError, MemoryError, OverflowError) as error:  # sizes torch cannot allocate
        from ppvae.checkpoint import one_line

        raise PPVAEError(
            f"cannot build --model {config.model} with {config.model_options} "
            f"({one_line(error, 120)}); use smaller --hidden / --latent-dim"
        ) from None


def preflight(config: RunConfig, data, module: nn.Module) -> bool:
    """Check every split as ``fit`` checks its data and evaluate the objective once on a few
    validation points, so that bad data or a model the objective cannot train fail before
    anything is written. Returns whether the model has training-only auxiliary losses."""
    import pyro
    import pyro.poutine as poutine

    from ppvae.contract import AUXILIARY_LOSS
    from ppvae.inference.train import check_training_data

    check_training_data(module, data.train, validation=data.split("val"))  # what fit checks
    check_training_data(module, data.split("test"))  # the split of the final evaluation
    x, y = data.split("val")
    x, y = x[:8], None if y is None else y[:8]
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the module is on the CPU
            try:
                config.make_objective().loss(module.model, module.guide, x, y)
            except PPVAEError as error:
                what = f"--model {config.model} with {config.describe_objective()}"
                raise PPVAEError(f"{what} cannot be trained: {error}") from None
            guide_trace = poutine.trace(module.guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace))
            model_trace = model_trace.get_trace(x, y)
    finally:
        pyro.clear_param_store()
    return any(
        site["infer"].get(AUXILIARY_LOSS)
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
    )


def epoch_metrics(objective, x, y) -> Callable:
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


def train_run(run, *, resume: bool, progress: bool, log: Callable[[str], None] | None):
    """The body of :meth:`ppvae.Run.train`.

    As the run's one writer (its lock), with the leftovers of interrupted writes removed and,
    on resume, ``checkpoint-best.pt`` repaired where a kill left it behind ``checkpoint.pt``:
    train to ``config.epochs`` (a changed ``lr`` applies from the next epoch), then evaluate
    the best checkpoint and draw the figures, writing ``report.json`` last. A resumed run whose
    epochs are all trained but whose ``report.json`` is missing (a kill after the last epoch) is
    completed without training. Write errors (a full disk, a read-only folder) are one line.
    """
    from ppvae.checkpoint import LAST_CHECKPOINT, best_checkpoint, load_checkpoint
    from ppvae.inference import distributed
    from ppvae.inference.train import fit, read_metrics, resolve_device

    config, data, path = run.config, run.data, Path(run.path)
    writer = distributed.is_writer()  # torchrun: rank 0 holds the lock and writes the files
    show = log if log is not None and writer else (lambda line: None)
    device = resolve_device(config.device)
    auxiliary = run.preflight()
    objective = config.make_objective()
    try:
        if writer:
            run.take_lock()
        if resume:
            saved = load_checkpoint(path / LAST_CHECKPOINT)
            if writer and best_checkpoint(path) != best_checkpoint(path, repair=True):
                run.notices.append(
                    f"checkpoint-best.pt was behind checkpoint.pt (a kill between their writes); "
                    f"restored epoch {saved['best_epoch']} from checkpoint.pt"
                )
        for notice in run.notices:
            show(f"note: {notice}")
        run.notices.clear()
        module = run.build_module()
        show(data.summary())
        show(f"{type(module).__name__} on {device}, run directory {path}")
        tic = time.perf_counter()
        if resume and saved["epoch"] >= config.epochs and not (path / "report.json").exists():
            result = _finished(saved, read_metrics(path))  # only the report is missing
        else:
            val_x, val_y = data.split("val")
            result = fit(
                module,
                data.train,
                loss=objective,
                lr=config.lr,
                lr_schedule=(lambda epoch: config.lr) if resume else None,
                epochs=config.epochs,
                batch_size=config.batch_size,
                device=device,
                validation=(val_x, val_y),
                epoch_metrics=epoch_metrics(
                    objective, val_x[:1000], None if val_y is None else val_y[:1000]
                ),
                run_dir=path,
                resume=resume,
                seed=config.seed,
                config=config.to_dict(),
                progress=progress,
            )
        seconds = time.perf_counter() - tic
        report, written = _report_and_figures(run, device, progress, result.history)
    except OSError as error:
        where = error.filename or path
        raise PPVAEError(
            f"cannot write {where}: {error.strerror or error}; the last complete checkpoint is "
            "kept — free space or fix permissions, then add --resume"
        ) from None
    finally:
        run.release_lock()
    return TrainOutcome(result, report, written, seconds, objective, auxiliary)


def _finished(checkpoint: dict, history: list[dict]):
    """A ``FitResult`` for a run whose epochs are all trained."""
    from ppvae.inference.train import FitResult

    return FitResult(
        history=history,
        best_epoch=checkpoint.get("best_epoch"),
        best_validation=checkpoint.get("best_validation"),
        validation_metric=checkpoint.get("validation_metric"),
        resumed_from_epoch=checkpoint["epoch"],
        epochs_this_call=0,
    )


def _report_and_figures(run, device, progress: bool, history: list[dict]):
    """The best checkpoint's test report and the run's figures; ``report.json`` is written last,
    so its presence says the run is complete."""
    from ppvae.checkpoint import LAST_CHECKPOINT, atomic_write_text
    from ppvae.inference import distributed
    from ppvae.plots.evaluation import plot_report
    from ppvae.plots.figures import run_figures

    path, config = Path(run.path), run.config
    best = run.restore("best", device)
    report = run.report_of(
        best,
        split="test",
        num_samples=config.eval_samples,
        batch_size=config.batch_size,
        device=device,
        seed=config.seed,
        progress=progress,
        num_points=config.eval_points,
    )
    if not distributed.is_writer():  # torchrun: every rank evaluates its share, rank 0 writes
        return report, []
    written = [path / LAST_CHECKPOINT, run.checkpoint_path("best"), path / "metrics.jsonl"]
    figures = plot_report(report, path) + run_figures(best, run.data, path, history)
    atomic_write_text(report.to_json(), path / "report.json")
    return report, [*written, path / "report.json", *figures]
