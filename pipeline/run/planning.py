"""What a run still has to do: each listed video with its pending questions.

    listing (pipeline/run/listing.py) --plan_videos--> one row per listed video: its pending
        question_ids/questions and counts (questions, skipped as done, retried errors)

`plan_videos` looks a batch of videos up in two indexes (pipeline/store/key_index.py): the worded
questions file keyed by video_id, and the output's record of finished pairs keyed by (video_id,
question_id). So planning costs the listing plus the record, not videos x record.

Where it runs (`input.planning`): in Ray tasks (`_TaskPlanning`: the listing is a Ray Dataset,
each index is built by one task and shared through the object store, the planned rows stay in
the object store), or on the driver for small inputs (`_DriverPlanning`: the same functions on the
whole listing, and no Ray start when there is nothing to do). Either way the driver then holds only
the ids and counts (the listing's own size) to total the summary, find ids listed twice (the same
URI: kept once; two URIs: a ConfigError) and apply `input.limit` (the first N ids in sorted order).

A video's questions are asked in questions-file order, then the prompts in config order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, InputConfig, JobConfig, QuestionsConfig, StorageConfig
from pipeline.fingerprint import config_fingerprint, pair_fingerprint
from pipeline.run.listing import list_videos, listing_table
from pipeline.schema import SOURCE_COLUMNS, STATUS_OK, Col
from pipeline.sources import filesystem, read_table, word_questions
from pipeline.store.key_index import KeyIndex
from pipeline.store.output_store import OutputStore

log = logging.getLogger("moref_index")

# Counts in each planned row.
N_QUESTIONS, N_SKIPPED, N_RETRIED, N_FILE, N_PENDING = "n_questions", "n_skipped", "n_retried", "n_file", "n_pending"
N_CHANGED = "n_changed"  # written pairs asked again: their fingerprint changed (output.redo_changed)
COUNTS = (N_QUESTIONS, N_SKIPPED, N_RETRIED, N_FILE, N_PENDING, N_CHANGED)
# Videos per planning task: large enough that a task's fixed costs stay small, small enough that
# the listing spreads over the cluster's CPUs and a task's memory stays in the tens of MB.
PLAN_BATCH_VIDEOS = 65536
UNMATCHED_EXAMPLES = 5  # unmatched questions named in the summary
# `input.planning: auto` plans a manifest up to this size on the driver (about 100k rows of CSV)
DRIVER_MANIFEST_BYTES = 8 << 20


@dataclasses.dataclass
class Plan:
    videos: int = 0  # listed videos with at least one question
    inputs: int = 0  # (video, question) pairs
    skipped_done: int = 0
    retried_errors: int = 0
    changed_pairs: int = 0  # written pairs pending again because their fingerprint changed
    unmatched_questions: int = 0  # questions-file rows whose video_id is not listed
    # the first few of them (by video_id, question_id), as (video_id, question_id)
    unmatched_examples: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    pending_videos: int = 0
    pending_pairs: int = 0
    # the pending rows (pipeline.schema.SOURCE_COLUMNS): a Ray Dataset when planned in tasks, an
    # Arrow table when planned on the driver; None when there is nothing to do
    pending: Any = None

    def source(self):
        """The pipeline's source: the pending rows as a Ray Dataset, one video per block (the
        decode tasks take one block each, so videos decode in parallel). Needs a running Ray."""
        import ray

        ds = ray.data.from_arrow(self.pending) if isinstance(self.pending, pa.Table) else self.pending
        return ds.repartition(target_num_rows_per_block=1)

    def rows(self) -> list[dict]:
        """The pending rows, on the driver (for tests and small jobs)."""
        if self.pending is None:
            return []
        rows = self.pending.to_pylist() if isinstance(self.pending, pa.Table) else self.pending.take_all()
        return sorted(rows, key=lambda r: r[Col.VIDEO_ID])


@dataclasses.dataclass
class _Indexes:
    """What planning looks videos up in; in the task executor each field is an object-store ref,
    resolved in the task (`_plan_in_task`)."""

    questions: Any  # (worded questions table, KeyIndex on video_id), or None
    # (KeyIndex on (video_id, question_id), each row's fingerprint): pairs to skip unless their
    # fingerprint changed; None with resume off
    done: Any
    retry: Any  # KeyIndex of the error pairs to do again; None with resume off
    prompts: list[tuple[str, str]]
    # the job's config fingerprint (pipeline/fingerprint.py); None: keep written rows whatever changed
    config_fingerprint: str | None = None


@contextlib.contextmanager
def config_errors():
    """A ConfigError raised in a Ray task reaches the driver wrapped (RayTaskError); re-raise it as
    the plain ConfigError the CLI reports."""
    try:
        yield
    except ConfigError as exc:
        if type(exc) is ConfigError:
            raise
        raise ConfigError(_config_message(exc) or str(exc)) from None
    except Exception as exc:
        message = _config_message(exc)
        if message is None:
            raise
        raise ConfigError(message) from None


def _config_message(exc: BaseException) -> str | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is ConfigError:
            return str(e)
        cause = getattr(e, "cause", None)  # RayTaskError keeps the task's exception here
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
    return None


def plans_on_driver(cfg: InputConfig) -> bool:
    """Where `input.planning: auto` plans: on the driver for a manifest of at most
    DRIVER_MANIFEST_BYTES or globs on local disk (no Ray start for a rerun with nothing to do),
    else in Ray tasks."""
    if cfg.planning != "auto":
        return cfg.planning == "driver"
    if cfg.manifest:
        fs, path = filesystem(cfg.manifest, cfg.storage)
        return not fs.exists(path) or fs.size(path) <= DRIVER_MANIFEST_BYTES
    return all(_is_local(filesystem(pattern, cfg.storage)[0]) for pattern in cfg.videos or [])


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def plan_work(cfg: JobConfig, store: OutputStore) -> Plan:
    """List the videos, attach their pending questions and count. Planning in tasks needs a
    running Ray; on the driver, Ray is not touched."""
    prompts = [(p.question_id, p.question) for p in cfg.questions.prompts]
    # on the driver, as the answer stage's (pipeline/run/job_stages.py), which stamps rows with it
    fingerprint = config_fingerprint(cfg) if cfg.output.redo_changed else None
    with config_errors():
        planned = _DriverPlanning(cfg, prompts, fingerprint) if plans_on_driver(cfg.input) \
            else _TaskPlanning(cfg, prompts, fingerprint)
        totals = planned.totals()
    if not totals.num_rows and cfg.input.videos:
        raise ConfigError(f"input.videos: no files match {cfg.input.videos}")
    work_filter: dict[str, Any] = {}
    totals, extra_rows = _resolve_duplicates(planned, totals, work_filter)
    # matched against every listed video: questions of videos input.limit leaves out name a video
    matched = int(pc.sum(totals.column(N_FILE)).as_py() or 0)
    unmatched = planned.n_file - matched
    examples = planned.unmatched_examples(totals.column(Col.VIDEO_ID), UNMATCHED_EXAMPLES) if unmatched else []
    if cfg.input.limit and totals.num_rows > cfg.input.limit:
        first = pc.select_k_unstable(totals, k=cfg.input.limit, sort_keys=[(Col.VIDEO_ID, "ascending")])
        totals = totals.take(first)
        work_filter["keep"] = totals.column(Col.VIDEO_ID)
        extra_rows = [r for r in extra_rows if r[Col.VIDEO_ID] in set(work_filter["keep"].to_pylist())]
    sums = {name: int(pc.sum(totals.column(name)).as_py() or 0) for name in COUNTS}
    plan = Plan(videos=int(pc.sum(pc.greater(totals.column(N_QUESTIONS), 0)).as_py() or 0),
                inputs=sums[N_QUESTIONS], skipped_done=sums[N_SKIPPED], retried_errors=sums[N_RETRIED],
                changed_pairs=sums[N_CHANGED],
                unmatched_questions=unmatched, unmatched_examples=examples, pending_pairs=sums[N_PENDING],
                pending_videos=int(pc.sum(pc.greater(totals.column(N_PENDING), 0)).as_py() or 0))
    if plan.unmatched_questions:
        log.warning("%d questions name video_ids that match no listed video, e.g. %s", plan.unmatched_questions,
                    ", ".join(f"{v}/{q}" for v, q in examples))
    if plan.pending_pairs:
        plan.pending = planned.pending(work_filter, extra_rows)
    return plan


class _DriverPlanning:
    """Planning in this process, for small inputs: the same functions the tasks run, on the whole
    listing as one batch."""

    def __init__(self, cfg: JobConfig, prompts: list[tuple[str, str]], fingerprint: str | None):
        loaded, self.n_file = _load_questions(cfg.questions, cfg.input.storage, prompts)
        self.loaded = loaded
        done, retry = _resume_indexes(cfg) if cfg.output.resume else (None, None)
        self.table = plan_videos(listing_table(cfg.input), _Indexes(loaded, done, retry, prompts, fingerprint))

    def totals(self) -> pa.Table:
        return self.table.select([Col.VIDEO_ID, *COUNTS])

    def rows_of(self, ids: pa.Array) -> list[dict]:
        return _rows_of(self.table, ids).to_pylist()

    def unmatched_examples(self, listed: pa.ChunkedArray, k: int) -> list[tuple[str, str]]:
        return unmatched_examples(self.loaded, listed, k)

    def pending(self, work_filter: dict[str, Any], extra_rows: list[dict]) -> pa.Table:

        work = _pending_only(self.table, list(SOURCE_COLUMNS), **work_filter)
        if extra_rows:
            work = pa.concat_tables([work, pa.Table.from_pylist(extra_rows).select(list(SOURCE_COLUMNS))
                                     .cast(work.schema)])
        return work


class _TaskPlanning:
    """Planning in Ray tasks: the listing is a Ray Dataset (pipeline/run/listing.py); the questions
    and the record are indexed by one task each and shared through the object store; the planned
    rows stay in the object store and only ids and counts come to the driver."""

    def __init__(self, cfg: JobConfig, prompts: list[tuple[str, str]], fingerprint: str | None):
        import ray

        listing = list_videos(cfg.input)
        # a ConfigError raised in a task reaches the driver as itself (Ray Data's UserCodeException
        # would drop it); set on the listing, this holds for the datasets derived from it
        listing.context.raise_original_map_exception = True
        load, n_file = ray.remote(num_cpus=1, num_returns=2)(_load_questions).remote(
            cfg.questions, cfg.input.storage, prompts)
        resume = ray.remote(num_cpus=1, num_returns=2)(_resume_indexes).remote(cfg) if cfg.output.resume \
            else (None, None)
        self.n_file = ray.get(n_file)
        self.loaded = load
        indexes = _Indexes(questions=load, done=resume[0], retry=resume[1], prompts=prompts,
                           config_fingerprint=fingerprint)
        self.planned = listing.map_batches(_plan_in_task, fn_kwargs={"refs": indexes}, batch_format="pyarrow",
                                           batch_size=PLAN_BATCH_VIDEOS).materialize()

    def totals(self) -> pa.Table:
        """The planned rows' ids and counts, streamed to the driver a block at a time."""
        columns = [Col.VIDEO_ID, *COUNTS]
        tables = list(self.planned.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None))
        if not tables:
            return pa.schema([(Col.VIDEO_ID, pa.string())] + [(c, pa.int64()) for c in COUNTS]).empty_table()
        return pa.concat_tables(tables).combine_chunks()

    def unmatched_examples(self, listed: pa.ChunkedArray, k: int) -> list[tuple[str, str]]:
        """In a task, beside the questions it looks at (the driver never holds the file)."""
        import ray

        return ray.get(ray.remote(num_cpus=1)(unmatched_examples).remote(self.loaded, listed, k))

    def rows_of(self, ids: pa.Array) -> list[dict]:
        return self.planned.map_batches(_rows_of, fn_kwargs={"ids": ids}, batch_format="pyarrow",
                                        batch_size=None).take_all()

    def pending(self, work_filter: dict[str, Any], extra_rows: list[dict]):
        import ray


        work = self.planned.map_batches(_pending_only, fn_kwargs={"columns": list(SOURCE_COLUMNS), **work_filter},
                                        batch_format="pyarrow", batch_size=None)
        if extra_rows:
            extra = pa.Table.from_pylist([{c: r[c] for c in SOURCE_COLUMNS} for r in extra_rows])
            work = work.union(ray.data.from_arrow(extra.cast(work.schema().base_schema)))
        return work


