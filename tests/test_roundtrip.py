"""train.py -> checkpoint -> resume -> infer.py on a tiny configuration."""
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest

import infer
from decoding import NO_REPEAT_NGRAM, Constraints
import train
from conftest import checkpoint_weights, optimizer_iterations, write_tiny_mlds
from util import backend
from model import load_model
from util.checkpoints import latest_checkpoint, read_state
from util.data import load_features

TINY = ["--hidden", "16", "--frames", "6", "--batch-size", "8", "--learning-rate", "0.01", "--min-word-count", "1"]


def run_train(data, run_dir, *extra):
    return train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TINY, *extra])


def interrupt_after(steps, monkeypatch):
    """Make train.py's training step send this process Ctrl-C once it has run `steps` times."""
    make_step, count = backend.make_train_step, [0]

    def make_interrupting_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def interrupting_step(*step_args):
            count[0] += 1
            if count[0] == steps:
                os.kill(os.getpid(), signal.SIGINT)
            return step(*step_args)

        interrupting_step.sync, interrupting_step.prepare = step.sync, step.prepare
        return interrupting_step

    monkeypatch.setattr(backend, "make_train_step", make_interrupting_step)


FLAGS = ["--epochs", "3", "--schedule", "constant", "--teacher-forcing-start", "0.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data, run): a run trained straight through on tiny data, which the tests read and never change."""
    data = write_tiny_mlds(tmp_path_factory.mktemp("roundtrip") / "data")
    assert run_train(data, data.parent / "straight", *FLAGS) == 0
    return data, data.parent / "straight"


def test_train_resume_continues_exactly_and_infer_writes_captions(trained, tmp_path, capsys, monkeypatch):
    tiny_data, straight = trained
    resumed, flags = tmp_path / "resumed", FLAGS
    steps_per_epoch = -(-69 // 8)  # 23 videos x 3 captions (one video held out for validation), batch 8
    with monkeypatch.context() as patch:
        interrupt_after(steps_per_epoch + 3, patch)
        assert run_train(tiny_data, resumed, *flags) == 130  # Ctrl-C in epoch 2
    first = latest_checkpoint(resumed / "last")
    state = read_state(first)
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 3 and state["step"] == steps_per_epoch + 3
    assert optimizer_iterations(first) == steps_per_epoch + 3
    assert first.name == f"step-{steps_per_epoch + 3:08d}"

    assert run_train(tiny_data, resumed, *flags, "--resume") == 0
    assert f"resumed {first}: epoch 2, batch 3, step {steps_per_epoch + 3}" in capsys.readouterr().out
    latest = latest_checkpoint(resumed / "last")
    state = read_state(latest)
    assert state["epoch"] == 3 and state["batch_in_epoch"] == 0 and state["step"] == 3 * steps_per_epoch
    assert optimizer_iterations(latest) == 3 * steps_per_epoch
    history = pd.read_csv(resumed / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    # the resumed run ends with the same weights as the uninterrupted one
    reference = checkpoint_weights(latest_checkpoint(straight / "last"))
    resumed_weights = checkpoint_weights(latest)
    assert resumed_weights.keys() == reference.keys() and reference
    for name, value in resumed_weights.items():
        np.testing.assert_allclose(value, reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("config.json", "vocab.json", "best", "curves.png", "val_ids.txt"):
        assert (resumed / name).exists()
    assert (resumed / "tensorboard").exists() == (backend.BACKEND == "tensorflow")  # TensorBoard logs: TF only
    assert {"val_loss", "val_bleu1", "val_bleu4", "val_cider", "teacher_forcing_prob"} <= set(history.columns)

    out = tmp_path / "out.txt"
    ids = (tiny_data / "testing_id.txt").read_text().split()
    assert infer.main([str(tiny_data / "testing_id.txt"), str(out), "--checkpoint", str(resumed)]) == 0
    lines = out.read_text().splitlines()
    assert [line.split(",", 1)[0] for line in lines] == ids
    # the captions of the run's best checkpoint, decoded here from its weights; a tiny model may end a caption at
    # once (greedy <EOS> first, as the epoch-2 best on JAX does for the dog clips), but not every one
    model, vocab, config, best = load_model(resumed)
    assert best == latest_checkpoint(resumed / "best")
    features = load_features(tiny_data / "testing_data" / "feat", ids, dtype=np.float32)
    # under infer.py's default constraints: no repeats, no caption ending on a word the training captions never end on
    constraints = Constraints(NO_REPEAT_NGRAM, vocab.ids(config["decoding"]["cannot_end"]))
    words = backend.to_numpy(model.greedy(features, constraints=constraints)[0])
    assert [line.split(",", 1)[1] for line in lines] == [vocab.decode(row) for row in words]
    assert any(line.split(",", 1)[1].strip() for line in lines)


def folder_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_resume_refuses_changed_training_flags_naming_each_and_writes_nothing(trained, capsys):
    tiny_data, run_dir = trained
    before = folder_state(run_dir)
    capsys.readouterr()
    changed = {"--batch-size": ("8", "6"), "--seed": ("0", "3"), "--pairs": ("all", "sample"),
               "--epochs": ("3", "4"), "--schedule": ("constant", "inverse_sigmoid"),
               "--teacher-forcing-start": ("0.5", "1.0"), "--teacher-forcing-end": ("0.8", "0.2"),
               "--learning-rate": ("0.01", "0.02"),
               "--clip-norm": ("5.0", "1.0"), "--dropout": ("0.5", "0.1"), "--feature-noise": ("0.1", "0.0"),
               "--val-fraction": ("None", "0.2"), "--select-metric": ("loss", "cider"),
               "--matmul-dtype": ("float32", "bfloat16"), "--model": ("s2vt", "meanpool"),
               "--encoder": ("unidirectional", "bidirectional"), "--init-from": ("None", "elsewhere")}
    for flag, (old, new) in changed.items():
        argv = ["--data-dir", str(tiny_data), "--ckpt-dir", str(run_dir), *TINY, *FLAGS, flag, new, "--resume"]
        assert train.main(argv) == 2, flag
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run_dir}: cannot resume with changed training settings")
        assert f"{flag}: {old} saved, {new} asked" in err[0], err[0]
    # several at once: one line naming each
    assert train.main(["--data-dir", str(tiny_data), "--ckpt-dir", str(run_dir), *TINY, *FLAGS,
                       "--hidden", "32", "--seed", "5", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--hidden: 16 saved, 32 asked; --seed: 0 saved, 5 asked" in err
    assert folder_state(run_dir) == before


def test_infer_refuses_an_unknown_id(trained, tmp_path, capsys):
    tiny_data, run_dir = trained
    ids = tmp_path / "ids.txt"
    ids.write_text("testing_000.avi\nno_such_video.avi\n")
    out = tmp_path / "out.txt"
    code = infer.main([str(ids), str(out), "--checkpoint", str(run_dir),
                       "--feat-dir", str(tiny_data / "testing_data" / "feat")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_video.avi.npy" in err and "not found" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_infer_beam_search_n_best_and_attention_plots(trained, tmp_path):
    tiny_data, run_dir = trained
    ids_file = tiny_data / "testing_id.txt"
    greedy_out, beam_out = tmp_path / "greedy.txt", tmp_path / "beam.txt"
    assert infer.main([str(ids_file), str(greedy_out), "--checkpoint", str(run_dir)]) == 0
    assert infer.main([str(ids_file), str(beam_out), "--checkpoint", str(run_dir), "--beam-size", "3",
                       "--n-best", "2", "--length-penalty", "0.5", "--attention-dir", str(tmp_path / "att")]) == 0
    ids = ids_file.read_text().split()
    n_best = json.loads((tmp_path / "beam.txt.nbest.json").read_text())
    assert list(n_best) == ids
    beam_lines = dict(line.split(",", 1) for line in beam_out.read_text().splitlines())
    for video_id, hypotheses in n_best.items():
        assert len(hypotheses) == 2 and hypotheses[0]["score"] >= hypotheses[1]["score"]
        assert hypotheses[0]["caption"] == beam_lines[video_id]
    pngs = sorted(p.name for p in (tmp_path / "att").glob("*.png"))
    assert pngs == sorted(f"{i}.png" for i in ids)
    assert (tmp_path / "att" / pngs[0]).read_bytes()[:4] == b"\x89PNG"
    # beam size 1 is greedy decoding
    one_out = tmp_path / "one.txt"
    assert infer.main([str(ids_file), str(one_out), "--checkpoint", str(run_dir), "--beam-size", "1"]) == 0
    assert one_out.read_text() == greedy_out.read_text()
