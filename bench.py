"""Benchmark training, inference and feature extraction on synthetic inputs; prints one JSON object.

    python bench.py [--what train|infer|extract] [--config reference|demo] [--batch-size 50] [--beam-size 5]
                    [--device cpu|gpu] [--matmul-dtype float32|bfloat16] [--runs 5] [--objective xe|scst]
    python bench.py --what startup-memory [--videos 1450]
    python bench.py --what feature-files [--videos 6513] [--batch-size 50] [--data-dir DIR]
    python bench.py --what extract --encoder NAME [--weights DIR] [--batch-size 8]

Runs on the Keras backend of KERAS_BACKEND (tensorflow, the default, or jax). Each figure is the median of --runs
timed runs after --warmup untimed ones; the first warm-up call is reported apart (first_*_s: compilation
included). Training uses the model's real training step (scheduled sampling at p=0.5, dropout, feature noise) with
caption lengths drawn like MSVD's (about 7 words on average, at most 50 tokens), padded as train.py pads them on
that backend; with --objective scst, the self-critical step too (--scst-samples 5 captions sampled per video,
rewarded by CIDEr-D against 40 synthetic references of each of 1200 videos, MSVD's order of magnitude), with the
share of its time the rewards take on the host; peak_rss_mib is the process's peak resident memory,
peak_gpu_memory_mib the device's.
startup-memory writes a synthetic corpus of --videos videos of 80 x 4096 float32 features (MSVD has 1450) and
reports the peak resident memory of train.py over one short epoch of a small model on it: loading the features,
standardising them, validating, saving. feature-files trains on --videos videos (MSR-VTT's 6513) of float16
features read from their files (--features files) and on 100 videos (at most --videos) in memory, with the same
model and batch, and reports each run's peak anonymous memory (RssAnon: not the page cache) and its second epoch's
samples/s.
extract --encoder times an extract_features.py encoder on --batch-size random frames, computing in float32 and in
bfloat16: a keras-hub one from its preset folder --weights, else with random weights at its real sizes
(util.encoders.random_preset), mobilenet_v2 with its installed ImageNet weights; beside frames/s, GFLOP per frame
(the convolutions' and matmuls' multiply-adds x 2) and the share of this machine's float32 matmul rate (a 1024 x
1024 matmul, timed the same way) that reaches.
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
EXTRACT_FRAMES = 32  # VGG16 fc2's batch in --what extract


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
    from model import S2VT, ModelConfig

    sizes = CONFIGS[config]
    return S2VT(ModelConfig(vocab_size=sizes["vocab_size"], feature_dim=sizes["feature_dim"], frames=sizes["frames"],
                           hidden=sizes["hidden"], matmul_dtype=matmul_dtype))


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
    batches = [train_step.prepare([batch_arrays(features(rng, args.batch_size, args.config), np.arange(args.batch_size),
                                                caption_batch(rng, args.batch_size, CONFIGS[args.config]["vocab_size"]),
                                                rows, width_multiple)]) for _ in range(2)]
    state = {"i": 0}

    def step():
        state["i"] += 1
        float(train_step(batches[state["i"] % 2], 0.5, backend.seed_tensor(0, state["i"])))

    seconds, first = timed(step, args.runs, args.warmup)
    result = {"samples_per_s": args.batch_size / seconds, "step_s": seconds, "first_step_s": first}
    if args.objective == "scst":
        result.update(bench_scst(args, model, optimizer, distribution, 1 / seconds))
    return result


def bench_scst(args, model, optimizer, distribution, xe_steps_per_s):
    """SCST steps/s beside cross-entropy's, and the rewards' (CIDEr-D on the host) share of a step's time."""
    from scst import scst_loss
    from util import backend
    from util.cider import CiderD
    from util.data import batch_arrays

    rng = np.random.default_rng(1)
    vocab_size = CONFIGS[args.config]["vocab_size"]
    cider = CiderD([caption_batch(rng, 40, vocab_size) for _ in range(max(1200, args.batch_size))])
    reward_seconds = []

    def rewards(words, videos):
        start = time.perf_counter()
        scores = cider(words, videos)
        reward_seconds.append(time.perf_counter() - start)
        return scores

    loss = scst_loss(rewards, args.scst_samples, "mean")
    train_step = backend.make_train_step(model, optimizer, distribution, loss)
    rows, width_multiple = distribution.padding(args.batch_size)
    batch = train_step.prepare([batch_arrays(features(rng, args.batch_size, args.config), np.arange(args.batch_size),
                                             np.arange(1, args.batch_size + 1)[:, None], rows, width_multiple)])
    state = {"i": 0}

    def step():
        state["i"] += 1
        float(train_step(batch, 1.0, backend.seed_tensor(0, state["i"])))

    seconds, first = timed(step, args.runs, args.warmup)
    reward = statistics.median(reward_seconds[-args.runs:])
    return {"xe_steps_per_s": xe_steps_per_s, "scst_steps_per_s": 1 / seconds, "scst_first_step_s": first,
            "scst_reward_s": reward, "scst_reward_share": reward / seconds, "scst_samples": args.scst_samples}


