"""Data files merged and rewritten away from the driver: a commit's frames file from the staged
per-video files, older files rewritten without superseded rows, compaction's bins.

Frame embeddings are most of an output's bytes, so they must not pass through the driver, which
commits every few hundred MB and would become the bottleneck (and a memory risk) of a large run. A
merge (`merge_file`) reads its source files, writes the result under its pending name
(commit_log.PENDING: nothing is visible until the commit's journal) and returns only a `NewFile`:
the file's record rows (a row per video for frames), rows and bytes. The driver then commits it as
any other file (`CommitLog.apply`).

With Ray running (a job's driver) each merge is a Ray task; without Ray (`moref-index compact`, tests
that drive the committer directly) the same function runs in this process. A merge is idempotent:
a task retried after its worker died writes the same pending name again. A task still running when
its driver is killed may leave a pending file behind; readers skip it and the next run's
`clean_temporaries` deletes it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import OutputConfig
from pipeline.schema import Col
from pipeline.store.commit_log import NewFile, write_pending
from pipeline.store.output_store import FRAMES_DIR, OutputStore

# Reading and writing Parquet is I/O bound: a quarter CPU fits beside the pipeline's own tasks
# instead of waiting for a whole CPU to come free while the driver waits for the merge.
MERGE_NUM_CPUS = 0.25
# Retries when the task's worker or node dies; storage errors are retried inside (OutputStore).
MERGE_RETRIES = 3


@dataclasses.dataclass(frozen=True)
class FileMerge:
    """One data file to write, `sub`/`name` under its pending name: the rows of `sources` (paths
    under the output, in order) except those whose `row_keys` are in `drop`."""

    sub: str
    sources: tuple[str, ...]
    name: str
    drop: tuple[str, ...] = ()


def row_keys(sub: str, table: pa.Table) -> pa.ChunkedArray:
    """What a row is superseded by: its video for frames, its (video_id, question_id) pair for answers."""
    if sub == FRAMES_DIR:
        return table.column(Col.VIDEO_ID)
    return pc.binary_join_element_wise(table.column(Col.VIDEO_ID), table.column(Col.QUESTION_ID), "\x00")


def merge_file(output: OutputConfig, merge: FileMerge) -> NewFile | None:
    """Write `merge`'s file under its pending name; None (nothing written) when no row is left."""
    store = OutputStore(output)
    table = store.read_files(list(merge.sources))
    if merge.drop:
        table = table.filter(pc.invert(pc.is_in(row_keys(merge.sub, table), pa.array(merge.drop, pa.string()))))
    if not table.num_rows:
        return None
    return write_pending(store, table, merge.sub, merge.name)


def run_merges(output: OutputConfig, merges: list[FileMerge]) -> list[NewFile | None]:
    """`merge_file` of each, in order: as parallel Ray tasks when Ray is running, else here."""
    ray = _running_ray()
    if ray is None or not merges:
        return [merge_file(output, m) for m in merges]
    task = _merge_task()
    return ray.get([task.remote(output, m) for m in merges])


def _running_ray():
    """The ray module when this process is connected to a Ray; else None. Ray not imported means
    not running, and importing it only to ask would cost `compact` a second."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


@functools.cache
def _merge_task():
    import ray

    return ray.remote(num_cpus=MERGE_NUM_CPUS, max_retries=MERGE_RETRIES)(merge_file)
