"""Decoding's constraints (decoding.Constraints): <UNK> never written, no stutter, no n-gram twice, no caption that
ends on a word that cannot end one; greedy and beam search alike, eager and compiled."""
import numpy as np
import pytest

import decoding
from decoding import Constraints
from test_beam import features, markov_model
from test_model import VOCAB
from util import backend
from util.vocab import BOS, EOS, UNK

A, B, C, D = 4, 5, 6, 7
TINY = 1e-9


def chain(rows):
    """A markov_model from {previous word: {next word: probability}}, every other row ending at once."""
    transitions = np.full((VOCAB, VOCAB), TINY)
    transitions[:, EOS] = 1.0
    for previous, nexts in rows.items():
        transitions[previous] = TINY
        for word, p in nexts.items():
            transitions[previous, word] = p
    return markov_model(transitions / transitions.sum(1, keepdims=True))


def decode(model, how, constraints, beam_size=3):
    frames = features(2)
    if how == "greedy":
        words, _ = decoding.greedy([(model, frames, 1.0)], model.config.max_caption_len, constraints)
    elif how == "beam":
        words = decoding.beam_search([(model, frames, 1.0)], beam_size, 0.0, model.config.max_caption_len, 1,
                                     constraints)[0][:, 0]
    else:  # compiled beam search, as the Captioner runs it
        run = backend.compile_function(model, lambda f: decoding.beam_search(
            [(model, f, 1.0)], beam_size, 0.0, model.config.max_caption_len, 1, constraints)[0][:, 0])
        words = run(frames)
    words = backend.to_numpy(words)
    return [[int(w) for w in row if w not in (0, EOS)] for row in words]


HOW = ["greedy", "beam", "compiled beam"]


@pytest.mark.parametrize("how", HOW)
def test_a_model_that_prefers_unk_and_then_a_repeat_still_writes_a_real_word(how):
    # after A the model puts 0.7 on <UNK>, 0.25 on A again and 0.05 on B: <UNK> is never written, and the
    # repeat is refused, so the caption goes on with B
    model = chain({BOS: {UNK: 0.7, A: 0.3}, A: {UNK: 0.7, A: 0.25, B: 0.05}})
    assert decode(model, how, Constraints(no_repeat_ngram=2)) == [[A, B]] * 2
    unconstrained = decode(model, how, Constraints())
    assert all(UNK not in row for row in unconstrained)
    if how == "greedy":  # greedy alone stutters without the constraint (a beam finds "A B" more likely)
        assert unconstrained[0][:2] == [A, A]


@pytest.mark.parametrize("how", HOW)
def test_no_ngram_is_written_twice(how):
    # A B A B ... is what the model wants; with bigrams blocked, A B A then C
    # (beam search prefers "A C", which ends sooner, constrained or not)
    model = chain({BOS: {A: 1.0}, A: {B: 0.8, C: 0.2}, B: {A: 0.9, C: 0.1}, C: {EOS: 1.0}})
    expected = {0: [A, B, A, B, A, B], 2: [A, B, A, C], 3: [A, B, A, B, C]}
    for n in (0, 2, 3):
        got = decode(model, how, Constraints(no_repeat_ngram=n))
        if how == "greedy":
            assert got[0][:6] == expected[n]
        if n:
            assert all(len(set(zip(*(row[i:] for i in range(n))))) == len(row) - n + 1 for row in got)


@pytest.mark.parametrize("how", HOW)
def test_a_caption_never_ends_on_a_word_that_cannot_end_one(how):
    # after A the model would stop (0.9); A cannot end a caption, so it goes on with its next best, B
    model = chain({BOS: {A: 1.0}, A: {EOS: 0.9, B: 0.1}, B: {EOS: 1.0}})
    assert decode(model, how, Constraints()) == [[A]] * 2
    assert decode(model, how, Constraints(cannot_end=(A,))) == [[A, B]] * 2
    assert decode(model, how, Constraints(cannot_end=(B,))) == [[A]] * 2


@pytest.mark.parametrize("how", HOW)
def test_an_empty_caption_is_refused_when_ends_are_constrained(how):
    model = chain({BOS: {EOS: 0.9, A: 0.1}, A: {EOS: 1.0}})
    assert decode(model, how, Constraints()) == [[]] * 2
    assert decode(model, how, Constraints(cannot_end=(B,))) == [[A]] * 2


def test_bad_no_repeat_ngram_is_refused():
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        Constraints(no_repeat_ngram=-1)
