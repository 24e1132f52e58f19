"""One S2VT (and its variants) on TensorFlow and on JAX: the same loss, gradients and captions from the same weights
and random draws;
runs trained on one backend caption byte-identically on the other; the JAX path runs with TensorFlow made
unimportable; the backend-neutral test files pass on JAX too. A Keras process has one backend: each check computes
on the tests' backend in this process and on the other in one child process (KERAS_BACKEND=tensorflow|jax)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import infer
import train
from conftest import ROOT, write_tiny_mlds
from model import ModelConfig, build_model, caption_loss
from util import backend

BACKENDS = ("tensorflow", "jax")
HERE = backend.BACKEND
OTHER = "jax" if HERE == "tensorflow" else "tensorflow"
CONFIG = dict(vocab_size=13, feature_dim=10, frames=7, hidden=16,
              max_caption_len=6)
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


def run(backend, argv, timeout=300, env=None, check=True):
    """A child process on `backend`: (exit status, stdout, stderr)."""
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **QUIET, "KERAS_BACKEND": backend, **(env or {})})
    if check:
        assert result.returncode == 0, f"{backend}: {argv}\n{result.stderr[-3000:]}"
    return result.returncode, result.stdout, result.stderr


# runs each [module, argv] of the JSON list in argv[2] through module.main(argv) in turn, in one process, and prints
# [exit status, what it printed] of each as JSON; matmuls in full float32, as in the tests' process
MAINS = """
import contextlib, importlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from util import backend
backend.full_float32_matmuls()
results = []
for module, argv in json.loads(sys.argv[2]):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = importlib.import_module(module).main(argv)
    results.append([code, printed.getvalue()])
print(json.dumps(results))
"""


def mains_on(keras_backend, calls):
    """[(exit status, stdout)] of each (module, argv) run through module.main(argv), in turn, in one child process
    on keras_backend: the command lines as their scripts run them, without a Keras start-up each."""
    calls = [[module, [str(a) for a in argv]] for module, argv in calls]
    _, out, _ = run(keras_backend, ["-c", MAINS, ROOT, json.dumps(calls)], timeout=600)
    return [tuple(result) for result in json.loads(out.strip().splitlines()[-1])]


def compute(jobs):
    """For each job, the loss, gradients and decoded captions of the model in job["weights"] (config job["config"])
    with the batch and draws of job["draws"], written to job["out"]."""
    for job in jobs:
        model = build_model(ModelConfig(**json.loads(Path(job["config"]).read_text())))
        model.load_weights(job["weights"])
        data = dict(np.load(job["draws"]))
        features, captions, training = data.pop("features"), data.pop("captions"), bool(data.pop("training"))
        draws = dict({"noise": None, "encoder_mask": None, "backward_mask": None, "h1_mask": None, "h2_mask": None},
                     **data)
        loss, gradients = backend.loss_and_gradients(
            model, lambda: caption_loss(model(features, captions, training=training, draws=draws)[0], captions))
        greedy, _ = model.greedy(features)
        beam, _, log_probs, attention = model.beam_search(features, 3, n_best=3)
        out = {"loss": loss, "greedy": greedy, "beam": beam, "log_probs": log_probs, "beam_attention": attention}
        out.update({f"gradient_{i}": g for i, g in enumerate(gradients)})
        np.savez(job["out"], **backend.to_numpy(out))


# compute() of the JSON list of jobs in argv[2], on the backend of the child
COMPUTE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from test_backends import compute
compute(json.loads(open(sys.argv[2]).read()))
"""


def model_files(tmp_path, attention, **variant):
    """A small model with trained-like weights (standardisation set, peaked outputs), saved for both backends;
    variant: other ModelConfig fields (model, encoder)."""
    keras.utils.set_random_seed(11)
    config = dict(CONFIG, attention=attention, **variant)
    model = build_model(ModelConfig(**config))
    rng = np.random.default_rng(11)
    model.adapt_features(rng.normal(2.0, 3.0, size=(20, 7, 10)).astype(np.float32))
    model.output_projection.kernel.assign(keras.ops.convert_to_numpy(model.output_projection.kernel) * 4.0)
    name = "-".join([attention, *variant.values()])
    weights, config_file = tmp_path / f"{name}.weights.h5", tmp_path / f"{name}.json"
    model.save_weights(weights)
    config_file.write_text(json.dumps(config))
    return weights, config_file