def bench_infer(args):
    import keras

    from util import backend

    rng = np.random.default_rng(0)
    model = build_model(args.config, args.matmul_dtype)
    if args.beam_size == 1:
        decode = backend.compile_function(model, model.greedy)
    else:
        decode = backend.compile_function(model, lambda f: model.beam_search(f, args.beam_size))
    batch = keras.ops.convert_to_tensor(features(rng, args.batch_size, args.config))  # on the device, as training's
    seconds, first = timed(lambda: backend.to_numpy(decode(batch)), args.runs, args.warmup)
    return {"captions_per_s": args.batch_size / seconds, "beam_size": args.beam_size, "first_call_s": first}


def bench_extract(args):
    import extract_features

    if args.encoder:
        return bench_encoder(args)

    settings = extract_features.FeatureSettings(weights="none", seed=0, random_weights="numpy")  # VGG16 fc2
    run_cnn, _ = extract_features.build_extractor(settings)
    frames = np.random.default_rng(0).integers(0, 256, (EXTRACT_FRAMES, 224, 224, 3), dtype=np.uint8)
    seconds, first = timed(lambda: run_cnn(frames), max(1, args.runs // 2), 1)
    return {"frames_per_s": EXTRACT_FRAMES / seconds, "cnn": f"vgg16 fc2, batch {EXTRACT_FRAMES}",
            "first_cnn_call_s": first}


def bench_encoder(args):
    import tempfile

    import extract_features
    from util import encoders

    result = {"encoder": args.encoder, "frames_per_call": args.batch_size}
    with tempfile.TemporaryDirectory() as folder:
        weights = args.weights
        if weights is None and encoders.ENCODERS[args.encoder].backbone != encoders.TORCHVISION:
            weights = encoders.random_preset(args.encoder, folder)
            result["weights"] = "random, real sizes"
        for dtype in ("float32", "bfloat16"):
            settings = extract_features.encoder_settings(args.encoder, weights, compute_dtype=dtype)
            run_encoder, dim = extract_features.build_extractor(settings)
            size = settings.read_size
            frames = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
            seconds, first = timed(lambda: run_encoder(frames), args.runs, args.warmup)
            result.update({f"{dtype}_frames_per_s": args.batch_size / seconds, f"{dtype}_first_call_s": first})
    result.update(feature_dim=dim, gflop_per_frame=encoder_gflop(args.encoder, settings))
    result["matmul_gflop_per_s"] = matmul_rate(args.runs, args.warmup)
    for dtype in ("float32", "bfloat16"):
        achieved = result["gflop_per_frame"] * result[f"{dtype}_frames_per_s"]
        result[f"{dtype}_share_of_fp32_matmul_rate"] = achieved / result["matmul_gflop_per_s"]
    return result


def encoder_gflop(name, settings):
    """Multiply-adds x 2 per frame: of each convolution (output positions x kernel size) for mobilenet_v2; for a
    ViT of each layer's projections and MLP (tokens x 4d^2 + 2dm) and attention (tokens^2 x 2d), and the patch
    embedding. The pooling heads (under 1%) are left out."""
    from util import encoders, mobilenet_v2

    if name == "mobilenet_v2":
        network = mobilenet_v2.build(settings.image_size)
        convs = [layer for layer in network.layers if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D")]
        return sum(2 * np.prod(layer.output.shape[1:3]) * np.prod(layer.kernel.shape) for layer in convs) / 1e9
    arch = encoders.ENCODERS[name].architecture
    d, m, patches = arch["hidden_dim"], arch["intermediate_dim"], (settings.image_size // arch["patch_size"]) ** 2
    tokens = patches + (0 if name.startswith("siglip") else 1)  # SigLIP has no class token
    layer = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d
    return (arch["num_layers"] * layer + 2 * patches * 3 * arch["patch_size"] ** 2 * d) / 1e9


def matmul_rate(runs, warmup, n=1024):
    """GFLOP/s of a float32 n x n matmul on this backend, compiled as the encoders are."""
    import keras

    from util import backend

    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(np.float32) for i in (0, 1))
    matmul = backend.compile_function([], lambda x, y: keras.ops.matmul(x, y))
    seconds, _ = timed(lambda: backend.to_numpy(matmul(a, b)), max(runs, 5), max(warmup, 1))
    return 2 * n ** 3 / seconds / 1e9


def write_synthetic_corpus(root, videos, frames=80, feature_dim=4096, dtype="float32", captions=3, seed=0):
    """An MLDS-layout training split of `videos` random feature files with `captions` captions each, written once
    (a folder that has it already is kept); returns its features' size in bytes."""
    import json
    from pathlib import Path

    root = Path(root)
    feat_dir = root / "training_data" / "feat"
    if not (root / "training_label.json").is_file():
        rng = np.random.default_rng(seed)
        feat_dir.mkdir(parents=True, exist_ok=True)
        words = "a man woman dog cat is running cooking playing with the ball guitar on in".split()
        labels = []
        for i in range(videos):
            np.save(feat_dir / f"video{i}.avi.npy", rng.random((frames, feature_dim), np.float32).astype(dtype))
            labels.append({"caption": [" ".join(rng.choice(words, 6)) for _ in range(captions)], "id": f"video{i}.avi"})
        (root / "training_label.json").write_text(json.dumps(labels))
    return videos * frames * feature_dim * np.dtype(dtype).itemsize


def train_command(data_dir, run_dir, *flags):
    from pathlib import Path

    return [sys.executable, str(Path(__file__).parent / "train.py"), "--data-dir", str(data_dir), "--ckpt-dir",
            str(run_dir), "--min-word-count", "1", *flags]


def bench_startup_memory(args):
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="s2vt-bench-") as scratch:
        feature_bytes = write_synthetic_corpus(Path(scratch) / "data", args.videos)
        command = train_command(Path(scratch) / "data", Path(scratch) / "run", "--epochs", "1", "--hidden", "32",
                                "--batch-size", "50", "--pairs", "sample", "--features", "memory")
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"videos": args.videos, "features_mib": feature_bytes / 2**20, "train_peak_rss_mib": peak_mib,
            "above_features_mib": peak_mib - feature_bytes / 2**20, "train_s": seconds}


def peak_anonymous_memory(command):
    """Run command; (the peak of its RssAnon in MiB, sampled every 0.1 s: anonymous memory, not the page cache or
    memory-mapped files, seconds)."""
    import re
    import subprocess
    from pathlib import Path

    started, peak = time.perf_counter(), 0
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)))
        except (OSError, AttributeError):  # it has just ended
            pass
        time.sleep(0.1)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-2000:]}")
    return peak / 1024, time.perf_counter() - started


