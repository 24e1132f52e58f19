"""S2VT (Venugopalan et al., ICCV 2015) with optional Bahdanau or Luong attention, and the mean-pool model it is
measured against (Venugopalan et al., NAACL 2015), in backend-neutral Keras 3.

An LSTM reads input blocks x_1..x_n (concatenated), gates ordered (input, forget, cell, output):
    [i, f, g, o] = [x_1, ..., x_n] W + h U + b;   c' = sigmoid(f) c + sigmoid(i) tanh(g);   h' = sigmoid(o) tanh(c')
S2VT: two stacked LSTMs read the video's frames x_t, then write the caption's words w_t:
    encoding, frame t:  h1_t = LSTM1(x_t W_x + b_x)     h2_t = LSTM2([E<PAD>,    h1_t, 0,   back_t])
    decoding, word t:   h1_t = LSTM1(0)                 h2_t = LSTM2([E w_{t-1}, h1_t, ctx_t, 0])
                        p(w_t) = softmax(h2_t W_o + b_o)
Every LSTM2 input keeps its position in both stages. The context is attention over LSTM2's encoder outputs h2_s,
queried by LSTM2's previous state: ctx_t = sum_s a_ts h2_s, a_t = softmax_s(score(h2_{t-1}, h2_s)), with
    Bahdanau: score = v^T tanh(W1 h_s + W2 h_t)        Luong "general": score = h_t^T W h_s
back_t, only with encoder="bidirectional", is a backward LSTM's output reading the frames from the last to the
first; it is zero while decoding (nothing is read backwards from words not yet written), as the context is while
encoding, so decoding runs exactly as in the unidirectional model.
MeanPool: the frames' mean x = mean_t x_t is the video's one vector, fed at every word:
    h1_t = LSTM1([E w_{t-1}, x W_x + b_x])    h2_t = LSTM2([h1_t])    p(w_t) = softmax(h2_t W_o + b_o)
Features are standardised per dimension (mean and std of the training features) before W_x. Training adds
uniform noise to the features, drops out the LSTMs' outputs, and feeds at each word the ground truth with the
scheduled-sampling probability, else the model's own previous argmax.

The speed kernels (hand-written LSTM and attention gradients, bfloat16 matmuls) are in kernels.py; decoding (greedy,
beam search, late fusion) in decoding.py, through decoder(). Sequences are time-major, (steps, batch, ...), and every
input projection that does not depend on the previous step is one matmul before the loop. Randomness is stateless,
drawn from a seed passed per call, so a training step is a pure function of (weights, batch, seed).
"""
from dataclasses import asdict, dataclass, field, fields

import keras
import numpy as np
from keras import ops

import decoding
from kernels import (MATMUL_DTYPES, additive_attention, lstm_cell, lstm_sequence, matmul, multiplicative_attention,
                     sequence_matmul)
from util import backend
from util.checkpoints import load_vocab, read_run_config, restore
from util.data import feature_moments, manifest_differences
from util.errors import DataError
from util.releases import resolve_checkpoint
from util.vocab import BOS, PAD, UNK

MODELS = ("s2vt", "meanpool")
ENCODERS = ("unidirectional", "bidirectional")
ATTENTIONS = ("none", "bahdanau", "luong")
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
        "help": "precision of the large matmuls: bfloat16 is faster on CPUs with AVX512-BF16 (docs/speed.md; weights, "
                "gates and cell states stay float32)", "choices": MATMUL_DTYPES})
    model: str = field(default="s2vt", metadata={
        "help": "s2vt, or meanpool: the frame features' mean feeds an LSTM decoder (model.MeanPool)",
        "choices": MODELS})
    encoder: str = field(default="unidirectional", metadata={
        "help": "bidirectional: S2VT reads the frames backwards too", "choices": ENCODERS})

    def __post_init__(self):
        for name in ("model", "encoder", "attention", "matmul_dtype"):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.model == "meanpool" and (self.attention != "none" or self.encoder != "unidirectional"):
            raise ValueError(f"the meanpool model has no frame encoder to attend to or read backwards: attention "
                             f"must be 'none' and encoder 'unidirectional', not {self.attention!r}, {self.encoder!r}")
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


