#!/usr/bin/env python3
"""Text-search latency and recall over synthetic frames tables of 10k, 100k and 1M frames.

Embeddings are 768-d (CLIP ViT-L/14's joint space), L2-normalised, shaped like an archive:
videos of 300 frames; each video belongs to one of 2,000 topics and drifts slowly around it, so
neighbouring frames are similar and videos of a topic cluster. Queries are topic directions plus
noise (a text is near the frames it describes, at CLIP-like cosines of 0.2-0.4).

Per scale, the frames/ table is written as the pipeline writes it (one Parquet file per video),
then:
  brute force  `pipeline.readers.search.search_vector` with the approximate index off: columnar read of
               every frame + exact scores + moments, per query (a fresh reader each time, as a
               CLI call would be; the OS page cache is warm after the first query)
  index build  `VectorIndex.sync()`: faiss IVF-Flat trained and filled from frames/
  ann          `search_vector` through the index (fresh reader per query: state, id map, mmap)
  recall@10    the index's 10 nearest frames against the exact 10 nearest, averaged over queries
  moments      share of queries whose top-10 moments are identical with and without the index

    python3 bench/bench_search.py --out DIR                   # 10k, 100k, 1M (~25 min, 2 cores)
    python3 bench/bench_search.py --scales 2000 --out DIR     # a self-check in seconds

Writes DIR/bench_search.json (rewritten after every scale) and DIR/bench_search.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.readers.search import FramesIndex, search_vector
from pipeline.readers.vector_index import VectorIndex
from pipeline.schema import frames_schema
from pipeline.store.output_store import FRAMES_DIR, video_key

DIM = 768
FRAMES_PER_VIDEO = 300
TOPICS = 2000
QUERIES = 20
MIN_SCORE = 0.2


def topic_directions(rng: np.random.Generator) -> np.ndarray:
    t = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def write_frames(root: Path, n_frames: int, topics: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Write frames/ under root; return all embeddings (N, D) in file order and the videos' topics."""
    out = root / FRAMES_DIR
    out.mkdir(parents=True, exist_ok=True)
    schema = frames_schema(DIM)
    chunks, video_topics = [], []
    for v in range(int(np.ceil(n_frames / FRAMES_PER_VIDEO))):
        n = min(FRAMES_PER_VIDEO, n_frames - v * FRAMES_PER_VIDEO)
        video_topics.append(rng.integers(TOPICS))
        base = topics[video_topics[-1]] + 0.6 * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        drift = np.cumsum(rng.standard_normal((n, DIM)).astype(np.float32), axis=0) * (0.05 / np.sqrt(DIM))
        emb = base + drift + rng.standard_normal((n, DIM)).astype(np.float32) * (1.2 / np.sqrt(DIM))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        vid = f"video-{v:06d}"
        table = pa.table(
            {"video_id": [vid] * n, "frame_index": np.arange(n, dtype=np.int64) * 30,
             "time_s": np.arange(n, dtype=np.float64),
             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
             "clip_model": ["synthetic-768"] * n},
            schema=schema,
        )
        pq.write_table(table, out / f"{video_key(vid)}.parquet")
        chunks.append(emb)
    return np.concatenate(chunks), np.asarray(video_topics)


def queries(topics: np.ndarray, video_topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Queries about topics the archive holds."""
    noise = rng.standard_normal((QUERIES, DIM)).astype(np.float32) / np.sqrt(DIM)
    q = topics[rng.choice(video_topics, size=QUERIES)] * 0.45 + noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bench_scale(root: Path, n_frames: int, seed: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)  # ids follow file order only in a fresh index
    rng = np.random.default_rng(seed)
    topics = topic_directions(rng)
    write_s, (embeddings, video_topics) = timed(lambda: write_frames(root, n_frames, topics, rng))
    qs = queries(topics, video_topics, rng)
    brute = [timed(lambda q=q: search_vector(FramesIndex(str(root)), q, top_k=10, min_score=MIN_SCORE,
                                             ann_min_frames=10**12)) for q in qs]
    build_s, state = timed(lambda: VectorIndex(FramesIndex(str(root))).sync())
    ann = [timed(lambda q=q: search_vector(FramesIndex(str(root)), q, top_k=10, min_score=MIN_SCORE,
                                           ann_min_frames=0))
           for q in qs]
    index = VectorIndex(FramesIndex(str(root)))
    recalls = []
    for q in qs:
        exact = np.argsort(-(embeddings @ q), kind="stable")[:10]
        exact_videos = {f"video-{i // FRAMES_PER_VIDEO:06d}:{i % FRAMES_PER_VIDEO}" for i in exact}
        found = _nearest_frames(index, state, q)
        recalls.append(len(exact_videos & found) / 10)
    same_moments = [b.moments == a.moments for (_, b), (_, a) in zip(brute, ann)]
    return {
        "frames": n_frames, "videos": int(np.ceil(n_frames / FRAMES_PER_VIDEO)), "queries": QUERIES,
        "write_s": round(write_s, 1),
        "brute_force_s": _stats([t for t, _ in brute]),
        "index_build_s": round(build_s, 1), "index_lists": state["nlist"],
        "ann_s": _stats([t for t, _ in ann]),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "same_top10_moments": round(float(np.mean(same_moments)), 4),
        "moments_found_mean": round(float(np.mean([len(r.moments) for _, r in ann])), 1),
        "method": [r.method for _, r in ann][0],
    }


def _nearest_frames(index: VectorIndex, state: dict, q: np.ndarray) -> set[str]:
    """The index's 10 nearest frames as 'video:position' keys (ids were assigned in file order)."""
    import faiss

    faiss_index, ids = index._open(state)
    params = faiss.SearchParametersIVF(nprobe=min(index.nprobe, faiss_index.nlist))
    _, keys = faiss_index.search(q.reshape(1, -1), 10, params=params)
    return {f"video-{k // FRAMES_PER_VIDEO:06d}:{k % FRAMES_PER_VIDEO}" for k in keys[0] if k >= 0}


def _stats(times: list[float]) -> dict:
    return {"first": round(times[0], 4), "median": round(statistics.median(times), 4), "max": round(max(times), 4)}


def markdown(result: dict) -> str:
    lines = [
        f"Search benchmark, {result['date']}, {result['machine']}",
        "",
        "| frames | brute force median (s) | index build (s) | ANN first / median / max (s) | recall@10 "
        "| same top-10 moments |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["scales"]:
        a = r["ann_s"]
        lines.append(f"| {r['frames']:,} | {r['brute_force_s']['median']:.3f} | {r['index_build_s']:.0f} | "
                     f"{a['first']:.3f} / {a['median']:.3f} / {a['max']:.3f} | {r['recall_at_10']:.3f} | "
                     f"{r['same_top10_moments']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--work", default=None, help="where the synthetic outputs go (default: OUT/work)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load avg at start {os.getloadavg()[0]:.1f}",
        "dim": DIM, "frames_per_video": FRAMES_PER_VIDEO, "min_score": MIN_SCORE, "scales": [],
    }
    for n in args.scales:
        result["scales"].append(bench_scale(work / f"frames-{n}", n, seed=n))
        (out / "bench_search.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["scales"][-1]), flush=True)
    (out / "bench_search.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
