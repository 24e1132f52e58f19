"""The optimised model against a straightforward one: same loss, gradients and decoded captions.

`StraightforwardS2VT` below is S2VT written the plain way, batch-major, one Python-level step at a time, every
input projected at every step and TensorFlow's own gradients throughout. It reads the optimised model's weights and
its random draws (noise, dropout masks, sampling coins), so any difference is in the computation.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from model import NEVER_WRITTEN, caption_loss
from test_model import batch, make_model
from util.vocab import BOS, EOS, PAD


def lstm_step(layer, inputs, h, c):
    """One LSTM step from a list of inputs matching layer.kernels."""
    z = sum(tf.matmul(x, k) for x, k in zip(inputs, layer.kernels)) + tf.matmul(h, layer.recurrent_kernel) + layer.bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


class StraightforwardS2VT:
    def __init__(self, model):
        self.m = model
        self.cfg = model.config

    def attend(self, encoder_outputs, query):
        """encoder_outputs (batch, frames, hidden), query (batch, hidden) -> weights (batch, frames), context."""
        att = self.m.attention
        if att.kind == "bahdanau":
            scores = tf.reduce_sum(att.v * tf.tanh(tf.matmul(encoder_outputs, att.w_keys)
                                                   + tf.matmul(query, att.w_query)[:, None, :]), -1)
        else:
            scores = tf.reduce_sum(tf.matmul(query, att.w)[:, None, :] * encoder_outputs, -1)
        weights = tf.nn.softmax(scores, axis=1)
        return weights, tf.reduce_sum(weights[:, :, None] * encoder_outputs, 1)

    def lstm2_inputs(self, word_ids, h1, context):
        inputs = [tf.gather(self.m.word_embedding.embeddings, word_ids), h1]
        return inputs + ([context] if self.m.attention is not None else [])

    def encode(self, features, noise=None, encoder_mask=None):
        m, cfg = self.m, self.cfg
        batch = features.shape[0]
        x = features + noise if noise is not None else features
        x = (x - m.feature_mean) / m.feature_std
        h1 = c1 = h2 = c2 = tf.zeros([batch, cfg.hidden])
        outputs = []
        for t in range(cfg.frames):
            h1, c1 = lstm_step(m.lstm1, [m.frame_projection(x[:, t])], h1, c1)
            h1_out = h1 if encoder_mask is None else h1 * encoder_mask[t]
            h2, c2 = lstm_step(m.lstm2, self.lstm2_inputs(tf.fill([batch], PAD), h1_out, tf.zeros_like(h1)), h2, c2)
            outputs.append(h2)
        return (h1, c1, h2, c2), tf.stack(outputs, 1)

    def decode_step(self, state, word_ids, encoder_outputs, h1_mask=None, h2_mask=None):
        h1, c1, h2, c2 = state
        h1, c1 = lstm_step(self.m.lstm1, [tf.zeros([h1.shape[0], self.cfg.frame_embed])], h1, c1)
        weights, context = (self.attend(encoder_outputs, h2) if self.m.attention is not None
                            else (None, None))
        h1_out = h1 if h1_mask is None else h1 * h1_mask
        h2, c2 = lstm_step(self.m.lstm2, self.lstm2_inputs(word_ids, h1_out, context), h2, c2)
        h2_out = h2 if h2_mask is None else h2 * h2_mask
        return (h1, c1, h2, c2), self.m.output_projection(h2_out), weights

    def loss(self, features, captions, teacher_forcing_prob, seed, training):
        batch, length = captions.shape
        draws = self.m.training_draws(seed, batch, length, teacher_forcing_prob, training)
        state, encoder_outputs = self.encode(features, draws["noise"], draws["encoder_mask"])
        word = tf.fill([batch], BOS)
        logits = []
        for t in range(length):
            if t > 0:
                predicted = tf.argmax(logits[-1], -1, output_type=tf.int32)
                word = tf.where(draws["use_truth"][t], captions[:, t - 1], predicted)
            masks = (draws["h1_mask"][t], draws["h2_mask"][t]) if training else (None, None)
            state, step_logits, _ = self.decode_step(state, word, encoder_outputs, *masks)
            logits.append(step_logits)
        return caption_loss(tf.stack(logits, 1), captions)

    def log_probs(self, features, words):
        """Per-step log-probabilities (batch, steps, vocab) of the model fed <BOS> then words[:, :-1]."""
        state, encoder_outputs = self.encode(features)
        word, steps = tf.fill([features.shape[0]], BOS), []
        for t in range(words.shape[1]):
            state, logits, _ = self.decode_step(state, word, encoder_outputs)
            steps.append(tf.nn.log_softmax(logits).numpy())
            word = tf.constant(words[:, t])
        return np.stack(steps, 1)


def up_to_eos(words):
    """True at each caption's words up to and including its first <EOS> (the rest is padding)."""
    return np.cumsum(words == EOS, 1) - (words == EOS) == 0


