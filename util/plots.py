"""Figures for training runs and the docs, each written atomically as a PNG.

    python -m util.plots curves RUN_DIR      (RUN_DIR/curves.png from RUN_DIR/history.csv, as train.py writes it)

Figures are matplotlib Figure objects saved with the Agg renderer, never pyplot: no display and no global state.
Each function also returns its Figure, for inspection.
"""
import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from util.atomic import atomic_path
from util.data import read_json
from util.errors import DataError, command

DPI = 110
VALIDATION_METRICS = {"val_bleu1": "BLEU@1 (MLDS)", "val_bleu4": "BLEU-4", "val_cider": "CIDEr"}


def save_png(fig, out_png):
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def read_history(history_csv):
    import pandas as pd

    path = Path(history_csv)
    if not path.is_file():
        raise DataError(f"{path}: training history not found")
    try:
        history = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    missing = {"epoch", "train_loss", "teacher_forcing_prob"} - set(history.columns)
    if missing or history.empty:
        raise DataError(f"{path}: expected rows with columns epoch, train_loss, teacher_forcing_prob"
                        + (f" (missing {', '.join(sorted(missing))})" if missing else " (no rows)"))
    return history


def plot_training_curves(history_csv, out_png, select_metric="bleu1"):
    """Three panels over the epochs: train/val loss, validation metrics, teacher-forcing probability; a ring marks
    the best epoch by select_metric (bleu1, bleu4, cider or loss), the one train.py keeps as the best checkpoint."""
    history = read_history(history_csv)
    epochs = history["epoch"].to_numpy()
    style = {"marker": "o", "markersize": 3} if len(epochs) <= 40 else {}
    fig = Figure(figsize=(14, 4))
    loss_ax, metric_ax, forcing_ax = fig.subplots(1, 3, sharex=True)  # one epoch axis, also when a panel is empty

    for column, label in (("train_loss", "train (dropout, scheduled sampling)"), ("val_loss", "validation")):
        if column in history and history[column].notna().any():
            loss_ax.plot(epochs, history[column], label=label, **style)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy per word")
    loss_ax.legend()

    # BLEU scores live in [0, 1]; CIDEr goes above 1, so it gets its own axis on the right
    present = [c for c in VALIDATION_METRICS if c in history and history[c].notna().any()]
    lines, top_ax = [], metric_ax
    for column in present:
        ax = top_ax = metric_ax.twinx() if column == "val_cider" else metric_ax
        color = f"C{list(VALIDATION_METRICS).index(column)}"
        lines += ax.plot(epochs, history[column], color=color, label=VALIDATION_METRICS[column], **style)
        if column == "val_cider":
            ax.set_ylabel("CIDEr", color=color)
            ax.set_ylim(bottom=0)
    selected = f"val_{select_metric}"
    if selected == "val_loss" and "val_loss" in history and history["val_loss"].notna().any():
        best = int(history["val_loss"].idxmin())  # the epoch train.py keeps (the first of equal losses)
        loss_ax.plot([epochs[best]], [history["val_loss"][best]], "o", markersize=9, color="black", fillstyle="none",
                     label=f"lowest validation loss {history['val_loss'][best]:.3f}, epoch {epochs[best]}")
        loss_ax.legend()
    if selected in present:  # the epoch train.py keeps as the best checkpoint (the first of equal scores)
        best = int(history[selected].idxmax())
        ax = top_ax if selected == "val_cider" else metric_ax
        lines += ax.plot([epochs[best]], [history[selected][best]], "o", markersize=9, color="black",
                         fillstyle="none", label=f"best {VALIDATION_METRICS[selected]} {history[selected][best]:.3f}, "
                                                 f"epoch {epochs[best]}")
    if lines:
        # on the axes drawn last, so no curve covers it; rising curves leave the lower right free
        top_ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    else:
        metric_ax.text(0.5, 0.5, "no validation metrics", ha="center", va="center", transform=metric_ax.transAxes)
    metric_ax.set(title="Validation (greedy captions)", xlabel="epoch", ylabel="BLEU")
    metric_ax.set_ylim(bottom=0)

    forcing_ax.plot(epochs, history["teacher_forcing_prob"], color="C4", **style)
    forcing_ax.set(title="Teacher forcing", xlabel="epoch", ylabel="P(feed ground-truth word)", ylim=(0, 1.02))

    for ax in (loss_ax, metric_ax, forcing_ax):
        ax.grid(alpha=0.3)
    # fixed margins that fit the labels, the CIDEr axis included: tight_layout measured them at every drawing, 40% of
    # its cost (train.py draws the figure during training)
    fig.subplots_adjust(left=0.045, right=0.985, bottom=0.12, top=0.92, wspace=0.42)
    save_png(fig, out_png)
    return fig


def run_select_metric(run_dir):
    """The --select-metric a run was trained with (its config.json), bleu1 where it records none."""
    path = Path(run_dir) / "config.json"
    config = read_json(path) if path.is_file() else {}
    return (config.get("train") or {}).get("select_metric") or "bleu1"


