"""No re-run loses a run: train.py refuses a folder that holds a run (unless --resume, or --overwrite, which moves it
aside whole), demo.sh runs twice, and a kill -9 anywhere in an epoch's saves leaves last/, best/ and history.csv
agreeing after --resume."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import train
from conftest import ROOT, write_tiny_mlds
from util.checkpoints import checkpoints_in, latest_checkpoint, read_state

# 24 videos x 3 captions; no validation split (the best epoch is the one of lowest training loss, which falls every
# epoch at this learning rate), batches of 24: 3 steps an epoch
TINY = ["--hidden", "8", "--frames", "6", "--batch-size", "24", "--learning-rate", "0.01", "--min-word-count", "1",
        "--val-fraction", "0"]
STEPS_PER_EPOCH = 3


def folder_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def run_train(data, run_dir, *extra):
    return train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TINY, *extra])


def test_a_folder_holding_a_run_is_refused_and_overwrite_moves_it_aside_whole(tmp_path, capsys):
    data = write_tiny_mlds(tmp_path / "data")
    run_dir = tmp_path / "runs" / "X"
    assert run_train(data, run_dir, "--epochs", "1") == 0
    before = folder_state(run_dir)
    capsys.readouterr()
    assert run_train(data, run_dir, "--epochs", "2", "--hidden", "16") == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"error: {run_dir}: holds a run already; continue it with --resume, or pass "
                                f"--overwrite to move it aside"] and out == ""
    assert folder_state(run_dir) == before and os.listdir(run_dir.parent) == ["X"]

    assert run_train(data, run_dir, "--epochs", "2", "--hidden", "16", "--overwrite") == 0
    out = capsys.readouterr().out
    (moved,) = [p for p in run_dir.parent.iterdir() if p != run_dir]
    assert moved.name.startswith("X.replaced-")
    assert f"--overwrite: moved the earlier run in {run_dir} to {moved}" in out
    assert folder_state(moved) == before  # the old run, whole and untouched, beside the new one
    assert json.loads((run_dir / "config.json").read_text())["model"]["hidden"] == 16
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2]
    assert [read_state(c)["epoch"] for c in checkpoints_in(run_dir / "last")] == [1, 2]

    # any of a run's files marks a folder as holding one; --overwrite with --resume is a usage error
    for name in ("config.json", "last", "best", "history.csv"):
        folder = tmp_path / f"only-{name}"
        folder.mkdir()
        (folder / name).mkdir() if name in ("last", "best") else (folder / name).write_text("x")
        assert run_train(data, folder, "--epochs", "1") == 2
        assert capsys.readouterr().err.startswith(f"error: {folder}: holds a run already")
        assert os.listdir(folder) == [name]
    with pytest.raises(SystemExit):
        run_train(data, run_dir, "--resume", "--overwrite")


PYTHON_SHIM = """#!/bin/sh
# demo.sh's python, with a small demo corpus (12 training clips, 8 test clips) whose frames the CNN reads at 32 px
# (the last --image-size counts: a ninth of the CNN's work at 96)
if [ "$1" = "-m" ] && [ "${2#*.}" = "demo_data" ] && [ "$3" != "--check" ]; then
  exec PYTHON "$@" --train 12 --test-seen 0 --test-unseen 8
fi
if [ "${1##*/}" = "extract_features.py" ]; then
  exec PYTHON "$@" --image-size 32
fi
exec PYTHON "$@"
"""


@pytest.mark.slow
def test_demo_sh_runs_twice_and_says_it_moved_the_earlier_run_aside(tmp_path):
    """The real demo.sh in a checkout of links (its corpus, run and captions land there), with 1 epoch on a small
    corpus; `java` is not on PATH (the fallback tokenizer: no Java start-up)."""
    checkout, bin_dir = tmp_path / "checkout", tmp_path / "bin"
    checkout.mkdir()
    bin_dir.mkdir()
    for item in ROOT.iterdir():
        if item.name.endswith(".py") or item.name in ("util", "tools", "demo.sh"):
            (checkout / item.name).symlink_to(item)
    (bin_dir / "python").write_text(PYTHON_SHIM.replace("PYTHON", sys.executable))
    (bin_dir / "python").chmod(0o755)
    for tool in ("date", "dirname"):
        (bin_dir / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    env = dict(os.environ, PATH=str(bin_dir), DEMO_EPOCHS="1", KERAS_BACKEND=os.environ.get("KERAS_BACKEND",
                                                                                            "tensorflow"))
    runs = [subprocess.run(["/bin/bash", str(checkout / "demo.sh")], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert "demo done in" in run.stdout and "run in checkpoints/demo" in run.stdout
    first, second = (run.stdout for run in runs)
    assert "holds an earlier run" not in first and "--overwrite: moved" not in first
    (moved,) = (checkout / "checkpoints").glob("demo.replaced-*")
    assert "checkpoints/demo holds an earlier run: training afresh" in second
    assert f"--overwrite: moved the earlier run in checkpoints/demo to checkpoints/{moved.name}" in second
    for run_dir in (moved, checkout / "checkpoints" / "demo"):
        assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1] and latest_checkpoint(run_dir / "best")


# A child process per kill point: train.py's end-of-epoch writes (history.csv, ending with curves.png, and the
# best/ and last/ checkpoints) are events; at the end of epoch 2, the last, the child kills itself with SIGKILL
# before the first event, or after the first, second or third, whatever their order (the last epoch: no later
# improvement hides a best/ that its state does not describe). The parent forks them having imported train.py but run
# nothing, then resumes each run to the end in-process, and trains one run straight through to compare.
KILL_AND_RESUME = """
import contextlib, json, os, signal, sys
root, data, work = sys.argv[1:4]
flags = sys.argv[4:]
sys.path.insert(0, root)
import train
from util import run_folder

