"""Inputs: which videos to read and which questions to ask of each.

Videos come from glob(s) over a local path or any fsspec URL (s3://, gs://, file://), or from a
manifest file (Parquet, JSONL or CSV) of URIs and optional ids. Questions come from a per-video
file (video_id, question_id, question, and `options` for multiple choice) and/or global prompts
asked of every video.
"""

from __future__ import annotations

import dataclasses
import pathlib
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from freemoref.prompts import multiple_choice_question, open_ended_question
from pipeline.config import ConfigError, InputConfig, QuestionsConfig, StorageConfig


@dataclasses.dataclass(frozen=True)
class VideoSource:
    video_id: str
    video_uri: str
    size_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: str
    question: str


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it; local paths get the local fs."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return fsspec.core.url_to_fs(url, **storage.fsspec_options(protocol))


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: ids are paths relative to it."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)


def list_videos(cfg: InputConfig) -> list[VideoSource]:
    videos = _from_manifest(cfg) if cfg.manifest else _from_globs(cfg)
    seen: dict[str, str] = {}
    for v in videos:
        if v.video_id in seen and seen[v.video_id] != v.video_uri:
            raise ConfigError(
                f"input: video_id {v.video_id!r} names two videos ({seen[v.video_id]} and {v.video_uri})"
            )
        seen[v.video_id] = v.video_uri
    unique = {v.video_id: v for v in videos}
    ordered = sorted(unique.values(), key=lambda v: v.video_id)
    return ordered[: cfg.limit] if cfg.limit else ordered


def _from_globs(cfg: InputConfig) -> list[VideoSource]:
    out = []
    for pattern in cfg.videos or []:
        fs, path = filesystem(pattern, cfg.storage)
        root = _glob_root(path)
        matches = fs.glob(path, detail=True) if fs.exists(root or "/") else {}
        for name, info in sorted(matches.items()):
            if info.get("type") == "directory":
                continue
            rel = posixpath.relpath(name, root) if root else name
            out.append(VideoSource(video_id=rel, video_uri=_full_uri(fs, name), size_bytes=info.get("size")))
    if not out:
        raise ConfigError(f"input.videos: no files match {cfg.videos}")
    return out


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
                # Ids are text: type inference would turn "0001" into 1 and lose the match.
                as_text = {c: pa.string() for c in ("video_id", "question_id", "video_uri", "uri")}
                return pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(column_types=as_text))
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {url}") from None
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{what}: cannot parse {url}: {exc}") from None
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


def _from_manifest(cfg: InputConfig) -> list[VideoSource]:
    what = "input.manifest"
    manifest = cfg.manifest
    assert manifest is not None  # called only when cfg.manifest is set
    table = read_table(manifest, cfg.storage, what)
    uri_col = "video_uri" if "video_uri" in table.column_names else "uri"
    _require_columns(table, (uri_col,), what)
    uris = [str(u) for u in table.column(uri_col).to_pylist()]
    ids = manifest_ids(table)
    base = posixpath.dirname(manifest)
    out = []
    for vid, uri in zip(ids, uris):
        if "://" not in uri and not uri.startswith("/"):
            uri = posixpath.join(base, uri)  # relative entries are relative to the manifest
        out.append(VideoSource(video_id=vid, video_uri=uri, size_bytes=None))
    return out


def load_questions(cfg: QuestionsConfig, storage: StorageConfig) -> tuple[dict[str, list[Question]], list[Question]]:
    """Per-video questions (video_id -> questions) and the global prompts for every video."""
    per_video: dict[str, list[Question]] = {}
    if cfg.file:
        what = "questions.file"
        table = read_table(cfg.file, storage, what)
        _require_columns(table, ("video_id", "question_id", "question"), what)
        seen = set()
        columns = [table.column(c).to_pylist() for c in ("video_id", "question_id", "question")]
        # Multiple-choice sets (pipeline.question_sets) carry options; CSV files cannot.
        options = table.column("options").to_pylist() if "options" in table.column_names else [None] * len(table)
        for vid, qid, text, choices in zip(*columns, options):
            vid, qid = str(vid), str(qid)
            if not text:
                raise ConfigError(f"{what}: empty question for video_id={vid!r} question_id={qid!r}")
            if (vid, qid) in seen:
                raise ConfigError(f"{what}: duplicate (video_id, question_id) = ({vid!r}, {qid!r})")
            seen.add((vid, qid))
            per_video.setdefault(vid, []).append(Question(qid, _worded(str(text), choices, cfg, what)))
    prompts = [Question(p.question_id, p.question) for p in cfg.prompts]
    return per_video, prompts


def _worded(question: str, options: list | None, cfg: QuestionsConfig, what: str) -> str:
    """The question as the model sees it: with its lettered options and the benchmark's
    instructions (`multiple_choice_prompt`), or with the open-ended post-prompt."""
    if not options:
        return open_ended_question(question, cfg.open_ended_prompt)
    try:
        return multiple_choice_question(question, [str(o) for o in options], cfg.multiple_choice_prompt)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def questions_for(video_id: str, per_video: dict[str, list[Question]], prompts: list[Question]) -> list[Question]:
    own = per_video.get(video_id, [])
    own_ids = {q.question_id for q in own}
    clash = [p.question_id for p in prompts if p.question_id in own_ids]
    if clash:
        raise ConfigError(f"questions: question_id(s) {clash} used both in the file and in prompts for {video_id!r}")
    return own + prompts
