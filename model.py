"""S2VT (Venugopalan et al., ICCV 2015) with optional Bahdanau or Luong attention, in Keras 3 on TensorFlow.

Two stacked LSTMs read the video, then write the caption:
  encoding, per frame:  LSTM1 <- projected frame features;   LSTM2 <- [<PAD> embedding, LSTM1 output, zero context]
  decoding, per word:   LSTM1 <- zeros;                       LSTM2 <- [previous word embedding, LSTM1 output, context]
Every LSTM2 input keeps its position in both stages. The context is attention over LSTM2's encoder outputs,
queried by LSTM2's previous state, softmaxed over the frames.

Speed (bench.py; tests/test_speed_equivalence.py checks it against a plain step-by-step S2VT):
- Sequences are time-major, (steps, batch, ...), and every input projection that does not depend on the previous
  step is one matmul before the loop: the frames for both LSTMs, and LSTM1's whole decoding run, which reads zeros
  and so does not depend on the words. Feature standardisation is folded into the frame projection's weights.
- `lstm_sequence` runs an LSTM over precomputed input gates with a hand-written backward pass: one recurrent matmul
  per step, the recurrent kernel's gradient as one matmul after the loop (TensorFlow's while-loop gradient does
  two small matmuls per step and a lot of bookkeeping).
- A decoder step does one matmul for LSTM2's word, context and recurrent inputs together; the output projection
  for the loss is one matmul after the loop (inside it only scheduled sampling's argmax needs it, with no gradient).
- Bahdanau attention is XLA-compiled, and its backward pass recomputes tanh(W1 h_s + W2 h_t) rather than keeping
  a (batch, frames, dim) tensor per decoder step.
- matmul_dtype="bfloat16" runs the large matmuls in bfloat16 (weights, gates and cell states stay float32).
Randomness (feature noise, dropout, scheduled-sampling coins) is stateless, drawn from a seed passed per call,
so a training step is a pure function of (weights, batch, seed) and a resumed run replays exactly.
"""
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from util.data import feature_moments
from util.vocab import BOS, EOS, PAD, UNK

ATTENTIONS = ("none", "bahdanau", "luong")
MATMUL_DTYPES = ("float32", "bfloat16")
NEVER_WRITTEN = (PAD, BOS, UNK)  # tokens that decoding never writes


@dataclass
class S2VTConfig:
    vocab_size: int
    feature_dim: int = 4096
    frames: int = 80
    hidden: int = 600
    frame_embed: int = 600
    word_embed: int = 600
    attention: str = "bahdanau"
    attention_dim: int = 600
    max_caption_len: int = 50  # tokens, <EOS> included
    dropout: float = 0.5
    feature_noise: float = 0.1  # training adds uniform(-noise, +noise) to every feature
    matmul_dtype: str = "float32"  # or "bfloat16": the large matmuls' inputs (weights stay float32)

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, not {self.matmul_dtype!r}")
        for name in ("vocab_size", "feature_dim", "frames", "hidden", "frame_embed", "word_embed",
                     "attention_dim", "max_caption_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)


def lstm_cell(gates, c):
    """LSTM nonlinearity on gate pre-activations (batch, 4*units), gates ordered (input, forget, cell, output).
    Returns h, c and the activated gates (batch, 4*units), which the backward pass reuses."""
    i, f, g, o = tf.split(gates, 4, axis=-1)
    i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
    c = f * c + i * g
    return o * tf.tanh(c), c, tf.concat([i, f, g, o], -1)


def matmul(a, b, dtype="float32", **kwargs):
    """a @ b with both cast to dtype, result float32: bfloat16 runs large matmuls about 1.75x faster on CPUs with
    AVX512-BF16 (and on GPU tensor cores); gradients flow through the casts."""
    if dtype == "float32":
        return tf.matmul(a, b, **kwargs)
    return tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype), **kwargs), tf.float32)


def sequence_matmul(x, kernel, dtype="float32"):
    """(..., in) @ (in, out) -> (..., out) as one 2-d matmul."""
    flat = matmul(tf.reshape(x, [-1, tf.shape(x)[-1]]), kernel, dtype)  # (everything else, out)
    return tf.reshape(flat, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[1:]], 0))


def lstm_sequence(input_gates, h, c, recurrent_kernel, dtype="float32"):
    """Run an LSTM over precomputed input gates (time, batch, 4*units) from state (h, c).
    Returns outputs (time, batch, units), the last h and the last c. Matmuls run in dtype; gates and cell states
    stay float32."""
    return _LSTM_SEQUENCES[dtype](input_gates, h, c, recurrent_kernel)


