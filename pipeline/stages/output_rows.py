"""The job's two writing stages: the frames of each video staged in the output store, and the
answers rows that stream to the driver (whose committer writes them in files of many videos).
Arrow and the store only: the writing actors never import torch or the models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, STATUS_OK, Col, frames_schema
from pipeline.store.output_store import FRAMES_DIR, STAGING_DIR, OutputStore, video_key


class FramesWriter:
    """Stages one video's frame embeddings under _staging/frames/ (the driver commits them with the
    video's answers, in files of many videos: pipeline/store/committer.py), then drops them from the row
    (the answer stage does not need them). A retried video rewrites its own staged file."""

    reads: ClassVar[Mapping[str, str]] = {
        Col.VIDEO_ID: "names the staged frames file",
        Col.STATUS: "only ok rows have frames to write",
        Col.FRAME_EMBEDDINGS: "written, then dropped from the row",
        Col.FRAME_INDICES: "frame_index column",
        Col.FRAME_TIMES_S: "time_s column",
        Col.CLIP_MODEL: "clip_model column",
    }
    keeps_input_columns = True  # all but FRAME_EMBEDDINGS
    writes: ClassVar[Sequence[str]] = ()

    def __init__(self, output: OutputConfig):
        self.store = OutputStore(output)

    def __call__(self, rows: list[dict]) -> list[dict]:
        return [self.write_row(row) for row in rows]

    def write_row(self, row: dict) -> dict:
        row = dict(row)
        if row.get(Col.STATUS) == "ok" and len(row.get(Col.FRAME_EMBEDDINGS, ())):
            self.store.write_table(frames_table(row), STAGING_DIR, FRAMES_DIR,
                                   f"{video_key(row[Col.VIDEO_ID])}.parquet")
        row.pop(Col.FRAME_EMBEDDINGS, None)
        return row


class AnswersRows:
    """The last stage: each batch as answers-table rows (the schema's columns and types), which
    stream to the driver; its OutputCommitter writes them in files of many videos."""

    reads: ClassVar[Mapping[str, str]] = {name: "a column of the answers table" for name in ANSWERS_SCHEMA.names}
    writes: ClassVar[Sequence[str]] = tuple(ANSWERS_SCHEMA.names)
    keeps_input_columns = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.select(ANSWERS_SCHEMA.names).cast(ANSWERS_SCHEMA)


def frames_table(row: dict[str, Any]) -> pa.Table:
    """The frames-table rows of one guided video (`frames_schema(D)`); none for error rows."""
    embeddings = np.asarray(row[Col.FRAME_EMBEDDINGS], np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"{Col.FRAME_EMBEDDINGS} must be (T, D), got shape {embeddings.shape}")
    num_frames, dim = embeddings.shape
    schema = frames_schema(dim)
    if row.get(Col.STATUS) != STATUS_OK or num_frames == 0:
        return schema.empty_table()
    indices = np.asarray(row[Col.FRAME_INDICES], np.int64)
    times = np.asarray(row[Col.FRAME_TIMES_S], np.float64)
    if len(indices) != num_frames or len(times) != num_frames:
        raise ValueError(
            f"video {row.get(Col.VIDEO_ID)}: {num_frames} embeddings but {len(indices)} frame indices "
            f"and {len(times)} frame times"
        )
    flat = pa.array(np.ascontiguousarray(embeddings).ravel(), pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array([str(row[Col.VIDEO_ID])] * num_frames, pa.string()),
            pa.array(indices, pa.int64()),
            pa.array(times, pa.float64()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array([str(row[Col.CLIP_MODEL])] * num_frames, pa.string()),
        ],
        schema=schema,
    )
