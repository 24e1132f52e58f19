"""Every bad input gets one line `error: PATH: what`, exit status 2 and no traceback; interruptions lose nothing.

One test or parametrized case per case of the project's reliability table. The command lines run in this process
(their main(argv)), so an exception escaping one fails the test with its traceback; Ctrl-C and kill -9 run them as
child processes. Tests run as root here, where chmod cannot make a folder unwritable, so "unwritable" is a folder
given as the output file, or a PermissionError raised where the temp file is made.
"""
import ast
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

import extract_features
import infer
import sampling
import train
from conftest import (FEATURE_DIM, ROOT, VIDEO_SETTINGS, checkpoint_weights, load_runs_once, optimizer_iterations,
                      write_tiny_mlds)
from tools import convert_run, release
from util import backend, bleu, evaluate
from util.checkpoints import latest_checkpoint, read_state

# a tiny run with dropout, feature noise and scheduled sampling all on; 23 videos (one held out for validation)
# x 3 captions = 18 batches of 4
TRAIN = ["--hidden", "16", "--frames", "6", "--batch-size", "4", "--learning-rate", "0.01", "--min-word-count", "1",
         "--dropout", "0.3", "--feature-noise", "0.1", "--schedule", "constant", "--teacher-forcing-start", "0.5",
         "--epochs", "2"]
BATCHES_PER_EPOCH = 18


def shown_lines(text):
    """The lines a terminal shows: a progress bar is redrawn after \\r and cleared on close, so it is no line."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def run_cli(main, argv, capsys):
    """(exit status, stdout, stderr) of a command line's main(argv); argparse's SystemExit becomes its status."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(result, path, what, code=2):
    """Exit status `code`, and stderr one `error: PATH: ...what...` line, no traceback."""
    status, _, err = result
    lines = shown_lines(err)
    assert status == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert what in lines[0], lines[0]


def assert_usage_error(result, option):
    """argparse's way: exit status 2, the usage, then one `PROG: error: ...` line naming the option."""
    status, _, err = result
    assert status == 2 and "Traceback" not in err
    last = shown_lines(err)[-1]
    assert re.match(r"\S+: error: ", last) and option in last, last


