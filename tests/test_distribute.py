"""Several devices: mirrored steps equal single-device ones on TensorFlow (two logical CPUs) and on JAX (two host
devices), two TensorFlow workers with a run folder each train, stop and resume like one device, and two extraction
shards fill one feature folder at once.

Logical devices, host devices and MultiWorkerMirroredStrategy need a backend not yet started, so those runs are
child processes; `pytest -s` shows their per-step losses, weight differences and wall times.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

import extract_features
import infer
import train
from conftest import ROOT, write_tiny_mlds
from test_extract import FAST
from util import backend
from util.checkpoints import latest_checkpoint, read_state
from util.data import batch_arrays, batches
from tools.demo_data import make_corpus
from util.vocab import EOS, PAD

# the same global batches through one device and through every local device: TensorFlow's CPU split in two logical
# devices, or JAX's two host devices (XLA_FLAGS, set by the test); dropout, noise and sampling off (teacher forcing
# 1), clipping on in every step. With train.py arguments after the root, the child then trains with them on every
# device (--strategy mirrored).
MIRRORED_STEPS = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
if os.environ["KERAS_BACKEND"] == "tensorflow":  # before TensorFlow starts; the CPU alone, where a GPU is seen too
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
import train
from model import S2VT, ModelConfig
from train import replica_loss
from util import backend
from util.data import batches
from util.vocab import EOS, PAD

config = ModelConfig(vocab_size=13, feature_dim=10, frames=5, hidden=16, max_caption_len=7, dropout=0.0, feature_noise=0.0)
rng = np.random.default_rng(0)
features = rng.normal(size=(12, 5, 10)).astype(np.float16)
pairs = 7 + 1  # a batch of 7 split 3 + 4, and a last batch of 1 that leaves one replica nothing
video_index = rng.integers(0, 12, pairs).astype(np.int32)
captions = np.full((pairs, 7), PAD, np.int32)
for row, length in zip(captions, rng.integers(1, 8, pairs)):
    row[:length - 1] = rng.integers(4, 13, length - 1)
    row[length - 1] = EOS


def step_flops(train_step, slices, seed):  # the compiled JAX step's FLOPs on each device
    import jax
    (frame_features, caption_ids), = slices
    inputs = [jax.device_put(a, train_step.batch_sharding) for a in (frame_features, caption_ids)]
    cost = train_step.step.lower(*train_step.state, *inputs, np.float32(1.0), seed).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def train_steps(distribution):
    with distribution.scope():
        backend.set_random_seed(0)  # keras.utils' would import TensorFlow on JAX
        model = S2VT(config)
        model.adapt_features(features)
        optimizer = keras.optimizers.Adam(0.01, global_clipnorm=0.1)
        optimizer.build(model.trainable_variables)
    train_step = backend.make_train_step(model, optimizer, distribution, replica_loss)
    rows, width_multiple = distribution.padding(7)
    losses, slices, shapes = [], [], []
    started = time.perf_counter()
    for step, batch in enumerate(batches(features, video_index, captions, 7, slices=(
            distribution.slices, distribution.first_slice, distribution.local_slices), rows=rows,
            width_multiple=width_multiple)):
        slices.append([int(np.sum(np.any(c != PAD, axis=1))) for _, c in batch])  # the pairs in each slice
        shapes.append([list(c.shape) for _, c in batch])
        losses.append(float(train_step(batch, 1.0, backend.seed_tensor(0, step))))
    seconds = time.perf_counter() - started
    train_step.sync()
    return {"losses": losses, "slices": slices, "shapes": shapes, "seconds": seconds,
            "flops": step_flops(train_step, batch, backend.seed_tensor(0, 0)) if backend.BACKEND == "jax" else None,
            "weights": [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]}


distributions = {"auto": backend.Distribution("auto"), "mirrored": backend.Distribution("mirrored")}
single, mirrored = train_steps(distributions["auto"]), train_steps(distributions["mirrored"])
difference = max(float(np.max(np.abs(a - b))) for a, b in zip(single.pop("weights"), mirrored.pop("weights")))
report = {"backend": backend.BACKEND, "replicas": {name: d.replicas for name, d in distributions.items()},
          "single": single, "mirrored": mirrored, "max_weight_difference": difference}
if len(sys.argv) > 2:
    started = time.perf_counter()
    report["train_py"] = {"exit": train.main([*sys.argv[2:], "--strategy", "mirrored"]),
                          "seconds": time.perf_counter() - started}
print(json.dumps(report))
"""


