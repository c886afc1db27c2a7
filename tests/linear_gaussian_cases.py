"""Probabilistic PCA set-ups shared by the estimator tests: a ``LinearGaussian`` whose diagonal
guide is the exact posterior mean with its marginal scales multiplied by ``factor``."""

import torch

from ppvae.models.linear_gaussian import LinearGaussian


def make_model(
    latent_dim=2,
    guide_family="diagonal",
    factor=1.2,
    dtype=torch.float64,
    seed=0,
    cls=LinearGaussian,
):
    torch.manual_seed(seed)
    module = cls(5, latent_dim, noise_scale=0.5, guide_family=guide_family).to(dtype)
    with torch.no_grad():
        module.bias.copy_(torch.randn(5, dtype=dtype))
    set_guide(module, factor)
    return module


def set_guide(module: LinearGaussian, factor: float) -> None:
    """q(z|x) = N(posterior mean, (factor * posterior marginal sd)^2), diagonal."""
    with torch.no_grad():
        var = module.noise_scale**2
        eye = torch.eye(module.latent_dim, dtype=module.weight.dtype)
        cov = torch.linalg.inv(eye + module.weight.T @ module.weight / var)
        gain = cov @ module.weight.T / var  # [d, D]
        module.guide_weight.copy_(gain)
        module.guide_bias.copy_(-(gain @ module.bias))
        scale = factor * cov.diagonal().sqrt()
        module.guide_raw_scale.copy_(torch.log(torch.expm1(scale - 1e-5)))


def data(module, num_points, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return module.marginal().sample((num_points,))
