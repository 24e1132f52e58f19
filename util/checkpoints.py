"""Run folders and their checkpoints, one format for every backend.

    checkpoints/<run>/config.json         model config, training flags, feature manifest, labels' sha256
    checkpoints/<run>/vocab.json          the vocabulary, ids in order
    checkpoints/<run>/last/step-<N>/      the newest 3: model.weights.h5, optimizer.h5, state.json
    checkpoints/<run>/best/step-<N>/      the best by the validation metric: model.weights.h5, state.json

model.weights.h5 is Keras's weights file and optimizer.h5 the optimizer's variables (HDF5 arrays); state.json holds
the epoch, the batch within it, the step and the best score. Loading reads arrays and JSON: it runs no code and
unpickles nothing. A checkpoint is written into a hidden folder, flushed to disk and renamed into place whole, and
one replaced or deleted is first renamed aside, so a crash never leaves half of one, nor a folder without one. A run
trained on TensorFlow loads on JAX and the other way round. model.load_model builds a run's model from the
checkpoint util.releases.resolve_checkpoint chooses; `python -m tools.convert_run` converts runs of the
TensorFlow-only s2vt.
This module imports nothing from the pipeline's scripts.
"""
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from util.atomic import fsync, fsync_tree, write_text_atomic
from util.data import read_json
from util.errors import DataError
from util.vocab import Vocabulary

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.weights.h5", "optimizer.h5", "state.json"
_STEP = re.compile(r"step-(\d+)")
ASIDE = ".aside"  # .step-N.aside: a checkpoint renamed out of the way before it is replaced or deleted
_ASIDE = re.compile(r"\.step-(\d+)\.aside")


def write_run_files(run_dir, model_config, train_args, vocab, feature_manifest, decoding=None, labels_sha256=None):
    """config.json (the model, the training flags, the features' manifest, for decoding the words that cannot end a
    caption, and the sha256 of each labels file trained on) and vocab.json."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{run_dir}: cannot create the run folder ({error.strerror})") from None
    config = {"model": model_config.to_dict(), "train": train_args, "features": feature_manifest,
              **({"decoding": decoding} if decoding is not None else {}),
              **({"labels_sha256": labels_sha256} if labels_sha256 is not None else {})}
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
    then remove all but the newest `keep` checkpoints there. Returns its path.

    A checkpoint is never removed or replaced in place: it is renamed aside (.step-N.aside) first, then the new one
    renamed in, then the aside one deleted, so a process killed at any point leaves a complete checkpoint (the aside
    one, which checkpoints_in finds, if the new one never arrived)."""
    folder = Path(folder)
    target = folder / f"step-{step:08d}"
    try:
        _settle(folder)
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=folder))
    except OSError as error:
        raise DataError(f"{folder}: cannot write a checkpoint ({error.strerror or error})") from None
    aside = _aside(target)
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
        fsync_tree(work)  # the files first: a rename is only as durable as what it renames
        if target.exists():  # the same step saved again (a second save of a finished epoch): replace it
            os.rename(target, aside)
        os.rename(work, target)
        fsync(folder)
        for old in checkpoints_in(folder)[:-keep]:
            _remove(old)
        _remove(aside)
    except OSError as error:
        raise DataError(f"{target}: cannot write the checkpoint ({error.strerror or error})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _aside(checkpoint):
    return checkpoint.with_name(f".{checkpoint.name}{ASIDE}")


def _remove(checkpoint):
    """Delete a checkpoint, renamed aside first so that a half-deleted one never looks like a checkpoint."""
    if not checkpoint.name.endswith(ASIDE) and checkpoint.exists():
        os.rename(checkpoint, _aside(checkpoint))
        checkpoint = _aside(checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)


def _settle(folder):
    """Finish what a process killed while saving into folder left (one writer per folder): an aside checkpoint
    that nothing newer replaced is renamed back, other aside ones are deleted, and so are unfinished .partial
    folders, but only once a complete checkpoint is there (one may hold the only copy, from an older s2vt)."""
    if not folder.is_dir():
        return
    for aside in folder.glob(f".step-*{ASIDE}"):
        if aside in checkpoints_in(folder):
            os.rename(aside, folder / checkpoint_name(aside))
        else:
            shutil.rmtree(aside, ignore_errors=True)
    if checkpoints_in(folder):
        for stale in folder.glob(".step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)


def checkpoints_in(folder):
    """The complete checkpoints in folder, oldest first: its step-N folders, then a .step-N.aside one newer than all
    of them (a process killed while replacing step-N moved the old one aside and never renamed the new one in)."""
    folder = Path(folder)
    found = sorted((int(match.group(1)), p) for p in folder.glob("step-*")
                   if (match := _STEP.fullmatch(p.name)) and (p / STATE_FILE).is_file())
    newest = found[-1][0] if found else -1
    asides = sorted((int(match.group(1)), p) for p in folder.glob(f".step-*{ASIDE}")
                    if (match := _ASIDE.fullmatch(p.name)) and int(match.group(1)) > newest
                    and (p / STATE_FILE).is_file())
    return [p for _, p in found + asides[-1:]]


def checkpoint_name(checkpoint):
    """step-N, also for a checkpoint found aside (.step-N.aside)."""
    name = Path(checkpoint).name
    return name[1:].removesuffix(ASIDE) if name.endswith(ASIDE) else name


def latest_checkpoint(folder):
    found = checkpoints_in(folder) if Path(folder).is_dir() else []
    return found[-1] if found else None


def read_state(checkpoint):
    state = read_json(Path(checkpoint) / STATE_FILE, "no state.json; not a checkpoint made by train.py")
    if not isinstance(state, dict):
        raise DataError(f"{Path(checkpoint) / STATE_FILE}: expected a JSON object")
    return state


def load_vocab(run_dir):
    """The run's vocab.json, checked to be a word list starting with the special tokens."""
    path = Path(run_dir) / "vocab.json"
    if not path.is_file():
        raise DataError(f"{path}: vocabulary missing beside the checkpoint")
    try:
        return Vocabulary.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a vocabulary written by train.py ({error})") from None


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
