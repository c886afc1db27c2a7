"""Data sets: the embedded ``digits`` default, MNIST / Fashion-MNIST, and user arrays.

Every loader returns a :class:`DataSplits` with flat float32 inputs ``[N, D]`` (images keep their
shape in ``image_shape``), optional integer labels, and seeded train / validation / test splits.

Binarisation (DESIGN §4):

- ``dynamic``: a fresh Bernoulli draw of the training set every epoch (the protocol of [1]);
  validation and test sets get one seeded draw each, so their numbers are comparable over epochs.
- ``static``: one seeded draw of every split.
- ``none``: grey values as they are.

[1] Importance Weighted Autoencoders, Burda, Grosse, Salakhutdinov (2015).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ppvae.errors import PPVAEError

BINARIZATIONS = ("dynamic", "static", "none")
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
DATA_ENV = "PPVAE_DATA"

# Offsets that keep the seeded draws of different splits independent of each other.
_SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


def _split_generator(seed: int, split: str, epoch: int = 0) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(1_000_003 * seed + 7919 * epoch + _SPLIT_SEED_OFFSET[split])
    return generator


def bernoulli_draw(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per entry with probability ``x`` (values must lie in [0, 1])."""
    return torch.bernoulli(x, generator=generator)


class DynamicBinarization(torch.utils.data.Dataset):
    """Grey-value data whose binarised copy is redrawn every epoch.

    ``epoch(e)`` returns the whole binarised tensor for epoch ``e``; the draw depends only on
    ``(seed, e)``, so a resumed run sees exactly the data an uninterrupted run would have seen.
    It is also an ordinary map-style ``Dataset`` (draws made on access) for generic loaders.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, *, seed: int = 0):
        check_unit_interval(x, "dynamic binarisation")
        self.x = x
        self.y = y
        self.seed = seed

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index):
        xb = torch.bernoulli(self.x[index])
        return xb if self.y is None else (xb, self.y[index])

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return bernoulli_draw(self.x, _split_generator(self.seed, "train", epoch)), self.y


@dataclass
class DataSplits:
    """Train / validation / test inputs ``[N, D]`` with optional labels ``[N]``.

    ``train`` is what :func:`ppvae.inference.fit` takes: a tensor, an ``(x, y)`` pair, or a
    :class:`DynamicBinarization` that redraws the binary training set every epoch.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    image_shape: tuple[int, ...] | None
    binarize: str
    seed: int

    @property
    def input_dim(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int | None:
        if self.train_y is None:
            return None
        return int(torch.cat([self.train_y, self.val_y, self.test_y]).max().item()) + 1

    @property
    def train(self):
        if self.binarize == "dynamic":
            return DynamicBinarization(self.train_x, self.train_y, seed=self.seed)
        return self.train_x if self.train_y is None else (self.train_x, self.train_y)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The evaluation view of a split; ``train`` under dynamic binarisation is drawn once."""
        if name == "train":
            if self.binarize == "dynamic":
                return bernoulli_draw(
                    self.train_x, _split_generator(self.seed, "val", 1)
                ), self.train_y
            return self.train_x, self.train_y
        if name in ("val", "validation"):
            return self.val_x, self.val_y
        if name == "test":
            return self.test_x, self.test_y
        raise PPVAEError(f"unknown split {name!r}; use one of train, val, test")

    def summary(self) -> str:
        shape = "x".join(map(str, self.image_shape)) if self.image_shape else str(self.input_dim)
        return (
            f"{self.name}: {len(self.train_x)} train / {len(self.val_x)} val / "
            f"{len(self.test_x)} test, inputs {shape}, binarize={self.binarize}"
        )


def check_finite(x: np.ndarray | torch.Tensor, source: str) -> None:
    values = torch.as_tensor(x)
    if not values.is_floating_point():
        return
    bad = ~torch.isfinite(values)
    if bad.any():
        row = int(bad.reshape(values.shape[0], -1).any(dim=1).nonzero()[0, 0])
        raise PPVAEError(
            f"{source} contains {int(bad.sum())} NaN/inf values (first in row {row}); "
            "remove or impute them before training"
        )


def check_unit_interval(x: torch.Tensor, purpose: str) -> None:
    check_finite(x, f"the data for {purpose}")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise PPVAEError(
            f"{purpose} needs values in [0, 1] but the data span [{low:.4g}, {high:.4g}]; "
            "rescale the data, or use --binarize none with --likelihood gaussian"
        )


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``--data-dir`` if given, else ``$PPVAE_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path("data")


def _flatten_inputs(array: np.ndarray, source: str) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise PPVAEError(f"{source} holds {array.dtype} values; ppvae needs a numeric array")
    if np.iscomplexobj(array):
        raise PPVAEError(
            f"{source} holds complex values; ppvae needs real numbers (pass the real and "
            "imaginary parts, or the magnitude, as features)"
        )
    if array.ndim < 2 or array.shape[0] < 2:
        raise PPVAEError(
            f"{source} has shape {tuple(array.shape)}; expected [N, features], [N, H, W] or "
            "[N, C, H, W] with N >= 2 data points along the first axis"
        )
    if array.ndim > 4:
        raise PPVAEError(f"{source} has {array.ndim} axes; expected at most 4 ([N, C, H, W])")
    if 0 in array.shape[1:]:
        raise PPVAEError(
            f"{source} has shape {tuple(array.shape)}: no features per data point; pass an "
            "array with at least one value per point"
        )
    check_finite(array, source)
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > float(np.finfo(np.float32).max):
        raise PPVAEError(
            f"{source} holds values up to {largest:.3g}, beyond float32 (3.4e38); rescale the data"
        )
    x = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
    image_shape = None
    if array.ndim == 3:
        image_shape = (1, *array.shape[1:])
    elif array.ndim == 4:
        image_shape = tuple(array.shape[1:])
    return x.reshape(x.shape[0], -1), image_shape


def _read_csv(path: Path) -> np.ndarray:
    """Rows of comma-separated numbers, after an optional header line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # numpy's "input contained no data"
        try:
            array = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError:
            array = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2, skiprows=1)
    if array.size == 0:
        raise PPVAEError(
            f"{path} holds no data rows; expected one data point per line of comma-separated "
            "numbers (after an optional header line)"
        )
    return array