def no_temp_files(folder):
    return not [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny MLDS data whose features claim to come from VIDEO_SETTINGS (so the run can caption raw clips), and
    the uninterrupted 2-epoch run the Ctrl-C test compares with."""
    root = tmp_path_factory.mktemp("reliability")
    data = write_tiny_mlds(root / "data", dim=FEATURE_DIM)
    manifest = json.dumps(VIDEO_SETTINGS.manifest(FEATURE_DIM))
    for split in ("training", "testing"):
        (data / f"{split}_data" / "feat" / "manifest.json").write_text(manifest)
    run_dir = root / "straight"
    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TRAIN]) == 0
    return data, run_dir


@pytest.fixture(scope="module")
def tiny_captioners():
    """{Captioner.load's arguments: the Captioner of tiny's run}, for the whole module (see loaded_once)."""
    return {}


@pytest.fixture
def loaded_once(tiny, tiny_captioners, monkeypatch):
    """tiny, its run loaded once for the module by Captioner.load (infer.main's), per arguments
    (conftest.load_runs_once): the tests taking this fixture are about what infer.main reads and writes, not how it
    loads a run (the checkpoint tests load changed copies, loaded anew)."""
    load_runs_once(monkeypatch, tiny_captioners, only=tiny[1])
    return tiny


@pytest.fixture
def no_java(monkeypatch):
    """util.evaluate without Java: no METEOR, no 10 s start-up."""
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)


@pytest.fixture
def data(tmp_path):
    """A fresh tiny data set to spoil."""
    return write_tiny_mlds(tmp_path / "data", dim=FEATURE_DIM)


def train_cli(data, tmp_path, *extra):
    return ["--data-dir", data, "--ckpt-dir", tmp_path / "run", *TRAIN, *extra]


def copy_run(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


# ---- data ----

def test_data_dir_missing(tmp_path, capsys):
    assert_one_error(run_cli(train.main, train_cli(tmp_path / "nowhere", tmp_path), capsys), tmp_path / "nowhere",
                     "data folder not found")


@pytest.mark.parametrize("content, what", [
    (None, "labels file not found"),
    ("{not json", "not valid JSON"),
    ('{"id": "a.avi", "caption": ["a cat"]}', "expected a non-empty JSON list"),
    ('[{"caption": ["a cat"]}]', 'entry 0 is not an object with a string "id"'),
    ('[{"id": "training_000.avi", "caption": []}]', "empty or non-list caption"),
    ('[{"id": "training_000.avi", "caption": ["a cat", 7]}]', "caption that is not a string"),
], ids=["missing", "not-json", "not-a-list", "no-id", "empty-captions", "non-string-caption"])
@pytest.mark.parametrize("cli", ["train", "bleu", "evaluate"])
def test_bad_labels_file(data, tmp_path, capsys, content, what, cli):
    labels = data / "training_label.json"
    if content is None:
        labels.unlink()
    else:
        labels.write_text(content)
    captions = tmp_path / "out.txt"
    captions.write_text("training_000.avi,a cat\n")
    main, argv = {"train": (train.main, train_cli(data, tmp_path)),
                  "bleu": (bleu.main, [captions, "--labels", labels]),
                  "evaluate": (evaluate.main, [captions, "--labels", labels])}[cli]
    assert_one_error(run_cli(main, argv, capsys), labels, what)


def test_labelled_video_without_feature_file(data, tmp_path, capsys):
    missing = data / "training_data" / "feat" / "training_005.avi.npy"
    missing.unlink()
    assert_one_error(run_cli(train.main, train_cli(data, tmp_path), capsys), missing, "feature file not found")


def spoil_truncated(path):
    path.write_bytes(path.read_bytes()[:-40])


def spoil_header(path):
    path.write_bytes(path.read_bytes()[:60])


def spoil_shape(path):
    np.save(path, np.ones((6, FEATURE_DIM, 2)))


def spoil_frames(path):
    np.save(path, np.ones((5, FEATURE_DIM)))


def spoil_nan(path):
    np.save(path, np.full((6, FEATURE_DIM), np.nan))


def spoil_inf(path):
    array = np.ones((6, FEATURE_DIM))
    array[3, 7] = np.inf
    np.save(path, array)


def spoil_pickled(path):
    np.save(path, np.array([{"features": 1}], dtype=object), allow_pickle=True)


def spoil_text(path):
    path.write_text("0.1 0.2 0.3\n")


@pytest.mark.parametrize("spoil, what", [
    (spoil_truncated, "not a plain, complete .npy array"),
    (spoil_header, "not a plain, complete .npy array"),
    (spoil_shape, "expected a 2-d float array"),
    (spoil_frames, "has 5 frames, expected 6"),
    (spoil_nan, "NaN or infinite"),
    (spoil_inf, "NaN or infinite"),
    (spoil_pickled, "Object arrays cannot be loaded when allow_pickle=False"),
    (spoil_text, "not a .npy file"),
], ids=["truncated", "cut-header", "3-d", "5-frames", "nan", "inf", "pickled", "text"])
def test_bad_feature_file(data, tmp_path, capsys, spoil, what):
    path = data / "training_data" / "feat" / "training_005.avi.npy"
    spoil(path)
    assert_one_error(run_cli(train.main, train_cli(data, tmp_path), capsys), path, what)


def test_feature_folder_mixing_dimensions(data, tmp_path, capsys):
    odd = data / "training_data" / "feat" / "training_007.avi.npy"
    np.save(odd, np.ones((6, 32)))
    assert_one_error(run_cli(train.main, train_cli(data, tmp_path), capsys), odd,
                     f"differs from training_000.avi.npy's (6, {FEATURE_DIM}); the folder mixes features")


def test_empty_ids_file(loaded_once, tmp_path, capsys):
    data, run_dir = loaded_once
    ids = tmp_path / "ids.txt"
    ids.write_text("\n  \r\n")
    assert_one_error(run_cli(infer.main, [ids, tmp_path / "out.txt", "--checkpoint", run_dir,
                                          "--feat-dir", data / "testing_data" / "feat"], capsys), ids, "no ids")


def test_ids_with_windows_line_ends_work(loaded_once, tmp_path, capsys):
    data, run_dir = loaded_once
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"testing_001.avi\r\ntesting_000.avi \r\n\r\n")
    out = tmp_path / "out.txt"
    code, _, err = run_cli(infer.main, [ids, out, "--checkpoint", run_dir, "--feat-dir",
                                        data / "testing_data" / "feat"], capsys)
    assert code == 0 and not shown_lines(err)
    assert [line.split(",")[0] for line in out.read_text().splitlines()] == ["testing_001.avi", "testing_000.avi"]


def test_duplicate_ids_are_captioned_once_with_a_warning(loaded_once, tmp_path, capsys):
    data, run_dir = loaded_once
    ids = tmp_path / "ids.txt"
    ids.write_text("testing_000.avi\ntesting_001.avi\ntesting_000.avi\n")
    out = tmp_path / "out.txt"
    code, _, err = run_cli(infer.main, [ids, out, "--checkpoint", run_dir, "--feat-dir",
                                        data / "testing_data" / "feat"], capsys)
    assert code == 0 and shown_lines(err) == [f"warning: {ids}: 1 duplicate ids, each captioned once"]
    assert [line.split(",")[0] for line in out.read_text().splitlines()] == ["testing_000.avi", "testing_001.avi"]


def test_unknown_id_in_infer(loaded_once, tmp_path, capsys):
    data, run_dir = loaded_once
    ids = tmp_path / "ids.txt"
    ids.write_text("testing_000.avi\nno_such_video.avi\n")
    out = tmp_path / "out.txt"
    feat_dir = data / "testing_data" / "feat"
    assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", run_dir, "--feat-dir", feat_dir], capsys),
                     feat_dir / "no_such_video.avi.npy", "feature file not found")
    assert not out.exists()


# ---- checkpoints ----

@pytest.mark.parametrize("cli", ["infer", "train --resume"])
def test_checkpoint_dir_empty(tiny, tmp_path, capsys, cli):
    data, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    if cli == "infer":
        argv = [data / "testing_id.txt", tmp_path / "out.txt", "--checkpoint", empty]
        assert_one_error(run_cli(infer.main, argv, capsys), empty, "not a run folder (no config.json)")
    else:
        argv = ["--data-dir", data, "--ckpt-dir", empty, *TRAIN, "--resume"]
        assert_one_error(run_cli(train.main, argv, capsys), empty / "config.json", "not a run folder made by train.py")


def another_vocab(run):
    words = json.loads((run / "vocab.json").read_text())
    (run / "vocab.json").write_text(json.dumps(words + ["zebra"]))
    return run / "vocab.json", "words, but the model was built for"


def best_weights(run):
    return latest_checkpoint(run / "best") / "model.weights.h5"


def another_config(run):
    config = json.loads((run / "config.json").read_text())
    config["model"].update(hidden=32)
    (run / "config.json").write_text(json.dumps(config))
    return best_weights(run), ("cannot be restored into this model: 18 weights saved, 18 built from config.json; "
                               "saved but not built: (15, 16), (16,) x2")


def another_attention(run):
    config = json.loads((run / "config.json").read_text())
    config["model"]["attention"] = "luong"
    (run / "config.json").write_text(json.dumps(config))
    return best_weights(run), ("cannot be restored into this model: 18 weights saved, 16 built from config.json; "
                               "saved but not built: (16,), (16, 16)")


def unknown_config_key(run):
    config = json.loads((run / "config.json").read_text())
    config["model"]["layers"] = 4
    (run / "config.json").write_text(json.dumps(config))
    return run / "config.json", "no valid \"model\" section"


def vocab_not_json(run):
    (run / "vocab.json").write_text('["<PAD>", "<BOS>"')
    return run / "vocab.json", "not a vocabulary written by train.py"


@pytest.mark.parametrize("change", [another_vocab, another_config, another_attention, unknown_config_key,
                                    vocab_not_json], ids=lambda f: f.__name__)
def test_checkpoint_from_another_vocab_or_config(tiny, tmp_path, capsys, change):
    data, run_dir = tiny
    path, what = change(copy_run(run_dir, tmp_path))
    assert_one_error(run_cli(infer.main, [data / "testing_id.txt", tmp_path / "out.txt", "--checkpoint",
                                          tmp_path / "run"], capsys), path, what)


def folder_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


CHECKPOINT_FILES = {"model.weights.h5": "checkpoint file is truncated or corrupt",
                    "state.json": "not valid JSON",
                    "optimizer.h5": "optimizer state missing, truncated or corrupt"}


@pytest.mark.parametrize("name, cli", [("model.weights.h5", "infer"), ("state.json", "infer"),
                                       ("model.weights.h5", "train --resume"), ("state.json", "train --resume"),
                                       ("optimizer.h5", "train --resume")])
@pytest.mark.parametrize("cut", ["half", "empty"])
def test_corrupted_checkpoint_file(tiny, tmp_path, capsys, name, cli, cut):
    """infer reads best/, --resume last/ (where the optimizer state is): a cut file there is one line naming it,
    and nothing is written."""
    data, run_dir = tiny
    run = copy_run(run_dir, tmp_path)
    part = latest_checkpoint(run / ("best" if cli == "infer" else "last")) / name
    content = part.read_bytes()
    part.write_bytes(content[:len(content) // 2] if cut == "half" else b"")
    before = folder_state(run)
    out = tmp_path / "out.txt"
    if cli == "infer":
        result = run_cli(infer.main, [data / "testing_id.txt", out, "--checkpoint", run], capsys)
    else:
        result = run_cli(train.main, ["--data-dir", data, "--ckpt-dir", run, *TRAIN, "--resume"], capsys)
    assert_one_error(result, part, CHECKPOINT_FILES[name])
    assert not out.exists() and folder_state(run) == before


def test_missing_checkpoint_file(tiny, tmp_path, capsys):
    data, run_dir = tiny
    run = copy_run(run_dir, tmp_path)
    weights = best_weights(run)
    weights.unlink()
    assert_one_error(run_cli(infer.main, [data / "testing_id.txt", tmp_path / "out.txt", "--checkpoint", run],
                             capsys), weights, "checkpoint file missing")
    optimizer = latest_checkpoint(run / "last") / "optimizer.h5"
    optimizer.unlink()
    assert_one_error(run_cli(train.main, ["--data-dir", data, "--ckpt-dir", run, *TRAIN, "--resume"], capsys),
                     optimizer, "optimizer state missing, truncated or corrupt")


def test_resume_without_a_last_checkpoint(tiny, tmp_path, capsys):
    data, run_dir = tiny
    run = copy_run(run_dir, tmp_path)
    shutil.rmtree(run / "last")
    before = folder_state(run)
    assert_one_error(run_cli(train.main, ["--data-dir", data, "--ckpt-dir", run, *TRAIN, "--resume"], capsys),
                     run / "last", "no checkpoint to resume from")
    assert folder_state(run) == before


def write_old_format_runs(run, old_run, ids_file, feat_dir):
    """Runs of the TensorFlow-only s2vt (needs TensorFlow): the config.json and vocab.json of a run, and weights
    (here: that run's best) in a tf.train checkpoint (best/checkpoint, best/ckpt-1.index,
    best/ckpt-1.data-00000-of-00001): in old_run as its train.py saved them, with the optimizer and the loop's
    counters, in old_run-weights-only the model alone. Returns the greedy captions those weights give the videos of
    an ids file."""
    import keras
    import tensorflow as tf

    from model import ModelConfig, build_model
    from util.checkpoints import load_vocab, read_run_config
    from util.data import load_features, read_ids

    run, old_run = Path(run), Path(old_run)
    model = build_model(ModelConfig.from_dict(read_run_config(run)["model"]))
    model.load_weights(latest_checkpoint(run / "best") / "model.weights.h5")
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    counters = {"epoch": tf.Variable(2, dtype=tf.int64), "batch_in_epoch": tf.Variable(0, dtype=tf.int64),
                "best_score": tf.Variable(0.5, dtype=tf.float64), "best_epoch": tf.Variable(2, dtype=tf.int64)}
    for folder, saved in ((old_run, dict(model=model, optimizer=optimizer, **counters)),
                          (old_run.with_name(old_run.name + "-weights-only"), dict(model=model))):
        (folder / "best").mkdir(parents=True)
        for name in ("config.json", "vocab.json", "history.csv"):
            shutil.copy(run / name, folder / name)
        tf.train.Checkpoint(**saved).save(str(folder / "best" / "ckpt"))
    ids = read_ids(ids_file)
    words = model.greedy(load_features(feat_dir, ids, dtype=np.float32))[0].numpy()
    vocab = load_vocab(run)
    return {video_id: vocab.decode(row) for video_id, row in zip(ids, words)}


# write_old_format_runs in a child process on TensorFlow, its captions printed as JSON
OLD_FORMAT_RUN = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import test_reliability
print(json.dumps(test_reliability.write_old_format_runs(*sys.argv[2:6])))
"""


def backend_run(backend_name, argv):
    """A command run as a child process under the given Keras backend."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_BACKEND": backend_name})


def convert_on_tensorflow(argv, capsys):
    """(exit status, stdout, stderr) of `python -m tools.convert_run ARGV` on TensorFlow: its main(argv) in this
    process when the tests run on TensorFlow, else a child process."""
    if backend.BACKEND == "tensorflow":
        return run_cli(convert_run.main, argv, capsys)
    result = backend_run("tensorflow", ["-m", "tools.convert_run", *argv])
    return result.returncode, result.stdout, result.stderr


def error_lines(stderr):
    """The `error: ` lines of a child's stderr, which also holds TensorFlow's C++ start-up log; no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in shown_lines(stderr) if line.startswith("error: ")]


def test_run_of_tensorflow_checkpoints_is_refused_then_converted(tiny, tmp_path, capsys):
    """An older s2vt's run (tf.train checkpoints) gets one line naming the command that converts it; converted,
    it captions as its old weights did, on the backend the tests run on."""
    data, run_dir = tiny
    old, new = tmp_path / "old", tmp_path / "new"
    ids, feat_dir = data / "testing_id.txt", data / "testing_data" / "feat"
    if backend.BACKEND == "tensorflow":
        old_captions = write_old_format_runs(run_dir, old, ids, feat_dir)
    else:
        made = backend_run("tensorflow", ["-c", OLD_FORMAT_RUN, ROOT, run_dir, old, ids, feat_dir])
        assert made.returncode == 0, made.stderr[-3000:]
        old_captions = json.loads(made.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in (old / "best").iterdir()) == ["checkpoint", "ckpt-1.data-00000-of-00001",
                                                               "ckpt-1.index"]
    out = tmp_path / "out.txt"
    for checkpoint in (old, old / "best"):
        assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", checkpoint], capsys), old,
                         f"holds TensorFlow checkpoints of an older s2vt; convert it with "
                         f"`python -m tools.convert_run {old}`")
    assert not out.exists()

    weights_only = tmp_path / "old-weights-only"
    for source, target, epoch in ((old, new, 2), (weights_only, tmp_path / "old-weights-only-converted", None)):
        # the second without NEW_RUN: OLD_RUN-converted beside it
        code, out_text, err = convert_on_tensorflow([source, *([target] if target == new else [])], capsys)
        assert code == 0, err[-3000:]
        assert out_text.strip().splitlines()[-1] == f"converted {source} -> {target}"
        assert sorted(p.name for p in target.iterdir()) == ["best", "config.json", "history.csv", "vocab.json"]
        (checkpoint,) = (target / "best").iterdir()
        assert sorted(p.name for p in checkpoint.iterdir()) == ["model.weights.h5", "state.json"]  # no optimizer
        assert read_state(checkpoint)["epoch"] == epoch
        assert checkpoint_weights(checkpoint).keys() == checkpoint_weights(latest_checkpoint(run_dir / "best")).keys()
        # decoded as the old weights were, without infer.py's default constraints
        code, _, err = run_cli(infer.main, [ids, out, "--checkpoint", target, "--no-repeat-ngram", "0",
                                            "--no-end-rule"], capsys)
        assert code == 0 and not shown_lines(err)
        assert dict(line.split(",", 1) for line in out.read_text().splitlines()) == old_captions

    # converting onto an existing folder, or where the folder cannot be, is refused in one line, leaving it be
    before = folder_state(new)
    code, _, err = convert_on_tensorflow([old, new], capsys)
    assert code == 2 and error_lines(err) == [f"error: {new}: already exists; choose another folder"]
    code, _, err = convert_on_tensorflow([old, tmp_path / "no" / "such" / "run"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith(f"error: {tmp_path / 'no' / 'such' / 'run'}: ")
    # JAX cannot read tf.train checkpoints
    on_jax = backend_run("jax", ["-m", "tools.convert_run", old, tmp_path / "other"])
    assert on_jax.returncode == 2 and error_lines(on_jax.stderr) == [
        f"error: {old}: converting TensorFlow checkpoints needs KERAS_BACKEND=tensorflow"]
    assert folder_state(new) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "old-weights-only",
                                                          "old-weights-only-converted", "out.txt"]


def test_resume_with_another_hidden_size(tiny, tmp_path, capsys):
    data, run_dir = tiny
    run = copy_run(run_dir, tmp_path)
    argv = ["--data-dir", data, "--ckpt-dir", run, *TRAIN, "--hidden", "32", "--resume"]
    assert_one_error(run_cli(train.main, argv, capsys), run, "cannot resume with changed training settings "
                                                              "(--hidden: 16 saved, 32 asked)")


# ---- output ----

@pytest.mark.parametrize("cli", ["infer", "evaluate --json", "sampling --out", "release export"])
def test_output_in_a_missing_folder(loaded_once, tmp_path, capsys, no_java, cli):
    data, run_dir = loaded_once
    target = tmp_path / "no" / "such" / "out"
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"testing_{i:03d}.avi,a cat runs\n" for i in range(8)))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"id": f"testing_{i:03d}.avi", "caption": ["a cat runs"]} for i in range(8)]))
    main, argv, what = {
        "infer": (infer.main, [data / "testing_id.txt", target, "--checkpoint", run_dir], "does not exist"),
        "evaluate --json": (evaluate.main, [captions, "--labels", labels, "--json", target],
                            "cannot write (No such file or directory)"),
        "sampling --out": (sampling.main, ["--epochs", "4", "--out", target],
                           "cannot write (No such file or directory)"),
        "release export": (release.main, ["export", run_dir, target], "does not exist")}[cli]
    assert_one_error(run_cli(main, argv, capsys), target, what)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("cli", ["infer", "evaluate --json", "sampling --out"])
