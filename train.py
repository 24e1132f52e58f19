"""Train S2VT on data in the MLDS HW2-1 layout.

    python train.py --data-dir PATH [--attention bahdanau] [--epochs 100] [--batch-size 250] [--val-fraction 0.05]
                    [--select-metric bleu1] [--patience N] [--strategy auto] [--resume]
                    [--model s2vt|meanpool] [--encoder unidirectional|bidirectional] [--init-from RUN]

Reads PATH/training_label.json with PATH/training_data/feat/<id>.npy and validates every epoch on videos held out
of them: --val-ids FILE names them, else PATH/validation_label.json with PATH/validation_data/feat is the
validation split when the folder has one, else --val-fraction of the training videos are drawn with --seed. The
test split is never read here: score it once, after training, with infer.py. Writes checkpoints/<run>/ (see
util/checkpoints.py): the last 3 checkpoints, the best by the validation metric, config.json, vocab.json,
val_ids.txt, history.csv, curves.png and, on TensorFlow, TensorBoard logs.
Ctrl-C saves a checkpoint after the current batch (a second Ctrl-C quits at once); --resume continues from it exactly.
--model meanpool trains the mean-pool baseline instead of S2VT, --encoder bidirectional reads S2VT's frames both ways
(model.py). --init-from RUN starts from another run's weights, e.g. one pre-trained on image captions (images as
one-frame videos): the words both vocabularies hold keep their embedding and output weights, the feature
standardisation is computed afresh from this data, and the frame count may differ (no weight depends on it).
Runs on TensorFlow (the default) or JAX: KERAS_BACKEND=jax python train.py ... With --strategy mirrored (several
GPUs) each global batch is split over the devices with the same result as one device; on TensorFlow, multiworker
spreads it over machines named in TF_CONFIG, and the chief alone validates and writes the run folder.
"""
import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pandas as pd
from keras import ops
from tqdm import tqdm

from extract_features import manifest_differences
from model import ATTENTIONS, ENCODERS, MATMUL_DTYPES, MODELS, ModelConfig, build_model, caption_losses
from sampling import SCHEDULES, teacher_forcing_schedule
from util import backend
from util.atomic import atomic_path, write_text_atomic
from util.checkpoints import (DEFAULT_ROOT, latest_checkpoint, load_model, load_vocab, newest_run, read_run_config,
                              restore, save_checkpoint, write_run_files)
from util.data import (Split, batches, encode_captions, epoch_pairs, hold_out_videos, load_labels, open_feature_file,
                       read_feature_manifest, read_ids, split_off_ids, warnings_as_lines)
from util.errors import DataError
from util.evaluate import evaluate
from util.plots import VALIDATION_METRICS, plot_training_curves
from util.vocab import Vocabulary

SELECT_METRICS = ("bleu1", "bleu4", "cider")
DEFAULT_VAL_FRACTION = 0.05


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


# the flags that change what is trained: --resume refuses to go on with any of them changed
TRAINING_FLAGS = ("hidden", "frames", "attention", "max_caption_len", "min_word_count", "batch_size", "seed", "pairs",
                  "epochs", "schedule", "teacher_forcing_start", "teacher_forcing_end", "learning_rate", "clip_norm",
                  "dropout", "feature_noise", "val_fraction", "val_ids", "select_metric", "matmul_dtype", "model",
                  "encoder", "init_from")
