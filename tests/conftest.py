import os
import warnings
from pathlib import Path

import pyro
import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")

REPO = Path(__file__).resolve().parents[1]


def mnist_root() -> Path | None:
    """MNIST's data root from $PPVAE_DATA, or the shared folder beside the checkout."""
    for candidate in (os.environ.get("PPVAE_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
            return Path(candidate)
    return None


requires_mnist = pytest.mark.skipif(
    mnist_root() is None,
    reason="MNIST idx files not found under $PPVAE_DATA/MNIST/raw (set PPVAE_DATA to a data root)",
)
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def digits():
    from ppvae.data import load_data

    return load_data("digits", seed=0)
