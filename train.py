"""Train S2VT on data in the MLDS HW2-1 layout.

    python train.py --data-dir PATH [--attention bahdanau] [--epochs 100] [--batch-size 250] [--val-fraction 0.05]
                    [--select-metric bleu1] [--patience N] [--strategy auto] [--resume]

Reads PATH/training_label.json with PATH/training_data/feat/<id>.npy and validates every epoch on videos held out
of them: --val-ids FILE names them, else PATH/validation_label.json with PATH/validation_data/feat is the
validation split when the folder has one, else --val-fraction of the training videos are drawn with --seed. The
test split is never read here: score it once, after training, with infer.py. Writes checkpoints/<run>/ (see
util/checkpoints.py): the last 3 checkpoints, the best by the validation metric, config.json, vocab.json,
val_ids.txt, history.csv, curves.png and TensorBoard logs.
Ctrl-C saves a checkpoint after the current batch (a second Ctrl-C quits at once); --resume continues from it exactly.
With --strategy mirrored (several GPUs) or multiworker (machines named in TF_CONFIG) each global batch is split
over the replicas with the same result as one device; the chief alone validates and writes the run folder.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
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

from model import ATTENTIONS, MATMUL_DTYPES, S2VT, S2VTConfig, caption_loss, caption_losses
from sampling import SCHEDULES, teacher_forcing_schedule
from util.atomic import atomic_path, write_text_atomic
from util.checkpoints import DEFAULT_ROOT, load_vocab, newest_run, read_run_config, restore, write_run_files
from util.data import (DataError, Split, batch_tensors, encode_captions, epoch_pairs, hold_out_videos, load_labels,
                       make_dataset, read_feature_manifest, read_ids, split_off_ids, warnings_as_lines)
from util.evaluate import evaluate
from util.plots import VALIDATION_METRICS, plot_training_curves
from util.vocab import Vocabulary

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
SELECT_METRICS = ("bleu1", "bleu4", "cider")
DEFAULT_VAL_FRACTION = 0.05
SUM = tf.distribute.ReduceOp.SUM


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


# the flags that change what is trained: --resume refuses to go on with any of them changed
TRAINING_FLAGS = ("hidden", "frames", "attention", "max_caption_len", "min_word_count", "batch_size", "seed", "pairs",
                  "epochs", "schedule", "teacher_forcing_start", "teacher_forcing_end", "learning_rate", "clip_norm",
                  "dropout", "feature_noise", "val_fraction", "val_ids", "select_metric", "matmul_dtype")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder in the MLDS HW2-1 layout")
    parser.add_argument("--attention", choices=ATTENTIONS, default="bahdanau")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
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
    if args.resume and not args.ckpt_dir:
        args.ckpt_dir = str(DEFAULT_ROOT / args.run) if args.run else str(newest_run())
    args.ckpt_dir = args.ckpt_dir or str(DEFAULT_ROOT / (args.run or time.strftime("%Y%m%d-%H%M%S")))
    return args


def check_resumable(run_dir, args, validation_ids):
    """Refuse, before anything is written, to resume a run with other training flags or validation videos."""
    saved = read_run_config(run_dir).get("train", {})
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
    train_split = Split(training, feat_dir, frames=args.frames)
    val_split = (Split(validation, val_feat_dir, frames=args.frames, feature_dim=train_split.features.shape[2])
                 if validation else None)
    return train_split, val_split, source


def check_tf_config():
    """Check the TF_CONFIG variable MultiWorkerMirroredStrategy reads: a cluster of host:port lists and this
    process's task in it; anything else is a one-line DataError rather than a hang or a deep traceback."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise DataError("TF_CONFIG: not set; --strategy multiworker needs the cluster and this worker's task in it "
                        "(README, \"Multi-GPU and multi-worker training\")")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"TF_CONFIG: not valid JSON ({error})") from None
    config = config if isinstance(config, dict) else {}
    cluster, task = config.get("cluster"), config.get("task")

    def is_address_list(value):
        return isinstance(value, list) and value and all(isinstance(a, str) and ":" in a for a in value)

    if not isinstance(cluster, dict) or not cluster or not all(map(is_address_list, cluster.values())):
        raise DataError("TF_CONFIG: \"cluster\" must map task types to non-empty lists of \"host:port\" strings")
    if set(cluster) - {"chief", "worker"} or len(cluster.get("chief", [])) > 1:
        raise DataError(f"TF_CONFIG: the cluster may hold \"worker\" tasks and one \"chief\", not {sorted(cluster)}")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise DataError(f"TF_CONFIG: \"task\" must name a type of the cluster ({', '.join(cluster)}) and an index "
                        f"into its list, not {task!r}")