# flags added since the first runs: a run saved without one was trained as its value here says
LATER_FLAG_DEFAULTS = {"model": "s2vt", "encoder": "unidirectional"}
# the model settings another run must share for --init-from: the vocabulary is mapped, the frame count free
SHARED_SETTINGS = ("model", "encoder", "feature_dim", "hidden", "attention")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder in the MLDS HW2-1 layout")
    parser.add_argument("--model", choices=MODELS, default="s2vt",
                        help="s2vt, or meanpool: the frame features' mean feeds an LSTM decoder (model.MeanPool)")
    parser.add_argument("--encoder", choices=ENCODERS, default="unidirectional",
                        help="bidirectional: S2VT reads the frames backwards too (model.py)")
    parser.add_argument("--attention", choices=ATTENTIONS,
                        help="default bahdanau for s2vt; meanpool attends to nothing (none)")
    parser.add_argument("--init-from", metavar="RUN",
                        help="start from this run's (or checkpoint's) weights, the shared words' included")
    parser.add_argument("--schedule", choices=SCHEDULES, default="inverse_sigmoid",
                        help="teacher-forcing probability per epoch (see sampling.py)")
    parser.add_argument("--teacher-forcing-start", type=float, default=1.0, help="linear/constant schedules")
    parser.add_argument("--teacher-forcing-end", type=float, default=0.0, help="linear schedule")
    parser.add_argument("--epochs", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=250, help="the global batch (all replicas)")
    parser.add_argument("--hidden", type=positive_int, default=600, help="LSTM size, also the frame/word embeddings")
    parser.add_argument("--frames", type=positive_int, default=80)
    parser.add_argument("--max-caption-len", type=positive_int, default=50, help="tokens, <EOS> included")
    parser.add_argument("--min-word-count", type=positive_int, default=3)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--feature-noise", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--clip-norm", type=float, default=5.0, help="global gradient-norm clip")
    parser.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default="float32",
                        help="precision of the large matmuls: bfloat16 is about 1.6x faster on CPUs with AVX512-BF16 "
                             "(weights, gates and cell states stay float32)")
    parser.add_argument("--pairs", choices=("all", "sample"), default="all",
                        help="an epoch is every (video, caption) pair, or one random caption per video")
    parser.add_argument("--val-fraction", type=float,
                        help=f"share of the training videos held out for validation, drawn with --seed (default "
                             f"{DEFAULT_VAL_FRACTION}, unless the data folder has its own validation_label.json)")
    parser.add_argument("--val-ids", help="validate on these training videos (one id per line) instead")
    parser.add_argument("--select-metric", choices=SELECT_METRICS, default="bleu1",
                        help="validation metric that picks the best checkpoint (bleu1 = the MLDS course BLEU@1)")
    parser.add_argument("--patience", type=int, default=0,
                        help="stop when --select-metric has not improved for this many epochs (0: never)")
    parser.add_argument("--log-every", type=positive_int, default=10,
                        help="show the loss every N batches (reading it waits for the device)")
    parser.add_argument("--features", choices=("memory", "files"),
                        help="memory: every video's features in memory (float16); files: read from their .npy files a "
                             "batch at a time, so memory does not grow with the data set (default: memory when the "
                             "training features take at most a quarter of this machine's memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", choices=backend.STRATEGIES, default="auto",
                        help="auto: mirrored when more than one GPU is visible, else default (one device); "
                             "mirrored: every local GPU (or logical CPU); multiworker: the cluster in TF_CONFIG")
    parser.add_argument("--run", help="run name (default: a timestamp); checkpoints go to checkpoints/<run>")
    parser.add_argument("--ckpt-dir", help="run folder (default checkpoints/<run>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --ckpt-dir (default: newest)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    if args.val_fraction is not None and args.val_ids:
        parser.error("give --val-fraction or --val-ids, not both")
    if args.patience < 0:
        parser.error("--patience must be 0 (off) or positive")
    if args.model == "meanpool" and args.attention not in (None, "none"):
        parser.error(f"--attention {args.attention}: the meanpool model has no frame encoder to attend to")
    if args.model == "meanpool" and args.encoder != "unidirectional":
        parser.error(f"--encoder {args.encoder}: the meanpool model has no frame encoder")
    args.attention = args.attention or ("bahdanau" if args.model == "s2vt" else "none")
    if args.resume and not args.ckpt_dir:
        args.ckpt_dir = str(DEFAULT_ROOT / args.run) if args.run else str(newest_run())
    args.ckpt_dir = args.ckpt_dir or str(DEFAULT_ROOT / (args.run or time.strftime("%Y%m%d-%H%M%S")))
    return args


def check_resumable(run_dir, args, validation_ids):
    """Refuse, before anything is written, to resume a run with other training flags or validation videos."""
    saved = read_run_config(run_dir).get("train", {})
    saved = dict(LATER_FLAG_DEFAULTS, **saved)
    changed = [f"--{flag.replace('_', '-')}: {saved.get(flag)} saved, {getattr(args, flag)} asked"
               for flag in TRAINING_FLAGS if saved.get(flag) != getattr(args, flag)]
    saved_ids = (run_dir / "val_ids.txt").read_text().split() if (run_dir / "val_ids.txt").is_file() else None
    if saved_ids is not None and saved_ids != validation_ids:
        changed.append(f"validation videos: {len(saved_ids)} in {run_dir / 'val_ids.txt'}, {len(validation_ids)} "
                       f"others now")
    if changed:
        raise DataError(f"{run_dir}: cannot resume with changed training settings ({'; '.join(changed)})")


def load_splits(args):
    """(training, validation or None, description of the validation split), as util.data.Split objects."""
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    labels = load_labels(data_dir / "training_label.json")
    feat_dir = data_dir / "training_data" / "feat"
    own_split = data_dir / "validation_label.json"
    if args.val_ids:
        with warnings_as_lines():
            training, validation = split_off_ids(labels, read_ids(args.val_ids), args.val_ids)
        val_feat_dir, source = feat_dir, f"the training videos listed in {args.val_ids}"
    elif own_split.is_file() and args.val_fraction is None:
        training, validation = labels, load_labels(own_split)
        overlap = {video_id for video_id, _ in validation} & {video_id for video_id, _ in training}
        if overlap:
            raise DataError(f"{own_split}: {len(overlap)} videos are in the training labels too, e.g. "
                            f"{sorted(overlap)[0]}; a video is never in both splits")
        val_feat_dir, source = data_dir / "validation_data" / "feat", str(own_split)
    else:
        fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        training, validation = hold_out_videos(labels, fraction, args.seed)
        val_feat_dir, source = feat_dir, f"{fraction:g} of the training videos, drawn with seed {args.seed}"
    if not training:
        raise DataError(f"{data_dir / 'training_label.json'}: no training videos left after holding out "
                        f"{len(validation)} for validation")
    in_memory = features_fit_in_memory(feat_dir, training, args.frames) if args.features is None \
        else args.features == "memory"
    train_split = Split(training, feat_dir, frames=args.frames, in_memory=in_memory)
    val_split = (Split(validation, val_feat_dir, frames=args.frames, feature_dim=train_split.features.shape[2],
                       in_memory=in_memory) if validation else None)
    return train_split, val_split, source


def features_fit_in_memory(feat_dir, labels, frames, share=0.25):
    """Whether the videos' features, as float16, take at most `share` of this machine's memory (judged from the
    first video's file)."""
    first = open_feature_file(Path(feat_dir) / f"{labels[0][0]}.npy", frames, mmap=True)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(labels) * first.size * 2 <= share * total


@contextmanager
def ctrl_c_stops_between_batches():
    """Yield an Event that Ctrl-C sets, for the loop to stop and save between batches rather than take a
    KeyboardInterrupt inside TensorFlow or XLA, which can corrupt their memory (an abort, "free(): invalid next
    size"). A second Ctrl-C raises KeyboardInterrupt at once."""
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def run_epoch(train_step, epoch_batches, teacher_forcing_prob, seed, first_step, stop, log_every, bar):
    """Train on epoch_batches until they run out or stop() says so; returns the step losses, still on the device.

    A loss is read back (which waits for the device) only for the progress bar, every log_every batches, so the
    host queues the next steps while the device works."""
    losses = []
    for slices in epoch_batches:
        if stop():
            break
        losses.append(train_step(slices, teacher_forcing_prob, backend.seed_tensor(seed, first_step + len(losses))))
        if (len(losses) - 1) % log_every == 0:
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}", teacher_forcing=f"{teacher_forcing_prob:.3f}")
        bar.update(1)
    return losses


