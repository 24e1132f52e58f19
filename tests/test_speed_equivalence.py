"""The optimised model against a straightforward one: same loss, gradients and decoded captions.

`StraightforwardS2VT` below is S2VT written the plain way, batch-major, one Python-level step at a time, every
input projected at every step and the backend's own gradients throughout (keras.ops, no custom gradient, no scan).
It reads the optimised model's weights and its random draws (noise, dropout masks, sampling coins), so any
difference is in the computation. With a bidirectional encoder it runs the backward LSTM step by step from the last
frame, and its gradients are the backend's where the optimised model's are lstm_sequence's hand-written ones.
"""
import numpy as np
import pytest
from keras import ops

from decoding import NEVER_WRITTEN
from model import caption_loss
from test_model import batch, make_model
from util import backend
from util.vocab import BOS, EOS, PAD


def lstm_step(layer, inputs, h, c):
    """One LSTM step from a list of inputs matching layer.kernels."""
    z = sum(ops.matmul(x, k) for x, k in zip(inputs, layer.kernels)) + ops.matmul(h, layer.recurrent_kernel)
    i, f, g, o = ops.split(z + layer.bias, 4, axis=-1)
    c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
    return ops.sigmoid(o) * ops.tanh(c), c


class StraightforwardS2VT:
    def __init__(self, model):
        self.m = model
        self.cfg = model.config

    def attend(self, encoder_outputs, query):
        """encoder_outputs (batch, frames, hidden), query (batch, hidden) -> weights (batch, frames), context."""
        att = self.m.attention
        if att.kind == "bahdanau":
            scores = ops.sum(att.v * ops.tanh(ops.matmul(encoder_outputs, att.w_keys)
                                              + ops.matmul(query, att.w_query)[:, None, :]), -1)
        else:
            scores = ops.sum(ops.matmul(query, att.w)[:, None, :] * encoder_outputs, -1)
        weights = ops.softmax(scores, axis=1)
        return weights, ops.sum(weights[:, :, None] * encoder_outputs, 1)

    def lstm2_inputs(self, word_ids, h1, context, backward):
        inputs = [ops.take(self.m.word_embedding.embeddings, word_ids, axis=0), h1]
        return (inputs + ([context] if self.m.attention is not None else [])
                + ([backward] if self.m.lstm1_backward is not None else []))

    def backward_outputs(self, frames_in, backward_mask=None):
        """The backward LSTM's output at each frame, reading from the last frame to the first; zeros without one."""
        m = self.m
        zeros = ops.zeros((frames_in[0].shape[0], self.cfg.hidden))
        outputs, h, c = [zeros] * len(frames_in), zeros, zeros
        if m.lstm1_backward is None:
            return outputs
        for t in reversed(range(len(frames_in))):
            h, c = lstm_step(m.lstm1_backward, [frames_in[t]], h, c)
            outputs[t] = h if backward_mask is None else h * backward_mask[t]
        return outputs

    def encode(self, features, noise=None, encoder_mask=None, backward_mask=None):
        m, cfg = self.m, self.cfg
        batch = features.shape[0]
        x = features + noise if noise is not None else features
        x = (x - m.feature_mean) / m.feature_std
        frames_in = [m.frame_projection(x[:, t]) for t in range(cfg.frames)]
        backward = self.backward_outputs(frames_in, backward_mask)
        h1 = c1 = h2 = c2 = ops.zeros((batch, cfg.hidden))
        outputs = []
        for t in range(cfg.frames):
            h1, c1 = lstm_step(m.lstm1, [frames_in[t]], h1, c1)
            h1_out = h1 if encoder_mask is None else h1 * encoder_mask[t]
            pad = ops.full((batch,), PAD, "int32")
            h2, c2 = lstm_step(m.lstm2, self.lstm2_inputs(pad, h1_out, ops.zeros_like(h1), backward[t]), h2, c2)
            outputs.append(h2)
        return (h1, c1, h2, c2), ops.stack(outputs, 1)

    def decode_step(self, state, word_ids, encoder_outputs, h1_mask=None, h2_mask=None):
        h1, c1, h2, c2 = state
        h1, c1 = lstm_step(self.m.lstm1, [ops.zeros((h1.shape[0], self.cfg.hidden))], h1, c1)
        weights, context = (self.attend(encoder_outputs, h2) if self.m.attention is not None
                            else (None, None))
        h1_out = h1 if h1_mask is None else h1 * h1_mask
        h2, c2 = lstm_step(self.m.lstm2, self.lstm2_inputs(word_ids, h1_out, context, ops.zeros_like(h1)), h2, c2)
        h2_out = h2 if h2_mask is None else h2 * h2_mask
        return (h1, c1, h2, c2), self.m.output_projection(h2_out), weights

    def loss(self, features, captions, teacher_forcing_prob, seed, training):
        batch, length = captions.shape
        draws = self.m.training_draws(seed, batch, length, teacher_forcing_prob, training)
        state, encoder_outputs = self.encode(features, draws["noise"], draws["encoder_mask"], draws["backward_mask"])
        word = ops.full((batch,), BOS, "int32")
        logits = []
        for t in range(length):
            if t > 0:
                predicted = ops.cast(ops.argmax(logits[-1], -1), "int32")
                word = ops.where(draws["use_truth"][t], captions[:, t - 1], predicted)
            masks = (draws["h1_mask"][t], draws["h2_mask"][t]) if training else (None, None)
            state, step_logits, _ = self.decode_step(state, word, encoder_outputs, *masks)
            logits.append(step_logits)
        return caption_loss(ops.stack(logits, 1), captions)

    def log_probs(self, features, words):
        """Per-step log-probabilities (batch, steps, vocab) of the model fed <BOS> then words[:, :-1]."""
        state, encoder_outputs = self.encode(features)
        word, steps = ops.full((features.shape[0],), BOS, "int32"), []
        for t in range(words.shape[1]):
            state, logits, _ = self.decode_step(state, word, encoder_outputs)
            steps.append(ops.convert_to_numpy(ops.log_softmax(logits, axis=-1)))
            word = words[:, t]
        return np.stack(steps, 1)


