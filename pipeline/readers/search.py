"""Text search over the frames table: a phrase in, the matching moments of the archive out.

The query is embedded with the CLIP model that embedded the frames (the frames table records its
name), every frame is scored by cosine similarity, and runs of consecutive frames of one video
that score at least `min_score` merge into a moment (start, end, best frame, best score). Moments
are ranked by their best score across videos.

Small indexes are scored by brute force over a columnar read of frames/. From
`ann_min_frames` frames on (about a million) an approximate index (`pipeline.readers.vector_index`,
LanceDB IVF-PQ) finds the candidate frames; the videos they belong to are then re-read and scored
exactly, so moment boundaries are the same as brute force would give for those videos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.config import OutputConfig, StorageConfig
from pipeline.schema import FRAME_COLUMNS, Col
from pipeline.store.output_store import FRAMES_DIR, OutputStore

# OpenAI CLIP ViT-L/14 puts a matching caption at a cosine of about 0.25-0.35 and an unrelated
# one below 0.2; other models need their own value (--min-score).
DEFAULT_MIN_SCORE = 0.2
DEFAULT_TOP_K = 20
# From this many frames on, search goes through the approximate index (pipeline.readers.vector_index).
ANN_MIN_FRAMES = 1_000_000


class SearchError(RuntimeError):
    """The search cannot run: no frames, the CLIP model is unavailable or not the index's, ..."""


@dataclasses.dataclass(frozen=True)
class Moment:
    """Consecutive frames of one video that all match the query."""

    video_id: str
    start_s: float
    end_s: float
    best_time_s: float
    best_frame_index: int
    score: float  # the best frame's cosine similarity with the query
    frames: int  # how many frames the moment spans

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FrameRows:
    """Frames of the index as numpy arrays: one entry per frame."""

    video_ids: np.ndarray  # object (N,)
    frame_indices: np.ndarray  # int64 (N,)
    times_s: np.ndarray  # float64 (N,)
    embeddings: np.ndarray  # float32 (N, D), L2-normalised

    @classmethod
    def from_table(cls, table: pa.Table) -> FrameRows:
        return cls(
            video_ids=np.asarray(table.column(Col.VIDEO_ID).to_pylist(), dtype=object),
            frame_indices=table.column(Col.FRAME_INDEX).to_numpy(),
            times_s=table.column(Col.TIME_S).to_numpy(),
            embeddings=embedding_matrix(table.column(Col.EMBEDDING)),
        )


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list embedding column as a float32 (N, D) matrix without a Python loop."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


# ------------------------------------------------------------------------------------ moments


def merge_moments(rows: FrameRows, scores: np.ndarray, min_score: float) -> list[Moment]:
    """Moments of every video: maximal runs of time-consecutive frames scoring >= min_score."""
    moments: list[Moment] = []
    order = np.lexsort((rows.times_s, rows.video_ids.astype(str)))
    vids, times, idx, s = rows.video_ids[order], rows.times_s[order], rows.frame_indices[order], scores[order]
    hit = s >= min_score
    if not hit.any():
        return moments
    # A run breaks where the video changes or a frame falls below the threshold.
    new_video = np.r_[True, vids[1:] != vids[:-1]]
    starts = hit & (new_video | ~np.r_[False, hit[:-1]])
    run_id = np.cumsum(starts)
    for run in np.unique(run_id[hit]):
        members = np.flatnonzero(hit & (run_id == run))
        best = members[np.argmax(s[members])]
        moments.append(
            Moment(
                video_id=str(vids[members[0]]),
                start_s=float(times[members[0]]),
                end_s=float(times[members[-1]]),
                best_time_s=float(times[best]),
                best_frame_index=int(idx[best]),
                score=float(s[best]),
                frames=len(members),
            )
        )
    return moments


def rank_moments(moments: Iterable[Moment], top_k: int) -> list[Moment]:
    """The top_k moments by score (ties: video id, then time)."""
    return sorted(moments, key=lambda m: (-m.score, m.video_id, m.start_s))[:top_k]


# ---------------------------------------------------------------------------------- the index


