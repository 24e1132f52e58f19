"""S2VT (Venugopalan et al., ICCV 2015) with optional Bahdanau or Luong attention, and the mean-pool model it is
measured against, in backend-neutral Keras 3.

S2VT: two stacked LSTMs read the video, then write the caption:
  encoding, per frame:  LSTM1 <- projected frame features;   LSTM2 <- [<PAD> embedding, LSTM1 output, zero context]
  decoding, per word:   LSTM1 <- zeros;                       LSTM2 <- [previous word embedding, LSTM1 output, context]
Every LSTM2 input keeps its position in both stages. The context is attention over LSTM2's encoder outputs,
queried by LSTM2's previous state, softmaxed over the frames.
With encoder="bidirectional" a backward LSTM (lstm1_backward) reads the projected frames from the last to the first,
and LSTM2 takes its output at each frame through one more input block: LSTM2 <- [.., LSTM1 output, .., backward
output]. While decoding that input is zeros, as the context is zeros while encoding: a backward reader has nothing
at a word's position (it cannot read captions not yet written), so no input changes position between the stages
and decoding runs exactly as in the unidirectional model; what the backward pass saw of the later frames reaches
the decoder through LSTM2's encoder states and outputs (its last state, and what attention reads).

MeanPool (Venugopalan et al., NAACL 2015, "Translating Videos to Natural Language Using Deep Recurrent Neural
Networks"): the frame features averaged over time are the video's one vector, fed at every step of a two-layer LSTM
decoder: LSTM1 <- [previous word embedding, projected mean feature]; LSTM2 <- LSTM1 output; words from LSTM2. No
encoder runs over the frames and there is nothing to attend to (attention "none" only).

Both models decode through the same contract, model.decoder(features, beam) -> (state, step), so the module
functions greedy and beam_search decode either, or several fused (late fusion).

The math is keras.ops throughout and runs on TensorFlow or JAX (KERAS_BACKEND); util.backend supplies the few
kernels keras.ops leaves to the backend (stateless random draws, a scan, XLA fusion). Speed (bench.py;
tests/test_speed_equivalence.py checks it against a plain step-by-step S2VT):
- Sequences are time-major, (steps, batch, ...), and every input projection that does not depend on the previous
  step is one matmul before the loop: the frames for both LSTMs, and LSTM1's whole decoding run, which reads zeros
  and so does not depend on the words. Feature standardisation is folded into the frame projection's weights.
- `lstm_sequence` runs an LSTM over precomputed input gates with a hand-written backward pass
  (keras.ops.custom_gradient): one recurrent matmul per step, and the recurrent kernel's gradient as one matmul
  after the loop rather than a small one per step.
- A decoder step does one matmul for LSTM2's word, context and recurrent inputs together; the output projection
  for the loss is one matmul after the loop (inside it only scheduled sampling's argmax needs it, with no gradient,
  and not at all when the ground truth alone is fed: scoring and validation).
- Bahdanau attention's forward and backward are each one fused kernel, and the backward recomputes
  tanh(W1 h_s + W2 h_t) rather than keeping a (batch, frames, dim) tensor per decoder step.
- matmul_dtype="bfloat16" runs the large matmuls in bfloat16 (weights, gates and cell states stay float32), each
  kernel cast once before the loops.
- Decoding stops once every caption (every video's pool of beams) has ended, its outputs padded to max_len so that
  shapes are fixed (util.backend.scan_until).
Randomness (feature noise, dropout, scheduled-sampling coins) is stateless, drawn from a seed passed per call, so a
training step is a pure function of (weights, batch, seed) and a resumed run replays exactly.
"""
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
from keras import ops

from util import backend
from util.data import feature_moments
from util.vocab import BOS, EOS, PAD, UNK

MODELS = ("s2vt", "meanpool")
ENCODERS = ("unidirectional", "bidirectional")
ATTENTIONS = ("none", "bahdanau", "luong")
MATMUL_DTYPES = ("float32", "bfloat16")
NEVER_WRITTEN = (PAD, BOS, UNK)  # tokens that decoding never writes
NEG_INF = float("-inf")
LEGACY_SIZES = ("frame_embed", "word_embed", "attention_dim")  # always hidden: config.json of older runs names them


