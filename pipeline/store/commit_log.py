"""The record of what an output holds, so resuming reads a few small files instead of every output.

Under `<output>/_commits/`:
    answers/<stamp>-<id>.parquet   (video_id, question_id, status, error_reason, fingerprint, file) per answers row
    frames/<stamp>-<id>.parquet    (video_id, file) per video in a frames file
    _txn/<id>.json                 a commit in progress: the files it moves into place and removes

A data file counts only while it exists: the record's rows are those whose `file` is in the one
listing of answers/ (or frames/), so files removed by supersede or compaction drop out of the record
without rewriting it. Data files the record does not know (written by versions before the record, or
by hand) are read once and recorded. `consolidate` merges the manifests into one when they pile up.

A commit (`apply`) makes several data files appear and others disappear together: new files are
first written under '_pending-' names (readers skip them), by the driver or by a merge task
(`write_pending`, pipeline/store/file_merge.py); `apply` writes their manifests under the final names,
then the journal, and from then on the commit is rolled forward: old files removed, pending files
renamed, journal deleted. `recover` finishes a journal a killed run left. Until the journal
exists nothing is visible, so a crash before it loses only that commit's rows, which a rerun redoes;
while a commit is applied a reader may briefly miss its rows, never see one twice.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.errors import reason_from_old_error_column
from pipeline.schema import ANSWERS_SCHEMA, Col

log = logging.getLogger("moref_index")

COMMITS_DIR = "_commits"
TXN_DIR = "_txn"
PENDING = "_pending-"
CONSOLIDATE_AT = 32  # manifests per table before they are merged into one

# fingerprint: null in manifests written before it existed (a schema'd read fills it in)
ANSWERS_RECORD = pa.schema([ANSWERS_SCHEMA.field(c) for c in (Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS,
                                                                Col.ERROR_REASON, Col.FINGERPRINT)]
                           + [pa.field("file", pa.string())])
FRAMES_RECORD = pa.schema([pa.field(Col.VIDEO_ID, pa.string()), pa.field("file", pa.string())])
RECORDS = {"answers": ANSWERS_RECORD, "frames": FRAMES_RECORD}

# What an unrecorded answers file is read for; `error` is the single error column of files written
# before error_reason/error_detail (null in newer files, as error_reason is in older ones).
_OLD_ERROR_COLUMN = "error"
_STATUS_SCHEMA = pa.schema(list(ANSWERS_RECORD)[:-1] + [pa.field(_OLD_ERROR_COLUMN, pa.string())])


@dataclasses.dataclass(frozen=True)
class NewFile:
    """A data file a commit makes visible, already written under its pending name (PENDING + name):
    its folder ('answers' or 'frames'), name, record rows, and for the log its rows and bytes. It
    carries no data, so whoever wrote the file (the driver, or a merge task: pipeline/store/file_merge.py)
    hands the commit only this."""

    sub: str
    name: str
    record: pa.Table
    num_rows: int
    size_bytes: int


def write_pending(store, table: pa.Table, sub: str, name: str) -> NewFile:
    """Write `table` under the pending name of `sub`/`name`, invisible until a commit (`apply`)."""
    path = store.write_table(table, sub, PENDING + name)
    return NewFile(sub, name, record_rows(sub, table, name), table.num_rows, store.size(path))


def record_rows(sub: str, table: pa.Table, name: str) -> pa.Table:
    """The record rows of data file `name` holding `table`."""
    if sub == "frames":  # one record row per video, not per frame
        ids = pc.unique(table.column(Col.VIDEO_ID))
        return pa.table({Col.VIDEO_ID: ids, "file": pa.array([name] * len(ids), pa.string())}, schema=FRAMES_RECORD)
    return _answers_record(_status_columns(table), pa.array([name] * table.num_rows, pa.string()))


def _stamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


class CommitLog:
    """The record of one output (an `OutputStore`)."""

    def __init__(self, store):
        self.store = store

    # ---- reading

    def data_files(self, sub: str) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in self.store.list_files(sub)]

    def _manifests(self, sub: str) -> list[str]:
        return self.store.list_files((COMMITS_DIR, sub))

    def _read_manifests(self, paths: list[str], schema: pa.Schema) -> pa.Table:
        if not paths:
            return schema.empty_table()
        return pads.dataset(paths, filesystem=self.store.fs, format="parquet", schema=schema).to_table()

    def record(self, sub: str, save: bool = True) -> pa.Table:
        """Every row of the data files now in `sub`, as the record has them; unrecorded files are
        read (and with `save`, recorded, so it happens once; readers that must not write pass
        False)."""
        schema = RECORDS[sub]
        files = self.data_files(sub)
        manifests = self._manifests(sub)
        table = self._read_manifests(manifests, schema)
        known = set(pc.unique(table.column("file")).to_pylist())
        unrecorded = [f for f in files if f not in known]
        if unrecorded:
            log.info("recording %d %s file(s) written without a record (read once)", len(unrecorded), sub)
            found = self._read_unrecorded(sub, unrecorded)
            if save:
                self.write_manifest(sub, found)
            table = pa.concat_tables([table, found])
        table = table.filter(pc.is_in(table.column("file"), pa.array(files, pa.string())))
        # a manifest consolidated but not yet deleted (a crash in between) repeats rows
        table = table.group_by(schema.names, use_threads=False).aggregate([]).select(schema.names)
        if save and len(manifests) >= CONSOLIDATE_AT:
            self.consolidate(sub, table, manifests)
        return table

    def _read_unrecorded(self, sub: str, names: list[str]) -> pa.Table:
        paths = [self.store.path(sub, n) for n in names]
        if sub == "frames":
            ds = pads.dataset(paths, filesystem=self.store.fs, format="parquet")
            t = ds.to_table(columns=[Col.VIDEO_ID, "__filename"])
            t = t.group_by([Col.VIDEO_ID, "__filename"], use_threads=False).aggregate([])
            files = [p.rsplit("/", 1)[-1] for p in t.column("__filename").to_pylist()]
            return pa.table({Col.VIDEO_ID: t.column(Col.VIDEO_ID), "file": pa.array(files, pa.string())},
                            schema=FRAMES_RECORD)
        ds = pads.dataset(paths, filesystem=self.store.fs, format="parquet", schema=_STATUS_SCHEMA)
        t = ds.to_table(columns=[*_STATUS_SCHEMA.names, "__filename"])
        files = [p.rsplit("/", 1)[-1] for p in t.column("__filename").to_pylist()]
        return _answers_record(t, pa.array(files, pa.string()))

    # ---- writing

    def write_manifest(self, sub: str, rows: pa.Table) -> str:
        return self.store.write_table(rows.cast(RECORDS[sub]), COMMITS_DIR, sub,
                                      f"{_stamp()}-{uuid.uuid4().hex[:8]}.parquet")

    def consolidate(self, sub: str, table: pa.Table, manifests: list[str]) -> None:
        """Replace the manifests by one holding `table` (the record now); a crash in between
        leaves rows twice in the record, which reading deduplicates."""
        self.write_manifest(sub, table)
        for path in manifests:
            self.store.remove(path)
        log.info("consolidated %d %s manifests into one", len(manifests), sub)

    def apply(self, new: list[NewFile], remove: dict[str, list[str]]) -> None:
        """Commit: the `new` files (written under their pending names, `write_pending`) appear and
        the files in `remove` ({sub: names}) go, together."""
        for f in new:
            self.write_manifest(f.sub, f.record)
        journal = {"moves": [[f.sub, f.name] for f in new],
                   "removes": [[sub, name] for sub, names in remove.items() for name in names]}
        name = f"{_stamp()}-{uuid.uuid4().hex[:8]}.json"
        self.store.write_json(journal, COMMITS_DIR, TXN_DIR, name)
        self._roll_forward(journal, self.store.path(COMMITS_DIR, TXN_DIR, name))

    def _roll_forward(self, journal: dict, journal_path: str) -> None:
        for sub, name in journal["removes"]:
            self.store.remove(self.store.path(sub, name))
        for sub, name in journal["moves"]:
            pending, final = self.store.path(sub, PENDING + name), self.store.path(sub, name)
            self.store.move(pending, final)
        self.store.remove(journal_path)

    def recover(self) -> int:
        """Finish the commits a killed run left half-applied; returns how many."""
        base = self.store.path(COMMITS_DIR, TXN_DIR)
        self.store._invalidate()
        if not self.store.fs.exists(base):
            return 0
        done = 0
        for path in sorted(p for p in self.store.fs.find(base) if p.endswith(".json")):
            journal = json.loads(self.store.fs.cat_file(path))
            self._roll_forward(journal, path)
            done += 1
        if done:
            log.info("finished %d commit(s) an interrupted run left half-applied", done)
        return done


def _status_columns(table: pa.Table) -> pa.Table:
    """`table`'s columns of _STATUS_SCHEMA, null where it has none (`error` in current files,
    `error_reason` in files of the version before it)."""
    return pa.Table.from_arrays(
        [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
         for f in _STATUS_SCHEMA], schema=_STATUS_SCHEMA)


def _answers_record(t: pa.Table, files: pa.Array) -> pa.Table:
    """Answers record rows from `t` (the columns of _STATUS_SCHEMA) and each row's file name."""
    reasons = t.column(Col.ERROR_REASON)
    if t.column(_OLD_ERROR_COLUMN).null_count < t.num_rows:  # rows of a file of the older version
        reasons = pa.array([reason or _value(reason_from_old_error_column(old)) for reason, old in
                            zip(reasons.to_pylist(), t.column(_OLD_ERROR_COLUMN).to_pylist())], pa.string())
    return pa.Table.from_arrays([t.column(Col.VIDEO_ID), t.column(Col.QUESTION_ID), t.column(Col.STATUS),
                                 pa.array(reasons, pa.string()), t.column(Col.FINGERPRINT), files],
                                schema=ANSWERS_RECORD)


def _value(reason) -> str | None:
    return None if reason is None else reason.value
