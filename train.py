"""Train S2VT on data in the MLDS HW2-1 layout.

    python train.py --data-dir PATH [--attention bahdanau] [--epochs 100] [--batch-size 250] [--val-fraction 0.05]
                    [--select-metric bleu1] [--patience N] [--strategy auto] [--resume | --overwrite]
                    [--model s2vt|meanpool] [--encoder unidirectional|bidirectional] [--init-from RUN]
                    [--objective xe|scst] [--scst-samples 5] [--scst-baseline mean|greedy] [--scst-xe-weight 0]

Reads PATH/training_label.json with PATH/training_data/feat/<id>.npy and validates every epoch on videos held out
of them (--val-ids, else PATH/validation_label.json, else --val-fraction: util.data.load_splits); the test split is
never read here: score it once, after training, with infer.py. Writes checkpoints/<run>/ (util/checkpoints.py), a
folder one process at a time works in (util/run_folder.py): one that holds a run already is refused, but --resume
continues it, on the same labels and features, and --overwrite moves it aside. Ctrl-C saves a checkpoint after the
current batch (a second Ctrl-C quits at once); --resume continues from it exactly. --model meanpool trains the
mean-pool baseline, --encoder bidirectional reads S2VT's frames both ways (model.py); --init-from RUN starts from
another run's weights (model.initialise_from), e.g. one pre-trained on image captions as one-frame videos.
Runs on TensorFlow (the default) or JAX: KERAS_BACKEND=jax python train.py ... With --strategy mirrored (several
GPUs) each global batch is split over the devices with the same result as one device; on TensorFlow, multiworker
spreads it over machines named in TF_CONFIG, and the chief alone validates and writes the run folder.
--objective scst continues a cross-entropy run (--init-from RUN, a new run folder) by self-critical sequence
training (Rennie et al., 2017): each sampled caption is rewarded by its CIDEr-D against the video's training
captions (util/cider.py) minus a baseline; validation picks checkpoints by CIDEr.

The flags are the fields of two dataclasses: model.ModelConfig's (those with help text) and TrainConfig's below.
"""
import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from keras import ops
from tqdm import tqdm

from model import ModelConfig, build_model, caption_losses, initialise_from
from sampling import SCHEDULES, teacher_forcing_schedule
from scst import SCST_BASELINES, scst_loss, scst_rewards, scst_rows
from util import backend
from util.checkpoints import latest_checkpoint, load_vocab, read_run_config, restore
from util.data import (DEFAULT_VAL_FRACTION, batches, encode_captions, epoch_pairs, load_splits, read_feature_manifest,
                       sha256_of)
from util.errors import DataError, command
from util.flags import add_flag, flag_type, positive_int
from util.plots import VALIDATION_METRICS
from util.run_folder import RunFolder, TrainedOn, add_run_folder_flags, check_resumable, claimed, run_folder_of
from util.vocab import EOS, PAD, UNK, Vocabulary
from validation import MIN_VALIDATION_VIDEOS, SELECT_METRICS, Validator, say_if_too_few, select_metric

OBJECTIVES = ("xe", "scst")
OLDER_RUNS = {"select_metric": "bleu1", "unk_targets": "learn"}  # how a run older than the setting was trained


# ---- the configuration: one source for the flags, --resume's check, config.json and --init-from's check ----

def setting(default, help=None, trains=False, **options):
    """A TrainConfig field: its flag's help and argparse options (type, choices, metavar); trains=True marks the
    settings that change what is trained, which --resume refuses to see changed."""
    return field(default=default, metadata={"help": help, "trains": trains, **options})


