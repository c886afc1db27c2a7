"""Figures that tell the truth: panels, layouts and the numbers behind them (ppvae.plots)."""

import math

import matplotlib
import pytest
import torch

from ppvae.inference import EvaluationReport, evaluate
from ppvae.models import AE, CVAE, VAE, VQVAE
from ppvae.plots.curves import best_epoch, training_curves_figure
from ppvae.plots.evaluation import plot_report
from ppvae.plots.latent import (
    interpolation_figure,
    latent_map_figure,
    latent_projection,
    manifold_figure,
    manifold_grid,
    write_latent_figures,
)
from ppvae.plots.samples import prior_samples_layout

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def test_split(digits):
    x, y = digits.split("test")
    return x[:120], y[:120]


def image_of(ax):
    return ax.get_images()[0].get_array()


# --- latent maps and manifolds --------------------------------------------------------------------


def test_latent_map_of_an_8d_latent_is_the_pca_projection_of_the_guide_means(test_split):
    x, y = test_split
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=8).eval()
    fig = latent_map_figure(vae, x, y)
    scatter_ax, colourbar_ax = fig.axes  # the map and its label colour bar
    assert "2 principal directions" in scatter_ax.get_title()
    with torch.no_grad():
        means = vae.encode(x)[0].double()
    centred = means - means.mean(0)
    points = torch.as_tensor(scatter_ax.collections[0].get_offsets().data)
    # the projection keeps the variance of the top two singular values
    singular = torch.linalg.svdvals(centred)
    assert float(points.pow(2).sum()) == pytest.approx(float(singular[:2].pow(2).sum()), rel=1e-5)
    assert torch.allclose(points.pow(2).sum(0), singular[:2].pow(2), rtol=1e-5)
    assert colourbar_ax.get_ylabel() == "label"


def test_latent_map_of_a_2d_latent_is_exact(test_split):
    x, _ = test_split
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=2).eval()
    fig = latent_map_figure(vae, x)
    (ax,) = fig.axes  # no labels, no colour bar
    assert ax.get_xlabel() == "$z_1$"
    with torch.no_grad():
        means = vae.encode(x)[0]
    assert torch.allclose(torch.as_tensor(ax.collections[0].get_offsets().data).float(), means)


def rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_principal_direction_manifold_of_a_2d_latent_equals_the_exact_one_up_to_rotation():
    # codes with an exactly diagonal sample covariance (stds 3 and 1) around a mean off zero
    noise = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, _, _ = torch.linalg.svd(noise - noise.mean(0), full_matrices=False)
    codes = u * torch.tensor([3.0, 1.0], dtype=torch.float64) * math.sqrt(499) + 0.5
    weights = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def decoder(z):
        return torch.sigmoid(torch.tanh(z) @ weights)

    spin = rotation(0.7)
    rotated = codes @ spin.T  # the same latent space, rotated: decoder(z' R) = decoder(z)

    def rotated_decoder(z):
        return decoder(z @ spin)

    exact = latent_projection(codes)
    pca = latent_projection(rotated, method="pca")
    assert exact.exact and not pca.exact
    assert pca.explained == pytest.approx(1.0)
    # the map: a rigid motion of the exact one (pairwise distances equal)
    assert torch.allclose(
        torch.cdist(exact.project(codes), exact.project(codes)),
        torch.cdist(pca.project(rotated), pca.project(rotated)),
        atol=1e-6,
    )
    # the manifold: the exact grid's images, up to the direction of each axis
    _, exact_images = manifold_grid(decoder, exact, steps=7)
    _, pca_images = manifold_grid(rotated_decoder, pca, steps=7)
    flips = [exact_images, exact_images.flip(0), exact_images.flip(1), exact_images.flip(0, 1)]
    assert any(torch.allclose(pca_images, flipped, atol=1e-6) for flipped in flips)
    # and the principal directions are the rotated axes
    assert torch.allclose(pca.directions.abs(), spin.T.abs(), atol=1e-9)


def test_manifold_panel_is_a_steps_by_steps_grid_of_decoded_images(test_split):
    x, _ = test_split
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=5).eval()
    fig = manifold_figure(vae, x, (1, 8, 8), steps=6)
    (ax,) = fig.axes
    assert image_of(ax).shape == (6 * 9, 6 * 9)  # 8×8 images and a 1-pixel gap
    assert "2 principal directions" in ax.get_title()


def test_conditional_manifold_is_decoded_with_one_label(test_split):
    x, y = test_split
    torch.manual_seed(0)
    cvae = CVAE(64, num_classes=10, latent_dim=3).eval()
    fig = manifold_figure(cvae, x, (1, 8, 8), y, label=4, steps=5)
    assert fig.axes[0].get_title().endswith("label 4")