def trained_like(attention):
    """A tiny model whose standardisation and weights are not the initial ones."""
    keras.utils.set_random_seed(11)
    model = make_model(attention)
    rng = np.random.default_rng(11)
    model.adapt_features(rng.normal(2.0, 3.0, size=(20, 7, 10)).astype(np.float32))
    model.output_projection.kernel.assign(model.output_projection.kernel * 4.0)  # peaked, so argmax matters
    return model


@pytest.mark.parametrize("attention", ["none", "bahdanau", "luong"])
@pytest.mark.parametrize("teacher_forcing_prob, training", [(1.0, False), (0.5, True), (0.0, True)])
def test_optimised_training_step_equals_the_straightforward_one(attention, teacher_forcing_prob, training):
    model = trained_like(attention)
    features, captions = batch(size=6, length=6, seed=2)
    seed = tf.constant([5, 9], tf.int64)
    with tf.GradientTape(persistent=True) as tape:
        fast = caption_loss(model(features, captions, teacher_forcing_prob=teacher_forcing_prob, seed=seed,
                                  training=training)[0], captions)
        plain = StraightforwardS2VT(model).loss(features, captions, teacher_forcing_prob, seed, training)
    assert float(fast) == pytest.approx(float(plain), rel=1e-5)
    fast_grads = tape.gradient(fast, model.trainable_variables)
    plain_grads = tape.gradient(plain, model.trainable_variables)
    for variable, g_fast, g_plain in zip(model.trainable_variables, fast_grads, plain_grads):
        g_fast, g_plain = tf.convert_to_tensor(g_fast).numpy(), tf.convert_to_tensor(g_plain).numpy()
        scale = max(np.abs(g_plain).max(), 1e-8)
        assert np.abs(g_fast - g_plain).max() <= 1e-4 * scale, variable.path
    assert any(np.abs(tf.convert_to_tensor(g).numpy()).max() > 0 for g in fast_grads)


@pytest.mark.parametrize("attention", ["none", "bahdanau", "luong"])
def test_optimised_greedy_and_beam_equal_the_straightforward_decoder(attention):
    model = trained_like(attention)
    features, _ = batch(size=8, seed=4)
    words = model.greedy(features, max_len=6)[0].numpy()
    plain = StraightforwardS2VT(model)
    # every greedy word is the straightforward model's argmax among the words a caption may hold, after the same
    # history, up to float rounding
    log_probs = plain.log_probs(features, words)
    log_probs[:, :, list(NEVER_WRITTEN)] = -np.inf
    chosen = np.take_along_axis(log_probs, words[:, :, None], 2)[:, :, 0]
    assert np.all((chosen >= log_probs.max(-1) - 1e-5)[up_to_eos(words)])
    assert len({tuple(row) for row in words}) > 1  # the videos are told apart
    # beam search's summed log-probabilities are those of its captions under the straightforward model
    beam_words, _, beam_log_probs, _ = model.beam_search(features, beam_size=3, max_len=6, n_best=3)
    flat = beam_words.numpy().reshape(-1, beam_words.shape[-1])
    step_log_probs = plain.log_probs(tf.repeat(features, 3, axis=0), flat)
    totals = np.sum(np.where(up_to_eos(flat), np.take_along_axis(step_log_probs, flat[:, :, None], 2)[:, :, 0], 0.0), 1)
    np.testing.assert_allclose(beam_log_probs.numpy().reshape(-1), totals, rtol=1e-4, atol=1e-4)


def test_bfloat16_matmuls_stay_close_to_float32():
    model = trained_like("bahdanau")
    features, captions = batch(size=6, length=6, seed=2)
    seed = tf.constant([5, 9], tf.int64)
    fast = make_model("bahdanau", matmul_dtype="bfloat16")
    fast.set_weights(model.get_weights())
    losses, grads = [], []
    for m in (model, fast):
        with tf.GradientTape() as tape:
            losses.append(caption_loss(m(features, captions, seed=seed, training=True)[0], captions))
        grads.append(tape.gradient(losses[-1], m.trainable_variables))
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-2)
    assert float(losses[1]) != float(losses[0])  # the bfloat16 path really ran
    for g32, g16 in zip(*grads):
        g32, g16 = tf.convert_to_tensor(g32).numpy(), tf.convert_to_tensor(g16).numpy()
        assert np.abs(g16 - g32).max() <= 0.05 * np.abs(g32).max()