@dataclass
class TrainConfig:
    """How a model is trained: every field is a flag (--batch-size for batch_size), beside model.ModelConfig's."""
    init_from: Optional[str] = setting(None, "start from this run's (or checkpoint's) weights, the shared words' "
                                             "included", trains=True, metavar="RUN")
    schedule: str = setting("linear", "teacher-forcing probability per epoch (see sampling.py; the course's "
                                      "inverse_sigmoid feeds the model's own words 88%% of the time at the end, "
                                      "which teaches it to ignore the previous word: docs/captions.md)",
                            trains=True, choices=SCHEDULES)
    teacher_forcing_start: float = setting(1.0, "linear/constant schedules", trains=True)
    teacher_forcing_end: float = setting(0.8, "linear schedule", trains=True)
    epochs: int = setting(100, trains=True, type=positive_int)
    batch_size: int = setting(250, "the global batch (all replicas)", trains=True, type=positive_int)
    min_word_count: int = setting(1, "words seen fewer times in the training captions are <UNK> (1: none)",
                                  trains=True, type=positive_int)
    unk_targets: str = setting("skip", "skip: <UNK> targets are left out of the loss; learn: trained like a word "
                                       "(as before this option existed)", trains=True, choices=("skip", "learn"))
    learning_rate: float = setting(1e-4, trains=True)
    clip_norm: float = setting(5.0, "global gradient-norm clip", trains=True)
    pairs: str = setting("all", "an epoch is every (video, caption) pair, or one random caption per video",
                         trains=True, choices=("all", "sample"))
    val_fraction: Optional[float] = setting(
        None, f"share of the training videos held out for validation, drawn with --seed (default "
              f"{DEFAULT_VAL_FRACTION}, unless the data folder has its own validation_label.json)", trains=True)
    val_ids: Optional[str] = setting(None, "validate on these training videos (one id per line) instead", trains=True)
    select_metric: Optional[str] = setting(None, "validation metric that picks the best checkpoint (bleu1 = the MLDS "
                                                 "course BLEU@1; loss = the lowest teacher-forced validation loss; "
                                                 "default cider with --objective scst, else bleu1, or loss when "
                                                 f"there are fewer than {MIN_VALIDATION_VIDEOS} validation videos)",
                                           trains=True, choices=SELECT_METRICS)
    objective: str = setting("xe", "xe: cross-entropy; scst: self-critical training with a CIDEr-D reward, from the "
                                   "cross-entropy run --init-from names", trains=True, choices=OBJECTIVES)
    scst_samples: int = setting(5, "captions sampled per video (scst)", trains=True, type=positive_int)
    scst_baseline: str = setting("mean", "the reward each sample's is measured against (scst): the mean of the "
                                         "video's other samples', or its greedy caption's", trains=True,
                                 choices=SCST_BASELINES)
    scst_xe_weight: float = setting(0.0, "scst: add this times the cross-entropy of one of each video's captions "
                                         "(a mixed objective)", trains=True)
    patience: int = setting(0, "stop when --select-metric has not improved for this many epochs (0: never)")
    keep_last: int = setting(3, "checkpoints kept in last/, the newest", type=positive_int)
    log_every: int = setting(10, "show the loss every N batches (reading it waits for the device)", type=positive_int)
    features: Optional[str] = setting(
        None, "memory: every video's features in memory (float16); files: read from their .npy files a batch at a "
              "time, so memory does not grow with the data set (default: memory when the training features take at "
              "most a quarter of this machine's memory)", choices=("memory", "files"))
    seed: int = setting(0, trains=True)
    strategy: str = setting("auto", "auto: mirrored when more than one GPU is visible, else default (one device); "
                                    "mirrored: every local GPU (or logical CPU); multiworker: the cluster in TF_CONFIG",
                            choices=backend.STRATEGIES)


def model_settings():
    """ModelConfig's fields that are flags (those with help text); vocab_size and feature_dim come from the data."""
    return [f for f in fields(ModelConfig) if f.metadata.get("help")]


def trained_settings(args):
    """The settings that change what is trained, every model flag and TrainConfig's marked so, as --resume compares
    them: {name: (the value asked, how a run older than the setting was trained: its default, or OLDER_RUNS's)}."""
    return {**{f.name: (getattr(args, f.name), f.default) for f in model_settings()},
            **{f.name: (getattr(args, f.name), OLDER_RUNS.get(f.name, f.default)) for f in fields(TrainConfig)
               if f.metadata["trains"]}}


def add_setting_flags(parser):
    for f in model_settings():  # every size a model has must be positive (ModelConfig checks it too)
        default = None if f.name == "attention" else f.default  # bahdanau for s2vt, none for meanpool: parse_args
        add_flag(parser, f, default, flag_type(f, ints=positive_int))
    for f in fields(TrainConfig):
        add_flag(parser, f, f.default, flag_type(f))


def model_config(args, vocab_size, feature_dim):
    return ModelConfig(vocab_size=vocab_size, feature_dim=feature_dim,
                       **{f.name: getattr(args, f.name) for f in model_settings()})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder in the MLDS HW2-1 layout")
    add_setting_flags(parser)
    add_run_folder_flags(parser)
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
    if args.objective == "scst" and not args.init_from:
        parser.error("--objective scst continues a cross-entropy run: name it with --init-from RUN")
    if args.objective == "scst" and args.scst_baseline == "mean" and args.scst_samples < 2:
        parser.error("--scst-baseline mean needs --scst-samples 2 or more (the mean of the other samples)")
    args.ckpt_dir = str(run_folder_of(args, parser))
    return args


