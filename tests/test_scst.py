"""Self-critical training: CIDEr-D against pycocoevalcap on the real MLDS captions and on a hand-worked example, the
reward and baseline, an all-equal batch, a resumed run against an uninterrupted one, and one step on both
backends."""
import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
from keras import ops

import scst
import train
from conftest import ROOT, TINY_RUN_FLAGS, checkpoint_weights, write_tiny_mlds
from model import ModelConfig, build_model
from util import backend
from util.checkpoints import latest_checkpoint, read_state
from util.cider import CiderD
from util.evaluate import fallback_tokenize
from util.vocab import EOS, PAD

# ---- CIDEr-D ----


def test_cider_d_agrees_with_pycocoevalcap_on_mlds(mlds):
    """The course's sample answer, each video's first reference cut by its last word, and its second reference, all
    against testing_label.json, document frequencies from those references as pycocoevalcap takes them."""
    from pycocoevalcap.cider.cider import Cider

    references = {e["id"]: [fallback_tokenize(c) for c in e["caption"]] for e in
                  json.loads((mlds / "testing_label.json").read_text())}
    videos = sorted(references)
    answer = dict(line.rstrip("\n").split(",", 1) for line in (mlds / "sample_output_testset.txt").open())
    ids = {}

    def encode(text):
        return [ids.setdefault(word, len(ids) + 4) for word in text.split()]

    cider = CiderD([[encode(r) for r in references[v]] for v in videos])
    candidate_sets = [{v: fallback_tokenize(answer[v]) for v in videos},
                      {v: " ".join(references[v][0].split()[:-1]) for v in videos},
                      {v: references[v][1] for v in videos}]
    for candidates in candidate_sets:
        _, expected = Cider().compute_score({v: references[v] for v in videos}, {v: [candidates[v]] for v in videos})
        ours = cider([encode(candidates[v]) for v in videos], np.arange(len(videos)))
        assert np.max(np.abs(ours - expected)) < 1e-9
        assert np.max(ours) > 0.5 or np.mean(ours) < 0.01  # sample answer ~0, references well above


def test_cider_d_hand_worked():
    """Two videos, one reference each, so every n-gram has idf log 2 and the idf cancels: exact values by hand. A
    repeated word is clipped at the reference's weight; a caption that stops before the reference's <EOS> scores
    less than the whole."""
    a, b, c, d = 4, 5, 6, 7
    cider = CiderD([[[a, b]], [[c, d]]])
    gauss = math.exp(-1 / 72)
    expected = [10 / 4 * 2,  # "a b": unigrams and bigrams the same as the reference's, no 3- or 4-grams
                10 / 4 * gauss / math.sqrt(2),  # "a": one of the two unigrams, one bigram shorter
                10 / 4 * gauss * (2 / math.sqrt(10) + 1 / math.sqrt(2))]  # "a a b": a's weight 2 clipped to 1
    assert np.allclose(cider([[a, b], [a], [a, a, b]], [0, 0, 0]), expected, rtol=1e-12)
    assert cider([[c, d]], [0])[0] == 0.0

    with_eos = CiderD([[[a, b, c, EOS]], [[d, EOS]]])
    whole, cut = with_eos(np.array([[a, b, c, EOS, PAD], [a, b, c, PAD, PAD]]), [0, 0])
    assert whole == pytest.approx(10.0) and cut < 0.75 * whole


def test_mean_of_others_baseline():
    rewards = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 2.0]], np.float32)
    assert np.allclose(ops.convert_to_numpy(scst.mean_of_others(rewards)), [[2.5, 2.0, 1.5], [1.25, 1.25, 0.5]])


# ---- the loss on replayed words ----

CONFIG = dict(vocab_size=9, feature_dim=5, frames=4, hidden=8, max_caption_len=5)
REFERENCES = [[[4, 5, 6, EOS]], [[7, 8, EOS], [7, 7, 8, EOS]]]


def replay(words):
    """A draw for scst.scst_loss that picks the given words (rows, max_caption_len), whatever the seed."""
    return lambda seed: (lambda log_probs, step: ops.take(ops.convert_to_tensor(words.T), step, axis=0))


def tiny_model():
    backend.set_random_seed(3)
    return build_model(ModelConfig(**CONFIG))


def test_loss_is_the_reward_weighted_log_probability():
    """Video 0's three samples: its reference, the reference cut before <EOS> (no <EOS> within max_caption_len),
    a repeated word; video 1's all equal (zero advantage); a padding row counts for nothing."""
    model = tiny_model()
    words = np.array([[4, 5, 6, EOS, PAD], [4, 5, 6, 6, 6], [4, 4, 4, EOS, PAD]] + [[7, 8, EOS, PAD, PAD]] * 3
                     + [[4, 5, EOS, PAD, PAD]] * 3, np.int32)
    features = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    rewards = CiderD(REFERENCES)
    loss_fn = scst.scst_loss(rewards, 3, "mean", draw=replay(words))
    loss = float(loss_fn(model, features, np.array([[1], [2], [0]], np.int32), 1.0, backend.seed_tensor(0), 2))

    _, log_probs = model.sample(features, 3, replay(words)(None))
    summed = ops.convert_to_numpy(ops.sum(log_probs, 1)).reshape(3, 3)
    assert np.all(np.isfinite(summed)) and np.all(summed < 0)
    scores = rewards(words[:3], [0, 0, 0])
    advantage = scores - (scores.sum() - scores) / 2
    assert scores[0] > scores[2] and scores[0] > scores[1]
    assert loss == pytest.approx(-np.sum(advantage * summed[0]) / (3 * 2), rel=1e-5)


