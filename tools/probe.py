"""Linear probes: how well demo-corpus features tell each captioned attribute (colour, shape, direction).

    python -m tools.probe TRAIN_FEAT_DIR TEST_FEAT_DIR --train-labels training_label.json
                         --test-labels testing_label.json [--pool mean|concat]

For each attribute, a ridge regression onto one-hot classes (numpy; the class of highest output wins) from each
clip's features, averaged over its frames (mean: what is there, not in what order) or all frames in order (concat),
standardised on the training clips; the penalty is picked by 5-fold cross-validation on the training clips, then
the test clips are scored once. Attributes are read from each clip's first reference caption
(tools.demo_data.parse_caption).
"""
import argparse
import sys

import numpy as np

from tools.demo_data import parse_caption
from util.data import load_features, load_labels
from util.errors import DataError, command

ATTRIBUTES = ("colour", "shape", "direction")
PENALTIES = 10.0 ** np.arange(-6, 1)  # times the largest squared singular value of the training features
FOLDS = 5


def clip_vectors(features, pool):
    """(videos, frames, dim) -> (videos, dim) averaged over frames, or (videos, frames * dim) in frame order."""
    features = np.asarray(features, np.float64)
    return features.mean(1) if pool == "mean" else features.reshape(len(features), -1)


def ridge_predictions(train_x, train_classes, test_x, penalties):
    """Class indices predicted for test_x by ridge regression onto one-hot train_classes, one row per penalty
    (relative to the largest squared singular value of the standardised training features)."""
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / scale, (test_x - mean) / scale
    targets = np.eye(train_classes.max() + 1)[train_classes]
    target_mean = targets.mean(0)
    u, s, vt = np.linalg.svd(train_x, full_matrices=False)
    projected_targets = u.T @ (targets - target_mean)
    predictions = []
    for penalty in penalties * s[0] ** 2:
        weights = vt.T @ ((s / (s ** 2 + penalty))[:, None] * projected_targets)
        predictions.append(np.argmax(test_x @ weights + target_mean, 1))
    return np.array(predictions)


def probe(train_x, train_classes, test_x, test_classes, folds=FOLDS, seed=0):
    """(cross-validated training accuracy, test accuracy, penalty) with the penalty of best cross-validation."""
    order = np.random.default_rng(seed).permutation(len(train_x))
    right = np.zeros(len(PENALTIES))
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        right += (ridge_predictions(train_x[rest], train_classes[rest], train_x[fold], PENALTIES)
                  == train_classes[fold]).sum(1)
    best = int(np.argmax(right))
    test = ridge_predictions(train_x, train_classes, test_x, PENALTIES[best:best + 1])[0]
    return float(right[best] / len(train_x)), float(np.mean(test == test_classes)), float(PENALTIES[best])


def attribute_classes(labels):
    """{attribute: [its value in each video]} from the labels' first captions."""
    parsed = [parse_caption(captions[0]) for _, captions in labels]
    classes = {}
    for k, attribute in enumerate(ATTRIBUTES):
        values = [p[k] for p in parsed]
        if None in values:
            video = labels[values.index(None)][0]
            raise DataError(f"{video}: its first caption names no single {attribute}; not a demo-corpus label")
        classes[attribute] = values
    return classes


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_feat_dir")
    parser.add_argument("test_feat_dir")
    parser.add_argument("--train-labels", required=True)
    parser.add_argument("--test-labels", required=True)
    parser.add_argument("--pool", choices=("mean", "concat"), default="mean")
    args = parser.parse_args(argv)
    train_labels, test_labels = load_labels(args.train_labels), load_labels(args.test_labels)
    train_x = clip_vectors(load_features(args.train_feat_dir, [v for v, _ in train_labels]), args.pool)
    test_x = clip_vectors(load_features(args.test_feat_dir, [v for v, _ in test_labels]), args.pool)
    train_values, test_values = attribute_classes(train_labels), attribute_classes(test_labels)
    print(f"{'attribute':<10} {'classes':>7} {'train CV':>9} {'test':>7}  penalty")
    for attribute in ATTRIBUTES:
        names = sorted(set(train_values[attribute]))
        unknown = sorted(set(test_values[attribute]) - set(names))
        if unknown:
            raise DataError(f"{args.test_labels}: {attribute} {unknown} never seen in training")
        index = {name: i for i, name in enumerate(names)}
        cv, test, penalty = probe(train_x, np.array([index[v] for v in train_values[attribute]]), test_x,
                                  np.array([index[v] for v in test_values[attribute]]))
        print(f"{attribute:<10} {len(names):>7} {cv:>9.1%} {test:>7.1%}  {penalty:g}")
    print(f"probed {len(train_x)} training and {len(test_x)} test clips, {args.pool} of {train_x.shape[1]} "
          f"features each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
