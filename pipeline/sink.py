"""Parquet outputs: the answers and frames tables, written so that reruns resume exactly.

Layout under the output path:
    answers/<video-key>-<digest>.parquet   one file per (video, set of questions answered together)
    frames/<video-key>.parquet             the frame embeddings of one video (rewritten on rerun)
    runs/<run_id>.json                     the run summary

Every file appears whole or not at all: local files are written beside their final name and
renamed, object-store uploads become visible only when complete. A killed run therefore leaves
complete files (whose pairs are skipped on rerun) or none, so each (video_id, question_id) pair
lands exactly once. Temporary names start with '_' so DuckDB/Spark/pyarrow globs skip them.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.sources import filesystem

ANSWERS_DIR = "answers"
FRAMES_DIR = "frames"
RUNS_DIR = "runs"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def video_key(video_id: str) -> str:
    """A file-name-safe, collision-free key for a video id (ids may hold '/', '..' or anything)."""
    readable = _UNSAFE.sub("_", video_id).strip("._")[:60] or "video"
    digest = hashlib.sha256(video_id.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


class OutputStore:
    """The output prefix: all writes go under it and nowhere else."""

    def __init__(self, cfg: OutputConfig):
        self.cfg = cfg
        self.fs, self.root = filesystem(cfg.path, cfg.storage)
        self.root = self.root.rstrip("/")
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def write_table(self, table: pa.Table, *parts: str) -> str:
        final = self.path(*parts)
        parent = final.rsplit("/", 1)[0]
        if self._local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/_tmp-{uuid.uuid4().hex}.parquet"
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self.fs.mv(tmp, final)
        else:
            with self.fs.open(final, "wb") as f:
                pq.write_table(table, f)
        return final

    def write_json(self, payload: dict, *parts: str) -> str:
        final = self.path(*parts)
        if self._local:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(final, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        return final

    def _dataset(self, sub: str) -> pads.Dataset | None:
        base = self.path(sub)
        if not self.fs.exists(base):
            return None
        files = [p for p in self.fs.find(base) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", "."))]
        if not files:
            return None
        return pads.dataset(files, filesystem=self.fs, format="parquet")

    def read_answers(self, columns: list[str] | None = None) -> pa.Table:
        ds = self._dataset(ANSWERS_DIR)
        if ds is None:
            return ANSWERS_SCHEMA.empty_table().select(columns or ANSWERS_SCHEMA.names)
        return ds.to_table(columns=columns)

    def read_frames(self) -> pa.Table | None:
        ds = self._dataset(FRAMES_DIR)
        return None if ds is None else ds.to_table()

    def done_pairs(self) -> set[tuple[str, str]]:
        table = self.read_answers(columns=["video_id", "question_id"])
        return set(zip(table.column("video_id").to_pylist(), table.column("question_id").to_pylist()))


class FramesWriter:
    """Writes one video's frame embeddings to frames/, then drops them from the row (the answer
    stage does not need them). Reads FRAME_EMBEDDINGS, FRAME_TIMES_S, FRAME_INDICES, CLIP_MODEL."""

    reads = (Col.VIDEO_ID, Col.FRAME_EMBEDDINGS, Col.FRAME_INDICES, Col.FRAME_TIMES_S, Col.CLIP_MODEL)
    writes = ()

    def __init__(self, output: OutputConfig):
        self.store = OutputStore(output)

    def __call__(self, row: dict) -> dict:
        from pipeline.guidance import frames_table

        row = dict(row)
        if row.get(Col.STATUS) == "ok" and len(row.get(Col.FRAME_EMBEDDINGS, ())):
            self.store.write_table(frames_table(row), FRAMES_DIR, f"{video_key(row[Col.VIDEO_ID])}.parquet")
        row.pop(Col.FRAME_EMBEDDINGS, None)
        return row


class AnswersWriter:
    """Writes answers rows, one file per video group in the batch, and returns a small summary
    table (video_id, question_id, status, error) for the driver's run summary."""

    def __init__(self, output: OutputConfig, run_id: str):
        self.store = OutputStore(output)
        self.run_id = run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = batch.select(ANSWERS_SCHEMA.names).cast(ANSWERS_SCHEMA)
        ids = table.column("video_id").to_pylist()
        for vid in dict.fromkeys(ids):
            rows = table.filter(pc.equal(table.column("video_id"), vid))
            qids = sorted(rows.column("question_id").to_pylist())
            digest = hashlib.sha256("\n".join([self.run_id, *qids]).encode()).hexdigest()[:12]
            self.store.write_table(rows, ANSWERS_DIR, f"{video_key(vid)}-{digest}.parquet")
        return table.select(["video_id", "question_id", "status", "error"])
