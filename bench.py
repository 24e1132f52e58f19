"""Benchmark training, inference and feature extraction on synthetic inputs; prints one JSON object.

    python bench.py [--what train|infer|extract] [--config reference|demo] [--batch-size 50] [--beam-size 5]
                    [--device cpu|gpu] [--matmul-dtype float32|bfloat16] [--runs 5]
    python bench.py --what startup-memory [--videos 1450]

Runs on the Keras backend of KERAS_BACKEND (tensorflow, the default, or jax). Each figure is the median of --runs
timed runs after --warmup untimed ones; the first warm-up call is reported apart (first_*_s: compilation
included). Training uses the model's real training step (scheduled sampling at p=0.5, dropout, feature noise) with
caption lengths drawn like MSVD's (about 7 words on average, at most 50 tokens), padded as train.py pads them on
that backend; peak_rss_mib is the process's peak resident memory, peak_gpu_memory_mib the device's.
startup-memory writes a synthetic corpus of --videos videos of 80 x 4096 float32 features (MSVD has 1450) and
reports the peak resident memory of train.py over one short epoch of a small model on it: loading the features,
standardising them, validating, saving.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

CONFIGS = {  # model sizes; vocabulary 3000 is MSVD's order of magnitude
    "reference": dict(feature_dim=4096, frames=80, hidden=600, vocab_size=3000),
    "demo": dict(feature_dim=1280, frames=12, hidden=128, vocab_size=40),
}


def caption_batch(rng, batch_size, vocab_size, max_len=50):
    """Token ids (batch, longest) ending in <EOS>, lengths ~ MSVD: words = 2 + Poisson(5), cut at max_len - 1."""
    from util.vocab import EOS, PAD

    lengths = np.minimum(2 + rng.poisson(5, batch_size), max_len - 1) + 1  # + <EOS>
    captions = np.full((batch_size, lengths.max()), PAD, np.int32)
    for row, length in zip(captions, lengths):
        row[:length - 1] = rng.integers(4, vocab_size, length - 1)
        row[length - 1] = EOS
    return captions


def timed(function, runs, warmup):
    """(median seconds of `runs` calls, seconds of the first warm-up call: compilation included)."""
    first = None
    for _ in range(warmup):
        start = time.perf_counter()
        function()
        first = time.perf_counter() - start if first is None else first
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def build_model(config, matmul_dtype="float32"):
    from model import S2VT, S2VTConfig

    sizes = CONFIGS[config]
    return S2VT(S2VTConfig(vocab_size=sizes["vocab_size"], feature_dim=sizes["feature_dim"], frames=sizes["frames"],
                           hidden=sizes["hidden"], frame_embed=sizes["hidden"], word_embed=sizes["hidden"],
                           attention_dim=sizes["hidden"], matmul_dtype=matmul_dtype))


def features(rng, batch_size, config):
    sizes = CONFIGS[config]
    return np.maximum(rng.normal(0, 1, (batch_size, sizes["frames"], sizes["feature_dim"])), 0).astype(np.float32)


def bench_train(args):
    import keras

    from train import replica_loss
    from util import backend
    from util.data import batch_arrays

    rng = np.random.default_rng(0)
    model = build_model(args.config, args.matmul_dtype)
    optimizer = keras.optimizers.Adam(1e-4, global_clipnorm=5.0)
    optimizer.build(model.trainable_variables)
    distribution = backend.Distribution("default")
    train_step = backend.make_train_step(model, optimizer, distribution, replica_loss)
    rows, width_multiple = distribution.padding(args.batch_size)
    # two batches alternate (train.py's pipeline prepares the next batch in the background), padded as train.py does
    batches = [[batch_arrays(features(rng, args.batch_size, args.config), np.arange(args.batch_size),
                             caption_batch(rng, args.batch_size, CONFIGS[args.config]["vocab_size"]), rows,
                             width_multiple)] for _ in range(2)]
    state = {"i": 0}

    def step():
        state["i"] += 1
        float(train_step(batches[state["i"] % 2], 0.5, backend.seed_tensor(0, state["i"])))

    seconds, first = timed(step, args.runs, args.warmup)
    return {"samples_per_s": args.batch_size / seconds, "step_s": seconds, "first_step_s": first}


def bench_infer(args):
    from util import backend

    rng = np.random.default_rng(0)
    model = build_model(args.config, args.matmul_dtype)
    if args.beam_size == 1:
        decode = backend.compile_function(model, model.greedy)
    else:
        decode = backend.compile_function(model, lambda f: model.beam_search(f, args.beam_size))
    batch = features(rng, args.batch_size, args.config)
    seconds, first = timed(lambda: backend.to_numpy(decode(batch)), args.runs, args.warmup)
    return {"captions_per_s": args.batch_size / seconds, "beam_size": args.beam_size, "first_call_s": first}


def bench_extract(args):
    import extract_features

    settings = extract_features.FeatureSettings(weights="none", seed=0, random_weights="numpy")  # VGG16 fc2
    run_cnn, _ = extract_features.build_extractor(settings)
    frames = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    seconds, first = timed(lambda: run_cnn(frames), max(1, args.runs // 2), 1)
    return {"frames_per_s": 32 / seconds, "cnn": "vgg16 fc2, batch 32", "first_cnn_call_s": first}


def write_synthetic_corpus(root, videos, frames=80, feature_dim=4096, dtype="float32", seed=0):
    """An MLDS-layout training split of `videos` random feature files with 3 captions each; returns its size in
    bytes on disk."""
    import json
    from pathlib import Path

    rng = np.random.default_rng(seed)
    feat_dir = Path(root) / "training_data" / "feat"
    feat_dir.mkdir(parents=True, exist_ok=True)
    words = "a man woman dog cat is running cooking playing with the ball guitar on in".split()
    labels = []
    for i in range(videos):
        np.save(feat_dir / f"video{i}.avi.npy", rng.random((frames, feature_dim), np.float32).astype(dtype))
        labels.append({"caption": [" ".join(rng.choice(words, 6)) for _ in range(3)], "id": f"video{i}.avi"})
    (Path(root) / "training_label.json").write_text(json.dumps(labels))
    return videos * frames * feature_dim * np.dtype(dtype).itemsize


def bench_startup_memory(args):
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="s2vt-bench-") as scratch:
        feature_bytes = write_synthetic_corpus(Path(scratch) / "data", args.videos)
        command = [sys.executable, str(Path(__file__).parent / "train.py"), "--data-dir", str(Path(scratch) / "data"),
                   "--ckpt-dir", str(Path(scratch) / "run"), "--epochs", "1", "--hidden", "32", "--batch-size", "50",
                   "--pairs", "sample", "--min-word-count", "1"]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"videos": args.videos, "features_mib": feature_bytes / 2**20, "train_peak_rss_mib": peak_mib,
            "above_features_mib": peak_mib - feature_bytes / 2**20, "train_s": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("train", "infer", "extract", "startup-memory"),
                        help="default: train, infer and extract")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reference")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's large matmuls (model.S2VTConfig.matmul_dtype)")
    parser.add_argument("--videos", type=int, default=1450, help="startup-memory: videos in the synthetic corpus")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.beam_size, args.runs, args.videos) <= 0 or args.warmup < 0:
        parser.error("--batch-size, --beam-size, --runs and --videos must be positive, --warmup not negative")
    if args.what == "startup-memory":
        print(json.dumps(bench_startup_memory(args)))
        return 0
    from util import backend

    if args.device == "cpu":
        backend.hide_gpus()
    elif not backend.gpu_count():
        parser.error(f"--device gpu: {backend.BACKEND} sees no GPU")
    benches = {"train": bench_train, "infer": bench_infer, "extract": bench_extract}
    result = {"config": args.config, "batch_size": args.batch_size, "device": args.device,
              "matmul_dtype": args.matmul_dtype, "backend": backend.BACKEND, "devices": backend.device_description()}
    for what in ([args.what] if args.what else benches):
        result.update(benches[what](args))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "gpu":
        result["peak_gpu_memory_mib"] = backend.peak_device_memory() / 2**20
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