class FramesIndex:
    """The frames/ table of one output (local or any fsspec URL), read column by column."""

    def __init__(self, output: str, storage: StorageConfig | None = None):
        self.output_cfg = OutputConfig(path=output, storage=storage or StorageConfig())
        self.store = OutputStore(self.output_cfg)

    def files(self, video_ids: Sequence[str] | None = None) -> list[str]:
        """Frames files: all of them, or those holding the given videos (by the output's record)."""
        if video_ids is None:
            return self.store.list_files(FRAMES_DIR)
        from pipeline.store.commit_log import CommitLog

        record = CommitLog(self.store).record(FRAMES_DIR, save=False)  # searching never writes
        held = record.filter(pc.is_in(record.column("video_id"), pa.array(list(video_ids), pa.string())))
        return [self.store.path(FRAMES_DIR, name) for name in sorted(set(held.column("file").to_pylist()))]

    def dataset(self, video_ids: Sequence[str] | None = None) -> pads.Dataset | None:
        files = self.files(video_ids)
        return pads.dataset(files, filesystem=self.store.fs, format="parquet") if files else None

    @staticmethod
    def _only(video_ids: Sequence[str] | None) -> pc.Expression | None:
        """The filter to the given videos' rows: a frames file holds many videos."""
        return None if video_ids is None else pc.field("video_id").isin(list(video_ids))

    def count(self, video_ids: Sequence[str] | None = None) -> int:
        ds = self.dataset(video_ids)
        return 0 if ds is None else ds.count_rows(filter=self._only(video_ids))

    def models(self, video_ids: Sequence[str] | None = None) -> dict[str, int]:
        """CLIP model name -> frames embedded with it."""
        ds = self.dataset(video_ids)
        if ds is None:
            return {}
        table = ds.to_table(columns=[Col.CLIP_MODEL], filter=self._only(video_ids))
        counts = table.column(Col.CLIP_MODEL).value_counts()
        return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}

    def read(self, video_ids: Sequence[str] | None = None, columns: Sequence[str] = FRAME_COLUMNS,
             files: Sequence[str] | None = None) -> pa.Table:
        """Frames of the given videos (all without), from `files` when the caller knows which
        files hold them (the search index does), else from the files the record names."""
        if files is not None:
            ds = pads.dataset(list(files), filesystem=self.store.fs, format="parquet") if files else None
        else:
            ds = self.dataset(video_ids)
        if ds is None:
            return pa.table({c: [] for c in columns})
        return ds.to_table(columns=list(columns), filter=self._only(video_ids))

    def embedding_dim(self) -> int:
        ds = self.dataset()
        if ds is None:
            raise SearchError(f"no frames table under {self.output_cfg.path}")
        return ds.schema.field(Col.EMBEDDING).type.list_size


def the_clip_model(models: dict[str, int]) -> str:
    """The one CLIP model of the searched frames; SearchError when there are none or several."""
    if not models:
        raise SearchError("the index holds no frames (nothing under frames/, or none for the given filters)")
    if len(models) > 1:
        listed = ", ".join(f"{name!r} ({n} frames)" for name, n in sorted(models.items()))
        raise SearchError(
            f"the index mixes CLIP models: {listed}; embeddings of different models are not comparable. "
            "Restrict the search with --video-id / --where to videos of one model, or re-run them with one model"
        )
    return next(iter(models))


# -------------------------------------------------------------------------------- query text


class QueryEncoder:
    """Embeds query text with a CLIP model, checked to be the one that embedded the frames."""

    def __init__(self, bundle, recorded_model: str, dim: int):
        from pipeline.stages.clip_encoder import FrameEncoder

        if bundle.name != recorded_model:
            raise SearchError(
                f"CLIP model mismatch: the frames were embedded with {recorded_model!r}, "
                f"but the model given is {bundle.name!r}"
            )
        if bundle.embed_dim != dim:
            raise SearchError(f"CLIP model {bundle.name!r} embeds to {bundle.embed_dim} dims, the index holds {dim}")
        self.encoder = FrameEncoder(bundle)

    @classmethod
    def load(cls, recorded_model: str, dim: int, clip_model: str | None = None,
             clip_pretrained: str | None = None, device: str = "cpu") -> QueryEncoder:
        """Load the recorded model (a built-in name with its tag, or an hf-hub id), or the one given
        (a local directory, or a name and weights); SearchError when it cannot be loaded."""
        from pipeline.stages.clip_models import HF_HUB_PREFIX, load_clip

        if clip_model is None:
            if recorded_model.startswith(HF_HUB_PREFIX):
                clip_model, clip_pretrained = recorded_model, None
            elif "/" in recorded_model:
                clip_model, clip_pretrained = recorded_model.rsplit("/", 1)
            else:
                raise SearchError(
                    f"the frames were embedded with CLIP model {recorded_model!r}, loaded from a local directory "
                    "of that name; pass its path with --clip-model"
                )
        try:
            bundle = load_clip(clip_model, clip_pretrained, device)
        except Exception as exc:  # noqa: BLE001 - open_clip, hub and file errors alike mean "not available"
            raise SearchError(
                f"CLIP model {recorded_model!r}, which embedded the frames, is not available here "
                f"({type(exc).__name__}: {exc}); pass a local copy with --clip-model"
            ) from None
        return cls(bundle, recorded_model, dim)

    def __call__(self, text: str) -> np.ndarray:
        return self.encoder.encode_text([text])[0]


