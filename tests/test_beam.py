import numpy as np
import pytest
from keras import ops

from model import S2VT, ModelConfig
from test_model import DIM, FRAMES, VOCAB, make_model
from util import backend
from util.vocab import BOS, EOS, PAD

A, B, C = 4, 5, 6  # three ordinary words of the hand-built model


def features(size, seed=3):
    return np.random.default_rng(seed).normal(size=(size, FRAMES, DIM)).astype(np.float32)


def random_model(seed, attention="bahdanau"):
    """A random tiny model with peaked outputs and attention that ends some captions early and never says <PAD>
    or <BOS>."""
    model = make_model(attention, seed)

    def scale(variable, factor):
        variable.assign(ops.convert_to_numpy(variable) * factor)

    # large enough word embeddings and attention scores that beams with different histories attend differently
    scale(model.word_embedding.embeddings, 20.0)
    if attention == "bahdanau":
        scale(model.attention.v, 20.0)
        scale(model.attention.w_query, 5.0)
    scale(model.output_projection.kernel, 5.0)
    bias = np.zeros(VOCAB, np.float32)
    bias[[PAD, BOS]] = -20.0
    bias[EOS] = 0.5
    model.output_projection.bias.assign(bias)
    return model


def teacher_forced_log_prob(model, frame_features, caption_ids):
    """Summed log-probability of each <PAD>-padded caption (batch, length) under the model."""
    caption_ids = np.asarray(ops.convert_to_numpy(caption_ids), np.int32)
    logits, _, _ = model(frame_features, caption_ids)
    log_probs = ops.convert_to_numpy(ops.log_softmax(logits, axis=-1))
    token_log_probs = np.take_along_axis(log_probs, caption_ids[:, :, None], 2)[:, :, 0]  # (batch, length)
    return np.sum(np.where(caption_ids != PAD, token_log_probs, 0.0), 1)


def markov_model(transitions):
    """A model whose next-word distribution is transitions[previous word], whatever the video or the history.

    One-hot word embeddings drive LSTM2's gates to input 1, forget 0, output 1 and cell 30 * one-hot, so its state
    is tanh(1) * one-hot(previous word); every other input to LSTM2 is zeroed and the output layer reads the log
    transition probabilities off that one-hot.
    """
    config = ModelConfig(vocab_size=VOCAB, feature_dim=DIM, frames=FRAMES, hidden=VOCAB, attention="none", max_caption_len=10)
    model = S2VT(config)
    eye = np.eye(VOCAB, dtype=np.float32)
    saturated = np.full((VOCAB, VOCAB), 30.0, np.float32)
    model.word_embedding.embeddings.assign(eye)
    model.lstm2.kernels[0].assign(np.concatenate([saturated, -saturated, 30.0 * eye, saturated], 1))
    for variable in (model.lstm2.kernels[1], model.lstm2.recurrent_kernel, model.lstm2.bias,
                     model.output_projection.bias):
        variable.assign(np.zeros(variable.shape, np.float32))
    model.output_projection.kernel.assign(np.log(transitions).astype(np.float32) / np.tanh(1.0))
    return model


def greedy_trap():
    """From <BOS>: a 0.6, b 0.4; after a: c 0.5, <EOS> 0.3; after b: <EOS> 0.9; after c: <EOS> 0.9.
    Greedy says "a c" (0.27); the best caption is "b" (0.36), then "a c", then "a" (0.18)."""
    tiny = 1e-9
    transitions = np.full((VOCAB, VOCAB), tiny)
    transitions[:, EOS], transitions[:, 7:12] = 0.9, 0.02  # the default row
    transitions[BOS] = tiny
    transitions[BOS, [A, B]] = 0.6, 0.4
    transitions[BOS, EOS] = tiny / 1000  # the empty caption is the least likely, not tied with other unlikely words
    transitions[A] = tiny
    transitions[A, [C, EOS, 7, 8, 9, 10]] = 0.5, 0.3, 0.05, 0.05, 0.05, 0.05
    return markov_model(transitions / transitions.sum(1, keepdims=True))


