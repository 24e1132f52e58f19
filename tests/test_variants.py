"""The model variants: S2VT's bidirectional encoder, the mean-pool model (Venugopalan et al., NAACL 2015) and
starting a run from another's weights (train.py --init-from)."""
import json
import shutil

import numpy as np
import pytest
from keras import ops

import infer
import train
from conftest import checkpoint_weights, write_tiny_mlds
from decoding import NEVER_WRITTEN, NO_REPEAT_NGRAM, Constraints, beam_search, greedy
from model import ModelConfig, build_model, caption_loss, initialise_from
from test_beam import teacher_forced_log_prob
from test_model import DIM, FRAMES, VOCAB, batch, make_model
from test_speed_equivalence import assert_same_training_step, lstm_step, up_to_eos
from util import backend
from model import load_model
from util.checkpoints import load_vocab, read_run_config
from util.data import load_features
from util.vocab import BOS

TINY = ["--hidden", "16", "--frames", "6", "--batch-size", "8", "--learning-rate", "0.01", "--min-word-count", "1"]


def peaked(model):
    """The model with standardisation and output weights that are not the initial ones, so argmax matters."""
    model.adapt_features(np.random.default_rng(11).normal(2.0, 3.0, size=(20, FRAMES, DIM)).astype(np.float32))
    kernel = model.output_projection.kernel
    kernel.assign(ops.convert_to_numpy(kernel) * 4.0)
    return model


# ---- the bidirectional encoder ----

@pytest.mark.parametrize("attention", ["none", "bahdanau", "luong"])
def test_bidirectional_encoder_is_the_unidirectional_one_plus_a_backward_reader(attention):
    one_way = peaked(make_model(attention, seed=17))
    two_ways = make_model(attention, seed=17, encoder="bidirectional")
    # every weight of the unidirectional model, in the same place
    for name in ("frame_projection", "word_embedding", "lstm1", "output_projection") + \
            (("attention",) if attention != "none" else ()):
        getattr(two_ways, name).set_weights(getattr(one_way, name).get_weights())
    lstm2 = two_ways.lstm2
    unidirectional_lstm2 = [lstm2.kernel(name) for name in lstm2.block_names if name != "backward"] + \
        [lstm2.recurrent_kernel, lstm2.bias]
    for twin, variable in zip(unidirectional_lstm2 + [two_ways.feature_mean, two_ways.feature_std],
                              one_way.lstm2.weights + [one_way.feature_mean, one_way.feature_std]):
        twin.assign(ops.convert_to_numpy(variable))
    features, captions = batch(size=6, seed=2)
    logits = ops.convert_to_numpy(one_way(features, captions)[0])
    both = ops.convert_to_numpy(two_ways(features, captions)[0])
    assert np.abs(both - logits).max() > 1e-3  # the backward LSTM changes what LSTM2 reads
    greedy_words = backend.to_numpy(two_ways.greedy(features))[0]
    beam_words = backend.to_numpy(two_ways.beam_search(features, 1))[0]
    np.testing.assert_array_equal(beam_words[:, 0], greedy_words)
    # with LSTM2's block for it zero, the backward LSTM is read by no one: the unidirectional model again
    block = two_ways.lstm2.kernel("backward")
    block.assign(np.zeros(block.shape, np.float32))
    np.testing.assert_allclose(ops.convert_to_numpy(two_ways(features, captions)[0]), logits, atol=1e-5)
    np.testing.assert_array_equal(backend.to_numpy(two_ways.greedy(features))[0],
                                  backend.to_numpy(one_way.greedy(features))[0])


# ---- the mean-pool model ----

class StraightforwardMeanPool:
    """The mean-pool model written plainly: the standardised frame features averaged over time, projected, and fed
    with the previous word's embedding to LSTM1 at every step; LSTM2 reads LSTM1; words from LSTM2."""

    def __init__(self, model):
        self.m = model

    def loss(self, features, captions, teacher_forcing_prob, seed, training):
        m = self.m
        batch_size, length = captions.shape
        draws = m.training_draws(seed, batch_size, length, teacher_forcing_prob, training)
        x = features + draws["noise"] if training else features
        video = m.frame_projection(ops.mean((x - m.feature_mean) / m.feature_std, 1))
        h1 = c1 = h2 = c2 = ops.zeros((batch_size, m.config.hidden))
        word, logits = ops.full((batch_size,), BOS, "int32"), []
        for t in range(length):
            if t > 0:
                word = ops.where(draws["use_truth"][t], captions[:, t - 1],
                                 ops.cast(ops.argmax(logits[-1], -1), "int32"))
            h1, c1 = lstm_step(m.lstm1, [ops.take(m.word_embedding.embeddings, word, axis=0), video], h1, c1)
            h2, c2 = lstm_step(m.lstm2, [h1 * draws["h1_mask"][t] if training else h1], h2, c2)
            logits.append(m.output_projection(h2 * draws["h2_mask"][t] if training else h2))
        return caption_loss(ops.stack(logits, 1), captions)


