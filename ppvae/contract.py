"""Names shared by models and estimators: the model contract of DESIGN §1.

- Every site lives in ``pyro.plate(DATA_PLATE, len(x))``.
- Parameters are the module's own; :func:`register_module` (or ``pyro.module``) in model and guide
  makes them visible to Pyro's ``SVI``.
- Training-only loss terms that are not part of the density p(x, z) (VQ-VAE's codebook and
  commitment losses, regularisers) are added with :func:`auxiliary_loss`: ``Trace_ELBO`` and SVI
  see them, the likelihood bounds (ELBO, IWAE, log p(x)) leave them out. A plain ``pyro.factor``
  is treated as part of the density and stays in every bound.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn

DATA_PLATE = "data"
AUXILIARY_LOSS = "auxiliary_loss"


def auxiliary_loss(name: str, log_factor: torch.Tensor) -> None:
    """Add ``log_factor`` to the training objective only (as ``pyro.factor`` does), marked so the
    per-point likelihood estimators exclude it."""
    unit = dist.Unit(log_factor=log_factor, has_rsample=True)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True, AUXILIARY_LOSS: True})


class ModuleParameters(Messenger):
    """A region whose caller optimises the module's parameters itself (ppvae's training step).

    Inside it ``pyro.param`` is answered directly for the given unconstrained, identity-constrained
    parameters (the param store would look each one up and rebuild its constrained view on every
    call), and :func:`register_module` skips registration altogether.
    """

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.params = params

    def _pyro_param(self, msg) -> None:
        value = self.params.get(msg["name"])
        if value is not None and not msg["done"]:  # an inner handler (replay) may have answered
            msg["value"] = value
            msg["done"] = True


def register_module(name: str, module: nn.Module) -> nn.Module:
    """``pyro.module(name, module)``, skipped where it is pure overhead.

    Skipped only inside :class:`ModuleParameters` and only when nothing collects parameters with
    ``poutine.trace(param_only=True)`` (as DReG's parameter split and JIT do).
    Everywhere else — Pyro's ``SVI``, ``Trace_ELBO.loss_and_grads``, evaluation — it is exactly
    ``pyro.module``. Models users write may call ``pyro.module``: they get the same results and
    pay for one ``pyro.param`` call per parameter per step.
    """
    inside = False
    for messenger in _PYRO_STACK:
        if isinstance(messenger, TraceMessenger) and messenger.param_only:
            return pyro.module(name, module)
        inside = inside or isinstance(messenger, ModuleParameters)
    return module if inside else pyro.module(name, module)
