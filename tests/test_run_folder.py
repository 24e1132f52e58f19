"""A run folder belongs to one process (util/run_folder.py): a second train.py, or a --resume, into a folder in use is
refused in one line naming the process that holds it; a lock left by a killed process blocks nothing; default run
names never collide; --resume refuses other labels than the run was trained on."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest

import train
from conftest import ROOT, write_tiny_mlds
from util import backend, run_folder
from util.checkpoints import latest_checkpoint, read_state
from util.data import sha256_of

# 24 videos x 3 captions, batches of 24: 3 steps an epoch; VALIDATED validates on the data's own validation split,
# else on one video held out. MeanPool, whose training step compiles in half S2VT's time: these tests are about the
# run folder, not the model
VALIDATED = ["--hidden", "8", "--frames", "6", "--batch-size", "24", "--learning-rate", "0.01", "--min-word-count", "1",
             "--model", "meanpool"]
TINY = [*VALIDATED, "--val-fraction", "0"]
RUN_FILES = ["best", "config.json", "curves.png", "history.csv", "last", "val_ids.txt", "vocab.json"]
# a process that holds a run folder as train.py does, until its stdin closes; it imports no Keras, so it starts fast
HOLD = """
import sys
sys.path.insert(0, sys.argv[1])
from util.run_folder import claimed
with claimed(sys.argv[2], resume=True):
    print("held", flush=True)
    sys.stdin.read()
"""


def folder_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def run_train(data, run_dir, *extra, flags=VALIDATED):
    return train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *flags, *extra])


def run_files(run_dir):
    """The run folder's entries but TensorBoard's (TensorFlow only)."""
    return sorted(name for name in os.listdir(run_dir) if name != "tensorboard")


def holder(run_dir):
    """A live process holding run_dir (HOLD), once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(run_dir)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def refusal(run_dir, pid):
    return f"error: {run_dir}: in use by process {pid} on {socket.gethostname()} (since "


def error_lines(err):
    """The lines a command wrote to stderr but TensorFlow's start-up log and progress bars."""
    return [line for line in err.splitlines() if line.startswith(("error:", "Traceback"))]