class LSTMWeights(keras.layers.Layer):
    """An LSTM whose input is named blocks, e.g. {"word": 600, "lstm1": 600}: W is one kernel per block, so each
    block can be projected on its own (kernel("word")) or with others (kernel("word", "context", "recurrent")).
    The class keeps its first name: Keras files a layer's weights under its class name."""

    def __init__(self, units, blocks, matmul_dtype="float32", **kwargs):
        super().__init__(**kwargs)
        self.units, self.block_names, self.block_sizes = units, tuple(blocks), tuple(blocks.values())
        self.matmul_dtype = matmul_dtype

    def build(self, input_shape=None):
        for i, size in enumerate(self.block_sizes):  # one attribute each, named in the weights file
            setattr(self, f"kernel_{i}", self.add_weight(shape=(size, 4 * self.units), initializer="glorot_uniform",
                                                         name=f"kernel_{i}"))
        self.recurrent_kernel = self.add_weight(shape=(self.units, 4 * self.units), initializer="orthogonal",
                                                name="recurrent_kernel")
        forget_bias_one = np.concatenate([np.zeros(self.units), np.ones(self.units), np.zeros(2 * self.units)])
        self.bias = self.add_weight(shape=(4 * self.units,), name="bias",
                                    initializer=keras.initializers.Constant(forget_bias_one.astype("float32")))

    @property
    def kernels(self):
        return [getattr(self, f"kernel_{i}") for i in range(len(self.block_sizes))]

    def kernel(self, *names):
        """W's rows for the named blocks ("recurrent": U), stacked in the order named."""
        parts = [self.recurrent_kernel if name == "recurrent" else self.kernels[self.block_names.index(name)]
                 for name in names]
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, 0)

    def call(self, input_gates, h, c):
        """Over a whole sequence of input gates (time, batch, 4*units) -> outputs (time, batch, units), h, c."""
        return lstm_sequence(input_gates, h, c, backend.read(self.recurrent_kernel), self.matmul_dtype)


