"""The evaluation protocol: validation videos held out of the training labels choose the checkpoint and stop
training early; train.py never reads the test split; the decoder never writes <UNK>; training does not wait for
the device every step."""
import io
import json
import shutil
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import train
import validation
from decoding import NEVER_WRITTEN
from conftest import write_tiny_mlds
from test_model import batch, make_model
from util import backend
from util.checkpoints import read_state
from util.data import feature_moments, hold_out_videos
from util.vocab import UNK

TINY = ["--hidden", "16", "--frames", "6", "--batch-size", "8", "--learning-rate", "0.01", "--min-word-count", "1"]


def run_train(data, run_dir, *extra):
    return train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TINY, *extra])


def test_held_out_videos_are_whole_videos_chosen_by_the_seed():
    labels = [(f"v{i}.avi", [f"caption {i}"]) for i in range(40)]
    kept, held = hold_out_videos(labels, 0.1, seed=0)
    assert len(held) == 4 and len(kept) == 36
    assert {v for v, _ in kept} | {v for v, _ in held} == {v for v, _ in labels}
    assert not {v for v, _ in kept} & {v for v, _ in held}
    assert hold_out_videos(labels, 0.1, seed=0) == (kept, held)  # deterministic
    assert hold_out_videos(labels, 0.1, seed=1)[1] != held
    assert [v for v, _ in held] == sorted((v for v, _ in held), key=lambda v: int(v[1:-4]))  # the labels' order
    assert len(hold_out_videos(labels, 0.001, seed=0)[1]) == 1  # a fraction above 0 holds out at least one
    assert hold_out_videos(labels, 0.0, seed=0) == (labels, [])


# Python's audit hook sees every file a process opens (open(), io.open, os.open, numpy's loads)
OPENED, RECORDING = [], threading.Event()
sys.addaudithook(lambda event, args: OPENED.append(str(args[0])) if event == "open" and RECORDING.is_set() else None)


def train_printing(data, run_dir, *extra):
    """run_train, and what it printed: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run_train(data, run_dir, *extra)
    return code, out.getvalue(), err.getvalue()


# Each train.main call costs seconds of tracing however tiny the run: the runs below are made once, for the tests
# that read them (none changes them)
HELD_OUT = ["--epochs", "3", "--val-fraction", "0.25", "--learning-rate", "0.05"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Two runs of one training, validated on 6 of the 24 training videos (--val-fraction 0.25), 3 epochs: `memory`,
    its features in memory, with the files it opened (opened); `files`, its features read from their files, trained
    on a copy of the data that has no test split at all (no_test)."""
    root = tmp_path_factory.mktemp("held_out")
    data = write_tiny_mlds(root / "data")
    OPENED.clear()
    RECORDING.set()
    try:
        memory = train_printing(data, root / "memory", *HELD_OUT, "--features", "memory")
    finally:
        RECORDING.clear()
    opened = list(OPENED)
    no_test = root / "no_test"
    shutil.copytree(data, no_test, ignore=shutil.ignore_patterns("testing_*"))
    files = train_printing(no_test, root / "files", *HELD_OUT, "--features", "files")
    return SimpleNamespace(data=data, no_test=no_test, opened=opened,
                           memory=SimpleNamespace(path=root / "memory", code=memory[0], out=memory[1], err=memory[2]),
                           files=SimpleNamespace(path=root / "files", code=files[0], out=files[1], err=files[2]))


def test_train_never_opens_the_test_split_and_validates_on_held_out_training_videos(held_out):
    tiny_data, run_dir = held_out.data, held_out.memory.path
    assert held_out.memory.code == 0
    opened_data = [path for path in map(Path, held_out.opened) if path.resolve().is_relative_to(tiny_data.resolve())]
    assert [p for p in opened_data if "testing" in str(p)] == []  # (Keras may open TensorFlow's absl/testing/...)
    assert any(p.name == "training_label.json" for p in opened_data)
    held = (run_dir / "val_ids.txt").read_text().split()
    assert len(held) == 6 and all(v.startswith("training_") for v in held)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["example"].str.split(":").str[0].isin(held).all()  # the epoch's example caption is a held-out one
    assert history["val_bleu1"].notna().all()

    # the same run from a data folder that has no test split at all (its features read from their files, which
    # test_features_read_from_files_train_exactly_as_in_memory shows trains exactly as in memory)
    assert not list(held_out.no_test.glob("testing*")) and held_out.files.code == 0
    assert (held_out.files.path / "val_ids.txt").read_text().split() == held
    again = pd.read_csv(held_out.files.path / "history.csv")
    np.testing.assert_allclose(again["val_bleu1"], history["val_bleu1"])