def kill_at(point):
    done, history_writes = [0], [0]

    def at_start():
        if point == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def at_end():
        done[0] += 1
        if done[0] == point:
            os.kill(os.getpid(), signal.SIGKILL)

    real_save, real_atomic, real_plot = run_folder.save_checkpoint, run_folder.atomic_path, \\
        run_folder.plot_training_curves

    def save_checkpoint(folder, step, model, state, *args, **kwargs):
        epoch_2 = state["epoch"] == 2 and state["batch_in_epoch"] == 0
        if epoch_2 and done[0] == 0:
            at_start()
        path = real_save(folder, step, model, state, *args, **kwargs)
        if epoch_2:
            at_end()
        return path

    @contextlib.contextmanager
    def atomic_path(path):
        if os.path.basename(path) == "history.csv":
            history_writes[0] += 1
            if history_writes[0] == 2 and done[0] == 0:
                at_start()
        with real_atomic(path) as tmp:
            yield tmp

    def plot_training_curves(*args, **kwargs):
        real_plot(*args, **kwargs)
        if history_writes[0] == 2:
            at_end()

    run_folder.save_checkpoint, run_folder.atomic_path, run_folder.plot_training_curves = save_checkpoint, \\
        atomic_path, plot_training_curves

report = {}
for point in range(4):
    pid = os.fork()
    if pid == 0:
        kill_at(point)
        code = train.main(["--data-dir", data, "--ckpt-dir", f"{work}/{point}", *flags])
        os._exit(100 + code)  # not killed
    _, status = os.waitpid(pid, 0)
    report[point] = {"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL}
for point in range(4):
    report[point]["resumed"] = train.main(["--data-dir", data, "--ckpt-dir", f"{work}/{point}", *flags, "--resume"])
report["straight"] = train.main(["--data-dir", data, "--ckpt-dir", f"{work}/straight", *flags])
print(json.dumps(report))
"""


def run_summary(run_dir):
    """(history epochs, the newest last/ state's best epoch and score, best/'s checkpoint: its step and epoch)."""
    last, best = read_state(latest_checkpoint(run_dir / "last")), latest_checkpoint(run_dir / "best")
    return {"history": list(pd.read_csv(run_dir / "history.csv")["epoch"]), "last_epoch": last["epoch"],
            "best_epoch": last["best_epoch"], "best_score": last["best_score"],
            "best_step": int(best.name.split("-")[1]), "best_checkpoint_epoch": read_state(best)["epoch"]}


@pytest.mark.slow
def test_kill_9_at_each_point_of_the_end_of_epoch_saves_then_resume_agrees(tmp_path):
    data = write_tiny_mlds(tmp_path / "data")
    result = subprocess.run([sys.executable, "-c", KILL_AND_RESUME, str(ROOT), str(data), str(tmp_path),
                             *TINY, "--epochs", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("straight") == 0
    straight = run_summary(tmp_path / "straight")
    assert straight["best_epoch"] == 2  # epoch 2 improved: every kill point is a distinct moment
    print(f"\nuninterrupted: {straight}")
    for point, outcome in report.items():
        summary = run_summary(tmp_path / point)
        print(f"killed at point {point}: {outcome}; after --resume: {summary}")
        assert outcome == {"killed": True, "resumed": 0}, point
        assert summary["history"] == [1, 2], point  # every epoch once
        assert summary["last_epoch"] == 2
        # the state's best describes the checkpoint best/ holds, taken at the end of that epoch
        assert summary["best_epoch"] == summary["best_checkpoint_epoch"], point
        assert summary["best_step"] == STEPS_PER_EPOCH * summary["best_epoch"], point
        assert summary == straight, point
