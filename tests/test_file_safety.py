"""Files a killed run leaves, and outputs that would replace inputs: checkpoints replaced by a process killed at
every step of the swap, leftovers of killed runs cleaned at the next start (and only ours), infer.py refusing an
output that is an input or another output."""
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT
from model import S2VT, ModelConfig
from util.checkpoints import latest_checkpoint, read_state, restore, save_checkpoint

CONFIG = ModelConfig(vocab_size=40, feature_dim=8, frames=4, hidden=8)

# Saves best/step-5 whole, then (in a fork per trial) a second checkpoint over it with keep=1, SIGKILLed just before
# its k-th file-system change (os.mkdir, rename, replace, unlink, rmdir: rmtree's steps too), k = 1, 2, ... until a
# trial finishes unkilled. The stand-in model's save_weights copies a weights file the test made with Keras, so
# this process needs no Keras and forks cheaply. Prints the number of trials of each scenario.
SWAP_KILLED_AT_EACH_STEP = """
import os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
from util.checkpoints import save_checkpoint

work, old_weights, new_weights = sys.argv[2:5]


class StandIn:
    def __init__(self, weights):
        self.weights = weights

    def save_weights(self, path):
        shutil.copyfile(self.weights, path)


def kill_before(count):
    calls = [0]
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        def wrapped(*args, real=getattr(os, name), **kwargs):
            calls[0] += 1
            if calls[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(os, name, wrapped)


for scenario, step in (("same", 5), ("next", 6)):
    for k in range(1, 100):
        folder = f"{work}/{scenario}-{k}/best"
        pid = os.fork()
        if pid == 0:
            save_checkpoint(folder, 5, StandIn(old_weights), {"step": 5, "value": 1}, keep=1)
            kill_before(k)
            save_checkpoint(folder, step, StandIn(new_weights), {"step": step, "value": 2}, keep=1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            print(scenario, k)
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
"""


def model_of(value):
    model = S2VT(CONFIG)
    for variable in model.weights:
        variable.assign(keras.ops.full(variable.shape, value, variable.dtype))
    return model


def values_of(model):
    found = {float(v) for w in model.weights for v in np.unique(keras.ops.convert_to_numpy(w))}
    assert len(found) == 1, found  # never half old, half new
    return found.pop()


def test_kill_9_at_each_step_of_a_best_checkpoint_swap_leaves_one_that_loads_and_resumes(tmp_path):
    for value in (1, 2):
        model_of(value).save_weights(tmp_path / f"{value}.weights.h5")
    result = subprocess.run([sys.executable, "-c", SWAP_KILLED_AT_EACH_STEP, str(ROOT), str(tmp_path),
                             str(tmp_path / "1.weights.h5"), str(tmp_path / "2.weights.h5")],
                            check=True, capture_output=True, text=True, timeout=120)
    trials = dict((scenario, int(k)) for scenario, k in (line.split() for line in result.stdout.split("\n") if line))
    assert trials.keys() == {"same", "next"} and min(trials.values()) >= 4, result.stdout
    model = model_of(0)
    for scenario, count in trials.items():
        loaded = []
        for k in range(1, count + 1):
            best = tmp_path / f"{scenario}-{k}" / "best"
            latest = latest_checkpoint(best)
            assert latest is not None, f"{scenario}, killed before step {k}: {sorted(os.listdir(best))}"
            state = restore(latest, model)  # a DataError if it cannot
            assert values_of(model) == state["value"]
            loaded.append(state["value"])
            # the next save settles what the killed one left: one complete checkpoint, nothing else
            resumed = save_checkpoint(best, 7, model_of(3), {"step": 7, "value": 3}, keep=1)
            assert sorted(os.listdir(best)) == [resumed.name]
            assert restore(latest_checkpoint(best), model)["value"] == 3 and values_of(model) == 3
        # killed before the new one is in: the old one loads; after it: the new one; never none, never back
        assert loaded == sorted(loaded) and loaded[0] == 1 and loaded[-1] == 2, (scenario, loaded)
        print(f"{scenario} step: killed at {count - 1} points, each left a loadable checkpoint: {loaded}")


def test_a_complete_partial_is_kept_while_no_checkpoint_is_there(tmp_path):
    """The state the issue describes (an older s2vt deleted best/step-N, then was killed before renaming the new one
    in): the next save must not delete the .partial, which holds the only copy, until its own is in place."""
    best = tmp_path / "best"
    saved = save_checkpoint(best, 5, model_of(1), {"step": 5}, keep=1)
    partial = best / ".step-00000005.abc123.partial"
    saved.rename(partial)
    calls = []

    class Watching:
        def save_weights(self, path):
            calls.append(partial.is_dir())
            model_of(2).save_weights(path)

    save_checkpoint(best, 6, Watching(), {"step": 6}, keep=1)
    assert calls == [True] and partial.is_dir()
    save_checkpoint(best, 7, model_of(3), {"step": 7}, keep=1)  # a complete checkpoint is there now
    assert sorted(os.listdir(best)) == ["step-00000007"]