def _read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PPVAEError(f"data file {path} {what}; pass a .npy, .npz or .csv file")
    suffix = path.suffix.lower()
    _check_magic(path, suffix)
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if "x" in archive:
                    return archive["x"], archive["y"] if "y" in archive else None
                if len(keys) == 1:
                    return archive[keys[0]], None
            raise PPVAEError(
                f"{path} holds arrays {keys}; name the inputs 'x' (and optional labels 'y')"
            )
        if suffix == ".csv":
            return _read_csv(path), None
    except PPVAEError:
        raise
    except (ValueError, OSError) as error:
        raise PPVAEError(f"could not read {path}: {str(error).splitlines()[0]}") from None
    raise PPVAEError(f"unsupported data file {path}; use one of {', '.join(ARRAY_SUFFIXES)}")


_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK\x03\x04"}


def _check_magic(path: Path, suffix: str) -> None:
    """A ``.npy`` or ``.npz`` file whose content is not of its kind: a one-line error that says
    what it is instead."""
    if suffix not in _MAGIC:
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise PPVAEError(f"could not read {path}: {error.strerror}") from None
    if head.startswith(_MAGIC[suffix]):
        return
    for other, magic in _MAGIC.items():
        if head.startswith(magic):
            raise PPVAEError(f"{path} holds a {other} file under a {suffix} name; rename it")
    writer = "numpy.save" if suffix == ".npy" else "numpy.savez"
    raise PPVAEError(
        f"{path} is not a NumPy {suffix} file (it starts with {head!r}); write it with {writer}"
    )