def _load_questions(cfg: QuestionsConfig, storage: StorageConfig, prompts: list[tuple[str, str]]):
    """The questions file worded and indexed by video_id (or None), and its
    row count."""
    if not cfg.file:
        return None, 0
    table = word_questions(read_table(cfg.file, storage, "questions.file"), cfg)
    prompt_ids = pa.array([q for q, _ in prompts], pa.string())
    clash = table.filter(pc.is_in(table.column(Col.QUESTION_ID), value_set=prompt_ids))
    if clash.num_rows:
        vid = clash.column(Col.VIDEO_ID)[0].as_py()
        both = sorted(set(clash.filter(pc.equal(clash.column(Col.VIDEO_ID), vid)).column(Col.QUESTION_ID)
                          .to_pylist()))
        raise ConfigError(f"questions: question_id(s) {both} used both in the file and in prompts for {vid!r}")
    return (table, KeyIndex(table.select([Col.VIDEO_ID]))), table.num_rows


def unmatched_examples(loaded, listed: pa.ChunkedArray, k: int) -> list[tuple[str, str]]:
    """The first `k` (video_id, question_id) of the questions file, in that order, whose video_id
    is not among the `listed` ids."""
    if loaded is None:
        return []
    table = loaded[0]
    ids = listed.combine_chunks() if isinstance(listed, pa.ChunkedArray) else listed
    missing = table.filter(pc.invert(pc.is_in(table.column(Col.VIDEO_ID), value_set=ids)))
    first = missing.sort_by([(Col.VIDEO_ID, "ascending"), (Col.QUESTION_ID, "ascending")]).slice(0, k)
    return list(zip(first.column(Col.VIDEO_ID).to_pylist(), first.column(Col.QUESTION_ID).to_pylist()))


