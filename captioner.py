"""Caption videos from Python: load a trained checkpoint once, then caption clips, decoded frames or features.

    from captioner import Captioner
    captioner = Captioner.load("s2vt-demo")      # release name, run folder, checkpoint or URL (None: newest run)
    captioner.caption("clip.mp4").caption        # 'a big red ring moves to the left' (a Caption's text)
    captioner.caption(["a.avi", "b.avi"], beam_size=5, n_best=3)   # [Caption, Caption]: n_best, attention, ...
    captioner.caption_features(features)         # (frames, dim) or (videos, frames, dim)
    captioner.caption("clip.mp4", no_repeat_ngram=0, end_rule=False)   # the model's own words, unconstrained
    captioner.caption_segments("talk.mp4")       # [Cue(start, end, caption, score)]: a long video, scene by scene
    fused = Captioner.load("checkpoints/demo", fuse=[("checkpoints/demo_flow", 0.5)])   # RGB + flow, late fusion
    fused.caption("clip.mp4")                    # each run extracts its own features (RGB frames, optical flow)

Each method returns one kind of result: caption() and caption_features() a Caption per video (one, or a list for
several), caption_segments() cues; a long video reads as steps a server can run apart, scene_reader (reading),
scene_batches (batching) and caption_scenes (cues).

Clips are read and run through the CNN recorded in the checkpoint (its feature manifest), built once per Captioner.
Decoding never writes <UNK>, repeats no bigram (no_repeat_ngram, 2 by default) nor a word right after itself, and
ends no caption on a word that the run's training captions never end on (end_rule; decoding.Constraints).
Late fusion (S2VT's RGB + flow): at every decoding step, greedy or beam search, each word is scored by the weighted
sum of the runs' log-probabilities, the fused runs weighing w each and this one 1 - (sum of the w).
"""
import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from tqdm import tqdm

import decoding
import extract_features
from decoding import NO_REPEAT_NGRAM, Constraints
from model import load_model
from util import backend
from util.errors import DataError
from util.video import NO_LIMITS, ReadingStopped, VideoError, frame_indices
from util.vocab import EOS

__all__ = ["Captioner", "Caption", "Hypothesis", "SampledClip", "VideoError", "DataError"]

CNN_BATCH = 32  # frames per CNN call, as extract_features.py's default
DECODER_CACHE = 4  # compiled decoders kept per Captioner, the least recently used dropped first


