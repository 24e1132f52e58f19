"""Decoding: greedy and beam search, of one model or of several fused (late fusion: an RGB and a flow run, say), and
sampling with the words' log-probabilities (self-critical training).

Each decodes any model with the contract model.decoder(features, beam) -> (state, step): state a dict of tensors
whose "rows" (batch*beam, ...) follow the hypotheses, step(state, word_ids) -> (state, logits (batch*beam, vocab),
attention weights (batch*beam, frames)). Decoding stops once every caption (every video's pool of beams) has ended,
its outputs padded to max_len so that shapes are fixed (util.backend.scan_until).
"""
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from util import backend
from util.vocab import BOS, EOS, PAD, UNK

NEVER_WRITTEN = (PAD, BOS, UNK)  # tokens that decoding never writes
NEG_INF = float("-inf")
NO_REPEAT_NGRAM = 2  # the default: measured with tools.language_bench (docs/captions.md)


@dataclass(frozen=True)
class Constraints:
    """What a caption may not hold, whatever the model prefers.

    no_repeat_ngram  N > 0: no n-gram of N words written twice in a caption, and no word written twice in a row
                     (the training captions hold "is is" in 0.05% of captions, a repeated bigram in 0.8%); 0: off
    cannot_end       word ids after which <EOS> may not come (util.vocab.cannot_end: words the training captions
                     use often but almost never last, "a", "the", "is", "on"); when given, an empty caption is
                     refused too. Empty: any word may end a caption.
    The default, Constraints(), constrains nothing: decoding is the model's alone."""
    no_repeat_ngram: int = 0
    cannot_end: tuple = ()

    def __post_init__(self):
        if not (isinstance(self.no_repeat_ngram, int) and self.no_repeat_ngram >= 0):
            raise ValueError(f"no_repeat_ngram must be a whole number >= 0, not {self.no_repeat_ngram!r}")

    @property
    def active(self):
        return bool(self.no_repeat_ngram or self.cannot_end)

    def no_history(self, rows, max_len):
        """The words written so far, none yet: (rows, max_len) of <PAD>, or (rows, 0) when no constraint reads them,
        so that unconstrained decoding keeps no record."""
        return ops.full((rows, max_len if self.active else 0), PAD, "int32")

    def apply(self, scores, history, t):
        """scores (rows, vocab) with -inf for the words these constraints forbid at step t, history (rows, max_len)
        holding each row's words written before t (<PAD> after)."""
        if not self.active:
            return scores
        vocab = ops.shape(scores)[-1]
        words = ops.arange(vocab, dtype="int32")[None]  # (1, vocab)
        previous = ops.where(t > 0, _column(history, ops.maximum(t - 1, 0)), BOS)  # (rows,)
        banned = ops.zeros(ops.shape(scores), "bool")
        if self.no_repeat_ngram:
            banned = ops.logical_or(banned, words == previous[:, None])
            if self.no_repeat_ngram > 1:
                banned = ops.logical_or(banned, repeated_ngram_ends(history, t, vocab, self.no_repeat_ngram))
        if self.cannot_end:
            no_end = np.isin(np.arange(vocab), (BOS,) + tuple(self.cannot_end))  # a constant: BOS is the empty caption
            banned = ops.logical_or(banned, ops.logical_and(words == EOS, ops.take(no_end, previous)[:, None]))
        return ops.where(banned, NEG_INF, scores)


def _column(history, t):
    """history[:, t] for a tensor t: (rows,)."""
    rows = ops.shape(history)[0]
    return ops.take_along_axis(history, ops.full((rows, 1), t, "int32"), axis=1)[:, 0]