def bench_feature_files(args):
    """train.py on --videos videos (MSR-VTT: 6513) of float16 features (80 x 4096 at --config reference) read from
    their files, against 100 videos (at most --videos) in memory, same model (hidden 256 at reference size) and
    batch: peak anonymous memory and the second epoch's samples/s."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    root = Path(args.data_dir or tempfile.mkdtemp(prefix="s2vt-bench-"))
    sizes = CONFIGS[args.config]
    hidden = 256 if args.config == "reference" else sizes["hidden"]  # a smaller model than 600: reading shows more
    model_flags = ["--hidden", str(hidden), "--frames", str(sizes["frames"]), "--batch-size", str(args.batch_size),
                   "--epochs", "2", "--val-fraction", "0.01"]
    result = {"config": args.config, "videos": args.videos, "batch_size": args.batch_size, "hidden": hidden}
    in_memory = min(100, args.videos)  # a scaled-down --videos scales both runs down
    for name, videos, flags in (("in_memory", in_memory, ["--features", "memory", "--pairs", "all"]),
                                ("from_files", args.videos, ["--features", "files", "--pairs", "sample"])):
        data = root / f"{videos}-videos-{args.config}"
        feature_bytes = write_synthetic_corpus(data, videos, sizes["frames"], sizes["feature_dim"], "float16", 20)
        peak_mib, seconds = peak_anonymous_memory(train_command(data, root / f"run-{name}", *model_flags, *flags))
        history = pd.read_csv(root / f"run-{name}" / "history.csv")
        result.update({f"{name}_features_mib": feature_bytes / 2**20, f"{name}_rss_anon_peak_mib": peak_mib,
                       f"{name}_samples_per_s": float(history["train_samples_per_s"].iloc[-1]), f"{name}_s": seconds})
    result["rss_anon_above_in_memory_mib"] = result["from_files_rss_anon_peak_mib"] - result["in_memory_rss_anon_peak_mib"]
    result["samples_per_s_ratio"] = result["from_files_samples_per_s"] / result["in_memory_samples_per_s"]
    return result


def main(argv=None):
    from util.encoders import ENCODERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("train", "infer", "extract", "startup-memory", "feature-files"),
                        help="default: train, infer and extract")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reference")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's large matmuls (model.ModelConfig.matmul_dtype)")
    parser.add_argument("--videos", type=int, help="startup-memory, feature-files: videos in the synthetic corpus "
                        "(default 1450, MSVD's, and 6513, MSR-VTT's)")
    parser.add_argument("--data-dir", help="feature-files: where the synthetic corpora are written, or kept from an "
                        "earlier run (default: a new temporary folder)")
    parser.add_argument("--objective", choices=("xe", "scst"), default="xe",
                        help="train: scst times the self-critical step beside the cross-entropy one")
    parser.add_argument("--scst-samples", type=int, default=5)
    parser.add_argument("--encoder", choices=sorted(ENCODERS),
                        help="extract: time this extract_features.py --encoder instead of VGG16")
    parser.add_argument("--weights", help="extract --encoder: its preset folder (default: random weights)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.videos is None:
        args.videos = 6513 if args.what == "feature-files" else 1450
    if min(args.batch_size, args.beam_size, args.runs, args.videos) <= 0 or args.warmup < 0:
        parser.error("--batch-size, --beam-size, --runs and --videos must be positive, --warmup not negative")
    if args.what in ("startup-memory", "feature-files"):  # train.py runs in child processes
        print(json.dumps({"startup-memory": bench_startup_memory, "feature-files": bench_feature_files}[args.what](args)))
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