@dataclass(frozen=True, eq=False)
class SampledClip:
    """What a run's CNN sees of one clip file (Captioner.read_clip), read apart from captioning it."""
    images: np.ndarray  # (frames, size, size, 3) uint8
    settings: extract_features.FeatureSettings


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
    attention  (len(words), frames) attention weights over the sampled frames, each row summing to 1 (all zero for
               a model that attends to nothing: attention "none", mean-pool)
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

    def __init__(self, model, vocab, run_config, source, batch_size=100, fused=()):
        """fused: ((Captioner, weight), ...), runs whose word log-probabilities join this one's at every step,
        each weighing `weight` (in (0, 1)) and this run the rest; they must share this run's vocabulary."""
        self.model, self.vocab, self.run_config, self.source = model, vocab, run_config, source
        self.batch_size = batch_size
        manifest = run_config.get("features")  # what extract_features.py did to the training clips, if it made them
        self.feature_settings = extract_features.FeatureSettings.from_manifest(manifest) if manifest else None
        self.fused = tuple(fused)
        for member, weight in self.fused:
            if not (isinstance(weight, (int, float)) and 0 < weight < 1):
                raise ValueError(f"a fused run's weight must be a number in (0, 1), not {weight!r}")
            self._check_same_vocabulary(member)
        if self.fused and not sum(weight for _, weight in self.fused) < 1:
            raise ValueError(f"the fused runs' weights must sum to less than 1 (this run weighs the rest), not "
                             f"{sum(weight for _, weight in self.fused)}")
        self._run_cnn = None  # built on first use: a Captioner given only features never builds the CNN
        self._decoders = OrderedDict()  # (beam_size, n_best, constraints) -> compiled decoder, LRU
        self.cannot_end = vocab.ids((run_config.get("decoding") or {}).get("cannot_end", ()))

    @classmethod
    def load(cls, checkpoint=None, matmul_dtype=None, batch_size=100, fuse=()):
        """From a run folder, a checkpoint folder, a release name in checkpoints/releases.json or a release URL
        (downloaded once and checked against its sha256); None: the newest run under checkpoints/.
        fuse: ((checkpoint, weight), ...), runs to fuse with this one (see __init__), e.g. a flow stream's."""
        model, vocab, run_config, source = load_model(checkpoint, matmul_dtype)
        fused = [(cls.load(other, matmul_dtype, batch_size), weight) for other, weight in fuse]
        return cls(model, vocab, run_config, source, batch_size, fused)

    def _check_same_vocabulary(self, member):
        if member.vocab.words != self.vocab.words:
            ours, theirs = self.vocab.words, member.vocab.words
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            word = lambda words: repr(words[first]) if first < len(words) else "nothing"
            raise DataError(f"{member.source}: its vocabulary ({len(theirs)} words) differs from that of "
                            f"{self.source} ({len(ours)} words; word {first} is {word(theirs)} there, {word(ours)} "
                            f"here); fusion adds the runs' log-probabilities word by word, so fuse runs trained on "
                            f"the same captions with the same --min-word-count")

    @property
    def weight(self):
        """This run's weight in the fusion: 1 alone."""
        return 1.0 - sum(weight for _, weight in self.fused)

    @property
    def frames(self):
        return self.model.config.frames

    @property
    def feature_dim(self):
        return self.model.config.feature_dim

    # ---- captions ----

    def caption(self, videos, beam_size=1, length_penalty=0.0, n_best=1, attention=False, errors="raise",
                progress=None, no_repeat_ngram=NO_REPEAT_NGRAM, end_rule=True):
        """Caption one video or several, batched together: a Caption per video (its .caption the text).

        videos: a clip path; a SampledClip (read_clip); decoded RGB frames (frames, H, W, 3) uint8; features
        (frames, dim) float; or a list of those, or a (videos, frames, H, W, 3) / (videos, frames, dim) array.
        A single video gives a single Caption, several a list. attention=True also keeps the sampled frames in
        each Caption (Caption.frames, the attention plot's thumbnails). An unreadable clip raises VideoError
        (errors="raise") or, with errors="return", stands as its VideoError in the results. progress(stage, done,
        total), if given, is called as the work goes on: ("features", frames through the CNN, frames in all), then
        ("decoding", videos captioned, videos). no_repeat_ngram and end_rule constrain decoding
        (decoding.Constraints): no n-gram of that many words twice and no word right after itself (0: off); no
        caption that ends on a word the training captions never end on (a run that records none: off).
        """
        if not (isinstance(beam_size, int) and beam_size >= 1 and isinstance(n_best, int)
                and 1 <= n_best <= beam_size):
            raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, not beam_size={beam_size!r}, "
                             f"n_best={n_best!r}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        single, items = self._as_items(videos)
        if self.fused and any(isinstance(item, np.ndarray) and item.ndim == 2 for item in items):
            raise ValueError("a fused Captioner captions clips or decoded frames, from which each run extracts its "
                             "own features; give features to decode(features, fused_features=[...]), one array "
                             "per run")
        report = progress or (lambda stage, done, total: None)
        features, frames, failures = self._all_features(items, attention, report)
        if failures and errors == "raise":
            raise VideoError("; ".join(str(failures[i]) for i in sorted(failures)))
        good = sorted(i for i in features[0] if i not in failures)
        decoded = self.decode(np.stack([features[0][i] for i in good]), beam_size, length_penalty, n_best, report,
                              [np.stack([f[i] for i in good]) for f in features[1:]], no_repeat_ngram,
                              end_rule) if good else []
        results = [failures.get(i) for i in range(len(items))]
        for i, result in zip(good, decoded):
            results[i] = replace(result, frames=frames.get(i))
        return results[0] if single else results

    def caption_features(self, features, beam_size=1, length_penalty=0.0, n_best=1, attention=False,
                         no_repeat_ngram=NO_REPEAT_NGRAM, end_rule=True):
        """Caption features (frames, dim) of one video or (videos, frames, dim): a Caption per video, as caption()
        returns."""
        features = np.asarray(features)
        if features.ndim not in (2, 3):
            raise ValueError(f"features must be (frames={self.frames}, dim={self.feature_dim}) or (videos, "
                             f"{self.frames}, {self.feature_dim}), not {features.shape}")
        return self.caption(features if features.ndim == 2 else list(features), beam_size, length_penalty, n_best,
                            attention, no_repeat_ngram=no_repeat_ngram, end_rule=end_rule)

    def caption_segments(self, path, segments="auto", min_scene=None, max_scene=None, beam_size=5,
                         length_penalty=0.0, scene_memory_mb=64, max_seconds=None, max_pixels=None, stop=None,
                         progress=None, no_repeat_ngram=NO_REPEAT_NGRAM, end_rule=True):
        """Caption a long video scene by scene: [Cue(start, end, caption, score)] in order, seconds, adjacent
        scenes with the same caption merged (util.subtitles.merge_repeats). The steps, each a method a server can
        run apart: scene_reader (reading), scene_batches (batching), caption_scenes (cues).

        segments, min_scene, max_scene, max_seconds, max_pixels and stop as scene_reader takes them; scenes are
        read in a background thread and captioned in batches of at most scene_memory_mb of sampled frames, so
        memory does not grow with the video. A tqdm bar runs over the video's duration. progress(seconds read,
        seconds in all or None), if given, is called after each batch is captioned."""
        import threading

        from util.data import prefetched
        from util.subtitles import merge_repeats

        ended = threading.Event()  # set when this call ends, so that the reading thread ends too
        reader = self.scene_reader(path, segments, min_scene, max_scene, max_seconds, max_pixels,
                                   stop=lambda: ended.is_set() or (stop is not None and stop()))
        total = round(reader.duration, 1) if reader.duration else None
        scenes = prefetched(iter(reader), depth=2)
        cues = []
        try:
            with tqdm(total=total, desc=f"captioning {Path(path).name}", unit="s", leave=False,
                      bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} s of video [{elapsed}<{remaining}]") as bar:
                for batch in self.scene_batches(reader, _counted(scenes, bar, total), scene_memory_mb):
                    if stop is not None and stop():
                        raise ReadingStopped(f"{path}: captioning stopped")
                    cues += self.caption_scenes(batch, beam_size, length_penalty, no_repeat_ngram, end_rule)
                    bar.set_postfix(scenes=len(cues))
                    if progress is not None:
                        progress(batch[-1].end, total)
        finally:
            ended.set()
            try:  # a reading thread still going stops at its next frame: take what it had queued
                for _ in scenes:
                    pass
            except Exception:  # the reading thread's own error, if any, comes second to this call's
                pass
        return merge_repeats(cues)

    def scene_reader(self, path, segments="auto", min_scene=None, max_scene=None, max_seconds=None, max_pixels=None,
                     stop=None):
        """Reading: the util.scenes.SceneReader of a long video with this run's (and its fused runs') frame size
        and sample, its header checked now. segments: "auto" cuts where the shots change (PySceneDetect's
        AdaptiveDetector), at least min_scene seconds apart, and splits a scene longer than max_scene seconds every
        max_scene seconds; a number cuts fixed windows of that many seconds. A video shorter than one scene gets
        one scene. A file that cannot be read raises VideoError (a DataError), one longer than max_seconds or with
        frames over max_pixels util.video.OverLimit (a VideoError); stop(), if given, is asked at every frame and
        True ends the reading with util.video.ReadingStopped."""
        from util.scenes import MAX_SCENE, MIN_SCENE, SceneReader

        keep, size = self._scene_sample()
        return SceneReader(path, size, keep, segments, MIN_SCENE if min_scene is None else min_scene,
                           MAX_SCENE if max_scene is None else max_scene, max_seconds, max_pixels, stop=stop)

    def scene_batches(self, reader, scenes, scene_memory_mb=64, most=None):
        """Batching: the scenes (read by `reader`, a scene_reader) in lists of at most scene_memory_mb of sampled
        frames, this Captioner's batch_size and `most` scenes, in order; the last list may be shorter."""
        per_scene = reader.keep * reader.size * reader.size * 3
        size = max(1, min(self.batch_size, most or self.batch_size, scene_memory_mb * 2 ** 20 // per_scene))
        batch = []
        for scene in scenes:
            batch.append(scene)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def caption_scenes(self, scenes, beam_size=5, length_penalty=0.0, no_repeat_ngram=NO_REPEAT_NGRAM,
                       end_rule=True):
        """Cues: a Cue(start, end, caption, score) per util.scenes.Scene, each scene's sample captioned as a clip
        of decoded frames, cut to the frames the runs sample from; not merged (util.subtitles.merge_repeats)."""
        from util.subtitles import Cue

        keep, _ = self._scene_sample()
        clips = [scene.frames[frame_indices(len(scene.frames), keep)] for scene in scenes]
        results = self.caption(clips, beam_size, length_penalty, no_repeat_ngram=no_repeat_ngram, end_rule=end_rule)
        return [Cue(scene.start, scene.end, result.caption, result.n_best[0].score if result.n_best else None)
                for scene, result in zip(scenes, results)]

    def _scene_sample(self):
        """(frames, size) a scene keeps for every run to sample from, RGB-stream runs only."""
        runs = [self, *(member for member, _ in self.fused)]
        settings = [run._extractor_settings() for run in runs]
        flow = [run.source for run, s in zip(runs, settings) if s.stream != "rgb"]
        if flow:
            raise DataError(f"{', '.join(map(str, flow))}: reads optical flow; scenes are captioned by RGB-stream "
                            f"runs only (a scene keeps spaced frames, not the pairs of neighbours flow needs)")
        return max(s.frames for s in settings), max(s.image_size for s in settings)

    def decode(self, features, beam_size=1, length_penalty=0.0, n_best=1, report=None, fused_features=(),
               no_repeat_ngram=NO_REPEAT_NGRAM, end_rule=True):
        """Captions for (videos, frames, dim) features, batch by batch, greedy (beam_size 1) or by beam search:
        a Caption per video (without frames), its attention that of this run. A fused Captioner also takes the
        fused runs' features of the same videos, one array per run in fusion order."""
        if len(fused_features) != len(self.fused) or any(len(f) != len(features) for f in fused_features):
            raise ValueError(f"need features of the same {len(features)} videos for each of the {len(self.fused)} "
                             f"fused runs, not {[len(f) for f in fused_features]}")
        report = report or (lambda stage, done, total: None)
        constraints = Constraints(no_repeat_ngram, self.cannot_end if end_rule else ())
        decode = self._decoder(beam_size, n_best, constraints)
        penalty = np.asarray(length_penalty, np.float32)  # an input, not a constant: no compile per value
        results = []
        report("decoding", 0, len(features))
        for start in tqdm(range(0, len(features), self.batch_size), desc="captioning", unit="batch", leave=False,
                          delay=0.5):
            batches = [np.asarray(f[start:start + self.batch_size], np.float32) for f in (features, *fused_features)]
            if beam_size == 1:
                (words, attention), hypotheses = backend.to_numpy(decode(penalty, *batches)), None
            else:
                hypotheses, scores, log_probs, attention = backend.to_numpy(decode(penalty, *batches))
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

    def _decoder(self, beam_size, n_best, constraints):
        """The compiled decoding function (length_penalty, *every run's features) for these settings, made once per
        Captioner."""
        key = (beam_size, n_best, constraints)
        if key in self._decoders:
            self._decoders.move_to_end(key)
        else:
            models = [self.model, *(member.model for member, _ in self.fused)]
            weights = [self.weight, *(weight for _, weight in self.fused)]
            max_len = self.model.config.max_caption_len

            def decode(length_penalty, *features):
                members = list(zip(models, features, weights))
                if beam_size == 1:
                    return decoding.greedy(members, max_len, constraints)
                return decoding.beam_search(members, beam_size, length_penalty, max_len, n_best, constraints)

            self._decoders[key] = backend.compile_function(models, decode)
            if len(self._decoders) > DECODER_CACHE:  # each beam size, n-best and constraints compiles anew
                self._decoders.popitem(last=False)
        return self._decoders[key]

    # ---- features ----

    def read_clip(self, path, limits=NO_LIMITS, stop=None):
        """What this run's CNN sees of a clip file, decoded now under util.video.ClipLimits `limits` (OverLimit, a
        VideoError, past them) and stop() (extract_features.read_clip): a SampledClip for caption()."""
        settings = self._extractor_settings()
        return SampledClip(extract_features.read_clip(path, settings, limits, stop), settings)

    def _as_items(self, videos):
        """(single?, [item, ...]) where each item is a path, a SampledClip, a frames array or a features array."""
        if isinstance(videos, (str, os.PathLike, SampledClip)):
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
            if not isinstance(item, (str, os.PathLike, SampledClip, np.ndarray)):
                raise TypeError(f"a video is a path or a numpy array, not {type(item).__name__}")
        return False, videos

    def _all_features(self, items, keep_frames, report):
        """_features of this run, then of each fused run: ([{index: features}, one per run], this run's frames,
        every run's failures), the progress reported over all the runs' frames."""
        runs = [self, *(member for member, _ in self.fused)]
        through_cnn = sum(not (isinstance(item, np.ndarray) and item.ndim == 2) for item in items)
        features, frames, failures = [], None, {}
        progress = {"before": 0, "done": 0}  # frames through the earlier runs' CNNs, and this run's
        for k, run in enumerate(runs):
            later = through_cnn * sum(r.frames for r in runs[k + 1:])

            def run_report(stage, done, total, later=later):
                progress["done"] = done
                report(stage, progress["before"] + done, progress["before"] + total + later)

            run_features, run_frames, run_failures = run._features(items, keep_frames and k == 0, run_report)
            features.append(run_features)
            frames = frames if k else run_frames
            failures.update(run_failures)
            progress["before"], progress["done"] = progress["before"] + progress["done"], 0
        return features, frames, failures

    def _features(self, items, keep_frames, report):
        """({index: (frames, dim) float32}, {index: sampled frames} if keep_frames, {index: VideoError})."""
        features, frames, failures, clips, paths = {}, {}, {}, {}, {}
        for i, item in enumerate(items):
            if isinstance(item, SampledClip):
                clips[i] = self._check_sampled(item)
            elif not isinstance(item, np.ndarray):
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
        decoded = extract_features.decoded_clips(list(paths.values()), settings)
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

    def _check_sampled(self, clip):
        if clip.settings != self._extractor_settings():
            raise ValueError(f"a SampledClip read for another feature extractor ({clip.settings}) than this run's "
                             f"({self.feature_settings}); pass the clip's path instead")
        return clip.images

    def _extractor_settings(self):
        if self.feature_settings is None:
            raise DataError(f"{self.source}: the checkpoint records no feature extractor (its features were not "
                            "made by extract_features.py), so it can caption features only, not videos")
        return self.feature_settings

    def _sample(self, frames_rgb):
        """Decoded RGB frames (frames, H, W, 3) uint8 -> what the CNN takes (the sampled frames, or their flow
        images), as for a clip file."""
        if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3 or frames_rgb.dtype != np.uint8 or not len(frames_rgb):
            raise ValueError(f"decoded frames must be (frames, H, W, 3) uint8 RGB with at least one frame, not "
                             f"{frames_rgb.shape} {frames_rgb.dtype}")
        return extract_features.sample_decoded(frames_rgb, self._extractor_settings())

    def _cnn(self, frames_rgb):
        if self._run_cnn is None:
            try:
                self._run_cnn, _ = extract_features.build_extractor(self._extractor_settings())
            except DataError as error:  # the checkpoint's feature manifest names a CNN that cannot be built again
                raise DataError(f"{self.source}: {error}") from None
        return self._run_cnn(frames_rgb)


def _counted(scenes, bar, total):
    """The scenes, the tqdm bar moved to each one's end as it is read."""
    for scene in scenes:
        bar.update(min(scene.end, total or scene.end) - bar.n)
        yield scene
