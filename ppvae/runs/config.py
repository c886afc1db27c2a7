"""A run's configuration: one typed record, validated in one place, stored as ``config.json``.

:class:`RunConfig` holds what a run needs to be reproduced: the model and the options its
constructor takes (``model_options``, with the constructor's defaults filled in, so a saved run
does not change when a default does), the data source and its split, the training schedule and
the objective. Every value is checked on construction with the same one-line messages the command
line gives (``--lr: expected a finite number > 0, got -1.0``): the CLI's argument types and the
dataclass share the :class:`Check` objects below.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ppvae.errors import PPVAEError

RUN_FORMAT = "ppvae-run-1"


def flag(name: str) -> str:
    """The command-line spelling of a configuration key: ``latent_dim`` -> ``--latent-dim``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Check:
    """A numeric option: parsed from text with ``kind`` and accepted when ``accept(value)``
    (NaN fails every comparison, so it is refused too)."""

    kind: type
    accept: Callable[[Any], bool]
    wanted: str

    def parse(self, text: str) -> Any:
        """The value of ``text``; ``ValueError`` naming what was wanted when it is refused."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.accept(value):
            raise ValueError(f"expected {self.wanted}, got {text!r}")
        return value

    def validate(self, value: Any, name: str) -> Any:
        """``value`` (an int where a float is wanted becomes a float) or a one-line error."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool) or not self.accept(value):
            raise PPVAEError(f"{flag(name)}: expected {self.wanted}, got {value!r}")
        return value


@dataclass(frozen=True)
class Choice:
    """A value out of a fixed list (``choices`` of a command-line option)."""

    choices: tuple[str, ...]

    def validate(self, value: Any, name: str) -> Any:
        if value not in self.choices:
            raise PPVAEError(
                f"{flag(name)}: expected one of {', '.join(self.choices)}, got {value!r}"
            )
        return value


@dataclass(frozen=True)
class ListOf:
    """One or more values each accepted by ``item`` (``nargs='+'`` on the command line)."""

    item: Check

    def validate(self, value: Any, name: str) -> list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise PPVAEError(f"{flag(name)}: expected a list of {self.item.wanted}s, got {value!r}")
        return [self.item.validate(v, name) for v in value]