def _lstm_sequence_with_gradient(dtype):
    @tf.custom_gradient
    def lstm_sequence(input_gates, h, c, recurrent_kernel):
        # Neither loop is differentiated by TensorFlow, so they index tensors directly: no TensorArray copies.
        steps = tf.shape(input_gates)[0]
        h_ta, c_ta, act_ta = (tf.TensorArray(input_gates.dtype, size=steps) for _ in range(3))

        step_kernel = tf.cast(recurrent_kernel, dtype)  # cast once, not per step

        def body(t, h, c, h_ta, c_ta, act_ta):
            h, c, activated = lstm_cell(input_gates[t] + matmul(h, step_kernel, dtype), c)
            return t + 1, h, c, h_ta.write(t, h), c_ta.write(t, c), act_ta.write(t, activated)

        h0, c0 = h, c
        _, h, c, h_ta, c_ta, act_ta = tf.while_loop(lambda t, *_: t < steps, body, (0, h, c, h_ta, c_ta, act_ta))
        outputs, cells, activated = h_ta.stack(), c_ta.stack(), act_ta.stack()  # (time, batch, units | 4*units)

        def grad(d_outputs, d_h, d_c):
            d_outputs = tf.zeros_like(outputs) if d_outputs is None else d_outputs
            d_h = tf.zeros_like(h0) if d_h is None else d_h
            d_c = tf.zeros_like(c0) if d_c is None else d_c
            d_gates_ta = tf.TensorArray(outputs.dtype, size=steps)

            def back(t, d_h, d_c, d_gates_ta):
                i, f, g, o = tf.split(activated[t], 4, axis=-1)
                tanh_c = tf.tanh(cells[t])
                previous_c = tf.where(t > 0, cells[tf.maximum(t - 1, 0)], c0)  # no tf.cond: cheaper per step
                d_h = d_h + d_outputs[t]
                d_c = d_c + d_h * o * (1.0 - tanh_c * tanh_c)
                d_gates = tf.concat([d_c * g * i * (1.0 - i), d_c * previous_c * f * (1.0 - f),
                                     d_c * i * (1.0 - g * g), d_h * tanh_c * o * (1.0 - o)], -1)
                d_h = matmul(d_gates, step_kernel, dtype, transpose_b=True)
                return t - 1, d_h, d_c * f, d_gates_ta.write(t, d_gates)

            _, d_h, d_c, d_gates_ta = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, d_h, d_c, d_gates_ta))
            d_gates = d_gates_ta.stack()  # (time, batch, 4*units)
            units = tf.shape(h0)[-1]
            previous_h = tf.reshape(tf.concat([h0[None], outputs[:-1]], 0), [-1, units])  # (time*batch, units)
            d_recurrent = matmul(previous_h, tf.reshape(d_gates, [-1, 4 * units]), dtype, transpose_a=True)
            return d_gates, d_h, d_c, d_recurrent

        return (outputs, h, c), grad

    return lstm_sequence


_LSTM_SEQUENCES = {dtype: _lstm_sequence_with_gradient(dtype) for dtype in MATMUL_DTYPES}


