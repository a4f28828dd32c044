"""`moref-index compact`: rewrite the small answers and frames files of many runs into large ones.

Runs (each flush every `output.flush_interval_s`, incremental runs of a few new videos) leave files
smaller than `output.target_file_mb`. Compaction packs files under half the target into files of
about the target, largest first, each bin one commit (pipeline/commit_log.py): the new file appears
and the old ones go together, so no row is lost or duplicated, also when it is killed half-way.
Files whose schema is not the current one (answers files of older versions) are left as they are:
rewriting them under the current schema would drop their old columns. It holds the output's lease,
so it never runs beside a job.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pyarrow as pa

from pipeline.commit_log import CommitLog, NewFile
from pipeline.output_lock import OutputLease
from pipeline.schema import ANSWERS_SCHEMA
from pipeline.sink import ANSWERS_DIR, FRAMES_DIR, OutputStore

log = logging.getLogger("moref_index")
MB = 1 << 20


@dataclasses.dataclass
class CompactionResult:
    files_before: dict[str, int]
    files_after: dict[str, int]
    rows: dict[str, int]  # rows moved into new files


def compact(store: OutputStore, target_mb: float | None = None, run_id: str = "compact") -> CompactionResult:
    """Compact `store`'s answers/ and frames/ (see the module docstring)."""
    target = (target_mb or store.cfg.target_file_mb) * MB
    with OutputLease(store, store.cfg.lock_ttl_s, run_id):
        commits = CommitLog(store)
        commits.recover()
        store.clean_temporaries()
        before, after, moved = {}, {}, {}
        for sub in (ANSWERS_DIR, FRAMES_DIR):
            sizes = _sizes(store, sub)
            before[sub] = len(sizes)
            moved[sub] = 0
            current = ANSWERS_SCHEMA if sub == ANSWERS_DIR else None
            for bin_ in _bins(sizes, target):
                tables = [store._read_file(store.path(sub, name)) for name in bin_]
                schema = current or tables[0].schema
                same = [(name, t) for name, t in zip(bin_, tables) if t.schema.equals(schema)]
                if len(same) < 2:
                    continue
                table = pa.concat_tables([t for _, t in same])
                name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
                commits.apply([NewFile(table, sub, name)], {sub: [n for n, _ in same]})
                moved[sub] += table.num_rows
                log.info("compacted %d %s files (%d rows) into %s", len(same), sub, table.num_rows, name)
            after[sub] = len(store.list_files(sub))
            commits.record(sub)  # consolidates the manifests when they piled up
    return CompactionResult(before, after, moved)


def _sizes(store: OutputStore, sub: str) -> dict[str, int]:
    base = store.path(sub)
    store._invalidate()
    if not store.fs.exists(base):
        return {}
    listing = store.fs.find(base, detail=True)
    return {p.rsplit("/", 1)[-1]: int(info.get("size") or 0) for p, info in listing.items()
            if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", "."))}


def _bins(sizes: dict[str, int], target: float) -> list[list[str]]:
    """Files under half the target, packed first-fit by decreasing size into bins of at most the
    target; only bins of two or more files are worth a rewrite."""
    small = sorted((n for n, s in sizes.items() if s < target / 2), key=lambda n: (-sizes[n], n))
    bins: list[tuple[float, list[str]]] = []
    for name in small:
        for i, (used, names) in enumerate(bins):
            if used + sizes[name] <= target:
                bins[i] = (used + sizes[name], [*names, name])
                break
        else:
            bins.append((sizes[name], [name]))
    return [names for _, names in bins if len(names) > 1]

