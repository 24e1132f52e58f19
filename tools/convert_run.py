"""Convert a run saved by the TensorFlow-only s2vt (tf.train checkpoints in best/ and last/) into this format.

    python -m tools.convert_run OLD_RUN [NEW_RUN]     (TensorFlow backend; NEW_RUN default: OLD_RUN-converted)

The new run holds the old one's config.json, vocab.json, history.csv and curves.png, and its best checkpoint's
weights in best/ (inference weights: the optimizer state is not carried over). tf.train matches the weights by the
model's attribute names (lstm1, lstm2, kernel_0, ...), which are those of the old model.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from model import ModelConfig, build_model
from util.checkpoints import read_run_config, save_checkpoint
from util.errors import DataError, command


def model_config_of(run_dir, config):
    try:
        return ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{Path(run_dir) / 'config.json'}: no valid \"model\" section ({error})") from None


def _summary(error):
    """The first line of an error, without the values it may print."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def convert_tensorflow_run(old_run, new_run):
    """Copy a run whose best/ and last/ hold tf.train checkpoints into new_run in this format: config, vocabulary,
    history and the best checkpoint's weights (inference weights: the optimizer state is not carried over)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise DataError(f"{old_run}: converting TensorFlow checkpoints needs KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    old_run, new_run = Path(old_run), Path(new_run)
    config = read_run_config(old_run)
    prefix = tf.train.latest_checkpoint(str(old_run / "best")) or tf.train.latest_checkpoint(str(old_run / "last"))
    if not prefix:
        raise DataError(f"{old_run}: holds no TensorFlow checkpoint (best/checkpoint or last/checkpoint)")
    if new_run.exists():
        raise DataError(f"{new_run}: already exists; choose another folder")
    model = build_model(model_config_of(old_run, config))
    try:  # the model's attribute names are those of the old one, so tf.train matches them
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial().assert_existing_objects_matched()
        saved = dict(tf.train.list_variables(prefix))
        epoch_key = "epoch/.ATTRIBUTES/VARIABLE_VALUE"  # old train.py saved it; a checkpoint of weights alone has none
        epoch = int(tf.train.load_variable(prefix, epoch_key)) if epoch_key in saved else None
    except (tf.errors.OpError, ValueError, AssertionError) as error:
        raise DataError(f"{prefix}: cannot be read into an S2VT of its config ({_summary(error)})") from None
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{new_run.name}.", dir=new_run.parent))
    except OSError as error:
        raise DataError(f"{new_run}: cannot create the run folder ({error.strerror or error})") from None
    try:
        for name in ("config.json", "vocab.json", "history.csv", "curves.png"):
            if (old_run / name).is_file():
                shutil.copy2(old_run / name, work / name)
        save_checkpoint(work / "best", 0, model, {"epoch": epoch, "converted_from": prefix})
        os.rename(work, new_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return new_run


@command
def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.convert_run", description=__doc__.splitlines()[0])
    parser.add_argument("old_run")
    parser.add_argument("new_run", nargs="?", help="default: OLD_RUN-converted beside it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    new_run = convert_tensorflow_run(args.old_run, args.new_run or f"{Path(args.old_run)}-converted")
    print(f"converted {args.old_run} -> {new_run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
