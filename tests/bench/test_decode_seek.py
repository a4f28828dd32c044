"""bench/decode_seek.py's CPU self-check: a short repeated-segment archive video, both seek modes
and parallel decoders, the report's fields."""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO


def test_decode_seek_reports_both_modes_and_parallel_decoders(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "bench" / "decode_seek.py"), "--seconds", "50", "--width", "160",
                    "--height", "96", "--keyframe-s", "2", "--frames", "16", "--repeats", "1", "--parallel", "2",
                    "--work", str(tmp_path / "work"), "--out", str(out)], check=True, capture_output=True, timeout=600)
    (path,) = out.glob("decode_seek_pyav_160x96_*.json")
    report = json.loads(path.read_text())
    assert report["video"]["seconds"] == pytest.approx(50, abs=0.1)  # a 20 s segment repeated past its length
    exact, keyframe = report["modes"]["exact"], report["modes"]["keyframe"]
    assert exact["frames_returned"] == 16 and keyframe["frames_returned"] <= 16
    assert all(abs(t / 2 - round(t / 2)) < 1e-6 for t in keyframe["first_times_s"])  # keyframes every 2 s
    assert keyframe["cpu_s"] < exact["cpu_s"]
    parallel = report["parallel"]
    assert (parallel["sessions"], parallel["seek"], len(parallel["per_video_s"])) == (2, "exact", 2)
    assert parallel["videos_per_hour"] == pytest.approx(2 / parallel["wall_s"] * 3600)
