"""Frames files are merged and rewritten by Ray tasks, not by the driver: at a commit and when a
commit supersedes an older frames file, the driver process reads a small fraction of the frames
bytes (its read count from /proc/self/io, which counts every read() and pread() of the process, the
way pyarrow reads a local file), and the files hold exactly the staged rows, each video once."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, STATUS_OK, Col, empty_answer_row
from pipeline.stages.output_rows import FramesWriter, frames_table
from pipeline.store.commit_log import CommitLog
from pipeline.store.committer import OutputCommitter
from pipeline.store.output_store import FRAMES_DIR, OutputStore

pytestmark = pytest.mark.slow

DIM = 768
IO = pathlib.Path("/proc/self/io")


def bytes_read_by_this_process() -> int:
    return int(next(line for line in IO.read_text().splitlines() if line.startswith("rchar:")).split()[1])


def stage(cfg: OutputConfig, vid: str, frames: int, seed: int) -> pa.Table:
    """Stage one video's frames as the guidance stage does (random embeddings: they do not
    compress, so the file holds as many bytes as the embeddings); returns the rows staged."""
    row = {Col.VIDEO_ID: vid, Col.STATUS: STATUS_OK, Col.CLIP_MODEL: "m", Col.FRAME_INDICES: np.arange(frames),
           Col.FRAME_TIMES_S: np.arange(frames) * 0.5,
           Col.FRAME_EMBEDDINGS: np.random.default_rng(seed).standard_normal((frames, DIM), np.float32)}
    FramesWriter(cfg).write_row(row)
    return frames_table(row)


def answers(run_id: str, videos: list[str]) -> pa.Table:
    rows = []
    for vid in videos:
        row = empty_answer_row()
        row.update(run_id=run_id, video_id=vid, video_uri=vid, question_id="q", question="?", status="ok", answer="a")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def commit(store: OutputStore, run_id: str, videos: list[str]) -> int:
    """Commit the answers of `videos` (their frames are staged); returns the bytes the driver read."""
    committer = OutputCommitter(store, run_id, supersede=True)
    committer.add(answers(run_id, videos))
    assert committer.files_written == 0  # still buffered: the commit below is the one measured
    before = bytes_read_by_this_process()
    committer.close()
    return bytes_read_by_this_process() - before


def frames_files(root: pathlib.Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted((root / FRAMES_DIR).glob("*.parquet"))}


def by_frame(table: pa.Table) -> pa.Table:
    return table.sort_by([(Col.VIDEO_ID, "ascending"), (Col.FRAME_INDEX, "ascending")])


@pytest.mark.skipif(not IO.exists(), reason="needs /proc/self/io (Linux)")
def test_the_driver_reads_no_frames_bytes_at_commit_and_supersede(tmp_path, ray_local):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    store = OutputStore(cfg)
    videos = [f"v{i}.mp4" for i in range(8)]
    staged = {vid: stage(cfg, vid, frames=1200, seed=i) for i, vid in enumerate(videos)}
    staged_bytes = sum(p.stat().st_size for p in (tmp_path / "out" / "_staging").rglob("*.parquet"))
    assert staged_bytes > 25 << 20

    read = commit(store, "r1", videos)
    assert read < staged_bytes / 10, f"the driver read {read} bytes committing {staged_bytes} bytes of frames"
    files = frames_files(tmp_path / "out")
    assert len(files) == 1
    (first_name, first), = files.items()
    assert by_frame(first).equals(by_frame(pa.concat_tables(staged.values())))  # exactly the staged rows
    record = CommitLog(store).record(FRAMES_DIR)
    assert sorted(zip(record.column(Col.VIDEO_ID).to_pylist(), record.column("file").to_pylist())) == [
        (vid, first_name) for vid in videos]
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))

    # two videos guided again: their new frames replace the old, whose file is rewritten without them
    again = {vid: stage(cfg, vid, frames=300, seed=100 + i) for i, vid in enumerate(videos[:2])}
    old_bytes = (tmp_path / "out" / FRAMES_DIR / first_name).stat().st_size
    read = commit(store, "r2", list(again))
    assert read < old_bytes / 10, f"the driver read {read} bytes superseding a {old_bytes}-byte frames file"
    files = frames_files(tmp_path / "out")
    assert len(files) == 2 and first_name not in files
    expected = pa.concat_tables([*again.values(), *(staged[v] for v in videos[2:])])
    assert by_frame(pa.concat_tables(files.values())).equals(by_frame(expected))
    per_file = {name: sorted(set(t.column(Col.VIDEO_ID).to_pylist())) for name, t in files.items()}
    assert sorted(per_file.values()) == [videos[:2], videos[2:]]  # each video in one file only
    record = CommitLog(store).record(FRAMES_DIR)
    assert sorted(zip(record.column(Col.VIDEO_ID).to_pylist(), record.column("file").to_pylist())) == sorted(
        (vid, name) for name, vids in per_file.items() for vid in vids)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith("_pending-")]
    # the answers file superseded alongside: each pair once, the two redone ones from r2
    rows = store.read_answers().to_pylist()
    assert sorted((r["video_id"], r["run_id"]) for r in rows) == sorted(
        [(v, "r2") for v in videos[:2]] + [(v, "r1") for v in videos[2:]])
