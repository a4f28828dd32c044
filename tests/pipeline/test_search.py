"""Text search over the frames table: planted embeddings whose best moments are known, local and
S3 (moto) indexes, model errors, filters, and the approximate index against brute force."""

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from jobs.cli import main
from pipeline.config import OutputConfig, StorageConfig
from pipeline.readers.search import FramesIndex, Moment, search_vector
from pipeline.readers.vector_index import VectorIndex
from pipeline.schema import frames_schema
from pipeline.stages.clip_encoder import FrameEncoder
from pipeline.stages.clip_models import build_tiny_clip, load_clip
from pipeline.store.output_store import FRAMES_DIR, OutputStore, video_key
from tests.paths import REPO

QUERY = "a dog catches a frisbee"
MODEL = "tiny-clip"

# Per video: (times, cosine of each frame with the query). Frames at >= 0.2 merge into moments.
PLANTED = {
    "park/dog.mp4": ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                     [0.0, 0.05, 0.5, 0.6, 0.55, 0.1, 0.0, 0.3, 0.1, 0.0]),
    "beach/frisbee.mkv": ([0.5, 1.5, 2.5, 3.5, 4.5], [0.1, 0.7, 0.25, 0.0, 0.35]),
    "kitchen.avi": ([0.0, 2.0, 4.0], [0.1, 0.15, 0.05]),
}
EXPECTED = [
    Moment("beach/frisbee.mkv", 1.5, 2.5, 1.5, 45, 0.7, 2),
    Moment("park/dog.mp4", 2.0, 4.0, 3.0, 90, 0.6, 3),
    Moment("beach/frisbee.mkv", 4.5, 4.5, 4.5, 135, 0.35, 1),
    Moment("park/dog.mp4", 7.0, 7.0, 7.0, 210, 0.3, 1),
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture(scope="module")
def query_embedding(clip_dir) -> np.ndarray:
    return FrameEncoder(load_clip(clip_dir)).encode_text([QUERY])[0]


def with_cosines(query: np.ndarray, cosines, rng) -> np.ndarray:
    """Unit vectors whose cosine with the unit vector `query` is exactly each of `cosines`."""
    out = []
    for c in cosines:
        r = rng.standard_normal(query.shape)
        r -= (r @ query) * query
        r /= np.linalg.norm(r)
        out.append(c * query + np.sqrt(1 - c * c) * r)
    return np.asarray(out, np.float32)


def frames_table(video_id: str, times, embeddings: np.ndarray, model: str = MODEL) -> pa.Table:
    n, dim = embeddings.shape
    return pa.table(
        {"video_id": [video_id] * n, "frame_index": [int(round(t * 30)) for t in times],
         "time_s": [float(t) for t in times],
         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()), dim),
         "clip_model": [model] * n},
        schema=frames_schema(dim),
    )


def write_index(output: str, query: np.ndarray, videos=PLANTED, endpoint: str | None = None, model=MODEL) -> None:
    store = OutputStore(OutputConfig(path=output, storage=StorageConfig(endpoint_url=endpoint)))
    rng = np.random.default_rng(0)
    for vid, (times, cosines) in videos.items():
        store.write_table(frames_table(vid, times, with_cosines(query, cosines, rng), model),
                          FRAMES_DIR, f"{video_key(vid)}.parquet")


