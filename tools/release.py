"""Released checkpoints: pack a run into one verified .tar.gz, and fetch one back by name or URL.

    python -m tools.release export RUN_DIR OUT.tar.gz [--which best|last]
    python -m tools.release download NAME|URL [--sha256 HEX] [--dir checkpoints/] [--registry checkpoints/releases.json]
                            [--insecure-no-hash] [--max-download-mb 2000] [--max-unpacked-mb 4000] [--timeout 30]
                            [--deadline 3600] [--min-rate-kb 10]

A bundle holds, at its top level:

    best/step-N/model.weights.h5, best/step-N/state.json     the chosen checkpoint's inference weights (of best/ or
                                                             last/; no optimizer state)
    config.json, vocab.json                                  as in the run folder
    feature_manifest.json                                    config.json's "features" (may be null)
    metrics.json                                             history.csv's last row, the best validation score
                                                             by the run's --select-metric
    MANIFEST.json                                            sha256 and size of every other file

so the extracted folder is a run folder for model.load_model, on any backend. `download` is util.releases's
fetch_release (the registry, the checks on a download, its deadline and minimum rate, the hidden partial folder;
see there), each release loaded
into its model (model.load_model) before it is put in place; infer.py, serve.py and Captioner.load fetch a release
they are named the same way.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from model import load_model
from util.atomic import atomic_path
from util.checkpoints import DEFAULT_ROOT, MODEL_FILE, STATE_FILE, checkpoint_name, latest_checkpoint, \
    read_run_config, read_state
from util.data import sha256_of
from util.errors import DataError, command
from util.plots import run_select_metric
from util.releases import BUNDLE_MANIFEST, DEADLINE_S, MAX_DOWNLOAD_BYTES, MAX_UNPACKED_BYTES, MIN_RATE, TIMEOUT_S, \
    fetch_release


# ---- export ----

def export_release(run_dir, out_path, which="best"):
    """Pack run_dir's newest `which` checkpoint into the bundle out_path; returns (sha256, size, registry entry)."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    config = read_run_config(run_dir)
    checkpoint = latest_checkpoint(run_dir / which)
    if not checkpoint:
        raise DataError(f"{run_dir / which}: holds no checkpoint")
    if not out_path.parent.is_dir():
        raise DataError(f"{out_path}: output folder {out_path.parent} does not exist")
    metrics = run_metrics(run_dir, checkpoint, which, run_select_metric(run_dir))

    # each bundle file comes from a Path (streamed: checkpoints can be large) or from bytes made here
    sources = {f"best/{checkpoint_name(checkpoint)}/{name}": checkpoint / name for name in (MODEL_FILE, STATE_FILE)}
    sources["config.json"] = run_dir / "config.json"
    sources["vocab.json"] = run_dir / "vocab.json"
    sources["feature_manifest.json"] = json.dumps(config.get("features"), indent=1).encode()
    sources["metrics.json"] = json.dumps(metrics, indent=1).encode()
    sources[BUNDLE_MANIFEST] = json.dumps({"files": {name: _file_entry(source) for name, source in sources.items()}},
                                          indent=1).encode()
    with atomic_path(out_path) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for name, source in sources.items():
                if isinstance(source, Path):
                    tar.add(source, arcname=name, filter=_plain_member)
                else:
                    member = _plain_member(tarfile.TarInfo(name))
                    member.size = len(source)
                    tar.addfile(member, io.BytesIO(source))
    digest, size = sha256_of(out_path), out_path.stat().st_size
    entry = {"name": out_path.name.removesuffix(".tar.gz"), "url": "", "sha256": digest, "size": size,
             "trained_on": Path(str(config.get("train", {}).get("data_dir", ""))).name, "metrics": metrics,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return digest, size, entry


def _file_entry(source):
    if isinstance(source, Path):
        return {"sha256": sha256_of(source), "size": source.stat().st_size}
    return {"sha256": hashlib.sha256(source).hexdigest(), "size": len(source)}


def _plain_member(member):
    """No owner names or ids from this machine in the bundle."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    member.mode, member.mtime = 0o644, int(time.time())
    return member


def run_metrics(run_dir, checkpoint, which, select_metric="bleu1"):
    """Validation metrics for metrics.json: history.csv's last row, the best score by the metric the run selected
    its best checkpoint with (named, as val_<metric>), and the exported epoch."""
    history_path = Path(run_dir) / "history.csv"
    rows = []
    if history_path.is_file():
        with open(history_path, newline="") as file:
            rows = [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(file)]
    column = f"val_{select_metric}"
    scores = [row[column] for row in rows if isinstance(row.get(column), float)]
    best = min if select_metric == "loss" else max
    return {"last": rows[-1] if rows else None, "select_metric": select_metric, "split": "validation",
            f"best_{column}": best(scores, default=None), "checkpoint": which,
            "epoch": read_state(checkpoint).get("epoch")}


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None


# ---- command line ----

@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.release", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="pack a run folder's checkpoint into one .tar.gz")
    export.add_argument("run_dir")
    export.add_argument("out", help="the bundle to write, e.g. s2vt-mlds.tar.gz")
    export.add_argument("--which", choices=("best", "last"), default="best", help="which checkpoint to pack")
    download = commands.add_parser("download", help="fetch a release by registry name or URL")
    download.add_argument("spec", metavar="NAME|URL")
    download.add_argument("--sha256", help="expected sha256 of the archive (a registry name brings its own)")
    download.add_argument("--dir", default=str(DEFAULT_ROOT), help="where DIR/<name> goes (default checkpoints/)")
    download.add_argument("--registry", help="releases.json to resolve names in (default checkpoints/releases.json)")
    download.add_argument("--insecure-no-hash", action="store_true",
                          help="install a URL given without --sha256, unverified (its sha256 is printed)")
    download.add_argument("--max-download-mb", type=float, default=MAX_DOWNLOAD_BYTES / 1e6,
                          help="larger downloads are refused")
    download.add_argument("--max-unpacked-mb", type=float, default=MAX_UNPACKED_BYTES / 1e6,
                          help="archives unpacking to more are refused")
    download.add_argument("--timeout", type=float, default=TIMEOUT_S,
                          help="seconds to wait to connect, and for each read")
    download.add_argument("--deadline", type=float, default=DEADLINE_S, metavar="SECONDS",
                          help="downloads taking longer are cut off and refused")
    download.add_argument("--min-rate-kb", type=float, default=MIN_RATE / 1e3, metavar="KB_PER_S",
                          help="downloads slower than this many kilobytes a second, over any --timeout seconds, are "
                               "cut off and refused (0: no minimum)")
    for command in (export, download):
        command.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.command == "download" and not (args.timeout > 0 and args.deadline > 0 and args.min_rate_kb >= 0):
        download.error("--timeout and --deadline must be positive, --min-rate-kb at least 0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if args.command == "export":
                digest, size, entry = export_release(args.run_dir, args.out, args.which)
                print(f"wrote {args.out}\nsha256 {digest}\nsize {size}\n"
                      f"registry entry (fill in url):\n{json.dumps(entry, indent=1)}")
            else:
                print(fetch_release(args.spec, args.dir, args.sha256, args.registry, args.insecure_no_hash,
                                    int(args.max_download_mb * 1e6), int(args.max_unpacked_mb * 1e6), args.timeout,
                                    args.deadline, args.min_rate_kb * 1e3, check_run=load_model))
        finally:  # also when a DataError ends the command: its line follows these
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
