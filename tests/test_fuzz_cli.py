"""Property-based fuzzing of the command line (issue 11): hostile arrays, CSV text, configs and
checkpoints, driven in-process. Every case ends in exit 0, or exit 2 with one line on stderr and
no traceback, and leaves the training run's files as they were. Examples are bounded and
derandomised, so the test is fast and repeatable in CI."""

import contextlib
import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the dev extra (hypothesis) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from ppvae.cli import main  # noqa: E402

FUZZ = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TINY = ["--hidden", "4", "--latent-dim", "2", "--epochs", "1", "--batch-size", "50"]
TINY += ["--eval-samples", "2", "--no-progress"]


def _cli(argv) -> tuple[int, str]:
    """Exit code and stderr of ``ppvae ARGV``; any other exception fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _assert_clean(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    code, err = _cli(["train", "--run-dir", str(run), "--limit", "100", *TINY])
    assert code == 0, err
    return run


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.float32, np.int64, np.uint8, np.complex64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)


@FUZZ
@given(array=arrays, binarize=st.sampled_from(["none", "static", "dynamic"]))
def test_hostile_arrays(array, binarize):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.npy"
        np.save(path, array)
        run = Path(folder) / "run"
        argv = ["train", "--dataset", str(path), "--binarize", binarize, "--run-dir", str(run)]
        code, err = _cli([*argv, "--test-fraction", "0.4", "--val-fraction", "0.4", *TINY])
        _assert_clean(code, err)
        if code == 2:
            assert not run.exists()


@FUZZ
@given(text=st.text(alphabet="0123456789.,-e nai\n\t#x", max_size=200))
def test_hostile_csv_text(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.csv"
        path.write_text(text)
        run = Path(folder) / "run"
        argv = ["train", "--dataset", str(path), "--binarize", "none", "--run-dir", str(run)]
        code, err = _cli([*argv, *TINY])
        _assert_clean(code, err)
        if code == 2:
            assert not run.exists()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=5,
)


@FUZZ
@given(data=st.data())
def test_hostile_configs(trained, data):
    config = json.loads((trained / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config) + ["unknown"]))
    action = data.draw(st.sampled_from(["replace", "delete", "whole"]))
    if action == "delete":
        config.pop(key, None)
    elif action == "replace":
        config[key] = data.draw(json_values)
    else:
        config = data.draw(json_values)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        shutil.copytree(trained, run)
        (run / "config.json").write_text(json.dumps(config))
        before = _digest(run)
        code, err = _cli(["evaluate", str(run), "--num-samples", "2", "--no-progress"])
        _assert_clean(code, err)
        assert _digest(run) == before


@FUZZ
@given(
    cut=st.one_of(st.none(), st.integers(0, 4000)),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3),
)
def test_hostile_checkpoints(trained, cut, flips):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        shutil.copytree(trained, run)
        path = run / "checkpoint-best.pt"
        data = bytearray(path.read_bytes())
        for where, mask in flips:
            data[int(where * (len(data) - 1))] ^= mask
        if cut is not None:
            data = data[:cut]
        path.write_bytes(bytes(data))
        before = _digest(run)
        code, err = _cli(["evaluate", str(run), "--num-samples", "2", "--no-progress"])
        _assert_clean(code, err)
        assert _digest(run) == before
