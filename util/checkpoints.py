"""Run folders and their checkpoints, one format for every backend.

    checkpoints/<run>/config.json         model config, training flags, feature manifest
    checkpoints/<run>/vocab.json          the vocabulary, ids in order
    checkpoints/<run>/last/step-<N>/      the newest 3: model.weights.h5, optimizer.h5, state.json
    checkpoints/<run>/best/step-<N>/      the best by the validation metric: model.weights.h5, state.json

model.weights.h5 is Keras's weights file and optimizer.h5 the optimizer's variables (HDF5 arrays); state.json holds
the epoch, the batch within it, the step and the best score. Loading reads arrays and JSON: it runs no code and
unpickles nothing. A checkpoint is written into a hidden folder and renamed into place whole, so a crash never
leaves half of one. A run trained on TensorFlow loads on JAX and the other way round.

    python -m util.checkpoints convert OLD_RUN [NEW_RUN]   runs saved as TensorFlow checkpoints (s2vt before the
                                                            backend-neutral format) -> this format, for inference
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from model import S2VT, ModelConfig, build_model
from util.atomic import write_text_atomic
from util.data import read_json
from util.errors import DataError
from util.vocab import Vocabulary

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.weights.h5", "optimizer.h5", "state.json"
_STEP = re.compile(r"step-(\d+)")


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


# ---- writing and finding checkpoints ----

def save_checkpoint(folder, step, model, state, optimizer=None, keep=3):
    """Write folder/step-<step> (the model's weights, the optimizer's variables if given, state as JSON) whole,
    then remove all but the newest `keep` checkpoints there. Returns its path."""
    folder = Path(folder)
    target = folder / f"step-{step:08d}"
    for stale in folder.glob(".step-*.partial"):  # left by a process killed while saving (one writer per folder)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=folder))
    except OSError as error:
        raise DataError(f"{folder}: cannot write a checkpoint ({error.strerror or error})") from None
    try:
        model.save_weights(work / MODEL_FILE)
        if optimizer is not None:
            import h5py

            store = {}
            optimizer.save_own_variables(store)
            with h5py.File(work / OPTIMIZER_FILE, "w") as file:
                for name, value in store.items():
                    file[name] = value
        (work / STATE_FILE).write_text(json.dumps(state, indent=1))
        if target.exists():  # the same step saved again (a second save of a finished epoch): replace it
            shutil.rmtree(target)
        work.rename(target)
    except OSError as error:
        raise DataError(f"{target}: cannot write the checkpoint ({error.strerror or error})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in checkpoints_in(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints_in(folder):
    """The complete checkpoints in folder, oldest first."""
    found = [p for p in Path(folder).glob("step-*") if _STEP.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP.fullmatch(p.name).group(1)))


def latest_checkpoint(folder):
    found = checkpoints_in(folder) if Path(folder).is_dir() else []
    return found[-1] if found else None


def read_state(checkpoint):
    state = read_json(Path(checkpoint) / STATE_FILE, "no state.json; not a checkpoint made by train.py")
    if not isinstance(state, dict):
        raise DataError(f"{Path(checkpoint) / STATE_FILE}: expected a JSON object")
    return state


def _is_tensorflow_run(run_dir):
    return any((Path(run_dir) / folder / "checkpoint").is_file() for folder in ("best", "last"))


def resolve_checkpoint(path=None):
    """(run_dir, checkpoint folder) for a run folder, a best/ or last/ folder, or a checkpoint folder.

    A run folder gives its best checkpoint, else its newest; no path gives the newest run's."""
    path = Path(path) if path else newest_run()
    if not path.is_dir():
        raise DataError(f"{path}: no such checkpoint or run folder")
    for run_dir, folders in ((path, ("best", "last")), (path.parent, (path.name,))):
        if (run_dir / "config.json").is_file():
            for folder in folders:
                found = latest_checkpoint(run_dir / folder)
                if found:
                    return run_dir, found
            if _is_tensorflow_run(run_dir):
                raise DataError(f"{run_dir}: holds TensorFlow checkpoints of an older s2vt; convert it with "
                                f"`python -m util.checkpoints convert {run_dir}` (needs TensorFlow)")
            raise DataError(f"{path}: holds no checkpoint")
    if (path / STATE_FILE).is_file() and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, path
    raise DataError(f"{path}: not a run folder (no config.json)")


def load_vocab(run_dir):
    """The run's vocab.json, checked to be a word list starting with the special tokens."""
    path = Path(run_dir) / "vocab.json"
    if not path.is_file():
        raise DataError(f"{path}: vocabulary missing beside the checkpoint")
    try:
        return Vocabulary.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a vocabulary written by train.py ({error})") from None


