"""The evaluation protocol: validation videos held out of the training labels choose the checkpoint and stop
training early; train.py never reads the test split; the decoder never writes <UNK>; training does not wait for
the device every step."""
import json
import shutil
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import train
import validation
from decoding import NEVER_WRITTEN
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


def test_train_never_opens_the_test_split_and_validates_on_held_out_training_videos(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    OPENED.clear()
    RECORDING.set()
    try:
        assert run_train(tiny_data, run_dir, "--epochs", "2", "--val-fraction", "0.25") == 0
    finally:
        RECORDING.clear()
    opened_data = [path for path in map(Path, OPENED) if path.resolve().is_relative_to(tiny_data.resolve())]
    assert [p for p in opened_data if "testing" in str(p)] == []  # (Keras may open TensorFlow's absl/testing/...)
    assert any(p.name == "training_label.json" for p in opened_data)
    held = (run_dir / "val_ids.txt").read_text().split()
    assert len(held) == 6 and all(v.startswith("training_") for v in held)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["example"].str.split(":").str[0].isin(held).all()  # the epoch's example caption is a held-out one
    assert history["val_bleu1"].notna().all()

    # the same run from a data folder that has no test split at all
    shutil.rmtree(tiny_data / "testing_data")
    (tiny_data / "testing_label.json").unlink()
    assert run_train(tiny_data, tmp_path / "no_test", "--epochs", "2", "--val-fraction", "0.25") == 0
    assert (tmp_path / "no_test" / "val_ids.txt").read_text().split() == held
    again = pd.read_csv(tmp_path / "no_test" / "history.csv")
    np.testing.assert_allclose(again["val_bleu1"], history["val_bleu1"])


def test_few_validation_videos_choose_the_checkpoint_by_the_validation_loss(tiny_data, tmp_path, capsys):
    # 6 validation videos: under validation.MIN_VALIDATION_VIDEOS, the caption metrics are too noisy to choose by
    run_dir = tmp_path / "run"
    assert run_train(tiny_data, run_dir, "--epochs", "3", "--val-fraction", "0.25", "--learning-rate", "0.05") == 0
    out = capsys.readouterr().out
    assert "validation: 6 videos are too few to choose a checkpoint by a caption metric (fewer than 50): choosing " \
           "by the validation loss" in out
    assert json.loads((run_dir / "config.json").read_text())["train"]["select_metric"] == "loss"
    history = pd.read_csv(run_dir / "history.csv")
    best = train.latest_checkpoint(run_dir / "best")
    assert read_state(best)["best_epoch"] == history["epoch"][history["val_loss"].idxmin()]
    assert read_state(best)["best_score"] == pytest.approx(-history["val_loss"].min())

    # a caption metric asked for by name is used, with a warning
    assert run_train(tiny_data, tmp_path / "cider", "--epochs", "1", "--val-fraction", "0.25", "--select-metric",
                     "cider") == 0
    assert "warning: 6 validation videos are too few to choose a checkpoint by CIDEr" in capsys.readouterr().err
    # enough validation videos: the MLDS BLEU@1, as before, and nothing said
    assert validation.select_metric(None, "xe", validation.MIN_VALIDATION_VIDEOS) == "bleu1"
    validation.say_if_too_few(None, "bleu1", validation.MIN_VALIDATION_VIDEOS)
    assert capsys.readouterr() == ("", "")
    assert validation.select_metric(None, "scst", 4) == "cider"


def test_validation_ids_file_and_the_folders_own_validation_split(tiny_data, tmp_path, capsys):
    ids = tmp_path / "val.txt"
    ids.write_text("training_003.avi\ntraining_010.avi\n")
    assert run_train(tiny_data, tmp_path / "by_ids", "--epochs", "1", "--val-ids", str(ids)) == 0
    assert (tmp_path / "by_ids" / "val_ids.txt").read_text().split() == ["training_003.avi", "training_010.avi"]
    assert "validation: 2 videos" in capsys.readouterr().out

    ids.write_text("training_003.avi\nnot_a_training_video.avi\n")
    assert run_train(tiny_data, tmp_path / "bad_ids", "--epochs", "1", "--val-ids", str(ids)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {ids}: 1 ids are not in the training labels, e.g. not_a_training_video.avi"
    assert not (tmp_path / "bad_ids").exists()

    # a data folder with validation_label.json (as tools.datasets prepare writes it) validates on that split
    labels = json.loads((tiny_data / "testing_label.json").read_text())
    (tiny_data / "validation_label.json").write_text(json.dumps(labels[:4]))
    shutil.copytree(tiny_data / "testing_data", tiny_data / "validation_data")
    assert run_train(tiny_data, tmp_path / "own", "--epochs", "1") == 0
    assert (tmp_path / "own" / "val_ids.txt").read_text().split() == [e["id"] for e in labels[:4]]
    # ... and refuses one that shares a video with the training split
    training = json.loads((tiny_data / "training_label.json").read_text())
    (tiny_data / "validation_label.json").write_text(json.dumps(labels[:4] + training[:1]))
    assert run_train(tiny_data, tmp_path / "overlap", "--epochs", "1") == 2
    assert "a video is never in both splits" in capsys.readouterr().err


def test_patience_stops_when_the_validation_metric_stalls(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a learning rate of 0 never changes the captions, so the metric never improves after epoch 1
    assert run_train(tiny_data, run_dir, "--epochs", "6", "--learning-rate", "0", "--patience", "2",
                     "--select-metric", "bleu1") == 0
    out = capsys.readouterr().out
    assert "early stop: validation BLEU@1 (MLDS) has not improved for 2 epochs since epoch 1" in out
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3]
    assert "trained 3 epochs" in out


def test_the_selected_metric_is_named_where_the_best_checkpoint_is_reported(tiny_data, tmp_path, capsys):
    assert run_train(tiny_data, tmp_path / "run", "--epochs", "2", "--select-metric", "cider") == 0
    out = capsys.readouterr().out
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


def test_features_read_from_files_train_exactly_as_in_memory(tiny_data, tmp_path, capsys):
    """--features files leaves the features in their files and reads a batch's worth at a time: the same training."""
    histories = {}
    for mode in ("memory", "files"):
        assert run_train(tiny_data, tmp_path / mode, "--epochs", "2", "--features", mode) == 0
        histories[mode] = pd.read_csv(tmp_path / mode / "history.csv")
    out = capsys.readouterr().out
    assert "features in memory" in out and "features read from their files" in out
    for column in ("train_loss", "val_loss", "val_bleu1"):
        np.testing.assert_array_equal(histories["files"][column], histories["memory"][column])
