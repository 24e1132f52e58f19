"""A training run's folder through its life: claimed by one process, checked before --resume, its earlier run moved
aside by --overwrite, then written epoch by epoch (RunFolder). util/checkpoints.py lists the files.

    <run>/.lock   while a train.py works in the folder: held by it (flock), naming its pid and host

The claim comes before anything is read or written, and lasts the process's life: a second run, or a second
--resume, into a folder in use is refused in one line naming the process that holds it. The kernel releases the lock
when its process dies, kill -9 included, so a lock file left behind blocks nothing. Only the chief of a multi-worker
run claims and writes the folder; the other workers read it (--resume) and write nothing. This module imports
nothing from the pipeline's scripts and no Keras backend.
"""
import fcntl
import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from util.atomic import atomic_path, write_text_atomic
from util.checkpoints import (DEFAULT_ROOT, latest_checkpoint, newest_run, read_run_config, read_state, save_checkpoint,
                              write_run_files)
from util.errors import DataError
from util.plots import plot_training_curves

RUN_FILES = ("config.json", "last", "best", "history.csv")  # any of them: the folder holds a run
# curves.png is drawn once this many seconds have passed since the session began or last drew it (and at its final
# epoch): a drawing takes about a quarter of a CPU second, which a plot per epoch spent over and over in short epochs
CURVES_EVERY_S = 30
LOCK_FILE = ".lock"


def add_run_folder_flags(parser):
    parser.add_argument("--run", help="run name (default: a timestamp and a random suffix); checkpoints go to "
                                       "checkpoints/<run>")
    parser.add_argument("--ckpt-dir", help="run folder (default checkpoints/<run>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --ckpt-dir (default: newest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder that holds a run, moving that run aside first (to "
                             "FOLDER.replaced-<time> beside it; nothing is deleted)")


def run_folder_of(args, parser):
    """The run folder the flags name: --ckpt-dir, else checkpoints/<--run>, else with --resume the newest run, else
    checkpoints/<a new default_name()>. --resume with --overwrite is a usage error (parser.error)."""
    if args.resume and args.overwrite:
        parser.error("give --resume (continue the run) or --overwrite (move it aside), not both")
    if args.ckpt_dir:
        return Path(args.ckpt_dir)
    if args.resume and not args.run:
        return newest_run()
    return DEFAULT_ROOT / (args.run or default_name())


def default_name():
    """A new run's name: the time to the second, readable and sorting in order, then 6 random hex digits, so that
    runs started in the same second (a sweep) get folders of their own."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def holds_run(folder):
    return any((Path(folder) / name).exists() for name in RUN_FILES)


# ---- the claim ----

class Claim:
    """This process's hold on a run folder: an exclusive flock on FOLDER/.lock, which names the holder. Folders it
    had to create are removed again at release() if they are still empty (a run refused on its data leaves none)."""

    def __init__(self, path):
        self.path = Path(path)
        self.made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"{self.path}: cannot create the run folder ({error.strerror or error})") from None
        try:
            self.fd = lock(self.path)
        except DataError:
            self.remove_made()
            raise

    def move_aside(self):
        """Rename the folder, this process's lock inside it, to a new sibling FOLDER.replaced-<time>[-N], claim a new
        empty folder in its place, then let go of the old one; returns where the earlier run went."""
        target, held = rename_aside(self.path), self.fd
        self.fd = None
        try:
            try:
                self.path.mkdir()
            except OSError as error:  # another process took the name meanwhile
                raise DataError(f"{self.path}: cannot claim the folder after moving its earlier run to {target} "
                                f"({error.strerror or error})") from None
            self.fd = lock(self.path)
        finally:
            unlock(target, held)
        return target

    def release(self):
        if self.fd is not None:
            unlock(self.path, self.fd)
            self.fd = None
        self.remove_made()

    def remove_made(self):
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run's files, or another process's lock
                break


def lock(folder):
    """Take FOLDER/.lock for this process and write its pid and host there; returns the file's descriptor. Refused
    in one line naming the holder when another process has it."""
    path = Path(folder) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise DataError(f"{path}: cannot create the run folder's lock ({error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if same_file(fd, path):
                holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n"
                os.pwrite(fd, holder, 0)
                os.ftruncate(fd, len(holder))
                return fd
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise DataError(f"{folder}: in use by {holder}; wait for it to end, or give another --ckpt-dir") from None
        except OSError as error:
            os.close(fd)
            raise DataError(f"{path}: cannot lock the run folder ({error.strerror or error})") from None
        os.close(fd)  # its holder removed it on release, after this process opened it: lock the one there now


def same_file(fd, path):
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def lock_holder(fd):
    """The process that holds a lock file, as it wrote itself there: "process PID on HOST (since TIME)"."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # it has not written itself yet
        return "another process"


