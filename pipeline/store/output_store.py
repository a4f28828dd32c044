"""Parquet outputs: the answers and frames tables, written so that reruns resume exactly.

Layout under the output path:
    answers/part-<run_id>-<id>.parquet   answers rows of many videos (pipeline/store/committer.py)
    frames/part-<run_id>-<id>.parquet    the frame embeddings of the same videos
    _commits/                            the record of what is committed (pipeline/store/commit_log.py)
    _staging/frames/<video-key>.parquet  one video's frames, written by guidance, until committed
    _lock.json                           the running job's lease (pipeline/store/output_lock.py)
    runs/<run_id>.json                   the run summary (<run_id>~N.json: the Nth attempt of a run id;
                                         a failed run's trace beside it, as .log)

Every file appears whole or not at all: local files are written beside their final name and
renamed, object-store uploads become visible only when complete; a commit of several files goes
through a journal (commit_log.py). Temporary names start with '_' so DuckDB/Spark/pyarrow globs
skip them; a run deletes the ones a killed run left behind (`clean_temporaries`) while it holds the
output's lease, so one job runs at a time per output path.

Writes that fail (storage down, throttled, a full disk) are retried with exponential backoff
(`output.write_retries`); when they still fail the error ends the run (nothing can be recorded),
and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.errors import ErrorReason
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.sources import filesystem

ANSWERS_DIR = "answers"
FRAMES_DIR = "frames"
RUNS_DIR = "runs"
STAGING_DIR = "_staging"
TEMP_PREFIXES = ("_tmp-", "_pending-")

# failed writes are retried after 1, 2, 4, ... s, at most this long apart
WRITE_RETRY_FIRST_WAIT_S = 1.0
WRITE_RETRY_MAX_WAIT_S = 30.0

log = logging.getLogger("moref_index")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

def video_key(video_id: str) -> str:
    """A file-name-safe, collision-free key for a video id (ids may hold '/', '..' or anything)."""
    readable = _UNSAFE.sub("_", video_id).strip("._")[:60] or "video"
    digest = hashlib.sha256(video_id.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


class OutputNotFoundError(FileNotFoundError):
    """A reader was pointed at a path that holds no job output (or not the tables it reads)."""


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

    def require(self, *subs: str) -> None:
        """Raise OutputNotFoundError unless one of the folders `subs` (answers, frames) exists:
        readers call it first, so a wrong path is one clear error and nothing gets created."""
        self._invalidate()
        if not any(self.fs.isdir(self.path(sub)) for sub in subs):
            what = " or ".join(f"{sub}/" for sub in subs)
            raise OutputNotFoundError(f"no job output at {self.cfg.path}: it holds no {what}")

    def run_records(self) -> list[dict]:
        """The run records under runs/ (each run's summary), oldest first by when they were written."""
        base = self.path(RUNS_DIR)
        if not self.fs.exists(base):
            return []
        found = []
        for path, info in self.fs.find(base, detail=True).items():
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json") and not name.startswith(("_", ".")):
                written = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
                written = written.timestamp() if hasattr(written, "timestamp") else float(written)
                found.append((written, name, json.loads(self.fs.cat_file(path))))
        return [record for _, _, record in sorted(found, key=lambda t: (t[0], t[1]))]

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *(_safe_part(p) for p in parts)))

    def _retrying(self, what: str, fn, reading: bool = False):
        """Run a write (or a read of the output), retrying any failure with exponential backoff;
        OutputWriteError at the end."""
        verb, doing = ("read", "reading") if reading else ("write", "writing")
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - storage clients raise many types (botocore ...)
                if attempt == self.retries:
                    raise OutputWriteError(
                        f"cannot {verb} {what} after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                wait = min(WRITE_RETRY_MAX_WAIT_S, WRITE_RETRY_FIRST_WAIT_S * 2**attempt)
                log.warning("%s %s failed (%s: %s); retry %d of %d in %.0f s",
                            doing, what, type(exc).__name__, exc, attempt + 1, self.retries, wait)
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

    def size(self, path: str) -> int:
        """Bytes of the file at `path` (one stat or HEAD request)."""
        self._invalidate()
        return int(self.fs.size(path) or 0)

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

    def list_files(self, sub: str | tuple[str, ...], prefix: str = "") -> list[str]:
        """Parquet files under `sub` (a folder, or a path as a tuple of folders) whose names start
        with `prefix` (temporaries excluded)."""
        base = self.path(*((sub,) if isinstance(sub, str) else sub))
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
        """Delete what a killed run left: temporaries ('_tmp-*', '_pending-*' of commits that never
        reached their journal; finish half-applied commits first, `CommitLog.recover`) and staged
        frames (their videos' answers were never committed, so they are redone). Returns how many.
        Readers skip them anyway; this only reclaims the space. Call it holding the output's lease."""
        from pipeline.store.commit_log import COMMITS_DIR

        removed = 0
        for sub in (ANSWERS_DIR, FRAMES_DIR, COMMITS_DIR, STAGING_DIR):
            base = self.path(sub)
            self._invalidate()
            if not self.fs.exists(base):
                continue
            for p in self.fs.find(base):
                if sub == STAGING_DIR or p.rsplit("/", 1)[-1].startswith(TEMP_PREFIXES):
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
        """Every answers row's (video_id, question_id, status, error_reason, fingerprint) as one Arrow table:
        what resuming needs, from the record under _commits/ (files written without one, e.g. by
        versions before it, are read once and recorded; their `error` column gives the reason)."""
        from pipeline.store.commit_log import CommitLog

        return CommitLog(self).record(ANSWERS_DIR).select([Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS,
                                                           Col.ERROR_REASON, Col.FINGERPRINT])

    def answer_status(self) -> dict[tuple[str, str], tuple[str, ErrorReason | None]]:
        """(video_id, question_id) -> (status, error reason) of every row in the answers table."""
        t = self.answer_status_table()
        cols = [t.column(c).to_pylist() for c in (Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ERROR_REASON)]
        return {(v, q): (st, ErrorReason(reason) if reason else None) for v, q, st, reason in zip(*cols)}

    def read_files(self, paths: list[str]) -> pa.Table:
        """The rows of these Parquet files under the output, in order, as one table (the first
        file's schema); failures are retried like writes."""
        what = paths[0] if len(paths) == 1 else f"{len(paths)} files from {paths[0]}"
        return self._retrying(what, lambda: pads.dataset(paths, filesystem=self.fs, format="parquet").to_table(),
                              reading=True)

    def read_schema(self, path: str) -> pa.Schema:
        """The schema of a Parquet file under the output, from its footer (the data is not read)."""
        return self._retrying(path, lambda: pq.read_schema(path, filesystem=self.fs), reading=True)
