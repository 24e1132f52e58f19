import keras
import numpy as np
import pytest
import tensorflow as tf

from model import S2VT, S2VTConfig, caption_loss
from util.vocab import BOS, EOS, PAD

FRAMES, DIM, VOCAB = 7, 10, 13


def make_model(attention="bahdanau", **overrides):
    config = S2VTConfig(vocab_size=VOCAB, feature_dim=DIM, frames=FRAMES, hidden=16, frame_embed=12,
                        word_embed=8, attention=attention, attention_dim=9, max_caption_len=6, **overrides)
    return S2VT(config)


def batch(size=5, length=6, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(size, FRAMES, DIM)).astype(np.float32)
    captions = rng.integers(4, VOCAB, size=(size, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, size=size)
    for row, n in zip(captions, lengths):
        row[n - 1] = EOS
        row[n:] = PAD
    return tf.constant(features), tf.constant(captions)


@pytest.mark.parametrize("attention", ["none", "bahdanau", "luong"])
def test_output_shapes(attention):
    model = make_model(attention)
    features, captions = batch()
    logits, weights, fed = model(features, captions)
    assert logits.shape == (5, 6, VOCAB)
    assert weights.shape == (5, 6, FRAMES)
    assert fed.shape == (5, 6)
    words, greedy_weights = model.greedy(features)
    assert words.shape[0] == 5 and words.shape[1] <= 6
    assert greedy_weights.shape == (5, words.shape[1], FRAMES)


def test_loss_ignores_padding_and_divides_by_length():
    _, captions = batch()
    logits = tf.random.normal([5, 6, VOCAB], seed=1)
    pad = tf.equal(captions, PAD)[:, :, None]
    scrambled = tf.where(pad, tf.random.normal([5, 6, VOCAB], seed=2) * 10, logits)
    assert float(caption_loss(logits, captions)) == pytest.approx(float(caption_loss(scrambled, captions)), rel=1e-6)
    # by hand: per caption, summed token loss over its real tokens / number of real tokens; mean over captions
    log_probs = tf.nn.log_softmax(logits).numpy()
    expected = np.mean([-np.mean([log_probs[b, t, c] for t, c in enumerate(row) if c != PAD])
                        for b, row in enumerate(captions.numpy())])
    assert float(caption_loss(logits, captions)) == pytest.approx(expected, rel=1e-5)


def test_padding_a_batch_further_changes_nothing():
    model = make_model()
    features, captions = batch()
    padded = tf.pad(captions, [[0, 0], [0, 4]])
    loss = caption_loss(model(features, captions)[0], captions)
    loss_padded = caption_loss(model(features, padded)[0], padded)
    assert float(loss) == pytest.approx(float(loss_padded), rel=1e-5)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_attention_is_a_distribution_over_frames_that_varies(attention):
    keras.utils.set_random_seed(0)
    model = make_model(attention)
    for weight in model.attention.weights:  # a random initialisation attends almost uniformly: sharpen it
        weight.assign(weight * 5.0)
    features, captions = batch()
    _, weights, _ = model(features, captions)
    np.testing.assert_allclose(tf.reduce_sum(weights, -1).numpy(), 1.0, atol=1e-5)
    assert np.all(weights.numpy() >= 0)
    assert float(tf.reduce_min(tf.math.reduce_std(weights, -1))) > 1e-4  # not uniform over frames


def test_teacher_forcing_one_feeds_only_the_ground_truth():
    model = make_model()
    features, captions = batch()
    _, _, fed = model(features, captions, teacher_forcing_prob=1.0, seed=(3, 4), training=True)
    expected = np.concatenate([np.full((5, 1), BOS), captions.numpy()[:, :-1]], 1)
    np.testing.assert_array_equal(fed.numpy(), expected)


def test_teacher_forcing_zero_feeds_only_predictions():
    model = make_model()
    features, captions = batch()
    logits, _, fed = model(features, captions, teacher_forcing_prob=0.0, seed=(3, 4))
    predicted = tf.argmax(logits, -1).numpy()
    np.testing.assert_array_equal(fed.numpy()[:, 0], BOS)
    np.testing.assert_array_equal(fed.numpy()[:, 1:], predicted[:, :-1])
    # and without dropout or noise this is exactly greedy decoding, step by step
    words, _ = model.greedy(features, max_len=6)
    n = words.shape[1]
    first = np.argmax(words.numpy() == EOS, 1)
    for row in range(5):
        stop = first[row] + 1 if EOS in words.numpy()[row] else n
        np.testing.assert_array_equal(predicted[row, :stop], words.numpy()[row, :stop])


def test_half_probability_mixes_per_step_and_per_caption():
    model = make_model()
    features, captions = batch(size=64, length=6, seed=5)
    truth = np.concatenate([np.full((64, 1), BOS), captions.numpy()[:, :-1]], 1)
    logits, _, fed = model(features, captions, teacher_forcing_prob=0.5, seed=(7, 8), training=True)
    predicted = np.concatenate([np.full((64, 1), -1), tf.argmax(logits, -1).numpy()[:, :-1]], 1)
    fed = fed.numpy()
    assert np.all((fed == truth) | (fed == predicted))
    decisive = truth[:, 1:] != predicted[:, 1:]  # steps where the two sources differ
    share_truth = np.mean(fed[:, 1:][decisive] == truth[:, 1:][decisive])
    assert 0.4 < share_truth < 0.6
    # different captions take different choices at the same step
    assert len({tuple(row) for row in (fed[:, 1:] == truth[:, 1:])}) > 10


def test_training_randomness_is_fixed_by_the_seed():
    model = make_model()
    features, captions = batch()
    run = lambda seed: model(features, captions, teacher_forcing_prob=0.5, seed=seed, training=True)[0].numpy()
    np.testing.assert_array_equal(run((1, 2)), run((1, 2)))
    assert not np.allclose(run((1, 2)), run((1, 3)))
    # inference is deterministic and free of dropout/noise
    np.testing.assert_array_equal(model(features, captions)[0].numpy(), model(features, captions)[0].numpy())


def test_greedy_stops_each_caption_at_eos():
    model = make_model()
    bias = model.output_projection.bias
    bias.assign(tf.one_hot(EOS, VOCAB) * 100.0)
    words, _ = model.greedy(batch()[0])
    assert words.shape[1] == 1 and np.all(words.numpy() == EOS)


def test_config_refuses_unknown_attention_and_bad_sizes():
    with pytest.raises(ValueError, match="attention"):
        S2VTConfig(vocab_size=10, attention="dot")
    with pytest.raises(ValueError, match="hidden"):
        S2VTConfig(vocab_size=10, hidden=0)


def test_every_weight_is_saved_in_a_checkpoint(tmp_path):
    model = make_model()
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(prefix) if name.startswith("model/")]
    assert len(saved) == len(model.weights) == 18