def test_output_path_is_a_folder(loaded_once, tmp_path, capsys, no_java, cli):
    data, run_dir = loaded_once
    folder = tmp_path / "a_folder"
    folder.mkdir()
    captions = tmp_path / "captions.txt"
    captions.write_text("testing_000.avi,a cat runs\n")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"id": "testing_000.avi", "caption": ["a cat runs"]}]))
    main, argv, what = {
        "infer": (infer.main, [data / "testing_id.txt", folder, "--checkpoint", run_dir], "is a folder"),
        "evaluate --json": (evaluate.main, [captions, "--labels", labels, "--json", folder],
                            "cannot write (Is a directory)"),
        "sampling --out": (sampling.main, ["--epochs", "4", "--out", folder], "cannot write (Is a directory)")}[cli]
    assert_one_error(run_cli(main, argv, capsys), folder, what)
    assert list(folder.iterdir()) == [] and no_temp_files(tmp_path)


def test_output_without_write_permission(loaded_once, tmp_path, capsys, monkeypatch):
    """As root, chmod 0o500 does not stop writes: the temp file's creation raises PermissionError instead."""
    data, run_dir = loaded_once
    out = tmp_path / "out.txt"

    real_open = os.open

    def refuse(path, flags, *args, **kwargs):  # the temp file beside the output is made with O_EXCL
        if flags & os.O_EXCL:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert_one_error(run_cli(infer.main, [data / "testing_id.txt", out, "--checkpoint", run_dir], capsys), out,
                     "cannot write (Permission denied)")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_whole(loaded_once, tmp_path, capsys):
    data, run_dir = loaded_once
    out = tmp_path / "out.txt"
    out.write_text("old content\n" * 1000)
    code, _, err = run_cli(infer.main, [data / "testing_id.txt", out, "--checkpoint", run_dir], capsys)
    assert code == 0 and not shown_lines(err)
    lines = out.read_text().splitlines()
    assert len(lines) == 8 and all(line.startswith("testing_") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


# ---- video ----

def write_clip(path, frames, size=(48, 40)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for value in range(frames):
        writer.write(np.full((size[1], size[0], 3), 20 * value, np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize("make, what", [
    (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    (lambda path: path.write_text("this is a text file, not a video\n" * 40), "not a video OpenCV can open"),
], ids=["zero-byte", "text-named-avi"])
def test_unreadable_clip(loaded_once, tmp_path, capsys, make, what):
    _, run_dir = loaded_once
    clip = tmp_path / "clip.avi"
    make(clip)
    result = run_cli(infer.main, ["--video", clip, "--checkpoint", run_dir], capsys)
    assert_one_error(result, clip, what)
    assert result[1] == ""


@pytest.mark.parametrize("frames, size", [(1, (48, 40)), (3, (4000, 3000))], ids=["one-frame", "4000x3000"])
def test_clip_that_works(loaded_once, tmp_path, capsys, frames, size):
    _, run_dir = loaded_once
    clip = write_clip(tmp_path / "clip.avi", frames, size)
    code, out, err = run_cli(infer.main, ["--video", clip, "--checkpoint", run_dir], capsys)
    assert code == 0 and not shown_lines(err)
    assert out.startswith(f"{clip},") and len(out.splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from Linux's /proc")
def test_high_resolution_clip_is_downscaled_frame_by_frame(tmp_path):
    """Peak memory while reading 12 frames of 4000x3000 stays under what 6 full frames would take (36 MB each)."""
    clip = write_clip(tmp_path / "big.avi", 12, (4000, 3000))
    # VmHWM, this process's peak resident memory: unlike ru_maxrss it does not count the forked pytest before exec
    script = textwrap.dedent(f"""
        import re, sys
        sys.path.insert(0, {str(ROOT)!r})
        import extract_features
        peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
        before = peak()
        frames = extract_features.read_frames({str(clip)!r}, 6, 224)
        print(frames.shape, peak() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    shape, growth_kib = result.stdout.rsplit(" ", 1)
    full_frame = 4000 * 3000 * 3
    print(f"reading 12 frames of 4000x3000: peak memory grew {int(growth_kib) / 1024:.0f} MiB "
          f"(one full frame is {full_frame / 2**20:.0f} MiB)")
    assert shape == "(6, 224, 224, 3)"
    assert int(growth_kib) * 1024 < 6 * full_frame


# ---- arguments ----

BAD_ARGUMENTS = [("train", "--batch-size", "0"), ("train", "--batch-size", "-4"), ("train", "--epochs", "0"),
                 ("train", "--epochs", "-1"), ("train", "--frames", "0"), ("train", "--frames", "-80"),
                 ("train", "--attention", "transformer"), ("train", "--schedule", "cosine"),
                 ("infer", "--batch-size", "0"), ("infer", "--batch-size", "-1"),
                 ("extract_features", "--batch-size", "0"), ("extract_features", "--frames", "-1"),
                 ("sampling", "--epochs", "0"), ("sampling", "--schedule", "cosine")]


@pytest.mark.parametrize("cli, option, value", BAD_ARGUMENTS, ids=[" ".join(case) for case in BAD_ARGUMENTS])
def test_bad_argument(tmp_path, capsys, cli, option, value):
    main, required = {"train": (train.main, ["--data-dir", tmp_path]),
                      "infer": (infer.main, [tmp_path / "ids.txt", tmp_path / "out.txt"]),
                      "extract_features": (extract_features.main, [tmp_path, tmp_path / "feat"]),
                      "sampling": (sampling.main, ["--out", tmp_path / "plot.png"])}[cli]
    assert_usage_error(run_cli(main, [*required, option, value], capsys), option)
    assert sorted(tmp_path.iterdir()) == []


# ---- interruption ----

def interrupt_mid_epoch(command):
    """Run command, send SIGINT once its progress bar shows the first loss of epoch 1 (a batch is done; tqdm's count
    can lag behind when the steps are fast). Returns (exit status, stdout, the end of stderr)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored
    progress = re.compile(rb"epoch 1/2: [^\r\n]*loss=")

    seen = [b""]

    def watch_stderr():
        sent = False
        while chunk := os.read(process.stderr.fileno(), 65536):
            seen[0] = (seen[0] + chunk)[-4096:]
            if not sent and progress.search(seen[0]):
                process.send_signal(signal.SIGINT)
                sent = True

    watcher = threading.Thread(target=watch_stderr, daemon=True)
    watcher.start()
    out = process.stdout.read().decode()
    watcher.join(timeout=30)
    return process.wait(timeout=60), out, seen[0].decode(errors="replace")


def test_ctrl_c_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    data, straight = tiny
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data), "--ckpt-dir", str(run), *TRAIN]
    code, out, err = interrupt_mid_epoch(command)
    assert code == 130 and "interrupted: saved" in out, out + err
    saved = latest_checkpoint(run / "last")
    state = read_state(saved)
    epoch, batch = state["epoch"], state["batch_in_epoch"]
    assert epoch < 2 and 0 < batch < BATCHES_PER_EPOCH  # mid-epoch
    assert state["step"] == optimizer_iterations(saved) == epoch * BATCHES_PER_EPOCH + batch
    assert f"interrupted: saved {saved} at epoch {epoch + 1}, batch {batch}" in out

    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(run), *TRAIN, "--resume"]) == 0
    resumed = checkpoint_weights(latest_checkpoint(run / "last"))
    reference = checkpoint_weights(latest_checkpoint(straight / "last"))
    assert resumed.keys() == reference.keys() and reference
    difference = max(float(np.max(np.abs(resumed[n] - reference[n]))) for n in reference)
    print(f"interrupted at epoch {epoch + 1}, batch {batch}; resumed weights differ by at most {difference:.3g}")
    assert difference <= 1e-6


# forks one child per trial from a process that imported Keras and the model but ran nothing (a fresh interpreter
# per trial would spend seconds importing them); each child saves checkpoints with util.checkpoints.save_checkpoint
# in a loop until it is killed, every model weight and optimizer variable set to the save count, and writes "s"
# before and "e" after each save, so the last letter tells where it died
SAVE_IN_A_LOOP = """
import os, random, signal, sys, time
sys.path.insert(0, sys.argv[1])
import keras
from model import S2VT, ModelConfig
from util.checkpoints import save_checkpoint

CONFIG = ModelConfig(vocab_size=2891, hidden=64)  # 3 MB
root, trials = sys.argv[2], int(sys.argv[3])
random.seed(0)
in_save = 0
for trial in range(trials):
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready)
        model = S2VT(CONFIG)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        step = 0
        while True:
            step += 1
            for variable in model.variables + optimizer.variables:
                variable.assign(keras.ops.full(variable.shape, step, variable.dtype))
            os.write(tell, b"s")
            save_checkpoint(f"{root}/{trial}", step, model, {"step": step}, optimizer, keep=3)
            os.write(tell, b"e")
    os.close(tell)
    while os.read(ready, 1) != b"e":  # the first checkpoint is complete
        pass
    time.sleep(random.uniform(0, 0.3))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    told = b""
    while chunk := os.read(ready, 65536):
        told += chunk
    in_save += told.endswith(b"s")
    os.close(ready)
print(in_save)
"""


def test_kill_9_during_checkpoint_saves_leaves_a_loadable_checkpoint(tmp_path):
    import keras

    from model import S2VT, ModelConfig
    from util.checkpoints import restore

    trials = 20
    result = subprocess.run([sys.executable, "-c", SAVE_IN_A_LOOP, str(ROOT), str(tmp_path), str(trials)],
                            check=True, capture_output=True, text=True, timeout=300)
    in_save = int(result.stdout)
    whole, saves = 0, []
    model = S2VT(ModelConfig(vocab_size=2891, hidden=64))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    for trial in range(trials):
        latest = latest_checkpoint(tmp_path / str(trial))
        step = restore(latest, model, optimizer)["step"]  # a DataError if it cannot
        saves.append(step)
        assert latest.name == f"step-{step:08d}"
        values = [keras.ops.convert_to_numpy(v) for v in model.variables + optimizer.variables]
        whole += all(np.all(v == step) for v in values)  # none half old, half new
    print(f"kill -9 during checkpoint saves: {whole}/{trials} latest checkpoints restore whole; "
          f"{in_save} of the kills landed inside save_checkpoint(); saves per trial {min(saves)}-{max(saves)}")
    assert whole == trials and in_save > 0


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """(folder, fill): after fill(), writing under folder fails with ENOSPC. A real 1 MiB tmpfs filled up when this
    process may mount one (root in most containers); otherwise writes are monkeypatched to fail half-way."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:
        mounted = False

    def fill():
        if mounted:
            with open(folder / "filler", "wb", buffering=0) as filler:
                with pytest.raises(OSError) as error:
                    while True:
                        filler.write(b"\0" * 4096)
                assert error.value.errno == errno.ENOSPC
        else:
            def write_half_then_fail(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            real_write_text, real_save = type(folder).write_text, np.save
            monkeypatch.setattr(type(folder), "write_text", lambda self, text, *a, **k: (
                real_write_text(self, text[:len(text) // 2]), write_half_then_fail()))
            monkeypatch.setattr(np, "save", lambda file, array, *a, **k: (
                real_save(file, array[:len(array) // 2]), write_half_then_fail()))

    yield folder, fill
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_while_writing_captions(loaded_once, full_disk, capsys):
    data, run_dir = loaded_once
    folder, fill = full_disk
    out = folder / "out.txt"
    out.write_text("old captions\n")
    fill()
    assert_one_error(run_cli(infer.main, [data / "testing_id.txt", out, "--checkpoint", run_dir], capsys), out,
                     "cannot write (No space left on device)")
    assert out.read_text() == "old captions\n" and no_temp_files(folder)


def test_disk_full_while_writing_a_feature_file(full_disk, tmp_path, capsys):
    folder, fill = full_disk
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "clip.avi", 8)
    (folder / "manifest.json").write_text(json.dumps(VIDEO_SETTINGS.manifest(FEATURE_DIM)))
    fill()
    argv = [videos, folder, "--weights", "none", "--layer", "block1_pool", "--image-size", "32", "--pool", "max",
            "--grids", "1", "--frames", "6"]
    assert_one_error(run_cli(extract_features.main, argv, capsys), folder / "clip.avi.npy",
                     "cannot write (No space left on device)")
    assert not (folder / "clip.avi.npy").exists() and no_temp_files(folder)


# ---- security ----

def project_sources():
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("checkpoints", "demo_data")]
        yield from (Path(folder) / name for name in files if name.endswith(".py"))


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_np_load_never_unpickles():
    """Every np.load outside the tests says allow_pickle=False (util.data.load_feature_file is the one reader)."""
    loads = []
    for path in project_sources():
        if "tests" in path.relative_to(ROOT).parts:
            continue  # tests load files they wrote themselves
        for node, name in calls(ast.parse(path.read_text())):
            if name in ("np.load", "numpy.load"):
                loads.append(path.name)
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("allow_pickle"), ast.Constant) and flags["allow_pickle"].value is False, \
                    f"{path}:{node.lineno}: np.load without allow_pickle=False"
    assert "data.py" in loads


# the one module that unpickles: PyTorch's legacy checkpoints, through an Unpickler that admits only tensor names
# (tests/test_encoders.py: a checkpoint naming other code is refused without running it)
RESTRICTED_UNPICKLING = {"util/torch_checkpoint.py"}
PICKLE_WRITERS = {"tests/test_encoders.py"}  # writes the hostile checkpoints that test refuses, reads none


def test_no_eval_exec_or_pickle_on_input():
    for path in project_sources():
        deserializers = {"pickle", "marshal", "shelve", "dill"}
        source, relative = path.read_text(), path.relative_to(ROOT).as_posix()
        if relative in RESTRICTED_UNPICKLING | PICKLE_WRITERS:
            assert "pickle.load(" not in source and "pickle.loads(" not in source, path
            assert relative in PICKLE_WRITERS or "def find_class" in source, path
            deserializers -= {"pickle"}
        tree = ast.parse(source)
        for node, name in calls(tree):
            assert name not in ("eval", "exec", "compile", "__import__"), f"{path}:{node.lineno}: {name}()"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not deserializers & {m.split(".")[0] for m in modules}, \
                    f"{path}:{node.lineno}: imports a code-running deserializer"