def unlock(folder, fd):
    """Remove FOLDER/.lock, then let go of it: removed while still held, so no other process holds that file then."""
    try:
        os.unlink(Path(folder) / LOCK_FILE)
    except OSError:
        pass
    os.close(fd)


@contextmanager
def claimed(path, chief=True, agree=bool, resume=False, overwrite=False):
    """Claim the run folder for this process (the chief alone; its outcome decides for every worker) and yield the
    Claim (None on the other workers), released on the way out. Refused in one line when another process holds the
    folder or, unless --resume or --overwrite, when it holds a run already."""
    claim = failure = None
    if chief:
        try:
            claim = Claim(path)
        except DataError as error:
            failure = error
    try:
        if agree(failure is not None):
            raise failure or DataError("the chief's run folder: the chief cannot claim it (see its error)")
        if agree(chief and not resume and not overwrite and holds_run(path)):
            where = path if chief else "the chief's run folder"
            raise DataError(f"{where}: holds a run already; continue it with --resume, or pass --overwrite to move "
                            f"it aside")
        yield claim
    finally:
        if claim is not None:
            claim.release()


def rename_aside(run_dir):
    """Rename the run folder to a new sibling, FOLDER.replaced-<time>[-N]; returns where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}" + (f"-{n}" if n else ""))
        if not target.exists():
            break
    try:
        os.rename(run_dir, target)
    except OSError as error:
        raise DataError(f"{run_dir}: cannot move the earlier run aside ({error.strerror or error})") from None
    return target


# ---- what a run is trained on, and --resume's check of it ----

@dataclass
class TrainedOn:
    """The data a run is trained on, as config.json and val_ids.txt record it and --resume compares it."""
    labels: dict  # {labels file: its sha256}: training_label.json, and validation_label.json when read
    feat_dir: Path
    manifest: Optional[dict]  # feat_dir's manifest.json: the extractor and its settings
    validation_ids: list

    def labels_sha256(self):
        """config.json's "labels_sha256": {file name: sha256}."""
        return {Path(path).name: digest for path, digest in self.labels.items()}


