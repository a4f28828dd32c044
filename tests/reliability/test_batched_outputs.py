"""End to end on real Ray, local disk and S3 (moto): answers and frames in files of many videos with
exact row counts, an incremental rerun doing exactly the new videos, compaction keeping the row
multiset, and a second job refused while the output's lease is held. Locally the videos are a glob
planned on the driver; on S3 they come from a Parquet manifest read by Ray Data and planned in Ray
tasks."""

from __future__ import annotations

import collections
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run.runner import run_job
from pipeline.store.compact import compact
from pipeline.store.output_lock import OutputLease, OutputLockedError
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR, OutputStore
from tests.paths import video
from tests.reliability.helpers import PROMPTS, assert_exactly_once, job, rows_of

pytestmark = pytest.mark.slow


def _multiset(table) -> collections.Counter:
    return collections.Counter(tuple(sorted((k, str(v)) for k, v in row.items())) for row in table.to_pylist())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_batched_files_incremental_rerun_compaction_and_lock(where, tmp_path, ray_local, request):
    src = video("kinetics_armwrestling.mp4")
    if where == "local":
        (tmp_path / "in").mkdir()
        put = lambda name: shutil.copy(src, tmp_path / "in" / name)  # noqa: E731 - two short helpers
        videos, out, storage = str(tmp_path / "in" / "*.mp4"), str(tmp_path / "out"), None
    else:
        fs, bucket, options = request.getfixturevalue("s3_bucket")
        listed: list[str] = []

        def put(name: str) -> None:
            """The video and a manifest listing every video so far (URIs relative to it)."""
            fs.put_file(str(src), f"{bucket}/in/{name}")
            listed.append(name)
            with fs.open(f"{bucket}/in/manifest.parquet", "wb") as f:
                pq.write_table(pa.table({"video_uri": listed}), f)

        videos, out = None, f"s3://{bucket}/out"
        # credentials in the config: the session's Ray workers may predate the S3 fixture's environment
        storage = {"endpoint_url": options["client_kwargs"]["endpoint_url"], "key": "testing", "secret": "testing"}
    inputs = {"videos": videos} if videos else {"manifest": f"s3://{bucket}/in/manifest.parquet", "planning": "tasks"}
    for i in range(5):
        put(f"v{i}.mp4")
    opts = {"max_videos_per_file": 2}
    cfg = job(out, **inputs, storage=storage, run_id="first", output_opts=opts)
    summary = run_job(cfg)
    store = OutputStore(cfg.output)
    assert (summary.processed, summary.ok, summary.status) == (10, 10, "complete"), summary.errors_by_reason
    assert len(store.list_files(ANSWERS_DIR)) == 3 and len(store.list_files(FRAMES_DIR)) == 3
    expected = {(f"v{i}.mp4", p["question_id"]) for i in range(5) for p in PROMPTS}
    assert_exactly_once(rows_of(cfg), expected)
    assert store.read_frames().num_rows == 5 * 16  # 16 candidate frames per video, each video once

    # incremental: two new videos, exactly their pairs are processed
    put("v5.mp4")
    put("v6.mp4")
    summary = run_job(job(out, **inputs, storage=storage, run_id="second", output_opts=opts))
    assert (summary.skipped_done, summary.processed) == (10, 4)
    expected |= {(v, p["question_id"]) for v in ("v5.mp4", "v6.mp4") for p in PROMPTS}
    assert_exactly_once(rows_of(cfg), expected)
    assert len(store.list_files(ANSWERS_DIR)) == 4

    # compaction: 4 + 4 small files into one each, the same rows
    before_answers, before_frames = _multiset(store.read_answers()), _multiset(store.read_frames())
    result = compact(store, target_mb=64)
    assert result.files_after == {ANSWERS_DIR: 1, FRAMES_DIR: 1}
    assert _multiset(store.read_answers()) == before_answers
    assert _multiset(store.read_frames()) == before_frames
    assert store.answer_status_table().num_rows == 14  # the record follows the new files

    # one job per output: refused while another holds the lease, nothing planned or written
    with OutputLease(store, ttl_s=60, run_id="other"):
        with pytest.raises(OutputLockedError, match="run 'other'"):
            run_job(job(out, **inputs, storage=storage, run_id="third", output_opts=opts))
    summary = run_job(job(out, **inputs, storage=storage, run_id="third", output_opts=opts))
    assert (summary.skipped_done, summary.processed) == (14, 0)
