"""What a run's configuration turns into: the model, the checks before training, the extra
per-epoch metrics, and the outcome of training."""

from __future__ import annotations

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
    return cls(**kwargs)


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
