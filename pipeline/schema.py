"""Output tables and the columns that travel between stages: every column name is defined here once.

`ANSWERS_SCHEMA` and `FRAMES_SCHEMA` are the Parquet schemas users query (docs/DESIGN.md section 5); files
written with them read back with pyarrow >= 14 (tests/pipeline/test_old_pyarrow.py), DuckDB and Spark.
The `Col` names are the per-video row columns the Ray stages read and write.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"


class Col:
    """Columns of the per-video row as it moves through the pipeline."""

    # source listing
    VIDEO_ID = "video_id"
    VIDEO_URI = "video_uri"
    SIZE_BYTES = "size_bytes"
    QUESTION_IDS = "question_ids"
    QUESTION_ID = "question_id"  # of an answers row (one per question)
    QUESTIONS = "questions"
    # per-row status: the first stage that fails sets the error; later stages pass the row through
    STATUS = "status"
    ERROR_REASON = "error_reason"  # an ErrorReason value (pipeline/errors.py); null when ok
    ERROR_DETAIL = "error_detail"  # the message for people; null when ok
    # decode
    FRAMES = "frames"  # uint8 (T, S, S, 3)
    FRAME_TIMES_S = "frame_times_s"  # float64 (T,)
    FRAME_INDICES = "frame_indices"  # int64 (T,)
    WIDTH = "width"
    HEIGHT = "height"
    FPS = "fps"
    DURATION_S = "duration_s"
    ROTATION = "rotation"
    CODEC = "codec"
    DECODE_BACKEND = "decode_backend"
    DECODE_S = "decode_s"
    # guidance
    FRAME_EMBEDDINGS = "frame_embeddings"  # float32 (T, D)
    CLIP_MODEL = "clip_model"
    SELECTED_POSITIONS = "selected_positions"  # int64 (Q, K): positions into the T candidate frames
    ROI_BOXES = "roi_boxes"  # float32 (Q, 4) as (x0, y0, x1, y1) in [0, 1], or absent
    GUIDANCE_S = "guidance_s"
    # answers rows (with VIDEO_ID, VIDEO_URI, QUESTION_ID, STATUS, ERROR_*, FRAME_*, *_S above)
    RUN_ID = "run_id"
    QUESTION = "question"
    ANSWER = "answer"
    MODEL = "model"
    FRAMES_DECODED = "frames_decoded"
    ROI_BOX = "roi_box"
    REFERENCES = "references"
    TEMPORAL_UNITS = "temporal_units"
    FUSION_LAYER = "fusion_layer"
    FUSION_SCOPE = "fusion_scope"
    VISUAL_TOKENS_NATIVE = "visual_tokens_native"
    VISUAL_TOKENS_USED = "visual_tokens_used"
    PROMPT_TOKENS = "prompt_tokens"
    OUTPUT_TOKENS = "output_tokens"
    ATTN_FLOPS_RATIO = "attn_flops_ratio"
    TOTAL_FLOPS = "total_flops"
    TOTAL_FLOPS_NATIVE = "total_flops_native"
    PREFILL_S = "prefill_s"
    GENERATE_S = "generate_s"
    PREFIX_SHARED_WITH = "prefix_shared_with"
    FINGERPRINT = "fingerprint"  # of what produced the row (pipeline/fingerprint.py): resume redoes a changed pair
    # frames table rows (with VIDEO_ID and CLIP_MODEL above)
    FRAME_INDEX = "frame_index"
    TIME_S = "time_s"
    EMBEDDING = "embedding"


# What planning puts in each row of the job's dataset: one video and its pending questions.
SOURCE_COLUMNS = (Col.VIDEO_ID, Col.VIDEO_URI, Col.SIZE_BYTES, Col.QUESTION_IDS, Col.QUESTIONS)

ANSWERS_SCHEMA = pa.schema(
    [
        (Col.RUN_ID, pa.string()),
        (Col.VIDEO_ID, pa.string()),
        (Col.VIDEO_URI, pa.string()),
        (Col.QUESTION_ID, pa.string()),
        (Col.QUESTION, pa.string()),
        (Col.ANSWER, pa.string()),
        (Col.STATUS, pa.string()),
        (Col.ERROR_REASON, pa.string()),
        (Col.ERROR_DETAIL, pa.string()),
        (Col.MODEL, pa.string()),
        (Col.FRAMES_DECODED, pa.int32()),
        (Col.FRAME_INDICES, pa.list_(pa.int64())),
        (Col.FRAME_TIMES_S, pa.list_(pa.float64())),
        # A variable-size list, not list<float32>[4]: pyarrow < 26 cannot read fixed-size lists
        # with null entries back from Parquet, and readers that bring their own pyarrow (a Ray
        # image, Spark) may be that old. Always 4 values when set.
        (Col.ROI_BOX, pa.list_(pa.float32())),
        (Col.REFERENCES, pa.int32()),
        (Col.TEMPORAL_UNITS, pa.int32()),
        (Col.FUSION_LAYER, pa.int32()),
        # answer.moref.fusion_scope ("question" | "video") where MoRef ran, null otherwise.
        (Col.FUSION_SCOPE, pa.string()),
        (Col.VISUAL_TOKENS_NATIVE, pa.int64()),
        (Col.VISUAL_TOKENS_USED, pa.int64()),
        (Col.PROMPT_TOKENS, pa.int64()),
        (Col.OUTPUT_TOKENS, pa.int64()),
        (Col.ATTN_FLOPS_RATIO, pa.float64()),
        (Col.TOTAL_FLOPS, pa.float64()),
        (Col.TOTAL_FLOPS_NATIVE, pa.float64()),
        (Col.DECODE_S, pa.float64()),
        # The backend that decoded the video: pyav, decord or nvdec (after a fallback, the one that succeeded).
        (Col.DECODE_BACKEND, pa.string()),
        (Col.GUIDANCE_S, pa.float64()),
        (Col.PREFILL_S, pa.float64()),
        (Col.GENERATE_S, pa.float64()),
        # How many questions shared this row's video prefill (frames, RoI and system prompt):
        # prefill_s holds this row's share of it. 1 = computed for this question alone.
        (Col.PREFIX_SHARED_WITH, pa.int32()),
        # What produced the row: the question as asked, the model and its revision, and the config
        # that changes an answer (pipeline/fingerprint.py). A pair whose fingerprint differs from the
        # current job's is asked again. Null in rows written before it existed.
        (Col.FINGERPRINT, pa.string()),
    ]
)

ANSWER_COLUMNS = tuple(ANSWERS_SCHEMA.names)


def frames_schema(embedding_dim: int) -> pa.Schema:
    """The frames table: one row per candidate frame, embeddings as fixed-size float32 lists."""
    return pa.schema(
        [
            (Col.VIDEO_ID, pa.string()),
            (Col.FRAME_INDEX, pa.int64()),
            (Col.TIME_S, pa.float64()),
            (Col.EMBEDDING, pa.list_(pa.float32(), embedding_dim)),
            (Col.CLIP_MODEL, pa.string()),
        ]
    )


FRAME_COLUMNS = (Col.VIDEO_ID, Col.FRAME_INDEX, Col.TIME_S, Col.EMBEDDING, Col.CLIP_MODEL)


def empty_answer_row() -> dict:
    """An answers row with every column present and null, for stages to fill in."""
    return {name: None for name in ANSWER_COLUMNS}


def as_list(values) -> list:
    """A list column's value as a list: Ray hands them over as numpy object arrays, or None when empty."""
    if values is None:
        return []
    if isinstance(values, np.ndarray):
        return values.tolist()
    if isinstance(values, str):
        return [values]
    return list(values)
