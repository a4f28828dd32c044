#!/usr/bin/env python3
"""The per-query parts of an indexed text search at 1M frames that grow with the archive, timed
without writing 1M frames (bench/bench_search.py --scales 1000000 writes them all, ~12 min and
~15 GiB on a 2-core, 24 GiB machine):

  open     faiss.read_index of the IVF-Flat index (1000 lists, 768-d), memory-mapped, as a query opens it
  ids      the id map (1M rows: id, video_id, frames file) read with its strings as dictionaries
  search   the index's 1,000 nearest frames at nprobe 48 (DEFAULT_NPROBE)
  listing  frames/ of 3,334 files (one per 300-frame video) listed with sizes and times

The vectors are topic directions plus noise (not the full bench's drifting videos), so recall is
not measured here; the rest of a query (state.json, reading the ~50 candidate videos' files,
exact scores and moments) does not grow with the archive and is timed by bench/bench_search.py.

    python3 bench/bench_search_parts.py --out DIR     # ~4 min on 2 cores, ~5 GiB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.readers.vector_index import DEFAULT_CANDIDATES, DEFAULT_NPROBE, _local_listing

FRAMES, DIM, LISTS, FRAMES_PER_VIDEO, QUERIES = 1_000_000, 768, 1000, 300, 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    topics = rng.standard_normal((2000, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)

    def vectors(n: int) -> np.ndarray:
        x = topics[rng.integers(len(topics), size=n)] + rng.standard_normal((n, DIM)).astype(np.float32) * (
            1.3 / np.sqrt(DIM))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    start = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, LISTS, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.seed = 10, 0
    index.train(vectors(LISTS * 64))
    for first in range(0, FRAMES, 100_000):
        index.add_with_ids(vectors(100_000), np.arange(first, first + 100_000, dtype=np.int64))
    faiss.write_index(index, str(out / "ivf.faiss"))
    del index
    build_s = time.perf_counter() - start
    videos = np.repeat([f"video-{v:06d}" for v in range(FRAMES // FRAMES_PER_VIDEO + 1)], FRAMES_PER_VIDEO)[:FRAMES]
    pq.write_table(pa.table({"id": np.arange(FRAMES, dtype=np.int64), "video_id": videos,
                             "file": np.char.add(videos, "-0123456789ab.parquet")}), out / "ids.parquet")
    for v in range(FRAMES // FRAMES_PER_VIDEO + 1):
        (out / "frames" / f"video-{v:06d}-0123456789ab.parquet").write_bytes(b"x" * 100)

    times: dict[str, list[float]] = {"open": [], "ids": [], "search": [], "listing": []}
    for query in vectors(QUERIES):
        t = time.perf_counter()
        opened = faiss.read_index(str(out / "ivf.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        times["open"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pq.read_table(out / "ids.parquet", read_dictionary=["video_id", "file"])
        times["ids"].append(time.perf_counter() - t)
        t = time.perf_counter()
        opened.search(query.reshape(1, -1), DEFAULT_CANDIDATES, params=faiss.SearchParametersIVF(nprobe=DEFAULT_NPROBE))
        times["search"].append(time.perf_counter() - t)
        t = time.perf_counter()
        _local_listing(str(out / "frames"))
        times["listing"].append(time.perf_counter() - t)
    result = {"frames": FRAMES, "lists": LISTS, "nprobe": DEFAULT_NPROBE, "build_s": round(build_s, 1),
              "load_avg_at_end": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
              "seconds": {part: {"first": round(ts[0], 4), "median": round(statistics.median(ts), 4),
                                 "max": round(max(ts), 4)} for part, ts in times.items()}}
    (out / "bench_search_parts.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