def make_strategy(name):
    """The tf.distribute strategy for --strategy."""
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """The chief writes the run folder: the "chief" task, else worker 0; a single process always."""
    resolver = strategy.cluster_resolver
    if resolver is None or resolver.task_type is None:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


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


def interrupted(path, epoch_var, batch_var, run_dir, chief=True):
    saved = f"saved {path}" if chief else "the chief saved its checkpoint"
    print(f"interrupted: {saved} at epoch {int(epoch_var) + 1}, batch {int(batch_var)}; "
          f"continue with --resume --ckpt-dir {run_dir}")
    return 130


def greedy_captions(greedy_fn, vocab, split, batch_size):
    captions = {}
    for start in range(0, len(split.video_ids), batch_size):
        words, _ = greedy_fn(tf.constant(split.features[start:start + batch_size], tf.float32))
        for video_id, ids in zip(split.video_ids[start:start + batch_size], words.numpy()):
            captions[video_id] = vocab.decode(ids)
    return captions


def any_worker(strategy):
    """A function flag -> bool that is True when the flag is set here or, in multi-worker training, on any worker,
    so that every worker takes the same decision (stop now, save a best checkpoint, stop early): one that went on
    alone would wait for the others forever."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return bool

    @tf.function
    def reduce_flags(flag):
        return strategy.reduce(SUM, strategy.run(tf.identity, args=(flag,)), axis=None) > 0

    return lambda flag: bool(reduce_flags(tf.constant(float(flag))))


def run_epoch(train_step, batches, teacher_forcing_prob, seed, first_step, stop, log_every, bar):
    """Train on batches until they run out or stop() says so; returns the step losses, still on the device.

    A loss is read back (which waits for the device) only for the progress bar, every log_every batches, so the
    host queues the next steps while the device works."""
    losses = []
    for frame_features, captions in batches:
        if stop():
            break
        step_seed = tf.constant([seed, first_step + len(losses)], tf.int64)
        losses.append(train_step(frame_features, captions, tf.constant(teacher_forcing_prob, tf.float32), step_seed))
        if (len(losses) - 1) % log_every == 0:
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}", teacher_forcing=f"{teacher_forcing_prob:.3f}")
        bar.update(1)
    return losses


def configure_gpus():
    """Let TensorFlow take GPU memory as it needs it rather than all of it at start-up."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def replica_slices(pairs, batch_size, replicas, skip_batches=0):
    """(starts, stops), each (batches, replicas): global batch k is pairs [k*batch_size, k*batch_size + size),
    cut into `replicas` consecutive slices whose sizes differ by at most one (a short last batch may leave a
    replica an empty slice)."""
    starts = np.arange(skip_batches * batch_size, pairs, batch_size)
    sizes = np.minimum(batch_size, pairs - starts)
    bounds = starts[:, None] + np.arange(replicas + 1) * sizes[:, None] // replicas
    return bounds[:, :-1], bounds[:, 1:]


def distributed_batches(strategy, features, video_index, caption_ids, batch_size, skip_batches=0):
    """The epoch's global batches of (frame_features, caption_ids) as a distributed dataset: each worker gathers
    only its replicas' slices, each slice cut to its own longest caption. With one replica this is
    util.data.make_dataset's batches."""

    def worker_dataset(context):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local  # this worker's replicas are first ... first + local - 1
        starts, stops = replica_slices(len(video_index), batch_size, context.num_replicas_in_sync, skip_batches)
        all_videos, all_captions = tf.constant(video_index), tf.constant(caption_ids)

        def to_tensors(start, stop):
            return batch_tensors(features, all_videos[start:stop], all_captions[start:stop])

        # batch-major, so the replicas of a worker take one global batch's slices in turn
        ranges = (starts[:, first:first + local].ravel(), stops[:, first:first + local].ravel())
        dataset = tf.data.Dataset.from_tensor_slices(ranges)
        return dataset.map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(worker_dataset)