def check_resumable(run_dir, settings, trained_on):
    """Refuse, before anything is written, to resume a run with other training settings, validation videos,
    features or labels. settings: {name: (the value asked, how a run older than the setting was trained)}; a setting
    saved without a value was trained as config.json's "model" section, or else that, says. A run older than the
    labels' record resumes on any labels."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    saved_train, saved_model = config.get("train", {}), config.get("model") or {}
    saved = {name: saved_train.get(name, saved_model.get(name, older)) for name, (_, older) in settings.items()}
    changed = [f"--{name.replace('_', '-')}: {saved[name]} saved, {asked} asked"
               for name, (asked, _) in settings.items() if saved[name] != asked]
    saved_ids = (run_dir / "val_ids.txt").read_text().split() if (run_dir / "val_ids.txt").is_file() else None
    if saved_ids is not None and saved_ids != trained_on.validation_ids:
        changed.append(f"validation videos: {len(saved_ids)} in {run_dir / 'val_ids.txt'}, "
                       f"{len(trained_on.validation_ids)} others now")
    if changed:
        raise DataError(f"{run_dir}: cannot resume with changed training settings ({'; '.join(changed)})")
    if trained_on.manifest != config.get("features"):
        raise DataError(f"{trained_on.feat_dir}: features differ from those the run was trained on")
    recorded = config.get("labels_sha256") or {}
    for path, digest in trained_on.labels.items():
        if recorded.get(Path(path).name, digest) != digest:
            raise DataError(f"{path}: not the labels the run in {run_dir} was trained on (sha256 {digest[:12]}..., "
                            f"its config.json records {recorded[Path(path).name][:12]}...); --resume continues a "
                            f"run on its own data")


# ---- writing the run ----

class RunFolder:
    """What the chief writes into the run folder (the other workers write nothing): config.json, vocab.json,
    val_ids.txt, checkpoints in last/ and best/, history.csv, curves.png, TensorBoard scalars.

    At the end of an epoch its files are written in this order, each whole: history.csv (with TensorBoard's scalars
    and, when due, curves.png), then best/ (when the epoch improved), then last/. The last/ checkpoint is the
    commit: a process killed before it is resumed from the previous one, and reconcile_best / read_history drop or
    adopt what went further."""

    def __init__(self, path, claim, select_metric, keep_last=3):
        """claim: this process's Claim on the folder, None on the workers other than the chief."""
        self.path, self.claim, self.select_metric, self.keep_last = Path(path), claim, select_metric, keep_last
        self.chief = claim is not None
        self.history_path = self.path / "history.csv"
        self.write_scalars = None
        self.curves_drawn_at = time.monotonic()  # this session's start, then its last drawing

    def start(self, config, run_settings, vocab, trained_on, cannot_end):
        """A new run: move a run there aside (--overwrite), then write the run's files."""
        if not self.chief:
            return
        if holds_run(self.path):  # refused earlier unless --overwrite
            print(f"--overwrite: moved the earlier run in {self.path} to {self.claim.move_aside()}", flush=True)
        write_run_files(self.path, config, run_settings, vocab, trained_on.manifest, {"cannot_end": cannot_end},
                        trained_on.labels_sha256())
        write_text_atomic(self.path / "val_ids.txt",
                          "".join(f"{video_id}\n" for video_id in trained_on.validation_ids))

    def reconcile_best(self, state):
        """Make a resumed state's best score and epoch describe the checkpoint best/ holds: a process killed
        between saving best/ and last/ left best/ an epoch ahead of last/'s state."""
        best = latest_checkpoint(self.path / "best")
        if best is None:
            return
        saved = read_state(best)
        if (saved.get("best_epoch"), saved.get("best_score")) != (state["best_epoch"], state["best_score"]):
            state.update(best_score=saved.get("best_score"), best_epoch=saved.get("best_epoch", 0))
            if self.chief:
                print(f"{best} holds the best checkpoint, of epoch {state['best_epoch']}: the best so far", flush=True)

    def read_history(self, epochs):
        """The resumed run's history rows of its first `epochs` epochs (a process killed after writing history.csv
        and before last/ wrote a row for an epoch the resumed run trains again)."""
        if not self.history_path.is_file():
            return []
        rows = pd.read_csv(self.history_path).to_dict("records")
        kept = [row for row in rows if row["epoch"] <= epochs]
        if len(kept) < len(rows) and self.chief:
            self.write_history(kept)
        return kept

    def open_scalars(self, summary_writer):
        """summary_writer: util.backend's (no Keras here), which makes none on JAX."""
        self.write_scalars = summary_writer(self.path / "tensorboard") if self.chief else None

    def record_epoch(self, history, final=False):
        """The newest epoch's row as TensorBoard scalars, then history.csv, then curves.png: once CURVES_EVERY_S have
        passed since the session began or last drew it, and at the session's final epoch (the last, or an early
        stop)."""
        if self.write_scalars:
            row = history[-1]
            self.write_scalars(row["epoch"], {k: v for k, v in row.items() if isinstance(v, float)})
        self.write_history(history)
        now = time.monotonic()
        if self.chief and (final or now - self.curves_drawn_at >= CURVES_EVERY_S):
            plot_training_curves(self.history_path, self.path / "curves.png", self.select_metric)
            self.curves_drawn_at = now

    def write_history(self, history):
        if not self.chief:
            return
        with atomic_path(self.history_path) as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)

    def save_checkpoint(self, folder, step, model, state, optimizer=None, keep=3):
        """The chief's checkpoint of now in folder (last or best), or None on the other workers."""
        if not self.chief:
            return None
        return save_checkpoint(self.path / folder, step, model, state, optimizer, keep)

    def save_best(self, step, model, state):
        return self.save_checkpoint("best", step, model, state, keep=1)

    def save_last(self, step, model, state, optimizer):
        return self.save_checkpoint("last", step, model, state, optimizer, keep=self.keep_last)
