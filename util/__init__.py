"""Small helpers for s2vt: data, vocabulary, metrics, checkpoints, plots and the demo corpus."""