class LSTMWeights(keras.layers.Layer):
    """One LSTM's weights, gates ordered (input, forget, cell, output); the input kernel is split in blocks
    so each input (frame, word, LSTM1 output, context) can be projected on its own."""

    def __init__(self, input_dims, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.input_count = len(input_dims)
        for i, dim in enumerate(input_dims):  # one attribute each: tf.train.Checkpoint does not see into lists
            setattr(self, f"kernel_{i}", self.add_weight(shape=(dim, 4 * units), initializer="glorot_uniform",
                                                         name=f"kernel_{i}"))
        self.recurrent_kernel = self.add_weight(shape=(units, 4 * units), initializer="orthogonal",
                                                name="recurrent_kernel")
        forget_bias_one = tf.concat([tf.zeros([units]), tf.ones([units]), tf.zeros([2 * units])], 0)
        self.bias = self.add_weight(shape=(4 * units,), initializer=lambda shape, dtype=None: forget_bias_one,
                                    name="bias")

    @property
    def kernels(self):
        return [getattr(self, f"kernel_{i}") for i in range(self.input_count)]

    def run(self, input_gates, h, c, dtype="float32"):
        """Over a whole sequence of input gates (time, batch, 4*units) -> outputs (time, batch, units), h, c."""
        return lstm_sequence(input_gates, h, c, tf.convert_to_tensor(self.recurrent_kernel), dtype)


@tf.function(jit_compile=True)  # XLA fuses the add, tanh and reduction over (batch, frames, dim): 2-3x faster
def _additive_forward(keys, encoder_outputs, projected_query, v):
    scores = tf.squeeze(tf.matmul(tf.tanh(keys + projected_query[:, None, :]), v[:, None]), -1)  # (batch, frames)
    weights = tf.nn.softmax(scores, axis=-1)
    return weights, tf.squeeze(tf.matmul(weights[:, None, :], encoder_outputs), 1)


@tf.function(jit_compile=True)
def _additive_backward(keys, encoder_outputs, projected_query, v, weights, d_weights, d_context):
    d_weights += tf.squeeze(tf.matmul(encoder_outputs, d_context[:, :, None]), -1)  # (batch, frames)
    d_scores = weights * (d_weights - tf.reduce_sum(weights * d_weights, -1, keepdims=True))
    activation = tf.tanh(keys + projected_query[:, None, :])  # recomputed: storing it costs batch*frames*dim a step
    d_keys = d_scores[:, :, None] * v * (1.0 - activation * activation)  # (batch, frames, dim)
    return (d_keys, weights[:, :, None] * d_context[:, None, :], tf.reduce_sum(d_keys, 1),
            tf.einsum("bf,bfa->a", d_scores, activation))


@tf.custom_gradient
def additive_attention(keys, encoder_outputs, projected_query, v):
    """Bahdanau: keys (batch, frames, dim) = W1 h_s, projected_query (batch, dim) = W2 h_t
    -> weights (batch, frames), softmax over frames, and context (batch, hidden)."""
    weights, context = _additive_forward(keys, encoder_outputs, projected_query, v)

    def grad(d_weights, d_context):
        d_weights = tf.zeros_like(weights) if d_weights is None else d_weights
        d_context = tf.zeros_like(context) if d_context is None else d_context
        return _additive_backward(keys, encoder_outputs, projected_query, v, weights, d_weights, d_context)

    return (weights, context), grad


@tf.function(jit_compile=True)
def multiplicative_attention(encoder_outputs, projected_query):
    """Luong general: projected_query (batch, hidden) = h_t^T W -> weights (batch, frames), context (batch, hidden)."""
    weights = tf.nn.softmax(tf.squeeze(tf.matmul(encoder_outputs, projected_query[:, :, None]), -1), axis=-1)
    return weights, tf.squeeze(tf.matmul(weights[:, None, :], encoder_outputs), 1)


class Attention(keras.layers.Layer):
    """Scores each frame's encoder output h_s against the query h_t; softmax over frames."""

    def __init__(self, kind, hidden, attention_dim, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        if kind == "bahdanau":  # v^T tanh(W1 h_s + W2 h_t)
            self.w_keys = self.add_weight(shape=(hidden, attention_dim), initializer="glorot_uniform", name="w1")
            self.w_query = self.add_weight(shape=(hidden, attention_dim), initializer="glorot_uniform", name="w2")
            self.v = self.add_weight(shape=(attention_dim,), initializer=keras.initializers.RandomUniform(-0.1, 0.1),
                                     name="v")
        else:  # luong "general": h_t^T W h_s
            self.w = self.add_weight(shape=(hidden, hidden), initializer="glorot_uniform", name="w")

    def keys(self, encoder_outputs, dtype="float32"):
        """Per-batch precomputation over all frames: (batch, frames, hidden) -> (batch, frames, dim)."""
        if self.kind != "bahdanau":
            return encoder_outputs
        return sequence_matmul(encoder_outputs, self.w_keys, dtype)

    def weights_and_context(self, keys, encoder_outputs, query):
        """keys (batch, frames, dim), encoder outputs (batch, frames, hidden), query (batch, hidden)
        -> weights (batch, frames), context (batch, hidden)."""
        if self.kind == "bahdanau":
            return additive_attention(keys, encoder_outputs, tf.matmul(query, self.w_query),
                                      tf.convert_to_tensor(self.v))
        return multiplicative_attention(encoder_outputs, tf.matmul(query, self.w))


class S2VT(keras.Model):
    def __init__(self, config: S2VTConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        h = config.hidden
        self.frame_projection = keras.layers.Dense(config.frame_embed, name="frame_projection")
        self.frame_projection.build((None, config.feature_dim))
        self.word_embedding = keras.layers.Embedding(config.vocab_size, config.word_embed, name="word_embedding")
        self.word_embedding.build((None,))
        self.lstm1 = LSTMWeights([config.frame_embed], h, name="lstm1")
        lstm2_inputs = [config.word_embed, h] + ([h] if config.attention != "none" else [])
        self.lstm2 = LSTMWeights(lstm2_inputs, h, name="lstm2")
        self.attention = (Attention(config.attention, h, config.attention_dim, name="attention")
                          if config.attention != "none" else None)
        self.output_projection = keras.layers.Dense(config.vocab_size, name="output_projection")
        self.output_projection.build((None, h))
        # Per-dimension feature standardisation, set from the training features by adapt_features().
        self.feature_mean = self.add_weight(shape=(config.feature_dim,), initializer="zeros", trainable=False,
                                            name="feature_mean")
        self.feature_std = self.add_weight(shape=(config.feature_dim,), initializer="ones", trainable=False,
                                           name="feature_std")
        self.built = True

    def adapt_features(self, features):
        """Set the standardisation from training features (videos, frames, dim), read in chunks.

        The variance gets a floor of 10% of the mean variance, so a nearly constant dimension (common in ReLU
        features) is not blown up into huge outliers that saturate the LSTMs."""
        mean, variance = feature_moments(features)
        self.feature_mean.assign(mean.astype("float32"))
        self.feature_std.assign(np.sqrt(variance + 0.1 * variance.mean() + 1e-12).astype("float32"))

    # ---- randomness: stateless, so (weights, batch, seed) fixes the result ----
    def training_draws(self, seed, batch, length, teacher_forcing_prob, training):
        """Every random draw of one training pass, from a seed (2 ints): feature noise (batch, frames, dim),
        dropout masks already scaled by 1/keep for LSTM1's encoder outputs (frames, batch, hidden) and for both
        LSTMs' decoder outputs (length, batch, hidden), and the scheduled-sampling coins (length, batch), True
        where the ground truth is fed (always at step 0). Without training, no noise and all-ones masks."""
        cfg = self.config
        noise_seed, encoder_seed, coin_seed, h1_seed, h2_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5))
        use_truth = tf.random.stateless_uniform([length, batch], coin_seed) < teacher_forcing_prob
        draws = {"use_truth": use_truth | tf.equal(tf.range(length), 0)[:, None]}
        if not training:
            return dict(draws, noise=None, encoder_mask=None, h1_mask=None, h2_mask=None)
        keep = 1.0 - cfg.dropout

        def mask(shape, mask_seed):
            return tf.cast(tf.random.stateless_uniform(shape, mask_seed) < keep, tf.float32) / keep

        return dict(draws, noise=tf.random.stateless_uniform([batch, cfg.frames, cfg.feature_dim], noise_seed,
                                                             -cfg.feature_noise, cfg.feature_noise),
                    encoder_mask=mask([cfg.frames, batch, cfg.hidden], encoder_seed),
                    h1_mask=mask([length, batch, cfg.hidden], h1_seed),
                    h2_mask=mask([length, batch, cfg.hidden], h2_seed))

    # ---- encoding stage ----
    def encode(self, frame_features, noise=None, encoder_mask=None):
        """frame_features (batch, frames, feature_dim) -> encoder state dict; outputs and keys (batch, frames, ...).
        Training passes the feature noise and the dropout mask on LSTM1's outputs (training_draws)."""
        x = tf.cast(frame_features, tf.float32)
        if noise is not None:
            x += noise
        # Standardisation folded into the projection: ((x - mean) / std) W + b = x (W / std) + (b - (mean / std) W).
        kernel = self.frame_projection.kernel / self.feature_std[:, None]
        bias = self.frame_projection.bias - tf.linalg.matvec(kernel, self.feature_mean, transpose_a=True)
        dtype = self.config.matmul_dtype
        frames_in = tf.transpose(sequence_matmul(x, kernel, dtype) + bias, [1, 0, 2])  # (frames, batch, embed)
        zeros = tf.zeros([tf.shape(x)[0], self.config.hidden])
        h1_seq, h1, c1 = self.lstm1.run(sequence_matmul(frames_in, self.lstm1.kernels[0], dtype) + self.lstm1.bias,
                                        zeros, zeros, dtype)
        if encoder_mask is not None:
            h1_seq *= encoder_mask
        # the <PAD> word and a zero context, in the same positions as the words and contexts of decoding
        pad_gates = tf.matmul(self.word_embedding.embeddings[PAD][None], self.lstm2.kernels[0]) + self.lstm2.bias
        encoder_outputs, h2, c2 = self.lstm2.run(sequence_matmul(h1_seq, self.lstm2.kernels[1], dtype) + pad_gates,
                                                 zeros, zeros, dtype)
        encoder_outputs = tf.transpose(encoder_outputs, [1, 0, 2])  # (batch, frames, hidden) for attention
        keys = self.attention.keys(encoder_outputs, dtype) if self.attention is not None else encoder_outputs
        return {"h1": h1, "c1": c1, "h2": h2, "c2": c2, "outputs": encoder_outputs, "keys": keys}

    # ---- decoding stage: steps shared by training, greedy and beam search ----
    def decoding_kernels(self):
        """The kernels the decoder's steps multiply by, cast to the matmul precision once, before the loop:
        "step" stacks LSTM2's word, context and recurrent kernels, so a step projects its inputs in one matmul."""
        context = [self.lstm2.kernels[2]] if self.attention is not None else []
        kernels = {"step": tf.concat([self.lstm2.kernels[0], *context, self.lstm2.recurrent_kernel], 0),
                   "lstm1_recurrent": self.lstm1.recurrent_kernel, "lstm1_to_lstm2": self.lstm2.kernels[1],
                   "output": self.output_projection.kernel}
        return {name: tf.cast(kernel, self.config.matmul_dtype) for name, kernel in kernels.items()}

    def lstm1_decode_step(self, h1, c1, kernels):
        """LSTM1 reads zero frames: returns its new (h1, c1); its output feeds LSTM2 through lstm1_to_lstm2."""
        recurrent = matmul(h1, kernels["lstm1_recurrent"], self.config.matmul_dtype)
        h1, c1, _ = lstm_cell(self.lstm1.bias + recurrent, c1)
        return h1, c1

    def lstm1_to_lstm2(self, h1, kernels):
        """LSTM1's output's share of LSTM2's gates, LSTM2's bias included: (..., hidden) -> (..., 4*hidden)."""
        return sequence_matmul(h1, kernels["lstm1_to_lstm2"], self.config.matmul_dtype) + self.lstm2.bias

    def lstm2_decode_step(self, from_lstm1, word_ids, h2, c2, encoded, kernels):
        """Advance LSTM2 one word: from_lstm1 (batch, 4*hidden) from lstm1_to_lstm2, word_ids (batch,).
        Returns h2, c2 and the attention weights (batch, frames)."""
        inputs = [tf.gather(self.word_embedding.embeddings, word_ids)]
        if self.attention is not None:
            weights, context = self.attention.weights_and_context(encoded["keys"], encoded["outputs"], h2)
            inputs.append(context)
        else:
            weights = tf.zeros([tf.shape(word_ids)[0], tf.shape(encoded["outputs"])[1]])
        step_inputs = tf.concat(inputs + [h2], 1)
        h2, c2, _ = lstm_cell(from_lstm1 + matmul(step_inputs, kernels["step"], self.config.matmul_dtype), c2)
        return h2, c2, weights

    def word_logits(self, h2, kernels):
        """(..., hidden) -> (..., vocab), in the configured matmul precision."""
        return sequence_matmul(h2, kernels["output"], self.config.matmul_dtype) + self.output_projection.bias

    def writable_log_probs(self, h2, kernels):
        """Log-probabilities of the next word (batch, vocab), -inf for the tokens a caption never holds (<PAD>,
        <BOS>, <UNK>): decoding must not write them, and the other words keep their model probabilities."""
        never = tf.reduce_sum(tf.one_hot(NEVER_WRITTEN, self.config.vocab_size), 0) > 0  # (vocab,)
        return tf.where(never, -np.inf, tf.nn.log_softmax(self.word_logits(h2, kernels)))

    def call(self, frame_features, caption_ids, teacher_forcing_prob=1.0, seed=(0, 0), training=False):
        """Training / scoring pass. caption_ids (batch, length): the words then <EOS>, <PAD>-padded.

        At each step every caption independently feeds its ground-truth previous word with probability
        teacher_forcing_prob, else the model's own previous argmax (scheduled sampling). The seed (2 ints)
        fixes the coins and, with training=True, the feature noise and dropout.
        Returns logits (batch, length, vocab), attention weights (batch, length, frames) and the word ids
        fed at each step (batch, length).
        """
        batch, length = tf.shape(caption_ids)[0], tf.shape(caption_ids)[1]
        dtype = self.config.matmul_dtype
        draws = self.training_draws(seed, batch, length, teacher_forcing_prob, training)
        encoded = self.encode(frame_features, draws["noise"], draws["encoder_mask"])
        previous_truth = tf.concat([tf.fill([batch, 1], BOS), tf.cast(caption_ids[:, :-1], tf.int32)], 1)
        truth_ta = tf.TensorArray(tf.int32, size=length).unstack(tf.transpose(previous_truth))
        use_truth_ta = tf.TensorArray(tf.bool, size=length).unstack(draws["use_truth"])
        # LSTM1 reads zeros while decoding, so its whole run is known before the first word.
        h1_seq, _, _ = self.lstm1.run(tf.broadcast_to(self.lstm1.bias, [length, batch, 4 * self.config.hidden]),
                                      encoded["h1"], encoded["c1"], dtype)  # (length, batch, hidden)
        if training:
            h1_seq *= draws["h1_mask"]
        kernels = self.decoding_kernels()
        from_lstm1_ta = tf.TensorArray(tf.float32, size=length).unstack(self.lstm1_to_lstm2(h1_seq, kernels))
        h2_mask_ta = tf.TensorArray(tf.float32, size=length).unstack(
            draws["h2_mask"] if training else tf.ones([length, 1, 1]))

        def body(t, h2, c2, h2_out, outputs_ta, weights_ta, fed_ta):
            use_truth, truth = use_truth_ta.read(t), truth_ta.read(t)
            word = tf.cond(tf.reduce_all(use_truth), lambda: truth, lambda: tf.where(
                use_truth, truth,
                tf.argmax(self.word_logits(tf.stop_gradient(h2_out), kernels), -1, output_type=tf.int32)))
            h2, c2, weights = self.lstm2_decode_step(from_lstm1_ta.read(t), word, h2, c2, encoded, kernels)
            h2_out = h2 * h2_mask_ta.read(t)
            return (t + 1, h2, c2, h2_out, outputs_ta.write(t, h2_out), weights_ta.write(t, weights),
                    fed_ta.write(t, word))

        _, _, _, _, outputs_ta, weights_ta, fed_ta = tf.while_loop(
            lambda t, *_: t < length, body,
            (0, encoded["h2"], encoded["c2"], encoded["h2"], tf.TensorArray(tf.float32, size=length),
             tf.TensorArray(tf.float32, size=length), tf.TensorArray(tf.int32, size=length)))
        h2_seq = tf.transpose(outputs_ta.stack(), [1, 0, 2])  # (batch, length, hidden)
        logits = self.word_logits(h2_seq, kernels)  # (batch, length, vocab)
        return logits, tf.transpose(weights_ta.stack(), [1, 0, 2]), tf.transpose(fed_ta.stack())

    def greedy(self, frame_features, max_len=None):
        """Greedy decoding, each caption stopping at its <EOS>.
        Returns word ids (batch, steps) <PAD>-filled after <EOS>, and attention weights (batch, steps, frames)."""
        max_len = max_len or self.config.max_caption_len
        encoded = self.encode(frame_features)
        kernels = self.decoding_kernels()
        batch = tf.shape(frame_features)[0]

        def body(t, h1, c1, h2, c2, word, finished, words_ta, weights_ta):
            h1, c1 = self.lstm1_decode_step(h1, c1, kernels)
            h2, c2, weights = self.lstm2_decode_step(self.lstm1_to_lstm2(h1, kernels), word, h2, c2, encoded, kernels)
            word = tf.where(finished, PAD, tf.argmax(self.writable_log_probs(h2, kernels), -1, output_type=tf.int32))
            finished |= tf.equal(word, EOS)
            return t + 1, h1, c1, h2, c2, word, finished, words_ta.write(t, word), weights_ta.write(t, weights)

        steps, *_, words_ta, weights_ta = tf.while_loop(
            lambda t, *state: (t < max_len) & ~tf.reduce_all(state[-3]), body,
            (0, encoded["h1"], encoded["c1"], encoded["h2"], encoded["c2"], tf.fill([batch], BOS),
             tf.zeros([batch], tf.bool), tf.TensorArray(tf.int32, size=max_len),
             tf.TensorArray(tf.float32, size=max_len)))
        words = tf.transpose(words_ta.gather(tf.range(steps)))  # (batch, steps)
        return words, tf.transpose(weights_ta.gather(tf.range(steps)), [1, 0, 2])

    def beam_search(self, frame_features, beam_size, length_penalty=0.0, max_len=None, n_best=1):
        """Beam search, all videos and all their beams decoded together; beam_size=1 gives exactly greedy().

        A hypothesis's log-probability is the sum of its words' (<EOS> included), and it is ranked by
        log_prob / length**length_penalty, the length counting <EOS>. Each step extends every live hypothesis by
        every word; of each video's 2*beam_size best extensions, those among the first beam_size that end in <EOS>
        join the video's finished pool (its beam_size best by rank), and the beam_size best that do not end stay
        live. A video stops when its pool is full, the search when every video has stopped or max_len words were
        written. A video with fewer than n_best finished captions is topped up with its best unfinished ones,
        ranked after the finished.

        Returns, with steps the length of the longest returned hypothesis:
          words      (batch, n_best, steps) int32, best first, <PAD>-filled after each <EOS>;
          scores     (batch, n_best) float32, the ranking scores log_prob / length**length_penalty;
          log_probs  (batch, n_best) float32, the summed log-probabilities;
          attention  (batch, steps, frames) float32, the best hypothesis's attention weights, zero after its end.
        """
        if not 1 <= n_best <= beam_size:
            raise ValueError(f"need 1 <= n_best <= beam_size, not n_best={n_best}, beam_size={beam_size}")
        max_len = max_len or self.config.max_caption_len
        beam, vocab = beam_size, self.config.vocab_size
        batch = tf.shape(frame_features)[0]
        # Rows are video-major, row = video * beam + k: each video's encoding computed once, repeated per beam.
        # LSTM1 reads zeros while decoding, so its state is the same for all beams of a video: kept per video.
        encoded = self.encode(frame_features)
        h1, c1 = encoded["h1"], encoded["c1"]
        encoded = {name: tf.repeat(encoded[name], beam, axis=0) for name in ("outputs", "keys", "h2", "c2")}
        frames = tf.shape(encoded["outputs"])[1]
        kernels = self.decoding_kernels()
        first_rows = tf.range(batch)[:, None] * beam  # (batch, 1)
        neg_inf = tf.constant(-np.inf)

        def rank(log_probs, length):
            return log_probs / tf.pow(tf.cast(length, tf.float32), length_penalty)

        def is_full(pool):
            return tf.reduce_all(pool["rank"] > neg_inf, axis=1)  # (batch,)

        def body(t, h1, c1, state, words, live_scores, pool, tokens_ta, parents_ta, weights_ta):
            h1, c1 = self.lstm1_decode_step(h1, c1, kernels)
            from_lstm1 = tf.repeat(self.lstm1_to_lstm2(h1, kernels), beam, axis=0)  # (batch*beam, 4*hidden)
            h2, c2, weights = self.lstm2_decode_step(from_lstm1, words, state["h2"], state["c2"], encoded, kernels)
            log_probs = tf.reshape(self.writable_log_probs(h2, kernels), [batch, beam, vocab])
            totals = tf.reshape(live_scores[:, :, None] + log_probs, [batch, beam * vocab])
            # 2*beam extensions hold at least beam that do not end: each beam contributes one <EOS> at most.
            candidate_scores, candidate_ids = tf.math.top_k(totals, 2 * beam)  # (batch, 2*beam), best first
            candidate_parents, candidate_words = candidate_ids // vocab, candidate_ids % vocab
            ends = tf.equal(candidate_words, EOS)

            finishing = ends & (tf.range(2 * beam) < beam) & (candidate_scores > neg_inf) & ~is_full(pool)[:, None]
            arrivals = {"rank": tf.where(finishing, rank(candidate_scores, t + 1), neg_inf),
                        "log_prob": candidate_scores, "end": tf.fill(tf.shape(candidate_ids), t),
                        "parent": candidate_parents}
            _, kept = tf.math.top_k(tf.concat([pool["rank"], arrivals["rank"]], 1), beam)  # (batch, beam)
            pool = {name: tf.gather(tf.concat([pool[name], arrivals[name]], 1), kept, batch_dims=1) for name in pool}

            live_scores, continuing = tf.math.top_k(tf.where(ends, neg_inf, candidate_scores), beam)  # (batch, beam)
            parents = tf.gather(candidate_parents, continuing, batch_dims=1)
            new_words = tf.gather(candidate_words, continuing, batch_dims=1)
            rows = tf.reshape(first_rows + parents, [-1])  # (batch*beam,)
            state = {"h2": tf.gather(h2, rows), "c2": tf.gather(c2, rows)}
            return (t + 1, h1, c1, state, tf.reshape(new_words, [-1]), live_scores, pool, tokens_ta.write(t, new_words),
                    parents_ta.write(t, parents), weights_ta.write(t, tf.reshape(weights, [batch, beam, frames])))

        # At step 0 only beam 0 is live, so a video's beams do not all grow the same hypotheses.
        live_scores = tf.tile(tf.concat([[0.0], tf.fill([beam - 1], neg_inf)], 0)[None], [batch, 1])
        empty_pool = {"rank": tf.fill([batch, beam], neg_inf), "log_prob": tf.fill([batch, beam], neg_inf),
                      "end": tf.zeros([batch, beam], tf.int32), "parent": tf.zeros([batch, beam], tf.int32)}
        state = {name: encoded[name] for name in ("h2", "c2")}
        steps, _, _, _, _, live_scores, pool, tokens_ta, parents_ta, weights_ta = tf.while_loop(
            lambda t, h1, c1, state, words, live_scores, pool, *_: (t < max_len) & ~tf.reduce_all(is_full(pool)),
            body, (0, h1, c1, state, tf.fill([batch * beam], BOS), live_scores, empty_pool,
             tf.TensorArray(tf.int32, size=max_len), tf.TensorArray(tf.int32, size=max_len),
             tf.TensorArray(tf.float32, size=max_len)))
        tokens = tokens_ta.gather(tf.range(steps))  # (steps, batch, beam)
        parents = parents_ta.gather(tf.range(steps))  # (steps, batch, beam)
        weights = weights_ta.gather(tf.range(steps))  # (steps, batch, beam, frames), by the beam that was extended

        pool["word"] = tf.fill([batch, beam], EOS)
        live = {"rank": rank(live_scores, steps), "log_prob": live_scores, "end": tf.fill([batch, beam], steps - 1),
                "parent": parents[-1], "word": tokens[-1]}  # both already sorted best first
        finished_count = tf.reduce_sum(tf.cast(pool["rank"] > neg_inf, tf.int32), 1, keepdims=True)  # (batch, 1)
        place = tf.range(n_best)[None]  # (1, n_best)
        pick = tf.where(place < finished_count, place, beam + place - finished_count)  # (batch, n_best)
        best = {name: tf.gather(tf.concat([pool[name], live[name]], 1), pick, batch_dims=1) for name in pool}

        words, attention = self._backtrack(best, tokens, parents, weights, steps)
        length = tf.reduce_max(best["end"]) + 1
        return words[:, :, :length], best["rank"], best["log_prob"], attention[:, 0, :length]

    @staticmethod
    def _backtrack(hypotheses, tokens, parents, weights, steps):
        """Follow beam back-pointers from each hypothesis's last word to its first.

        hypotheses: dict of (batch, n) tensors "end" (step of the last word), "word" (that word) and "parent"
        (the beam it extended); tokens, parents (steps, batch, beam) and weights (steps, batch, beam, frames) as
        recorded by beam_search. Returns word ids (batch, n, steps) and attention (batch, n, steps, frames),
        <PAD> and zeros after each end.
        """
        end = hypotheses["end"]

        def body(s, beam_index, words_ta, attention_ta):
            at_end, inside = tf.equal(s, end), s <= end
            word = tf.where(at_end, hypotheses["word"], tf.gather(tokens[s], beam_index, batch_dims=1))
            parent = tf.where(at_end, hypotheses["parent"], tf.gather(parents[s], beam_index, batch_dims=1))
            attention = tf.gather(weights[s], parent, batch_dims=1)  # (batch, n, frames)
            words_ta = words_ta.write(s, tf.where(inside, word, PAD))
            attention_ta = attention_ta.write(s, tf.where(inside[:, :, None], attention, 0.0))
            return s - 1, tf.where(inside, parent, beam_index), words_ta, attention_ta

        _, _, words_ta, attention_ta = tf.while_loop(
            lambda s, *_: s >= 0, body,
            (steps - 1, tf.zeros_like(end), tf.TensorArray(tf.int32, size=steps),
             tf.TensorArray(tf.float32, size=steps)))
        return tf.transpose(words_ta.stack(), [1, 2, 0]), tf.transpose(attention_ta.stack(), [1, 2, 0, 3])


def caption_losses(logits, caption_ids):
    """Each caption's masked cross-entropy summed over its words, divided by its length: (batch,)."""
    mask = tf.cast(tf.not_equal(caption_ids, PAD), tf.float32)
    token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(caption_ids, tf.int32), logits=logits)
    return tf.reduce_sum(token_loss * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)


def caption_loss(logits, caption_ids):
    """caption_losses averaged over the batch."""
    return tf.reduce_mean(caption_losses(logits, caption_ids))