# ------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class SearchResult:
    moments: list[Moment]
    frames_searched: int
    method: str  # "brute_force" or "ann"
    clip_model: str


def manifest_video_ids(manifest: str, where: dict[str, str], storage: StorageConfig | None = None) -> list[str]:
    """Ids of the manifest's videos whose columns equal every value in `where` (compared as text)."""
    from pipeline.sources import manifest_ids, read_table

    table = read_table(manifest, storage or StorageConfig(), "search --manifest")
    missing = [c for c in where if c not in table.column_names]
    if missing:
        raise SearchError(f"manifest {manifest} has no column(s) {missing}; found {table.column_names}")
    ids = manifest_ids(table)
    keep = np.ones(len(ids), bool)
    for column, value in where.items():
        keep &= np.asarray([str(v) == value for v in table.column(column).to_pylist()], bool)
    return [i for i, k in zip(ids, keep) if k]


def search_vector(index: FramesIndex, query: np.ndarray, *, top_k: int = DEFAULT_TOP_K,
                  min_score: float = DEFAULT_MIN_SCORE, video_ids: Sequence[str] | None = None,
                  ann_min_frames: int = ANN_MIN_FRAMES, update_index: bool = True,
                  clip_model: str = "") -> SearchResult:
    """Moments for a query embedding (D,), L2-normalised."""
    from pipeline.readers.vector_index import VectorIndex

    query = np.asarray(query, np.float32)
    ann = VectorIndex(index)
    state = ann.state() if video_ids is None else None
    frames = state["frames"] if state else index.count(video_ids)
    if frames >= ann_min_frames:
        state = ann.synced_state(update_index)
        frames = frames if video_ids is not None else state["frames"]
        candidates = ann.candidate_videos(query, state, min_score, max_videos=max(4 * top_k, 50),
                                          video_ids=video_ids)
        # A synced index's id map names the files holding the candidates: reading the record
        # instead costs a pass over the whole archive's record per query.
        files = ann.video_files(state, candidates) if update_index and candidates else None
        rows = FrameRows.from_table(index.read(candidates, files=files)) if candidates else None
        method = "ann"
    else:
        table = index.read(video_ids)
        rows = FrameRows.from_table(table) if table.num_rows else None
        method = "brute_force"
    if rows is None:
        return SearchResult([], frames, method, clip_model)
    scores = rows.embeddings @ query
    return SearchResult(rank_moments(merge_moments(rows, scores, min_score), top_k), frames, method, clip_model)


def search_text(text: str, output: str, *, storage: StorageConfig | None = None, top_k: int = DEFAULT_TOP_K,
                min_score: float = DEFAULT_MIN_SCORE, video_ids: Sequence[str] | None = None,
                clip_model: str | None = None, clip_pretrained: str | None = None,
                ann_min_frames: int = ANN_MIN_FRAMES, update_index: bool = True) -> SearchResult:
    """Embed `text` with the index's CLIP model and return the best moments."""
    index = FramesIndex(output, storage)
    recorded = the_clip_model(index.models(video_ids))
    encoder = QueryEncoder.load(recorded, index.embedding_dim(), clip_model, clip_pretrained)
    return search_vector(index, encoder(text), top_k=top_k, min_score=min_score, video_ids=video_ids,
                         ann_min_frames=ann_min_frames, update_index=update_index, clip_model=recorded)


def format_time(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes:02d}:{secs:04.1f}"


def render_moments(result: SearchResult) -> str:
    """The moments as a text table, best first."""
    head = (f"{len(result.moments)} moment(s) from {result.frames_searched} frames "
            f"({result.method.replace('_', ' ')}, {result.clip_model})")
    if not result.moments:
        return head + ": nothing scored above the threshold"
    width = max(8, *(len(m.video_id) for m in result.moments))
    lines = [head, f"{'score':>6}  {'video':<{width}}  {'start':>8}  {'end':>8}  {'best':>8}  frame"]
    for m in result.moments:
        lines.append(f"{m.score:6.3f}  {m.video_id:<{width}}  {format_time(m.start_s):>8}  {format_time(m.end_s):>8}  "
                     f"{format_time(m.best_time_s):>8}  {m.best_frame_index}")
    return "\n".join(lines)