def run_search(capsys, *args) -> tuple[int, str, str]:
    code = main(["search", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def moments_of(out: str) -> list[Moment]:
    def approx(m: dict) -> dict[str, Any]:
        return {k: pytest.approx(v, abs=1e-5) if isinstance(v, float) else v for k, v in m.items()}

    return [Moment(**approx(m)) for m in json.loads(out)["moments"]]


def test_planted_moments_exact_videos_times_and_boundaries(tmp_path, clip_dir, query_embedding, capsys):
    write_index(str(tmp_path), query_embedding)
    code, out, _ = run_search(capsys, QUERY, "--index", str(tmp_path), "--clip-model", clip_dir, "--json")
    assert code == 0
    assert moments_of(out) == EXPECTED
    assert json.loads(out)["method"] == "brute_force" and json.loads(out)["frames_searched"] == 18
    code, out, _ = run_search(capsys, QUERY, "--index", str(tmp_path), "--clip-model", clip_dir, "--top-k", "2")
    lines = out.strip().splitlines()
    assert lines[0].startswith("2 moment(s) from 18 frames (brute force, tiny-clip)")
    assert lines[2].split() == ["0.700", "beach/frisbee.mkv", "00:01.5", "00:02.5", "00:01.5", "45"]
    assert lines[3].split() == ["0.600", "park/dog.mp4", "00:02.0", "00:04.0", "00:03.0", "90"]


def test_text_matching_nothing_returns_nothing(tmp_path, clip_dir, query_embedding, capsys):
    low = {vid: (times, [min(c, 0.15) for c in cosines]) for vid, (times, cosines) in PLANTED.items()}
    write_index(str(tmp_path), query_embedding, low)
    code, out, _ = run_search(capsys, QUERY, "--index", str(tmp_path), "--clip-model", clip_dir, "--json")
    assert code == 0 and json.loads(out)["moments"] == []
    _, out, _ = run_search(capsys, QUERY, "--index", str(tmp_path), "--clip-model", clip_dir)
    assert "nothing scored above the threshold" in out
    # the same frames do match at a lower threshold: the threshold, not an empty index, is why
    _, out, _ = run_search(capsys, QUERY, "--index", str(tmp_path), "--clip-model", clip_dir, "--json",
                           "--min-score", "0.12")
    assert json.loads(out)["moments"]


def test_filters_by_video_id_and_manifest_column(tmp_path, clip_dir, query_embedding, capsys):
    write_index(str(tmp_path / "out"), query_embedding)
    base = ["--index", str(tmp_path / "out"), "--clip-model", clip_dir, "--json"]
    _, out, _ = run_search(capsys, QUERY, *base, "--video-id", "park/dog.mp4")
    assert moments_of(out) == [m for m in EXPECTED if m.video_id == "park/dog.mp4"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video_id,video_uri,place\npark/dog.mp4,a.mp4,outdoor\nbeach/frisbee.mkv,b.mkv,outdoor\n"
                        "kitchen.avi,c.avi,indoor\n")
    _, out, _ = run_search(capsys, QUERY, *base, "--manifest", str(manifest), "--where", "place=outdoor")
    assert moments_of(out) == EXPECTED
    _, out, _ = run_search(capsys, QUERY, *base, "--manifest", str(manifest), "--where", "place=indoor")
    assert json.loads(out)["moments"] == []


def test_s3_index_brute_force_and_approximate(s3_bucket, clip_dir, query_embedding, capsys, tmp_path, monkeypatch):
    fs, bucket, storage = s3_bucket
    monkeypatch.setenv("MOREF_INDEX_CACHE", str(tmp_path / "cache"))
    output = f"s3://{bucket}/archive/out"
    endpoint = storage["client_kwargs"]["endpoint_url"]
    write_index(output, query_embedding, endpoint=endpoint)
    base = [QUERY, "--index", output, "--clip-model", clip_dir, "--json", "--endpoint-url", endpoint]
    _, out, _ = run_search(capsys, *base)
    assert moments_of(out) == EXPECTED and json.loads(out)["method"] == "brute_force"
    assert main(["index", output, "--endpoint-url", endpoint]) == 0
    assert capsys.readouterr().out.startswith("search index: 18 frames of 3 videos in 1 lists")
    assert fs.exists(f"{bucket}/archive/out/search-index/state.json")
    _, out, _ = run_search(capsys, *base, "--ann-min-frames", "10")
    assert moments_of(out) == EXPECTED and json.loads(out)["method"] == "ann"


def test_index_counts_videos_not_files(tmp_path, query_embedding, capsys):
    """One frames file of several videos (as a run commits them): the videos are counted."""
    rng = np.random.default_rng(0)
    table = pa.concat_tables([frames_table(vid, times, with_cosines(query_embedding, cosines, rng), MODEL)
                              for vid, (times, cosines) in PLANTED.items()])
    OutputStore(OutputConfig(path=str(tmp_path))).write_table(table, FRAMES_DIR, "part-run-1.parquet")
    assert main(["index", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"search index: {table.num_rows} frames of {len(PLANTED)} videos in ")


def test_model_mismatch_mixed_models_and_unavailable_model(tmp_path, clip_dir, query_embedding, capsys):
    write_index(str(tmp_path / "out"), query_embedding)
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    code, _, err = run_search(capsys, QUERY, "--index", str(tmp_path / "out"), "--clip-model", other)
    assert code == 2 and "CLIP model mismatch" in err and "'tiny-clip'" in err and "'other-clip'" in err
    code, _, err = run_search(capsys, QUERY, "--index", str(tmp_path / "out"))
    assert code == 2 and "local directory" in err and "--clip-model" in err

    mixed = dict(PLANTED)
    write_index(str(tmp_path / "out"), query_embedding, {"extra.mp4": ([0.0], [0.9])}, model="ViT-B-32/openai")
    code, _, err = run_search(capsys, QUERY, "--index", str(tmp_path / "out"), "--clip-model", clip_dir)
    assert code == 2 and "mixes CLIP models" in err and "'ViT-B-32/openai' (1 frames)" in err
    # restricted to videos of one model, the search runs
    ids = [a for vid in mixed for a in ("--video-id", vid)]
    code, out, _ = run_search(capsys, QUERY, "--index", str(tmp_path / "out"), "--clip-model", clip_dir, "--json", *ids)
    assert code == 0 and moments_of(out) == EXPECTED


def test_recorded_model_unavailable(tmp_path, query_embedding, capsys):
    write_index(str(tmp_path), query_embedding, {"v.mp4": ([0.0], [0.9])}, model="ViT-B-32/no-such-weights")
    code, _, err = run_search(capsys, QUERY, "--index", str(tmp_path))
    assert code == 2
    assert "CLIP model 'ViT-B-32/no-such-weights', which embedded the frames, is not available here" in err


def clustered_archive(output: str, videos: int, frames: int, dim: int, seed: int = 0) -> None:
    """Videos drifting around a few topics, as real archives do."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((8, dim))
    store = OutputStore(OutputConfig(path=output))
    for v in range(videos):
        base = topics[v % len(topics)] + 0.5 * rng.standard_normal(dim)
        drift = np.cumsum(0.1 * rng.standard_normal((frames, dim)), axis=0)
        emb = base + drift + 0.5 * rng.standard_normal((frames, dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        vid = f"v{v:03d}"
        store.write_table(frames_table(vid, np.arange(frames) * 0.5, emb.astype(np.float32)),
                          FRAMES_DIR, f"{video_key(vid)}.parquet")


def test_approximate_index_matches_brute_force_and_stays_in_step(tmp_path):
    dim, out = 64, str(tmp_path)
    clustered_archive(out, videos=60, frames=50, dim=dim)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((10, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def both(q, **kw):
        exact = search_vector(FramesIndex(out), q, top_k=10, min_score=0.1, ann_min_frames=10**9, **kw)
        approx = search_vector(FramesIndex(out), q, top_k=10, min_score=0.1, ann_min_frames=1000, **kw)
        return exact, approx

    for q in queries:
        exact, approx = both(q)
        assert approx.method == "ann" and exact.method == "brute_force"
        assert approx.moments == exact.moments and exact.moments
    index = VectorIndex(FramesIndex(out))
    state = index.state()
    assert state["frames"] == 3000 and len(state["files"]) == 60

    # a run adds a video that matches the first query best, and rewrites another without matches
    q = queries[0]
    store = OutputStore(OutputConfig(path=out))
    top_before = both(q)[0].moments[0].video_id
    store.write_table(frames_table("new", [0.0, 0.5, 1.0], with_cosines(q, [0.05, 0.95, 0.9], rng)),
                      FRAMES_DIR, f"{video_key('new')}.parquet")
    store.write_table(frames_table(top_before, [0.0], with_cosines(q, [0.0], rng)),
                      FRAMES_DIR, f"{video_key(top_before)}.parquet")
    exact, approx = both(q)
    assert approx.moments == exact.moments
    assert approx.moments[0] == Moment("new", 0.5, 1.0, 0.5, 15, pytest.approx(0.95, abs=1e-5), 2)
    assert top_before not in {m.video_id for m in approx.moments}
    after = index.state()
    assert after["frames"] == 3000 - 50 + 1 + 3 and after["nlist"] == state["nlist"]
    assert after["next_id"] == 3000 + 1 + 3  # added incrementally, not rebuilt
    # a filtered search over a big index goes through it too
    _, approx = both(q, video_ids=["new", "v001"])
    assert {m.video_id for m in approx.moments} <= {"new", "v001"}


def test_search_benchmark_self_check(tmp_path):
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_search.py"), "--scales", "2000",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_search.json").read_text())["scales"][0]
    assert result["method"] == "ann" and result["recall_at_10"] >= 0.9 and result["moments_found_mean"] > 0
    assert (tmp_path / "bench_search.md").read_text().startswith("Search benchmark")


def test_the_index_names_the_files_of_candidate_videos_as_the_record_does(tmp_path):
    """A query reads only the candidates' frames files, found in the index's id map rather than
    the whole archive's record: both must name the same files, also for files of many videos."""

    dim, out = 16, str(tmp_path)
    rng = np.random.default_rng(3)
    store = OutputStore(OutputConfig(path=out))
    for part in range(4):  # files of 5 videos each, as the pipeline's commits pack them
        tables = [frames_table(f"p{part}-v{v}", np.arange(20) * 0.5,
                               (e := rng.standard_normal((20, dim)).astype(np.float32))
                               / np.linalg.norm(e, axis=1, keepdims=True)) for v in range(5)]
        store.write_table(pa.concat_tables(tables), FRAMES_DIR, f"part-{part}.parquet")
    frames = FramesIndex(out)
    index = VectorIndex(frames)
    state = index.sync()
    for chosen in (["p0-v1"], ["p1-v0", "p3-v4"], ["p2-v2", "p2-v3"], [f"p{p}-v0" for p in range(4)]):
        assert index.video_files(state, chosen) == frames.files(chosen)
        # and the rows read from them are exactly those videos' frames
        read = frames.read(chosen, files=index.video_files(state, chosen))
        assert sorted(set(read.column("video_id").to_pylist())) == sorted(chosen) and read.num_rows == 20 * len(chosen)
