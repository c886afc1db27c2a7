"""A Pyro program as ppvae sees it: the data it takes, its data plate, and how it runs particles.

ppvae adapts to the program, never the program to ppvae (DESIGN §1):

- **Arguments pass through.** :class:`ProgramData` holds the positional and keyword arguments a
  program is called with (``model(x)``, ``model(x, y)``, ``model(docs=...)``); every tensor whose
  first dimension is the number of data points is sliced, moved and replicated with the points.
- **The data plate is found**: the outermost plate that encloses every observed site with one
  entry per data point, under any name, sized or unsized. ``data_plate=`` overrides it.
- **Particles**: vectorised in a plate left of the program's plates when the program broadcasts
  over extra leading dimensions; otherwise (mask indexing, ``reshape(-1, D)``,
  ``softmax(dim=1)``, ``BatchNorm1d``, ``torch.cat(..., dim=1)``) the data are replicated K times
  along the data plate and the log-weights reshaped to ``[K, N]``. The choice is made once per
  program by running both on the same latent draws and comparing log-weights, then cached.
- **Sites**: ``pyro.deterministic`` sites are neither latents nor observations; training-only
  factors (:func:`ppvae.contract.auxiliary_loss`) are left out of the densities; latent sites the
  model enumerates (``infer={"enumerate": "parallel"}``) need no guide site.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import nn

from ppvae.contract import AUXILIARY_LOSS
from ppvae.errors import ContractError, PPVAEError

PARTICLE_PLATE = "_ppvae_particles"
VECTORISED, REPLICATED = "vectorised", "replicated"
# points and particles of the probe that picks the particle path (K != N on purpose)
_PROBE_POINTS, _PROBE_PARTICLES = 3, 2


@dataclass(frozen=True)
class ProgramData:
    """The arguments of one call of a model/guide: ``fn(*args, **kwargs)``.

    Every tensor argument whose first dimension equals :attr:`num_points` (the first dimension of
    the first tensor) is per-point data; other arguments pass through unchanged.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, x, y=None) -> ProgramData:
        """``x``: a tensor (one positional argument), a tuple/list (positional arguments), a dict
        (keyword arguments) or a ``ProgramData``; ``y``, when given, is one more positional
        argument."""
        if isinstance(x, ProgramData):
            data = x
        elif isinstance(x, torch.Tensor):
            data = cls((x,))
        elif isinstance(x, (tuple, list)):
            args = tuple(x)
            while args and args[-1] is None:  # (x, None): the program's default is used
                args = args[:-1]
            data = cls(args)
        elif isinstance(x, dict):
            data = cls((), dict(x))
        else:
            raise PPVAEError(
                f"data must be a tensor, a tuple of tensors (positional arguments) or a dict of "
                f"tensors (keyword arguments), got {type(x).__name__}"
            )
        if y is not None:
            data = cls(data.args + (y,), data.kwargs)
        if data.first is None:
            raise PPVAEError("the data hold no tensor; pass the data points as a tensor [N, ...]")
        if data.first.dim() == 0 or data.first.shape[0] == 0:
            raise PPVAEError(
                f"the data must hold at least one point along dimension 0, got a tensor of shape "
                f"{tuple(data.first.shape)}"
            )
        return data

    def _values(self) -> Iterator:
        yield from self.args
        yield from self.kwargs.values()

    @property
    def first(self) -> torch.Tensor | None:
        """The first tensor argument (``x`` for ``model(x, y=None)``)."""
        return next((v for v in self._values() if isinstance(v, torch.Tensor)), None)

    @property
    def num_points(self) -> int:
        return self.first.shape[0]

    @property
    def device(self) -> torch.device:
        return self.first.device

    def is_per_point(self, value) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.dim() > 0
            and value.shape[0] == self.num_points
        )

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ProgramData:
        """Apply ``fn`` to every per-point tensor."""
        convert = lambda v: fn(v) if self.is_per_point(v) else v
        return ProgramData(
            tuple(convert(v) for v in self.args), {k: convert(v) for k, v in self.kwargs.items()}
        )

    def select(self, index) -> ProgramData:
        """The points ``index`` (a slice or an index tensor)."""
        return self.map(lambda v: v[index])

    def to(self, device: torch.device | str) -> ProgramData:
        convert = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        return ProgramData(
            tuple(convert(v) for v in self.args), {k: convert(v) for k, v in self.kwargs.items()}
        )

    def tile(self, times: int) -> ProgramData:
        """Every point repeated ``times`` times, block by block: row ``k * N + n`` is point n."""
        return self.map(lambda v: v.repeat((times,) + (1,) * (v.dim() - 1)))

    def per_point_tensors(self) -> list[torch.Tensor]:
        return [v for v in self._values() if self.is_per_point(v)]

    def call(self, fn: Callable):
        return fn(*self.args, **self.kwargs)

    def describe(self) -> str:
        def one(v) -> str:
            if isinstance(v, torch.Tensor):
                return f"tensor{list(v.shape)}"
            return "None" if v is None else type(v).__name__

        parts = [one(v) for v in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def check_inputs(model: Callable, guide: Callable, data: ProgramData) -> None:
    """The data checked against the program on entry (estimators, ``PosteriorTarget``): the
    module's own ``check_data`` where it has one, else no NaN/inf in floating data; no complex
    data; a zoo model's ``[N, input_dim]`` layout (a single point keeps its batch dimension)."""
    for value in data.per_point_tensors():
        if value.is_complex():
            raise PPVAEError(
                f"the data are complex ({value.dtype}); pass real values (e.g. .real or .abs())"
            )
    owner = _owner(model, guide)
    input_dim = getattr(owner, "hparams", {}).get("input_dim") if owner is not None else None
    x = data.first
    if isinstance(input_dim, int) and x.is_floating_point():
        if x.dim() == 1 and x.shape[0] == input_dim:
            raise PPVAEError(
                f"x has shape {list(x.shape)}: one point of a model of {input_dim} inputs; keep "
                "its batch dimension (x[:1] or x.unsqueeze(0)) so it is one point, not "
                f"{input_dim} points"
            )
        if x.dim() != 2 or x.shape[1] != input_dim:
            raise PPVAEError(
                f"x has shape {list(x.shape)} but this model takes [N, {input_dim}] (N points of "
                f"{input_dim} values); flatten or select the features it was built for"
            )
    check = getattr(owner, "check_data", None)
    if callable(check):
        check(x)
        return
    for value in data.per_point_tensors():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PPVAEError("the data contain NaN/inf values; remove or impute them first")


def _signature_text(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__)
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return name


def check_signature(fn: Callable, data: ProgramData, role: str) -> None:
    """A one-line ``ContractError`` when ``fn`` cannot be called with ``data``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*data.args, **data.kwargs)
    except TypeError as error:
        raise ContractError(
            f"the {role} {_signature_text(fn)} cannot take the data passed {data.describe()} "
            f"({error}); pass the data as the {role} takes it: a tensor for one argument, a tuple "
            "for several positional arguments, a dict for keyword arguments"
        ) from None


# --- sites --------------------------------------------------------------------------------------


def is_deterministic(site) -> bool:
    return bool(site["infer"].get("_deterministic"))


def density_sites(trace) -> Iterator[tuple[str, dict]]:
    """Sample sites that are part of the density: not subsample, deterministic or auxiliary."""
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and not site_is_subsample(site)
            and not is_deterministic(site)
            and not site["infer"].get(AUXILIARY_LOSS)
        ):
            yield name, site


def is_enumerated(site) -> bool:
    return site["infer"].get("enumerate") == "parallel"


def latent_names(model_trace, guide_trace) -> tuple[set[str], set[str], set[str]]:
    """(model latents, guide latents, model latents the model enumerates itself)."""
    model = {n for n, s in density_sites(model_trace) if not s["is_observed"]}
    guide = {n for n, s in density_sites(guide_trace) if not s["is_observed"]}
    enumerated = {
        n
        for n, s in density_sites(model_trace)
        if not s["is_observed"] and n not in guide and is_enumerated(s)
    }
    return model, guide, enumerated


def check_latents_match(model_trace, guide_trace) -> None:
    """The guide samples every model latent that the model does not enumerate, and no other."""
    model, guide, enumerated = latent_names(model_trace, guide_trace)
    missing = sorted(model - guide - enumerated)
    if missing:
        raise ContractError(
            f"the model samples latent site(s) {missing} that the guide does not; the guide must "
            "sample every latent site of the model (a site observed only when its data are given, "
            "such as y=None, is a latent then), or mark it infer={'enumerate': 'parallel'} in the "
            "model to sum it out"
        )
    extra = sorted(guide - model)
    if extra:
        raise ContractError(
            f"the guide samples site(s) {extra} that the model does not have; give the guide's "
            "sites the names of the model's latent sites"
        )


def observed_names(model_trace) -> list[str]:
    return [n for n, s in density_sites(model_trace) if s["is_observed"]]


def _actual_size(site, frame) -> int:
    if frame.size is not None and frame.size >= 0:
        return frame.size
    batch_shape = site["fn"].batch_shape
    return batch_shape[frame.dim] if len(batch_shape) >= -frame.dim else 1


def find_data_plate(model_trace, num_points: int, override: str | None = None) -> str:
    """The outermost vectorised plate enclosing every observed site with ``num_points`` entries."""
    observed = [s for _, s in density_sites(model_trace) if s["is_observed"]]
    if not observed:
        raise ContractError("the model observes no site; pass the data as obs=... inside the model")
    if override is not None:
        for site in observed:
            if not any(f.name == override for f in site["cond_indep_stack"]):
                raise ContractError(
                    f"observed site {site['name']!r} is outside the plate {override!r} given as "
                    "data_plate; every observed site must sit inside the data plate"
                )
        return override
    common = None
    for site in observed:
        names = [
            f.name
            for f in site["cond_indep_stack"]
            if f.vectorized and _actual_size(site, f) == num_points
        ]
        common = names if common is None else [n for n in common if n in names]
    if not common:
        raise ContractError(
            f"no plate encloses every observed site "
            f"({', '.join(repr(s['name']) for s in observed)}) with one entry per data point "
            f"({num_points}); put the observations inside "
            "pyro.plate('data', len(x)) (any name, sized or not) or pass data_plate="
        )
    return common[0]  # cond_indep_stack lists the outermost plate first


def plate_nesting(*traces) -> int:
    nesting = 0
    for trace in traces:
        for _, site in density_sites(trace):
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
    return nesting


def has_enumeration(*traces) -> bool:
    return any(is_enumerated(s) for t in traces for _, s in density_sites(t))


# --- running a program --------------------------------------------------------------------------


def _owner(model: Callable, guide: Callable):
    owner = getattr(model, "__self__", None)
    return owner if getattr(guide, "__self__", None) is owner else None


@contextmanager
def preserved_buffers(*modules) -> Iterator[None]:
    """Buffers (BatchNorm running statistics) restored on exit: probes leave no trace."""
    saved = [
        (buffer, buffer.detach().clone())
        for module in modules
        if isinstance(module, nn.Module)
        for buffer in module.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _run(fn: Callable, data: ProgramData, role: str):
    """``fn(*args, **kwargs)`` with a program's own errors turned into one line."""
    try:
        return data.call(fn)
    except PPVAEError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError, KeyError, AssertionError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ContractError(
            f"the {role} {_signature_text(fn)} failed on data {data.describe()}: "
            f"{type(error).__name__}: {text}"
        ) from error


def trace_pair(
    model: Callable,
    guide: Callable,
    data: ProgramData,
    enum_dim: int | None = None,
    guide_values: dict | None = None,
):
    """Guide trace, then the model replayed on it (both enumerated from ``enum_dim`` when set;
    ``guide_values`` (``{name: value}``) replace the draws of the guide's latent sites)."""
    guide_fn = (
        guide if not guide_values else poutine.replay(guide, trace=values_trace(guide_values))
    )
    model_fn = model
    if enum_dim is not None:
        guide_fn = poutine.enum(guide_fn, first_available_dim=enum_dim)
    guide_trace = poutine.trace(guide_fn).get_trace(*data.args, **data.kwargs)
    if enum_dim is not None:
        model_fn = poutine.enum(model_fn)  # allocates after the guide's enumeration dims
    model_fn = poutine.trace(poutine.replay(model_fn, trace=guide_trace))
    model_trace = model_fn.get_trace(*data.args, **data.kwargs)
    return model_trace, guide_trace


def check_training_contract(model: Callable, guide: Callable, data: ProgramData) -> None:
    """What training needs, checked before the first step: both take the data, run on it, and
    the guide samples every latent the model does not enumerate. Global latents are fine here."""
    check_signature(model, data, "model")
    check_signature(guide, data, "guide")
    guide_trace = poutine.trace(lambda: _run(guide, data, "guide")).get_trace()
    replayed = poutine.replay(lambda: _run(model, data, "model"), trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace()
    check_latents_match(model_trace, guide_trace)


def values_trace(values: dict[str, torch.Tensor]) -> Trace:
    """A trace that ``poutine.replay`` reads latent ``values`` from."""
    trace = Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", name=name, is_observed=False, value=value, infer={})
    return trace


@dataclass(frozen=True)
class ProgramInfo:
    """What one probe of a model/guide pair found (cached per program and data layout)."""

    nesting: int  # the program's max_plate_nesting
    data_plate: str
    observed: tuple[str, ...]  # observed sites, i.e. what log p(...) is of
    latents: tuple[str, ...]  # latent sites the guide samples
    enumerated: bool  # some site is enumerated in parallel
    particles: str  # VECTORISED or REPLICATED
    particle_note: str = ""  # why replicated
    subsampled: str = ""  # where the data plate subsamples inside the program (training only)

    @property
    def particle_dim(self) -> int:
        return -(self.nesting + 1)

    @property
    def density_name(self) -> str:
        """``"log p(x)"``, or ``"log p(x, y)"`` when the model observes x and y."""
        return f"log p({', '.join(self.observed)})"


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout_key(data: ProgramData) -> tuple:
    def kind(v) -> str:
        if v is None:
            return "none"
        if isinstance(v, torch.Tensor):
            return f"point{v.dim()}" if data.is_per_point(v) else "tensor"
        return type(v).__name__

    return tuple(kind(v) for v in data.args) + tuple(
        (k, kind(v)) for k, v in sorted(data.kwargs.items())
    )


def program_info(
    model: Callable, guide: Callable, data: ProgramData, data_plate: str | None = None
) -> ProgramInfo:
    """Probe the pair once on a few points (forked RNG, buffers restored), cache the answer for
    bound methods of one module."""
    owner = _owner(model, guide)
    key = (
        getattr(model, "__func__", model),
        getattr(guide, "__func__", guide),
        _layout_key(data),
        data_plate,
        getattr(owner, "training", None),
    )
    cache = None
    if owner is not None:
        try:
            cache = _CACHE.setdefault(owner, {})
        except TypeError:
            cache = None
    if cache is not None and key in cache:
        return cache[key]
    info = _probe(model, guide, data, data_plate, owner)
    if cache is not None:
        cache[key] = info
    return info


def _probe(model, guide, data: ProgramData, data_plate, owner) -> ProgramInfo:
    check_signature(model, data, "model")
    check_signature(guide, data, "guide")
    probe = data.select(slice(0, _PROBE_POINTS))
    points = probe.num_points
    subsampled = ""
    with torch.no_grad(), forked_rng(data.device), preserved_buffers(owner):
        guide_trace = poutine.trace(lambda: _run(guide, probe, "guide")).get_trace()
        replayed = poutine.replay(lambda: _run(model, probe, "model"), trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace()
        check_latents_match(model_trace, guide_trace)
        plate = find_data_plate(model_trace, points, data_plate)
        for trace, role in ((model_trace, "model"), (guide_trace, "guide")):
            for name, site in density_sites(trace):
                frames = [f for f in site["cond_indep_stack"] if f.name == plate]
                if not frames:
                    kind = "observed" if site["is_observed"] else "latent"
                    raise ContractError(
                        f"{role} {kind} site {name!r} is outside the {plate!r} plate (a global "
                        f"latent or unplated site); per-point estimators need every site inside "
                        f"the plate over data points — or pass data_plate= to name yours"
                    )
                frame = frames[0]
                if frame.full_size is not None and frame.full_size != frame.size:
                    subsampled = f"{frame.size} of {frame.full_size} at site {name!r}"
        nesting = plate_nesting(model_trace, guide_trace)
        enumerated = has_enumeration(model_trace, guide_trace)
        info = ProgramInfo(
            nesting=nesting,
            data_plate=plate,
            observed=tuple(observed_names(model_trace)),
            latents=tuple(n for n, s in density_sites(guide_trace) if not s["is_observed"]),
            enumerated=enumerated,
            particles=VECTORISED,
            subsampled=subsampled,
        )
        particles, note = _choose_particles(model, guide, probe, info)
    return ProgramInfo(**{**info.__dict__, "particles": particles, "particle_note": note})


def forked_rng(where: torch.Tensor | torch.device):
    """torch's RNG forked for a block (the CPU's, and the CUDA device of ``where`` — a tensor or
    a device — when it has one): draws inside it do not shift the caller's random stream."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _choose_particles(model, guide, probe: ProgramData, info: ProgramInfo) -> tuple[str, str]:
    """Run the replicated path (which any batch program accepts) and the vectorised one on the
    same latent draws; vectorise only when the log-weights agree."""
    from ppvae.inference.importance import chunk_log_weights  # one implementation of the math

    num = _PROBE_PARTICLES
    replicated = ProgramInfo(**{**info.__dict__, "particles": REPLICATED})
    reference, values = chunk_log_weights(
        model, guide, probe, num, replicated, keep_values=True, point_masses_refused=False
    )
    try:
        vectorised_values = {
            name: _replicated_to_vectorised(value, site, info, num, probe.num_points)
            for name, (value, site) in values.items()
        }
        log_w, _ = chunk_log_weights(model, guide, probe, num, info, guide_values=vectorised_values)
    except Exception as error:  # noqa: BLE001 - any failure of the program means: replicate
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (
            REPLICATED,
            f"particles replicated along the data plate ({type(error).__name__}: {text[:120]})",
        )
    if log_w.shape != reference.shape or not torch.allclose(log_w, reference, rtol=1e-4, atol=1e-4):
        return REPLICATED, (
            "particles replicated along the data plate (the program computes different "
            "log-weights with a particle dimension: code that assumes [batch, features] tensors)"
        )
    return VECTORISED, ""


def _replicated_to_vectorised(value, site, info: ProgramInfo, num: int, points: int):
    """A latent value drawn with the data replicated ``[.., K*N, ..]`` -> the layout it has under
    the particle plate ``[K, .., N, ..]``."""
    event_dim = len(site["fn"].event_shape)
    data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == info.data_plate)
    batch_ndim = value.dim() - event_dim
    axis = batch_ndim + data_dim
    value = value.unflatten(axis, (num, points)).movedim(axis, 0)  # [K, batch.., N, .., event]
    missing = info.nesting - batch_ndim  # batch dims the value lacks on the left
    return value.reshape((num,) + (1,) * missing + tuple(value.shape[1:]))