@pytest.mark.parametrize("attention, seed", [("none", 4), ("bahdanau", 2), ("luong", 1)])
def test_beam_of_one_is_greedy(attention, seed):
    model = random_model(seed, attention)
    frame_features = features(8)
    greedy_words, greedy_attention = backend.to_numpy(model.greedy(frame_features, max_len=7))
    words, scores, log_probs, attention_weights = backend.to_numpy(model.beam_search(frame_features, 1, max_len=7))
    assert 0 < np.sum(greedy_words == EOS) < 8  # some captions end, some run to max_len
    np.testing.assert_array_equal(words[:, 0], greedy_words)
    np.testing.assert_allclose(log_probs[:, 0], teacher_forced_log_prob(model, frame_features, greedy_words),
                               atol=1e-4)
    np.testing.assert_allclose(attention_weights, greedy_attention, atol=1e-6)
    spoken = (greedy_words != PAD)[:, :, None]  # both are zero after each caption's end
    np.testing.assert_array_equal(attention_weights * ~spoken, 0.0)


def test_wider_beam_is_never_less_likely_than_greedy_and_reports_the_true_log_prob():
    model = random_model(1)
    frame_features = features(8)
    greedy_words, _ = backend.to_numpy(model.greedy(frame_features, max_len=12))
    words, scores, log_probs, _ = backend.to_numpy(model.beam_search(frame_features, 4, max_len=12))
    best = words[:, 0]
    true_log_probs = teacher_forced_log_prob(model, frame_features, best)
    np.testing.assert_allclose(log_probs[:, 0], true_log_probs, atol=1e-4)
    np.testing.assert_allclose(scores, log_probs)  # no length penalty: the raw log-probability
    greedy_log_probs = teacher_forced_log_prob(model, frame_features, greedy_words)
    assert np.all(true_log_probs >= greedy_log_probs - 1e-4)
    assert np.any(true_log_probs > greedy_log_probs + 1.0)  # and beam does find better captions here
    assert np.all(np.sum(best == EOS, 1) == 1)


def test_attention_is_the_best_hypothesis_s_own():
    model = random_model(3)  # its best captions run to max_len, switching beams on the way
    bias = ops.convert_to_numpy(model.output_projection.bias)
    bias[EOS] = -20.0  # so that no caption ends
    model.output_projection.bias.assign(bias)
    frame_features = features(8)
    words, _, log_probs, attention_weights = backend.to_numpy(model.beam_search(frame_features, 4, max_len=12))
    best = words[:, 0]
    assert not np.any(best == EOS) and not np.any(best == PAD)  # unfinished captions come back when none finished
    np.testing.assert_allclose(log_probs[:, 0], teacher_forced_log_prob(model, frame_features, best), atol=1e-4)
    _, true_attention, _ = model(frame_features, best)
    np.testing.assert_allclose(attention_weights, ops.convert_to_numpy(true_attention), atol=1e-5)


def padded(rows, width):
    """Captions as <PAD>-filled rows of the decoders' fixed width."""
    return [row + [PAD] * (width - len(row)) for row in rows]


def test_beam_escapes_the_greedy_trap():
    model = greedy_trap()
    frame_features = features(3)
    greedy_words, _ = backend.to_numpy(model.greedy(frame_features))
    np.testing.assert_array_equal(greedy_words, padded([[A, C, EOS]] * 3, 10))
    np.testing.assert_allclose(teacher_forced_log_prob(model, frame_features, greedy_words), np.log(0.27), atol=1e-4)
    words, scores, log_probs, attention_weights = backend.to_numpy(model.beam_search(frame_features, 2))
    np.testing.assert_array_equal(words, [padded([[B, EOS]], 10)] * 3)
    np.testing.assert_allclose(log_probs, np.log(0.36), atol=1e-4)
    np.testing.assert_allclose(teacher_forced_log_prob(model, frame_features, words[:, 0]), np.log(0.36), atol=1e-4)
    assert attention_weights.shape == (3, 10, FRAMES)