class Attention(keras.layers.Layer):
    """Scores each frame's encoder output h_s against the query h_t; softmax over frames."""

    def __init__(self, kind, units, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.units = kind, units

    def build(self, input_shape=None):
        h = self.units
        if self.kind == "bahdanau":  # v^T tanh(W1 h_s + W2 h_t)
            self.w_keys = self.add_weight(shape=(h, h), initializer="glorot_uniform", name="w1")
            self.w_query = self.add_weight(shape=(h, h), initializer="glorot_uniform", name="w2")
            self.v = self.add_weight(shape=(h,), initializer=keras.initializers.RandomUniform(-0.1, 0.1), name="v")
        else:  # luong "general": h_t^T W h_s
            self.w = self.add_weight(shape=(h, h), initializer="glorot_uniform", name="w")

    def keys(self, encoder_outputs, dtype="float32"):
        """Once per video, over all frames: (batch, frames, hidden) -> W1 h_s (batch, frames, hidden)."""
        if self.kind != "bahdanau":
            return encoder_outputs
        return sequence_matmul(encoder_outputs, self.w_keys, dtype)

    def call(self, query, keys, encoder_outputs):
        """query (batch, hidden) -> weights (batch, frames), context (batch, hidden)."""
        if self.kind == "bahdanau":
            return additive_attention(keys, encoder_outputs, ops.matmul(query, self.w_query), backend.read(self.v))
        return multiplicative_attention(encoder_outputs, ops.matmul(query, self.w))


def build_now(layer, input_shape=None):
    """layer, its weights made now: the order layers are made in fixes the initial weights a seed gives and the
    weights file's layout."""
    layer.build(input_shape)
    return layer


class CaptionModel(keras.Model):
    """What S2VT and MeanPool share: the frame projection with the feature standardisation folded in, the word
    embedding, the output projection, the training draws, and decoding through decoder()."""

    def __init__(self, config: ModelConfig, **kwargs):
        """The layers both models begin with; a subclass adds its LSTMs, then calls add_output_layers()."""
        super().__init__(**kwargs)
        self.config = config
        self.frame_projection = build_now(keras.layers.Dense(config.hidden, name="frame_projection"),
                                      (None, config.feature_dim))
        self.word_embedding = build_now(keras.layers.Embedding(config.vocab_size, config.hidden, name="word_embedding"),
                                    (None,))

    def lstm(self, name, **blocks):
        return build_now(LSTMWeights(self.config.hidden, blocks, self.config.matmul_dtype, name=name))

    def add_output_layers(self):
        """The output projection, then the feature standardisation (adapt_features() sets it)."""
        self.output_projection = build_now(keras.layers.Dense(self.config.vocab_size, name="output_projection"),
                                       (None, self.config.hidden))
        dim = self.config.feature_dim
        self.feature_mean = self.add_weight(shape=(dim,), initializer="zeros", trainable=False, name="feature_mean")
        self.feature_std = self.add_weight(shape=(dim,), initializer="ones", trainable=False, name="feature_std")

    def adapt_features(self, features):
        """Set the standardisation from training features (videos, frames, dim), read in chunks. The variance gets a
        floor of 10% of the mean variance, so a nearly constant dimension (common in ReLU features) is not blown up
        into outliers that saturate the LSTMs."""
        mean, variance = feature_moments(features)
        self.feature_mean.assign(mean.astype("float32"))
        self.feature_std.assign(np.sqrt(variance + 0.1 * variance.mean() + 1e-12).astype("float32"))

    def project_frames(self, x):
        """Standardised features (..., feature_dim) projected to (..., hidden), the standardisation folded into the
        projection: ((x - mean) / std) W + b = x (W / std) + (b - (mean / std) W)."""
        kernel = self.frame_projection.kernel / self.feature_std[:, None]
        bias = self.frame_projection.bias - ops.matmul(self.feature_mean[None], kernel)[0]
        return sequence_matmul(x, kernel, self.config.matmul_dtype) + bias

    def training_draws(self, seed, batch, length, teacher_forcing_prob, training):
        """Every random draw of one pass, from a seed (util.backend.seed_tensor): the scheduled-sampling coins
        (length, batch), True where the ground truth is fed (always at step 0); with training, the feature noise
        (batch, frames, dim) and dropout masks scaled by 1/keep for both LSTMs' decoder outputs (length, batch,
        hidden) and S2VT's encoder outputs (frames, batch, hidden), the backward LSTM's too."""
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
        """(..., hidden) -> (..., vocab)."""
        return sequence_matmul(h2, kernels["output"], self.config.matmul_dtype) + self.output_projection.bias

    def teacher_forcing_inputs(self, caption_ids, teacher_forcing_prob, seed, training, draws):
        """What call() starts from: whether only the ground truth is fed (no argmax needed: scoring, validation),
        the training_draws (draws, if given, else from seed), and the ground-truth previous words, <BOS> first."""
        caption_ids = ops.cast(caption_ids, "int32")
        batch, length = ops.shape(caption_ids)[0], ops.shape(caption_ids)[1]
        forced = draws is None and isinstance(teacher_forcing_prob, (int, float)) and teacher_forcing_prob >= 1
        if draws is None:
            seed = backend.seed_tensor(0) if seed is None else seed
            draws = self.training_draws(seed, batch, length, teacher_forcing_prob, training)
        previous_truth = ops.concatenate([ops.full((batch, 1), BOS, "int32"), caption_ids[:, :-1]], 1)
        return forced, draws, previous_truth

    def fed_word(self, forced, use_truth, truth, h2_out, kernels):
        """The word a training step feeds: the ground truth where its coin says so, else the model's argmax after the
        previous step, with no gradient through it (scheduled sampling)."""
        if forced:
            return truth
        predicted = ops.argmax(self.word_logits(ops.stop_gradient(h2_out), kernels), -1)
        return ops.where(use_truth, truth, ops.cast(predicted, "int32"))

    def greedy(self, frame_features, max_len=None, constraints=decoding.Constraints()):
        return decoding.greedy([(self, frame_features, 1.0)], max_len or self.config.max_caption_len, constraints)

    def sample(self, frame_features, count, choose, max_len=None):
        return decoding.sample(self, frame_features, count, max_len or self.config.max_caption_len, choose)

    def beam_search(self, frame_features, beam_size, length_penalty=0.0, max_len=None, n_best=1,
                    constraints=decoding.Constraints()):
        return decoding.beam_search([(self, frame_features, 1.0)], beam_size, length_penalty,
                                    max_len or self.config.max_caption_len, n_best, constraints)


class S2VT(CaptionModel):
    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(config, **kwargs)
        h = config.hidden
        self.lstm1 = self.lstm("lstm1", frame=h)
        self.lstm2 = self.lstm("lstm2", word=h, lstm1=h, **({"context": h} if config.attention != "none" else {}),
                               **({"backward": h} if config.encoder == "bidirectional" else {}))
        self.attention = build_now(Attention(config.attention, h, name="attention")) if config.attention != "none" \
            else None
        self.add_output_layers()
        # made last, so that a unidirectional model's weights file is laid out as it always was
        self.lstm1_backward = self.lstm("lstm1_backward", frame=h) if config.encoder == "bidirectional" else None
        self.built = True

    def encode(self, frame_features, noise=None, encoder_mask=None, backward_mask=None):
        """The encoding stage: frame_features (batch, frames, feature_dim) -> a dict of the LSTMs' last states and
        LSTM2's outputs and attention keys (batch, frames, hidden). Training passes the feature noise and the dropout
        masks on the frame readers' outputs (training_draws)."""
        x = ops.cast(frame_features, "float32")
        if noise is not None:
            x = x + noise
        dtype = self.config.matmul_dtype
        frames_in = ops.transpose(self.project_frames(x), (1, 0, 2))  # (frames, batch, hidden)
        zeros = ops.zeros((ops.shape(x)[0], self.config.hidden))
        h1_seq, h1, c1 = self.lstm1(sequence_matmul(frames_in, self.lstm1.kernel("frame"), dtype) + self.lstm1.bias,
                                    zeros, zeros)
        if encoder_mask is not None:
            h1_seq = h1_seq * encoder_mask
        # LSTM2 <- [E<PAD>, h1, 0, back]: the <PAD> word and zero context sit where decoding's words and contexts do
        pad_gates = ops.matmul(self.word_embedding.embeddings[PAD][None], self.lstm2.kernel("word")) + self.lstm2.bias
        lstm2_gates = sequence_matmul(h1_seq, self.lstm2.kernel("lstm1"), dtype) + pad_gates
        if self.lstm1_backward is not None:  # reads from the last frame to the first; outputs put back in order
            backward = self.lstm1_backward
            backward_gates = sequence_matmul(frames_in, backward.kernel("frame"), dtype) + backward.bias
            backward_seq = ops.flip(backward(ops.flip(backward_gates, 0), zeros, zeros)[0], 0)
            if backward_mask is not None:
                backward_seq = backward_seq * backward_mask
            lstm2_gates = lstm2_gates + sequence_matmul(backward_seq, self.lstm2.kernel("backward"), dtype)
        encoder_outputs, h2, c2 = self.lstm2(lstm2_gates, zeros, zeros)
        encoder_outputs = ops.transpose(encoder_outputs, (1, 0, 2))  # (batch, frames, hidden) for attention
        keys = self.attention.keys(encoder_outputs, dtype) if self.attention is not None else encoder_outputs
        return {"h1": h1, "c1": c1, "h2": h2, "c2": c2, "outputs": encoder_outputs, "keys": keys}

    def decoding_kernels(self):
        """The kernels a decoding step multiplies by, cast to the matmul precision once, before the loop: "step" is
        LSTM2's word, context and recurrent rows, so a step projects [E w, ctx, h2] in one matmul."""
        step_blocks = ("word", "context", "recurrent") if self.attention is not None else ("word", "recurrent")
        kernels = {"step": self.lstm2.kernel(*step_blocks), "lstm1_recurrent": self.lstm1.recurrent_kernel,
                   "lstm1_to_lstm2": self.lstm2.kernel("lstm1"), "output": self.output_projection.kernel}
        return {name: ops.cast(kernel, self.config.matmul_dtype) for name, kernel in kernels.items()}

    def lstm1_decode_step(self, h1, c1, kernels):
        """LSTM1 reads a zero frame: its new (h1, c1)."""
        h1, c1, _ = lstm_cell(self.lstm1.bias + matmul(h1, kernels["lstm1_recurrent"], self.config.matmul_dtype), c1)
        return h1, c1

    def lstm1_to_lstm2(self, h1, kernels):
        """LSTM1's output's share of LSTM2's gates, LSTM2's bias included: (..., hidden) -> (..., 4*hidden)."""
        return sequence_matmul(h1, kernels["lstm1_to_lstm2"], self.config.matmul_dtype) + self.lstm2.bias

    def lstm2_decode_step(self, from_lstm1, word_ids, h2, c2, encoded, kernels):
        """LSTM2 <- [E w, h1, ctx, 0] for one word: from_lstm1 (batch, 4*hidden) is lstm1_to_lstm2(h1), word_ids
        (batch,). Returns h2, c2 and the attention weights (batch, frames)."""
        inputs = [ops.take(self.word_embedding.embeddings, word_ids, axis=0)]
        if self.attention is not None:
            weights, context = self.attention(h2, encoded["keys"], encoded["outputs"])
            inputs.append(context)
        else:
            weights = ops.zeros((ops.shape(word_ids)[0], ops.shape(encoded["outputs"])[1]))
        step_inputs = ops.concatenate(inputs + [h2], 1)
        h2, c2, _ = lstm_cell(from_lstm1 + matmul(step_inputs, kernels["step"], self.config.matmul_dtype), c2)
        return h2, c2, weights

    def call(self, frame_features, caption_ids, teacher_forcing_prob=1.0, seed=None, training=False, draws=None):
        """Training / scoring pass. caption_ids (batch, length): the words then <EOS>, <PAD>-padded. Each step feeds
        each caption's ground-truth previous word with probability teacher_forcing_prob, else the model's previous
        argmax. The seed fixes the coins and, with training=True, the feature noise and dropout; draws (a
        training_draws dict) gives them instead. Returns logits (batch, length, vocab), attention weights (batch,
        length, frames) and the word ids fed (batch, length)."""
        forced, draws, previous_truth = self.teacher_forcing_inputs(caption_ids, teacher_forcing_prob, seed, training,
                                                                    draws)
        batch, length = ops.shape(previous_truth)[0], ops.shape(previous_truth)[1]
        encoded = self.encode(frame_features, draws["noise"], draws["encoder_mask"], draws.get("backward_mask"))
        # LSTM1 reads zeros while decoding, so its whole run is known before the first word.
        h1_seq, _, _ = self.lstm1(ops.broadcast_to(self.lstm1.bias, (length, batch, 4 * self.config.hidden)),
                                  encoded["h1"], encoded["c1"])  # (length, batch, hidden)
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
        """Start decoding (decoding.py's contract): the encoder reads the videos once. Returns (state, step); the
        state's "rows" (batch*beam, ...) follow the hypotheses, video-major (row = video*beam + k); LSTM1's state,
        the same for every beam of a video (it reads zeros), is kept per video."""
        encoded = self.encode(frame_features)
        kernels = self.decoding_kernels()
        per_row = (lambda x: ops.repeat(x, beam, axis=0)) if beam > 1 else (lambda x: x)
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
    """The mean-pool model: the projection of the frames' mean is the mean of their projections (it is linear), so
    the frame projection and standardisation are S2VT's, applied once per video."""

    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(config, **kwargs)
        h = config.hidden
        self.lstm1 = self.lstm("lstm1", word=h, video=h)
        self.lstm2 = self.lstm("lstm2", lstm1=h)
        self.add_output_layers()
        self.built = True

    def video_gates(self, frame_features, noise=None):
        """The mean-pooled video's share of LSTM1's gates, LSTM1's bias included: (batch, 4*hidden)."""
        x = ops.cast(frame_features, "float32")
        if noise is not None:
            x = x + noise
        video = self.project_frames(ops.mean(x, 1))  # (batch, hidden)
        return matmul(video, self.lstm1.kernel("video"), self.config.matmul_dtype) + self.lstm1.bias

    def decoding_kernels(self):
        """Each LSTM's input and recurrent rows stacked (one matmul per LSTM a step), cast once, before the loop."""
        kernels = {"lstm1": self.lstm1.kernel("word", "recurrent"), "lstm2": self.lstm2.kernel("lstm1", "recurrent"),
                   "output": self.output_projection.kernel}
        return {name: ops.cast(kernel, self.config.matmul_dtype) for name, kernel in kernels.items()}

    def decode_step(self, video_gates, word_ids, state, kernels, h1_mask=None):
        """LSTM1 <- [E w, video], LSTM2 <- [h1] for one word; h1_mask, while training, drops out LSTM1's output."""
        h1, c1, h2, c2 = state
        dtype = self.config.matmul_dtype
        word = ops.take(self.word_embedding.embeddings, word_ids, axis=0)
        h1, c1, _ = lstm_cell(video_gates + matmul(ops.concatenate([word, h1], 1), kernels["lstm1"], dtype), c1)
        h1_out = h1 if h1_mask is None else h1 * h1_mask
        h2, c2, _ = lstm_cell(self.lstm2.bias + matmul(ops.concatenate([h1_out, h2], 1), kernels["lstm2"], dtype), c2)
        return h1, c1, h2, c2

    def call(self, frame_features, caption_ids, teacher_forcing_prob=1.0, seed=None, training=False, draws=None):
        """As S2VT.call; the attention weights are all zero (nothing is attended to)."""
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
        """As S2VT.decoder; every row holds both LSTMs' states, and the attention weights are zero."""
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


def load_model(path=None, matmul_dtype=None):
    """Restore a trained model for inference: (model, vocab, run config, checkpoint folder). path: what a --checkpoint
    names (util.releases.resolve_checkpoint): a run folder (its best checkpoint, else its newest), a best/ or last/
    folder, a checkpoint folder, or a release name or URL (fetched once, and loaded here before it is kept); None:
    the newest run's. matmul_dtype, if given, replaces the precision the model was trained with (the weights are the
    same). A run whose config.json, vocab.json or weights do not fit together is one DataError line."""
    run_dir, checkpoint = resolve_checkpoint(path, check_release=load_model)
    config = read_run_config(run_dir)
    vocab = load_vocab(run_dir)
    try:  # a run written before the model and encoder fields existed is an S2VT with a unidirectional encoder
        settings = dict(config["model"])
        if matmul_dtype:
            settings["matmul_dtype"] = matmul_dtype
        model_config = ModelConfig.from_dict(settings)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{run_dir / 'config.json'}: no valid \"model\" section ({error})") from None
    if model_config.vocab_size != len(vocab):
        raise DataError(f"{run_dir / 'vocab.json'}: {len(vocab)} words, but the model was built for "
                        f"{model_config.vocab_size}")
    model = build_model(model_config)
    restore(checkpoint, model)
    return model, vocab, config, checkpoint


