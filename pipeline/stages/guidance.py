"""Guidance stage: CLIP frame embeddings, per-question frame selection and RoI (DESIGN.md section 4).

Per video, every candidate frame is embedded once and the embeddings are reused by all of the
video's questions; they also feed the `frames` table for text search over the archive. Per question
the stage picks K frame positions and, when asked, an RoI box. The encoder lives in
pipeline/stages/clip_encoder.py, the selection and RoI math in pipeline/stages/frame_selection.py; `GuidanceStage`
is the body of the Ray actor, testable without Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from freemoref.devices import resolve_device
from pipeline.config import GuidanceConfig
from pipeline.errors import ErrorReason
from pipeline.schema import STATUS_ERROR, STATUS_OK, Col, as_list
from pipeline.stages.clip_encoder import FrameEncoder, as_frames, clip_dtype
from pipeline.stages.clip_models import load_clip
from pipeline.stages.frame_selection import SELECTION_METHODS, frame_scores, question_roi_boxes, select_frames

logger = logging.getLogger(__name__)


class GuidanceStage:
    """Ray actor body: one row per video in, the same row with guidance columns out.

    Rows whose status is not 'ok' pass through with empty outputs of the right type, so every
    row of the dataset has the same columns; a failure inside guidance turns the row into an
    error row (reason `guidance_failed`) instead of failing the job.
    """

    reads = {
        Col.VIDEO_ID: "names the video in logs",
        Col.STATUS: "rows already in error pass through",
        Col.FRAMES: "the decoded frames CLIP embeds",
        Col.QUESTIONS: "the texts frames and RoI are chosen for",
    }
    keeps_input_columns = True
    # ROI_BOXES too when guidance.roi_ratio is set (the instance's `writes`); the answer stage reads it when present.
    writes: tuple[str, ...] = (
        Col.FRAME_EMBEDDINGS,
        Col.CLIP_MODEL,
        Col.SELECTED_POSITIONS,
        Col.GUIDANCE_S,
        Col.STATUS,
        Col.ERROR_REASON,
        Col.ERROR_DETAIL,
    )

    def __init__(self, cfg: GuidanceConfig):
        if cfg.selection not in SELECTION_METHODS:
            raise ValueError(f"unknown frame selection {cfg.selection!r}; expected one of {SELECTION_METHODS}")
        prompt_fraction, roi_ratio = cfg.prompt_fraction, cfg.roi_ratio
        self.cfg = cfg
        self.prompt_fraction = prompt_fraction
        self.roi_ratio = roi_ratio
        if roi_ratio is not None:
            self.writes = self.writes + (Col.ROI_BOXES,)
        self.device = resolve_device(cfg.device)
        self.dtype = clip_dtype(cfg.dtype, self.device)
        self.bundle = load_clip(cfg.model, cfg.pretrained, self.device, dtype=self.dtype)
        self.encoder = FrameEncoder(self.bundle, cfg.batch_size)
        self.model_name = self.bundle.name

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.guide_rows(rows)

    def guide_rows(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Guide several videos together (one image-tower pass over all their frames). If the
        batch fails, its videos are redone one by one, so a bad video fails alone."""
        outs = []
        for row in rows:
            out = dict(row)
            out.update(self._empty_outputs(len(as_list(row.get(Col.QUESTIONS)))))
            outs.append(out)
        todo = [i for i, row in enumerate(rows) if row.get(Col.STATUS) == STATUS_OK]
        if not todo:
            return outs
        start = time.perf_counter()
        try:
            results = self._guide([rows[i] for i in todo])
        except Exception:  # noqa: BLE001 - find the video at fault below
            results = None
        if results is not None:
            # Each video is charged its share of the batch's time, by frames.
            elapsed = time.perf_counter() - start
            counts = np.array([max(len(rows[i][Col.FRAMES]), 1) for i in todo], np.float64)
            for i, result, share in zip(todo, results, counts / counts.sum()):
                outs[i].update(result, **{Col.GUIDANCE_S: elapsed * share})
            return outs
        for i in todo:
            start = time.perf_counter()
            try:
                outs[i].update(self._guide([rows[i]])[0])
            except Exception as exc:  # one bad video must not fail the job
                logger.warning("guidance failed for video %s", rows[i].get(Col.VIDEO_ID), exc_info=True)
                outs[i][Col.STATUS] = STATUS_ERROR
                outs[i][Col.ERROR_REASON] = ErrorReason.GUIDANCE_FAILED.value
                outs[i][Col.ERROR_DETAIL] = f"{type(exc).__name__}: {exc}"
                continue
            outs[i][Col.GUIDANCE_S] = time.perf_counter() - start
        return outs

    def _guide(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        videos = [as_frames(row[Col.FRAMES]) for row in rows]
        questions = [[str(q) for q in as_list(row.get(Col.QUESTIONS))] for row in rows]
        uses_text = self.cfg.selection != "uniform" or self.roi_ratio is not None
        need_text = [uses_text and len(qs) > 0 and len(f) > 0 for f, qs in zip(videos, questions)]
        # Every question of every video through the text tower at once, then split back.
        asked = [q for qs, need in zip(questions, need_text) if need for q in qs]
        all_text = self.encoder.encode_text(asked) if asked else None
        texts: list[np.ndarray | None] = []
        used = 0
        for qs, need in zip(questions, need_text):
            if not need:
                texts.append(None)
                continue
            assert all_text is not None  # a video that needs text put its questions in `asked`
            texts.append(all_text[used : used + len(qs)])
            used += len(qs)
        encodings = self.encoder.encode_videos(videos, texts if self.roi_ratio is not None else [None] * len(videos))
        results = []
        for frames, qs, text, encoding in zip(videos, questions, texts, encodings):
            scores = frame_scores(encoding.embeddings, text) if text is not None else None
            patch_scores = encoding.patch_scores
            if self.cfg.selection_scope == "video" and len(qs) > 1:
                # One pick for the whole video from all its questions' scores: every question then
                # sees the same frames and RoI, so the answer stage computes the video prefix once.
                scores = None if scores is None else np.repeat(scores.mean(0, keepdims=True), len(qs), 0)
                if patch_scores is not None:
                    patch_scores = np.repeat(patch_scores.mean(0, keepdims=True), len(qs), 0)
            positions = select_frames(
                self.cfg.selection,
                self.cfg.frames_per_question,
                len(frames),
                len(qs),
                scores=scores,
                prompt_fraction=self.prompt_fraction,
            )
            result = {Col.FRAME_EMBEDDINGS: encoding.embeddings, Col.SELECTED_POSITIONS: positions}
            if self.roi_ratio is not None and patch_scores is not None:
                result[Col.ROI_BOXES] = question_roi_boxes(patch_scores, positions, self.roi_ratio)
            results.append(result)
        return results

    def _empty_outputs(self, num_questions: int) -> dict[str, Any]:
        empty = {
            Col.FRAME_EMBEDDINGS: np.zeros((0, self.encoder.embed_dim), np.float32),
            Col.CLIP_MODEL: self.model_name,
            Col.SELECTED_POSITIONS: np.zeros((num_questions, 0), np.int64),
            Col.GUIDANCE_S: 0.0,
        }
        if self.roi_ratio is not None:
            empty[Col.ROI_BOXES] = np.zeros((num_questions, 0), np.float32)
        return empty
