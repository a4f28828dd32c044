"""`moref-index status OUTPUT`: what an output holds, in a few lines of text.

Runs (from runs/<run_id>.json), answers rows ok and in error by reason (from the commit record, so
a large output is summarised from its small manifests, not its data files), the data files and
their size, whether it has a search index, and the last run's throughput. The last run is the
summary written last (file modification time): run ids are free names and need not sort by time.
Reading never writes: unrecorded data files are read, not recorded.
"""

from __future__ import annotations

import dataclasses
import json

from pipeline.config import OutputConfig, StorageConfig
from pipeline.schema import STATUS_OK, Col
from pipeline.store.commit_log import CommitLog
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR, RUNS_DIR, OutputStore

SEARCH_INDEX_STATE = ("search-index", "state.json")  # pipeline.readers.vector_index's state file


@dataclasses.dataclass
class OutputStatus:
    output: str
    runs: list[dict]  # run summaries, oldest first (by when they were written)
    pairs_ok: int
    errors_by_reason: dict[str, int]
    files: dict[str, tuple[int, int]]  # answers / frames -> (files, bytes)
    search_index_frames: int | None  # None: no search index

    @property
    def pairs_error(self) -> int:
        return sum(self.errors_by_reason.values())

    def render(self) -> str:
        statuses: dict[str, int] = {}
        for run in self.runs:
            statuses[str(run.get("status"))] = statuses.get(str(run.get("status")), 0) + 1
        by_status = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        lines = [f"output {self.output}",
                 f"  runs: {len(self.runs)}" + (f" ({by_status})" if by_status else ""),
                 f"  pairs: {self.pairs_ok + self.pairs_error} ({self.pairs_ok} ok, {self.pairs_error} error)"]
        for reason, n in sorted(self.errors_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason}: {n}")
        for sub, (count, size) in self.files.items():
            lines.append(f"  {sub} files: {count} ({_size(size)})")
        index = "none" if self.search_index_frames is None else f"{self.search_index_frames} frames"
        lines.append(f"  search index: {index}")
        if self.runs:
            last = self.runs[-1]
            elapsed, processed = float(last.get("elapsed_s") or 0.0), int(last.get("processed") or 0)
            rate = f"{processed / elapsed:.2f} pairs/s" if elapsed > 0 else "no time recorded"
            lines.append(f"  last run {last.get('run_id')}: {last.get('status')}, {processed} pairs "
                         f"({last.get('ok')} ok, {last.get('errors')} error) in {elapsed:.1f} s, {rate}")
            if last.get("failure"):
                lines.append(f"    failure: {last['failure']}")
        return "\n".join(lines)


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def output_status(output: str, storage: StorageConfig | None = None) -> OutputStatus:
    """The status of the output at `output`; OutputNotFoundError when there is none."""
    store = OutputStore(OutputConfig(path=output, storage=storage or StorageConfig()))
    store.require(ANSWERS_DIR, FRAMES_DIR, RUNS_DIR)
    record = CommitLog(store).record(ANSWERS_DIR, save=False)
    errors: dict[str, int] = {}
    ok = 0
    for status, reason in zip(record.column(Col.STATUS).to_pylist(), record.column(Col.ERROR_REASON).to_pylist()):
        if status == STATUS_OK:
            ok += 1
        else:
            errors[reason or "unknown"] = errors.get(reason or "unknown", 0) + 1
    files = {}
    for sub in (ANSWERS_DIR, FRAMES_DIR):
        paths = store.list_files(sub)
        files[sub] = (len(paths), sum(int(store.fs.info(p)["size"]) for p in paths))
    index_state = store.path(*SEARCH_INDEX_STATE)
    index_frames = json.loads(store.fs.cat_file(index_state))["frames"] if store.fs.exists(index_state) else None
    return OutputStatus(output, store.run_records(), ok, errors, files, index_frames)