def make_train_step(model, optimizer, strategy=None):
    """One optimisation step as a tf.function: (features, captions, teacher_forcing_prob, seed) -> the global
    batch's mean loss. bench.py times this same function on one device.

    Under a strategy of several replicas the features and captions are a distributed_batches element. Each
    replica divides its captions' summed loss by the global batch size and the replicas' gradients are summed,
    so the step equals the single-device step on the whole batch, gradient clipping included.
    """
    strategy = strategy or tf.distribute.get_strategy()
    cfg = model.config
    variables = model.trainable_variables
    replicas = strategy.num_replicas_in_sync

    def replica_step(frame_features, captions, teacher_forcing_prob, seed):
        context = tf.distribute.get_replica_context()
        if replicas > 1:  # each replica its own noise, dropout and sampling coins
            seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
        global_batch = context.all_reduce(SUM, tf.shape(captions)[0])
        with tf.GradientTape() as tape:
            logits, _, _ = model(frame_features, captions, teacher_forcing_prob=teacher_forcing_prob, seed=seed,
                                 training=True)
            loss = tf.nn.compute_average_loss(caption_losses(logits, captions), global_batch_size=global_batch)
        gradients = tape.gradient(loss, variables)
        if replicas > 1:
            # Keras would clip each replica's part before summing the parts: sum and clip here, as on one device
            # (a second all-reduce), and hand it equal shares, each within the clip norm, to sum back
            gradients = context.all_reduce(SUM, gradients)
            if optimizer.global_clipnorm:
                gradients, _ = tf.clip_by_global_norm(gradients, optimizer.global_clipnorm)
            gradients = [g / replicas for g in gradients]
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    # a batch as distributed_batches yields it (one tensor per replica with several), taken from an empty epoch
    batch_spec = distributed_batches(strategy, np.zeros((0, cfg.frames, cfg.feature_dim), np.float32),
                                     np.zeros(0, np.int32), np.zeros((0, 1), np.int32), 1).element_spec

    @tf.function(input_signature=[*batch_spec, tf.TensorSpec([], tf.float32), tf.TensorSpec([2], tf.int64)])
    def train_step(frame_features, captions, teacher_forcing_prob, seed):
        losses = strategy.run(replica_step, args=(frame_features, captions, teacher_forcing_prob, seed))
        return strategy.reduce(SUM, losses, axis=None)

    return train_step


