"""Atomic files and checkpoints (DESIGN §6).

A checkpoint is a plain dict of tensors, numbers and strings, loaded with
``torch.load(..., weights_only=True)``: no arbitrary objects are ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppvae.errors import PPVAEError

CHECKPOINT_FORMAT = "ppvae-checkpoint-1"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def model_identity(module: nn.Module) -> dict:
    """What a checkpoint records to recognise the model it belongs to."""
    return {
        "class": type(module).__name__,
        "hparams": json.loads(json.dumps(getattr(module, "hparams", {}))),
    }


def rng_state() -> dict:
    """Every RNG a training run draws from, as tensors and numbers (no pickles)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (
            python_state["version"],
            tuple(int(v) for v in python_state["internal"].tolist()),
            python_state["gauss_next"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a ppvae checkpoint with ``weights_only=True``; a one-line error when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise PPVAEError(
            f"checkpoint {path} does not exist; train first or check the run directory"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated / foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PPVAEError(
            f"checkpoint {path} is corrupt or not a ppvae checkpoint ({reason[:120]}); "
            "delete it and retrain, or pass another run directory"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise PPVAEError(f"{path} is not a ppvae checkpoint; pass a run directory written by ppvae")
    return checkpoint


def restore_module(module: nn.Module, checkpoint: dict, source: str = "checkpoint") -> None:
    """Load weights after checking the checkpoint belongs to this model and configuration."""
    saved, current = checkpoint["model"], model_identity(module)
    if saved != current:
        raise PPVAEError(
            f"{source} holds {saved['class']}({_describe(saved['hparams'])}) but this run builds "
            f"{current['class']}({_describe(current['hparams'])}); use the options it was trained "
            "with, or a new --run-dir"
        )
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise PPVAEError(f"{source} does not fit the model: {str(error).splitlines()[0]}") from None


def _describe(hparams: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(hparams.items()))


def refuse_existing_run(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """A one-line error unless ``run_dir`` may be written as a new run (or is being resumed).

    ``fit(run_dir=...)`` and ``ppvae train --run-dir`` share it: a folder that holds a checkpoint
    is only continued (``resume``) or deliberately replaced (``overwrite``), never silently
    written over.
    """
    text = os.fspath(run_dir)
    if not text.strip():
        raise PPVAEError("--run-dir is empty; name the folder for the run")
    run_dir = Path(text)
    if run_dir.exists() and not run_dir.is_dir():
        raise PPVAEError(f"--run-dir {run_dir} is a file; pick a directory")
    if not resume and not overwrite and (run_dir / "checkpoint.pt").exists():
        raise PPVAEError(
            f"{run_dir} already holds a run; add --resume (resume=True) to continue it, or pick "
            "a new --run-dir (overwrite=True replaces it)"
        )
