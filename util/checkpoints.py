"""Run folders and their checkpoints.

    checkpoints/<run>/config.json   model config, training flags, feature manifest
    checkpoints/<run>/vocab.json    the vocabulary, ids in order
    checkpoints/<run>/last/         tf.train.CheckpointManager, the newest 3 (weights, optimizer, epoch, step)
    checkpoints/<run>/best/         the best by the validation metric

Checkpoints are TensorFlow checkpoints: loading one restores tensors and runs no code.
"""
import json
from pathlib import Path

import tensorflow as tf

from model import S2VT, S2VTConfig
from util.atomic import write_text_atomic
from util.data import DataError, read_json
from util.vocab import Vocabulary

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"


def write_run_files(run_dir, model_config, train_args, vocab, feature_manifest):
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{run_dir}: cannot create the run folder ({error.strerror})") from None
    config = {"model": model_config.to_dict(), "train": train_args, "features": feature_manifest}
    write_text_atomic(run_dir / "config.json", json.dumps(config, indent=1, default=str))
    vocab.save(run_dir / "vocab.json")


def read_run_config(run_dir):
    path = Path(run_dir) / "config.json"
    return read_json(path, "no config.json; not a run folder made by train.py")


def newest_run(root=DEFAULT_ROOT):
    """The run folder under root whose config.json was written last."""
    runs = sorted((p for p in Path(root).glob("*/config.json") if not (p.parent / "SOURCE.json").is_file()),
                  key=lambda p: p.stat().st_mtime)  # fetched releases are used only when named
    if not runs:
        raise DataError(f"{root}: no trained run found (train one with train.py, or give --checkpoint)")
    return runs[-1].parent


def resolve_checkpoint(path=None):
    """(run_dir, checkpoint prefix) for a run folder, a best/ or last/ folder, or a checkpoint prefix.

    A run folder gives its best checkpoint, else its newest; no path gives the newest run's."""
    path = Path(path) if path else newest_run()
    if path.is_dir():
        for run_dir, folders in ((path, ("best", "last")), (path.parent, (path.name,))):
            if (run_dir / "config.json").is_file():
                for folder in folders:
                    prefix = tf.train.latest_checkpoint(str(run_dir / folder))
                    if prefix:
                        return run_dir, prefix
                raise DataError(f"{path}: holds no checkpoint")
        raise DataError(f"{path}: not a run folder (no config.json)")
    if Path(f"{path}.index").is_file():
        return path.parent.parent, str(path)
    raise DataError(f"{path}: no such checkpoint or run folder")


def load_vocab(run_dir):
    """The run's vocab.json, checked to be a word list starting with the special tokens."""
    path = Path(run_dir) / "vocab.json"
    if not path.is_file():
        raise DataError(f"{path}: vocabulary missing beside the checkpoint")
    try:
        return Vocabulary.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a vocabulary written by train.py ({error})") from None


def load_model(path=None, matmul_dtype=None):
    """Restore a trained model for inference: (model, vocab, run config, checkpoint prefix).
    matmul_dtype, if given, replaces the precision the model was trained with (the weights are the same)."""
    run_dir, prefix = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    vocab = load_vocab(run_dir)
    try:
        settings = dict(config["model"])
        if matmul_dtype:
            settings["matmul_dtype"] = matmul_dtype
        model_config = S2VTConfig(**settings)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{run_dir / 'config.json'}: no valid \"model\" section ({error})") from None
    if model_config.vocab_size != len(vocab):
        raise DataError(f"{run_dir / 'vocab.json'}: {len(vocab)} words, but the model was built for "
                        f"{model_config.vocab_size}")
    model = S2VT(model_config)
    restore(tf.train.Checkpoint(model=model), prefix, partial=True)
    return model, vocab, config, prefix


def restore(checkpoint, prefix, partial=False):
    """Restore, turning a corrupt or mismatched checkpoint into a one-line DataError."""
    try:
        status = checkpoint.restore(prefix)
        if partial:
            status.expect_partial()
        status.assert_existing_objects_matched()
    except (tf.errors.OpError, IndexError) as error:  # IndexError: a truncated .data file
        raise DataError(f"{prefix}: checkpoint files are missing, truncated or corrupt ({_summary(error)})") from None
    except (ValueError, AssertionError) as error:
        raise DataError(f"{prefix}: checkpoint cannot be restored into this model ({_summary(error)})") from None
    return status


def _summary(error):
    """The first line of a TensorFlow error, without the variable values it may print."""
    text = str(error).strip()
    return text.splitlines()[0].split(", value=")[0] if text else type(error).__name__
