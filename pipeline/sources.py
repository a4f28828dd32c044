"""Input files: filesystems, tables, and the wording of questions.

Videos come from glob(s) over a local path or any fsspec URL (s3://, gs://, file://), or from a
manifest file (Parquet, JSONL or CSV) of URIs and optional ids (pipeline/run/listing.py lists them).
Questions come from a per-video file (video_id, question_id, question, and `options` for multiple
choice) and/or global prompts asked of every video (pipeline/run/planning.py pairs them with videos).
Small tables are read whole (`read_table`); a job's manifest is read by Ray Data (`read_dataset`),
so its size never lands on the driver.
"""

from __future__ import annotations

import pathlib
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from freemoref.prompts import multiple_choice_question, open_ended_question
from pipeline.config import ConfigError, QuestionsConfig, StorageConfig

# Ids are text: type inference would turn "0001" into 1 and lose the match.
_TEXT_COLUMNS = ("video_id", "question_id", "video_uri", "uri")


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it; local paths get the local fs."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return fsspec.core.url_to_fs(url, **storage.fsspec_options(protocol))


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: ids are paths relative to it."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)


def read_table(url: str, storage: StorageConfig, what: str) -> pa.Table:
    """Read a Parquet, JSONL or CSV file (chosen by extension) into an Arrow table."""
    fs, path = filesystem(url, storage)
    suffix = pathlib.PurePosixPath(path).suffix.lower()
    try:
        with fs.open(path, "rb") as f:
            if suffix == ".parquet":
                return pq.read_table(f)
            if suffix in (".jsonl", ".json", ".ndjson"):
                return pa_json.read_json(f)
            if suffix == ".csv":
                as_text = {c: pa.string() for c in _TEXT_COLUMNS}
                return pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(column_types=as_text))
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {url}") from None
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{what}: cannot parse {url}: {exc}") from None
    raise ConfigError(f"{what}: {url} must end in .parquet, .jsonl or .csv")


def read_dataset(url: str, storage: StorageConfig, what: str):
    """A Parquet, JSONL or CSV file (chosen by extension) as a Ray Dataset, read by Ray tasks
    through the storage config's filesystem (credentials and endpoint included)."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        raise ConfigError(f"{what}: file not found: {url}")
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    suffix = pathlib.PurePosixPath(path).suffix.lower()
    if suffix == ".parquet":
        return ray.data.read_parquet(path, filesystem=arrow_fs)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return ray.data.read_json(path, filesystem=arrow_fs, file_extensions=None)
    if suffix == ".csv":
        convert = pa_csv.ConvertOptions(column_types={c: pa.string() for c in _TEXT_COLUMNS})
        return ray.data.read_csv(path, filesystem=arrow_fs, convert_options=convert)
    raise ConfigError(f"{what}: {url} must end in .parquet, .jsonl or .csv")


def _require_columns(table: pa.Table, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ConfigError(f"{what}: missing column(s) {missing}; found {table.column_names}")


def manifest_ids(table: pa.Table) -> list[str]:
    """The video ids of a manifest's rows: its `video_id` column, else the file name of the URI."""
    if "video_id" in table.column_names:
        return [str(i) for i in table.column("video_id").to_pylist()]
    uri_col = "video_uri" if "video_uri" in table.column_names else "uri"
    return [posixpath.basename(str(u)) for u in table.column(uri_col).to_pylist()]


def _worded(question: str, options: list | tuple | None, cfg: QuestionsConfig, what: str) -> str:
    """The question as the model sees it: with its lettered options and the benchmark's
    instructions (`multiple_choice_prompt`), or with the open-ended post-prompt."""
    if not options:
        return open_ended_question(question, cfg.open_ended_prompt)
    try:
        return multiple_choice_question(question, [str(o) for o in options], cfg.multiple_choice_prompt)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _ids(table: pa.Table, column: str, what: str) -> list[str]:
    """An id column as text; a missing (null) id is an error, never the string "None"."""
    values = table.column(column).to_pylist()
    if None in values:
        raise ConfigError(f"{what}: row {values.index(None) + 1} has no {column}")
    return [str(v) for v in values]


def word_questions(table: pa.Table, cfg: QuestionsConfig) -> pa.Table:
    """The questions file as (video_id, question_id, question) text columns in file order, each
    question worded as the model sees it (`_worded`); checked: no empty question, no pair twice."""
    what = "questions.file"
    _require_columns(table, ("video_id", "question_id", "question"), what)
    vids = _ids(table, "video_id", what)
    qids = _ids(table, "question_id", what)
    texts = table.column("question").to_pylist()
    # Multiple-choice sets (pipeline.readers.benchmark) carry options; CSV files cannot.
    options = table.column("options").to_pylist() if "options" in table.column_names else [None] * len(table)
    worded, seen = [], set()
    for vid, qid, text, choices in zip(vids, qids, texts, options):
        if text is None or not str(text).strip():
            raise ConfigError(f"{what}: empty question for video_id={vid!r} question_id={qid!r}")
        if choices is not None and not isinstance(choices, (list, tuple)):
            raise ConfigError(f"{what}: options of video_id={vid!r} question_id={qid!r} must be a list of "
                              f"choices, got {type(choices).__name__} {str(choices)[:60]!r}")
        if (vid, qid) in seen:
            raise ConfigError(f"{what}: duplicate (video_id, question_id) = ({vid!r}, {qid!r})")
        seen.add((vid, qid))
        worded.append(_worded(str(text), choices, cfg, what))
    return pa.table({"video_id": pa.array(vids, pa.string()), "question_id": pa.array(qids, pa.string()),
                     "question": pa.array(worded, pa.string())})