def draws_file(tmp_path, name, training, teacher_forcing_prob):
    """A batch and every random draw of a training pass, made with numpy, so both backends see the same."""
    rng = np.random.default_rng(5)
    batch, length, cfg = 6, 6, CONFIG
    captions = rng.integers(4, cfg["vocab_size"], size=(batch, length)).astype(np.int32)
    for row, n in zip(captions, rng.integers(2, length + 1, size=batch)):
        row[n - 1], row[n:] = 2, 0
    data = {"features": rng.normal(2.0, 3.0, size=(batch, cfg["frames"], cfg["feature_dim"])).astype(np.float32),
            "captions": captions, "training": np.array(training),
            "use_truth": (rng.random((length, batch)) < teacher_forcing_prob) | (np.arange(length) == 0)[:, None]}
    if training:
        keep = 0.7
        mask = lambda *shape: (rng.random(shape) < keep).astype(np.float32) / keep
        data.update(noise=rng.uniform(-0.1, 0.1, (batch, cfg["frames"], cfg["feature_dim"])).astype(np.float32),
                    encoder_mask=mask(cfg["frames"], batch, cfg["hidden"]), h1_mask=mask(length, batch, cfg["hidden"]),
                    h2_mask=mask(length, batch, cfg["hidden"]))
        data.update(backward_mask=mask(cfg["frames"], batch, cfg["hidden"]))  # drawn last: the others stay as they were
    path = tmp_path / f"{name}.npz"
    np.savez(path, **data)
    return path


@pytest.mark.slow
def test_loss_gradients_and_captions_agree_across_backends(tmp_path):
    jobs = []
    for attention, variant in (("none", {}), ("bahdanau", {}), ("luong", {}), ("luong", {"encoder": "bidirectional"}),
                               ("none", {"model": "meanpool"})):
        weights, config_file = model_files(tmp_path, attention, **variant)
        for case, draws in (("p=1, no dropout", draws_file(tmp_path, "forced", False, 1.0)),
                            ("p=0.5, dropout and noise", draws_file(tmp_path, "sampled", True, 0.5))):
            jobs.append({"attention": " ".join([attention, *variant.values()]), "case": case, "weights": str(weights),
                         "config": str(config_file), "draws": str(draws),
                         "out": str(tmp_path / f"{weights.name.split('.')[0]}-{draws.stem}-BACKEND.npz")})
    on = lambda keras_backend: [dict(job, out=job["out"].replace("BACKEND", keras_backend)) for job in jobs]
    jobs_file = tmp_path / f"jobs-{OTHER}.json"
    jobs_file.write_text(json.dumps(on(OTHER)))
    run(OTHER, ["-c", COMPUTE, ROOT, jobs_file])
    compute(on(HERE))
    for job in jobs:
        tf_out, jax_out = (dict(np.load(job["out"].replace("BACKEND", name))) for name in BACKENDS)
        gradients = sorted(k for k in tf_out if k.startswith("gradient_"))
        worst = max(float(np.max(np.abs(tf_out[k] - jax_out[k])) / max(np.max(np.abs(tf_out[k])), 1e-8))
                    for k in gradients)
        print(f"\n{job['attention']}, {job['case']}: loss {float(tf_out['loss']):.7f} (TensorFlow) "
              f"{float(jax_out['loss']):.7f} (JAX); worst gradient difference {worst:.2e} of its largest entry, over "
              f"{len(gradients)} weights")
        assert float(jax_out["loss"]) == pytest.approx(float(tf_out["loss"]), rel=1e-4)
        assert worst <= 1e-4 and any(np.abs(tf_out[k]).max() > 0 for k in gradients)
        np.testing.assert_array_equal(jax_out["greedy"], tf_out["greedy"])
        np.testing.assert_array_equal(jax_out["beam"], tf_out["beam"])
        np.testing.assert_allclose(jax_out["log_probs"], tf_out["log_probs"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(jax_out["beam_attention"], tf_out["beam_attention"], atol=1e-5)
        assert len({tuple(row) for row in tf_out["greedy"]}) > 1  # the captions differ from video to video


TINY = ["--hidden", "16", "--frames", "6", "--batch-size", "8", "--learning-rate", "0.01", "--min-word-count", "1",
        "--epochs", "8", "--schedule", "constant", "--teacher-forcing-start", "0.9"]


@pytest.mark.slow
def test_a_run_trained_on_one_backend_captions_byte_identically_on_the_other(tmp_path):
    """Each backend trains a run (this one in this process, the other in a child) and both caption both runs,
    greedily and by beam search."""
    data = write_tiny_mlds(tmp_path / "data")
    runs = {name: tmp_path / f"run-{name}" for name in BACKENDS}
    decodings = {"1": ["--beam-size", "1"], "3": ["--beam-size", "3", "--n-best", "2"]}
    out = lambda trained_on, captioned_on, beam: tmp_path / f"{trained_on}-{captioned_on}-{beam}.txt"
    captioning = lambda captioned_on: [("infer", [data / "testing_id.txt", out(trained_on, captioned_on, beam),
                                                  "--checkpoint", runs[trained_on], *decoding])
                                       for trained_on in BACKENDS for beam, decoding in decodings.items()]
    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(runs[HERE]), *TINY]) == 0
    results = mains_on(OTHER, [("train", ["--data-dir", data, "--ckpt-dir", runs[OTHER], *TINY]),
                               *captioning(OTHER)])
    assert [code for code, _ in results] == [0] * 5, results
    for _, argv in captioning(HERE):
        assert infer.main([str(a) for a in argv]) == 0
    for trained_on in BACKENDS:
        for beam in decodings:
            assert out(trained_on, "tensorflow", beam).read_bytes() == out(trained_on, "jax", beam).read_bytes(), \
                (trained_on, beam)
        captions = [line.split(",", 1)[1] for line in out(trained_on, "jax", "1").read_text().splitlines()]
        print(f"\ntrained on {trained_on}: greedy captions on both backends {sorted(set(captions))}")
        assert all(captions) and len(set(captions)) > 1  # real captions, told apart by the features