def test_interpolation_rows_start_and_end_at_the_inputs(test_split):
    x, _ = test_split
    torch.manual_seed(0)
    ae = AE(64, latent_dim=4).eval()
    fig = interpolation_figure(ae, x, (1, 8, 8), num_pairs=3, steps=5, method="spherical")
    (ax,) = fig.axes
    image = torch.as_tensor(image_of(ax))
    assert image.shape == (3 * 9, 7 * 9)
    from ppvae.inference.regularity import random_pairs

    first, second = random_pairs(len(x), 3, 0)
    assert torch.allclose(image[:8, :8], x[first[0]].reshape(8, 8))
    assert torch.allclose(image[:8, 6 * 9 : 6 * 9 + 8], x[second[0]].reshape(8, 8))
    assert ax.get_title().startswith("spherical interpolation")


def test_latent_figures_of_a_run_and_why_some_are_left_out(test_split, tmp_path):
    x, y = test_split
    torch.manual_seed(0)
    written, skipped = write_latent_figures(VAE(64, latent_dim=3).eval(), x, y, (1, 8, 8), tmp_path)
    assert [p.name for p in written] == ["latent_map.png", "manifold_grid.png", "interpolation.png"]
    assert skipped == [] and all(p.stat().st_size > 0 for p in written)
    written, skipped = write_latent_figures(VQVAE(64).eval(), x, y, (1, 8, 8), tmp_path / "vq")
    assert written == [] and "discrete" in skipped[0]
    written, skipped = write_latent_figures(VAE(64).eval(), x, y, None, tmp_path)
    assert [p.name for p in written] == ["latent_map.png"] and "not images" in skipped[0]


# --- per-model report figures ---------------------------------------------------------------------


def test_report_figures_exist_only_for_numbers_the_report_has(test_split, tmp_path):
    x, _ = test_split
    torch.manual_seed(0)
    small = x[:20]
    vae_report = evaluate(VAE(64).eval(), small, num_samples=10, progress=False)
    names = [p.name for p in plot_report(vae_report, tmp_path / "vae")]
    assert names == ["bound_ladder.png", "gap_hist.png"]  # K = 10: k̂ is not estimated
    vae_report = evaluate(VAE(64).eval(), small, num_samples=30, progress=False)
    assert len(plot_report(vae_report, tmp_path / "vae30")) == 3
    vq_report = evaluate(VQVAE(64).eval(), small, num_samples=30, progress=False)
    assert vq_report.point_mass_sites == ["code"]
    assert plot_report(vq_report, tmp_path / "vq") == []  # one-hot guide: no ladder, gap or k̂
    ae_report = EvaluationReport(20, 0, likelihood_available=False, point_mass_sites=["z"])
    assert plot_report(ae_report.to_dict(), tmp_path / "ae") == []  # no bound at all


def test_prior_sample_titles_match_the_grid():
    cycling = torch.arange(64) % 10
    assert prior_samples_layout(cycling) == (
        10,
        "samples from the prior: column c has label c (0–9)",
    )
    assert prior_samples_layout(torch.full((64,), 3)) == (8, "samples from the prior, label 3")
    assert prior_samples_layout(None) == (8, "samples from the prior")
    assert "as given" in prior_samples_layout(torch.tensor([2, 0, 1]))[1]


# --- training curves ------------------------------------------------------------------------------


def history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 40.0 / e,
            "val_elbo": -30.0 - (e - 3) ** 2 / 10,  # best at epoch 3
            "kl": 1.0 + e,
            "active_units": min(e, 6),
            "latent_units": 8,
            "kl_weight": min(1.0, e / 4),
        }
        for e in range(1, epochs + 1)
    ]


def test_training_curves_mark_the_best_epoch_and_draw_kl_and_active_units():
    records = history(6)
    assert best_epoch(records) == (3, "val_elbo", -30.0)
    fig = training_curves_figure(records, title="vae on digits")
    main, collapse = fig.axes[:2]
    assert len(fig.axes) == 4  # the two panels, the KL-weight and active-unit axes
    assert fig._suptitle.get_text() == "vae on digits (6 epochs)"  # noqa: SLF001
    star = [line for line in main.get_lines() if line.get_marker() == "*"][0]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (3, -30.0)
    labels = [text.get_text() for text in collapse.get_legend().get_texts()]
    assert labels == ["KL(q(z|x) || p(z))", "KL weight", "active units (of 8)"]


def test_a_one_epoch_run_is_readable():
    fig = training_curves_figure(history(1))
    main = fig.axes[0]
    lines = [line for line in main.get_lines() if len(line.get_xdata()) == 1]
    assert all(line.get_marker() in ("o", "*") for line in lines) and len(lines) >= 3
    assert main.get_xlim() == (0.0, 2.0)
    assert "(1 epoch)" in fig._suptitle.get_text()  # noqa: SLF001


def test_curves_without_validation_or_collapse_records_have_one_panel():
    records = [{"epoch": e, "train_loss": 10.0 - e} for e in (1, 2)]
    fig = training_curves_figure(records)
    assert len(fig.axes) == 1 and best_epoch(records) is None
    ae_records = [{"epoch": e, "train_loss": 5.0, "val_loss": 5.0 - e % 2} for e in (1, 2, 3)]
    assert best_epoch(ae_records) == (1, "val_loss", 4.0)
