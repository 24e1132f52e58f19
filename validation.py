"""Validation while training: the metric that picks the best checkpoint (select_metric), and each epoch's scores on
the validation videos (Validator)."""
import sys

import numpy as np
from keras import ops

from decoding import NO_REPEAT_NGRAM, Constraints
from model import caption_losses
from util import backend
from util.data import batches, encode_captions
from util.evaluate import evaluate
from util.plots import VALIDATION_METRICS

SELECT_METRICS = ("bleu1", "bleu4", "cider", "loss")
# fewer validation videos than this: a metric of their greedy captions jumps from epoch to epoch, and the
# teacher-forced loss over all their captions chooses better (docs/captions.md)
MIN_VALIDATION_VIDEOS = 50


def select_metric(asked, objective, validation_videos):
    """The validation metric that picks the best checkpoint: the one asked for, else CIDEr for scst, the
    teacher-forced loss when there are fewer than MIN_VALIDATION_VIDEOS validation videos, else the MLDS BLEU@1."""
    return asked or ("cider" if objective == "scst" else "loss" if validation_videos < MIN_VALIDATION_VIDEOS
                     else "bleu1")


def say_if_too_few(asked, chosen, validation_videos):
    """One line when there are too few validation videos to choose a checkpoint by a caption metric: a warning (on
    stderr) when one was asked for, else (on stdout) that the loss chooses."""
    if 0 < validation_videos < MIN_VALIDATION_VIDEOS and chosen != "loss":
        print(f"warning: {validation_videos} validation videos are too few to choose a checkpoint by "
              f"{VALIDATION_METRICS['val_' + chosen]} (it jumps from epoch to epoch below {MIN_VALIDATION_VIDEOS}); "
              "--select-metric loss chooses by the teacher-forced loss over all their captions", file=sys.stderr)
    elif 0 < validation_videos < MIN_VALIDATION_VIDEOS and not asked:
        print(f"validation: {validation_videos} videos are too few to choose a checkpoint by a caption metric "
              f"(fewer than {MIN_VALIDATION_VIDEOS}): choosing by the validation loss")


class Validator:
    """Scores the model on the validation videos: teacher-forced loss and greedy captions (MLDS BLEU@1, BLEU-4,
    CIDEr with the fallback tokenizer: no Java start-up every epoch)."""

    def __init__(self, model, vocab, split, max_caption_len, batch_size, padding, cannot_end, learn_unk):
        self.vocab, self.split, self.batch_size, self.padding = vocab, split, batch_size, padding
        self.videos, self.captions = encode_captions(split.labels, vocab, max_caption_len)
        self.summed_losses = backend.compile_function(
            model, lambda f, c: ops.sum(caption_losses(model(f, c)[0], c, learn_unk)))
        constraints = Constraints(NO_REPEAT_NGRAM, vocab.ids(cannot_end))  # as infer.py decodes by default
        self.greedy = backend.compile_function(model, lambda f: model.greedy(f, constraints=constraints)[0])

    def __call__(self):
        rows, width_multiple = self.padding
        total = sum(float(self.summed_losses(*batch)) for (batch,) in batches(
            self.split.features, self.videos, self.captions, self.batch_size, rows=rows, width_multiple=width_multiple))
        captions = {}
        for start in range(0, len(self.split.video_ids), self.batch_size):
            batch = np.asarray(self.split.features[start:start + self.batch_size], np.float32)
            words = backend.to_numpy(self.greedy(batch))
            for video_id, ids in zip(self.split.video_ids[start:start + self.batch_size], words):
                captions[video_id] = self.vocab.decode(ids)
        scores = evaluate(captions, self.split.references, use_java=False)
        first = self.split.video_ids[0]
        return {"val_loss": total / len(self.captions), "val_bleu1": scores["mlds_bleu1"], "val_bleu4": scores["bleu4"],
                "val_cider": scores["cider"], "example": f"{first}: {captions[first]}"}
