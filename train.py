"""Train S2VT on data in the MLDS HW2-1 layout.

    python train.py --data-dir PATH [--attention bahdanau] [--epochs 100] [--batch-size 250] [--resume]

Reads PATH/training_label.json with PATH/training_data/feat/<id>.npy, validates every epoch on
PATH/testing_label.json with PATH/testing_data/feat, and writes checkpoints/<run>/ (see util/checkpoints.py):
the last 3 checkpoints, the best by a validation metric, config.json, vocab.json, history.csv, curves.png and
TensorBoard logs.
Ctrl-C saves a checkpoint after the current batch (a second Ctrl-C quits at once); --resume continues from it exactly.
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

import numpy as np
import pandas as pd
import tensorflow as tf
import keras
from tqdm import tqdm

from model import ATTENTIONS, MATMUL_DTYPES, S2VT, S2VTConfig, caption_loss
from sampling import SCHEDULES, teacher_forcing_schedule
from util.atomic import atomic_path
from util.checkpoints import DEFAULT_ROOT, load_vocab, newest_run, read_run_config, restore, write_run_files
from util.data import DataError, Split, encode_captions, epoch_pairs, make_dataset, read_feature_manifest
from util.evaluate import evaluate
from util.plots import plot_training_curves
from util.vocab import Vocabulary


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder in the MLDS HW2-1 layout")
    parser.add_argument("--attention", choices=ATTENTIONS, default="bahdanau")
    parser.add_argument("--schedule", choices=SCHEDULES, default="inverse_sigmoid",
                        help="teacher-forcing probability per epoch (see sampling.py)")
    parser.add_argument("--teacher-forcing-start", type=float, default=1.0, help="linear/constant schedules")
    parser.add_argument("--teacher-forcing-end", type=float, default=0.0, help="linear schedule")
    parser.add_argument("--epochs", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=250)
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
                             "and on GPUs (weights, gates and cell states stay float32)")
    parser.add_argument("--pairs", choices=("all", "sample"), default="all",
                        help="an epoch is every (video, caption) pair, or one random caption per video")
    parser.add_argument("--select-metric", choices=("bleu1", "bleu4", "cider"), default="bleu1",
                        help="validation metric that picks the best checkpoint (bleu1 = the MLDS course BLEU@1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", help="run name (default: a timestamp); checkpoints go to checkpoints/<run>")
    parser.add_argument("--ckpt-dir", help="run folder (default checkpoints/<run>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --ckpt-dir (default: newest)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.resume and not args.ckpt_dir:
        args.ckpt_dir = str(DEFAULT_ROOT / args.run) if args.run else str(newest_run())
    args.ckpt_dir = args.ckpt_dir or str(DEFAULT_ROOT / (args.run or time.strftime("%Y%m%d-%H%M%S")))
    return args


@contextmanager
def ctrl_c_stops_between_batches():
    """Yield an Event that Ctrl-C sets, for the loop to stop and save between batches rather than take a
    KeyboardInterrupt inside TensorFlow, which can corrupt its memory (an abort, "free(): invalid next size").
    A second Ctrl-C raises KeyboardInterrupt at once."""
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


def interrupted(path, epoch_var, batch_var, run_dir):
    print(f"interrupted: saved {path} at epoch {int(epoch_var) + 1}, batch {int(batch_var)}; "
          f"continue with --resume --ckpt-dir {run_dir}")
    return 130


def greedy_captions(greedy_fn, vocab, split, batch_size):
    captions = {}
    for start in range(0, len(split.video_ids), batch_size):
        words, _ = greedy_fn(tf.constant(split.features[start:start + batch_size], tf.float32))
        for video_id, ids in zip(split.video_ids[start:start + batch_size], words.numpy()):
            captions[video_id] = vocab.decode(ids)
    return captions


def make_train_step(model, optimizer):
    """One optimisation step as a tf.function: (features, captions, teacher_forcing_prob, seed) -> loss.
    bench.py times this same function."""
    cfg = model.config

    @tf.function(input_signature=[tf.TensorSpec([None, cfg.frames, cfg.feature_dim], tf.float32),
                                  tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.float32),
                                  tf.TensorSpec([2], tf.int64)])
    def train_step(frame_features, captions, teacher_forcing_prob, seed):
        with tf.GradientTape() as tape:
            logits, _, _ = model(frame_features, captions, teacher_forcing_prob=teacher_forcing_prob, seed=seed,
                                 training=True)
            loss = caption_loss(logits, captions)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    return train_step


def train(args):
    run_dir = Path(args.ckpt_dir)
    data_dir = Path(args.data_dir)

    # ---- data ----
    train_split = Split(data_dir, "training", frames=args.frames)
    feature_dim = train_split.features.shape[2]
    manifest = read_feature_manifest(data_dir / "training_data" / "feat")
    test_manifest = read_feature_manifest(data_dir / "testing_data" / "feat")
    if manifest and test_manifest and manifest != test_manifest:
        raise DataError(f"{data_dir / 'testing_data' / 'feat' / 'manifest.json'}: test features were made with other "
                        f"settings than {data_dir / 'training_data' / 'feat' / 'manifest.json'}")
    if args.resume and manifest != read_run_config(run_dir).get("features"):
        raise DataError(f"{data_dir / 'training_data' / 'feat'}: features differ from those the run was trained on")
    test_split = None
    if (data_dir / "testing_label.json").is_file():
        test_split = Split(data_dir, "testing", frames=args.frames, feature_dim=feature_dim)
    else:
        print(f"warning: {data_dir / 'testing_label.json'} not found: no validation, the best checkpoint is the last")
    if args.resume:
        vocab = load_vocab(run_dir)
    else:
        vocab = Vocabulary.build((c for _, caps in train_split.labels for c in caps), args.min_word_count)
    video_index, caption_ids = encode_captions(train_split.labels, vocab, args.max_caption_len)

    # ---- model ----
    config = S2VTConfig(vocab_size=len(vocab), feature_dim=feature_dim, frames=args.frames, hidden=args.hidden,
                        frame_embed=args.hidden, word_embed=args.hidden, attention=args.attention,
                        attention_dim=args.hidden, max_caption_len=args.max_caption_len, dropout=args.dropout,
                        feature_noise=args.feature_noise, matmul_dtype=args.matmul_dtype)
    if args.resume:
        saved = read_run_config(run_dir)["model"]
        differing = {k: (v, config.to_dict()[k]) for k, v in saved.items() if config.to_dict().get(k) != v}
        if differing:
            detail = ", ".join(f"{k}: {old} saved, {new} asked" for k, (old, new) in differing.items())
            raise DataError(f"{run_dir}: cannot resume with another model configuration ({detail})")
    keras.utils.set_random_seed(args.seed)  # same seed, same initial weights: runs are reproducible
    model = S2VT(config)
    model.adapt_features(train_split.features)  # a resumed run restores the same values from its checkpoint
    optimizer = keras.optimizers.Adam(args.learning_rate, global_clipnorm=args.clip_norm)
    optimizer.build(model.trainable_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, name="epoch")  # epochs finished
    batch_var = tf.Variable(0, dtype=tf.int64, name="batch_in_epoch")  # batches done in the unfinished epoch
    best_var = tf.Variable(-np.inf, dtype=tf.float64, name="best_score")  # of --select-metric
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var, batch_in_epoch=batch_var,
                                     best_score=best_var)
    last_manager = tf.train.CheckpointManager(checkpoint, str(run_dir / "last"), max_to_keep=3)
    best_manager = tf.train.CheckpointManager(checkpoint, str(run_dir / "best"), max_to_keep=1)
    if args.resume:
        if not last_manager.latest_checkpoint:
            raise DataError(f"{run_dir / 'last'}: no checkpoint to resume from")
        restore(checkpoint, last_manager.latest_checkpoint)
        print(f"resumed {last_manager.latest_checkpoint}: epoch {int(epoch_var) + 1}, batch {int(batch_var)}, "
              f"step {int(optimizer.iterations)}")
    else:
        write_run_files(run_dir, config, vars(args), vocab, manifest)

    signature = [tf.TensorSpec([None, args.frames, feature_dim], tf.float32), tf.TensorSpec([None, None], tf.int32)]
    train_step = make_train_step(model, optimizer)

    @tf.function(input_signature=signature)
    def eval_loss(frame_features, captions):
        return caption_loss(model(frame_features, captions)[0], captions)

    greedy = tf.function(model.greedy, input_signature=signature[:1])

    # ---- loop ----
    if test_split is not None:
        val_videos, val_captions = encode_captions(test_split.labels, vocab, args.max_caption_len)
    probs = teacher_forcing_schedule(args.epochs, args.schedule, args.teacher_forcing_start, args.teacher_forcing_end)
    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    history_path = run_dir / "history.csv"
    history = pd.read_csv(history_path).to_dict("records") if args.resume and history_path.is_file() else []
    batches_per_epoch = None
    started = time.perf_counter()
    with ctrl_c_stops_between_batches() as stop:
        for epoch in range(int(epoch_var), args.epochs):
            p = float(probs[epoch])
            epoch_videos, epoch_captions = epoch_pairs(video_index, caption_ids, args.pairs, args.seed, epoch)
            batches_per_epoch = -(-len(epoch_videos) // args.batch_size)
            skip = int(batch_var)
            dataset = make_dataset(train_split.features, epoch_videos, epoch_captions, args.batch_size, skip)
            bar = tqdm(dataset, total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}",
                       unit="batch", leave=False)
            losses = []
            for frame_features, captions in bar:
                if stop.is_set():
                    break
                seed = tf.constant([args.seed, int(optimizer.iterations)], tf.int64)
                losses.append(float(train_step(frame_features, captions, tf.constant(p, tf.float32), seed)))
                batch_var.assign_add(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", teacher_forcing=f"{p:.3f}")
            bar.close()
            if stop.is_set() and int(batch_var) < batches_per_epoch:
                return interrupted(last_manager.save(), epoch_var, batch_var, run_dir)

            row = {"epoch": epoch + 1, "teacher_forcing_prob": p,
                   "train_loss": float(np.mean(losses)) if losses else None}
            if test_split is not None:
                val_losses = [float(eval_loss(f, c)) for f, c in
                              make_dataset(test_split.features, val_videos, val_captions, args.batch_size)]
                captions = greedy_captions(greedy, vocab, test_split, args.batch_size)
                scores = evaluate(captions, test_split.references, use_java=False)  # no Java start-up every epoch
                row.update(val_loss=float(np.mean(val_losses)), val_bleu1=scores["mlds_bleu1"],
                           val_bleu4=scores["bleu4"], val_cider=scores["cider"],
                           example=f"{test_split.video_ids[0]}: {captions[test_split.video_ids[0]]}")
            history.append(row)
            with writer.as_default(step=epoch + 1):
                for key, value in row.items():
                    if isinstance(value, float):
                        tf.summary.scalar(key, value)
            with atomic_path(history_path) as tmp:
                pd.DataFrame(history).to_csv(tmp, index=False)
            plot_training_curves(history_path, run_dir / "curves.png")

            epoch_var.assign(epoch + 1)
            batch_var.assign(0)
            last_manager.save()
            score = row[f"val_{args.select_metric}"] if test_split is not None else -float(row["train_loss"] or 0)
            improved = score > float(best_var)
            if improved:
                best_var.assign(score)
                best_manager.save()
            print(f"epoch {epoch + 1}/{args.epochs}  loss {row['train_loss']:.4f}  teacher_forcing {p:.3f}"
                  + (f"  val_loss {row['val_loss']:.4f}  BLEU@1 {row['val_bleu1']:.4f}  BLEU-4 {row['val_bleu4']:.4f}"
                     f"  CIDEr {row['val_cider']:.4f}" if test_split else "")
                  + ("  *best*" if improved else ""), flush=True)
            if test_split is not None:
                print(f"  {row['example']}", flush=True)
            if stop.is_set() and epoch + 1 < args.epochs:  # Ctrl-C in an epoch's last batch, validation or saving
                return interrupted(last_manager.latest_checkpoint, epoch_var, batch_var, run_dir)

    elapsed = time.perf_counter() - started
    best = f"best val {args.select_metric} {float(best_var):.4f}" if test_split is not None else "no validation"
    print(f"trained {args.epochs} epochs ({elapsed:.0f} s this session); {best}; run folder {run_dir}")
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
