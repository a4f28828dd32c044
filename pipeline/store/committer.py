"""The driver's side of the sink: answers rows buffered across videos and committed, with the same
videos' frames, in files of many videos.

The guidance stage writes each video's frames to `_staging/frames/<video-key>.parquet` as it goes;
the answers rows stream to the driver (they are small). When the buffer is due (`flush_due`: the
target size, the per-file video cap, or the age limit) or the run ends (`close`), one answers
file and one frames file of those videos are committed together through the record
(pipeline/store/commit_log.py), and the staged frames are deleted. The driver writes the answers file;
the frames file is merged from the staged files by a Ray task (pipeline/store/file_merge.py), which hands
back only its record rows: the frame embeddings, most of the output's bytes, never pass through the
driver. A crash loses only uncommitted rows; their pairs are not in the record, so a rerun redoes
them.

Superseding: rows of pairs already recorded (retried errors, `resume: false`) and frames of videos
already recorded (guided again, e.g. for new questions) are removed in the same commit, by
rewriting each older file that holds some without them under a new name (merge tasks too).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import MB
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.store.commit_log import CommitLog, NewFile, write_pending
from pipeline.store.file_merge import FileMerge, row_keys, run_merges
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR, STAGING_DIR, OutputStore, video_key

log = logging.getLogger("moref_index")

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
        self.target_bytes = cfg.target_file_bytes
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
        # A staged file's name says its video, so the older frames files to rewrite are known
        # before the merge and all merges run at once (`_check_frames_videos` holds the merge to it).
        staged_videos = {f"{video_key(v)}.parquet": v for v in self._videos}
        staged = sorted(self._staged())
        frames_videos = sorted({staged_videos[p.rsplit("/", 1)[-1]] for p in staged})
        name = self._file_name()
        new = [write_pending(self.store, answers, ANSWERS_DIR, name)]
        # the frames file and every rewrite are written by merges (Ray tasks in a job): the frames'
        # bytes never come here, only the new files' record rows
        merges = [FileMerge(FRAMES_DIR, tuple(staged), name)] if staged else []
        removes: dict[str, list[str]] = {}
        if self.supersede:
            merges += self._rewrites(ANSWERS_DIR, self.answers, row_keys(ANSWERS_DIR, answers), removes)
        if staged:
            merges += self._rewrites(FRAMES_DIR, self.frames, pa.array(frames_videos, pa.string()), removes)
        merged = run_merges(self.store.cfg, merges)
        if staged:
            _check_frames_videos(merged[0], frames_videos)
        new += [f for f in merged if f is not None]
        self.log.apply(new, removes)
        for path in staged:
            self.store.remove(path)
        for f in new:
            self._remember(f, removes.get(f.sub, []))
        self.files_written += 1
        if self.on_commit is not None:
            self.on_commit(answers)
        frames_mb = sum(f.size_bytes for f in new if f.sub == FRAMES_DIR and f.name == name) / MB
        log.info("committed %s: %d answers rows of %d videos, %.1f MB of frames%s", name, answers.num_rows,
                 len(self._videos), frames_mb,
                 f", rewrote {sum(map(len, removes.values()))} older file(s)" if removes else "")
        self._buffer, self._videos, self._oldest = [], {}, None
        self._staged_bytes = self._checked_at = 0

    def _rewrites(self, sub: str, record: pa.Table, keys: pa.ChunkedArray | pa.Array,
                  removes: dict[str, list[str]]) -> list[FileMerge]:
        """Older files of `sub` holding rows of `keys` (pairs for answers, videos for frames) are
        rewritten without them under a new name; the old ones are removed in the same commit."""
        unique = pc.unique(keys)
        stale = record.filter(pc.is_in(row_keys(sub, record), unique))  # the record has the key columns
        drop, merges = tuple(unique.to_pylist()), []
        for old in sorted(set(stale.column("file").to_pylist())):
            removes.setdefault(sub, []).append(old)
            merges.append(FileMerge(sub, (self.store.path(sub, old),), self._file_name(), drop=drop))
        return merges

    def _file_name(self) -> str:
        return f"part-{self.run_id}-{uuid.uuid4().hex[:12]}.parquet"

    def _remember(self, f: NewFile, removed: list[str]) -> None:
        if f.sub == ANSWERS_DIR:
            self.answers = _updated(self.answers, f, removed)
        else:
            self.frames = _updated(self.frames, f, removed)


def _check_frames_videos(merged: NewFile | None, expected: list[str]) -> None:
    """The merged frames file must hold exactly the videos whose staged files it merged: older
    frames of those videos were rewritten away on that promise. Raised before the journal, so
    nothing of the commit becomes visible."""
    got = set(merged.record.column(Col.VIDEO_ID).to_pylist()) if merged is not None else set()
    if got != set(expected):
        raise RuntimeError(f"the staged frames files hold the wrong videos: missing {sorted(set(expected) - got)[:5]}, "
                           f"unexpected {sorted(got - set(expected))[:5]}")


def _updated(record: pa.Table, f: NewFile, removed: list[str]) -> pa.Table:
    kept = record.filter(pc.invert(pc.is_in(record.column("file"), pa.array(removed, pa.string()))))
    return pa.concat_tables([kept, f.record])
