"""One stochastic variational inference step with a single fused optimizer.

``pyro.infer.SVI.step`` computes ``loss.loss_and_grads(model, guide, *args)`` then steps one torch
optimizer *per parameter* (``pyro.optim.PyroOptim``) and converts the loss to a Python float. On a
784-200-200-50 VAE at batch 20 those per-parameter optimizers are about a third of the step and the
float conversion is a host sync per step on a GPU. :class:`SVIStep` does the same update with
``loss.differentiable_loss`` (ppvae's objectives and Pyro's ``Trace_ELBO`` /
``TraceMeanField_ELBO`` / ``TraceEnum_ELBO`` have it; others fall back to ``loss_and_grads``),
one torch optimizer over all parameters (fused Adam where torch has it) built from the same
``PyroOptim`` description, and a loss kept on the device.

Parameters are the module's: a model that creates ``pyro.param`` sites outside the module is
refused with a clear error, because a checkpoint (``module.state_dict()``) would not hold them.
Every trainable parameter of the module is optimised, also one the program never exposes as a
``pyro.param`` site (a module without ``pyro.module``; a ``PyroParam`` read outside the
module's context), which plain ``SVI`` would leave untouched; DReG, which finds the guide's
parameters through those sites, refuses such a module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from torch import nn

from ppvae.contract import ModuleParameters
from ppvae.errors import ContractError
from ppvae.inference.importance import forked_rng

_FUSED_CAPABLE = (torch.optim.Adam, torch.optim.AdamW)


def _param_sites(module: nn.Module, x: torch.Tensor, y) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, unconstrained tensor, whether the constraint is the identity) of every
    ``pyro.param`` the model and guide touch on one batch."""
    with (
        torch.no_grad(),
        forked_rng(x),
        poutine.trace(param_only=True) as capture,
    ):
        guide_trace = poutine.trace(module.guide).get_trace(x, y)
        poutine.replay(module.model, trace=guide_trace)(x, y)
    return [
        (name, site["value"].unconstrained(), site["value"] is site["value"].unconstrained())
        for name, site in capture.trace.nodes.items()
        if site["type"] == "param"
    ]


@contextlib.contextmanager
def _validation_off() -> Iterator[None]:
    """Pyro's (and torch's) distribution checks off, both flags restored afterwards."""
    torch_flag = torch.distributions.Distribution._validate_args  # noqa: SLF001
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_flag)


class SVIStep:
    """``step(x, y)`` = one SVI update of ``module`` on a mini-batch; returns the detached loss."""

    def __init__(
        self,
        module: nn.Module,
        loss: pyro.infer.ELBO,
        optimizer: pyro.optim.PyroOptim,
        first_batch: tuple[torch.Tensor, torch.Tensor | None],
        *,
        validate_every_step: bool | None = None,
    ):
        self.module, self.loss = module, loss
        if validate_every_step is None:  # the zoo checks its data itself (check_data)
            validate_every_step = not callable(getattr(module, "check_data", None))
        self.validate_every_step = validate_every_step
        self._validated = False
        own = {id(p) for p in module.parameters()}
        sites = _param_sites(module, *first_batch)
        foreign = [name for name, p, _ in sites if id(p) not in own]
        if foreign:
            raise ContractError(
                f"pyro.param site(s) {foreign} are not parameters of the module, so checkpoints "
                "would not save them; make them nn.Parameter attributes of the module (and call "
                "pyro.module(name, self) in model and guide)"
            )
        seen = {id(p) for _, p, _ in sites}
        unseen = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
        if unseen and getattr(loss, "needs_param_sites", False):
            raise ContractError(
                f"{type(loss).__name__} finds the parameters it trains through pyro.param sites, "
                f"but module parameter(s) {unseen[:3]}{' ...' if len(unseen) > 3 else ''} are "
                "not registered; call pyro.module(name, self) in model and guide"
            )
        # identity-constrained module parameters: pyro.param returns the tensor itself
        self._module_params = ModuleParameters(
            {name: p for name, p, identity in sites if identity and p.requires_grad}
        )
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = self._build(optimizer, params)
        self.clip_args = optimizer.pt_clip_args if not callable(optimizer.pt_clip_args) else None
        self._differentiable = callable(getattr(loss, "differentiable_loss", None))

    @staticmethod
    def _build(spec: pyro.optim.PyroOptim, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        constructor = spec.pt_optim_constructor
        if callable(spec.pt_optim_args):
            # per-parameter arguments, looked up by param-store name as PyroOptim does
            groups = [{"params": [p], **spec._get_optim_args(p)} for p in params]  # noqa: SLF001
            return constructor(groups)
        kwargs = dict(spec.pt_optim_args)
        if (
            constructor in _FUSED_CAPABLE
            and "fused" not in kwargs
            and "foreach" not in kwargs
            and all(p.dtype in (torch.float32, torch.float64) for p in params)
            and len({p.device for p in params}) == 1
        ):
            kwargs["fused"] = True
        return constructor(params, **kwargs)

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """One update. With ``validate_every_step=False`` Pyro's argument and support checks run
        on the first step only (they cost about a fifth of a small step); the default (None) does
        that for modules with a ``check_data`` method, whose data ``fit`` checks batch by batch,
        and keeps the checks on every step for other models. A NaN that appears later still
        surfaces as a non-finite loss."""
        if self._validated and not self.validate_every_step:
            with _validation_off():
                return self._step(x, y)
        value = self._step(x, y)
        self._validated = True
        return value

    def _step(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self._differentiable:
            with self._module_params:
                loss = self.loss.differentiable_loss(self.module.model, self.module.guide, x, y)
            if loss.requires_grad:
                loss.backward()
            value = loss.detach()
        else:
            value = torch.as_tensor(
                self.loss.loss_and_grads(self.module.model, self.module.guide, x, y)
            )
        if self.clip_args:
            if "clip_norm" in self.clip_args:
                nn.utils.clip_grad_norm_(self.params, self.clip_args["clip_norm"])
            if "clip_value" in self.clip_args:
                nn.utils.clip_grad_value_(self.params, self.clip_args["clip_value"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