def up_to_eos(words):
    """True at each caption's words up to and including its first <EOS> (the rest is padding)."""
    return np.cumsum(words == EOS, 1) - (words == EOS) == 0


def trained_like(attention, encoder="unidirectional", **overrides):
    """A tiny model whose standardisation and weights are not the initial ones."""
    model = make_model(attention, seed=13, encoder=encoder, **overrides)  # greedy captions differ between videos
    rng = np.random.default_rng(11)
    model.adapt_features(rng.normal(2.0, 3.0, size=(20, 7, 10)).astype(np.float32))
    kernel = model.output_projection.kernel
    kernel.assign(ops.convert_to_numpy(kernel) * 4.0)  # peaked, so argmax matters
    return model


def loss_and_gradients(model, loss_fn):
    """The loss and its gradients for model.trainable_variables, as numpy."""
    loss, gradients = backend.loss_and_gradients(model, loss_fn)
    return float(loss), backend.to_numpy(gradients)


@pytest.mark.parametrize("attention, encoder", [("none", "unidirectional"), ("bahdanau", "unidirectional"),
                                                ("luong", "unidirectional"), ("none", "bidirectional"),
                                                ("bahdanau", "bidirectional"), ("luong", "bidirectional")])
@pytest.mark.parametrize("teacher_forcing_prob, training", [(1.0, False), (0.5, True), (0.0, True)])
def test_optimised_training_step_equals_the_straightforward_one(attention, encoder, teacher_forcing_prob, training):
    model = trained_like(attention, encoder)
    gradients = assert_same_training_step(model, StraightforwardS2VT(model).loss, teacher_forcing_prob, training)
    assert any(np.abs(g).max() > 0 for g in gradients)


def assert_same_training_step(model, straightforward_loss, teacher_forcing_prob, training):
    """The model's loss and every gradient on a small batch against straightforward_loss(features, captions,
    teacher_forcing_prob, seed, training)'s, with the same random draws; returns the gradients."""
    features, captions = batch(size=6, length=6, seed=2)
    seed = backend.seed_tensor(5, 9)
    fast, fast_grads = loss_and_gradients(model, lambda: caption_loss(
        model(features, captions, teacher_forcing_prob=teacher_forcing_prob, seed=seed, training=training)[0],
        captions))
    plain, plain_grads = loss_and_gradients(model, lambda: straightforward_loss(
        features, captions, teacher_forcing_prob, seed, training))
    assert fast == pytest.approx(plain, rel=1e-5)
    assert len(fast_grads) == len(plain_grads) == len(model.trainable_variables)
    for variable, g_fast, g_plain in zip(model.trainable_variables, fast_grads, plain_grads):
        scale = max(np.abs(g_plain).max(), 1e-8)
        assert np.abs(g_fast - g_plain).max() <= 1e-4 * scale, variable.path
    return fast_grads


@pytest.mark.parametrize("attention, encoder", [("none", "unidirectional"), ("bahdanau", "unidirectional"),
                                                ("luong", "unidirectional"), ("bahdanau", "bidirectional")])
def test_optimised_greedy_and_beam_equal_the_straightforward_decoder(attention, encoder):
    model = trained_like(attention, encoder)
    features, _ = batch(size=8, seed=4)
    words = ops.convert_to_numpy(model.greedy(features, max_len=6)[0])
    plain = StraightforwardS2VT(model)
    # every greedy word is the straightforward model's argmax among the words a caption may hold, after the same
    # history, up to float rounding
    log_probs = plain.log_probs(features, words)
    log_probs[:, :, list(NEVER_WRITTEN)] = -np.inf
    chosen = np.take_along_axis(log_probs, words[:, :, None], 2)[:, :, 0]
    assert np.all((chosen >= log_probs.max(-1) - 1e-5)[up_to_eos(words)])
    assert np.all(words[~up_to_eos(words)] == PAD)
    assert len({tuple(row) for row in words}) > 1  # the videos are told apart
    # beam search's summed log-probabilities are those of its captions under the straightforward model
    beam_words, _, beam_log_probs, _ = backend.to_numpy(model.beam_search(features, beam_size=3, max_len=6, n_best=3))
    flat = beam_words.reshape(-1, beam_words.shape[-1])
    step_log_probs = plain.log_probs(np.repeat(features, 3, axis=0), flat)
    totals = np.sum(np.where(up_to_eos(flat), np.take_along_axis(step_log_probs, flat[:, :, None], 2)[:, :, 0], 0.0), 1)
    np.testing.assert_allclose(beam_log_probs.reshape(-1), totals, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention, variant", [("bahdanau", {}), ("luong", {"encoder": "bidirectional"}),
                                                ("none", {"model": "meanpool"})])
def test_bfloat16_matmuls_stay_close_to_float32(attention, variant):
    model = trained_like(attention, **variant)
    features, captions = batch(size=6, length=6, seed=2)
    seed = backend.seed_tensor(5, 9)
    fast = make_model(attention, matmul_dtype="bfloat16", **variant)
    fast.set_weights(model.get_weights())
    losses, grads = zip(*[loss_and_gradients(m, lambda: caption_loss(m(features, captions, seed=seed, training=True)[0],
                                                                     captions)) for m in (model, fast)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    assert losses[1] != losses[0]  # the bfloat16 path really ran
    for g32, g16 in zip(*grads):
        assert np.abs(g16 - g32).max() <= 0.05 * np.abs(g32).max()