@dataclass
class ModelConfig:
    """The model's settings. Each field with a help text is also a train.py flag (--max-caption-len for
    max_caption_len); vocab_size and feature_dim come from the data."""
    vocab_size: int
    feature_dim: int = 4096
    frames: int = field(default=80, metadata={"help": "frames read per video"})
    hidden: int = field(default=600, metadata={"help": "LSTM size, also the frame and word embeddings' and Bahdanau's"})
    attention: str = field(default="bahdanau", metadata={
        "help": "default bahdanau for s2vt; meanpool attends to nothing (none)", "choices": ATTENTIONS})
    max_caption_len: int = field(default=50, metadata={"help": "tokens, <EOS> included"})
    dropout: float = field(default=0.5, metadata={"help": "on the LSTMs' outputs while training"})
    feature_noise: float = field(default=0.1, metadata={
        "help": "training adds uniform(-noise, +noise) to every feature"})
    matmul_dtype: str = field(default="float32", metadata={
        "help": "precision of the large matmuls: bfloat16 is about 1.6x faster on CPUs with AVX512-BF16 (weights, "
                "gates and cell states stay float32)", "choices": MATMUL_DTYPES})
    model: str = field(default="s2vt", metadata={
        "help": "s2vt, or meanpool: the frame features' mean feeds an LSTM decoder (model.MeanPool)",
        "choices": MODELS})
    encoder: str = field(default="unidirectional", metadata={
        "help": "bidirectional: S2VT reads the frames backwards too", "choices": ENCODERS})

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}")
        if self.model == "meanpool" and (self.attention != "none" or self.encoder != "unidirectional"):
            raise ValueError(f"the meanpool model has no frame encoder to attend to or read backwards: attention "
                             f"must be 'none' and encoder 'unidirectional', not {self.attention!r}, {self.encoder!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, not {self.matmul_dtype!r}")
        for name in ("vocab_size", "feature_dim", "frames", "hidden", "max_caption_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, settings):
        """The config a run's config.json holds. Runs written before the embedding and attention sizes were tied to
        hidden name them too (frame_embed, word_embed, attention_dim): accepted when they equal hidden."""
        settings = dict(settings)
        for name in LEGACY_SIZES:
            if name in settings and settings.pop(name) != settings.get("hidden"):
                raise ValueError(f"{name} differs from hidden, which this version ties it to")
        return cls(**settings)


def lstm_cell(gates, c):
    """LSTM nonlinearity on gate pre-activations (batch, 4*units), gates ordered (input, forget, cell, output).
    Returns h, c and the activated gates (batch, 4*units), which the backward pass reuses."""
    i, f, g, o = ops.split(gates, 4, axis=-1)
    i, f, g, o = ops.sigmoid(i), ops.sigmoid(f), ops.tanh(g), ops.sigmoid(o)
    c = f * c + i * g
    return o * ops.tanh(c), c, ops.concatenate([i, f, g, o], -1)


def matmul(a, b, dtype="float32"):
    """a @ b with both cast to dtype, result float32: bfloat16 runs large matmuls about 1.75x faster on CPUs with
    AVX512-BF16 (and on GPU tensor cores); gradients flow through the casts."""
    if dtype == "float32":
        return ops.matmul(a, b)
    return ops.cast(ops.matmul(ops.cast(a, dtype), ops.cast(b, dtype)), "float32")


def sequence_matmul(x, kernel, dtype="float32"):
    """(..., in) @ (in, out) -> (..., out) as one 2-d matmul."""
    flat = matmul(ops.reshape(x, (-1, ops.shape(x)[-1])), kernel, dtype)  # (everything else, out)
    return ops.reshape(flat, (*ops.shape(x)[:-1], ops.shape(kernel)[-1]))


def lstm_sequence(input_gates, h, c, recurrent_kernel, dtype="float32"):
    """Run an LSTM over precomputed input gates (time, batch, 4*units) from state (h, c).
    Returns outputs (time, batch, units), the last h and the last c. Matmuls run in dtype; gates and cell states
    stay float32."""
    return _LSTM_SEQUENCES[dtype](input_gates, h, c, recurrent_kernel)


def _lstm_sequence_with_gradient(dtype):
    @ops.custom_gradient
    def lstm_sequence(input_gates, h0, c0, recurrent_kernel):
        kernel = ops.cast(recurrent_kernel, dtype)  # cast once, not per step

        def step(state, gates):
            h, c, activated = lstm_cell(gates + matmul(state[0], kernel, dtype), state[1])
            return (h, c), (h, c, activated)

        (h, c), (outputs, cells, activated) = backend.scan(step, (h0, c0), input_gates, differentiated=False)

        def grad(*upstream):
            # TensorFlow hands one gradient per output, JAX one tuple of them; an unused output's may be None
            d_outputs, d_h, d_c = upstream[0] if len(upstream) == 1 else upstream
            d_outputs = ops.zeros_like(outputs) if d_outputs is None else d_outputs
            d_h = ops.zeros_like(h0) if d_h is None else d_h
            d_c = ops.zeros_like(c0) if d_c is None else d_c
            kernel_t = ops.transpose(kernel)
            previous_c = ops.concatenate([c0[None], cells[:-1]], 0)  # (time, batch, units)

            def back(state, step_values):
                d_h, d_c = state
                activated_t, c_t, previous_c_t, d_output = step_values
                i, f, g, o = ops.split(activated_t, 4, axis=-1)
                tanh_c = ops.tanh(c_t)
                d_h = d_h + d_output
                d_c = d_c + d_h * o * (1.0 - tanh_c * tanh_c)
                d_gates = ops.concatenate([d_c * g * i * (1.0 - i), d_c * previous_c_t * f * (1.0 - f),
                                           d_c * i * (1.0 - g * g), d_h * tanh_c * o * (1.0 - o)], -1)
                return (matmul(d_gates, kernel_t, dtype), d_c * f), d_gates

            (d_h, d_c), d_gates = backend.scan(back, (d_h, d_c), (activated, cells, previous_c, d_outputs),
                                               reverse=True, differentiated=False)  # d_gates (time, batch, 4*units)
            units = ops.shape(h0)[-1]
            previous_h = ops.reshape(ops.concatenate([h0[None], outputs[:-1]], 0), (-1, units))  # (time*batch, units)
            d_recurrent = matmul(ops.transpose(previous_h), ops.reshape(d_gates, (-1, 4 * units)), dtype)
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
        for i, dim in enumerate(input_dims):  # one attribute each, named in the weights file
            setattr(self, f"kernel_{i}", self.add_weight(shape=(dim, 4 * units), initializer="glorot_uniform",
                                                         name=f"kernel_{i}"))
        self.recurrent_kernel = self.add_weight(shape=(units, 4 * units), initializer="orthogonal",
                                                name="recurrent_kernel")
        forget_bias_one = np.concatenate([np.zeros(units), np.ones(units), np.zeros(2 * units)]).astype("float32")
        self.bias = self.add_weight(shape=(4 * units,), initializer=keras.initializers.Constant(forget_bias_one),
                                    name="bias")

    @property
    def kernels(self):
        return [getattr(self, f"kernel_{i}") for i in range(self.input_count)]

    def run(self, input_gates, h, c, dtype="float32"):
        """Over a whole sequence of input gates (time, batch, 4*units) -> outputs (time, batch, units), h, c."""
        return lstm_sequence(input_gates, h, c, backend.read(self.recurrent_kernel), dtype)


@backend.fused  # the add, tanh and reduction over (batch, frames, dim) as one kernel
def _additive_forward(keys, encoder_outputs, projected_query, v):
    scores = ops.matmul(ops.tanh(keys + projected_query[:, None, :]), v[:, None])[:, :, 0]  # (batch, frames)
    weights = ops.softmax(scores, axis=-1)
    return weights, ops.matmul(weights[:, None, :], encoder_outputs)[:, 0]


@backend.fused
def _additive_backward(keys, encoder_outputs, projected_query, v, weights, d_weights, d_context):
    d_weights = d_weights + ops.matmul(encoder_outputs, d_context[:, :, None])[:, :, 0]  # (batch, frames)
    d_scores = weights * (d_weights - ops.sum(weights * d_weights, -1, keepdims=True))
    activation = ops.tanh(keys + projected_query[:, None, :])  # recomputed: storing it costs batch*frames*dim a step
    d_keys = d_scores[:, :, None] * v * (1.0 - activation * activation)  # (batch, frames, dim)
    return (d_keys, weights[:, :, None] * d_context[:, None, :], ops.sum(d_keys, 1),
            ops.einsum("bf,bfa->a", d_scores, activation))


@ops.custom_gradient
def additive_attention(keys, encoder_outputs, projected_query, v):
    """Bahdanau: keys (batch, frames, dim) = W1 h_s, projected_query (batch, dim) = W2 h_t
    -> weights (batch, frames), softmax over frames, and context (batch, hidden)."""
    weights, context = _additive_forward(keys, encoder_outputs, projected_query, v)

    def grad(*upstream):
        d_weights, d_context = upstream[0] if len(upstream) == 1 else upstream
        d_weights = ops.zeros_like(weights) if d_weights is None else d_weights
        d_context = ops.zeros_like(context) if d_context is None else d_context
        return _additive_backward(keys, encoder_outputs, projected_query, v, weights, d_weights, d_context)

    return (weights, context), grad


@backend.fused
def multiplicative_attention(encoder_outputs, projected_query):
    """Luong general: projected_query (batch, hidden) = h_t^T W -> weights (batch, frames), context (batch, hidden)."""
    weights = ops.softmax(ops.matmul(encoder_outputs, projected_query[:, :, None])[:, :, 0], axis=-1)
    return weights, ops.matmul(weights[:, None, :], encoder_outputs)[:, 0]


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
            return additive_attention(keys, encoder_outputs, ops.matmul(query, self.w_query), backend.read(self.v))
        return multiplicative_attention(encoder_outputs, ops.matmul(query, self.w))


class CaptionModel(keras.Model):
    """What S2VT and MeanPool share: the frame projection with the feature standardisation folded in, the word
    embedding, the output projection, the training draws, and greedy decoding and beam search over decoder()."""

    def __init__(self, config: ModelConfig, **kwargs):
        """The layers both models begin with; a subclass adds its LSTMs, then calls add_output_layers()."""
        super().__init__(**kwargs)
        self.config = config
        self.frame_projection = keras.layers.Dense(config.hidden, name="frame_projection")
        self.frame_projection.build((None, config.feature_dim))
        self.word_embedding = keras.layers.Embedding(config.vocab_size, config.hidden, name="word_embedding")
        self.word_embedding.build((None,))

    def add_output_layers(self):
        """The output projection, then the per-dimension feature standardisation (set from the training features by
        adapt_features()): made after the LSTMs, so that the weights keep the order S2VT's checkpoints have."""
        self.output_projection = keras.layers.Dense(self.config.vocab_size, name="output_projection")
        self.output_projection.build((None, self.config.hidden))
        dim = self.config.feature_dim
        self.feature_mean = self.add_weight(shape=(dim,), initializer="zeros", trainable=False, name="feature_mean")
        self.feature_std = self.add_weight(shape=(dim,), initializer="ones", trainable=False, name="feature_std")

    def adapt_features(self, features):
        """Set the standardisation from training features (videos, frames, dim), read in chunks.

        The variance gets a floor of 10% of the mean variance, so a nearly constant dimension (common in ReLU
        features) is not blown up into huge outliers that saturate the LSTMs."""
        mean, variance = feature_moments(features)
        self.feature_mean.assign(mean.astype("float32"))
        self.feature_std.assign(np.sqrt(variance + 0.1 * variance.mean() + 1e-12).astype("float32"))

    def project_frames(self, x):
        """Standardised features (..., feature_dim) projected to (..., frame_embed). The standardisation is folded into
        the projection: ((x - mean) / std) W + b = x (W / std) + (b - (mean / std) W)."""
        kernel = self.frame_projection.kernel / self.feature_std[:, None]
        bias = self.frame_projection.bias - ops.matmul(self.feature_mean[None], kernel)[0]
        return sequence_matmul(x, kernel, self.config.matmul_dtype) + bias

    # ---- randomness: stateless, so (weights, batch, seed) fixes the result ----
    def training_draws(self, seed, batch, length, teacher_forcing_prob, training):
        """Every random draw of one training pass, from a seed (util.backend.seed_tensor): feature noise (batch,
        frames, dim), dropout masks already scaled by 1/keep for both LSTMs' decoder outputs (length, batch, hidden)
        and, for S2VT, for LSTM1's encoder outputs (frames, batch, hidden) (and the backward LSTM's, bidirectional),
        and the scheduled-sampling coins (length, batch), True where the ground truth is fed (always at step 0).
        Without training, no noise and no masks."""
        cfg = self.config
        noise_seed, encoder_seed, coin_seed, h1_seed, h2_seed = backend.split_seed(seed, 5)
        use_truth = backend.uniform((length, batch), coin_seed) < teacher_forcing_prob
        draws = {"use_truth": ops.logical_or(use_truth, (ops.arange(length) == 0)[:, None]), "noise": None,
                 "encoder_mask": None, "backward_mask": None, "h1_mask": None, "h2_mask": None}
        if not training:
            return draws
        keep = 1.0 - cfg.dropout

        def mask(shape, mask_seed):
            return ops.cast(backend.uniform(shape, mask_seed) < keep, "float32") / keep

        draws.update(noise=backend.uniform((batch, cfg.frames, cfg.feature_dim), noise_seed, -cfg.feature_noise,
                                           cfg.feature_noise),
                     h1_mask=mask((length, batch, cfg.hidden), h1_seed),
                     h2_mask=mask((length, batch, cfg.hidden), h2_seed))
        if cfg.model == "s2vt":
            draws["encoder_mask"] = mask((cfg.frames, batch, cfg.hidden), encoder_seed)
        if cfg.encoder == "bidirectional":  # a seed of its own: the unidirectional model's draws stay as they were
            draws["backward_mask"] = mask((cfg.frames, batch, cfg.hidden), backend.fold_in(encoder_seed, 1))
        return draws

    def word_logits(self, h2, kernels):
        """(..., hidden) -> (..., vocab), in the configured matmul precision."""
        return sequence_matmul(h2, kernels["output"], self.config.matmul_dtype) + self.output_projection.bias

    def teacher_forcing_inputs(self, caption_ids, teacher_forcing_prob, seed, training, draws):
        """What call() starts from: whether only the ground truth is fed (scoring, evaluation: no argmax of the
        previous step's words is needed), the training_draws (draws, if given, else from seed), and the
        ground-truth previous words (batch, length), <BOS> first."""
        caption_ids = ops.cast(caption_ids, "int32")
        batch, length = ops.shape(caption_ids)[0], ops.shape(caption_ids)[1]
        forced = draws is None and isinstance(teacher_forcing_prob, (int, float)) and teacher_forcing_prob >= 1
        if draws is None:
            seed = backend.seed_tensor(0) if seed is None else seed
            draws = self.training_draws(seed, batch, length, teacher_forcing_prob, training)
        previous_truth = ops.concatenate([ops.full((batch, 1), BOS, "int32"), caption_ids[:, :-1]], 1)
        return forced, draws, previous_truth

    def fed_word(self, forced, use_truth, truth, h2_out, kernels):
        """The word a training step feeds: the ground truth where its coin says so (always when forced), else the
        model's argmax after the previous step, with no gradient through it (scheduled sampling)."""
        if forced:
            return truth
        predicted = ops.argmax(self.word_logits(ops.stop_gradient(h2_out), kernels), -1)
        return ops.where(use_truth, truth, ops.cast(predicted, "int32"))

    def greedy(self, frame_features, max_len=None):
        """Greedy decoding, each caption stopping at its <EOS> (module function greedy, one model)."""
        return greedy([(self, frame_features, 1.0)], max_len or self.config.max_caption_len)

    def beam_search(self, frame_features, beam_size, length_penalty=0.0, max_len=None, n_best=1):
        """Beam search (module function beam_search, one model); beam_size=1 gives exactly greedy()."""
        return beam_search([(self, frame_features, 1.0)], beam_size, length_penalty,
                           max_len or self.config.max_caption_len, n_best)


class S2VT(CaptionModel):
    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(config, **kwargs)
        h = config.hidden
        self.lstm1 = LSTMWeights([config.hidden], h, name="lstm1")
        lstm2_inputs = [config.hidden, h] + ([h] if config.attention != "none" else [])
        self.backward_block = len(lstm2_inputs)  # LSTM2's input block for the backward LSTM's output, if any
        self.lstm2 = LSTMWeights(lstm2_inputs + ([h] if config.encoder == "bidirectional" else []), h, name="lstm2")
        self.attention = (Attention(config.attention, h, config.hidden, name="attention")
                          if config.attention != "none" else None)
        self.add_output_layers()
        # made after the others, so that a unidirectional model's weights file is laid out as it always was
        self.lstm1_backward = (LSTMWeights([config.hidden], h, name="lstm1_backward")
                               if config.encoder == "bidirectional" else None)
        self.built = True

    # ---- encoding stage ----
    def encode(self, frame_features, noise=None, encoder_mask=None, backward_mask=None):
        """frame_features (batch, frames, feature_dim) -> encoder state dict; outputs and keys (batch, frames, ...).
        Training passes the feature noise and the dropout masks on the LSTM1s' outputs (training_draws)."""
        x = ops.cast(frame_features, "float32")
        if noise is not None:
            x = x + noise
        dtype = self.config.matmul_dtype
        frames_in = ops.transpose(self.project_frames(x), (1, 0, 2))  # (frames, batch, embed)
        zeros = ops.zeros((ops.shape(x)[0], self.config.hidden))
        h1_seq, h1, c1 = self.lstm1.run(sequence_matmul(frames_in, self.lstm1.kernels[0], dtype) + self.lstm1.bias,
                                        zeros, zeros, dtype)
        if encoder_mask is not None:
            h1_seq = h1_seq * encoder_mask
        # the <PAD> word and a zero context, in the same positions as the words and contexts of decoding
        pad_gates = ops.matmul(self.word_embedding.embeddings[PAD][None], self.lstm2.kernels[0]) + self.lstm2.bias
        lstm2_gates = sequence_matmul(h1_seq, self.lstm2.kernels[1], dtype) + pad_gates
        if self.lstm1_backward is not None:  # read from the last frame to the first, its outputs put back in order
            backward = self.lstm1_backward
            backward_gates = sequence_matmul(frames_in, backward.kernels[0], dtype) + backward.bias
            backward_seq, _, _ = backward.run(ops.flip(backward_gates, 0), zeros, zeros, dtype)
            backward_seq = ops.flip(backward_seq, 0)
            if backward_mask is not None:
                backward_seq = backward_seq * backward_mask
            lstm2_gates = lstm2_gates + sequence_matmul(backward_seq, self.lstm2.kernels[self.backward_block], dtype)
        encoder_outputs, h2, c2 = self.lstm2.run(lstm2_gates, zeros, zeros, dtype)
        encoder_outputs = ops.transpose(encoder_outputs, (1, 0, 2))  # (batch, frames, hidden) for attention
        keys = self.attention.keys(encoder_outputs, dtype) if self.attention is not None else encoder_outputs
        return {"h1": h1, "c1": c1, "h2": h2, "c2": c2, "outputs": encoder_outputs, "keys": keys}

    # ---- decoding stage: steps shared by training, greedy and beam search ----
    def decoding_kernels(self):
        """The kernels the decoder's steps multiply by, cast to the matmul precision once, before the loop:
        "step" stacks LSTM2's word, context and recurrent kernels, so a step projects its inputs in one matmul (the
        backward LSTM's block multiplies zeros while decoding, and is left out)."""
        context = [self.lstm2.kernels[2]] if self.attention is not None else []
        kernels = {"step": ops.concatenate([self.lstm2.kernels[0], *context, self.lstm2.recurrent_kernel], 0),
                   "lstm1_recurrent": self.lstm1.recurrent_kernel, "lstm1_to_lstm2": self.lstm2.kernels[1],
                   "output": self.output_projection.kernel}
        return {name: ops.cast(kernel, self.config.matmul_dtype) for name, kernel in kernels.items()}

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
        inputs = [ops.take(self.word_embedding.embeddings, word_ids, axis=0)]
        if self.attention is not None:
            weights, context = self.attention.weights_and_context(encoded["keys"], encoded["outputs"], h2)
            inputs.append(context)
        else:
            weights = ops.zeros((ops.shape(word_ids)[0], ops.shape(encoded["outputs"])[1]))
        step_inputs = ops.concatenate(inputs + [h2], 1)
        h2, c2, _ = lstm_cell(from_lstm1 + matmul(step_inputs, kernels["step"], self.config.matmul_dtype), c2)
        return h2, c2, weights

    def call(self, frame_features, caption_ids, teacher_forcing_prob=1.0, seed=None, training=False, draws=None):
        """Training / scoring pass. caption_ids (batch, length): the words then <EOS>, <PAD>-padded.

        At each step every caption independently feeds its ground-truth previous word with probability
        teacher_forcing_prob, else the model's own previous argmax (scheduled sampling). The seed
        (util.backend.seed_tensor) fixes the coins and, with training=True, the feature noise and dropout; draws,
        a training_draws dict, gives them instead.
        Returns logits (batch, length, vocab), attention weights (batch, length, frames) and the word ids
        fed at each step (batch, length).
        """
        forced, draws, previous_truth = self.teacher_forcing_inputs(caption_ids, teacher_forcing_prob, seed, training,
                                                                    draws)
        batch, length = ops.shape(previous_truth)[0], ops.shape(previous_truth)[1]
        dtype = self.config.matmul_dtype
        encoded = self.encode(frame_features, draws["noise"], draws["encoder_mask"], draws.get("backward_mask"))
        # LSTM1 reads zeros while decoding, so its whole run is known before the first word.
        h1_seq, _, _ = self.lstm1.run(ops.broadcast_to(self.lstm1.bias, (length, batch, 4 * self.config.hidden)),
                                      encoded["h1"], encoded["c1"], dtype)  # (length, batch, hidden)
        if training:
            h1_seq = h1_seq * draws["h1_mask"]
        kernels = self.decoding_kernels()
        h2_masks = draws["h2_mask"] if training else ops.ones((length, 1, 1))

        def step(state, inputs):
            h2, c2, h2_out = state
            use_truth, truth, from_lstm1, h2_mask = inputs
            word = self.fed_word(forced, use_truth, truth, h2_out, kernels)
            h2, c2, weights = self.lstm2_decode_step(from_lstm1, word, h2, c2, encoded, kernels)
            h2_out = h2 * h2_mask
            return (h2, c2, h2_out), (h2_out, weights, word)

        _, (h2_seq, weights, fed) = backend.scan(
            step, (encoded["h2"], encoded["c2"], encoded["h2"]),
            (draws["use_truth"], ops.transpose(previous_truth), self.lstm1_to_lstm2(h1_seq, kernels), h2_masks))
        logits = self.word_logits(ops.transpose(h2_seq, (1, 0, 2)), kernels)  # (batch, length, vocab)
        return logits, ops.transpose(weights, (1, 0, 2)), ops.transpose(fed)

    def decoder(self, frame_features, beam=1):
        """Start decoding: the encoder reads the videos once. Returns (state, step): state is a dict of tensors, its
        "rows" (batch*beam, ...) following the hypotheses (reordered as beams are), the rest per video; step(state,
        word_ids (batch*beam,)) -> (state, logits of the next word (batch*beam, vocab), attention weights
        (batch*beam, frames)). Rows are video-major, row = video*beam + k."""
        encoded = self.encode(frame_features)
        kernels = self.decoding_kernels()
        per_row = (lambda x: ops.repeat(x, beam, axis=0)) if beam > 1 else (lambda x: x)
        # LSTM1 reads zeros while decoding, so its state is the same for every beam of a video: kept per video
        context = {"outputs": per_row(encoded["outputs"]), "keys": per_row(encoded["keys"])}

        def step(state, word_ids):
            h1, c1 = self.lstm1_decode_step(state["h1"], state["c1"], kernels)
            h2, c2, weights = self.lstm2_decode_step(per_row(self.lstm1_to_lstm2(h1, kernels)), word_ids,
                                                     state["rows"]["h2"], state["rows"]["c2"], context, kernels)
            return {"h1": h1, "c1": c1, "rows": {"h2": h2, "c2": c2}}, self.word_logits(h2, kernels), weights

        start = {"h1": encoded["h1"], "c1": encoded["c1"],
                 "rows": {"h2": per_row(encoded["h2"]), "c2": per_row(encoded["c2"])}}
        return start, step


class MeanPool(CaptionModel):
    """The mean-pool model of Venugopalan et al., NAACL 2015: the frame features averaged over time feed, with the
    previous word's embedding, the first of two stacked LSTMs at every decoding step; the second writes the words.
    The projection of the mean is the mean of the projections (it is linear), so the frame projection and feature
    standardisation are S2VT's, applied once per video."""

    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(config, **kwargs)
        h = config.hidden
        self.lstm1 = LSTMWeights([config.hidden, config.hidden], h, name="lstm1")  # word, video
        self.lstm2 = LSTMWeights([h], h, name="lstm2")
        self.add_output_layers()
        self.built = True

    def video_gates(self, frame_features, noise=None):
        """The mean-pooled video's share of LSTM1's gates, LSTM1's bias included: (batch, 4*hidden)."""
        x = ops.cast(frame_features, "float32")
        if noise is not None:
            x = x + noise
        video = self.project_frames(ops.mean(x, 1))  # (batch, frame_embed)
        return matmul(video, self.lstm1.kernels[1], self.config.matmul_dtype) + self.lstm1.bias

    def decoding_kernels(self):
        """Each LSTM's input and recurrent kernels stacked, so that a step projects its inputs in one matmul per
        LSTM, cast to the matmul precision once, before the loop."""
        kernels = {"lstm1": ops.concatenate([self.lstm1.kernels[0], self.lstm1.recurrent_kernel], 0),
                   "lstm2": ops.concatenate([self.lstm2.kernels[0], self.lstm2.recurrent_kernel], 0),
                   "output": self.output_projection.kernel}
        return {name: ops.cast(kernel, self.config.matmul_dtype) for name, kernel in kernels.items()}

    def decode_step(self, video_gates, word_ids, state, kernels, h1_mask=None):
        """Advance both LSTMs one word: video_gates (batch, 4*hidden), word_ids (batch,), state (h1, c1, h2, c2);
        h1_mask, while training, drops out LSTM1's output on its way to LSTM2. Returns the new state."""
        h1, c1, h2, c2 = state
        dtype = self.config.matmul_dtype
        word = ops.take(self.word_embedding.embeddings, word_ids, axis=0)
        h1, c1, _ = lstm_cell(video_gates + matmul(ops.concatenate([word, h1], 1), kernels["lstm1"], dtype), c1)
        h1_out = h1 if h1_mask is None else h1 * h1_mask
        h2, c2, _ = lstm_cell(self.lstm2.bias + matmul(ops.concatenate([h1_out, h2], 1), kernels["lstm2"], dtype), c2)
        return h1, c1, h2, c2

    def call(self, frame_features, caption_ids, teacher_forcing_prob=1.0, seed=None, training=False, draws=None):
        """Training / scoring pass, as S2VT.call: logits (batch, length, vocab), attention weights (batch, length,
        frames), all zero (nothing is attended to), and the word ids fed at each step (batch, length)."""
        forced, draws, previous_truth = self.teacher_forcing_inputs(caption_ids, teacher_forcing_prob, seed, training,
                                                                    draws)
        batch, length = ops.shape(previous_truth)[0], ops.shape(previous_truth)[1]
        video_gates = self.video_gates(frame_features, draws["noise"])
        kernels = self.decoding_kernels()
        ones = ops.ones((length, 1, 1))
        h1_masks, h2_masks = (draws["h1_mask"], draws["h2_mask"]) if training else (ones, ones)

        def step(carry, inputs):
            state, h2_out = carry
            use_truth, truth, h1_mask, h2_mask = inputs
            word = self.fed_word(forced, use_truth, truth, h2_out, kernels)
            state = self.decode_step(video_gates, word, state, kernels, h1_mask)
            h2_out = state[2] * h2_mask
            return (state, h2_out), (h2_out, word)

        zeros = ops.zeros((batch, self.config.hidden))
        _, (h2_seq, fed) = backend.scan(step, ((zeros, zeros, zeros, zeros), zeros),
                                        (draws["use_truth"], ops.transpose(previous_truth), h1_masks, h2_masks))
        logits = self.word_logits(ops.transpose(h2_seq, (1, 0, 2)), kernels)  # (batch, length, vocab)
        return logits, ops.zeros((batch, length, ops.shape(frame_features)[1])), ops.transpose(fed)

    def decoder(self, frame_features, beam=1):
        """Start decoding, with S2VT.decoder's contract: state {"rows": both LSTMs' states (batch*beam, hidden)},
        step(state, word_ids) -> (state, logits (batch*beam, vocab), attention weights (batch*beam, frames), zero)."""
        video_gates = self.video_gates(frame_features)
        if beam > 1:
            video_gates = ops.repeat(video_gates, beam, axis=0)  # a video's beams share its mean
        kernels = self.decoding_kernels()
        rows, frames = ops.shape(video_gates)[0], ops.shape(frame_features)[1]

        def step(state, word_ids):
            lstm_states = [state["rows"][name] for name in ("h1", "c1", "h2", "c2")]
            h1, c1, h2, c2 = self.decode_step(video_gates, word_ids, lstm_states, kernels)
            return ({"rows": {"h1": h1, "c1": c1, "h2": h2, "c2": c2}}, self.word_logits(h2, kernels),
                    ops.zeros((rows, frames)))

        zeros = ops.zeros((rows, self.config.hidden))
        return {"rows": {"h1": zeros, "c1": zeros, "h2": zeros, "c2": zeros}}, step


def build_model(config: ModelConfig):
    """The model config.model names: S2VT or MeanPool."""
    return {"s2vt": S2VT, "meanpool": MeanPool}[config.model](config)


def fused_scores(logits, weights, log_probs):
    """The models' logits (each (rows, vocab)) combined into one score per word, -inf for the tokens a caption
    never holds (<PAD>, <BOS>, <UNK>), which decoding must not write: alone, the model's logits (or its
    log-probabilities with log_probs); together, the weighted sum of their log-probabilities (late fusion). The
    other words keep their model probabilities."""
    if len(logits) == 1 and weights[0] == 1.0:
        scores = ops.log_softmax(logits[0], axis=-1) if log_probs else logits[0]
    else:
        scores = sum(w * ops.log_softmax(x, axis=-1) for x, w in zip(logits, weights))
    never = np.isin(np.arange(logits[0].shape[-1]), NEVER_WRITTEN)  # (vocab,), a constant
    return ops.where(never, NEG_INF, scores)


def greedy(members, max_len):
    """Greedy decoding of one model, or of several fused: members [(model, frame_features, weight), ...], each
    model reading its own features (an RGB and a flow model, say), all with one vocabulary; each step takes the
    word of highest weighted log-probability. Each caption stops at its <EOS>.
    Returns word ids (batch, max_len), <PAD> after <EOS>, and the first model's attention weights (batch, max_len,
    frames), zero after the end."""
    decoders = [model.decoder(features) for model, features, _ in members]
    weights = [weight for _, _, weight in members]
    batch = ops.shape(members[0][1])[0]

    def step(state, _):
        states, word, finished = state
        stepped = [step_fn(member_state, word) for (_, step_fn), member_state in zip(decoders, states)]
        scores = fused_scores([logits for _, logits, _ in stepped], weights, log_probs=False)
        word = ops.where(finished, PAD, ops.cast(ops.argmax(scores, -1), "int32"))
        return ([s for s, _, _ in stepped], word, ops.logical_or(finished, word == EOS)), (word, stepped[0][2])

    start = ([member_state for member_state, _ in decoders], ops.full((batch,), BOS, "int32"),
             ops.zeros((batch,), "bool"))
    _, (words, attention), _ = backend.scan_until(step, start, max_len, lambda state: ops.all(state[-1]))
    attention = ops.where((words == PAD)[:, :, None], 0.0, attention)  # zero after each caption's end, as beam's
    return ops.transpose(words), ops.transpose(attention, (1, 0, 2))


def beam_search(members, beam_size, length_penalty, max_len, n_best=1):
    """Beam search of one model or of several fused (members as for greedy), all videos and all their beams
    decoded together; beam_size=1 gives exactly greedy().

    A hypothesis's log-probability is the sum of its words' (<EOS> included; fused, the weighted sum of the
    models'), and it is ranked by log_prob / length**length_penalty, the length counting <EOS>. Each step extends
    every live hypothesis by every word; of each video's 2*beam_size best extensions, those among the first
    beam_size that end in <EOS> join the video's finished pool (its beam_size best by rank), and the beam_size best
    that do not end stay live. A video stops when its pool is full, the search when every video has stopped or
    max_len words were written. A video with fewer than n_best finished captions is topped up with its best
    unfinished ones, ranked after the finished.

    Returns:
      words      (batch, n_best, max_len) int32, best first, <PAD>-filled after each <EOS>;
      scores     (batch, n_best) float32, the ranking scores log_prob / length**length_penalty;
      log_probs  (batch, n_best) float32, the summed log-probabilities;
      attention  (batch, max_len, frames) float32, the best hypothesis's attention weights (of the first model),
                 zero after its end.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best <= beam_size, not n_best={n_best}, beam_size={beam_size}")
    beam, vocab = beam_size, members[0][0].config.vocab_size
    batch, frames = ops.shape(members[0][1])[0], ops.shape(members[0][1])[1]
    decoders = [model.decoder(features, beam) for model, features, _ in members]
    weights = [weight for _, _, weight in members]
    first_rows = ops.arange(batch)[:, None] * beam  # (batch, 1)
    first_ones = ops.arange(2 * beam) < beam  # (2*beam,)

    def rank(log_probs, length):
        return log_probs / ops.power(ops.cast(length, "float32"), length_penalty)

    def is_full(pool):
        return ops.all(pool["rank"] > NEG_INF, axis=1)  # (batch,)

    def step(state, t):
        states, words, live_scores, pool = state
        stepped = [step_fn(member_state, words) for (_, step_fn), member_state in zip(decoders, states)]
        log_probs = ops.reshape(fused_scores([logits for _, logits, _ in stepped], weights, log_probs=True),
                                (batch, beam, vocab))
        totals = ops.reshape(live_scores[:, :, None] + log_probs, (batch, beam * vocab))
        # 2*beam extensions hold at least beam that do not end: each beam contributes one <EOS> at most.
        candidate_scores, candidate_ids = ops.top_k(totals, 2 * beam)  # (batch, 2*beam), best first
        candidate_ids = ops.cast(candidate_ids, "int32")
        candidate_parents, candidate_words = candidate_ids // vocab, candidate_ids % vocab
        ends = candidate_words == EOS

        finishing = ends & first_ones & (candidate_scores > NEG_INF) & ~is_full(pool)[:, None]
        arrivals = {"rank": ops.where(finishing, rank(candidate_scores, t + 1), NEG_INF),
                    "log_prob": candidate_scores, "end": ops.full(ops.shape(candidate_ids), t, "int32"),
                    "parent": candidate_parents}
        _, kept = ops.top_k(ops.concatenate([pool["rank"], arrivals["rank"]], 1), beam)  # (batch, beam)
        pool = {name: backend.batch_gather(ops.concatenate([pool[name], arrivals[name]], 1), kept) for name in pool}

        live_scores, continuing = ops.top_k(ops.where(ends, NEG_INF, candidate_scores), beam)
        parents = backend.batch_gather(candidate_parents, continuing)  # (batch, beam)
        new_words = backend.batch_gather(candidate_words, continuing)
        rows = ops.reshape(first_rows + parents, (-1,))  # (batch*beam,)
        states = [dict(s, rows=keras.tree.map_structure(lambda x: ops.take(x, rows, axis=0), s["rows"]))
                  for s, _, _ in stepped]
        attention = ops.reshape(stepped[0][2], (batch, beam, frames))
        return (states, ops.reshape(new_words, (-1,)), live_scores, pool), (new_words, parents, attention)

    # At step 0 only beam 0 is live, so a video's beams do not all grow the same hypotheses.
    live_scores = ops.tile(ops.concatenate([ops.zeros((1,)), ops.full((beam - 1,), NEG_INF)], 0)[None], (batch, 1))
    empty_pool = {"rank": ops.full((batch, beam), NEG_INF), "log_prob": ops.full((batch, beam), NEG_INF),
                  "end": ops.zeros((batch, beam), "int32"), "parent": ops.zeros((batch, beam), "int32")}
    start = ([member_state for member_state, _ in decoders], ops.full((batch * beam,), BOS, "int32"), live_scores,
             empty_pool)
    end_state, (tokens, parents, attention), steps = backend.scan_until(
        step, start, max_len, lambda state: ops.all(is_full(state[-1])))
    # tokens, parents (max_len, batch, beam); attention (max_len, batch, beam, frames), by the beam extended
    live_scores, pool = end_state[-2], end_state[-1]

    pool["word"] = ops.full((batch, beam), EOS, "int32")
    live = {"rank": rank(live_scores, steps), "log_prob": live_scores, "end": ops.full((batch, beam), steps - 1, "int32"),
            "parent": ops.take(parents, steps - 1, axis=0), "word": ops.take(tokens, steps - 1, axis=0)}
    finished_count = ops.sum(ops.cast(pool["rank"] > NEG_INF, "int32"), 1, keepdims=True)  # (batch, 1)
    place = ops.arange(n_best, dtype="int32")[None]  # (1, n_best)
    pick = ops.where(place < finished_count, place, beam + place - finished_count)  # (batch, n_best)
    best = {name: backend.batch_gather(ops.concatenate([pool[name], live[name]], 1), pick) for name in pool}

    words, attention = _backtrack(best, tokens, parents, attention)
    return words, best["rank"], best["log_prob"], attention[:, 0]


def _backtrack(hypotheses, tokens, parents, attention):
    """Follow beam back-pointers from each hypothesis's last word to its first.

    hypotheses: dict of (batch, n) tensors "end" (step of the last word), "word" (that word) and "parent" (the beam it
    extended); tokens, parents (steps, batch, beam) and attention (steps, batch, beam, frames) as recorded by
    beam_search. Returns word ids (batch, n, steps) and attention (batch, n, steps, frames), <PAD> and zeros after
    each end.
    """
    end = hypotheses["end"]

    def step(beam_index, inputs):
        s, tokens_s, parents_s, attention_s = inputs
        at_end, inside = end == s, s <= end
        word = ops.where(at_end, hypotheses["word"], backend.batch_gather(tokens_s, beam_index))
        parent = ops.where(at_end, hypotheses["parent"], backend.batch_gather(parents_s, beam_index))
        weights = backend.batch_gather(attention_s, parent)  # (batch, n, frames)
        return ops.where(inside, parent, beam_index), (ops.where(inside, word, PAD),
                                                       ops.where(inside[:, :, None], weights, 0.0))

    steps = ops.arange(ops.shape(tokens)[0], dtype="int32")
    _, (words, weights) = backend.scan(step, ops.zeros_like(end), (steps, tokens, parents, attention), reverse=True,
                                       differentiated=False)
    return ops.transpose(words, (1, 2, 0)), ops.transpose(weights, (1, 2, 0, 3))


def caption_losses(logits, caption_ids):
    """Each caption's masked cross-entropy summed over its words, divided by its length: (batch,). An all-<PAD> row
    (padding of a batch) counts 0."""
    caption_ids = ops.cast(caption_ids, "int32")
    mask = ops.cast(caption_ids != PAD, "float32")
    token_loss = ops.sparse_categorical_crossentropy(caption_ids, logits, from_logits=True)
    return ops.sum(token_loss * mask, 1) / ops.maximum(ops.sum(mask, 1), 1.0)


def caption_loss(logits, caption_ids):
    """caption_losses averaged over the batch."""
    return ops.mean(caption_losses(logits, caption_ids))


def replica_loss(model, frame_features, caption_ids, teacher_forcing_prob, seed, global_batch):
    """A training step's loss on one replica's part of the batch: its captions' losses summed and divided by the
    global batch size, so that summed over the replicas it is the mean over the global batch."""
    logits, _, _ = model(frame_features, caption_ids, teacher_forcing_prob=teacher_forcing_prob, seed=seed,
                         training=True)
    return ops.sum(caption_losses(logits, caption_ids)) / ops.cast(global_batch, "float32")
