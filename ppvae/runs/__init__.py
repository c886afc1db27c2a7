"""Runs: a run directory as a library object (:class:`Run`, :func:`load_run`) and its typed
configuration (:class:`RunConfig`). The command line (``ppvae.cli``) is a thin layer over them."""

from ppvae.runs.config import RunConfig
from ppvae.runs.run import Evaluation, Run, load_run
from ppvae.runs.training import TrainOutcome, build_model

__all__ = ["Evaluation", "Run", "RunConfig", "TrainOutcome", "build_model", "load_run"]
