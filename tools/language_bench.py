"""The language side on real captions: train on the real MLDS captions with proxy features, caption the 100 test
videos, and count the failures of the sentence itself (repeats, a function word last, <UNK>) beside the metrics.

    python -m tools.language_bench [--source ../shared/data/mlds_hw2_1] [--out runs/language_bench]
                                   [--train-videos 200] [--settings before,after] [--seeds 0]

A PROXY: the features come from the captions, not from pixels. Each video's features are a fixed random
projection of the words of one of its captions (a bag of words, each word its own random vector), the same over
its frames plus independent noise per frame. So the features carry each video's content, as real ones do, and the
benchmark measures what the language side makes of it: the vocabulary, the loss, decoding and checkpoint choice.
Its numbers are not comparable with those of real features.
"""
import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np

from util.data import load_labels
from util.vocab import tokenize

SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mlds_hw2_1"


def word_vector(word, dim):
    """The word's fixed random direction: seeded by the word itself, so every corpus gives it the same."""
    return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)


def proxy_features(caption, frames, dim, noise, rng):
    """(frames, dim) float32: the caption's words' vectors summed and scaled to unit variance, on every frame, plus
    independent Gaussian noise of standard deviation `noise` per frame."""
    words = tokenize(caption)
    video = sum(word_vector(w, dim) for w in words) / np.sqrt(max(len(words), 1))
    return (video[None] + noise * rng.standard_normal((frames, dim))).astype(np.float32)


def write_proxy_corpus(source, out_dir, train_videos, frames=20, dim=128, noise=0.5, seed=0):
    """The MLDS layout in out_dir: the first `train_videos` of a seeded shuffle of source's training videos with
    their real captions, all its test videos, and each video's proxy features (one of its captions, drawn with the
    seed). Returns out_dir."""
    source, out_dir = Path(source), Path(out_dir)
    rng = np.random.default_rng(seed)
    training = load_labels(source / "training_label.json")
    order = rng.permutation(len(training))[:train_videos]
    splits = {"training": [training[i] for i in sorted(order)], "testing": load_labels(source / "testing_label.json")}
    for split, labels in splits.items():
        feat_dir = out_dir / f"{split}_data" / "feat"
        feat_dir.mkdir(parents=True, exist_ok=True)
        for video_id, captions in labels:
            caption = captions[rng.integers(len(captions))]
            np.save(feat_dir / f"{video_id}.npy", proxy_features(caption, frames, dim, noise, rng))
        (out_dir / f"{split}_label.json").write_text(
            json.dumps([{"caption": captions, "id": video_id} for video_id, captions in labels]))
    (out_dir / "testing_id.txt").write_text("".join(f"{video_id}\n" for video_id, _ in splits["testing"]))
    return out_dir


# ---- what a sentence gets wrong ----

# words that do not end an English sentence; the benchmark's own list, so that it judges every setting alike
FUNCTION_WORDS = frozenset("a an the is are was were be being his her their its this that these some and or but of "
                           "on in into onto at to from with by for as".split())


def sentence_failures(captions):
    """The shares of captions with a word right after itself, with a repeated bigram, ending on a function word,
    holding <UNK>; the count of distinct captions and of words used."""
    words = [caption.split() for caption in captions]
    share = lambda failed: sum(map(failed, words)) / len(words)
    return {"stutter": share(lambda w: any(a == b for a, b in zip(w, w[1:]))),
            "repeated_bigram": share(lambda w: len(set(zip(w, w[1:]))) < len(w) - 1),
            "function_word_last": share(lambda w: not w or w[-1] in FUNCTION_WORDS),
            "unk": share(lambda w: "<UNK>" in w),
            "distinct": len(set(captions)), "words_used": len({x for w in words for x in w})}


# ---- the settings compared ----

COMMON = ["--hidden", "256", "--learning-rate", "1e-3", "--batch-size", "50", "--keep-last", "1000"]
BEFORE_SCHEDULE = ["--schedule", "inverse_sigmoid"]  # train.py's teacher forcing before the linear 1.0 -> 0.8 default
TRAINING = {  # name: train.py flags
    "before": ["--min-word-count", "3", "--unk-targets", "learn", *BEFORE_SCHEDULE],
    "skip-unk": ["--min-word-count", "3", *BEFORE_SCHEDULE],
    "skip-unk-min1": ["--min-word-count", "1", *BEFORE_SCHEDULE],
    "skip-unk-tf": ["--min-word-count", "3", "--schedule", "linear", "--teacher-forcing-start", "1.0",
                    "--teacher-forcing-end", "0.8"],
    "after": ["--min-word-count", "1", "--schedule", "linear", "--teacher-forcing-start", "1.0",
              "--teacher-forcing-end", "0.8"],
}
DECODING = {  # name: Captioner.caption_features options
    "free": {"no_repeat_ngram": 0, "end_rule": False},
    "no-repeat-2": {"no_repeat_ngram": 2, "end_rule": False},
    "no-repeat-2+end": {"no_repeat_ngram": 2, "end_rule": True},
    "no-repeat-3+end": {"no_repeat_ngram": 3, "end_rule": True},
}
# the checkpoint kept: best validation CIDEr, best CIDEr averaged over 3 epochs, lowest validation loss, last epoch
CHOICES = ("cider", "cider3", "loss", "last")