def test_features_read_from_files_train_exactly_as_in_memory(held_out):
    """--features files leaves the features in their files and reads a batch's worth at a time: the same training."""
    assert held_out.memory.code == 0 and held_out.files.code == 0
    assert "features in memory" in held_out.memory.out and "features read from their files" in held_out.files.out
    histories = {mode: pd.read_csv(getattr(held_out, mode).path / "history.csv") for mode in ("memory", "files")}
    for column in ("train_loss", "val_loss", "val_bleu1"):
        np.testing.assert_array_equal(histories["files"][column], histories["memory"][column])


@pytest.fixture(scope="module")
def own_split(tmp_path_factory):
    """A run on a data folder with its own validation split (validation_label.json and validation_data, as
    tools.datasets prepare writes them) of 6 videos, choosing its checkpoint by CIDEr (--select-metric), 1 epoch:
    (data, run folder, exit status, stdout, stderr)."""
    root = tmp_path_factory.mktemp("own_split")
    data = write_tiny_mlds(root / "data")
    labels = json.loads((data / "testing_label.json").read_text())
    (data / "validation_label.json").write_text(json.dumps(labels[:6]))
    shutil.copytree(data / "testing_data", data / "validation_data")
    return (data, root / "run", *train_printing(data, root / "run", "--epochs", "1", "--select-metric", "cider"))


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """A run validated on the 2 training videos a --val-ids file names, whose learning rate of 0 never changes the
    captions, so the metric (--select-metric bleu1) never improves after epoch 1; --patience 2 of --epochs 6:
    (run folder, exit status, stdout, stderr)."""
    root = tmp_path_factory.mktemp("stalled")
    data = write_tiny_mlds(root / "data")
    ids = root / "val.txt"
    ids.write_text("training_003.avi\ntraining_010.avi\n")
    return (root / "run", *train_printing(data, root / "run", "--epochs", "6", "--learning-rate", "0", "--patience",
                                          "2", "--select-metric", "bleu1", "--val-ids", str(ids)))


def test_few_validation_videos_choose_the_checkpoint_by_the_validation_loss(held_out, own_split, capsys):
    # 6 validation videos: under validation.MIN_VALIDATION_VIDEOS, the caption metrics are too noisy to choose by
    run_dir, out = held_out.memory.path, held_out.memory.out
    assert held_out.memory.code == 0
    assert "validation: 6 videos are too few to choose a checkpoint by a caption metric (fewer than 50): choosing " \
           "by the validation loss" in out
    assert json.loads((run_dir / "config.json").read_text())["train"]["select_metric"] == "loss"
    history = pd.read_csv(run_dir / "history.csv")
    best = train.latest_checkpoint(run_dir / "best")
    assert read_state(best)["best_epoch"] == history["epoch"][history["val_loss"].idxmin()]
    assert read_state(best)["best_score"] == pytest.approx(-history["val_loss"].min())

    # a caption metric asked for by name is used, with a warning (6 validation videos of the folder's own split)
    _, own_run, code, _, err = own_split
    assert code == 0
    assert "warning: 6 validation videos are too few to choose a checkpoint by CIDEr" in err
    assert json.loads((own_run / "config.json").read_text())["train"]["select_metric"] == "cider"
    # enough validation videos: the MLDS BLEU@1, as before, and nothing said
    capsys.readouterr()
    assert validation.select_metric(None, "xe", validation.MIN_VALIDATION_VIDEOS) == "bleu1"
    validation.say_if_too_few(None, "bleu1", validation.MIN_VALIDATION_VIDEOS)
    assert capsys.readouterr() == ("", "")
    assert validation.select_metric(None, "scst", 4) == "cider"