@pytest.mark.parametrize("teacher_forcing_prob, training", [(1.0, False), (0.5, True)])
def test_meanpool_training_step_equals_the_straightforward_one(teacher_forcing_prob, training):
    model = peaked(make_model("none", seed=17, model="meanpool"))
    fast_grads = assert_same_training_step(model, StraightforwardMeanPool(model).loss, teacher_forcing_prob, training)
    assert all(np.abs(g).max() > 0 for g in fast_grads)  # every weight is used


def test_meanpool_decodes_greedily_and_by_beam_and_sees_only_the_mean():
    model = peaked(make_model("none", seed=17, model="meanpool"))
    features, _ = batch(size=8, seed=4)
    words, attention = backend.to_numpy(model.greedy(features, max_len=6))
    assert words.shape == (8, 6) and len({tuple(row) for row in words}) > 1
    np.testing.assert_array_equal(attention, 0.0)
    # each greedy word is the teacher-forced argmax among the words a caption may hold
    log_probs = ops.convert_to_numpy(ops.log_softmax(model(features, words)[0], axis=-1))
    log_probs[:, :, list(NEVER_WRITTEN)] = -np.inf
    assert np.all((words == np.argmax(log_probs, -1))[up_to_eos(words)])
    beam_words, _, beam_log_probs, _ = backend.to_numpy(model.beam_search(features, 3, max_len=6, n_best=3))
    for rank in range(3):
        np.testing.assert_allclose(beam_log_probs[:, rank], teacher_forced_log_prob(model, features,
                                                                                    beam_words[:, rank]), atol=1e-4)
    assert np.all(beam_log_probs[:, 0] >= teacher_forced_log_prob(model, features, words) - 1e-4)
    # the frames' order and count do not matter, only their mean
    shuffled = features[:, ::-1]
    np.testing.assert_array_equal(backend.to_numpy(model.greedy(shuffled, max_len=6))[0], words)
    mean = np.repeat(features.mean(1, keepdims=True), 2, axis=1)  # (8, 2, DIM): two frames of the mean
    np.testing.assert_array_equal(backend.to_numpy(model.greedy(mean, max_len=6))[0], words)


def test_late_fusion_of_meanpool_and_s2vt():
    pooled = peaked(make_model("none", seed=17, model="meanpool"))
    s2vt = peaked(make_model("bahdanau", seed=3))
    features, _ = batch(size=8, seed=4)
    alone = backend.to_numpy(pooled.greedy(features, max_len=6))[0]
    # a member of weight 0 changes nothing; an S2VT member that reads other features can
    np.testing.assert_array_equal(backend.to_numpy(greedy([(pooled, features, 1.0), (s2vt, features, 0.0)], 6))[0],
                                  alone)
    fused_words, _, fused_log_probs, attention = backend.to_numpy(
        beam_search([(s2vt, features[:, ::-1], 1.0), (pooled, features, 1.0)], 3, 0.0, 6))
    assert attention.shape == (8, 6, FRAMES) and np.any(attention > 0)  # the first model's, S2VT's attention
    summed = (teacher_forced_log_prob(s2vt, features[:, ::-1], fused_words[:, 0])
              + teacher_forced_log_prob(pooled, features, fused_words[:, 0]))
    np.testing.assert_allclose(fused_log_probs[:, 0], summed, atol=1e-4)


def test_config_defaults_and_refusals():
    old = ModelConfig(vocab_size=10)  # a config.json written before the variants: S2VT, frames read forwards
    assert (old.model, old.encoder) == ("s2vt", "unidirectional")
    with pytest.raises(ValueError, match="attention must be 'none'"):
        ModelConfig(vocab_size=10, model="meanpool")  # attention defaults to bahdanau
    with pytest.raises(ValueError, match="encoder"):
        ModelConfig(vocab_size=10, model="meanpool", attention="none", encoder="bidirectional")
    with pytest.raises(ValueError, match="model must be"):
        ModelConfig(vocab_size=10, model="lstm")