def test_n_best_are_distinct_ranked_and_length_penalty_reorders_them():
    model = greedy_trap()
    frame_features = features(2)
    expected_log_probs = np.log([0.36, 0.27, 0.18])
    words, scores, log_probs, _ = backend.to_numpy(model.beam_search(frame_features, 3, n_best=3))
    np.testing.assert_array_equal(words, [padded([[B, EOS], [A, C, EOS], [A, EOS]], 10)] * 2)
    np.testing.assert_allclose(log_probs, [expected_log_probs] * 2, atol=1e-4)
    np.testing.assert_allclose(scores, log_probs)
    # per word, "a c" (3 tokens with <EOS>) beats "b" (2 tokens)
    words, scores, log_probs, _ = backend.to_numpy(model.beam_search(frame_features, 3, length_penalty=1.0,
                                                                     n_best=3))
    np.testing.assert_array_equal(words, [padded([[A, C, EOS], [B, EOS], [A, EOS]], 10)] * 2)
    np.testing.assert_allclose(log_probs, [expected_log_probs[[1, 0, 2]]] * 2, atol=1e-4)
    np.testing.assert_allclose(scores, log_probs / [3.0, 2.0, 2.0], rtol=1e-6)


def test_n_best_on_a_random_model_with_a_length_penalty():
    model = random_model(0)
    frame_features = features(6)
    words, scores, log_probs, _ = backend.to_numpy(model.beam_search(frame_features, 4, length_penalty=0.7,
                                                                     max_len=12, n_best=3))
    assert np.all(np.sum(words == EOS, 2) == 1)  # all finished, so ranked by score alone
    lengths = np.sum(words != PAD, 2)
    np.testing.assert_allclose(scores, log_probs / lengths ** 0.7, rtol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    for video in words:
        assert len({tuple(caption) for caption in video}) == 3
    for rank in range(3):
        np.testing.assert_allclose(log_probs[:, rank], teacher_forced_log_prob(model, frame_features, words[:, rank]),
                                   atol=1e-4)


def test_each_video_is_decoded_as_if_alone():
    model = random_model(1)
    frame_features = features(6)
    together = backend.to_numpy(model.beam_search(frame_features, 3, length_penalty=1.0, max_len=12, n_best=3))
    assert len(set(np.sum(together[0][:, 0] != PAD, 1))) > 1  # videos stop at different steps
    # one video at a time through one compiled search (which equals the eager one: below), not six eager compiles
    search = backend.compile_function(model, lambda one: model.beam_search(one, 3, length_penalty=1.0, max_len=12,
                                                                          n_best=3))
    for video in range(6):
        alone = backend.to_numpy(search(frame_features[video:video + 1]))
        np.testing.assert_array_equal(together[0][video], alone[0][0])
        for got, expected in zip(together[1:], alone[1:]):
            np.testing.assert_allclose(got[video], expected[0], atol=1e-5)


def test_compiled_beam_search_equals_eager():
    """Compiled as the captioner compiles it (util.backend.compile_function: jax.jit, or tf.function)."""
    model = random_model(1)
    search = backend.compile_function(model, lambda frame_features: model.beam_search(frame_features, 3, max_len=8,
                                                                                      n_best=2))
    frame_features = features(3)
    compiled = backend.to_numpy(search(frame_features))
    eager = backend.to_numpy(model.beam_search(frame_features, 3, max_len=8, n_best=2))
    assert compiled[0].shape == (3, 2, 8)
    for got, expected in zip(compiled, eager):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.skipif(backend.BACKEND != "tensorflow",
                    reason="a TensorFlow graph with an unknown batch size; jax.jit compiles one program per shape")
def test_beam_search_in_a_tf_function_takes_any_batch_size():
    import tensorflow as tf

    model = random_model(1)
    search = tf.function(lambda frame_features: model.beam_search(frame_features, 3, max_len=8, n_best=2),
                         input_signature=[tf.TensorSpec([None, FRAMES, DIM], tf.float32)])
    for size in (2, 3):
        frame_features = features(size, seed=size)
        compiled = backend.to_numpy(search(frame_features))
        eager = backend.to_numpy(model.beam_search(frame_features, 3, max_len=8, n_best=2))
        assert compiled[0].shape == (size, 2, 8)
        for got, expected in zip(compiled, eager):
            np.testing.assert_allclose(got, expected, atol=1e-5)
    assert search.experimental_get_tracing_count() == 1


def test_n_best_above_beam_size_is_refused():
    with pytest.raises(ValueError, match="n_best"):
        make_model().beam_search(features(1), 2, n_best=3)
