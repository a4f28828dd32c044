"""The driver's side of the sink: answers rows buffered across videos and committed, with the same
videos' frames, in files of many videos.

The guidance stage writes each video's frames to `_staging/frames/<video-key>.parquet` as it goes;
the answers rows stream to the driver (they are small). When the buffer is due (`flush_due`: the
target size, the per-file video cap, or the age limit) or the run ends (`close`), one answers
file and one frames file of those videos are committed together through the record
(pipeline/commit_log.py), and the staged frames are deleted. A crash loses only uncommitted rows;
their pairs are not in the record, so a rerun redoes them.

Superseding: rows of pairs already recorded (retried errors, `resume: false`) and frames of videos
already recorded (guided again, e.g. for new questions) are removed in the same commit, by
rewriting each older file that holds some without them under a new name.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.commit_log import CommitLog, NewFile
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.sink import ANSWERS_DIR, FRAMES_DIR, STAGING_DIR, OutputStore, video_key

log = logging.getLogger("moref_index")

MB = 1 << 20
SIZE_CHECK_EVERY = 32  # videos between listings of the staged frames' sizes


class OutputCommitter:
    """Buffers a run's answers rows and commits them in large files (see the module docstring)."""

    def __init__(self, store: OutputStore, run_id: str, supersede: bool,
                 on_commit: Callable[[pa.Table], None] | None = None):
        """`on_commit` is called with each committed answers table, once it is committed."""
        self.store, self.run_id, self.supersede = store, run_id, supersede
        self.on_commit = on_commit
        self.log = CommitLog(store)
        cfg = store.cfg
        self.target_bytes = cfg.target_file_mb * MB
        self.max_videos = cfg.max_videos_per_file
        self.max_age_s = cfg.flush_interval_s
        # what the output holds: updated by each commit, so a later one supersedes the right files
        self.answers = self.log.record(ANSWERS_DIR)
        self.frames = self.log.record(FRAMES_DIR)
        self._buffer: list[pa.Table] = []
        self._videos: dict[str, None] = {}
        self._oldest: float | None = None
        self._staged_bytes = 0
        self._checked_at = 0
        self.files_written = 0

    def add(self, rows: pa.Table) -> None:
        """Buffer answers rows (any columns of the answers schema and more); commit when due, video
        by video (Ray Data may hand over several videos in one batch)."""
        table = rows.select(ANSWERS_SCHEMA.names).cast(ANSWERS_SCHEMA)
        ids = table.column(Col.VIDEO_ID)
        for vid in dict.fromkeys(ids.to_pylist()):
            self._buffer.append(table.filter(pc.equal(ids, vid)))
            self._videos[vid] = None
            self._oldest = self._oldest or time.monotonic()
            if self.flush_due():
                self.flush()

    def flush_due(self) -> bool:
        if not self._buffer:
            return False
        if self.max_videos is not None and len(self._videos) >= self.max_videos:
            return True
        if self._oldest is not None and time.monotonic() - self._oldest >= self.max_age_s:
            return True
        if sum(t.nbytes for t in self._buffer) >= self.target_bytes:
            return True
        if len(self._videos) - self._checked_at >= SIZE_CHECK_EVERY:  # frames dominate the bytes
            self._checked_at = len(self._videos)
            self._staged_bytes = sum(self._staged().values())
        return self._staged_bytes >= self.target_bytes

    def _staged(self) -> dict[str, int]:
        """Staged frames files of the buffered videos: path -> size (one listing)."""
        base = self.store.path(STAGING_DIR, FRAMES_DIR)
        self.store._invalidate()
        if not self.store.fs.exists(base):
            return {}
        wanted = {f"{video_key(v)}.parquet" for v in self._videos}
        listing = self.store.fs.find(base, detail=True)
        return {p: int(info.get("size") or 0) for p, info in listing.items() if p.rsplit("/", 1)[-1] in wanted}

    def close(self) -> None:
        """Commit what is buffered: the end of the run."""
        if self._buffer:
            self.flush()

    def flush(self) -> None:
        answers = pa.concat_tables(self._buffer)
        staged = sorted(self._staged())
        name = f"part-{self.run_id}-{uuid.uuid4().hex[:12]}.parquet"
        new = [NewFile(answers, ANSWERS_DIR, name)]
        frames = None
        if staged:
            frames = pads.dataset(staged, filesystem=self.store.fs, format="parquet").to_table()
            new.append(NewFile(frames, FRAMES_DIR, name))
        removes: dict[str, list[str]] = {}
        if self.supersede:
            keys = pc.binary_join_element_wise(answers.column(Col.VIDEO_ID), answers.column(Col.QUESTION_ID), "\x00")
            self._rewrite(ANSWERS_DIR, self.answers, keys, new, removes)
        if frames is not None:
            self._rewrite(FRAMES_DIR, self.frames, frames.column(Col.VIDEO_ID), new, removes)
        self.log.apply(new, removes)
        for path in staged:
            self.store.remove(path)
        for f in new:
            self._remember(f, removes.get(f.sub, []))
        self.files_written += 1
        if self.on_commit is not None:
            self.on_commit(answers)
        log.info("committed %s: %d answers rows of %d videos%s", name, answers.num_rows, len(self._videos),
                 f", rewrote {sum(map(len, removes.values()))} older file(s)" if removes else "")
        self._buffer, self._videos, self._oldest = [], {}, None
        self._staged_bytes = self._checked_at = 0

    def _rewrite(self, sub: str, record: pa.Table, keys: pa.ChunkedArray | pa.Array, new: list[NewFile],
                 removes: dict[str, list[str]]) -> None:
        """Older files of `sub` holding rows of `keys` (pairs for answers, videos for frames) are
        rewritten without them under a new name; the old ones are removed in the same commit."""
        unique = pc.unique(keys)
        stale = record.filter(pc.is_in(_key(sub, record), unique))
        for old in sorted(set(stale.column("file").to_pylist())):
            table = self.store._read_file(self.store.path(sub, old))
            table = table.filter(pc.invert(pc.is_in(_key(sub, table), unique)))
            removes.setdefault(sub, []).append(old)
            if table.num_rows:
                new.append(NewFile(table, sub, f"part-{self.run_id}-{uuid.uuid4().hex[:12]}.parquet"))

    def _remember(self, f: NewFile, removed: list[str]) -> None:
        if f.sub == ANSWERS_DIR:
            self.answers = _updated(self.answers, f, removed)
        else:
            self.frames = _updated(self.frames, f, removed)


def _key(sub: str, table: pa.Table):
    if sub == FRAMES_DIR:
        return table.column(Col.VIDEO_ID)
    return pc.binary_join_element_wise(table.column(Col.VIDEO_ID), table.column(Col.QUESTION_ID), "\x00")


def _updated(record: pa.Table, f: NewFile, removed: list[str]) -> pa.Table:
    kept = record.filter(pc.invert(pc.is_in(record.column("file"), pa.array(removed, pa.string()))))
    return pa.concat_tables([kept, f.record()])