def repeated_ngram_ends(history, t, vocab, n):
    """(rows, vocab) bool: the words w such that the last n-1 words written, then w, is an n-gram the row wrote
    before step t already."""
    length = history.shape[1]
    starts = ops.arange(length - n + 1, dtype="int32")  # where each earlier n-gram begins
    match = (starts + n - 1 < t)[None]  # its last word was written before t
    for k in range(n - 1):
        last = _column(history, ops.maximum(t - (n - 1) + k, 0))  # the k-th of the last n-1 words
        match = ops.logical_and(match, history[:, k:k + length - n + 1] == last[:, None])
    rows = ops.shape(history)[0]
    row_ids = ops.broadcast_to(ops.arange(rows, dtype="int32")[:, None], ops.shape(match))
    indices = ops.stack([ops.reshape(row_ids, (-1,)), ops.reshape(history[:, n - 1:], (-1,))], 1)
    counts = ops.scatter(indices, ops.reshape(ops.cast(match, "float32"), (-1,)), (rows, vocab))
    return counts > 0


def written(history, t, words):
    """history (rows, max_len) with column t set to words (rows,)."""
    return ops.where((ops.arange(history.shape[1]) == t)[None], words[:, None], history)


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


def greedy(members, max_len, constraints=Constraints()):
    """Greedy decoding of one model, or of several fused: members [(model, frame_features, weight), ...], each
    model reading its own features (an RGB and a flow model, say), all with one vocabulary; each step takes the
    word of highest weighted log-probability that the constraints allow. Each caption stops at its <EOS>.
    Returns word ids (batch, max_len), <PAD> after <EOS>, and the first model's attention weights (batch, max_len,
    frames), zero after the end."""
    decoders = [model.decoder(features) for model, features, _ in members]
    weights = [weight for _, _, weight in members]
    batch = ops.shape(members[0][1])[0]

    def step(state, t):
        states, word, finished, history = state
        stepped = [step_fn(member_state, word) for (_, step_fn), member_state in zip(decoders, states)]
        scores = constraints.apply(fused_scores([logits for _, logits, _ in stepped], weights, log_probs=False),
                                   history, t)
        word = ops.where(finished, PAD, ops.cast(ops.argmax(scores, -1), "int32"))
        return ([s for s, _, _ in stepped], word, ops.logical_or(finished, word == EOS),
                written(history, t, word)), (word, stepped[0][2])

    start = ([member_state for member_state, _ in decoders], ops.full((batch,), BOS, "int32"),
             ops.zeros((batch,), "bool"), constraints.no_history(batch, max_len))
    _, (words, attention), _ = backend.scan_until(step, start, max_len, lambda state: ops.all(state[2]))
    attention = ops.where((words == PAD)[:, :, None], 0.0, attention)  # zero after each caption's end, as beam's
    return ops.transpose(words), ops.transpose(attention, (1, 0, 2))


def sample(model, frame_features, count, max_len, choose):
    """count captions per video, rows video-major (row = video*count + k) as in beam search, each word picked by
    choose(log_probs (rows, vocab), step) -> ids (rows,) (sample_word, greedy_word) from the model's probabilities,
    the never-written tokens excluded. A fixed max_len steps (a scan, differentiable). Returns word ids (rows,
    max_len), <PAD> after <EOS>, and each word's log-probability (rows, max_len), 0 after the end."""
    start, step_fn = model.decoder(frame_features, count)
    rows = ops.shape(frame_features)[0] * count

    def step(state, inputs):
        decoder_state, word, finished = state
        decoder_state, logits, _ = step_fn(decoder_state, word)
        log_probs = ops.log_softmax(fused_scores([logits], [1.0], log_probs=False), axis=-1)
        word = ops.where(finished, PAD, ops.cast(ops.stop_gradient(choose(log_probs, inputs[0])), "int32"))
        word_log_prob = ops.where(finished, 0.0, ops.take_along_axis(log_probs, word[:, None], axis=1)[:, 0])
        return (decoder_state, word, ops.logical_or(finished, word == EOS)), (word, word_log_prob)

    _, (words, log_probs) = backend.scan(step, (start, ops.full((rows,), BOS, "int32"), ops.zeros((rows,), "bool")),
                                         (ops.arange(max_len, dtype="int32"),))
    return ops.transpose(words), ops.transpose(log_probs)