def initialise_from(model, vocab, source, manifest):
    """Set model's weights from another run's (source: a run or checkpoint folder, as infer.py takes) for --init-from,
    the feature standardisation excepted (model's own, from this data). Word-indexed weights are carried over word by
    word: the rows of the word embedding and the output projection's columns and biases for the words both
    vocabularies hold; this run's other words keep their fresh initial values. No weight depends on the frame count,
    so a run on one-frame "videos" (images) can start one on videos. Every other weight must have its shape here:
    the model settings that differ are named otherwise. Returns (the source checkpoint, the count of words carried
    over)."""
    source_model, source_vocab, source_config, checkpoint = load_model(source)
    differing = []
    if shapes_not_by_word(source_model) != shapes_not_by_word(model):
        differing = [f"{f.name} {getattr(source_model.config, f.name)} there, {getattr(model.config, f.name)} here"
                     for f in fields(ModelConfig) if f.name not in ("vocab_size", "frames")  # mapped, and free
                     and getattr(source_model.config, f.name) != getattr(model.config, f.name)]
    source_features = source_config.get("features")
    if source_features and manifest:  # the same feature extractor, whatever the frames sampled
        differing += [f"features' {key} {there!r} there, {here!r} here"
                      for key, (there, here) in manifest_differences(source_features, manifest).items()
                      if key != "frames"]
    if differing:
        raise DataError(f"{source}: cannot start from this run's weights ({'; '.join(differing)})")
    here = [i for i, word in enumerate(vocab.words) if word in source_vocab.index]
    there = [source_vocab.index[vocab.words[i]] for i in here]
    output = model.output_projection
    for target, value in zip(model.weights, source_model.weights):
        if target is model.feature_mean or target is model.feature_std:
            continue
        value = ops.convert_to_numpy(value)
        if any(target is word_indexed for word_indexed in word_indexed_weights(model)):
            axis = 1 if target is output.kernel else 0  # the kernel is (hidden, vocab), the others (vocab, ...)
            carried, value = value, np.array(ops.convert_to_numpy(target))
            np.moveaxis(value, axis, 0)[here] = np.moveaxis(carried, axis, 0)[there]
        target.assign(value)
    return checkpoint, len(here)


