"""Caption videos from Python: load a trained checkpoint once, then caption clips, decoded frames or features.

    from captioner import Captioner
    captioner = Captioner.load("s2vt-demo")      # release name, run folder, checkpoint or URL (None: newest run)
    captioner.caption("clip.mp4")                # 'a big red ring moves to the left'
    captioner.caption(["a.avi", "b.avi"], beam_size=5, n_best=3, attention=True)   # [Caption, Caption]
    captioner.caption_features(features)         # (frames, dim) or (videos, frames, dim)

Clips are read and run through the CNN recorded in the checkpoint (its feature manifest), built once per Captioner.
"""
import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
from tqdm import tqdm

import extract_features
from extract_features import VideoError
from util import backend
from util.data import DataError
from util.vocab import EOS

__all__ = ["Captioner", "Caption", "Hypothesis", "VideoError", "DataError"]

CNN_BATCH = 32  # frames per CNN call, as extract_features.py's default


@dataclass(frozen=True)
class Hypothesis:
    """One of beam search's best captions: score = log_prob / length**length_penalty, the beam's ranking."""
    caption: str
    score: float
    log_prob: float


@dataclass(frozen=True, eq=False)
class Caption:
    """One video's decoding.

    caption    the best caption
    n_best     beam search's best hypotheses, best first (empty for greedy decoding, which scores nothing)
    words      the attention rows' labels: the caption's words, then <EOS> if the caption ended
    attention  (len(words), frames) attention weights over the sampled frames, each row summing to 1
    frames     (frames, size, size, 3) uint8 RGB, the sampled frames the CNN saw: kept with attention=True for
               thumbnails (None otherwise, and for features given directly)
    """
    caption: str
    n_best: Tuple[Hypothesis, ...]
    words: Tuple[str, ...]
    attention: np.ndarray
    frames: Optional[np.ndarray] = None

    def to_dict(self, decimals=4):
        """A JSON-ready dict: caption, n_best [{caption, score, log_prob}], attention {words, weights}."""
        return {"caption": self.caption,
                "n_best": [{"caption": h.caption, "score": round(h.score, decimals),
                            "log_prob": round(h.log_prob, decimals)} for h in self.n_best],
                "attention": {"words": list(self.words),
                              "weights": np.round(self.attention.astype(float), decimals).tolist()}}

    def plot_attention(self, out_png, title=None):
        """A PNG heatmap of the attention, with thumbnails of the frames on top when they are known."""
        from util.plots import plot_attention

        return plot_attention(list(self.words), self.attention, out_png, frames_rgb=self.frames,
                              title=self.caption if title is None else title)


