"""The decoding-step benchmark's CPU self-check (`--tiny`): a case's eager and replayed steps are timed
apart and reported against the bytes a step must read; bad case specs are refused."""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO

SCRIPT = str(REPO / "bench" / "decode_step.py")


def test_the_tiny_run_times_the_step_and_reports_its_bandwidth(tmp_path):
    subprocess.run([sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--frames", "32", "--cases",
                    "question:1,video:3", "--steps", "2", "--peak-bandwidth-gbs", "50", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "decode_step.json").read_text())
    assert [(c["fusion_scope"], c["questions"], c["frames"]) for c in report["cases"]] == [
        ("question", 1, 32), ("video", 3, 32)]
    for case in report["cases"]:
        assert case["eager_step_ms"] > 0 and case["step_ms"] > 0 and "capture_ms" not in case  # no graph on CPU
        assert case["achieved_gbs"] == pytest.approx(case["step_bytes"] / case["step_ms"] / 1e6)
        assert case["floor_ms"] == pytest.approx(case["step_bytes"] / 50 / 1e6)
    # three questions in video scope read more than one question's step (their own tokens)
    assert report["cases"][1]["step_bytes"] > report["cases"][0]["step_bytes"]
    assert "| replayed step ms |" in (tmp_path / "decode_step.md").read_text()


def test_a_bad_case_is_refused_naming_it():
    done = subprocess.run([sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--cases", "everything:2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'everything:2'" in done.stderr
