"""bench.py runs end to end on synthetic inputs and prints one JSON object with every figure."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prints_every_figure_as_json():
    result = subprocess.run([sys.executable, "bench.py", "--config", "demo", "--batch-size", "4", "--beam-size", "2",
                             "--runs", "1", "--warmup", "1", "--matmul-dtype", "bfloat16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("samples_per_s", "captions_per_s", "frames_per_s", "peak_rss_mib"):
        assert figures[key] > 0, key
    assert figures["matmul_dtype"] == "bfloat16" and figures["beam_size"] == 2
