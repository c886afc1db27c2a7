"""ppvae: latent-variable models as Pyro programs, trained with SVI and evaluated honestly."""

from ppvae.errors import ContractError, DivergenceError, PPVAEError

__version__ = "0.1.0"

__all__ = [
    "ContractError",
    "DivergenceError",
    "PPVAEError",
    "Run",
    "RunConfig",
    "__version__",
    "load_run",
]


def __getattr__(name: str):
    """``ppvae.Run``, ``ppvae.RunConfig`` and ``ppvae.load_run``, imported on first use so that
    ``import ppvae`` (and ``ppvae --version``) stays light."""
    if name in ("Run", "RunConfig", "load_run"):
        from ppvae import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'ppvae' has no attribute {name!r}")