def chosen_epochs(history_csv):
    """{choice: epoch} from a run's history.csv (the first of equal scores, as train.py keeps)."""
    import pandas as pd

    history = pd.read_csv(history_csv)
    smoothed = history["val_cider"].rolling(3, center=True, min_periods=1).mean()
    return {"cider": int(history["epoch"][history["val_cider"].idxmax()]),
            "cider3": int(history["epoch"][smoothed.idxmax()]),
            "loss": int(history["epoch"][history["val_loss"].idxmin()]), "last": int(history["epoch"].iloc[-1])}


def checkpoint_of_epoch(run_dir, epoch):
    """The last/ checkpoint written at the end of `epoch` (the run keeps every one: --keep-last)."""
    from util.checkpoints import checkpoints_in, read_state

    return next(c for c in checkpoints_in(Path(run_dir) / "last") if read_state(c)["epoch"] == epoch)


def score_run(run_dir, corpus, decodings, choices):
    """Rows {choice, epoch, decoding, metrics..., failures...} for a trained run, on the corpus's test videos."""
    from captioner import Captioner
    from util.data import load_feature_file
    from util.evaluate import evaluate

    references = dict(load_labels(corpus / "testing_label.json"))
    ids = list(references)
    rows = []
    for choice, epoch in chosen_epochs(Path(run_dir) / "history.csv").items():
        if choice not in choices:
            continue
        captioner = Captioner.load(str(checkpoint_of_epoch(run_dir, epoch)))
        features = np.stack([load_feature_file(corpus / "testing_data" / "feat" / f"{v}.npy") for v in ids])
        for name in decodings:
            captions = [c.caption for c in captioner.caption_features(features, **DECODING[name])]
            scores = evaluate(dict(zip(ids, captions)), references)
            rows.append({"choice": choice, "epoch": epoch, "decoding": name,
                         **{k: scores[k] for k in ("bleu4", "meteor", "cider")}, **sentence_failures(captions),
                         "examples": captions[:5]})
    return rows


def train_setting(corpus, run_dir, name, epochs, seed):
    """Train one setting on the corpus into run_dir (in this process, as train.py would); its log in run_dir.log."""
    import contextlib
    import io

    import train

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    argv = ["--data-dir", str(corpus), "--ckpt-dir", str(run_dir), "--frames", "20", "--epochs", str(epochs),
            "--seed", str(seed), "--select-metric", "cider", "--overwrite", *COMMON, *TRAINING[name]]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = train.main(argv)
    Path(f"{run_dir}.log").write_text(log.getvalue())
    if status:
        raise SystemExit(f"{run_dir}: training failed ({status}); see {run_dir}.log")
    return [line for line in log.getvalue().splitlines() if line.startswith(("vocabulary:", "validation"))]


def epoch_curves(run_dir, corpus, decoding="no-repeat-2+end"):
    """A DataFrame, one row per epoch: the validation loss and CIDEr the run chose by, and the test CIDEr of that
    epoch's checkpoint (fallback tokenizer): how well each choice would have done. Written to run_dir/curves.csv."""
    import pandas as pd

    from captioner import Captioner
    from util.data import load_feature_file
    from util.evaluate import evaluate

    references = dict(load_labels(corpus / "testing_label.json"))
    features = np.stack([load_feature_file(corpus / "testing_data" / "feat" / f"{v}.npy") for v in references])
    history = pd.read_csv(Path(run_dir) / "history.csv")[["epoch", "val_loss", "val_cider"]]
    test = []
    for epoch in history["epoch"]:
        results = Captioner.load(str(checkpoint_of_epoch(run_dir, int(epoch)))).caption_features(
            features, **DECODING[decoding])
        test.append(evaluate({v: r.caption for v, r in zip(references, results)}, references,
                             use_java=False)["cider"])
    history["test_cider"] = test
    history.to_csv(Path(run_dir) / "curves.csv", index=False)
    return history