def run_mirrored_steps(keras_backend, *train_argv, **env):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MIRRORED_STEPS, str(ROOT), *train_argv], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, KERAS_BACKEND=keras_backend, **env))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    single, mirrored = report["single"], report["mirrored"]
    print(f"\n{report['backend']} mirrored ({report['replicas']['mirrored']} devices) against one device, "
          f"{len(single['losses'])} steps, global batches 7, 1:")
    for step, (one, two, parts, shapes) in enumerate(zip(single["losses"], mirrored["losses"], mirrored["slices"],
                                                         mirrored["shapes"]), 1):
        print(f"  step {step}: loss single {one:.7f}  mirrored {two:.7f}  difference {abs(one - two):.2g}  "
              f"(pairs per slice {parts}, slice shapes {shapes})")
    print(f"  max weight difference {report['max_weight_difference']:.3g}; steps took {single['seconds']:.1f} s "
          f"single, {mirrored['seconds']:.1f} s mirrored (compilation included); child wall time "
          f"{time.perf_counter() - started:.1f} s")
    assert report["replicas"] == {"auto": 1, "mirrored": 2}  # no GPU: auto is one device
    np.testing.assert_allclose(mirrored["losses"], single["losses"], rtol=0, atol=1e-5)
    assert single["losses"][-1] != single["losses"][0]
    assert report["max_weight_difference"] <= 1e-5
    return report


def test_each_worker_gathers_its_own_slices_of_the_single_device_batches():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 3, 2)).astype(np.float16)
    video_index = np.array([0, 1, 2, 3, 0, 1, 2], np.int32)
    captions = np.array([[5, EOS, PAD, PAD]] * 4 + [[5, 6, 7, EOS]] + [[EOS, PAD, PAD, PAD]] * 2, np.int32)
    one = list(batches(features, video_index, captions, 3, skip_batches=1))
    assert len(one) == 2  # pairs 3-5 and 6
    for (batch,), (a, b) in zip(one, [(3, 6), (6, 7)]):
        for got, expected in zip(batch, batch_arrays(features, video_index[a:b], captions[a:b])):
            np.testing.assert_array_equal(got, expected)
    both = list(batches(features, video_index, captions, 3, 1, slices=(2, 0, 2)))
    workers = [list(batches(features, video_index, captions, 3, 1, slices=(2, worker, 1))) for worker in range(2)]
    assert [[len(c) for _, c in batch] for batch in both] == [[1, 2], [0, 1]]  # a short batch leaves a slice empty
    for (whole,), pair, first, second in zip(one, both, *workers):
        assert len(first) == len(second) == 1
        for got, expected in zip(first + second, pair):
            for got_array, expected_array in zip(got, expected):
                np.testing.assert_array_equal(got_array, expected_array)
        # the slices, widened to the batch's longest caption, are the single device's batch row by row
        width = whole[1].shape[1]
        np.testing.assert_array_equal(np.concatenate([f for f, _ in pair]), whole[0])
        np.testing.assert_array_equal(
            np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1])), constant_values=PAD) for _, c in pair]),
            whole[1])


@pytest.mark.slow
def test_tensorflow_mirrored_steps_equal_single_device_steps():
    report = run_mirrored_steps("tensorflow")
    single, mirrored = report["single"], report["mirrored"]
    assert single["slices"] == [[7], [1]] and mirrored["slices"] == [[3, 4], [0, 1]]
    assert mirrored["shapes"][-1][0] == [0, 1]  # the empty slice has no rows, one caption step


