"""Self-critical sequence training (Rennie et al., 2017), train.py --objective scst: each epoch reads every training
video once, samples captions for it, and rewards each by its CIDEr-D against the video's training captions
(util/cider.py) minus a baseline, the mean reward of the video's other samples or its greedy caption's."""
import numpy as np
from keras import ops

from decoding import greedy_word, sample_word
from util import backend
from util.cider import CiderD

SCST_BASELINES = ("mean", "greedy")


def scst_rewards(video_index, caption_ids):
    """CIDEr-D against each video's training captions (rows of caption_ids, grouped by video_index), their n-grams
    counted once."""
    return CiderD(np.split(caption_ids, np.flatnonzero(np.diff(video_index)) + 1))


def scst_rows(video_index, caption_ids):
    """The rows scst_loss reads: each caption after its video's number + 1 (0 marks a padding row)."""
    return np.concatenate([video_index[:, None] + 1, caption_ids], 1)


def mean_of_others(rewards):
    """Each sample's baseline: the mean reward of its video's other samples, rewards (videos, samples)."""
    samples = ops.shape(rewards)[1]
    return (ops.sum(rewards, 1, keepdims=True) - rewards) / (samples - 1)


def scst_loss(rewards, samples, baseline, xe_weight=0.0, draw=sample_word, xe_loss=None):
    """The self-critical loss on one replica's videos, as train.replica_loss: rows (batch, 1 + length) hold each
    video's number + 1 (0: a padding row), then one of its captions (scst_rows). For each video, `samples` captions
    are drawn, each word picked by draw(seed) (decoding.sample_word), and rewarded by rewards(words, videos)
    (scst_rewards); the loss is -(reward - baseline) * the sampled words' summed log-probability (<EOS> included,
    nothing after it), averaged over the samples, summed, divided by the global batch. Equal rewards give zero
    advantage: no gradient. xe_weight > 0 adds that times xe_loss (train.replica_loss) on the captions (a mixed
    objective)."""
    def score(words, videos):
        real = videos >= 0
        scores = np.zeros(len(videos))
        if real.any():  # a replica's part may be padding only
            scores[real] = rewards(words[real], videos[real])
        return scores

    def loss(model, frame_features, rows, teacher_forcing_prob, seed, global_batch):
        videos = ops.cast(rows[:, 0], "int32") - 1
        words, log_probs = model.sample(frame_features, samples, draw(seed))
        sampled = ops.reshape(backend.host_scores(score, words, ops.repeat(videos, samples)), (-1, samples))
        if baseline == "mean":  # Luo, 2020
            base = mean_of_others(sampled)
        else:
            greedy, _ = model.sample(frame_features, 1, greedy_word)
            base = backend.host_scores(score, greedy, videos)[:, None]
        advantage = ops.stop_gradient(sampled - base) * ops.cast(videos >= 0, "float32")[:, None]
        caption_log_probs = ops.reshape(ops.sum(log_probs, 1), (-1, samples))
        scst = -ops.sum(advantage * caption_log_probs) / (samples * ops.cast(global_batch, "float32"))
        if not xe_weight:
            return scst
        return scst + xe_weight * xe_loss(model, frame_features, rows[:, 1:], teacher_forcing_prob, seed,
                                          global_batch)

    return loss