def choice_table(curves):
    """{run: {choice: (epoch, test CIDEr)}} for each choice rule, the best epoch in hindsight ("oracle") too."""
    table = {}
    for run, frame in curves.items():
        rows = frame.reset_index(drop=True)
        trailing = rows["val_cider"].rolling(3, min_periods=1).mean()  # what training could compute as it goes
        picks = {"cider": rows["val_cider"].idxmax(), "cider3": trailing.idxmax(), "loss": rows["val_loss"].idxmin(),
                 "last": len(rows) - 1, "oracle": rows["test_cider"].idxmax()}
        table[run] = {k: (int(rows["epoch"][i]), float(rows["test_cider"][i])) for k, i in picks.items()}
    return table


def plot_curves(curves, out_png):
    """One panel per run: validation CIDEr (its few videos), the validation loss and the test CIDEr over epochs."""
    from matplotlib.figure import Figure

    from util.plots import save_png

    fig = Figure(figsize=(5 * len(curves), 3.6))
    for ax, (run, frame) in zip(np.atleast_1d(fig.subplots(1, len(curves))), curves.items()):
        ax.plot(frame["epoch"], frame["val_cider"], "o-", ms=3, label="validation CIDEr (4 videos)")
        ax.plot(frame["epoch"], frame["test_cider"], "s-", ms=3, label="test CIDEr (100 videos)")
        loss_ax = ax.twinx()
        loss_ax.plot(frame["epoch"], frame["val_loss"], color="C2", label="validation loss")
        loss_ax.set_ylabel("validation loss", color="C2")
        ax.set(title=run, xlabel="epoch", ylabel="CIDEr")
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    save_png(fig, out_png)


TABLE = ("training", "seed", "choice", "epoch", "decoding", "stutter", "repeated_bigram", "function_word_last", "unk",
         "distinct", "words_used", "bleu4", "meteor", "cider")


def markdown(rows):
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[k]) for k in TABLE) + " |" for row in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SOURCE), help="the real MLDS HW2-1 labels")
    parser.add_argument("--out", default="runs/language_bench", help="corpora, runs, results.json and results.md")
    parser.add_argument("--train-videos", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", default="0", help="comma-separated: each draws its own training videos, "
                                                     "validation split and initial weights")
    parser.add_argument("--training", default=",".join(TRAINING), help=f"of {', '.join(TRAINING)}")
    parser.add_argument("--decoding", default=",".join(DECODING), help=f"of {', '.join(DECODING)}")
    parser.add_argument("--choices", default=",".join(CHOICES), help=f"of {', '.join(CHOICES)}")
    parser.add_argument("--curves", action="store_true", help="instead: for the runs already trained in --out, the "
                        "test CIDEr of every epoch's checkpoint beside the validation scores (curves.png), and the "
                        "epoch each checkpoint choice keeps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.curves:
        return study_choices(out, args)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        corpus = write_proxy_corpus(args.source, out / f"corpus-{args.train_videos}-{seed}", args.train_videos,
                                    seed=seed)
        for name in args.training.split(","):
            run_dir = out / f"run-{args.train_videos}-{seed}-{name}"
            for line in train_setting(corpus, run_dir, name, args.epochs, seed):
                print(f"{name} (seed {seed}): {line}", flush=True)
            for row in score_run(run_dir, corpus, args.decoding.split(","), args.choices.split(",")):
                rows.append({"training": name, "seed": seed, **row})
                print(markdown([rows[-1]]).splitlines()[-1], "  e.g.", "; ".join(row["examples"][:3]), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


def study_choices(out, args):
    curves = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.training.split(","):
            run_dir = out / f"run-{args.train_videos}-{seed}-{name}"
            if (run_dir / "history.csv").is_file():
                curves[f"{name}, seed {seed}"] = epoch_curves(run_dir, out / f"corpus-{args.train_videos}-{seed}")
    plot_curves(curves, out / "curves.png")
    table = choice_table(curves)
    choices = ("cider", "cider3", "loss", "last", "oracle")
    print("| run | " + " | ".join(f"{c}: epoch, test CIDEr" for c in choices) + " |")
    print("|---|" + "---|" * len(choices))
    for run, picks in table.items():
        print(f"| {run} | " + " | ".join(f"{picks[c][0]}, {picks[c][1]:.3f}" for c in choices) + " |")
    print(f"mean test CIDEr: " + ", ".join(f"{c} {np.mean([p[c][1] for p in table.values()]):.3f}" for c in choices))
    print(f"wrote {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