# a `tensorflow` package that refuses to import, and logs who asked in attempts.log beside it
BLOCKER = '''
import traceback
with open(__file__.rsplit("/", 2)[0] + "/attempts.log", "a") as log:
    log.write("".join(traceback.format_stack()[:-1]) + "\\n----\\n")
raise ImportError("tensorflow is blocked in this test")
'''


def importer(stack):
    """The file whose import statement a logged stack records: its innermost frame outside importlib."""
    files = [f for f in re.findall(r'File "([^"]+)"', stack) if not f.startswith("<frozen")]
    return files[-1] if files else "?"


def test_requirement_files_pin_the_same_versions():
    """requirements-jax.txt is requirements.txt less TensorFlow, TensorBoard, tensorflow-text and keras-hub (which
    the JAX install takes with --no-deps: its metadata requires tensorflow-text, hence TensorFlow), plus JAX."""
    def pins(name):
        lines = (ROOT / name).read_text().splitlines()
        return dict(re.split(r"(?=[=<>])", line, 1) for line in lines if line and not line.startswith(("#", "-")))

    default, jax_only = pins("requirements.txt"), pins("requirements-jax.txt")
    assert set(default) - set(jax_only) == {"tensorflow", "tensorboard", "tensorflow-text", "keras-hub"}
    assert set(jax_only) - set(default) == {"jax", "jaxlib"}
    assert all(jax_only[name] == version for name, version in default.items() if name in jax_only)


# the test files written with keras.ops, numpy and util.backend alone, whose code runs on Keras (test_data.py, numpy
# alone, is not run again), in one process: they share JAX's compiled programs (a tenth less CPU time than two);
# less the `pip install -e` of the checkout, which the TensorFlow pass may be running at the same moment
NEUTRAL_TESTS = ["test_model.py", "test_beam.py", "test_constraints.py", "test_speed_equivalence.py",
                 "test_roundtrip.py", "test_validation.py", "test_captioner.py", "test_variants.py"]
NOT_ON_JAX = "tests/test_captioner.py::test_pip_install_editable_puts_no_generic_name_on_the_path"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") == "jax", reason="this run is on JAX already")
def test_the_backend_neutral_tests_pass_on_jax_without_tensorflow(tmp_path):
    """With TensorFlow unimportable: the JAX path trains, resumes, validates, captions feature files and clips
    (test_roundtrip.py, test_validation.py, test_variants.py, test_captioner.py through train.main, infer.main and
    Captioner), and no file of ours asks for TensorFlow."""
    blocked = tmp_path / "blocked"
    (blocked / "tensorflow").mkdir(parents=True)
    (blocked / "tensorflow" / "__init__.py").write_text(BLOCKER)
    code, out, err = run("jax", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "--deselect", NOT_ON_JAX,
                                 *(f"tests/{name}" for name in NEUTRAL_TESTS)], timeout=900, check=False,
                         env={"PYTHONPATH": str(blocked)})
    log = blocked / "attempts.log"
    importers = [importer(stack) for stack in log.read_text().split("----")[:-1]] if log.exists() else []
    ours = [path for path in importers if path.startswith(f"{ROOT}/") and "site-packages" not in path]
    print(f"\nKERAS_BACKEND=jax pytest {' '.join(NEUTRAL_TESTS)}, TensorFlow blocked: {out.strip().splitlines()[-1]}; "
          f"tensorflow asked for by {sorted(set(importers)) or 'nobody'}")
    assert code == 0, out[-5000:] + err[-2000:]
    assert ours == []


@pytest.mark.parametrize("command", [["train.py", "--data-dir", "nowhere"], ["infer.py", "ids.txt", "out.txt"]])
def test_an_unsupported_backend_is_one_error_line(command):
    """Keras's numpy backend (built in, like torch's when PyTorch is installed) lacks what the LSTMs need."""
    code, out, err = run("numpy", [ROOT / command[0], *command[1:]], check=False)
    assert code == 2 and out == ""
    assert err.strip() == "error: KERAS_BACKEND=numpy: not supported; s2vt runs on tensorflow (the default) or jax"