def _resume_indexes(cfg: JobConfig) -> tuple[tuple[KeyIndex, pa.Array], KeyIndex]:
    """The output's record as two indexes of (video_id, question_id): pairs to skip (with each
    row's fingerprint, to find those that changed), and error pairs to do again
    (`output.retry_errors`)."""
    record = OutputStore(cfg.output).answer_status_table()
    reasons = pa.array(sorted(r.value for r in cfg.output.retry_reasons()), pa.string())
    retry = pc.fill_null(pc.and_(pc.not_equal(record.column(Col.STATUS), STATUS_OK),
                                 pc.is_in(record.column(Col.ERROR_REASON), value_set=reasons)), False)
    keys = record.select([Col.VIDEO_ID, Col.QUESTION_ID])
    done = pc.invert(retry)
    fingerprints = record.column(Col.FINGERPRINT).filter(done).combine_chunks()
    return (KeyIndex(keys.filter(done)), fingerprints), KeyIndex(keys.filter(retry))


def _plan_in_task(batch: pa.Table, refs: _Indexes) -> pa.Table:
    import ray

    questions, done, retry = (None if ref is None else ray.get(ref) for ref in (refs.questions, refs.done, refs.retry))
    return plan_videos(batch, _Indexes(questions, done, retry, refs.prompts, refs.config_fingerprint))


