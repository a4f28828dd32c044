"""Reading a Ray node's Prometheus export in tests (tests/pipeline/test_metrics.py, tests/cluster)."""

from __future__ import annotations

import re
import urllib.request


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """`name`'s value summed over the samples whose labels include `labels`; None when there is none."""
    total = None
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(2))
    return total