@pytest.mark.slow
def test_jax_mirrored_shards_the_batch_over_two_devices_as_one_device_would_train(tmp_path):
    """Two host devices: the steps equal one device's, each device computes half of a step, and train.py
    --strategy mirrored trains an epoch on them."""
    data = write_tiny_mlds(tmp_path / "data")
    run = tmp_path / "run"
    report = run_mirrored_steps("jax", "--data-dir", str(data), "--ckpt-dir", str(run),
                                *TINY_RUN, "--epochs", "1", JAX_PLATFORMS="cpu",
                                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    single, mirrored = report["single"], report["mirrored"]
    flops_share = mirrored["flops"] / single["flops"]
    print(f"  FLOPs of a step on each device: {single['flops']:.3g} on one device, {mirrored['flops']:.3g} on each "
          f"of two ({flops_share:.2f}); train.py --strategy mirrored, 1 epoch: {report['train_py']['seconds']:.1f} s")
    # one slice per process, padded with empty rows to the batch size rounded up to a multiple of the devices, and
    # to caption widths in multiples of 8
    assert single["slices"] == mirrored["slices"] == [[7], [1]]
    assert all(shape[0] == 7 and shape[1] % 8 == 0 for (shape,) in single["shapes"])
    assert all(shape[0] == 8 and shape[1] % 8 == 0 for (shape,) in mirrored["shapes"])
    # each device runs the model on its 4 rows of 8 (Adam on all the weights): 0.61; on all 8 rows it would be 0.99
    assert flops_share < 0.75
    assert report["train_py"]["exit"] == 0
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1] and history["val_bleu1"].notna().all()
    saved = latest_checkpoint(run / "last")
    assert read_state(saved)["step"] == BATCHES_PER_EPOCH and read_state(saved)["backend"] == "jax"
    assert all(np.isfinite(w).all() for w in checkpoint_weights(saved).values())


# dropout and noise off, so two workers and one device compute the same steps; one of the 24 videos is held out
# for validation, so 23 x 3 = 69 pairs = 4 batches of 17 and one of 1
TINY_RUN = ["--hidden", "16", "--frames", "6", "--batch-size", "17", "--learning-rate", "0.01", "--min-word-count",
            "1", "--dropout", "0", "--feature-noise", "0", "--schedule", "constant", "--epochs", "2"]
BATCHES_PER_EPOCH = 5


