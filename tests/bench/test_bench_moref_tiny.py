"""The MoRef benchmark's own CPU self-check (`--tiny`), so the GPU benchmark never rots unnoticed."""

import json
import subprocess
import sys

from tests.paths import REPO


def test_bench_moref_tiny_runs_every_case(tmp_path):
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_moref.py"), "--tiny", "--device", "cpu",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_moref.json").read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert {"native-64", "moref-128", "moref-256", "moref-512"} <= set(cases)
    assert all(c["status"] == "ok" for c in cases.values())
    assert (tmp_path / "bench_moref.md").read_text().startswith("Free-MoRef benchmark")