# ---- data ----

def load_data(args, run_dir):
    """The splits, what they are (TrainedOn), the vocabulary (a resumed run's own, checked against these flags and
    data) and the training captions encoded with it."""
    train_split, val_split, val_source, labels_files = load_splits(args.data_dir, args.val_ids, args.val_fraction,
                                                                   args.seed, args.frames, args.features)
    validation_ids, asked = val_split.video_ids if val_split else [], args.select_metric
    args.select_metric = select_metric(asked, args.objective, len(validation_ids))
    feat_dir = Path(args.data_dir) / "training_data" / "feat"
    trained_on = TrainedOn({path: sha256_of(path) for path in labels_files}, feat_dir, read_feature_manifest(feat_dir),
                           validation_ids)
    if args.resume:
        check_resumable(run_dir, trained_settings(args), trained_on)
        vocab = load_vocab(run_dir)
        cannot_end = (read_run_config(run_dir).get("decoding") or {}).get("cannot_end", [])
    else:
        captions = [c for _, caps in train_split.labels for c in caps]
        vocab = Vocabulary.build(captions, args.min_word_count)
        cannot_end = vocab.cannot_end(captions)
    video_index, caption_ids = encode_captions(train_split.labels, vocab, args.max_caption_len)
    report_unknown_words(vocab, caption_ids, args.min_word_count, args.unk_targets)
    if val_split is None:
        print("warning: no validation videos (--val-fraction 0): the best checkpoint is the one of lowest training "
              "loss", file=sys.stderr)
    else:
        print(f"validation: {len(validation_ids)} videos ({val_source}); training: {len(train_split.video_ids)}; "
              f"features {'in memory' if isinstance(train_split.features, np.ndarray) else 'read from their files'}")
    rewards = scst_rewards(video_index, caption_ids) if args.objective == "scst" else None
    return SimpleNamespace(train=train_split, validation=val_split, trained_on=trained_on, asked_metric=asked,
                           vocab=vocab, cannot_end=cannot_end, video_index=video_index, caption_ids=caption_ids,
                           rewards=rewards)


def report_unknown_words(vocab, caption_ids, min_word_count, unk_targets):
    """One line: the vocabulary's size, and the share of the training target words that are <UNK>."""
    targets = caption_ids[(caption_ids != PAD) & (caption_ids != EOS)]
    unknown = int(np.sum(targets == UNK))
    print(f"vocabulary: {len(vocab) - 4} words seen at least {min_word_count} times; {unknown} of the "
          f"{len(targets)} training words ({100 * unknown / max(len(targets), 1):.1f}%) are <UNK>, "
          + ("left out of the loss" if unk_targets == "skip" else "learnt as a word (--unk-targets learn)"))


# ---- the model: new, from another run's weights, or resumed ----

def build_or_resume_model(args, data, distribution, run):
    """(model, optimizer, state): built from the flags; started from --init-from's weights, or restored from the
    run's last checkpoint with --resume (its best checkpoint reconciled), or else a new run folder written."""
    config = model_config(args, len(data.vocab), data.train.features.shape[2])
    backend.set_random_seed(args.seed)  # same seed, same initial weights: runs are reproducible
    with distribution.scope():  # on TensorFlow, one copy of every weight and optimizer slot per replica
        model = build_model(config)
        model.adapt_features(data.train.features)  # a resumed run restores the same values from its checkpoint
        optimizer = keras.optimizers.Adam(args.learning_rate, global_clipnorm=args.clip_norm)
        optimizer.build(model.trainable_variables)
    run_settings = vars(args)  # every flag: config.json's "train" section
    if args.init_from and not args.resume:  # a resumed run restores its own weights: the source is not read again
        source, carried = initialise_from(model, data.vocab, args.init_from, data.trained_on.manifest)
        run_settings = dict(run_settings, init_from_checkpoint=str(source))
        print(f"initialised from {source}: {carried} of this run's {len(data.vocab)} words carried over, "
              f"{len(data.vocab) - carried} new; feature standardisation from this data")
    state = {"epoch": 0, "batch_in_epoch": 0, "best_score": None, "best_epoch": 0}
    if args.resume:  # every worker restores the chief's checkpoint
        latest = latest_checkpoint(run.path / "last")
        if not latest:
            raise DataError(f"{run.path / 'last'}: no checkpoint to resume from")
        state.update({k: v for k, v in restore(latest, model, optimizer).items() if k in state})
        print(f"resumed {latest}: epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}, "
              f"step {int(optimizer.iterations.numpy())}")
        run.reconcile_best(state)
    else:
        run.start(config, run_settings, data.vocab, data.trained_on, data.cannot_end)
    return model, optimizer, state