# ---- an output never replaces an input, nor another output ----

def snapshot(folder):
    return {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case, argv, named, what", [
    ("output is the video", ["--video", "talk.mp4", "--segments", "5", "--json", "talk.mp4"], "talk.mp4",
     "the --json output is the input --video talk.mp4"),
    ("two outputs one file", ["--video", "talk.mp4", "--segments", "5", "--srt", "cues.txt", "--vtt", "cues.txt"],
     "cues.txt", "given as both the --srt and the --vtt output"),
    ("symlink to the video", ["--video", "talk.mp4", "--segments", "5", "--srt", "link.srt"], "link.srt",
     "is the input --video talk.mp4"),
    ("hard link to the video", ["--video", "talk.mp4", "--segments", "5", "--vtt", "hard.vtt"], "hard.vtt",
     "is the input --video talk.mp4"),
    ("through a linked folder", ["--video", "talk.mp4", "--segments", "5", "--json", "here/talk.mp4"],
     "here/talk.mp4", "is the input --video talk.mp4"),
    ("two outputs through a link", ["--video", "talk.mp4", "--segments", "5", "--srt", "new.srt", "--json",
                                    "to-new.json"], "to-new.json", "given as both the --srt and the --json output"),
    ("captions over the ids", ["ids.txt", "ids.txt"], "ids.txt", "the OUT_FILE output is the input IDS_FILE"),
    ("n-best over the labels", ["ids.txt", "out.txt", "--labels", "out.txt.nbest.json", "--beam-size", "2",
                                "--n-best", "2"], "out.txt.nbest.json", "the --n-best output is the input --labels"),
])
def test_an_output_that_is_an_input_or_another_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                               case, argv, named, what):
    from test_reliability import assert_one_error, run_cli

    import infer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.mp4").write_bytes(b"the only copy of the talk")
    (tmp_path / "ids.txt").write_text("clip1\n")
    (tmp_path / "out.txt.nbest.json").write_text("{}")
    (tmp_path / "link.srt").symlink_to("talk.mp4")
    os.link(tmp_path / "talk.mp4", tmp_path / "hard.vtt")
    (tmp_path / "here").symlink_to(tmp_path)
    (tmp_path / "to-new.json").symlink_to("new.srt")  # neither exists yet
    before = snapshot(tmp_path)
    # the checkpoint is not there: a check made after loading it would give another error
    result = run_cli(infer.main, [*argv, "--checkpoint", tmp_path / "no-run"], capsys)
    assert_one_error(result, named, what)
    assert snapshot(tmp_path) == before


def test_separate_outputs_pass_the_check(tmp_path, capsys, monkeypatch):
    from test_reliability import run_cli

    import infer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "talk.mp4").write_bytes(b"a talk")
    code, _, err = run_cli(infer.main, ["--video", "talk.mp4", "--segments", "5", "--srt", "talk.srt", "--vtt",
                                        "talk.vtt", "--json", "talk.json", "--checkpoint", tmp_path / "no-run"],
                           capsys)
    # the error is the checkpoint's (util.releases.resolve_checkpoint: a path that is not there is no release name)
    assert code == 2 and f"{tmp_path / 'no-run'}: no such checkpoint or run folder" in err and "the --" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["talk.mp4"]


# ---- leftovers of killed runs: ours removed at the next start, never anyone else's ----

# writes OUT through util.atomic.atomic_path and stops inside it: SIGKILLed ("kill"), or waiting until its stdin
# closes ("live")
WRITE_AND_STOP = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from util.atomic import atomic_path

with atomic_path(sys.argv[2]) as tmp:
    tmp.write_text("half of it")
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(tmp.name, flush=True)
    sys.stdin.read()
"""


def test_temp_files_of_killed_writers_are_removed_at_the_next_write_and_no_others(tmp_path):
    from util.atomic import HOST, write_text_atomic

    out = tmp_path / "history.csv"
    killed = subprocess.run([sys.executable, "-c", WRITE_AND_STOP, str(ROOT), str(out), "kill"])
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".history.csv.s2vt-") and left.endswith(".tmp")
    live = subprocess.Popen([sys.executable, "-c", WRITE_AND_STOP, str(ROOT), str(out), "live"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        writing = live.stdout.readline().strip()  # a temp file of a process still writing it
        others = [".history.csv.0123456789ab.tmp",  # another program's (or an older s2vt's) temp file
                  f".history.csv.s2vt-{'0' if HOST[0] != '0' else '1'}{HOST[1:]}-1.0123456789ab.tmp"]  # another host's
        for name in others:
            (tmp_path / name).write_text("someone else's")
        write_text_atomic(tmp_path / "curves.txt", "next start")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["curves.txt", writing, *others])
    finally:
        live.communicate("")
    assert live.returncode == 0 and out.read_text() == "half of it"
