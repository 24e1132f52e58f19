import h5py
import numpy as np
import pytest
from keras import ops

from decoding import NEVER_WRITTEN
from model import ModelConfig, build_model, caption_loss
from util import backend
from util.vocab import BOS, EOS, PAD

FRAMES, DIM, VOCAB = 7, 10, 13


def make_model(attention="bahdanau", seed=0, **overrides):
    """A tiny model whose weights are drawn with numpy from seed: the same model on every backend. overrides set
    other ModelConfig fields (model="meanpool" with attention "none", encoder="bidirectional")."""
    config = ModelConfig(vocab_size=VOCAB, feature_dim=DIM, frames=FRAMES, hidden=16, attention=attention, max_caption_len=6, **overrides)
    model = build_model(config)
    model.set_weights(numpy_weights(model, seed))
    return model


def numpy_weights(model, seed):
    """Weights drawn as the model's initializers draw them (Glorot uniform kernels, orthogonal recurrent kernels,
    embeddings uniform in +-0.05, v in +-0.1), by numpy; biases and the standardisation keep their constant initial
    values."""
    rng = np.random.default_rng(seed)
    weights = []
    for variable in model.weights:
        value = ops.convert_to_numpy(variable)
        if variable.name == "recurrent_kernel":
            q, r = np.linalg.qr(rng.normal(size=value.shape[::-1]))
            value = (q * np.sign(np.diag(r))).T
        elif variable.name == "embeddings":
            value = rng.uniform(-0.05, 0.05, value.shape)
        elif value.ndim == 2:
            limit = np.sqrt(6.0 / sum(value.shape))
            value = rng.uniform(-limit, limit, value.shape)
        elif variable.name == "v":
            value = rng.uniform(-0.1, 0.1, value.shape)
        weights.append(value.astype(np.float32))
    return weights


def batch(size=5, length=6, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(size, FRAMES, DIM)).astype(np.float32)
    captions = rng.integers(4, VOCAB, size=(size, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, size=size)
    for row, n in zip(captions, lengths):
        row[n - 1] = EOS
        row[n:] = PAD
    return features, captions


@pytest.mark.parametrize("attention", ["none", "bahdanau", "luong"])
def test_output_shapes(attention):
    model = make_model(attention)
    features, captions = batch()
    logits, weights, fed = model(features, captions)
    assert logits.shape == (5, 6, VOCAB)
    assert weights.shape == (5, 6, FRAMES)
    assert fed.shape == (5, 6)
    words, greedy_weights = model.greedy(features)
    assert words.shape == (5, 6)  # max_caption_len columns, <PAD> after <EOS>
    assert greedy_weights.shape == (5, 6, FRAMES)


def test_loss_ignores_padding_and_divides_by_length():
    _, captions = batch()
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 6, VOCAB)).astype(np.float32)
    pad = (captions == PAD)[:, :, None]
    scrambled = np.where(pad, rng.normal(size=(5, 6, VOCAB)).astype(np.float32) * 10, logits)
    assert float(caption_loss(logits, captions)) == pytest.approx(float(caption_loss(scrambled, captions)), rel=1e-6)
    # by hand: per caption, summed token loss over its real tokens / number of real tokens; mean over captions
    log_probs = logits - np.log(np.sum(np.exp(logits.astype(np.float64)), -1, keepdims=True))
    expected = np.mean([-np.mean([log_probs[b, t, c] for t, c in enumerate(row) if c != PAD])
                        for b, row in enumerate(captions)])
    assert float(caption_loss(logits, captions)) == pytest.approx(expected, rel=1e-5)


def test_padding_a_batch_further_changes_nothing():
    model = make_model()
    features, captions = batch()
    padded = np.pad(captions, [[0, 0], [0, 4]])
    loss = caption_loss(model(features, captions)[0], captions)
    loss_padded = caption_loss(model(features, padded)[0], padded)
    assert float(loss) == pytest.approx(float(loss_padded), rel=1e-5)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_attention_is_a_distribution_over_frames_that_varies(attention):
    model = make_model(attention)
    for weight in model.attention.weights:  # a random initialisation attends almost uniformly: sharpen it
        weight.assign(ops.convert_to_numpy(weight) * 5.0)
    features, captions = batch()
    weights = ops.convert_to_numpy(model(features, captions)[1])
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(weights >= 0)
    assert weights.std(-1).min() > 1e-4  # not uniform over frames