def test_a_second_train_py_into_a_folder_in_use_is_refused_and_the_first_run_is_intact(tmp_path, capsys):
    """The first train.py is stopped (SIGSTOP) once it holds its folder, so that it is still running however fast
    the machine, until the second (its main(), in this process) has been refused."""
    data, run_dir = write_tiny_mlds(tmp_path / "data"), tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data), "--ckpt-dir", str(run_dir)]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([*command, *TINY, "--epochs", "2"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        lock = run_dir / run_folder.LOCK_FILE
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f'"pid": {first.pid},' in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        capsys.readouterr()
        assert run_train(data, run_dir, "--epochs", "3", "--hidden", "16", flags=TINY) == 2
        out, err = capsys.readouterr()
        assert out == "", err[-3000:]
        (line,) = error_lines(err)
        assert line.startswith(refusal(run_dir, first.pid)), line
        assert line.endswith("wait for it to end, or give another --ckpt-dir")
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, (tmp_path / "first.err").read_text()[-3000:]
    assert "trained 2 epochs" in out
    assert run_files(run_dir) == RUN_FILES and not lock.exists()  # the first run's files alone, its lock let go
    assert json.loads((run_dir / "config.json").read_text())["model"]["hidden"] == 8
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2]
    assert read_state(latest_checkpoint(run_dir / "last"))["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["data", "first.err", "run"]  # the second wrote nothing beside it


def with_own_validation_split(data):
    """The tiny data set with the test split as its validation_label.json and validation_data/feat."""
    shutil.copy(data / "testing_label.json", data / "validation_label.json")
    shutil.copytree(data / "testing_data" / "feat", data / "validation_data" / "feat")
    return data


@pytest.fixture(scope="module")
def default_named_runs(tmp_path_factory):
    """(data, checkpoints): tiny data with a validation split of its own, and the runs that two train.py (main(), in
    this process) started in the same second without --ckpt-dir trained on it for one epoch in checkpoints, under
    default names. Each train.main costs seconds, however tiny the run: the other tests copy the first run."""
    root = tmp_path_factory.mktemp("default_named")
    data, checkpoints = with_own_validation_split(write_tiny_mlds(root / "data")), root / "checkpoints"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder, "DEFAULT_ROOT", checkpoints)
        patch.setattr(run_folder, "time", SimpleNamespace(strftime=lambda form: "20250102-030405",
                                                          monotonic=time.monotonic))  # one second
        for _ in range(2):
            assert train.main(["--data-dir", str(data), *VALIDATED, "--epochs", "1"]) == 0
    return data, checkpoints


@pytest.fixture(scope="module")
def finished_run(default_named_runs):
    """Tiny data with a validation split of its own and a run trained on it (VALIDATED) for one epoch, for the
    tests to copy: (data, run)."""
    data, checkpoints = default_named_runs
    return data, checkpoints / sorted(os.listdir(checkpoints))[0]


def copy_of(finished, folder):
    """A copy of a module fixture's (data, run) in folder/data and folder/run, for a test to change."""
    data, run_dir = finished
    return shutil.copytree(data, folder / "data"), shutil.copytree(run_dir, folder / "run")


def test_resume_or_overwrite_into_a_folder_a_live_process_holds_is_refused(finished_run, tmp_path, capsys):
    data, run_dir = copy_of(finished_run, tmp_path)
    process = holder(run_dir)
    try:
        before = folder_state(run_dir)
        capsys.readouterr()
        for extra in (["--resume"], ["--overwrite"]):
            assert run_train(data, run_dir, "--epochs", "1", *extra) == 2
            out, err = capsys.readouterr()
            assert out == "" and len(err.splitlines()) == 1 and err.startswith(refusal(run_dir, process.pid)), err
            assert folder_state(run_dir) == before and sorted(os.listdir(tmp_path)) == ["data", "run"]
    finally:
        process.communicate("")  # its stdin closed: it lets go of the folder and ends
    assert run_train(data, run_dir, "--epochs", "1", "--resume") == 0


def test_a_lock_left_by_a_killed_process_does_not_block_resume(finished_run, tmp_path):
    data, run_dir = copy_of(finished_run, tmp_path)
    process = holder(run_dir)
    process.kill()  # SIGKILL: no clean-up runs; the kernel lets go of the lock
    process.wait()
    lock = run_dir / run_folder.LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == process.pid  # the stale lock file stays behind
    assert run_train(data, run_dir, "--epochs", "1", "--resume") == 0  # a finished run: restored, nothing to train
    assert not lock.exists()


def test_two_default_named_runs_started_in_the_same_second_get_folders_of_their_own(default_named_runs):
    _, root = default_named_runs
    names = sorted(os.listdir(root))
    assert len(names) == 2 and all(re.fullmatch(r"20250102-030405-[0-9a-f]{6}", name) for name in names), names
    for name in names:
        assert run_files(root / name) == RUN_FILES
        assert list(pd.read_csv(root / name / "history.csv")["epoch"]) == [1]


@pytest.mark.parametrize("labels", ["training_label.json", "validation_label.json"])
def test_resume_refuses_changed_labels_naming_the_file(finished_run, tmp_path, capsys, labels):
    """Same ids, same features, one caption changed: refused; a run older than the labels' record resumes as
    before."""
    data, run_dir = copy_of(finished_run, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["labels_sha256"] == {name: sha256_of(data / name)
                                       for name in ("training_label.json", "validation_label.json")}
    entries = json.loads((data / labels).read_text())
    entries[-1]["caption"][0] = "a cat is sleeping"
    (data / labels).write_text(json.dumps(entries))
    before = folder_state(run_dir)
    capsys.readouterr()
    assert run_train(data, run_dir, "--epochs", "1", "--resume") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {data / labels}: not the labels the run in {run_dir} was trained on (sha256 "), line
    assert folder_state(run_dir) == before

    del config["labels_sha256"]  # as a run written before train.py recorded them
    (run_dir / "config.json").write_text(json.dumps(config))
    assert run_train(data, run_dir, "--epochs", "1", "--resume") == 0


def test_each_epochs_tensorboard_scalars_are_on_disk_once_written(tmp_path):
    """As its history.csv row is: a process killed, or one whose objects are left uncollected at exit, loses none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write = backend.summary_writer(tmp_path)
    for epoch in (1, 2, 3):
        write(epoch, {"train_loss": 3.0 / epoch, "val_loss": 4.0 / epoch})
        events = EventAccumulator(str(tmp_path))
        events.Reload()
        assert [event.step for event in events.Tensors("val_loss")] == list(range(1, epoch + 1))