def greedy_word(log_probs, step):
    return ops.argmax(log_probs, -1)


def sample_word(seed):
    """A choose for sample(): each word drawn from the model's distribution by the Gumbel-max trick, the draws of
    step t from the seed folded with t, so a seed decides every draw."""
    def choose(log_probs, step):
        uniform = backend.uniform(ops.shape(log_probs), backend.fold_in(seed, step), 1e-20, 1.0)
        return ops.argmax(log_probs - ops.log(-ops.log(uniform)), -1)
    return choose


def beam_search(members, beam_size, length_penalty, max_len, n_best=1, constraints=Constraints()):
    """Beam search of one model or of several fused (members as for greedy), all videos and all their beams
    decoded together, each hypothesis extended only by the words the constraints allow; beam_size=1 gives exactly
    greedy().

    A hypothesis's log-probability is the sum of its words' (<EOS> included; fused, the weighted sum of the
    models'), and it is ranked by log_prob / length**length_penalty, the length counting <EOS>; length_penalty may
    be a float or a scalar tensor (data, so that a compiled search serves every value). Each step extends
    every live hypothesis by every word; of each video's 2*beam_size best extensions, those among the first
    beam_size that end in <EOS> join the video's finished pool (its beam_size best by rank), and the beam_size best
    that do not end stay live. A video stops when its pool is full and none of its live hypotheses can still
    rank above the pool's worst, the search when every video has stopped or max_len words were written. A video
    with fewer than n_best finished captions is topped up with its best unfinished ones, ranked after the finished.

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

    def is_done(pool, live_scores):
        return search_done(pool["rank"], live_scores, max_len, length_penalty)

    def step(state, t):
        states, words, live_scores, pool, history = state
        stepped = [step_fn(member_state, words) for (_, step_fn), member_state in zip(decoders, states)]
        log_probs = ops.reshape(constraints.apply(fused_scores([logits for _, logits, _ in stepped], weights,
                                                               log_probs=True), history, t), (batch, beam, vocab))
        totals = ops.reshape(live_scores[:, :, None] + log_probs, (batch, beam * vocab))
        # 2*beam extensions hold at least beam that do not end: each beam contributes one <EOS> at most.
        candidate_scores, candidate_ids = ops.top_k(totals, 2 * beam)  # (batch, 2*beam), best first
        candidate_ids = ops.cast(candidate_ids, "int32")
        candidate_parents, candidate_words = candidate_ids // vocab, candidate_ids % vocab
        ends = candidate_words == EOS
        pool = _add_finished(pool, candidate_scores, candidate_parents, ends, ~is_done(pool, live_scores), t,
                             length_penalty)
        live_scores, continuing = ops.top_k(ops.where(ends, NEG_INF, candidate_scores), beam)
        parents = backend.batch_gather(candidate_parents, continuing)  # (batch, beam)
        new_words = backend.batch_gather(candidate_words, continuing)
        rows = ops.reshape(first_rows + parents, (-1,))  # (batch*beam,)
        states = [dict(s, rows=keras.tree.map_structure(lambda x: ops.take(x, rows, axis=0), s["rows"]))
                  for s, _, _ in stepped]
        attention = ops.reshape(stepped[0][2], (batch, beam, frames))
        new_words = ops.reshape(new_words, (-1,))
        return ((states, new_words, live_scores, pool, written(ops.take(history, rows, axis=0), t, new_words)),
                (ops.reshape(new_words, (batch, beam)), parents, attention))

    # At step 0 only beam 0 is live, so a video's beams do not all grow the same hypotheses.
    live_scores = ops.tile(ops.concatenate([ops.zeros((1,)), ops.full((beam - 1,), NEG_INF)], 0)[None], (batch, 1))
    empty_pool = {"rank": ops.full((batch, beam), NEG_INF), "log_prob": ops.full((batch, beam), NEG_INF),
                  "end": ops.zeros((batch, beam), "int32"), "parent": ops.zeros((batch, beam), "int32")}
    start = ([member_state for member_state, _ in decoders], ops.full((batch * beam,), BOS, "int32"), live_scores,
             empty_pool, constraints.no_history(batch * beam, max_len))
    end_state, (tokens, parents, attention), steps = backend.scan_until(
        step, start, max_len, lambda state: ops.all(is_done(state[3], state[2])))
    # tokens, parents (max_len, batch, beam); attention (max_len, batch, beam, frames), by the beam extended
    live_scores, pool = end_state[2], end_state[3]

    live = {"rank": _rank(live_scores, steps, length_penalty), "log_prob": live_scores,
            "end": ops.full((batch, beam), steps - 1, "int32"), "parent": ops.take(parents, steps - 1, axis=0),
            "word": ops.take(tokens, steps - 1, axis=0)}
    best = _n_best(pool, live, n_best)
    words, attention = _backtrack(best, tokens, parents, attention)
    return words, best["rank"], best["log_prob"], attention[:, 0]


def _rank(log_probs, length, length_penalty):
    return log_probs / ops.power(ops.cast(length, "float32"), length_penalty)


def _add_finished(pool, candidate_scores, candidate_parents, ends, searching, t, length_penalty):
    """The finished pool after step t: of each video's 2*beam extensions (candidate_scores, candidate_parents,
    ends: (batch, 2*beam), best first), those among the first beam that end in <EOS> join it while the video is
    still searching ((batch,) bool), and it keeps its beam best by rank."""
    beam = pool["rank"].shape[1]
    first_ones = ops.arange(2 * beam) < beam  # (2*beam,)
    finishing = ends & first_ones & (candidate_scores > NEG_INF) & searching[:, None]
    arrivals = {"rank": ops.where(finishing, _rank(candidate_scores, t + 1, length_penalty), NEG_INF),
                "log_prob": candidate_scores, "end": ops.full(ops.shape(candidate_scores), t, "int32"),
                "parent": candidate_parents}
    _, kept = ops.top_k(ops.concatenate([pool["rank"], arrivals["rank"]], 1), beam)  # (batch, beam)
    return {name: backend.batch_gather(ops.concatenate([pool[name], arrivals[name]], 1), kept) for name in pool}


def _n_best(pool, live, n_best):
    """The n_best hypotheses of each video: its finished pool's by rank, topped up with its best live ones (dicts of
    (batch, beam) tensors rank, log_prob, end, parent; live's with its last word too)."""
    batch, beam = ops.shape(pool["rank"])[0], pool["rank"].shape[1]
    pool = dict(pool, word=ops.full((batch, beam), EOS, "int32"))
    finished_count = ops.sum(ops.cast(pool["rank"] > NEG_INF, "int32"), 1, keepdims=True)  # (batch, 1)
    place = ops.arange(n_best, dtype="int32")[None]  # (1, n_best)
    pick = ops.where(place < finished_count, place, beam + place - finished_count)  # (batch, n_best)
    return {name: backend.batch_gather(ops.concatenate([pool[name], live[name]], 1), pick) for name in pool}


def search_done(pool_ranks, live_scores, max_len, length_penalty):
    """(batch,): each video's finished pool (batch, beam) is full and none of its live hypotheses can still rank
    above the pool's worst. Words only lower a log-probability, and a length penalty divides it by at most
    max_len**length_penalty."""
    full = ops.all(pool_ranks > NEG_INF, axis=1)
    best_possible = ops.max(live_scores, axis=1) / ops.power(float(max_len), ops.maximum(length_penalty, 0.0))
    return full & (best_possible <= ops.min(pool_ranks, axis=1))


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
