import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, mnist_root, requires_mnist

from ppvae.data import DynamicBinarization, load_data
from ppvae.errors import PPVAEError


def test_digits_splits_are_seeded_and_disjoint(digits):
    assert digits.image_shape == (1, 8, 8) and digits.input_dim == 64
    sizes = (len(digits.train_x), len(digits.val_x), len(digits.test_x))
    assert sum(sizes) == 1797
    assert sizes[2] == round(0.2 * 1797)
    assert digits.num_classes == 10
    # grey values kept for the dynamically binarised train set, held-out splits drawn once
    assert 0 < digits.train_x.mean() < 1 and ((digits.train_x > 0) & (digits.train_x < 1)).any()
    for x in (digits.val_x, digits.test_x):
        assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    again = load_data("digits", seed=0)
    assert torch.equal(again.test_x, digits.test_x) and torch.equal(again.val_y, digits.val_y)
    other = load_data("digits", seed=1)
    assert not torch.equal(other.test_y, digits.test_y)


def test_dynamic_binarisation_redraws_each_epoch_reproducibly(digits):
    train = digits.train
    assert isinstance(train, DynamicBinarization)
    x1, _ = train.epoch(1)
    x1_again, _ = train.epoch(1)
    x2, _ = train.epoch(2)
    assert torch.equal(x1, x1_again)
    assert not torch.equal(x1, x2)
    # each pixel is a Bernoulli draw with the grey value as probability
    draws = torch.stack([train.epoch(e)[0] for e in range(1, 41)]).mean(0)
    assert torch.allclose(draws.mean(0), digits.train_x.mean(0), atol=0.03)


def test_static_binarisation_is_fixed():
    data = load_data("digits", binarize="static", seed=3)
    x, y = data.train  # an (x, y) pair of fixed tensors, not redrawn per epoch
    assert torch.equal(x, data.train_x) and torch.equal(y, data.train_y)
    assert set(torch.unique(data.train_x).tolist()) == {0.0, 1.0}


def test_user_arrays_npy_npz_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    np.savetxt(tmp_path / "c.csv", x, delimiter=",", header="f0,f1,f2,f3,f4,f5", comments="")
    for name in ("a.npy", "b.npz", "c.csv"):
        data = load_data(str(tmp_path / name), binarize="none", seed=0)
        assert data.input_dim == 6 and data.image_shape is None
        total = torch.cat([data.train_x, data.val_x, data.test_x])
        assert total.shape == (50, 6)
        assert torch.allclose(total.sum(0), torch.as_tensor(x).sum(0), atol=1e-4)
    assert load_data(str(tmp_path / "b.npz"), binarize="none").num_classes == 3
    images = rng.random((40, 4, 4))
    np.save(tmp_path / "img.npy", images)
    assert load_data(str(tmp_path / "img.npy"), binarize="none").image_shape == (1, 4, 4)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[0.1, np.nan], [0.2, 0.3], [0.0, 1.0]]), "NaN/inf"),
        (np.array([[0.1, np.inf], [0.2, 0.3], [0.0, 1.0]]), "NaN/inf"),
        (np.arange(10.0), "expected [N, features]"),
        (np.zeros((3, 2, 2, 2, 2)), "at most 4"),
    ],
)
def test_bad_arrays_get_one_line_errors(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(PPVAEError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        load_data(str(tmp_path / "bad.npy"), binarize="none")
    assert "\n" not in str(info.value)


def test_binarising_values_outside_unit_interval_is_refused(tmp_path):
    np.save(tmp_path / "wide.npy", np.linspace(-1, 3, 40).reshape(20, 2))
    with pytest.raises(PPVAEError, match=r"needs values in \[0, 1\].*span \[-1, 3\]"):
        load_data(str(tmp_path / "wide.npy"), binarize="dynamic")


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(PPVAEError, match="does not exist"):
        load_data(str(tmp_path / "nope.npy"))
    with pytest.raises(PPVAEError, match="unknown data set"):
        load_data("cifar")
    with pytest.raises(PPVAEError, match="--data-dir"):
        load_data("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("text", ["", "f0,f1,f2\n", "\n\n"])
def test_csv_without_data_rows_is_a_one_line_error(tmp_path, text):
    (tmp_path / "empty.csv").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "input contained no data" must not leak out
        with pytest.raises(PPVAEError, match="holds no data rows") as info:
            load_data(str(tmp_path / "empty.csv"), binarize="none")
    assert "\n" not in str(info.value)


def fashion_mnist_root() -> Path | None:
    """Fashion-MNIST's data root from $PPVAE_DATA, or the shared folder beside the checkout."""
    for candidate in (os.environ.get("PPVAE_DATA"), REPO.parent / "shared" / "data"):
        raw = Path(candidate or "") / "FashionMNIST" / "raw"
        if candidate and (raw / "t10k-images-idx3-ubyte").exists():
            return Path(candidate)
    return None


def test_missing_fashion_mnist_names_data_dir(tmp_path):
    with pytest.raises(PPVAEError, match="fashion-mnist not found") as info:
        load_data("fashion-mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "--data-dir" in message and "FashionMNIST/raw" in message and "\n" not in message
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(
    fashion_mnist_root() is None,
    reason="Fashion-MNIST idx files not found under $PPVAE_DATA/FashionMNIST/raw "
    "(set PPVAE_DATA to a data root that holds them)",
)
def test_fashion_mnist_loads_offline_from_ppvae_data(monkeypatch):
    monkeypatch.setenv("PPVAE_DATA", str(fashion_mnist_root()))
    data = load_data("fashion-mnist", binarize="static", val_fraction=0.1, seed=0)
    assert data.name == "fashion-mnist" and data.image_shape == (1, 28, 28)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (54000, 6000, 10000)
    assert data.num_classes == 10
    assert set(torch.unique(data.test_x).tolist()) == {0.0, 1.0}
    # Fashion-MNIST's mean intensity is about 0.286; a binarised draw keeps it
    assert abs(float(data.test_x.mean()) - 0.286) < 0.01


@requires_mnist
def test_mnist_loads_offline_from_ppvae_data(monkeypatch):
    monkeypatch.setenv("PPVAE_DATA", str(mnist_root()))
    data = load_data("mnist", binarize="static", val_fraction=0.1, seed=0)
    assert data.image_shape == (1, 28, 28) and data.input_dim == 784
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (54000, 6000, 10000)
    assert data.num_classes == 10
    # MNIST's mean intensity is about 0.13; a binarised draw keeps it
    assert abs(float(data.test_x.mean()) - 0.1325) < 0.005
