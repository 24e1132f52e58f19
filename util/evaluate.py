"""The COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, from pycocoevalcap) beside the MLDS course BLEU@1.

    python -m util.evaluate OUT_FILE --labels testing_label.json [--json OUT.json]

Only the videos in the labels file are scored, and each of them needs a caption. With `java` on PATH, captions
and references are tokenized by pycocoevalcap's PTBTokenizer (Stanford CoreNLP, lowercased, punctuation tokens
dropped) and METEOR 1.5 runs. Without Java the fallback tokenizer lowercases, turns every character other than
letters, digits, underscores and white space into a space, and splits on white space; METEOR is then reported
as unavailable and the other metrics are still given. The MLDS BLEU@1 is util.bleu's, on the untokenized text.
SPICE is left out: it needs Stanford models downloaded.
"""
import argparse
import json
import re
import shutil
import sys

from util.atomic import write_text_atomic
from util.bleu import corpus_bleu1, read_captions
from util.data import load_labels
from util.errors import DataError, command

METRIC_NAMES = {"mlds_bleu1": "MLDS BLEU@1", "bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3",
                "bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}


def fallback_tokenize(text):
    """Lowercase words, punctuation removed: the tokenizer used when there is no Java for PTBTokenizer."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def ptb_tokenize(candidates, references):
    """Both sides through pycocoevalcap's PTBTokenizer in one Java call: {id: [caption]}, {id: [caption, ...]}."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = {("candidate", v): [{"caption": c}] for v, c in candidates.items()}
    sentences.update({("reference", v): [{"caption": r} for r in refs] for v, refs in references.items()})
    tokenized = PTBTokenizer().tokenize(sentences)
    if tokenized.keys() != sentences.keys() or any(len(tokenized[k]) != len(sentences[k]) for k in sentences):
        raise RuntimeError("PTBTokenizer (Java) returned fewer lines than it was given; is Java working?")
    return ({v: tokenized[("candidate", v)] for v in candidates},
            {v: tokenized[("reference", v)] for v in references})


def meteor_score(reference_tokens, candidate_tokens):
    """(METEOR 1.5 score or None, note or None), from one Java process (about 10 s to start).

    pycocoevalcap's Meteor stops its process only in __del__, so it is stopped here in every case."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    process = meteor.meteor_p
    try:
        return meteor.compute_score(reference_tokens, candidate_tokens)[0], None
    except (OSError, ValueError):  # Java died: a broken pipe, or an empty line where a score should be
        process.kill()
        message = process.stderr.read().decode(errors="replace").strip().splitlines()
        return None, f"failed: java exited ({message[-1] if message else 'no message'})"
    finally:
        if meteor.lock.locked():  # a failed compute_score keeps its lock, and __del__ would wait on it forever
            meteor.lock.release()
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()


def evaluate(captions, references, use_java=None, *, source="captions"):
    """Score captions {video_id: caption} against references {video_id: [caption, ...]}.

    Only the referenced videos are scored (extra captions are ignored); a referenced video without a caption
    is a DataError naming `source`. use_java: None uses Java when `java` is on PATH; True without it is a
    RuntimeError; False uses the fallback tokenizer and no METEOR.
    Returns {"videos", "tokenizer" ("ptb" | "fallback"), "mlds_bleu1", "bleu1".."bleu4", "meteor" (None when
    unavailable), "meteor_note" (why, else None), "rouge_l", "cider"}.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not references:
        raise DataError(f"{source}: no labelled videos to score")
    missing = [video_id for video_id in references if video_id not in captions]
    if missing:
        raise DataError(f"{source}: no caption for {len(missing)} of the {len(references)} labelled videos, "
                        f"e.g. {missing[0]}")
    java_found = shutil.which("java") is not None
    if use_java and not java_found:
        raise RuntimeError("use_java=True, but `java` is not on PATH")
    use_java = java_found if use_java is None else use_java
    candidates = {video_id: captions[video_id] for video_id in references}

    if use_java:
        candidate_tokens, reference_tokens = ptb_tokenize(candidates, references)
        meteor, meteor_note = meteor_score(reference_tokens, candidate_tokens)
    else:
        candidate_tokens = {v: [fallback_tokenize(c)] for v, c in candidates.items()}
        reference_tokens = {v: [fallback_tokenize(r) for r in refs] for v, refs in references.items()}
        meteor = None
        meteor_note = ("unavailable: it needs Java, and `java` is not on PATH" if not java_found
                       else "unavailable: Java not used (use_java=False)")
    bleu = Bleu(4).compute_score(reference_tokens, candidate_tokens, verbose=0)[0]
    return {"videos": len(references), "tokenizer": "ptb" if use_java else "fallback",
            "mlds_bleu1": corpus_bleu1(candidates, references),
            "bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
            "meteor": meteor, "meteor_note": meteor_note,
            "rouge_l": float(Rouge().compute_score(reference_tokens, candidate_tokens)[0]),  # numpy floats
            "cider": float(Cider().compute_score(reference_tokens, candidate_tokens)[0])}


def format_table(scores):
    lines = [f"videos: {scores['videos']}   tokenizer: {scores['tokenizer']}"]
    for key, name in METRIC_NAMES.items():
        value = scores[key]
        lines.append(f"{name:<12} {value:.4f}" if value is not None else f"{name:<12} {scores['meteor_note']}")
    return "\n".join(lines)


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", help="file of 'video_id,caption' lines")
    parser.add_argument("--labels", required=True, help="labels JSON, e.g. testing_label.json")
    parser.add_argument("--json", help="also write the scores to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    references = dict(load_labels(args.labels))
    captions = read_captions(args.captions)
    scores = evaluate(captions, references, source=args.captions)
    print(format_table(scores))
    if args.json:
        report = {"captions": args.captions, "labels": args.labels, **scores}
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