def train(args):
    run_dir = Path(args.ckpt_dir)
    configure_gpus()
    strategy = make_strategy(args.strategy)  # first: MultiWorkerMirroredStrategy must precede any other TF work
    chief = is_chief(strategy)
    agree = any_worker(strategy)
    # the other workers write their checkpoints into a folder removed when train() returns, and no logs
    scratch = None if chief else tempfile.TemporaryDirectory(prefix="s2vt-worker-")
    out_dir = run_dir if chief else Path(scratch.name)

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
        print(f"validation: {len(validation_ids)} videos ({val_source}); training: {len(train_split.video_ids)}")

    # ---- model ----
    config = S2VTConfig(vocab_size=len(vocab), feature_dim=feature_dim, frames=args.frames, hidden=args.hidden,
                        frame_embed=args.hidden, word_embed=args.hidden, attention=args.attention,
                        attention_dim=args.hidden, max_caption_len=args.max_caption_len, dropout=args.dropout,
                        feature_noise=args.feature_noise, matmul_dtype=args.matmul_dtype)
    keras.utils.set_random_seed(args.seed)  # same seed, same initial weights: runs are reproducible
    with strategy.scope():  # one copy of every weight and optimizer slot per replica
        model = S2VT(config)
        model.adapt_features(train_split.features)  # a resumed run restores the same values from its checkpoint
        optimizer = keras.optimizers.Adam(args.learning_rate, global_clipnorm=args.clip_norm)
        optimizer.build(model.trainable_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, name="epoch")  # epochs finished
    batch_var = tf.Variable(0, dtype=tf.int64, name="batch_in_epoch")  # batches done in the unfinished epoch
    best_var = tf.Variable(-np.inf, dtype=tf.float64, name="best_score")  # of --select-metric
    best_epoch_var = tf.Variable(0, dtype=tf.int64, name="best_epoch")  # for --patience
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var, batch_in_epoch=batch_var,
                                     best_score=best_var, best_epoch=best_epoch_var)
    last_manager = tf.train.CheckpointManager(checkpoint, str(out_dir / "last"), max_to_keep=3)
    best_manager = tf.train.CheckpointManager(checkpoint, str(out_dir / "best"), max_to_keep=1)
    if args.resume:  # every worker restores the chief's checkpoint
        latest = tf.train.latest_checkpoint(str(run_dir / "last"))
        if not latest:
            raise DataError(f"{run_dir / 'last'}: no checkpoint to resume from")
        restore(checkpoint, latest)
        print(f"resumed {latest}: epoch {int(epoch_var) + 1}, batch {int(batch_var)}, "
              f"step {int(optimizer.iterations.numpy())}")
    else:
        write_run_files(out_dir, config, vars(args), vocab, manifest)
        write_text_atomic(out_dir / "val_ids.txt", "".join(f"{video_id}\n" for video_id in validation_ids))

    signature = [tf.TensorSpec([None, args.frames, feature_dim], tf.float32), tf.TensorSpec([None, None], tf.int32)]
    train_step = make_train_step(model, optimizer, strategy)

    @tf.function(input_signature=signature)
    def eval_loss(frame_features, captions):
        return caption_loss(model(frame_features, captions)[0], captions)

    greedy = tf.function(model.greedy, input_signature=signature[:1])

    # ---- loop ----
    if val_split is not None:
        val_videos, val_captions = encode_captions(val_split.labels, vocab, args.max_caption_len)
    probs = teacher_forcing_schedule(args.epochs, args.schedule, args.teacher_forcing_start, args.teacher_forcing_end)
    writer = tf.summary.create_file_writer(str(out_dir / "tensorboard")) if chief else None
    history_path = out_dir / "history.csv"
    history = pd.read_csv(history_path).to_dict("records") if args.resume and history_path.is_file() else []
    metric_name = VALIDATION_METRICS[f"val_{args.select_metric}"]
    step = int(optimizer.iterations.numpy())  # counted here from now on: reading it every step waits for the device
    started = time.perf_counter()
    with ctrl_c_stops_between_batches() as stop:
        for epoch in range(int(epoch_var), args.epochs):
            p = float(probs[epoch])
            epoch_videos, epoch_captions = epoch_pairs(video_index, caption_ids, args.pairs, args.seed, epoch)
            batches_per_epoch = -(-len(epoch_videos) // args.batch_size)
            skip = int(batch_var)
            dataset = distributed_batches(strategy, train_split.features, epoch_videos, epoch_captions,
                                          args.batch_size, skip)
            with tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                      leave=False) as bar:
                losses = run_epoch(train_step, dataset, p, args.seed, step, lambda: agree(stop.is_set()),
                                   args.log_every, bar)
            step += len(losses)
            batch_var.assign(skip + len(losses))
            if skip + len(losses) < batches_per_epoch:  # stopped
                return interrupted(last_manager.save(), epoch_var, batch_var, run_dir, chief)

            row = {"epoch": epoch + 1, "teacher_forcing_prob": p,
                   "train_loss": float(np.mean([float(loss) for loss in losses])) if losses else None}
            if val_split is not None:
                val_losses = [float(eval_loss(f, c)) for f, c in
                              make_dataset(val_split.features, val_videos, val_captions, args.batch_size)]
                captions = greedy_captions(greedy, vocab, val_split, args.batch_size)
                scores = evaluate(captions, val_split.references, use_java=False)  # no Java start-up every epoch
                row.update(val_loss=float(np.mean(val_losses)), val_bleu1=scores["mlds_bleu1"],
                           val_bleu4=scores["bleu4"], val_cider=scores["cider"],
                           example=f"{val_split.video_ids[0]}: {captions[val_split.video_ids[0]]}")
            history.append(row)
            if chief:
                with writer.as_default(step=epoch + 1):
                    for key, value in row.items():
                        if isinstance(value, float):
                            tf.summary.scalar(key, value)
                with atomic_path(history_path) as tmp:
                    pd.DataFrame(history).to_csv(tmp, index=False)
                plot_training_curves(history_path, out_dir / "curves.png", args.select_metric)

            epoch_var.assign(epoch + 1)
            batch_var.assign(0)
            score = row[f"val_{args.select_metric}"] if val_split is not None else -float(row["train_loss"] or 0)
            improved = agree(chief and score > float(best_var))  # the chief's validation decides for every worker
            if improved:
                best_var.assign(score if chief else np.nan)
                best_epoch_var.assign(epoch + 1)
            last_manager.save()
            if improved:
                best_manager.save()
            print(f"epoch {epoch + 1}/{args.epochs}  loss {row['train_loss']:.4f}  teacher_forcing {p:.3f}"
                  + (f"  val_loss {row['val_loss']:.4f}  BLEU@1 {row['val_bleu1']:.4f}  BLEU-4 {row['val_bleu4']:.4f}"
                     f"  CIDEr {row['val_cider']:.4f}" if val_split else "")
                  + (f"  *best {metric_name}*" if improved else ""), flush=True)
            if val_split is not None:
                print(f"  {row['example']}", flush=True)
            if args.patience and agree(chief and epoch + 1 - int(best_epoch_var) >= args.patience):
                print(f"early stop: validation {metric_name} has not improved for {args.patience} epochs since "
                      f"epoch {int(best_epoch_var)}", flush=True)
                break
            if agree(stop.is_set()) and epoch + 1 < args.epochs:  # Ctrl-C in the last batch, validation or saving
                return interrupted(last_manager.latest_checkpoint, epoch_var, batch_var, run_dir, chief)

    elapsed = time.perf_counter() - started
    best = (f"best validation {metric_name} {float(best_var):.4f} at epoch {int(best_epoch_var)}"
            if val_split is not None else "no validation")
    print(f"trained {int(epoch_var)} epochs ({elapsed:.0f} s this session); {best}; run folder {run_dir}")
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