def test_all_equal_rewards_give_no_gradient():
    model = tiny_model()
    words = np.array([[7, 8, EOS, PAD, PAD]] * 4, np.int32)
    loss_fn = scst.scst_loss(CiderD(REFERENCES), 2, "mean", draw=replay(words))
    features = np.ones((2, 4, 5), np.float32)
    loss, gradients = backend.loss_and_gradients(
        model, lambda: loss_fn(model, features, np.array([[1], [2]], np.int32), 1.0, backend.seed_tensor(0), 2))
    assert float(loss) == 0.0
    assert all(np.all(ops.convert_to_numpy(g) == 0) for g in gradients)


# ---- training ----

@pytest.fixture(scope="module")
def xe_run(tmp_path_factory):
    """(data, run): one cross-entropy epoch, unvalidated: a start for SCST, which validates on its own (and which
    test_resumed_scst_run_equals_an_uninterrupted_one checks moves the weights on from it)."""
    data = write_tiny_mlds(tmp_path_factory.mktemp("scst") / "data")
    run = data.parent / "xe"
    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(run), *TINY_RUN_FLAGS, "--epochs", "1",
                       "--val-fraction", "0"]) == 0
    return data, run


def scst_flags(data, run_dir, xe):
    return ["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TINY_RUN_FLAGS, "--epochs", "2", "--objective",
            "scst", "--init-from", str(xe), "--scst-samples", "3", "--max-caption-len", "8"]


@pytest.mark.slow
def test_resumed_scst_run_equals_an_uninterrupted_one(xe_run, tmp_path, monkeypatch):
    data, xe = xe_run
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(scst_flags(data, straight, xe)) == 0
    assert read_state(latest_checkpoint(straight / "best"))["best_score"] is not None  # picked by validation CIDEr
    assert json.loads((straight / "config.json").read_text())["train"]["select_metric"] == "cider"

    class StopAfter:  # Ctrl-C once epoch 2 has trained a batch: 3 batches and the end of epoch 1 asked before
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 5

    @contextmanager
    def ctrl_c_in_epoch_two():
        yield StopAfter()

    with monkeypatch.context() as patch:
        patch.setattr(train, "ctrl_c_stops_between_batches", ctrl_c_in_epoch_two)
        assert train.main(scst_flags(data, resumed, xe)) == 130
    state = read_state(latest_checkpoint(resumed / "last"))
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    assert train.main(scst_flags(data, resumed, xe) + ["--resume"]) == 0
    expected = checkpoint_weights(latest_checkpoint(straight / "last"))
    got = checkpoint_weights(latest_checkpoint(resumed / "last"))
    assert expected.keys() == got.keys() and expected
    assert max(float(np.max(np.abs(expected[k] - got[k]))) for k in expected) <= 1e-6
    start = checkpoint_weights(latest_checkpoint(xe / "best"))
    assert start.keys() == expected.keys()
    assert max(float(np.max(np.abs(expected[k] - start[k]))) for k in expected) > 1e-4  # SCST did change the weights


def test_scst_needs_a_cross_entropy_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data-dir", str(tmp_path), "--objective", "scst"])
    assert "--init-from" in capsys.readouterr().err


def scst_step(weights):
    """One SCST step's loss and gradients (numpy) from the weights file, words replayed, on this process's backend."""
    model = tiny_model()
    model.load_weights(weights)
    words = np.array([[4, 5, 6, EOS, PAD], [4, 5, 6, 6, 6], [4, 4, 4, EOS, PAD], [7, 8, EOS, PAD, PAD],
                      [7, 7, 8, EOS, PAD], [8, EOS, PAD, PAD, PAD]], np.int32)
    features = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
    loss_fn = scst.scst_loss(CiderD(REFERENCES), 3, "mean", draw=replay(words))
    loss, gradients = backend.loss_and_gradients(
        model, lambda: loss_fn(model, features, np.array([[1], [2]], np.int32), 1.0, backend.seed_tensor(0), 2))
    return backend.to_numpy([loss, *gradients])


# scst_step on the other backend (KERAS_BACKEND), saved to argv[2]
STEP = """
import sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import numpy as np
import test_scst
from util import backend
backend.full_float32_matmuls()
np.savez(sys.argv[2], *test_scst.scst_step(sys.argv[3]))
"""


def test_both_backends_take_the_same_scst_step(tmp_path):
    from test_backends import run

    weights = tmp_path / "tiny.weights.h5"
    tiny_model().save_weights(weights)
    script, out = tmp_path / "step.py", tmp_path / "other.npz"
    script.write_text(STEP)
    run("jax" if backend.BACKEND == "tensorflow" else "tensorflow", [script, ROOT, out, weights])
    here, other = scst_step(weights), list(np.load(out).values())
    assert abs(float(here[0])) > 1e-3 and len(here) == len(other) > 10
    assert abs(float(here[0]) - float(other[0])) < 1e-4
    for mine, theirs in zip(here[1:], other[1:]):
        assert np.allclose(mine, theirs, atol=1e-5)