def test_validation_ids_file_and_the_folders_own_validation_split(stalled, own_split, tiny_data, tmp_path, capsys):
    by_ids, code, out, _ = stalled  # --val-ids training_003.avi training_010.avi
    assert code == 0
    assert (by_ids / "val_ids.txt").read_text().split() == ["training_003.avi", "training_010.avi"]
    assert "validation: 2 videos" in out

    ids = tmp_path / "val.txt"
    ids.write_text("training_003.avi\nnot_a_training_video.avi\n")
    assert run_train(tiny_data, tmp_path / "bad_ids", "--epochs", "1", "--val-ids", str(ids)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {ids}: 1 ids are not in the training labels, e.g. not_a_training_video.avi"
    assert not (tmp_path / "bad_ids").exists()

    # a data folder with validation_label.json (as tools.datasets prepare writes it) validates on that split
    own_data, own_run, code, _, _ = own_split
    labels = json.loads((own_data / "testing_label.json").read_text())
    assert code == 0
    assert (own_run / "val_ids.txt").read_text().split() == [e["id"] for e in labels[:6]]
    # ... and refuses one that shares a video with the training split
    training = json.loads((tiny_data / "training_label.json").read_text())
    (tiny_data / "validation_label.json").write_text(json.dumps(labels[:4] + training[:1]))
    shutil.copytree(tiny_data / "testing_data", tiny_data / "validation_data")
    assert run_train(tiny_data, tmp_path / "overlap", "--epochs", "1") == 2
    assert "a video is never in both splits" in capsys.readouterr().err


def test_patience_stops_when_the_validation_metric_stalls(stalled):
    run_dir, code, out, _ = stalled  # a learning rate of 0: the metric never improves after epoch 1
    assert code == 0
    assert "early stop: validation BLEU@1 (MLDS) has not improved for 2 epochs since epoch 1" in out
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3]
    assert "trained 3 epochs" in out


def test_the_selected_metric_is_named_where_the_best_checkpoint_is_reported(own_split):
    _, _, code, out, _ = own_split  # --select-metric cider
    assert code == 0
    assert "*best CIDEr*" in out and "best validation CIDEr" in out and "BLEU@1 (MLDS)*" not in out


def test_feature_moments_stream_over_chunks_without_a_float64_copy():
    import tracemalloc

    features = np.random.default_rng(0).gamma(2.0, 1.0, size=(300, 8, 256)).astype(np.float16) * 100
    flat = features.reshape(-1, 256).astype(np.float64)
    tracemalloc.start()
    mean, variance = feature_moments(features, chunk_videos=16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(variance, flat.var(0), rtol=1e-10)
    # a float64 copy of all features is 4.9 MB; a chunk of 16 videos 0.26 MB
    print(f"feature_moments peak allocation {peak / 2**20:.2f} MiB; all features in float64 {flat.nbytes / 2**20:.2f} MiB")
    assert peak < flat.nbytes / 8


@pytest.mark.parametrize("attention", ["none", "bahdanau"])
def test_greedy_and_beam_never_write_unk_pad_or_bos(attention):
    model = make_model(attention)
    bias = np.zeros(model.config.vocab_size, np.float32)
    bias[list(NEVER_WRITTEN)] = 50.0  # the model would rather say these than anything
    model.output_projection.bias.assign(bias)
    features, _ = batch(size=6)
    greedy, _ = backend.to_numpy(model.greedy(features))
    beam, _, log_probs, _ = backend.to_numpy(model.beam_search(features, beam_size=3, n_best=3))
    for words in (greedy, beam):
        assert words.size and not np.isin(words, [UNK, 1]).any()
        assert (words[..., 0] != 0).all()  # no <PAD> as a first word either
    assert np.isfinite(log_probs).all()


class DeviceLoss:
    """A step's loss as the device hands it back: reading it (float) is what waits for the device."""
    reads = 0

    def __float__(self):
        DeviceLoss.reads += 1
        return 1.0


def test_an_epoch_reads_the_loss_back_only_every_log_every_steps():
    DeviceLoss.reads = 0
    bar = SimpleNamespace(set_postfix=lambda **kwargs: None, update=lambda n: None)
    losses = train.run_epoch(lambda *args: DeviceLoss(), [(None, None)] * 95, 0.5, seed=0, first_step=0,
                             stop=lambda: False, log_every=10, bar=bar)
    assert len(losses) == 95 and DeviceLoss.reads == 10  # steps 1, 11, ..., 91


@pytest.mark.skipif(backend.BACKEND != "tensorflow", reason="TensorFlow's GPU memory setting")
def test_gpu_memory_grows_as_needed(monkeypatch):
    import tensorflow as tf

    gpus, grown = ["GPU:0", "GPU:1"], []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: grown.append((gpu, on)))
    backend.configure_devices()
    assert grown == [("GPU:0", True), ("GPU:1", True)]