# ---- losses: cross-entropy here, the self-critical one in scst.py ----

def replica_loss(model, frame_features, caption_ids, teacher_forcing_prob, seed, global_batch, learn_unk=False):
    """A training step's loss on one replica's part of the batch: its captions' losses summed and divided by the
    global batch size, so that summed over the replicas it is the mean over the global batch."""
    logits, _, _ = model(frame_features, caption_ids, teacher_forcing_prob=teacher_forcing_prob, seed=seed,
                         training=True)
    return ops.sum(caption_losses(logits, caption_ids, learn_unk)) / ops.cast(global_batch, "float32")


# ---- the loop ----

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


def interrupted(checkpoint, state, run_dir):
    saved = f"saved {checkpoint}" if checkpoint else "the chief saved its checkpoint"
    print(f"interrupted: {saved} at epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}; "
          f"continue with --resume --ckpt-dir {run_dir}")
    return 130


class Training:
    """The loop over epochs, from the state a new or resumed model starts at; every worker runs it, and the
    multi-worker decisions (stop now, the epoch improved, stop early) are agreed at the points where they are
    taken."""

    def __init__(self, args, data, model, optimizer, state, distribution, agree, run):
        self.args, self.data, self.model, self.optimizer, self.state, self.run = \
            args, data, model, optimizer, state, run
        self.distribution, self.chief, self.agree = distribution, distribution.chief, agree
        learn_unk = args.unk_targets == "learn"
        loss = partial(replica_loss, learn_unk=learn_unk) if args.objective == "xe" else \
            scst_loss(data.rewards, args.scst_samples, args.scst_baseline, args.scst_xe_weight, xe_loss=replica_loss)
        self.train_step = backend.make_train_step(model, optimizer, distribution, loss)
        self.padding = distribution.padding(args.batch_size)
        self.validate = (Validator(model, data.vocab, data.validation, args.max_caption_len, args.batch_size,
                                   self.padding, data.cannot_end, learn_unk)
                         if data.validation is not None and self.chief else None)
        self.step = int(optimizer.iterations.numpy())  # counted here from now on: reading it waits for the device
        self.probs = teacher_forcing_schedule(args.epochs, args.schedule, args.teacher_forcing_start,
                                              args.teacher_forcing_end)
        self.metric_name = {**VALIDATION_METRICS, "val_loss": "loss"}[f"val_{args.select_metric}"]
        self.history = run.read_history(state["epoch"]) if args.resume else []
        run.open_scalars(backend.summary_writer)

    def __call__(self):
        started = time.perf_counter()
        with ctrl_c_stops_between_batches() as stop:
            for epoch in range(self.state["epoch"], self.args.epochs):
                row = self.train_epoch(epoch, stop)
                if row is None:  # stopped within the epoch
                    return interrupted(self.save("last"), self.state, self.run.path)
                if not self.end_epoch(epoch, row):
                    break
                if self.agree(stop.is_set()) and epoch + 1 < self.args.epochs:  # Ctrl-C in the last batch,
                    # validation or saving
                    return interrupted(latest_checkpoint(self.run.path / "last") if self.chief else None, self.state,
                                       self.run.path)
        self.report(time.perf_counter() - started)
        return 0

    def train_epoch(self, epoch, stop):
        """Train the epoch's batches (from the resumed batch on); its history row, or None when stopped within."""
        args, data, distribution = self.args, self.data, self.distribution
        p = float(self.probs[epoch])
        if args.objective == "scst":  # every video once
            epoch_videos, epoch_captions = epoch_pairs(data.video_index, scst_rows(data.video_index, data.caption_ids),
                                                       "sample", args.seed, epoch)
        else:
            epoch_videos, epoch_captions = epoch_pairs(data.video_index, data.caption_ids, args.pairs, args.seed,
                                                       epoch)
        batches_per_epoch = -(-len(epoch_videos) // args.batch_size)
        skip = self.state["batch_in_epoch"]
        epoch_batches = batches(data.train.features, epoch_videos, epoch_captions, args.batch_size, skip,
                                (distribution.slices, distribution.first_slice, distribution.local_slices),
                                *self.padding, prepare=self.train_step.prepare)
        epoch_started = time.perf_counter()
        with tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                  leave=False) as bar:
            losses = run_epoch(self.train_step, epoch_batches, p, args.seed, self.step,
                               lambda: self.agree(stop.is_set()), args.log_every, bar)
        self.step += len(losses)
        self.state["batch_in_epoch"] = skip + len(losses)
        if self.state["batch_in_epoch"] < batches_per_epoch:
            return None
        train_loss = float(np.mean([float(loss) for loss in losses])) if losses else None  # waits for the device
        trained_pairs = len(epoch_videos) - skip * args.batch_size
        row = {"epoch": epoch + 1, "teacher_forcing_prob": p, "train_loss": train_loss,
               "train_samples_per_s": trained_pairs / (time.perf_counter() - epoch_started)}
        if self.validate is not None:
            self.train_step.sync()
            row.update(self.validate())
        return row

    # ---- the end of an epoch ----

    def end_epoch(self, epoch, row):
        """Record the finished epoch: history.csv, best/ when it improved, last/ (in that order: see RunFolder);
        print its line. Returns False to stop early."""
        args, state = self.args, self.state
        if self.data.validation is None:  # the lowest training loss is the best
            score = -float(row["train_loss"] or 0)
        else:  # None on the workers but the chief, which alone validates
            score = row.get(f"val_{args.select_metric}")
            score = -score if args.select_metric == "loss" and score is not None else score
        improved = self.agree(self.chief and (state["best_score"] is None or score > state["best_score"]))
        state.update(epoch=epoch + 1, batch_in_epoch=0)
        if improved:  # the chief's validation decides for every worker
            state.update(best_score=score if self.chief else None, best_epoch=epoch + 1)
        self.history.append(row)
        stop_early = bool(args.patience) and self.agree(
            self.chief and epoch + 1 - state["best_epoch"] >= args.patience)
        self.run.record_epoch(self.history, final=stop_early or epoch + 1 == args.epochs)
        if improved:
            self.save("best")
        self.save("last")
        print(f"epoch {epoch + 1}/{args.epochs}  loss {row['train_loss']:.4f}  "
              f"teacher_forcing {row['teacher_forcing_prob']:.3f}"
              + (f"  val_loss {row['val_loss']:.4f}  BLEU@1 {row['val_bleu1']:.4f}  BLEU-4 {row['val_bleu4']:.4f}"
                 f"  CIDEr {row['val_cider']:.4f}" if "val_loss" in row else "")
              + (f"  *best {self.metric_name}*" if improved else ""), flush=True)
        if "example" in row:
            print(f"  {row['example']}", flush=True)
        if stop_early:
            print(f"early stop: validation {self.metric_name} has not improved for {args.patience} epochs since "
                  f"epoch {state['best_epoch']}", flush=True)
            return False
        return True

    def save(self, folder):
        """The chief's checkpoint of now in best/ or last/ (None on the other workers)."""
        if self.chief:
            self.train_step.sync()
        state = dict(self.state, step=self.step, seed=self.args.seed, backend=backend.BACKEND)
        return self.run.save_best(self.step, self.model, state) if folder == "best" else \
            self.run.save_last(self.step, self.model, state, self.optimizer)

    def report(self, elapsed):
        state = self.state
        shown = -state["best_score"] if self.args.select_metric == "loss" and state["best_score"] is not None \
            else state["best_score"]  # the loss is kept negated, so that higher is better for every metric
        best = (f"best validation {self.metric_name} {shown:.4f} at epoch {state['best_epoch']}"
                if self.data.validation is not None and self.chief
                else "no validation" if self.data.validation is None else "validated by the chief")
        print(f"trained {state['epoch']} epochs ({elapsed:.0f} s this session, {backend.BACKEND}); {best}; "
              f"run folder {self.run.path}")


# ---- the command ----

def train(args):
    """Config, data, model (new or resumed), the loop: returns the exit status."""
    run_dir = Path(args.ckpt_dir)
    backend.configure_devices()
    distribution = backend.Distribution(args.strategy)  # first: TensorFlow's multi-worker setup precedes other work
    agree = distribution.agreement()
    with claimed(run_dir, distribution.chief, agree, args.resume, args.overwrite) as claim:
        data = load_data(args, run_dir)
        run = RunFolder(run_dir, claim, args.select_metric, args.keep_last)
        model, optimizer, state = build_or_resume_model(args, data, distribution, run)
        # said once every check has passed: a refused run's one line is its error
        say_if_too_few(data.asked_metric, args.select_metric, len(data.trained_on.validation_ids))
        return Training(args, data, model, optimizer, state, distribution, agree, run)()


@command
def main(argv):
    try:
        return train(parse_args(argv))
    except KeyboardInterrupt:  # before training, or a second Ctrl-C: the last checkpoint stands
        if "--debug" in argv:
            raise
        print("interrupted: nothing new saved; --resume continues from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
