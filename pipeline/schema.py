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


ANSWERS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        (Col.VIDEO_ID, pa.string()),
        (Col.VIDEO_URI, pa.string()),
        (Col.QUESTION_ID, pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        (Col.STATUS, pa.string()),
        (Col.ERROR_REASON, pa.string()),
        (Col.ERROR_DETAIL, pa.string()),
        ("model", pa.string()),
        ("frames_decoded", pa.int32()),
        ("frame_indices", pa.list_(pa.int64())),
        ("frame_times_s", pa.list_(pa.float64())),
        # A variable-size list, not list<float32>[4]: pyarrow < 26 cannot read fixed-size lists
        # with null entries back from Parquet, and readers that bring their own pyarrow (a Ray
        # image, Spark) may be that old. Always 4 values when set.
        ("roi_box", pa.list_(pa.float32())),
        ("references", pa.int32()),
        ("temporal_units", pa.int32()),
        ("fusion_layer", pa.int32()),
        ("visual_tokens_native", pa.int64()),
        ("visual_tokens_used", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("attn_flops_ratio", pa.float64()),
        ("total_flops", pa.float64()),
        ("total_flops_native", pa.float64()),
        ("decode_s", pa.float64()),
        ("guidance_s", pa.float64()),
        ("prefill_s", pa.float64()),
        ("generate_s", pa.float64()),
        # How many questions shared this row's video prefill (frames, RoI and system prompt):
        # prefill_s holds this row's share of it. 1 = computed for this question alone.
        ("prefix_shared_with", pa.int32()),
    ]
)

ANSWER_COLUMNS = tuple(ANSWERS_SCHEMA.names)


def frames_schema(embedding_dim: int) -> pa.Schema:
    """The frames table: one row per candidate frame, embeddings as fixed-size float32 lists."""
    return pa.schema(
        [
            ("video_id", pa.string()),
            ("frame_index", pa.int64()),
            ("time_s", pa.float64()),
            ("embedding", pa.list_(pa.float32(), embedding_dim)),
            ("clip_model", pa.string()),
        ]
    )


FRAME_COLUMNS = ("video_id", "frame_index", "time_s", "embedding", "clip_model")


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
