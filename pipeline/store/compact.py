"""`moref-index compact`: rewrite the small answers and frames files of many runs into large ones.

Runs (each flush every `output.flush_interval_s`, incremental runs of a few new videos) leave files
smaller than `output.target_file_mb`. Compaction packs files under half the target into files of
about the target, largest first, each bin one commit (pipeline/store/commit_log.py): the new file appears
and the old ones go together, so no row is lost or duplicated, also when it is killed half-way.
Files whose schema is not the current one (answers files of older versions) are left as they are:
rewriting them under the current schema would drop their old columns. It holds the output's lease,
so it never runs beside a job. Each bin is merged by `file_merge.merge_file`: a Ray task when Ray is
running, in this process otherwise (the CLI does not start Ray for it).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from pipeline.config import MB
from pipeline.schema import ANSWERS_SCHEMA
from pipeline.store.commit_log import CommitLog
from pipeline.store.file_merge import FileMerge, run_merges
from pipeline.store.output_lock import OutputLease
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR, OutputStore

log = logging.getLogger("moref_index")


@dataclasses.dataclass
class CompactionResult:
    files_before: dict[str, int]
    files_after: dict[str, int]
    rows: dict[str, int]  # rows moved into new files


def compact(store: OutputStore, target_mb: float | None = None, run_id: str = "compact") -> CompactionResult:
    """Compact `store`'s answers/ and frames/ (see the module docstring)."""
    target = int(target_mb * MB) if target_mb else store.cfg.target_file_bytes
    store.require(ANSWERS_DIR, FRAMES_DIR)  # OutputNotFoundError: no lease file is made where no output is
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
                paths = [store.path(sub, name) for name in bin_]
                schemas = [store.read_schema(p) for p in paths]  # footers only: the merge reads the data
                schema = current or schemas[0]
                same = [name for name, s in zip(bin_, schemas) if s.equals(schema)]
                if len(same) < 2:
                    continue
                name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
                merged = run_merges(store.cfg, [FileMerge(sub, tuple(store.path(sub, n) for n in same), name)])[0]
                commits.apply([merged] if merged else [], {sub: same})
                rows = merged.num_rows if merged else 0
                moved[sub] += rows
                log.info("compacted %d %s files (%d rows) into %s", len(same), sub, rows, name)
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

