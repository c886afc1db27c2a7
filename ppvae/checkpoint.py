"""Atomic files and checkpoints (DESIGN §6).

A checkpoint is a plain dict of tensors, numbers and strings, loaded with
``torch.load(..., weights_only=True)``: no arbitrary objects are ever unpickled. It carries a
SHA-256 of its content (:func:`payload_checksum`), verified on load with its structure and the
finiteness of its weights. :func:`commit_epoch` and :func:`best_checkpoint` keep
``checkpoint-best.pt`` at the epoch ``checkpoint.pt`` names as best, whatever write a kill
interrupts.
"""

from __future__ import annotations

import hashlib
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
LAST_CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"
CHECKSUM_KEY = "checksum"
TEMPORARY_SUFFIX = ".tmp"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent
        )
    except OSError as error:  # named after the file it was for, not the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:  # name the file it was for
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data))


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
    """Load a ppvae checkpoint with ``weights_only=True``, verify its checksum and structure, and
    refuse non-finite weights; a one-line error naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise PPVAEError(f"checkpoint {path} {what}; train first or check the run directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated / foreign files
        raise PPVAEError(
            f"checkpoint {path} is corrupt or not a ppvae checkpoint ({one_line(error)}); "
            "delete it and retrain, or pass another run directory"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise PPVAEError(f"{path} is not a ppvae checkpoint; pass a run directory written by ppvae")
    if CHECKSUM_KEY in checkpoint:
        expected = checkpoint.pop(CHECKSUM_KEY)
        if payload_checksum(checkpoint) != expected:
            raise PPVAEError(
                f"checkpoint {path} fails its checksum: it changed after it was written (a damaged "
                "disk or an edit); use the other checkpoint (--checkpoint best|last) or retrain"
            )
    _check_structure(checkpoint, path)
    return checkpoint


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line, shortened at a word boundary."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " …"


_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "state_dict": (dict,),
    "optimizer": (dict,),
    "rng": (dict,),
    "epoch": (int,),
    "seed": (int,),
    "best_epoch": (int, type(None)),
    "best_validation": (float, int, type(None)),
    "validation_metric": (str, type(None)),
    "config": (dict, type(None)),
}
_REQUIRED = ("model", "state_dict", "optimizer", "rng", "epoch", "seed")


def _check_structure(checkpoint: dict, path: Path) -> None:
    """The fields ``fit`` and ``restore_module`` read, with the types they need."""

    def refuse(problem: str):
        raise PPVAEError(
            f"checkpoint {path} {problem}; it was not written by this version of ppvae or was "
            "edited — use the other checkpoint (--checkpoint best|last) or retrain"
        )

    for key in _REQUIRED:
        if key not in checkpoint:
            refuse(f"has no {key!r} field")
    for key, types in _FIELDS.items():
        value = checkpoint.get(key)
        if key in checkpoint and (not isinstance(value, types) or isinstance(value, bool)):
            refuse(f"field {key!r} is a {type(value).__name__}")
    model = checkpoint["model"]
    if not isinstance(model.get("class"), str) or not isinstance(model.get("hparams"), dict):
        refuse("field 'model' does not name a class and its hparams")
    if checkpoint["epoch"] < 0:
        refuse(f"records epoch {checkpoint['epoch']}")
    for name, tensor in checkpoint["state_dict"].items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            refuse(f"state_dict entry {name!r} is not a named tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PPVAEError(
                f"checkpoint {path} holds NaN/inf weights in {name!r}; resume from the other "
                "checkpoint (--checkpoint best|last) or retrain, with a lower --lr"
            )
    rng = checkpoint["rng"]
    numpy_state, python_state = rng.get("numpy"), rng.get("python")
    if (
        not isinstance(rng.get("torch"), torch.Tensor)
        or not isinstance(numpy_state, dict)
        or not isinstance(numpy_state.get("keys"), torch.Tensor)
        or not isinstance(python_state, dict)
        or not isinstance(python_state.get("internal"), torch.Tensor)
    ):
        refuse("field 'rng' does not hold the random number generators' states")


def payload_checksum(checkpoint: dict) -> str:
    """SHA-256 of a checkpoint's content: every key and value in a fixed order, tensors by dtype,
    shape and bytes; independent of how ``torch.save`` lays the file out."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed({k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def _saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file records (memory-mapped: the tensors are not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    except Exception:
        return None


def commit_epoch(checkpoint: dict, run_dir: str | os.PathLike, *, is_best: bool) -> None:
    """Write an epoch's checkpoint (with its checksum) as ``checkpoint.pt``, and as
    ``checkpoint-best.pt`` when ``is_best``.

    ``checkpoint.pt`` is the commit point: its ``best_epoch`` names the weights
    ``checkpoint-best.pt`` must hold. A kill between the two writes of a best epoch leaves
    ``checkpoint-best.pt`` one best epoch behind while ``checkpoint.pt`` holds the best weights;
    :func:`best_checkpoint` reads those instead, and the next epoch copies them over before
    ``checkpoint.pt`` is replaced, so "best" never points at weights other than what it names.
    """
    run_dir = Path(run_dir)
    last, best = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
    checkpoint = {**checkpoint, CHECKSUM_KEY: payload_checksum(checkpoint)}
    if not is_best and checkpoint.get("best_epoch") is not None and last.exists():
        best_epoch = checkpoint["best_epoch"]
        if _saved_epoch(best) != best_epoch and _saved_epoch(last) == best_epoch:
            atomic_write_bytes(last.read_bytes(), best)
    atomic_save(checkpoint, last)
    if is_best:
        atomic_save(checkpoint, best)


def best_checkpoint(run_dir: str | os.PathLike, *, repair: bool = False) -> Path:
    """The file that holds the best epoch ``checkpoint.pt`` records: ``checkpoint-best.pt``, or
    ``checkpoint.pt`` itself after a kill between the two writes of a best epoch (``repair``
    then copies it over ``checkpoint-best.pt``). Runs without validation have only their last."""
    run_dir = Path(run_dir)
    last, best = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
    if not last.exists():
        return best
    state = load_checkpoint(last)
    best_epoch = state.get("best_epoch")
    if best_epoch is None:
        return best if best.exists() else last
    if best.exists():
        saved = _saved_epoch(best)
        if saved == best_epoch:
            return best
        if not (isinstance(saved, int) and saved < best_epoch):
            load_checkpoint(best)  # a damaged file: its one-line reason
    if state["epoch"] == best_epoch:  # a kill between the two writes of a best epoch
        if repair:
            atomic_write_bytes(last.read_bytes(), best)
            return best
        return last
    raise PPVAEError(
        f"{last} records epoch {best_epoch} as best but {best} does not hold it; "
        "use --checkpoint last, or retrain"
    )


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
        raise PPVAEError(f"{source} does not fit the model: {one_line(error)}") from None


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
