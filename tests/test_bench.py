"""bench.py runs end to end on synthetic inputs and prints one JSON object with every figure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prints_every_figure_as_json(monkeypatch, capsys):
    """Training, inference and extraction (no --what: all three) in this process, VGG16 on one frame a call."""
    monkeypatch.setattr(bench, "EXTRACT_FRAMES", 1)
    capsys.readouterr()
    assert bench.main(["--config", "demo", "--batch-size", "4", "--beam-size", "2", "--runs", "1", "--warmup", "1",
                       "--matmul-dtype", "bfloat16"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("samples_per_s", "captions_per_s", "frames_per_s", "peak_rss_mib"):
        assert figures[key] > 0, key
    assert figures["matmul_dtype"] == "bfloat16" and figures["beam_size"] == 2
    assert figures["cnn"] == "vgg16 fc2, batch 1"


@pytest.mark.slow
def test_feature_files_benchmark_scaled_down(tmp_path):
    """The MSR-VTT-size benchmark from the command line (bench.py --what feature-files, which times train.py in
    child processes) at the demo's feature size and 10 videos, in memory and from their files."""
    result = subprocess.run([sys.executable, "bench.py", "--what", "feature-files", "--config", "demo", "--videos",
                             "10", "--batch-size", "16", "--data-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nfeature-files, scaled down: {figures}")
    for name in ("in_memory", "from_files"):
        assert figures[f"{name}_rss_anon_peak_mib"] > 0 and figures[f"{name}_samples_per_s"] > 0
        assert figures[f"{name}_features_mib"] == 10 * 12 * 1280 * 2 / 2**20  # 100 in memory unless --videos is fewer