def plan_videos(batch: pa.Table, indexes: _Indexes) -> pa.Table:
    """A batch of listed videos (listing.VIDEO_SCHEMA) with their pending questions (QUESTION_IDS,
    QUESTIONS, in asking order) and COUNTS."""
    n = batch.num_rows
    ids = batch.column(Col.VIDEO_ID)
    # every (video, question) pair: file questions (in file order), then the prompts
    video_row, qids, texts, order = [], [], [], []
    from_file = np.empty(0, np.int64)
    if indexes.questions is not None:
        table, by_video = indexes.questions
        video_rows, file_rows = by_video.lookup(pa.table([ids], names=[Col.VIDEO_ID]))
        from_file = video_rows
        video_row.append(video_rows)
        qids.append(table.column(Col.QUESTION_ID).take(file_rows))
        texts.append(table.column("question").take(file_rows))
        order.append(file_rows)  # file order; the prompts come after every file row
    p = len(indexes.prompts)
    if p:
        video_row.append(np.repeat(np.arange(n), p))
        qids.append(pa.array([q for q, _ in indexes.prompts] * n, pa.string()))
        texts.append(pa.array([t for _, t in indexes.prompts] * n, pa.string()))
        order.append(np.tile(np.arange(p), n) + np.iinfo(np.int64).max // 2)
    if not video_row:
        return _planned(batch, [np.zeros(n, np.int64)] * len(COUNTS), np.zeros(n + 1, np.int32),
                        pa.array([], pa.string()), pa.array([], pa.string()))
    rows = np.concatenate(video_row).astype(np.int64)
    sort = np.lexsort((np.concatenate(order), rows))  # by video, then asking order
    rows = rows[sort]
    qid = pa.concat_arrays([_array(q) for q in qids]).take(sort)
    text = pa.concat_arrays([_array(t) for t in texts]).take(sort)
    pairs = pa.table([ids.take(rows), qid], names=[Col.VIDEO_ID, Col.QUESTION_ID])
    done, changed = _done_and_changed(pairs, text, indexes)
    retried = indexes.retry.contains(pairs) if indexes.retry is not None else np.zeros(len(rows), bool)
    pending = ~done
    per_video = [np.bincount(rows[mask], minlength=n) for mask in (np.ones(len(rows), bool), done, retried & pending)]
    n_pending = np.bincount(rows[pending], minlength=n)
    offsets = np.concatenate([[0], np.cumsum(n_pending)]).astype(np.int32)
    keep = np.flatnonzero(pending)
    return _planned(batch, [*per_video, np.bincount(from_file, minlength=n), n_pending,
                            np.bincount(rows[changed], minlength=n)], offsets, qid.take(keep), text.take(keep))


def _done_and_changed(pairs: pa.Table, texts: pa.Array, indexes: _Indexes) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs are written and stay done, and which are written but changed: their row's
    fingerprint differs from the one this job would write (a row without one, written before
    fingerprints, counts as unchanged). Changed pairs are not done: they are asked again."""
    done = np.zeros(pairs.num_rows, bool)
    changed = np.zeros(pairs.num_rows, bool)
    if indexes.done is None:
        return done, changed
    index, fingerprints = indexes.done
    query_rows, index_rows = index.lookup(pairs)
    done[query_rows] = True
    if indexes.config_fingerprint is None or not len(query_rows):
        return done, changed
    written = fingerprints.take(pa.array(index_rows))
    # One digest per distinct question text (a prompt asked of every video is one text), then a
    # vectorised compare: no Python work per written pair at archive scale.
    questions = _array(texts.take(pa.array(query_rows))).cast(pa.string()).dictionary_encode()
    digests = pa.array([pair_fingerprint(indexes.config_fingerprint, str(q))
                        for q in questions.dictionary.to_pylist()], pa.string())
    expected = digests.take(questions.indices)
    # a row without a fingerprint (written before them) counts as unchanged: null compares to False
    differs = pc.fill_null(pc.not_equal(_array(written), expected), False).to_numpy(zero_copy_only=False)
    changed[query_rows[differs]] = True
    done &= ~changed
    return done, changed


def _array(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _planned(batch: pa.Table, counts: list[np.ndarray], offsets: np.ndarray, qids: pa.Array,
             texts: pa.Array) -> pa.Table:
    out = batch.append_column(Col.QUESTION_IDS, pa.ListArray.from_arrays(pa.array(offsets), qids))
    out = out.append_column(Col.QUESTIONS, pa.ListArray.from_arrays(pa.array(offsets), texts))
    for name, values in zip(COUNTS, counts, strict=True):
        out = out.append_column(name, pa.array(values.astype(np.int64)))
    return out


def _resolve_duplicates(planned: _DriverPlanning | _TaskPlanning, totals: pa.Table,
                        work_filter: dict[str, Any]) -> tuple[pa.Table, list[dict]]:
    """Ids listed more than once: an error if they name different URIs, else kept once. Returns the
    totals without the repeats and the kept rows of repeated ids (added back to the work)."""
    counts = pc.value_counts(totals.column(Col.VIDEO_ID))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return totals, []
    rows = planned.rows_of(repeated)
    kept: dict[str, dict] = {}
    for row in rows:
        first = kept.setdefault(row[Col.VIDEO_ID], row)
        if first[Col.VIDEO_URI] != row[Col.VIDEO_URI]:
            raise ConfigError(f"input: video_id {row[Col.VIDEO_ID]!r} names two videos "
                              f"({first[Col.VIDEO_URI]} and {row[Col.VIDEO_URI]})")
    work_filter["drop"] = repeated
    once = totals.filter(pc.invert(pc.is_in(totals.column(Col.VIDEO_ID), value_set=repeated)))
    again = pa.Table.from_pylist([{c: r[c] for c in totals.column_names} for r in kept.values()],
                                 schema=totals.schema)
    return pa.concat_tables([once, again]), [r for r in kept.values() if r[N_PENDING]]


def _rows_of(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch.column(Col.VIDEO_ID), value_set=ids))


def _pending_only(batch: pa.Table, columns: list[str], drop: pa.Array | None = None,
                  keep: pa.Array | None = None) -> pa.Table:
    mask = pc.greater(batch.column(N_PENDING), 0)
    if drop is not None:  # repeated ids: their kept row is added back once
        mask = pc.and_(mask, pc.invert(pc.is_in(batch.column(Col.VIDEO_ID), value_set=drop)))
    if keep is not None:  # input.limit
        mask = pc.and_(mask, pc.is_in(batch.column(Col.VIDEO_ID), value_set=keep))
    return batch.filter(mask).select(columns)