@pytest.mark.parametrize("variant", [{"attention": "luong", "encoder": "bidirectional"},
                                     {"attention": "none", "model": "meanpool"}])
def test_no_weight_depends_on_the_frame_count(variant):
    def weights(frames):
        config = ModelConfig(vocab_size=VOCAB, feature_dim=DIM, frames=frames, hidden=16, max_caption_len=6, **variant)
        return [(v.name, v.shape) for v in build_model(config).weights]

    assert weights(1) == weights(80)


# ---- train.py and infer.py ----

def run_train(data, run_dir, *extra):
    return train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TINY, *extra])


@pytest.mark.parametrize("flags, error", [(["--model", "meanpool", "--attention", "bahdanau"], "--attention bahdanau"),
                                          (["--model", "meanpool", "--encoder", "bidirectional"], "--encoder")])
def test_meanpool_refuses_attention_and_a_bidirectional_encoder(tiny_data, tmp_path, capsys, flags, error):
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_data, tmp_path / "run", *flags)
    assert exit_info.value.code == 2
    assert f"error: {error}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [(["--encoder", "bidirectional", "--attention", "luong"],
                                              {"model": "s2vt", "encoder": "bidirectional", "attention": "luong"}),
                                             (["--model", "meanpool"],
                                              {"model": "meanpool", "encoder": "unidirectional", "attention": "none"})])
def test_variant_run_round_trips_through_its_checkpoint_and_infer(tiny_data, tmp_path, flags, expected):
    run_dir = tmp_path / "run"
    assert run_train(tiny_data, run_dir, "--epochs", "1", *flags) == 0  # one validated epoch makes the best checkpoint
    config = read_run_config(run_dir)
    assert {key: config["model"][key] for key in expected} == expected
    assert all(config["train"][key] == value for key, value in expected.items())
    model, vocab, _, best = load_model(run_dir)
    assert type(model).__name__ == {"s2vt": "S2VT", "meanpool": "MeanPool"}[expected["model"]]
    saved = checkpoint_weights(best)
    assert len(saved) == len(model.weights)
    np.testing.assert_array_equal(sorted(float(np.sum(a)) for a in saved.values()),
                                  sorted(float(np.sum(ops.convert_to_numpy(v))) for v in model.weights))
    ids = (tiny_data / "testing_id.txt").read_text().split()
    out = tmp_path / "out.txt"
    assert infer.main([str(tiny_data / "testing_id.txt"), str(out), "--checkpoint", str(run_dir),
                       "--beam-size", "2"]) == 0
    features = load_features(tiny_data / "testing_data" / "feat", ids, dtype=np.float32)
    # under infer.py's default constraints: no repeats, no caption ending on a word the training captions never end on
    constraints = Constraints(NO_REPEAT_NGRAM, vocab.ids(config["decoding"]["cannot_end"]))
    words = backend.to_numpy(model.beam_search(features, 2, constraints=constraints)[0])[:, 0]
    assert out.read_text().splitlines() == [f"{i},{vocab.decode(row)}" for i, row in zip(ids, words)]


# ---- --init-from ----

