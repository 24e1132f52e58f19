"""S2VT (Venugopalan et al., ICCV 2015) with optional Bahdanau or Luong attention, in Keras 3 on TensorFlow.

Two stacked LSTMs read the video, then write the caption:
  encoding, per frame:  LSTM1 <- projected frame features;   LSTM2 <- [<PAD> embedding, LSTM1 output, zero context]
  decoding, per word:   LSTM1 <- zeros;                       LSTM2 <- [previous word embedding, LSTM1 output, context]
Every LSTM2 input keeps its position in both stages. The context is attention over LSTM2's encoder outputs,
queried by LSTM2's previous state, softmaxed over the frames.

The recurrences run as tf.while_loops over TensorArrays, with every input projection that does not depend on
the step done as one matmul before the loop (on CPU this is about twice as fast as stepping Keras' LSTM cells).
Randomness (feature noise, dropout, scheduled-sampling coins) is stateless, drawn from a seed passed per call,
so a training step is a pure function of (weights, batch, seed) and a resumed run replays exactly.
"""
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from util.vocab import BOS, PAD, EOS

ATTENTIONS = ("none", "bahdanau", "luong")


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

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")
        for name in ("vocab_size", "feature_dim", "frames", "hidden", "frame_embed", "word_embed",
                     "attention_dim", "max_caption_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)


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

    def step(self, input_gates, h, c):
        """One step, given the inputs' share of the gate pre-activations (batch, 4*units)."""
        z = input_gates + tf.matmul(h, self.recurrent_kernel)
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c

    def run(self, input_gates, h, c):
        """Run over a whole sequence of precomputed input gates (batch, time, 4*units) -> outputs (batch, time, units)."""
        steps = tf.shape(input_gates)[1]
        gates_ta = tf.TensorArray(input_gates.dtype, size=steps).unstack(tf.transpose(input_gates, [1, 0, 2]))
        outputs_ta = tf.TensorArray(input_gates.dtype, size=steps)

        def body(t, h, c, outputs_ta):
            h, c = self.step(gates_ta.read(t), h, c)
            return t + 1, h, c, outputs_ta.write(t, h)

        _, h, c, outputs_ta = tf.while_loop(lambda t, *_: t < steps, body, (0, h, c, outputs_ta))
        return tf.transpose(outputs_ta.stack(), [1, 0, 2]), h, c  # (batch, time, units)


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

    def keys(self, encoder_outputs):
        """Per-batch precomputation over all frames: (batch, frames, hidden) -> (batch, frames, dim)."""
        return tf.matmul(encoder_outputs, self.w_keys) if self.kind == "bahdanau" else encoder_outputs

    def weights_and_context(self, keys, encoder_outputs, query):
        if self.kind == "bahdanau":
            scores = tf.reduce_sum(self.v * tf.tanh(keys + tf.matmul(query, self.w_query)[:, None, :]), -1)
        else:
            scores = tf.reduce_sum(tf.matmul(query, self.w)[:, None, :] * keys, -1)  # (batch, frames)
        weights = tf.nn.softmax(scores, axis=-1)
        return weights, tf.reduce_sum(weights[:, :, None] * encoder_outputs, 1)  # (batch, hidden)


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
        """Set the standardisation from training features (videos, frames, dim).

        The variance gets a floor of 10% of the mean variance, so a nearly constant dimension (common in ReLU
        features) is not blown up into huge outliers that saturate the LSTMs."""
        flat = features.reshape(-1, features.shape[-1])  # (videos * frames, dim)
        mean = flat.mean(0, dtype="float64")
        variance = flat.var(0, dtype="float64")
        self.feature_mean.assign(mean.astype("float32"))
        self.feature_std.assign(np.sqrt(variance + 0.1 * variance.mean() + 1e-12).astype("float32"))

    # ---- randomness: stateless, so (weights, batch, seed) fixes the result ----
    @staticmethod
    def _seeds(seed, n):
        return tf.unstack(tf.random.experimental.stateless_split(seed, n))

    def _dropout(self, x, seed):
        keep = 1.0 - self.config.dropout
        mask = tf.cast(tf.random.stateless_uniform(tf.shape(x), seed) < keep, x.dtype)
        return x * mask / keep

    # ---- encoding stage ----
    def encode(self, frame_features, seed=None):
        """frame_features (batch, frames, feature_dim) -> encoder state dict; a seed turns on noise and dropout."""
        cfg = self.config
        batch = tf.shape(frame_features)[0]
        x = tf.cast(frame_features, tf.float32)
        if seed is not None:
            noise_seed, drop_seed = self._seeds(seed, 2)
            x += tf.random.stateless_uniform(tf.shape(x), noise_seed, -cfg.feature_noise, cfg.feature_noise)
        x = (x - self.feature_mean) / self.feature_std
        zeros = tf.zeros([batch, cfg.hidden])
        frames_in = self.frame_projection(x)  # (batch, frames, frame_embed)
        h1_seq, h1, c1 = self.lstm1.run(tf.matmul(frames_in, self.lstm1.kernels[0]) + self.lstm1.bias, zeros, zeros)
        if seed is not None:
            h1_seq = self._dropout(h1_seq, drop_seed)
        pad_gates = self.word_gate_table()[PAD]  # the <PAD> word and a zero context, same positions as decoding
        gates2 = pad_gates + tf.matmul(h1_seq, self.lstm2.kernels[1]) + self.lstm2.bias  # (batch, frames, 4*hidden)
        encoder_outputs, h2, c2 = self.lstm2.run(gates2, zeros, zeros)  # (batch, frames, hidden)
        keys = self.attention.keys(encoder_outputs) if self.attention is not None else encoder_outputs
        return {"h1": h1, "c1": c1, "h2": h2, "c2": c2, "outputs": encoder_outputs, "keys": keys}

    def word_gate_table(self):
        """Every word's share of LSTM2's gates, (vocab, 4*hidden): a lookup replaces embedding + matmul per step."""
        return tf.matmul(self.word_embedding.embeddings, self.lstm2.kernels[0])

    # ---- decoding stage: one step shared by training, greedy and beam search ----
    def decode_step(self, state, word_ids, word_table, encoded, h1_dropout=None, h2_dropout=None):
        """Feed word_ids (batch,) and advance one word. Returns (logits (batch, vocab), attention, new state)."""
        h1, c1 = self.lstm1.step(self.lstm1.bias, state["h1"], state["c1"])  # LSTM1 reads zero frames
        h1_out = h1 if h1_dropout is None else h1 * h1_dropout
        gates2 = tf.gather(word_table, word_ids) + tf.matmul(h1_out, self.lstm2.kernels[1]) + self.lstm2.bias
        if self.attention is not None:
            weights, context = self.attention.weights_and_context(encoded["keys"], encoded["outputs"], state["h2"])
            gates2 += tf.matmul(context, self.lstm2.kernels[2])
        else:
            weights = tf.zeros([tf.shape(word_ids)[0], tf.shape(encoded["outputs"])[1]])
        h2, c2 = self.lstm2.step(gates2, state["h2"], state["c2"])
        h2_out = h2 if h2_dropout is None else h2 * h2_dropout
        return self.output_projection(h2_out), weights, {"h1": h1, "c1": c1, "h2": h2, "c2": c2}

    def call(self, frame_features, caption_ids, teacher_forcing_prob=1.0, seed=(0, 0), training=False):
        """Training / scoring pass. caption_ids (batch, length): the words then <EOS>, <PAD>-padded.

        At each step every caption independently feeds its ground-truth previous word with probability
        teacher_forcing_prob, else the model's own previous argmax (scheduled sampling). The seed (2 ints)
        fixes the coins and, with training=True, the feature noise and dropout.
        Returns logits (batch, length, vocab), attention weights (batch, length, frames) and the word ids
        fed at each step (batch, length).
        """
        cfg = self.config
        batch, length = tf.shape(caption_ids)[0], tf.shape(caption_ids)[1]
        encode_seed, coin_seed, drop1_seed, drop2_seed = self._seeds(tf.cast(seed, tf.int64), 4)
        encoded = self.encode(frame_features, encode_seed if training else None)
        word_table = self.word_gate_table()
        previous_truth = tf.concat([tf.fill([batch, 1], BOS), caption_ids[:, :-1]], 1)  # (batch, length)
        truth_ta = tf.TensorArray(tf.int32, size=length).unstack(tf.transpose(tf.cast(previous_truth, tf.int32)))
        use_truth = tf.random.stateless_uniform([length, batch], coin_seed) < teacher_forcing_prob
        if training:
            keep = 1.0 - cfg.dropout
            mask_shape = [length, batch, cfg.hidden]
            h1_masks = tf.cast(tf.random.stateless_uniform(mask_shape, drop1_seed) < keep, tf.float32) / keep
            h2_masks = tf.cast(tf.random.stateless_uniform(mask_shape, drop2_seed) < keep, tf.float32) / keep
        else:
            h1_masks = h2_masks = tf.ones([length, 1, 1])
        use_truth_ta = tf.TensorArray(tf.bool, size=length).unstack(use_truth)
        h1_ta = tf.TensorArray(tf.float32, size=length).unstack(h1_masks)
        h2_ta = tf.TensorArray(tf.float32, size=length).unstack(h2_masks)
        logits_ta = tf.TensorArray(tf.float32, size=length)
        weights_ta = tf.TensorArray(tf.float32, size=length)
        fed_ta = tf.TensorArray(tf.int32, size=length)
        state = {k: encoded[k] for k in ("h1", "c1", "h2", "c2")}

        def body(t, state, previous_logits, logits_ta, weights_ta, fed_ta):
            predicted = tf.argmax(previous_logits, -1, output_type=tf.int32)
            word = tf.where(use_truth_ta.read(t) | tf.equal(t, 0), truth_ta.read(t), predicted)
            logits, weights, state = self.decode_step(state, word, word_table, encoded, h1_ta.read(t), h2_ta.read(t))
            return t + 1, state, logits, logits_ta.write(t, logits), weights_ta.write(t, weights), fed_ta.write(t, word)

        initial_logits = tf.zeros([batch, cfg.vocab_size])
        _, _, _, logits_ta, weights_ta, fed_ta = tf.while_loop(
            lambda t, *_: t < length, body, (0, state, initial_logits, logits_ta, weights_ta, fed_ta))
        logits = tf.transpose(logits_ta.stack(), [1, 0, 2])  # (batch, length, vocab)
        return logits, tf.transpose(weights_ta.stack(), [1, 0, 2]), tf.transpose(fed_ta.stack())

    def greedy(self, frame_features, max_len=None):
        """Greedy decoding, each caption stopping at its <EOS>.
        Returns word ids (batch, steps) <PAD>-filled after <EOS>, and attention weights (batch, steps, frames)."""
        max_len = max_len or self.config.max_caption_len
        encoded = self.encode(frame_features)
        word_table = self.word_gate_table()
        batch = tf.shape(frame_features)[0]
        words_ta = tf.TensorArray(tf.int32, size=max_len)
        weights_ta = tf.TensorArray(tf.float32, size=max_len)
        state = {k: encoded[k] for k in ("h1", "c1", "h2", "c2")}

        def body(t, state, word, finished, words_ta, weights_ta):
            logits, weights, state = self.decode_step(state, word, word_table, encoded)
            word = tf.where(finished, PAD, tf.argmax(logits, -1, output_type=tf.int32))
            finished |= tf.equal(word, EOS)
            return t + 1, state, word, finished, words_ta.write(t, word), weights_ta.write(t, weights)

        steps, _, _, _, words_ta, weights_ta = tf.while_loop(
            lambda t, state, word, finished, *_: (t < max_len) & ~tf.reduce_all(finished), body,
            (0, state, tf.fill([batch], BOS), tf.zeros([batch], tf.bool), words_ta, weights_ta))
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
        encoded = {name: tf.repeat(value, beam, axis=0) for name, value in self.encode(frame_features).items()}
        frames = tf.shape(encoded["outputs"])[1]
        word_table = self.word_gate_table()
        first_rows = tf.range(batch)[:, None] * beam  # (batch, 1)
        neg_inf = tf.constant(-np.inf)

        def rank(log_probs, length):
            return log_probs / tf.pow(tf.cast(length, tf.float32), length_penalty)

        def is_full(pool):
            return tf.reduce_all(pool["rank"] > neg_inf, axis=1)  # (batch,)

        def body(t, state, words, live_scores, pool, tokens_ta, parents_ta, weights_ta):
            logits, weights, state = self.decode_step(state, words, word_table, encoded)
            log_probs = tf.reshape(tf.nn.log_softmax(logits), [batch, beam, vocab])
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
            state = {name: tf.gather(value, rows) for name, value in state.items()}
            return (t + 1, state, tf.reshape(new_words, [-1]), live_scores, pool, tokens_ta.write(t, new_words),
                    parents_ta.write(t, parents), weights_ta.write(t, tf.reshape(weights, [batch, beam, frames])))

        # At step 0 only beam 0 is live, so a video's beams do not all grow the same hypotheses.
        live_scores = tf.tile(tf.concat([[0.0], tf.fill([beam - 1], neg_inf)], 0)[None], [batch, 1])
        empty_pool = {"rank": tf.fill([batch, beam], neg_inf), "log_prob": tf.fill([batch, beam], neg_inf),
                      "end": tf.zeros([batch, beam], tf.int32), "parent": tf.zeros([batch, beam], tf.int32)}
        state = {name: encoded[name] for name in ("h1", "c1", "h2", "c2")}
        steps, _, _, live_scores, pool, tokens_ta, parents_ta, weights_ta = tf.while_loop(
            lambda t, state, words, live_scores, pool, *_: (t < max_len) & ~tf.reduce_all(is_full(pool)), body,
            (0, state, tf.fill([batch * beam], BOS), live_scores, empty_pool,
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


def caption_loss(logits, caption_ids):
    """Masked cross-entropy summed over each caption, divided by its length, averaged over the batch."""
    mask = tf.cast(tf.not_equal(caption_ids, PAD), tf.float32)
    token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(caption_ids, tf.int32), logits=logits)
    per_caption = tf.reduce_sum(token_loss * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)
    return tf.reduce_mean(per_caption)