def free_loopback_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def run_workers(argvs, logs, scratch, interrupt_after_batches=None, timeout=240):
    """Run train.py on TensorFlow with argvs[i] as worker i on 127.0.0.1, worker 0 the chief, killing both if they
    outlast timeout; their output goes to logs/<n>.worker<i>.out and .err. With interrupt_after_batches, worker 1
    gets Ctrl-C once its progress bar shows that many batches of epoch 1. Returns the exit statuses and stdouts."""
    addresses = [f"127.0.0.1:{port}" for port in free_loopback_ports(2)]
    launch = len(list(logs.glob("*.worker0.out")))
    log = {index: (logs / f"{launch}.worker{index}.out", logs / f"{launch}.worker{index}.err") for index in range(2)}
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        # the progress bar drawn at every batch (tqdm reads its defaults from TQDM_*), so Ctrl-C can come mid-epoch
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TMPDIR=str(scratch), KERAS_BACKEND="tensorflow",
                   TQDM_MININTERVAL="0", TQDM_MINITERS="1")
        with open(log[index][0], "w") as out, open(log[index][1], "w") as err:
            workers.append(subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *argvs[index], "--strategy", "multiworker"], cwd=ROOT, env=env,
                stdout=out, stderr=err, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    deadline = time.monotonic() + timeout
    try:
        if interrupt_after_batches:
            progress = re.compile(r"epoch 1/\d: [^\r\n]*\| +(\d+)/%d " % BATCHES_PER_EPOCH)
            while workers[1].poll() is None and time.monotonic() < deadline:
                done = [int(n) for n in progress.findall(log[1][1].read_text())]
                if done and max(done) >= interrupt_after_batches:
                    workers[1].send_signal(signal.SIGINT)
                    break
                time.sleep(0.01)
        codes = [worker.wait(timeout=max(deadline - time.monotonic(), 1)) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return codes, [log[index][0].read_text() for index in range(2)]


def checkpoint_weights(checkpoint):
    """{name: array} of a checkpoint's model.weights.h5."""
    weights = {}
    with h5py.File(checkpoint / "model.weights.h5", "r") as file:
        file.visititems(lambda name, item: weights.update({name: item[()]}) if isinstance(item, h5py.Dataset)
                        else None)
    return weights


def optimizer_iterations(checkpoint):
    with h5py.File(checkpoint / "optimizer.h5", "r") as file:
        return int(file["0"][()])  # Keras saves the optimizer's step count first


def folder_files(folder):
    """{path: (modification time, bytes)} of every file under folder."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in folder.rglob("*") if path.is_file()}


def test_two_workers_with_a_folder_each_stop_resume_and_equal_one_device(tmp_path):
    """Each worker names a run folder of its own (no shared file system): the chief writes its folder, worker 1
    writes nothing there or in its own. Ctrl-C on worker 1 stops a fresh run in epoch 1; both resume, worker 1 from
    its copy of the chief's folder, and finish every epoch with one device's weights. Batches of 17 end each epoch's
    69 pairs with a batch of 1, which leaves the chief an empty slice."""
    data = write_tiny_mlds(tmp_path / "data")
    run, straight, logs, scratch = (tmp_path / name for name in ("run", "straight", "logs", "scratch"))
    elsewhere = tmp_path / "elsewhere"
    logs.mkdir()
    scratch.mkdir()
    argv = ["--data-dir", str(data), "--ckpt-dir", str(run), *TINY_RUN]

    # worker 1 is given a run folder of its own (the last --ckpt-dir counts), which it must leave alone
    started = time.perf_counter()
    codes, outs = run_workers([argv, [*argv, "--ckpt-dir", str(elsewhere)]], logs, scratch, interrupt_after_batches=2)
    interrupted_s = time.perf_counter() - started
    assert codes == [130, 130], (outs, (logs / "0.worker0.err").read_text()[-3000:])
    assert all("interrupted:" in out for out in outs) and "the chief saved" in outs[1]
    assert not elsewhere.exists() and list(scratch.iterdir()) == []  # worker 1 wrote nothing, not even a temporary file
    saved = latest_checkpoint(run / "last")
    state = read_state(saved)
    epoch, batch = state["epoch"], state["batch_in_epoch"]
    assert (epoch, batch) != (0, 0) and epoch < 2  # Ctrl-C on worker 1 stopped both in epoch 1 or at its end
    assert state["step"] == optimizer_iterations(saved) == epoch * BATCHES_PER_EPOCH + batch

    shutil.copytree(run, elsewhere)  # worker 1's copy, as another machine would hold it
    copied = folder_files(elsewhere)
    started = time.perf_counter()
    codes, outs = run_workers([[*argv, "--resume"], [*argv, "--ckpt-dir", str(elsewhere), "--resume"]], logs, scratch)
    resumed_s = time.perf_counter() - started
    assert codes == [0, 0], (outs, (logs / "1.worker0.err").read_text()[-3000:])
    assert all("resumed" in out and "trained 2 epochs" in out for out in outs) and f"resumed {elsewhere}" in outs[1]
    epoch_losses = [re.findall(r"epoch \d/2  loss (\S+)", out) for out in outs]  # the global batches' mean
    assert len(epoch_losses[0]) == 2 - epoch and epoch_losses[0] == epoch_losses[1]
    assert folder_files(elsewhere) == copied and list(scratch.iterdir()) == []

    started = time.perf_counter()  # one device on TensorFlow too: the backends draw other initial weights
    single_argv = ["--data-dir", str(data), "--ckpt-dir", str(straight), *TINY_RUN]
    if backend.BACKEND == "tensorflow":
        assert train.main(single_argv) == 0
    else:
        single = subprocess.run([sys.executable, str(ROOT / "train.py"), *single_argv], cwd=ROOT, capture_output=True,
                                text=True, timeout=240, env=dict(os.environ, KERAS_BACKEND="tensorflow"))
        assert single.returncode == 0, single.stderr[-3000:]
    single_s = time.perf_counter() - started
    latest = latest_checkpoint(run / "last")
    assert read_state(latest)["step"] == optimizer_iterations(latest) == 2 * BATCHES_PER_EPOCH
    workers, one_device = checkpoint_weights(latest), checkpoint_weights(latest_checkpoint(straight / "last"))
    assert workers.keys() == one_device.keys()
    difference = max(float(np.max(np.abs(workers[n] - one_device[n]))) for n in workers)
    print(f"\n2 workers on 127.0.0.1: Ctrl-C on worker 1 stopped both at epoch {epoch + 1}, batch {batch} "
          f"after {interrupted_s:.1f} s; the resumed run took {resumed_s:.1f} s; one device, 2 epochs, "
          f"{single_s:.1f} s; weights differ from one device's by at most {difference:.3g}")
    assert difference <= 1e-5

    history = pd.read_csv(run / "history.csv")  # the chief's, with its validation
    assert list(history["epoch"]) == [1, 2] and history["val_bleu1"].notna().all()
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.json", "curves.png", "history.csv", "last",
                                                     "tensorboard", "val_ids.txt", "vocab.json"]
    out = tmp_path / "out.txt"
    assert infer.main([str(data / "testing_id.txt"), str(out), "--checkpoint", str(run)]) == 0
    ids = (data / "testing_id.txt").read_text().split()
    lines = out.read_text().splitlines()
    assert [line.split(",", 1)[0] for line in lines] == ids and all(line.split(",", 1)[1].strip() for line in lines)


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG: not set"),
    ("{\"cluster\": ", "TF_CONFIG: not valid JSON"),
    ('{"cluster": {"worker": "127.0.0.1:2222"}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG: \"cluster\" must map task types"),
    ('{"cluster": {"worker": ["127.0.0.1:2222"], "ps": ["127.0.0.1:2223"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG: the cluster may hold"),
    ('{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 1}}',
     "TF_CONFIG: \"task\" must name"),
], ids=["unset", "not-json", "addresses-not-a-list", "parameter-server", "index-out-of-range"])
def test_multiworker_without_a_valid_tf_config_is_one_error_line(tiny_data, tmp_path, monkeypatch, capsys,
                                                                 tf_config, message):
    if backend.BACKEND == "jax":  # whatever TF_CONFIG says
        message = "--strategy multiworker: needs the TensorFlow backend"
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    run = tmp_path / "run"
    assert train.main(["--data-dir", str(tiny_data), "--ckpt-dir", str(run), "--strategy", "multiworker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not run.exists()


def test_the_manifest_is_created_whole_and_never_replaced(tmp_path):
    path = tmp_path / "manifest.json"
    assert extract_features.create_whole(path, '{"frames": 4}') is True
    assert extract_features.create_whole(path, '{"frames": 6}') is False  # a later shard compares instead
    assert path.read_text() == '{"frames": 4}' and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_two_shards_at_once_fill_one_feature_folder(tmp_path):
    make_corpus(tmp_path / "corpus", train_videos=8, test_seen=0, seed=4)
    video_dir = tmp_path / "corpus" / "training_data" / "video"
    shared, whole = tmp_path / "shared", tmp_path / "whole"
    command = [sys.executable, str(ROOT / "extract_features.py"), str(video_dir), str(shared), *FAST, "--frames", "4"]
    started = time.perf_counter()
    shards = [subprocess.Popen([*command, "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for i in range(2)]
    try:
        outputs = [shard.communicate(timeout=180) for shard in shards]
    finally:
        for shard in shards:
            if shard.poll() is None:
                shard.kill()
                shard.wait()
    shards_s = time.perf_counter() - started
    assert [shard.returncode for shard in shards] == [0, 0], [err[-2000:] for _, err in outputs]
    counts = [int(re.search(r"extracted (\d+)", out).group(1)) for out, _ in outputs]
    print(f"\ntwo shards at once: {counts[0]} + {counts[1]} clips in {shards_s:.1f} s")
    assert sum(counts) == 8 and min(counts) > 0

    assert extract_features.main([str(video_dir), str(whole), *FAST, "--frames", "4"]) == 0
    assert json.loads((shared / "manifest.json").read_text()) == json.loads((whole / "manifest.json").read_text())
    names = sorted(p.name for p in whole.glob("*.npy"))
    assert len(names) == 8 and sorted(p.name for p in shared.glob("*.npy")) == names
    for name in names:
        np.testing.assert_array_equal(np.load(shared / name), np.load(whole / name))
    assert not [p for p in shared.iterdir() if p.name.startswith(".")]  # no temporary file left behind
