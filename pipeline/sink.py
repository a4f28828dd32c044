"""Parquet outputs: the answers and frames tables, written so that reruns resume exactly.

Layout under the output path:
    answers/<video-key>-<digest>.parquet   one file per (video, set of questions answered together)
    frames/<video-key>.parquet             the frame embeddings of one video (rewritten on rerun)
    runs/<run_id>.json                     the run summary

Every file appears whole or not at all: local files are written beside their final name and
renamed, object-store uploads become visible only when complete. A killed run therefore leaves
complete files (whose pairs are skipped on rerun) or none, so each (video_id, question_id) pair
lands exactly once. Temporary names start with '_' so DuckDB/Spark/pyarrow globs skip them; a run
deletes the ones a killed run left behind (`clean_temporaries`), so one job runs at a time per
output path.

Writes that fail (storage down, throttled, a full disk) are retried with exponential backoff
(`output.write_retries`); when they still fail the error ends the run (nothing can be recorded),
and a rerun resumes.

Superseding rows: when a run answers pairs that may already have rows (`output.retry_errors`, or
`output.resume: false`), the new file is written under a '_pending-' name, the old rows of those
pairs are removed from their files (a file left empty is deleted), and only then is the new file
renamed into place. A crash in between leaves the pairs absent, never twice: the next run does them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.errors import ErrorReason, reason_from_old_error_column
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.sources import filesystem

ANSWERS_DIR = "answers"
FRAMES_DIR = "frames"
RUNS_DIR = "runs"
TEMP_PREFIXES = ("_tmp-", "_pending-")

# failed writes are retried after 1, 2, 4, ... s, at most this long apart
WRITE_RETRY_FIRST_WAIT_S = 1.0
WRITE_RETRY_MAX_WAIT_S = 30.0

log = logging.getLogger("moref_index")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# What resuming reads of every answers row; `error` is the single error column of files written
# before error_reason/error_detail (null in newer files, as error_reason is in older ones).
_OLD_ERROR_COLUMN = "error"
_STATUS_SCHEMA = pa.schema(
    [ANSWERS_SCHEMA.field(c) for c in (Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ERROR_REASON)]
    + [pa.field(_OLD_ERROR_COLUMN, pa.string())]
)


def video_key(video_id: str) -> str:
    """A file-name-safe, collision-free key for a video id (ids may hold '/', '..' or anything)."""
    readable = _UNSAFE.sub("_", video_id).strip("._")[:60] or "video"
    digest = hashlib.sha256(video_id.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


class OutputWriteError(RuntimeError):
    """Output storage refused a write even after the retries; the run stops (a rerun resumes)."""


def _safe_part(part: str) -> str:
    """One path component under the output root: never empty, '.', '..' or containing a separator."""
    if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
        raise ValueError(f"unsafe output path component {part!r}")
    return part


class OutputStore:
    """The output prefix: all writes go under it and nowhere else."""

    def __init__(self, cfg: OutputConfig):
        self.cfg = cfg
        self.fs, self.root = filesystem(cfg.path, cfg.storage)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._local = "file" in protocols
        self.retries = cfg.write_retries

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *(_safe_part(p) for p in parts)))

    def _retrying(self, what: str, fn):
        """Run a write, retrying any failure with exponential backoff; OutputWriteError at the end."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - storage clients raise many types (botocore ...)
                if attempt == self.retries:
                    raise OutputWriteError(
                        f"cannot write {what} after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                wait = min(WRITE_RETRY_MAX_WAIT_S, WRITE_RETRY_FIRST_WAIT_S * 2**attempt)
                log.warning("writing %s failed (%s: %s); retry %d of %d in %.0f s",
                            what, type(exc).__name__, exc, attempt + 1, self.retries, wait)
                self._invalidate()
                time.sleep(wait)

    def _invalidate(self) -> None:
        # A cache that cannot be dropped is no reason to fail.
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()

    def write_table(self, table: pa.Table, *parts: str) -> str:
        final = self.path(*parts)
        return self._retrying(final, lambda: self._write_table_once(table, final))

    def _write_table_once(self, table: pa.Table, final: str) -> str:
        parent = final.rsplit("/", 1)[0]
        if self._local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/_tmp-{uuid.uuid4().hex}.parquet"
            try:
                with self.fs.open(tmp, "wb") as f:
                    pq.write_table(table, f)
                self.fs.mv(tmp, final)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
        else:
            with self.fs.open(final, "wb") as f:
                pq.write_table(table, f)
        return final

    def write_json(self, payload: dict, *parts: str) -> str:
        return self.write_bytes(json.dumps(payload, indent=2, sort_keys=True).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> str:
        final = self.path(*parts)

        def once():
            if self._local:
                self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(final, "wb") as f:
                f.write(data)
            return final

        return self._retrying(final, once)

    def move(self, src: str, dst: str) -> None:
        def once():
            if not self.fs.exists(src) and self.fs.exists(dst):
                return  # an earlier attempt moved it and only its reply was lost
            self.fs.mv(src, dst)

        self._retrying(dst, once)

    def remove(self, path: str) -> None:
        def once():
            if self.fs.exists(path):
                self.fs.rm(path)

        self._retrying(path, once)

    def list_files(self, sub: str, prefix: str = "") -> list[str]:
        """Parquet files under `sub` whose names start with `prefix` (temporaries excluded)."""
        base = self.path(sub)
        self._invalidate()
        if not self.fs.exists(base):
            return []
        # With a prefix, list only the matching names: on an object store that is one prefix
        # listing per video instead of the whole folder. Prefixes are video keys: no glob magic.
        candidates = self.fs.glob(f"{base}/{prefix}*.parquet") if prefix else self.fs.find(base)
        return sorted(
            p for p in candidates
            if p.endswith(".parquet") and p.rsplit("/", 1)[-1].startswith(prefix)
            and not p.rsplit("/", 1)[-1].startswith(("_", "."))
        )

    def clean_temporaries(self) -> int:
        """Delete the temporary files a killed run left ('_tmp-*', '_pending-*'); returns how many.
        Readers skip them anyway; this only reclaims the space. Assumes no other run of this job
        writes to the same output at the same time."""
        removed = 0
        for sub in (ANSWERS_DIR, FRAMES_DIR):
            base = self.path(sub)
            self._invalidate()
            if not self.fs.exists(base):
                continue
            for p in self.fs.find(base):
                if p.rsplit("/", 1)[-1].startswith(TEMP_PREFIXES):
                    self.remove(p)
                    removed += 1
        return removed

    def _dataset(self, sub: str, schema: pa.Schema | None = None) -> pads.Dataset | None:
        files = self.list_files(sub)
        if not files:
            return None
        return pads.dataset(files, filesystem=self.fs, format="parquet", schema=schema)

    def read_answers(self, columns: list[str] | None = None) -> pa.Table:
        # The current schema, explicitly: files written before roi_box became a variable-size list
        # hold a fixed-size one, and a dataset would otherwise take whichever type it meets first.
        ds = self._dataset(ANSWERS_DIR, ANSWERS_SCHEMA)
        if ds is None:
            return ANSWERS_SCHEMA.empty_table().select(columns or ANSWERS_SCHEMA.names)
        return ds.to_table(columns=columns)

    def read_frames(self) -> pa.Table | None:
        ds = self._dataset(FRAMES_DIR)
        return None if ds is None else ds.to_table()

    def done_pairs(self) -> set[tuple[str, str]]:
        table = self.read_answers(columns=["video_id", "question_id"])
        return set(zip(table.column("video_id").to_pylist(), table.column("question_id").to_pylist()))

    def answer_status_table(self) -> pa.Table:
        """Every answers row's (video_id, question_id, status, error_reason) as one Arrow table:
        what resuming needs, without the rows' content. Rows of files written before
        `error_reason` existed get theirs from the old `error` column."""
        ds = self._dataset(ANSWERS_DIR, _STATUS_SCHEMA)
        t = _STATUS_SCHEMA.empty_table() if ds is None else ds.to_table()
        old_errors = t.column(_OLD_ERROR_COLUMN).to_pylist()
        reasons = [reason or _value(reason_from_old_error_column(old))
                   for reason, old in zip(t.column(Col.ERROR_REASON).to_pylist(), old_errors)]
        return t.select([Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS]).append_column(
            Col.ERROR_REASON, pa.array(reasons, pa.string()))

    def answer_status(self) -> dict[tuple[str, str], tuple[str, ErrorReason | None]]:
        """(video_id, question_id) -> (status, error reason) of every row in the answers table."""
        t = self.answer_status_table()
        cols = [t.column(c).to_pylist() for c in (Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ERROR_REASON)]
        return {(v, q): (st, ErrorReason(reason) if reason else None) for v, q, st, reason in zip(*cols)}

    def _read_file(self, path: str) -> pa.Table:
        return self._retrying(path, lambda: pq.read_table(path, filesystem=self.fs))

    def supersede(self, video_id: str, question_ids: set[str], keep: str) -> None:
        """Remove the rows of (video_id, q in question_ids) from every answers file of the video
        except `keep`; rewrite each such file atomically, delete it when nothing is left."""
        for path in self.list_files(ANSWERS_DIR, prefix=f"{video_key(video_id)}-"):
            if path == keep:
                continue
            table = self._read_file(path)
            stale = pc.and_(
                pc.equal(table.column("video_id"), video_id),
                pc.is_in(table.column("question_id"), pa.array(sorted(question_ids), pa.string())),
            )
            n_stale = pc.sum(pc.cast(stale, pa.int64())).as_py() or 0
            if n_stale == 0:
                continue
            if n_stale == table.num_rows:
                self.remove(path)
            else:
                self.write_table(table.filter(pc.invert(stale)), ANSWERS_DIR, path.rsplit("/", 1)[-1])


def _value(reason: ErrorReason | None) -> str | None:
    return None if reason is None else reason.value


class FramesWriter:
    """Writes one video's frame embeddings to frames/, then drops them from the row (the answer
    stage does not need them). Reads FRAME_EMBEDDINGS, FRAME_TIMES_S, FRAME_INDICES, CLIP_MODEL."""

    reads: ClassVar[Mapping[str, str]] = {
        Col.VIDEO_ID: "names the frames file",
        Col.STATUS: "only ok rows have frames to write",
        Col.FRAME_EMBEDDINGS: "written, then dropped from the row",
        Col.FRAME_INDICES: "frame_index column",
        Col.FRAME_TIMES_S: "time_s column",
        Col.CLIP_MODEL: "clip_model column",
    }
    keeps_input_columns = True  # all but FRAME_EMBEDDINGS
    writes: ClassVar[Sequence[str]] = ()

    def __init__(self, output: OutputConfig):
        self.store = OutputStore(output)

    def __call__(self, rows: list[dict]) -> list[dict]:
        return [self.write_row(row) for row in rows]

    def write_row(self, row: dict) -> dict:
        from pipeline.guidance import frames_table

        row = dict(row)
        if row.get(Col.STATUS) == "ok" and len(row.get(Col.FRAME_EMBEDDINGS, ())):
            self.store.write_table(frames_table(row), FRAMES_DIR, f"{video_key(row[Col.VIDEO_ID])}.parquet")
        row.pop(Col.FRAME_EMBEDDINGS, None)
        return row


class AnswersWriter:
    """Writes answers rows, one file per video group in the batch, and returns a small summary
    table (video_id, question_id, status, error_reason) for the driver's run summary. With `supersede`,
    rows of the same pairs already in the table are replaced (see the module docstring)."""

    reads: ClassVar[Mapping[str, str]] = {name: "written to answers/" for name in ANSWERS_SCHEMA.names}
    writes: ClassVar[Sequence[str]] = (Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ERROR_REASON)
    keeps_input_columns = False

    def __init__(self, output: OutputConfig, run_id: str, supersede: bool = False):
        self.store = OutputStore(output)
        self.run_id = run_id
        self.supersede = supersede

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = batch.select(ANSWERS_SCHEMA.names).cast(ANSWERS_SCHEMA)
        ids = table.column("video_id").to_pylist()
        for vid in dict.fromkeys(ids):
            rows = table.filter(pc.equal(table.column("video_id"), vid))
            qids = sorted(rows.column("question_id").to_pylist())
            digest = hashlib.sha256("\n".join([self.run_id, *qids]).encode()).hexdigest()[:12]
            name = f"{video_key(vid)}-{digest}.parquet"
            if not self.supersede:
                self.store.write_table(rows, ANSWERS_DIR, name)
                continue
            pending = self.store.write_table(rows, ANSWERS_DIR, f"_pending-{name}")
            final = self.store.path(ANSWERS_DIR, name)
            self.store.supersede(vid, set(qids), keep=pending)
            self.store.move(pending, final)
        return table.select([Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ERROR_REASON])