@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run on one-frame "videos" (its data in the folder images beside it) whose captions hold a word the video
    data has not ("kitten") and lack some of its words, S2VT with the default settings; trained once, never changed
    by the tests."""
    tmp_path = tmp_path_factory.mktemp("init_from")
    images = write_tiny_mlds(tmp_path / "images", frames=1, dim=12, seed=5)
    labels = json.loads((images / "training_label.json").read_text())
    for entry in labels:
        entry["caption"] = [c.replace("cat", "kitten").replace("runs fast", "runs") for c in entry["caption"]]
    (images / "training_label.json").write_text(json.dumps(labels))
    run_dir = tmp_path / "image_run"
    assert train.main(["--data-dir", str(images), "--ckpt-dir", str(run_dir), *TINY, "--frames", "1",
                       "--epochs", "2"]) == 0
    return run_dir


def test_a_run_saved_before_the_variants_resumes(image_run, tmp_path, capsys):
    images, run_dir = image_run.parent / "images", tmp_path / "run"
    shutil.copytree(image_run, run_dir)  # image_run: S2VT, frames read forwards, 2 epochs
    config = json.loads((run_dir / "config.json").read_text())
    for section in ("model", "train"):
        for key in ("model", "encoder", "init_from"):
            config[section].pop(key, None)
    (run_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run_train(images, run_dir, "--frames", "1", "--epochs", "2", "--resume") == 0  # nothing left to train
    assert "trained 2 epochs" in capsys.readouterr().out
    assert run_train(images, run_dir, "--frames", "1", "--epochs", "2", "--encoder", "bidirectional", "--resume") == 2
    assert "--encoder: unidirectional saved, bidirectional asked" in capsys.readouterr().err
    model, _, _, _ = load_model(run_dir)
    assert (model.config.model, model.config.encoder) == ("s2vt", "unidirectional")


def test_init_from_carries_the_weights_over_word_by_word(image_run, tiny_data, tmp_path, capsys):
    source, source_vocab, _, checkpoint = load_model(image_run)
    run_dir = tmp_path / "video_run"
    assert run_train(tiny_data, run_dir, "--epochs", "1", "--init-from", str(image_run)) == 0
    out = capsys.readouterr().out
    settings = read_run_config(run_dir)["train"]
    assert settings["init_from"] == str(image_run) and settings["init_from_checkpoint"] == str(checkpoint)
    vocab = load_vocab(run_dir)
    assert {"fast", "cat"} <= set(vocab.words) and "kitten" not in vocab.words  # new words, a word not carried
    shared = [w for w in vocab.words if w in source_vocab.index]
    assert f"initialised from {checkpoint}: {len(shared)} of this run's {len(vocab)} words carried over" in out

    # the weights the run started from, as model.initialise_from sets them on a fresh model
    model = build_model(ModelConfig(**dict(source.config.to_dict(), frames=6, vocab_size=len(vocab))))
    fresh_embeddings = np.array(ops.convert_to_numpy(model.word_embedding.embeddings))
    model.adapt_features(np.random.default_rng(0).normal(size=(4, 6, 12)))
    mean = ops.convert_to_numpy(model.feature_mean)
    assert initialise_from(model, vocab, str(image_run), None) == (checkpoint, len(shared))
    here = [vocab.index[w] for w in shared]
    there = [source_vocab.index[w] for w in shared]
    new = [i for i in range(len(vocab)) if vocab.words[i] not in source_vocab.index]
    by_word = {id(v) for v in (model.word_embedding.embeddings, model.output_projection.kernel,
                               model.output_projection.bias, model.feature_mean, model.feature_std)}
    for target, value in zip(model.weights, source.weights):
        if id(target) not in by_word:
            np.testing.assert_array_equal(ops.convert_to_numpy(target), ops.convert_to_numpy(value))
    embeddings = ops.convert_to_numpy(model.word_embedding.embeddings)
    np.testing.assert_array_equal(embeddings[here], ops.convert_to_numpy(source.word_embedding.embeddings)[there])
    np.testing.assert_array_equal(embeddings[new], fresh_embeddings[new])
    kernel = ops.convert_to_numpy(model.output_projection.kernel)
    np.testing.assert_array_equal(kernel[:, here], ops.convert_to_numpy(source.output_projection.kernel)[:, there])
    np.testing.assert_array_equal(ops.convert_to_numpy(model.output_projection.bias)[here],
                                  ops.convert_to_numpy(source.output_projection.bias)[there])
    np.testing.assert_array_equal(ops.convert_to_numpy(model.feature_mean), mean)  # this data's standardisation

    # resuming asks for the same --init-from, and does not read it again
    assert run_train(tiny_data, run_dir, "--epochs", "1", "--resume") == 2
    assert f"--init-from: {image_run} saved, None asked" in capsys.readouterr().err


def test_init_from_a_missing_or_mismatched_run_is_refused_in_one_line(image_run, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_train(tiny_data, run_dir, "--epochs", "1", "--init-from", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nowhere'}: no such checkpoint or run folder"]
    assert run_train(tiny_data, run_dir, "--epochs", "1", "--init-from", str(image_run), "--hidden", "8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {image_run}: cannot start from this run's weights")
    assert "hidden 16 there, 8 here" in err[0]
    assert not run_dir.exists()