def word_indexed_weights(model):
    return model.word_embedding.embeddings, model.output_projection.kernel, model.output_projection.bias


def shapes_not_by_word(model):
    """The shapes of the model's weights, in order, but those indexed by word (their vocabulary is mapped)."""
    return [tuple(w.shape) for w in model.weights if not any(w is v for v in word_indexed_weights(model))]


def caption_losses(logits, caption_ids, learn_unk=False):
    """Each caption's masked cross-entropy summed over its words, divided by its length: (batch,). An all-<PAD> row
    (padding of a batch) counts 0. <UNK> targets are left out unless learn_unk: one token standing for every rare
    word would outweigh each real word, and decoding never writes it (the model still reads <UNK> as an input)."""
    caption_ids = ops.cast(caption_ids, "int32")
    mask = caption_ids != PAD if learn_unk else ops.logical_and(caption_ids != PAD, caption_ids != UNK)
    mask = ops.cast(mask, "float32")
    token_loss = ops.sparse_categorical_crossentropy(caption_ids, logits, from_logits=True)
    return ops.sum(token_loss * mask, 1) / ops.maximum(ops.sum(mask, 1), 1.0)


def caption_loss(logits, caption_ids):
    """caption_losses averaged over the batch."""
    return ops.mean(caption_losses(logits, caption_ids))