class Validator:
    """Scores the model on the validation videos: teacher-forced loss and greedy captions (MLDS BLEU@1, BLEU-4,
    CIDEr with the fallback tokenizer: no Java start-up every epoch)."""

    def __init__(self, model, vocab, split, max_caption_len, batch_size, padding):
        self.vocab, self.split, self.batch_size, self.padding = vocab, split, batch_size, padding
        self.videos, self.captions = encode_captions(split.labels, vocab, max_caption_len)
        self.summed_losses = backend.compile_function(
            model, lambda f, c: ops.sum(caption_losses(model(f, c)[0], c)))
        self.greedy = backend.compile_function(model, lambda f: model.greedy(f)[0])

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


def initialise_from(model, vocab, source, manifest):
    """Set model's weights from another run's (source: a run or checkpoint folder, as infer.py takes) for --init-from,
    the feature standardisation excepted (model's own, from this data). Word-indexed weights are carried over word by
    word: the rows of the word embedding and the output projection's columns and biases for the words both
    vocabularies hold; this run's other words keep their fresh initial values. No weight depends on the frame count,
    so a run on one-frame "videos" (images) can start one on videos. Returns (the source checkpoint, the count of
    words carried over)."""
    source_model, source_vocab, source_config, checkpoint = load_model(source)
    differing = [f"{name} {getattr(source_model.config, name)} there, {getattr(model.config, name)} here"
                 for name in SHARED_SETTINGS if getattr(source_model.config, name) != getattr(model.config, name)]
    source_features = source_config.get("features")
    if source_features and manifest:  # the same feature extractor, whatever the frames sampled
        differing += [f"features' {key} {there!r} there, {here!r} here"
                      for key, (there, here) in manifest_differences(source_features, manifest).items()
                      if key != "frames"]
    if differing:
        raise DataError(f"{source}: cannot start from this run's weights ({'; '.join(differing)})")
    here = [i for i, word in enumerate(vocab.words) if word in source_vocab.index]
    there = [source_vocab.index[vocab.words[i]] for i in here]
    embeddings, output = model.word_embedding.embeddings, model.output_projection
    for target, value in zip(model.weights, source_model.weights):
        if target is model.feature_mean or target is model.feature_std:
            continue
        value = ops.convert_to_numpy(value)
        if any(target is word_indexed for word_indexed in (output.kernel, embeddings, output.bias)):
            axis = 1 if target is output.kernel else 0  # the kernel is (hidden, vocab), the others (vocab, ...)
            carried, value = value, np.array(ops.convert_to_numpy(target))
            np.moveaxis(value, axis, 0)[here] = np.moveaxis(carried, axis, 0)[there]
        target.assign(value)
    return checkpoint, len(here)