def _check_labels(y: np.ndarray | None, n: int, source: str) -> torch.Tensor | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise PPVAEError(
            f"{source}: labels 'y' must be non-negative integers of shape [{n}], "
            f"got {y.dtype} {tuple(y.shape)}"
        )
    return torch.as_tensor(y, dtype=torch.long)


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).reshape(len(bunch.images), -1)
    return x, torch.as_tensor(bunch.target, dtype=torch.long), (1, 8, 8)


def _load_torchvision(name: str, root: Path, download: bool):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[
        name
    ]
    parts = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError:
            raise PPVAEError(
                f"{name} not found under {root / cls.__name__ / 'raw'}; point --data-dir "
                f"(or ${DATA_ENV}) at the folder that holds {cls.__name__}/raw, "
                "or add --download when online"
            ) from None
        except OSError as error:  # download attempted but the network is unreachable
            raise PPVAEError(
                f"could not download {name} ({error}); copy the files to "
                f"{root / cls.__name__ / 'raw'} and pass --data-dir {root}"
            ) from None
        x = ds.data.to(torch.float32).reshape(len(ds.data), -1) / 255.0
        parts.append((x, ds.targets.to(torch.long)))
    return parts, (1, 28, 28)


def _split_off(x, y, fraction: float, generator: torch.Generator):
    n = x.shape[0]
    n_off = int(round(fraction * n))
    if not 0 < n_off < n:
        raise PPVAEError(f"a split fraction of {fraction} leaves an empty split of {n} points")
    order = torch.randperm(n, generator=generator)
    keep, off = order[n_off:], order[:n_off]
    pick = lambda t, idx: None if t is None else t[idx]
    return (x[keep], pick(y, keep)), (x[off], pick(y, off))


def load_data(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    binarize: str = "dynamic",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> DataSplits:
    """Load a built-in data set (``digits``, ``mnist``, ``fashion-mnist``) or a user array file.

    ``test_fraction`` applies to sources without an official test split (digits, user arrays);
    the validation split is always taken from the training set with a seeded permutation.
    ``limit`` keeps the first ``limit`` training points (quick experiments).
    """
    if binarize not in BINARIZATIONS:
        raise PPVAEError(
            f"unknown binarisation {binarize!r}; use one of {', '.join(BINARIZATIONS)}"
        )
    generator = torch.Generator().manual_seed(seed)
    if name == "digits":
        x, y, image_shape = _load_digits()
        (train_x, train_y), (test_x, test_y) = _split_off(x, y, test_fraction, generator)
    elif name in ("mnist", "fashion-mnist"):
        parts, image_shape = _load_torchvision(name, resolve_data_dir(data_dir), download)
        (train_x, train_y), (test_x, test_y) = parts
    elif Path(name).suffix.lower() in ARRAY_SUFFIXES or Path(name).exists():
        path = Path(name)
        array, labels = _read_array(path)
        x, image_shape = _flatten_inputs(array, str(path))
        y = _check_labels(labels, x.shape[0], str(path))
        (train_x, train_y), (test_x, test_y) = _split_off(x, y, test_fraction, generator)
    else:
        raise PPVAEError(
            f"unknown data set {name!r}; use one of {', '.join(BUILTIN_DATASETS)} "
            f"or a path to a {'/'.join(ARRAY_SUFFIXES)} file"
        )
    if limit is not None:
        train_x = train_x[:limit]
        train_y = None if train_y is None else train_y[:limit]
    (train_x, train_y), (val_x, val_y) = _split_off(train_x, train_y, val_fraction, generator)

    if binarize != "none":
        check_unit_interval(torch.cat([train_x, val_x, test_x]), f"--binarize {binarize}")
        val_x = bernoulli_draw(val_x, _split_generator(seed, "val"))
        test_x = bernoulli_draw(test_x, _split_generator(seed, "test"))
        if binarize == "static":
            train_x = bernoulli_draw(train_x, _split_generator(seed, "train"))
    return DataSplits(
        name=Path(name).name if name not in BUILTIN_DATASETS else name,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_y,
        image_shape=image_shape,
        binarize=binarize,
        seed=seed,
    )