POSITIVE_INT = Check(int, lambda v: v >= 1, "a positive integer")
COUNT = Check(int, lambda v: v >= 0, "an integer >= 0")
SEED = Check(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
POSITIVE_FLOAT = Check(float, lambda v: 0 < v < math.inf, "a finite number > 0")
NONNEGATIVE_FLOAT = Check(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
FRACTION = Check(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
DECAY = Check(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise PPVAEError(f"{flag(name)}: expected a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise PPVAEError(f"{flag(name)}: expected true or false, got {value!r}")
    return value


def _optional(check: Check) -> Callable[[Any, str], Any]:
    return lambda value, name: None if value is None else check.validate(value, name)


def model_option_checks() -> dict[str, Check | Choice | ListOf]:
    """Every option a model of the zoo may take, with its check (the constructors' keywords)."""
    from ppvae.models.likelihoods import LIKELIHOODS
    from ppvae.nets import ACTIVATIONS

    return {
        "latent_dim": POSITIVE_INT,
        "hidden": ListOf(POSITIVE_INT),
        "activation": Choice(tuple(sorted(ACTIVATIONS))),
        "likelihood": Choice(tuple(LIKELIHOODS)),
        "net": Choice(("mlp", "conv")),
        "codebook_size": POSITIVE_INT,
        "commitment_beta": NONNEGATIVE_FLOAT,
        "ema_decay": DECAY,
        "num_positions": POSITIVE_INT,
        "dead_code_restart": COUNT,
        "latent_dim2": POSITIVE_INT,
        "hidden2": ListOf(POSITIVE_INT),
    }


MODEL_OPTIONS = (
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


def model_defaults(model: str) -> dict[str, Any]:
    """The options of ``MODELS[model]``'s constructor that are model options, with defaults."""
    from ppvae.models import MODELS

    parameters = inspect.signature(MODELS[model]).parameters
    defaults = {}
    for key in MODEL_OPTIONS:
        if key in parameters:
            default = parameters[key].default
            defaults[key] = list(default) if isinstance(default, tuple) else default
    return defaults


def _field_checks() -> dict[str, Callable[[Any, str], Any]]:
    from ppvae.data import BINARIZATIONS
    from ppvae.inference.objectives import OBJECTIVES
    from ppvae.models import MODELS

    return {
        "model": Choice(tuple(sorted(MODELS))).validate,
        "dataset": _text,
        "data_dir": _optional_text,
        "download": _boolean,
        "binarize": Choice(tuple(BINARIZATIONS)).validate,
        "val_fraction": FRACTION.validate,
        "test_fraction": FRACTION.validate,
        "limit": _optional(POSITIVE_INT),
        "epochs": POSITIVE_INT.validate,
        "batch_size": POSITIVE_INT.validate,
        "lr": POSITIVE_FLOAT.validate,
        "objective": Choice(tuple(OBJECTIVES)).validate,
        "num_particles": POSITIVE_INT.validate,
        "beta": NONNEGATIVE_FLOAT.validate,
        "kl_warmup": COUNT.validate,
        "free_bits": NONNEGATIVE_FLOAT.validate,
        "eval_samples": POSITIVE_INT.validate,
        "eval_points": _optional(POSITIVE_INT),
        "seed": SEED.validate,
        "device": _text,
    }


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is trained from; ``config.json`` is :meth:`to_dict`.

    ``model_options`` are the keyword arguments of the model's constructor other than the sizes
    read off the data (``input_dim``, ``image_shape``, ``num_classes``); options the model does
    not take are refused, the ones not given get the constructor's defaults.
    """

    model: str = "vae"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    binarize: str = "dynamic"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    limit: int | None = None
    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    objective: str = "elbo"
    num_particles: int = 1
    beta: float = 1.0
    kl_warmup: int = 0
    free_bits: float = 0.0
    eval_samples: int = 1000
    eval_points: int | None = 1000  # a seeded subset of the test split; None: all of it
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, check in _field_checks().items():
            object.__setattr__(self, name, check(getattr(self, name), name))
        if not isinstance(self.model_options, Mapping):
            raise PPVAEError(f"model_options: expected a mapping, got {self.model_options!r}")
        checks, options = model_option_checks(), model_defaults(self.model)
        refused = sorted(k for k in self.model_options if k not in options)
        if refused:
            flags = ", ".join(map(flag, refused))
            verb = "does" if len(refused) == 1 else "do"
            raise PPVAEError(
                f"{flags} {verb} not apply to --model {self.model}; drop it or pick another model"
            )
        for key, value in self.model_options.items():
            options[key] = checks[key].validate(value, key)
        object.__setattr__(self, "model_options", dict(sorted(options.items())))
        self.make_objective()  # refuses combinations the objective cannot train

    @classmethod
    def from_options(cls, **options: Any) -> RunConfig:
        """A configuration from flat options, as the command line gives them: model options
        (``latent_dim=2``) beside the run's fields (``epochs=3``). Training options not given
        take the model class's ``training_defaults`` where it has them (the HVAE's epochs, the
        linear-Gaussian model's learning rate), else the fields' defaults."""
        from ppvae.models import MODELS

        name = options.get("model", cls.model)
        model = MODELS.get(name) if isinstance(name, str) else None
        for key, value in getattr(model, "training_defaults", {}).items():
            options.setdefault(key, value)
        fields = {f.name for f in dataclasses.fields(cls)} - {"model_options"}
        model_options = {k: options.pop(k) for k in list(options) if k in MODEL_OPTIONS}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise PPVAEError(
                f"unknown option(s) {', '.join(unknown)}; use the fields of ppvae.RunConfig or "
                f"the model options {', '.join(MODEL_OPTIONS)}"
            )
        return cls(**options, model_options=model_options)

    def replace(self, **options: Any) -> RunConfig:
        """A copy with some flat options (run fields or model options) changed, validated."""
        return RunConfig.from_options(**{**self.flat(), **options})

    def flat(self) -> dict[str, Any]:
        """Run fields and model options in one mapping (the command line's view)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values.pop("model_options"), **values}

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps({"format": RUN_FORMAT, **values}))

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> RunConfig:
        """The configuration a ``config.json`` holds; a one-line error naming ``source`` and the
        field when it is not one. Files written before ``model_options`` existed (all model
        options at the top level, unset ones ``null``) are read too."""
        if not isinstance(data, Mapping):
            raise PPVAEError(
                f"{source} holds {type(data).__name__}, not a run configuration (a JSON object); "
                "restore it or train a new run"
            )
        data = dict(data)
        version = data.pop("format", RUN_FORMAT)
        if version != RUN_FORMAT:
            raise PPVAEError(f"{source}: unknown format {version!r}; expected {RUN_FORMAT!r}")
        if "model_options" not in data:  # the first layout: flat, with the run directory
            data.pop("run_dir", None)
            legacy = {k: data.pop(k) for k in MODEL_OPTIONS if k in data}
            data["model_options"] = {k: v for k, v in legacy.items() if v is not None}
        data.setdefault("eval_points", None)  # runs from before --eval-points: the whole split
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - fields), sorted(fields - set(data))
        if unknown or missing:
            what = "; ".join(
                part
                for part in (
                    f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else "",
                    f"missing key(s) {', '.join(missing)}" if missing else "",
                )
                if part
            )
            raise PPVAEError(f"{source}: {what}; restore the file written by ppvae train")
        try:
            return cls(**data)
        except PPVAEError as error:
            raise PPVAEError(f"{source}: {error}") from None

    def make_objective(self):
        """The training objective the configuration names (``--objective`` and its options)."""
        from ppvae.inference.objectives import make_objective

        return make_objective(
            self.objective,
            num_particles=self.num_particles,
            beta=self.beta,
            kl_warmup=self.kl_warmup,
            free_bits=self.free_bits,
        )

    def describe_objective(self) -> str:
        from ppvae.inference.objectives import reweights_kl

        text = f"--objective {self.objective}"
        reweighted = reweights_kl(self.beta, self.kl_warmup, self.free_bits)
        return text + (" and --beta/--kl-warmup/--free-bits" if reweighted else "")

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ppvae.data.load_data`."""
        keys = ("data_dir", "download", "binarize", "val_fraction", "test_fraction", "limit")
        return {"name": self.dataset, "seed": self.seed, **{k: getattr(self, k) for k in keys}}