def plot_attention(words, weights, out_png, frames_rgb=None, title=None):
    """Heatmap of attention weights (len(words), frames): one row per generated word, one column per frame.

    With frames_rgb (frames, H, W, 3) uint8, a strip of up to 10 evenly spaced thumbnails sits above the
    heatmap, each centred on its frame's column (those columns are the x ticks)."""
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2 or weights.shape[0] != len(words):
        raise ValueError(f"weights must be (len(words)={len(words)}, frames), not {weights.shape}")
    frame_count = weights.shape[1]
    if frames_rgb is not None and len(frames_rgb) != frame_count:
        raise ValueError(f"frames_rgb has {len(frames_rgb)} frames, the weights {frame_count}")

    # the layout in inches, so thumbnails keep their aspect and long words their room
    heat_w = float(np.clip(0.1 * frame_count, 4.5, 10))
    heat_h = max(1.5, 0.3 * len(words))
    left = 0.6 + 0.09 * max((len(w) for w in words), default=1)
    right, bottom, top = 1.3, 0.6, 0.5 if title else 0.2
    step = -(-frame_count // 10)  # at most 10 thumbnails, each the middle frame of `step` columns
    thumbs = np.arange(step // 2, frame_count, step)
    # a thumbnail's width in columns: a gap between neighbours, and at most 1 inch when there are few frames
    thumb_span = min(0.92 * step, frame_count / heat_w)
    strip_h = 0.0
    if frames_rgb is not None:
        height, width = frames_rgb.shape[1:3]
        strip_h = heat_w * thumb_span / frame_count * height / width
        top += strip_h + 0.1
    fig_w, fig_h = left + heat_w + right, bottom + heat_h + top
    fig = Figure(figsize=(fig_w, fig_h))
    heat_ax = fig.add_axes((left / fig_w, bottom / fig_h, heat_w / fig_w, heat_h / fig_h))
    image = heat_ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    heat_ax.set_yticks(range(len(words)), words)
    heat_ax.set(xlabel="frame", ylabel="generated word")
    colorbar_ax = fig.add_axes(((left + heat_w + 0.15) / fig_w, bottom / fig_h, 0.15 / fig_w, heat_h / fig_h))
    fig.colorbar(image, cax=colorbar_ax, label="attention weight")

    if frames_rgb is not None:
        heat_ax.set_xticks(thumbs)
        strip_ax = fig.add_axes((left / fig_w, (bottom + heat_h + 0.1) / fig_h, heat_w / fig_w, strip_h / fig_h))
        strip_ax.axis("off")
        for index in thumbs:
            strip_ax.imshow(frames_rgb[index], extent=(index - thumb_span / 2, index + thumb_span / 2, 0, 1),
                            aspect="auto", clip_on=False)
        strip_ax.set(xlim=heat_ax.get_xlim(), ylim=(0, 1))  # imshow widens the limits to its extent
    if title:
        fig.suptitle(title, y=1 - 0.1 / fig_h, va="top")
    save_png(fig, out_png)
    return fig


def caption_grid(items, out_png, columns=4, wrap=34):
    """A gallery: for each (frame_rgb HxWx3 uint8, predicted caption, reference caption), the frame with both
    captions under it, `columns` items per row."""
    if not items:
        raise ValueError("caption_grid needs at least one item")
    columns = min(columns, len(items))
    rows = -(-len(items) // columns)
    texts = [(textwrap.wrap(f"predicted: {predicted}", wrap), textwrap.wrap(f"reference: {reference}", wrap))
             for _, predicted, reference in items]
    text_lines = max(len(p) + len(r) for p, r in texts)
    cell_w, image_h, pad, line_h, block_gap = 3.0, 2.2, 0.12, 0.17, 0.06  # inches; line_h fits 9 pt text
    cell_h = pad + image_h + pad + text_lines * line_h + block_gap + 2 * pad
    fig_w, fig_h = columns * cell_w, rows * cell_h
    fig = Figure(figsize=(fig_w, fig_h))
    for n, ((frame, _, _), (predicted_lines, reference_lines)) in enumerate(zip(items, texts)):
        x0, y = (n % columns) * cell_w, fig_h - (n // columns) * cell_h - pad  # y: top of what comes next
        image_ax = fig.add_axes(((x0 + pad) / fig_w, (y - image_h) / fig_h, (cell_w - 2 * pad) / fig_w,
                                 image_h / fig_h))
        image_ax.imshow(frame)
        image_ax.axis("off")
        y -= image_h + pad
        for lines, color, weight in ((predicted_lines, "black", "bold"), (reference_lines, "dimgray", "normal")):
            fig.text((x0 + cell_w / 2) / fig_w, y / fig_h, "\n".join(lines), ha="center", va="top",
                     multialignment="center", fontsize=9, color=color, fontweight=weight)
            y -= len(lines) * line_h + block_gap
    save_png(fig, out_png)
    return fig


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("curves", help="RUN_DIR/curves.png from RUN_DIR/history.csv")
    curves.add_argument("run_dir", help="a training run folder (checkpoints/<run>)")
    curves.add_argument("--select-metric", choices=("bleu1", "bleu4", "cider"),
                        help="the metric whose best epoch is marked (default: the run's, from config.json)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    metric = args.select_metric or run_select_metric(run_dir)
    plot_training_curves(run_dir / "history.csv", run_dir / "curves.png", metric)
    print(run_dir / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
