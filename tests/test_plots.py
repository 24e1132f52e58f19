import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from util.plots import DPI, caption_grid, main, plot_attention, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORDS = ["a", "big", "red", "ring", "moves", "to", "the", "left", "<EOS>"]


def read_png(path):
    """The image as (height, width, channels), after checking it really is a PNG."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def attention_weights(rows, frames, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(frames), size=rows)


def moving_square_frames(frames=24, height=48, width=64):
    video = np.full((frames, height, width, 3), (40, 60, 90), np.uint8)
    for i in range(frames):
        video[i, 16:32, 2 * i:2 * i + 12] = (220, 30, 30)
    return video


def write_history(run_dir, with_validation=True, epochs=6):
    run_dir.mkdir()
    rows = {"epoch": range(1, epochs + 1), "teacher_forcing_prob": np.linspace(1.0, 0.6, epochs),
            "train_loss": np.linspace(5, 2, epochs)}
    if with_validation:
        rows.update(val_loss=np.linspace(5.5, 2.6, epochs), val_bleu1=[0.30, 0.45, 0.52, 0.58, 0.57, 0.56],
                    val_cider=np.linspace(0.1, 1.3, epochs), val_bleu4=np.linspace(0.02, 0.3, epochs),
                    example=["v.avi: a man, with a comma"] * epochs)
    pd.DataFrame(rows).to_csv(run_dir / "history.csv", index=False)
    return run_dir


def test_attention_heatmap_has_the_words_on_the_y_axis(tmp_path):
    out = tmp_path / "attention.png"
    fig = plot_attention(WORDS, attention_weights(len(WORDS), 24), out, title="v.avi")
    heatmap = fig.axes[0]
    assert [label.get_text() for label in heatmap.get_yticklabels()] == WORDS
    assert (heatmap.get_xlabel(), heatmap.get_ylabel()) == ("frame", "generated word")
    assert read_png(out).ndim == 3
    assert [p.name for p in tmp_path.iterdir()] == ["attention.png"]  # no temp file left


def test_attention_thumbnails_sit_above_their_frame_columns(tmp_path):
    weights = attention_weights(len(WORDS), 24)
    plot_attention(WORDS, weights, tmp_path / "plain.png")
    fig = plot_attention(WORDS, weights, tmp_path / "thumbs.png", frames_rgb=moving_square_frames(24))
    heatmap, _, strip = fig.axes
    centres = [(image.get_extent()[0] + image.get_extent()[1]) / 2 for image in strip.get_images()]
    assert 8 <= len(centres) <= 10
    assert centres == pytest.approx(list(heatmap.get_xticks()))  # each centred on a ticked frame column
    assert strip.get_xlim() == heatmap.get_xlim()
    plain, thumbs = read_png(tmp_path / "plain.png"), read_png(tmp_path / "thumbs.png")
    assert thumbs.shape[1] == plain.shape[1] and thumbs.shape[0] > plain.shape[0]  # the strip adds height


@pytest.mark.parametrize("frames", [1, 5, 80])
def test_attention_with_few_or_many_frames(tmp_path, frames):
    fig = plot_attention(WORDS[:3], attention_weights(3, frames), tmp_path / "a.png",
                         frames_rgb=moving_square_frames(frames, 20, 20))
    assert 1 <= len(fig.axes[2].get_images()) <= 10
    read_png(tmp_path / "a.png")


def test_attention_shape_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="len\\(words\\)"):
        plot_attention(WORDS, attention_weights(3, 24), tmp_path / "a.png")
    with pytest.raises(ValueError, match="frames_rgb"):
        plot_attention(WORDS, attention_weights(len(WORDS), 24), tmp_path / "a.png",
                       frames_rgb=moving_square_frames(10))


def test_training_curves_show_loss_metrics_and_teacher_forcing(tmp_path):
    run_dir = write_history(tmp_path / "run")
    fig = plot_training_curves(run_dir / "history.csv", run_dir / "curves.png")
    loss_ax, metric_ax, forcing_ax, cider_ax = fig.axes
    assert [ax.get_xlabel() for ax in (loss_ax, metric_ax, forcing_ax)] == ["epoch"] * 3
    assert (loss_ax.get_ylabel(), metric_ax.get_ylabel(), cider_ax.get_ylabel()) == (
        "cross-entropy per word", "BLEU", "CIDEr")
    legend = [text.get_text() for text in cider_ax.get_legend().get_texts()]
    assert legend == ["BLEU@1 (MLDS)", "BLEU-4", "CIDEr", "best BLEU@1 (MLDS) 0.580, epoch 4"]
    assert len(loss_ax.get_lines()) == 2
    height, width, _ = read_png(run_dir / "curves.png").shape
    assert (width, height) == (14 * DPI, 4 * DPI)


@pytest.mark.parametrize("metric, label, on_cider_axis", [("bleu4", "best BLEU-4 0.300, epoch 6", False),
                                                          ("cider", "best CIDEr 1.300, epoch 6", True)])
def test_training_curves_mark_the_best_epoch_of_the_selected_metric(tmp_path, metric, label, on_cider_axis):
    run_dir = write_history(tmp_path / "run")
    (run_dir / "config.json").write_text(json.dumps({"train": {"select_metric": metric}}))
    assert main(["curves", str(run_dir)]) == 0  # the metric is read from the run's config.json
    fig = plot_training_curves(run_dir / "history.csv", run_dir / "curves.png", metric)
    _, metric_ax, _, cider_ax = fig.axes
    legend = [text.get_text() for text in cider_ax.get_legend().get_texts()]
    assert legend[-1] == label and not any("BLEU@1 (MLDS) 0.580" in text for text in legend)
    marked = [line for ax in (metric_ax, cider_ax) for line in ax.get_lines() if line.get_label() == label]
    assert len(marked) == 1 and (marked[0].axes is cider_ax) == on_cider_axis


def test_training_curves_without_validation(tmp_path):
    run_dir = write_history(tmp_path / "run", with_validation=False)
    fig = plot_training_curves(run_dir / "history.csv", run_dir / "curves.png")
    assert len(fig.axes) == 3 and len(fig.axes[0].get_lines()) == 1
    read_png(run_dir / "curves.png")


def test_curves_cli(tmp_path, capsys):
    run_dir = write_history(tmp_path / "run")
    assert main(["curves", str(run_dir)]) == 0
    read_png(run_dir / "curves.png")
    assert main(["curves", str(tmp_path / "no_run")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_caption_grid(tmp_path):
    video = moving_square_frames(5)
    items = [(video[i], f"predicted caption {i} " + "long " * 3 * i, f"reference caption {i}") for i in range(5)]
    fig = caption_grid(items, tmp_path / "grid.png")
    texts = [text.get_text() for text in fig.texts]
    assert any(text.startswith("predicted: predicted caption 4") for text in texts)
    assert "reference: reference caption 0" in texts
    height, width, _ = read_png(tmp_path / "grid.png").shape
    assert width == 4 * 3 * DPI and height > 2 * 2.2 * DPI  # 4 columns of 3 in, 2 rows of 2.2 in images
    with pytest.raises(ValueError):
        caption_grid([], tmp_path / "empty.png")


def test_curves_are_drawn_every_30_s_and_at_a_sessions_final_epoch(tmp_path, monkeypatch):
    from util import run_folder

    clock, drawn = [0.0], []
    monkeypatch.setattr(run_folder, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(run_folder, "plot_training_curves",
                        lambda history_csv, out_png, metric: drawn.append(len(pd.read_csv(history_csv))))
    run = run_folder.RunFolder(tmp_path, claim=object(), select_metric="loss")
    history = []
    for epoch, seconds in enumerate([5, 5, 25, 5, 30, 5], start=1):  # an epoch ends at 5, 10, 35, 40, 70, 75 s
        clock[0] += seconds
        history.append({"epoch": epoch, "teacher_forcing_prob": 1.0, "train_loss": 1.0 / epoch})
        run.record_epoch(history, final=epoch == 6)
        assert len(pd.read_csv(tmp_path / "history.csv")) == epoch  # history.csv every epoch
    assert drawn == [3, 5, 6]  # 30 s after the session began; 30 s after that drawing; the final
    other_worker = run_folder.RunFolder(tmp_path / "worker", claim=None, select_metric="loss")
    other_worker.record_epoch(history, final=True)
    assert drawn == [3, 5, 6] and not (tmp_path / "worker").exists()