def replica_loss(model, frame_features, caption_ids, teacher_forcing_prob, seed, global_batch):
    """A training step's loss on one replica's part of the batch: its captions' losses summed and divided by the
    global batch size, so that summed over the replicas it is the mean over the global batch."""
    logits, _, _ = model(frame_features, caption_ids, teacher_forcing_prob=teacher_forcing_prob, seed=seed,
                         training=True)
    return ops.sum(caption_losses(logits, caption_ids)) / ops.cast(global_batch, "float32")


def interrupted(checkpoint, state, run_dir):
    saved = f"saved {checkpoint}" if checkpoint else "the chief saved its checkpoint"
    print(f"interrupted: {saved} at epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}; "
          f"continue with --resume --ckpt-dir {run_dir}")
    return 130


def train(args):
    run_dir = Path(args.ckpt_dir)
    backend.configure_devices()
    distribution = backend.Distribution(args.strategy)  # first: TensorFlow's multi-worker setup precedes other work
    chief, agree = distribution.chief, distribution.agreement()

    # ---- data ----
    train_split, val_split, val_source = load_splits(args)
    feature_dim = train_split.features.shape[2]
    validation_ids = val_split.video_ids if val_split else []
    manifest = read_feature_manifest(Path(args.data_dir) / "training_data" / "feat")
    if args.resume:
        check_resumable(run_dir, args, validation_ids)
        if manifest != read_run_config(run_dir).get("features"):
            raise DataError(f"{Path(args.data_dir) / 'training_data' / 'feat'}: features differ from those the run "
                            "was trained on")
        vocab = load_vocab(run_dir)
    else:
        vocab = Vocabulary.build((c for _, caps in train_split.labels for c in caps), args.min_word_count)
    video_index, caption_ids = encode_captions(train_split.labels, vocab, args.max_caption_len)
    if val_split is None:
        print("warning: no validation videos (--val-fraction 0): the best checkpoint is the one of lowest training "
              "loss", file=sys.stderr)
    else:
        print(f"validation: {len(validation_ids)} videos ({val_source}); training: {len(train_split.video_ids)}; "
              f"features {'in memory' if isinstance(train_split.features, np.ndarray) else 'read from their files'}")

    # ---- model ----
    config = ModelConfig(vocab_size=len(vocab), feature_dim=feature_dim, frames=args.frames, hidden=args.hidden,
                        attention=args.attention, max_caption_len=args.max_caption_len, dropout=args.dropout,
                        feature_noise=args.feature_noise, matmul_dtype=args.matmul_dtype, model=args.model,
                        encoder=args.encoder)
    backend.set_random_seed(args.seed)  # same seed, same initial weights: runs are reproducible
    with distribution.scope():  # on TensorFlow, one copy of every weight and optimizer slot per replica
        model = build_model(config)
        model.adapt_features(train_split.features)  # a resumed run restores the same values from its checkpoint
        optimizer = keras.optimizers.Adam(args.learning_rate, global_clipnorm=args.clip_norm)
        optimizer.build(model.trainable_variables)
    run_settings = vars(args)
    if args.init_from and not args.resume:  # a resumed run restores its own weights: the source is not read again
        source, carried = initialise_from(model, vocab, args.init_from, manifest)
        run_settings = dict(run_settings, init_from_checkpoint=str(source))
        print(f"initialised from {source}: {carried} of this run's {len(vocab)} words carried over, "
              f"{len(vocab) - carried} new; feature standardisation from this data")
    state = {"epoch": 0, "batch_in_epoch": 0, "best_score": None, "best_epoch": 0}
    if args.resume:  # every worker restores the chief's checkpoint
        latest = latest_checkpoint(run_dir / "last")
        if not latest:
            raise DataError(f"{run_dir / 'last'}: no checkpoint to resume from")
        state.update({k: v for k, v in restore(latest, model, optimizer).items() if k in state})
        print(f"resumed {latest}: epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}, "
              f"step {int(optimizer.iterations.numpy())}")
    elif chief:
        write_run_files(run_dir, config, run_settings, vocab, manifest)
        write_text_atomic(run_dir / "val_ids.txt", "".join(f"{video_id}\n" for video_id in validation_ids))
    train_step = backend.make_train_step(model, optimizer, distribution, replica_loss)
    padding = distribution.padding(args.batch_size)
    validate = (Validator(model, vocab, val_split, args.max_caption_len, args.batch_size, padding)
                if val_split is not None and chief else None)
    step = int(optimizer.iterations.numpy())  # counted here from now on: reading it every step waits for the device

    def save(folder, keep, with_optimizer=True):
        """The chief's checkpoint of now (the other workers save nothing), or None."""
        if not chief:
            return None
        train_step.sync()
        return save_checkpoint(run_dir / folder, step, model, dict(state, step=step, seed=args.seed,
                                                                   backend=backend.BACKEND),
                               optimizer if with_optimizer else None, keep)

    # ---- loop ----
    probs = teacher_forcing_schedule(args.epochs, args.schedule, args.teacher_forcing_start, args.teacher_forcing_end)
    write_scalars = backend.summary_writer(run_dir / "tensorboard") if chief else None
    history_path = run_dir / "history.csv"
    history = pd.read_csv(history_path).to_dict("records") if args.resume and history_path.is_file() else []
    metric_name = VALIDATION_METRICS[f"val_{args.select_metric}"]
    started = time.perf_counter()
    with ctrl_c_stops_between_batches() as stop:
        for epoch in range(state["epoch"], args.epochs):
            p = float(probs[epoch])
            epoch_videos, epoch_captions = epoch_pairs(video_index, caption_ids, args.pairs, args.seed, epoch)
            batches_per_epoch = -(-len(epoch_videos) // args.batch_size)
            skip = state["batch_in_epoch"]
            epoch_batches = batches(train_split.features, epoch_videos, epoch_captions, args.batch_size, skip,
                                    (distribution.slices, distribution.first_slice, distribution.local_slices),
                                    *padding, prepare=train_step.prepare)
            epoch_started = time.perf_counter()
            with tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                      leave=False) as bar:
                losses = run_epoch(train_step, epoch_batches, p, args.seed, step, lambda: agree(stop.is_set()),
                                   args.log_every, bar)
            step += len(losses)
            state["batch_in_epoch"] = skip + len(losses)
            if state["batch_in_epoch"] < batches_per_epoch:  # stopped
                return interrupted(save("last", 3), state, run_dir)

            train_loss = float(np.mean([float(loss) for loss in losses])) if losses else None  # waits for the device
            trained_pairs = len(epoch_videos) - skip * args.batch_size
            row = {"epoch": epoch + 1, "teacher_forcing_prob": p, "train_loss": train_loss,
                   "train_samples_per_s": trained_pairs / (time.perf_counter() - epoch_started)}
            if validate is not None:
                train_step.sync()
                row.update(validate())
            history.append(row)
            if chief:
                if write_scalars:
                    write_scalars(epoch + 1, {k: v for k, v in row.items() if isinstance(v, float)})
                with atomic_path(history_path) as tmp:
                    pd.DataFrame(history).to_csv(tmp, index=False)
                plot_training_curves(history_path, run_dir / "curves.png", args.select_metric)

            state.update(epoch=epoch + 1, batch_in_epoch=0)
            score = row.get(f"val_{args.select_metric}") if val_split is not None else -float(row["train_loss"] or 0)
            improved = agree(chief and (state["best_score"] is None or score > state["best_score"]))
            if improved:  # the chief's validation decides for every worker
                state.update(best_score=score if chief else None, best_epoch=epoch + 1)
            save("last", 3)
            if improved:
                save("best", 1, with_optimizer=False)
            print(f"epoch {epoch + 1}/{args.epochs}  loss {row['train_loss']:.4f}  teacher_forcing {p:.3f}"
                  + (f"  val_loss {row['val_loss']:.4f}  BLEU@1 {row['val_bleu1']:.4f}  BLEU-4 {row['val_bleu4']:.4f}"
                     f"  CIDEr {row['val_cider']:.4f}" if "val_loss" in row else "")
                  + (f"  *best {metric_name}*" if improved else ""), flush=True)
            if "example" in row:
                print(f"  {row['example']}", flush=True)
            if args.patience and agree(chief and epoch + 1 - state["best_epoch"] >= args.patience):
                print(f"early stop: validation {metric_name} has not improved for {args.patience} epochs since "
                      f"epoch {state['best_epoch']}", flush=True)
                break
            if agree(stop.is_set()) and epoch + 1 < args.epochs:  # Ctrl-C in the last batch, validation or saving
                return interrupted(latest_checkpoint(run_dir / "last") if chief else None, state, run_dir)

    elapsed = time.perf_counter() - started
    best = (f"best validation {metric_name} {state['best_score']:.4f} at epoch {state['best_epoch']}"
            if val_split is not None and chief else "no validation" if val_split is None else "validated by the chief")
    print(f"trained {state['epoch']} epochs ({elapsed:.0f} s this session, {backend.BACKEND}); {best}; "
          f"run folder {run_dir}")
    return 0


def main(argv=None):
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return train(parse_args(argv))
    except DataError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training, or a second Ctrl-C: the last checkpoint stands
        if debug:
            raise
        print("interrupted: nothing new saved; --resume continues from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
