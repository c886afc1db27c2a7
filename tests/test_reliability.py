"""Reliability of run directories (issue 11): a kill at any write of an epoch loses nothing and
changes no result, one writer per run, checksummed checkpoints, and one line for hostile files."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO

from ppvae.checkpoint import load_checkpoint
from ppvae.cli import main
from ppvae.errors import PPVAEError
from ppvae.runs import Run

# 90 train / 10 val / 5 test digits, two SVI steps per epoch
OPTIONS = ["--hidden", "8", "--latent-dim", "2", "--limit", "100", "--batch-size", "50"]
OPTIONS += ["--test-fraction", "0.05", "--eval-samples", "5", "--no-progress"]


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run, and the run-directory files each os.replace committed."""
    run = tmp_path_factory.mktemp("straight") / "run"
    commits = []
    replace = os.replace

    def recording(src, dst):
        if str(dst).startswith(str(run)):
            commits.append(os.path.basename(dst))
        return replace(src, dst)

    os.replace = recording
    try:
        assert main(["train", "--run-dir", str(run), "--epochs", "3", *OPTIONS]) == 0
    finally:
        os.replace = replace
    return run, commits


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    run, target = sys.argv[1], int(sys.argv[2])
    replace, count = os.replace, 0

    def killing(src, dst):
        global count
        if str(dst).startswith(run):
            count += 1
            if count == target:  # the temporary file is complete, the rename has not happened
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst)

    os.replace = killing
    from ppvae.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "write", ["metrics.jsonl", "checkpoint.pt", "checkpoint-best.pt", "report.json"]
)
def test_a_kill_at_each_write_of_the_last_epoch_then_resume_gives_the_same_report(
    straight, write, tmp_path, capsys
):
    """SIGKILL just before the rename of each write of the last epoch (the temporary file is
    complete): the resumed run ends with the uninterrupted run's report and checkpoints."""
    reference, commits = straight
    last_epoch = len(commits) - 1 - commits[::-1].index("metrics.jsonl")
    assert commits[last_epoch:] == ["metrics.jsonl", "checkpoint.pt", "checkpoint-best.pt"] + [
        "report.json"
    ]
    target = last_epoch + commits[last_epoch:].index(write) + 1  # 1-based count of renames
    expected = json.loads((reference / "report.json").read_text())
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--epochs", "3", *OPTIONS]
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(run), str(target), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(run.glob(".*.tmp")), "the kill left the temporary file of its write"
    assert (run / ".lock").read_text().strip()  # the killed writer's pid
    code, out, err = _run(["train", "--run-dir", str(run), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "temporary file(s) of interrupted writes" in out and not list(run.glob(".*.tmp"))
    assert "ended without releasing it; its lock is taken over" in out
    report = json.loads((run / "report.json").read_text())
    assert report == expected
    for name in ("checkpoint.pt", "checkpoint-best.pt"):
        a, b = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert a["epoch"] == b["epoch"], name
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), name


def test_a_stale_best_checkpoint_is_read_from_checkpoint_pt_and_repaired(
    straight, tmp_path, capsys
):
    reference, _ = straight
    run = tmp_path / "run"
    run.mkdir()
    for path in reference.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    last = load_checkpoint(run / "checkpoint.pt")
    assert last["best_epoch"] == last["epoch"] == 3  # the validation ELBO rose every epoch
    # a kill between the two writes of epoch 3: checkpoint-best.pt still holds epoch 2
    stale = {**load_checkpoint(run / "checkpoint.pt"), "epoch": 2}
    torch.save(stale, run / "checkpoint-best.pt")
    loaded = Run.load(run, device="cpu")
    assert loaded.checkpoint_path("best") == run / "checkpoint.pt"
    (run / "report.json").unlink()
    code, out, err = _run(["train", "--run-dir", str(run), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "restored epoch 3 from checkpoint.pt" in out and "0 trained now" in out
    assert load_checkpoint(run / "checkpoint-best.pt")["epoch"] == 3
    assert json.loads((run / "report.json").read_text()) == json.loads(
        (reference / "report.json").read_text()
    )


def test_resume_of_a_complete_run_is_refused_and_a_changed_lr_is_recorded(
    straight, tmp_path, capsys
):
    reference, _ = straight
    code, _, err = _run(["train", "--run-dir", str(reference), "--resume"], capsys)
    assert code == 2 and "already has 3 epochs" in err and _one_line(err)
    run = tmp_path / "run"
    run.mkdir()
    for path in reference.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    argv = ["train", "--run-dir", str(run), "--resume", "--epochs", "4", "--lr", "0.0001"]
    code, out, err = _run([*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["lr"] == 0.0001
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.0001
    assert checkpoint["config"]["lr"] == 0.0001 and checkpoint["epoch"] == 4


HOLDER = textwrap.dedent(
    """
    import sys, time
    from ppvae.runs.directory import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_writer_is_refused_with_one_line(tmp_path, capsys):
    """Another process holds the run (as a trainer does): train, resume and create are refused
    without touching the folder; once it is killed, its lock is taken over with a notice."""
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *OPTIONS, "--epochs", "1"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (
            ["train", "--run-dir", str(run), "--resume", "--epochs", "2", "--no-progress"],
            ["train", "--run-dir", str(run), "--resume", "--epochs", "1", "--no-progress"],
        ):
            code, _, err = _run(argv, capsys)
            assert code == 2 and f"another ppvae process (pid {holder.pid})" in err, err
            assert _one_line(err)
        with pytest.raises(PPVAEError, match="another ppvae process"):
            Run.create(run, model="vae", overwrite=True, **{"hidden": [8], "limit": 100})
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == before
    finally:
        holder.kill()
        holder.wait()
    code, out, err = _run(["train", "--run-dir", str(run), "--resume", "--epochs", "2"], capsys)
    assert code == 0, err
    assert f"(pid {holder.pid}) ended without releasing it" in out


def _flip_a_weight_byte(path):
    """Flip one bit inside the stored bytes of the largest weight tensor."""
    checkpoint = load_checkpoint(path)
    name = max(checkpoint["state_dict"], key=lambda k: checkpoint["state_dict"][k].numel())
    raw = checkpoint["state_dict"][name].numpy().tobytes()
    data = bytearray(path.read_bytes())
    offset = data.find(raw)
    assert offset > 0
    data[offset + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_flip_a_weight_byte, "fails its checksum"),
        (lambda p: _resave(p, lambda c: c.pop("state_dict")), "has no 'state_dict' field"),
        (lambda p: _resave(p, lambda c: c.update(epoch="3")), "field 'epoch' is a str"),
        (lambda p: _resave(p, lambda c: c.update(model={"class": 1})), "does not name a class"),
        (lambda p: _resave(p, _nan_weights), "holds NaN/inf weights"),
        (lambda p: p.write_bytes(b"\x00" * 100), "is corrupt or not a ppvae checkpoint"),
    ],
)
def test_hostile_checkpoints_get_one_line(straight, damage, message, tmp_path, capsys):
    reference, _ = straight
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "checkpoint.pt", "checkpoint-best.pt"):
        (run / name).write_bytes((reference / name).read_bytes())
    damage(run / "checkpoint-best.pt")
    code, out, err = _run(["evaluate", str(run), "--num-samples", "5", "--no-progress"], capsys)
    assert code == 2 and message in err and "checkpoint-best.pt" in err and _one_line(err), err
    assert not (run / "evaluations").exists()


def _resave(path, edit):
    checkpoint = load_checkpoint(path)
    edit(checkpoint)
    torch.save(checkpoint, path)  # without a checksum, as an older ppvae wrote them


def _nan_weights(checkpoint):
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))


@pytest.mark.parametrize(
    "code_, text", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only")]
)
def test_a_full_disk_or_read_only_folder_is_one_line_and_keeps_the_checkpoint(
    straight, code_, text, tmp_path, capsys, monkeypatch
):
    import ppvae.checkpoint

    reference, _ = straight
    run = tmp_path / "run"
    run.mkdir()
    for path in reference.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    before = (run / "checkpoint.pt").read_bytes()

    mkstemp = ppvae.checkpoint.tempfile.mkstemp

    def failing(*args, prefix="", **kwargs):  # the checkpoint of epoch 4 cannot be written
        if prefix.startswith(".checkpoint"):
            raise OSError(code_, text)
        return mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(ppvae.checkpoint.tempfile, "mkstemp", failing)
    argv = ["train", "--run-dir", str(run), "--resume", "--epochs", "4", "--no-progress"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and text in err and "--resume" in err and _one_line(err), err
    assert "cannot write " + str(run / "checkpoint.pt") in err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_empty_run_dir_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(["train", "--run-dir", "", *OPTIONS], capsys)
    assert code == 2 and "--run-dir is empty" in err and _one_line(err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PPVAEError, match="--run-dir is empty"):
        Run.create("", model="vae")


def _zip_named_npy(path):
    np.savez(path.with_suffix(".tmp.npz"), x=np.ones((10, 3)))
    path.with_suffix(".tmp.npz").rename(path)


def _npy_named_npz(path):
    with open(path, "wb") as handle:
        np.save(handle, np.ones((10, 3)))


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("c.npy", lambda p: np.save(p, np.ones((10, 3)) + 1j), "holds complex values"),
        ("t.npy", lambda p: p.write_text("hello world"), "is not a NumPy .npy file"),
        ("z.npy", _zip_named_npy, "holds a .npz file under a .npy name"),
        ("n.npz", _npy_named_npz, "holds a .npy file under a .npz name"),
        ("b.npy", lambda p: np.save(p, np.full((10, 3), 1e308)), "beyond float32"),
        ("e.npy", lambda p: np.save(p, np.zeros((0, 3))), "with N >= 2 data points"),
    ],
)
def test_hostile_arrays_get_one_line_and_write_nothing(name, write, message, tmp_path, capsys):
    write(tmp_path / name)
    run = tmp_path / "run"
    argv = ["train", "--dataset", str(tmp_path / name), "--binarize", "none", "--run-dir", str(run)]
    code, _, err = _run([*argv, *OPTIONS], capsys)
    assert code == 2 and message in err and _one_line(err), err
    assert not run.exists()


def test_sizes_torch_cannot_allocate_and_folders_as_files_get_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(
        ["train", "--run-dir", str(run), *OPTIONS, "--hidden", "10000000000"], capsys
    )
    assert code == 2 and "use smaller --hidden" in err and _one_line(err), err
    (tmp_path / "d.npy").mkdir()
    code, _, err = _run(
        ["train", "--run-dir", str(run), "--dataset", str(tmp_path / "d.npy")], capsys
    )
    assert code == 2 and "d.npy is a folder" in err and _one_line(err), err
    code, _, err = _run(["evaluate", str(tmp_path / "d.npy" / "missing")], capsys)
    assert code == 2 and "missing does not exist" in err and _one_line(err), err
    assert not run.exists()


def test_a_read_only_run_folder_is_one_line_for_evaluate(straight, capsys, monkeypatch):
    reference, _ = straight
    mkdir = type(reference).mkdir

    def read_only(self, *args, **kwargs):
        if "evaluations" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(reference), "mkdir", read_only)
    code, _, err = _run(["evaluate", str(reference), "--num-samples", "5", "--no-progress"], capsys)
    assert code == 2 and "Permission denied" in err and "evaluations" in err and _one_line(err)


def test_the_lock_names_a_second_run_object_of_the_same_process(tmp_path):
    run = tmp_path / "run"
    first = Run.create(run, model="vae", latent_dim=2, hidden=[8], epochs=1, limit=100)
    with pytest.raises(PPVAEError, match="another Run object of this process"):
        Run.load(run).take_lock()
    first.release_lock()
    second = Run.load(run)
    second.take_lock()
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    second.release_lock()
    assert (run / ".lock").read_text() == ""  # a clean release leaves no pid behind