class Captioner:
    """A trained model, its vocabulary and its feature extractor, ready to caption."""

    def __init__(self, model, vocab, run_config, source, batch_size=100):
        self.model, self.vocab, self.run_config, self.source = model, vocab, run_config, source
        self.batch_size = batch_size
        manifest = run_config.get("features")  # what extract_features.py did to the training clips, if it made them
        self.feature_settings = extract_features.FeatureSettings.from_manifest(manifest) if manifest else None
        self._run_cnn = None  # built on first use: a Captioner given only features never builds the CNN
        self._decoders = {}

    @classmethod
    def load(cls, checkpoint=None, matmul_dtype=None, batch_size=100):
        """From a run folder, a checkpoint folder, a release name in checkpoints/releases.json or a release URL
        (downloaded once and checked against its sha256); None: the newest run under checkpoints/."""
        from util.checkpoints import load_model
        from util.release import checkpoint_location

        model, vocab, run_config, source = load_model(checkpoint_location(checkpoint), matmul_dtype)
        return cls(model, vocab, run_config, source, batch_size)

    @property
    def frames(self):
        return self.model.config.frames

    @property
    def feature_dim(self):
        return self.model.config.feature_dim

    # ---- captions ----

    def caption(self, videos, beam_size=1, length_penalty=0.0, n_best=1, attention=False, errors="raise",
                progress=None):
        """Caption one video or several, batched together.

        videos: a clip path; decoded RGB frames (frames, H, W, 3) uint8; features (frames, dim) float; or a list
        of those, or a (videos, frames, H, W, 3) / (videos, frames, dim) array.
        Returns a string per video, or a Caption when n_best > 1 or attention=True ask for more; a single
        video gives a single result. An unreadable clip raises VideoError (errors="raise") or, with
        errors="return", stands as its VideoError in the results. progress(stage, done, total), if given, is
        called as the work goes on: ("features", frames through the CNN, frames in all), then ("decoding", videos
        captioned, videos).
        """
        if not (isinstance(beam_size, int) and beam_size >= 1 and isinstance(n_best, int)
                and 1 <= n_best <= beam_size):
            raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, not beam_size={beam_size!r}, "
                             f"n_best={n_best!r}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        single, items = self._as_items(videos)
        report = progress or (lambda stage, done, total: None)
        features, frames, failures = self._features(items, attention, report)
        if failures and errors == "raise":
            raise VideoError("; ".join(str(failures[i]) for i in sorted(failures)))
        good = sorted(features)
        decoded = self.decode(np.stack([features[i] for i in good]), beam_size, length_penalty, n_best,
                              report) if good else []
        results = [failures.get(i) for i in range(len(items))]
        for i, result in zip(good, decoded):
            results[i] = replace(result, frames=frames.get(i)) if attention or n_best > 1 else result.caption
        return results[0] if single else results

    def caption_features(self, features, beam_size=1, length_penalty=0.0, n_best=1, attention=False):
        """Caption features (frames, dim) of one video or (videos, frames, dim): a string or Caption per video,
        as caption() returns."""
        features = np.asarray(features)
        if features.ndim not in (2, 3):
            raise ValueError(f"features must be (frames={self.frames}, dim={self.feature_dim}) or (videos, "
                             f"{self.frames}, {self.feature_dim}), not {features.shape}")
        return self.caption(features if features.ndim == 2 else list(features), beam_size, length_penalty, n_best,
                            attention)

    def decode(self, features, beam_size=1, length_penalty=0.0, n_best=1, report=None):
        """Captions for (videos, frames, dim) features, batch by batch, greedy (beam_size 1) or by beam search:
        a Caption per video (without frames)."""
        report = report or (lambda stage, done, total: None)
        decode = self._decoder(beam_size, length_penalty, n_best)
        results = []
        report("decoding", 0, len(features))
        for start in tqdm(range(0, len(features), self.batch_size), desc="captioning", unit="batch", leave=False,
                          delay=0.5):
            batch = np.asarray(features[start:start + self.batch_size], np.float32)
            if beam_size == 1:
                (words, attention), hypotheses = backend.to_numpy(decode(batch)), None
            else:
                hypotheses, scores, log_probs, attention = backend.to_numpy(decode(batch))
                words = hypotheses[:, 0]  # (batch, steps): the best hypothesis
            for row, (ids, weights) in enumerate(zip(words, attention)):
                caption = self.vocab.decode(ids)
                labels = caption.split() + (["<EOS>"] if EOS in ids else [])
                n_best_list = () if hypotheses is None else tuple(
                    Hypothesis(self.vocab.decode(h), float(sc), float(lp))
                    for h, sc, lp in zip(hypotheses[row], scores[row], log_probs[row]))
                results.append(Caption(caption, n_best_list, tuple(labels), weights[:len(labels)]))
            report("decoding", len(results), len(features))
        return results

    def _decoder(self, beam_size, length_penalty, n_best):
        """The compiled decoding function for these settings, made once per Captioner."""
        key = (beam_size, length_penalty, n_best)
        if key not in self._decoders:
            model = self.model
            self._decoders[key] = backend.compile_function(model, model.greedy if beam_size == 1 else (
                lambda f: model.beam_search(f, beam_size, length_penalty, n_best=n_best)))
        return self._decoders[key]

    # ---- features ----

    def _as_items(self, videos):
        """(single?, [item, ...]) where each item is a path, a frames array or a features array."""
        if isinstance(videos, (str, os.PathLike)):
            return True, [videos]
        if isinstance(videos, np.ndarray):
            if videos.ndim in (2, 4):
                return True, [videos]
            if videos.ndim in (3, 5):
                return False, list(videos)
            raise ValueError(f"an array of videos must be frames (frames, H, W, 3) or features (frames, dim), with "
                             f"an optional leading videos axis, not {videos.shape}")
        videos = list(videos)
        for item in videos:
            if not isinstance(item, (str, os.PathLike, np.ndarray)):
                raise TypeError(f"a video is a path or a numpy array, not {type(item).__name__}")
        return False, videos

    def _features(self, items, keep_frames, report):
        """({index: (frames, dim) float32}, {index: sampled frames} if keep_frames, {index: VideoError})."""
        features, frames, failures, clips, paths = {}, {}, {}, {}, {}
        for i, item in enumerate(items):
            if not isinstance(item, np.ndarray):
                paths[i] = Path(item)
            elif item.ndim == 2:
                features[i] = self._check_features(item)
            else:
                clips[i] = self._sample(item)
        if not (clips or paths):
            return features, frames, failures
        settings = self._extractor_settings()
        total, done = (len(clips) + len(paths)) * settings.frames, 0
        report("features", done, total)
        # clip files are decoded in a background thread while the CNN works on those already read
        decoded = extract_features.decoded_clips(list(paths.values()), settings.frames, settings.image_size)
        for i, clip in itertools.chain(clips.items(), ((i, clip) for i, (_, clip) in zip(paths, decoded))):
            if isinstance(clip, VideoError):
                failures[i] = clip
                total -= settings.frames
                report("features", done, total)
                continue
            outputs = []
            for start in range(0, len(clip), CNN_BATCH):
                outputs.append(self._cnn(clip[start:start + CNN_BATCH]))
                done += len(outputs[-1])
                report("features", done, total)
            # rounded through the dtype of the features the model was trained on
            features[i] = np.concatenate(outputs).astype(settings.dtype).astype(np.float32)
            if keep_frames:
                frames[i] = clip
        return features, frames, failures

    def _check_features(self, array):
        if array.shape != (self.frames, self.feature_dim) or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"features must be (frames={self.frames}, dim={self.feature_dim}) numbers, not "
                             f"{array.shape} {array.dtype}")
        return array.astype(np.float32)

    def _extractor_settings(self):
        if self.feature_settings is None:
            raise DataError(f"{self.source}: the checkpoint records no feature extractor (its features were not "
                            "made by extract_features.py), so it can caption features only, not videos")
        return self.feature_settings

    def _sample(self, frames_rgb):
        """Decoded RGB frames (frames, H, W, 3) uint8 -> the sampled frames the CNN takes, as for a clip file."""
        if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3 or frames_rgb.dtype != np.uint8 or not len(frames_rgb):
            raise ValueError(f"decoded frames must be (frames, H, W, 3) uint8 RGB with at least one frame, not "
                             f"{frames_rgb.shape} {frames_rgb.dtype}")
        settings = self._extractor_settings()
        picked = extract_features.frame_indices(len(frames_rgb), settings.frames)
        size = (settings.image_size, settings.image_size)
        return np.stack([cv2.resize(frames_rgb[i], size, interpolation=cv2.INTER_AREA) for i in picked])

    def _cnn(self, frames_rgb):
        if self._run_cnn is None:
            try:
                self._run_cnn, _ = extract_features.build_extractor(self._extractor_settings())
            except DataError as error:  # the checkpoint's feature manifest names a CNN that cannot be built again
                raise DataError(f"{self.source}: {error}") from None
        return self._run_cnn(frames_rgb)