def model_config_of(run_dir, config, matmul_dtype=None):
    """The ModelConfig in a run's config.json (one written before the model and encoder fields existed is an S2VT with
    a unidirectional encoder); matmul_dtype, if given, replaces the precision it was trained with."""
    try:
        settings = dict(config["model"])
        if matmul_dtype:
            settings["matmul_dtype"] = matmul_dtype
        return ModelConfig.from_dict(settings)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{Path(run_dir) / 'config.json'}: no valid \"model\" section ({error})") from None


def load_model(path=None, matmul_dtype=None):
    """Restore a trained model for inference: (model, vocab, run config, checkpoint folder).
    matmul_dtype, if given, replaces the precision the model was trained with (the weights are the same)."""
    run_dir, checkpoint = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    vocab = load_vocab(run_dir)
    model_config = model_config_of(run_dir, config, matmul_dtype)
    if model_config.vocab_size != len(vocab):
        raise DataError(f"{run_dir / 'vocab.json'}: {len(vocab)} words, but the model was built for "
                        f"{model_config.vocab_size}")
    model = build_model(model_config)
    restore(checkpoint, model)
    return model, vocab, config, checkpoint


def restore(checkpoint, model, optimizer=None):
    """Load a checkpoint's weights (and optimizer state) into the model; returns its state.json. A missing,
    truncated or mismatched file is a one-line DataError."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    weights = checkpoint / MODEL_FILE
    if not weights.is_file():
        raise DataError(f"{weights}: checkpoint file missing")
    try:
        saved = _array_shapes(weights)
    except OSError as error:  # h5py: not an HDF5 file, truncated
        raise DataError(f"{weights}: checkpoint file is truncated or corrupt ({_summary(error)})") from None
    wanted = sorted(tuple(w.shape) for w in model.weights)
    if sorted(saved) != wanted:
        extra, missing = _difference(saved, wanted), _difference(wanted, saved)
        raise DataError(f"{weights}: cannot be restored into this model: {len(saved)} weights saved, {len(wanted)} "
                        f"built from config.json" + (f"; saved but not built: {extra}" if extra else "")
                        + (f"; built but not saved: {missing}" if missing else ""))
    try:
        model.load_weights(weights)
    except OSError as error:
        raise DataError(f"{weights}: checkpoint file is truncated or corrupt ({_summary(error)})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{weights}: cannot be restored into this model ({_summary(error)})") from None
    if optimizer is not None:
        _restore_optimizer(checkpoint / OPTIMIZER_FILE, optimizer)
    return state


def _array_shapes(path):
    """The shapes of every array in an HDF5 file."""
    import h5py

    shapes = []
    with h5py.File(path, "r") as file:
        file.visititems(lambda name, item: shapes.append(tuple(item.shape)) if isinstance(item, h5py.Dataset) else None)
    return sorted(shapes)


def _difference(shapes, others):
    """The shapes in `shapes` beyond those in `others` (a multiset difference), as text: "(600, 2400) x2, ..."."""
    from collections import Counter

    left = Counter(shapes) - Counter(others)
    return ", ".join(f"{shape}" + (f" x{n}" if n > 1 else "") for shape, n in sorted(left.items())[:4]) \
        + (", ..." if len(left) > 4 else "")


def _restore_optimizer(path, optimizer):
    import h5py

    try:
        with h5py.File(path, "r") as file:
            store = {name: file[name][()] for name in file}
    except OSError as error:
        raise DataError(f"{path}: optimizer state missing, truncated or corrupt ({_summary(error)})") from None
    shapes = [tuple(v.shape) for v in optimizer.variables]
    if sorted(store, key=int) != [str(i) for i in range(len(shapes))] or \
            [store[str(i)].shape for i in range(len(shapes))] != shapes:
        raise DataError(f"{path}: optimizer state does not fit this model ({len(store)} arrays for "
                        f"{len(shapes)} variables)")
    optimizer.load_own_variables(store)


def _summary(error):
    """The first line of an error, without the values it may print."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ---- converting runs saved by the TensorFlow-only s2vt ----

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
    model = S2VT(model_config_of(old_run, config))
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m util.checkpoints", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="a run of TensorFlow checkpoints -> this format")
    convert.add_argument("old_run")
    convert.add_argument("new_run", nargs="?", help="default: OLD_RUN-converted beside it")
    convert.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        new_run = convert_tensorflow_run(args.old_run, args.new_run or f"{Path(args.old_run)}-converted")
    except DataError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.old_run} -> {new_run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
