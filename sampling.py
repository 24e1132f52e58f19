"""Teacher-forcing schedules for scheduled sampling: the probability, per epoch, of feeding the ground truth.

    python sampling.py [--epochs 100] [--schedule inverse_sigmoid|linear|constant] [--out util/sigmoid.png]

inverse_sigmoid is the reference's: p = 1 / (1 + e^x) for x = arange(-2, 2, 4 / epochs), 0.8808 ... 0.1235 at 100.
linear falls from --start to --end; constant keeps --start.
"""
import argparse
import sys

import numpy as np

from util.errors import command

SCHEDULES = ("inverse_sigmoid", "linear", "constant")


def teacher_forcing_schedule(epochs, schedule="inverse_sigmoid", start=1.0, end=0.0):
    """The teacher-forcing probability of each epoch, shape (epochs,)."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, not {epochs}")
    if schedule == "inverse_sigmoid":
        x = np.arange(-2, 2, 4 / epochs)[:epochs]
        return 1 / (1 + np.exp(x))
    if schedule == "linear":
        return np.linspace(start, end, epochs)
    if schedule == "constant":
        return np.full(epochs, float(start))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")


def plot_schedule(probs, schedule, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from util.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(np.arange(1, len(probs) + 1), probs, marker="." if len(probs) <= 50 else None)
    ax.set(xlabel="epoch", ylabel="P(feed ground-truth word)", ylim=(0, 1.02),
           title=f"Teacher-forcing schedule: {schedule}, {len(probs)} epochs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--schedule", choices=SCHEDULES, default="inverse_sigmoid")
    parser.add_argument("--start", type=float, default=1.0, help="linear/constant: first probability")
    parser.add_argument("--end", type=float, default=0.0, help="linear: last probability")
    parser.add_argument("--out", default="util/sigmoid.png", help="PNG of the curve (default util/sigmoid.png)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.epochs <= 0:
        parser.error("--epochs must be positive")
    probs = teacher_forcing_schedule(args.epochs, args.schedule, args.start, args.end)
    for epoch, p in enumerate(probs, 1):
        print(f"epoch {epoch:4d}  teacher_forcing_prob {p:.4f}")
    plot_schedule(probs, args.schedule, args.out)  # a DataError: an --out that cannot be written
    print(f"{args.schedule}: {probs[0]:.4f} ... {probs[-1]:.4f} over {args.epochs} epochs; plot in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