def test_tests_run_matmuls_in_full_float32():
    """TensorFlow runs float32 matmuls in TF32 on Ampere and newer GPUs, JAX in its default (lower) precision;
    conftest.py turns both off, so the equivalence tests compare full float32 there too."""
    assert backend.matmuls_are_full_float32()


@pytest.mark.skipif(backend.BACKEND != "tensorflow", reason="inspects TensorFlow graphs; JAX's jaxprs are "
                                                           "checked by test_decoder_scans_cast_no_kernel_per_step")
def test_decoder_loops_cast_no_kernel_per_step():
    """In bfloat16, every kernel the decoder multiplies by is cast once before the loop: each cast inside a loop
    body takes a (batch, ...) activation."""
    import tensorflow as tf

    model = make_model("bahdanau", matmul_dtype="bfloat16")
    features, captions = batch(size=5)
    graphs = [tf.function(model.greedy).get_concrete_function(features).graph,
              tf.function(lambda f: model.beam_search(f, 2)).get_concrete_function(features).graph,
              tf.function(lambda f, c: model(f, c, teacher_forcing_prob=0.5, training=True)).get_concrete_function(features, captions).graph]
    bodies = [function for graph in graphs for name, function in graph._functions.items() if "body" in name]
    casts = [op for body in bodies for op in body.graph.get_operations()
             if op.type == "Cast" and op.get_attr("DstT") == tf.bfloat16]
    assert casts  # the loops do run bfloat16 matmuls
    for op in casts:
        shape = op.inputs[0].shape
        assert shape.rank == 2 and shape[0] in (5, 10), (op.name, shape)  # batch 5, or 5 videos x 2 beams


def loop_casts_to_bfloat16(jaxpr, in_loop=False):
    """(primitive path, input shape) of each cast to bfloat16 inside a scan or while body of jaxpr, at any depth."""
    for eqn in jaxpr.eqns:
        if in_loop and eqn.primitive.name == "convert_element_type" and str(eqn.params["new_dtype"]) == "bfloat16":
            yield eqn.primitive.name, eqn.invars[0].aval.shape
        for value in eqn.params.values():  # the jaxprs an equation holds: scan and while bodies, cond branches, calls
            for inner in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    for path, shape in loop_casts_to_bfloat16(inner, in_loop or eqn.primitive.name in ("scan", "while")):
                        yield f"{eqn.primitive.name}/{path}", shape


@pytest.mark.skipif(backend.BACKEND != "jax", reason="inspects JAX's jaxprs; TensorFlow's graphs are checked by "
                                                    "test_decoder_loops_cast_no_kernel_per_step")
def test_decoder_scans_cast_no_kernel_per_step():
    """In bfloat16, every kernel the decoder multiplies by is cast once before the scan: each cast inside a scan
    body takes a (batch, ...) activation. The programs traced are those util.backend.compile_function compiles."""
    import jax

    model = make_model("bahdanau", matmul_dtype="bfloat16")
    features, captions = batch(size=5)
    seed = backend.seed_tensor(0)
    functions = [(model.greedy, features), (lambda f: model.beam_search(f, 2), features),
                 (lambda f, c: model(f, c, teacher_forcing_prob=0.5, seed=seed, training=True), features, captions)]
    casts = [cast for function, *args in functions
             for cast in loop_casts_to_bfloat16(jax.make_jaxpr(backend.compile_function(model, function))(*args).jaxpr)]
    assert casts  # the scans do run bfloat16 matmuls
    for path, shape in casts:
        assert len(shape) == 2 and shape[0] in (5, 10), (path, shape)  # batch 5, or 5 videos x 2 beams