def test_teacher_forcing_one_feeds_only_the_ground_truth():
    model = make_model()
    features, captions = batch()
    _, _, fed = model(features, captions, teacher_forcing_prob=1.0, seed=backend.seed_tensor(3, 4), training=True)
    expected = np.concatenate([np.full((5, 1), BOS), captions[:, :-1]], 1)
    np.testing.assert_array_equal(ops.convert_to_numpy(fed), expected)


def test_teacher_forcing_zero_feeds_only_predictions():
    model = make_model()
    bias = np.zeros(VOCAB, np.float32)
    bias[list(NEVER_WRITTEN)] = -20.0  # scheduled sampling feeds the plain argmax, greedy the best writable word
    model.output_projection.bias.assign(bias)
    features, captions = batch()
    logits, _, fed = backend.to_numpy(model(features, captions, teacher_forcing_prob=0.0,
                                            seed=backend.seed_tensor(3, 4)))
    predicted = np.argmax(logits, -1)
    np.testing.assert_array_equal(fed[:, 0], BOS)
    np.testing.assert_array_equal(fed[:, 1:], predicted[:, :-1])
    # and without dropout or noise this is exactly greedy decoding, step by step, up to each caption's <EOS>
    words = ops.convert_to_numpy(model.greedy(features, max_len=6)[0])
    assert words.shape == (5, 6)
    for row in range(5):
        stop = np.argmax(words[row] == EOS) + 1 if EOS in words[row] else 6
        np.testing.assert_array_equal(predicted[row, :stop], words[row, :stop])
        np.testing.assert_array_equal(words[row, stop:], PAD)


def test_half_probability_mixes_per_step_and_per_caption():
    model = make_model()
    features, captions = batch(size=64, length=6, seed=5)
    truth = np.concatenate([np.full((64, 1), BOS), captions[:, :-1]], 1)
    logits, _, fed = backend.to_numpy(model(features, captions, teacher_forcing_prob=0.5,
                                            seed=backend.seed_tensor(7, 8), training=True))
    predicted = np.concatenate([np.full((64, 1), -1), np.argmax(logits, -1)[:, :-1]], 1)
    assert np.all((fed == truth) | (fed == predicted))
    decisive = truth[:, 1:] != predicted[:, 1:]  # steps where the two sources differ
    share_truth = np.mean(fed[:, 1:][decisive] == truth[:, 1:][decisive])
    assert 0.4 < share_truth < 0.6
    # different captions take different choices at the same step
    assert len({tuple(row) for row in (fed[:, 1:] == truth[:, 1:])}) > 10


def test_training_randomness_is_fixed_by_the_seed():
    model = make_model()
    features, captions = batch()

    def run(seed, step):
        return ops.convert_to_numpy(model(features, captions, teacher_forcing_prob=0.5,
                                          seed=backend.seed_tensor(seed, step), training=True)[0])

    np.testing.assert_array_equal(run(1, 2), run(1, 2))
    assert not np.allclose(run(1, 2), run(1, 3))
    # inference is deterministic and free of dropout/noise
    np.testing.assert_array_equal(ops.convert_to_numpy(model(features, captions)[0]),
                                  ops.convert_to_numpy(model(features, captions)[0]))


def test_greedy_stops_each_caption_at_eos():
    model = make_model()
    model.output_projection.bias.assign(np.eye(VOCAB, dtype=np.float32)[EOS] * 100.0)
    words, weights = backend.to_numpy(model.greedy(batch()[0]))
    np.testing.assert_array_equal(words[:, 0], EOS)
    np.testing.assert_array_equal(words[:, 1:], PAD)  # nothing written after <EOS>
    np.testing.assert_allclose(weights[:, 0].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(weights[:, 1:], 0.0)


def test_config_refuses_unknown_attention_and_bad_sizes():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(vocab_size=10, attention="dot")
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig(vocab_size=10, hidden=0)


def test_every_weight_is_saved_in_a_weights_file(tmp_path):
    model = make_model()
    model.save_weights(tmp_path / "model.weights.h5")
    with h5py.File(tmp_path / "model.weights.h5") as file:
        saved = []
        file.visititems(lambda name, item: saved.append(name) if isinstance(item, h5py.Dataset) else None)
    assert len(saved) == len(model.weights) == 18
    restored = make_model(seed=1)
    restored.load_weights(tmp_path / "model.weights.h5")
    for original, loaded in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(loaded, original)
