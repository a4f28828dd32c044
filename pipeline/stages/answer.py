"""The answer stage: a Video-LLM actor that answers every question of a video, several videos in flight.

Vision features are computed once per video; questions that picked the same frames and RoI (from
guidance) are answered together, sharing the video prefix's prefill (Free-MoRef or native). Every
question yields exactly one answers
row: 'ok' with the answer and statistics, or 'error' with a reason.
"""

from __future__ import annotations

import math
import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from pipeline.config import AnswerConfig
from pipeline.errors import ErrorReason
from pipeline.fingerprint import pair_fingerprint
from pipeline.schema import ANSWER_COLUMNS, STATUS_ERROR, STATUS_OK, Col, as_list, empty_answer_row
from pipeline.stages.question_isolation import answer_halving_on_oom, too_long

if TYPE_CHECKING:
    from freemoref.video_llm import AnswerResult


def model_label(model: str) -> str:
    """The model name recorded in outputs: a hub id as given, a local checkpoint by its folder name."""
    path = pathlib.Path(model).expanduser()
    return path.name if path.exists() else model


class AnswerStage:
    """Ray actor body (map_batches over one video per batch); usable without Ray."""

    reads: ClassVar[Mapping[str, str]] = {
        Col.VIDEO_ID: "answers row key", Col.VIDEO_URI: "recorded in the row",
        Col.QUESTION_IDS: "one row per question", Col.QUESTIONS: "the questions asked",
        Col.STATUS: "rows already in error become error rows", Col.ERROR_REASON: "carried to error rows",
        Col.ERROR_DETAIL: "carried to error rows", Col.FRAMES: "the decoded frames",
        Col.FRAME_TIMES_S: "recorded per answer", Col.FRAME_INDICES: "recorded per answer",
        Col.SELECTED_POSITIONS: "each question's frames (guidance)",
        Col.DECODE_S: "recorded per answer", Col.GUIDANCE_S: "recorded per answer",
    }
    # roi_boxes: only when guidance.roi_ratio is set; decode_backend: absent in rows decoded elsewhere
    optional_reads = (Col.ROI_BOXES, Col.DECODE_BACKEND)
    keeps_input_columns = False
    writes: ClassVar[Sequence[str]] = ANSWER_COLUMNS

    def __init__(self, cfg: AnswerConfig, run_id: str, config_fingerprint: str | None = None):
        """`config_fingerprint`: the job's (pipeline/fingerprint.py), computed on the driver; each
        row gets its pair's fingerprint from it (None: rows without one)."""
        from freemoref.config import MoRefConfig
        from freemoref.loading import load_video_llm

        self.cfg = cfg
        self.run_id = run_id
        self.config_fingerprint = config_fingerprint
        # One video on the model at a time; with answer.videos_in_flight > 1 the other calls do
        # their host work meanwhile. A guidance stage in the same actor takes it too.
        self.device_lock = threading.Lock()
        self.llm = load_video_llm(
            cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            layout=cfg.layout,
            prompt_template=cfg.prompt_template,
        )
        self.model_name = model_label(cfg.model)
        self.generation = cfg.generation()
        self.moref: MoRefConfig | None = cfg.moref if cfg.moref.enabled else None  # validated by the job config

    def __call__(self, videos: list[dict]) -> list[dict]:
        """Every question's answers row, for each video."""
        return [row for video in videos for row in self.answer_video(video)]

    def answer_video(self, video: dict) -> list[dict]:
        """One video's rows. Several calls may run at once (`answer.videos_in_flight`, one thread
        each): the host work (frame preprocessing, rows) runs outside `device_lock`, the model
        inside it, so one video's host work overlaps another's GPU work."""
        rows = self._question_rows(video)
        if video.get(Col.STATUS) != STATUS_OK:
            reason, detail = video.get(Col.ERROR_REASON), video.get(Col.ERROR_DETAIL)
            if not reason:
                reason, detail = ErrorReason.FAILED_BEFORE_ANSWER.value, "failed before the answer stage"
            for row in rows:
                row[Col.ERROR_REASON] = str(reason)
                row[Col.ERROR_DETAIL] = None if detail is None else str(detail)
            return rows
        times = np.asarray(video.get(Col.FRAME_TIMES_S, []), dtype=np.float64)
        indices = np.asarray(video.get(Col.FRAME_INDICES, []), dtype=np.int64)
        selected = video.get(Col.SELECTED_POSITIONS)
        per_question = [
            np.arange(len(times)) if selected is None else np.asarray(selected[q], dtype=np.int64)
            for q in range(len(rows))
        ]
        roi_boxes = video.get(Col.ROI_BOXES)
        rois = [None if roi_boxes is None or len(roi_boxes) == 0 else [float(x) for x in roi_boxes[q]]
                for q in range(len(rows))]
        # A question the model cannot take is its own error row, found from its text before any
        # model work (question_isolation.py); the others are asked.
        text_tokens = {q: self.llm.text_tokens(row[Col.QUESTION], self.cfg.system_prompt) for q, row in enumerate(rows)}
        asked = [q for q in range(len(rows)) if not self._too_long(rows[q], text_tokens[q][1])]
        if not asked:
            return rows
        # Questions with the same frames and RoI share the video prefix's prefill (one group per
        # question unless guidance.selection_scope is "video" or the selections coincide).
        groups: dict[tuple, list[int]] = {}
        for q in asked:
            positions, roi = per_question[q], rois[q]
            key = (tuple(positions.tolist()), None if roi is None else tuple(roi))
            groups.setdefault(key, []).append(q)
        # The vision tower runs once per video, on the frames some asked question selected only.
        used = np.unique(np.concatenate([per_question[q] for q in asked]))
        try:
            frames = np.asarray(video.get(Col.FRAMES))[used]
            pixels = self.llm.preprocess_frames(frames, times[used] if len(times) else None)
        except Exception as exc:  # a bad frame array fails this video only
            return self._fail(rows, asked, ErrorReason.VISION_FAILED, exc)
        with self.device_lock:
            try:
                frame_tokens = self.llm.encode_pixels(pixels)
            except Exception as exc:  # a model failure for one video must not fail the job
                return self._fail(rows, asked, ErrorReason.VISION_FAILED, exc)
            answered: dict[int, AnswerResult] = {}
            for members in groups.values():
                positions, roi = per_question[members[0]], rois[members[0]]
                group_tokens = frame_tokens[np.searchsorted(used, positions)]
                visual = self.llm.visual_tokens(group_tokens, roi)
                # With MoRef the longest sequence is the text and the largest reference (its share
                # of the frames, or of the Qwen families' two-frame patches), not the whole prompt.
                longest_reference = math.ceil(self.llm.longest_reference_share(self.moref, group_tokens) * visual)
                members = [q for q in members
                           if not self._too_long(rows[q], text_tokens[q][1], sum(text_tokens[q]) + visual,
                                                 sum(text_tokens[q]) + longest_reference)]
                if not members:
                    continue

                def answer(batch, tokens=group_tokens, roi=roi):
                    return self.llm.answer_many(tokens, [rows[q][Col.QUESTION] for q in batch],
                                                system_prompt=self.cfg.system_prompt, generation=self.generation,
                                                moref=self.moref, roi_box=roi,
                                                max_batch_tokens=self.cfg.max_batch_tokens)

                try:
                    results, out_of_memory = answer_halving_on_oom(answer, members)
                except Exception as exc:
                    self._fail(rows, members, ErrorReason.ANSWER_FAILED, exc)
                    continue
                answered.update(results)
                for q, error in out_of_memory.items():
                    self._fail(rows, [q], ErrorReason.OUT_OF_MEMORY, error)
                del group_tokens
            del frame_tokens
        for q, result in answered.items():
            positions, roi = per_question[q], rois[q]
            rows[q].update({
                Col.STATUS: STATUS_OK,
                Col.ANSWER: result.text,
                Col.FRAME_INDICES: indices[positions].tolist(),
                Col.FRAME_TIMES_S: times[positions].tolist(),
                Col.ROI_BOX: roi,
                Col.REFERENCES: result.references,
                Col.TEMPORAL_UNITS: result.temporal_units,
                Col.FUSION_LAYER: result.fusion_layer,
                Col.FUSION_SCOPE: result.fusion_scope,
                Col.VISUAL_TOKENS_NATIVE: result.visual_tokens_native,
                Col.VISUAL_TOKENS_USED: result.visual_tokens_used,
                Col.PROMPT_TOKENS: result.prompt_tokens,
                Col.OUTPUT_TOKENS: result.output_tokens,
                Col.ATTN_FLOPS_RATIO: result.attn_flops_ratio,
                Col.TOTAL_FLOPS: result.total_flops,
                Col.TOTAL_FLOPS_NATIVE: result.total_flops_native,
                Col.PREFILL_S: result.prefill_s,
                Col.GENERATE_S: result.generate_s,
                Col.PREFIX_SHARED_WITH: result.shared_with,
            })
        return rows

    def _question_rows(self, video: dict) -> list[dict]:
        """One error row per question (status set to ok as answers arrive)."""
        base = {
            Col.RUN_ID: self.run_id,
            Col.VIDEO_ID: str(video[Col.VIDEO_ID]),
            Col.VIDEO_URI: str(video[Col.VIDEO_URI]),
            Col.MODEL: self.model_name,
            Col.FRAMES_DECODED: int(len(video.get(Col.FRAME_TIMES_S, []))),
            Col.DECODE_S: _float_or_none(video.get(Col.DECODE_S)),
            Col.DECODE_BACKEND: _str_or_none(video.get(Col.DECODE_BACKEND)),
            Col.GUIDANCE_S: _float_or_none(video.get(Col.GUIDANCE_S)),
        }
        rows = []
        for qid, question in zip(as_list(video[Col.QUESTION_IDS]), as_list(video[Col.QUESTIONS])):
            row = empty_answer_row()
            row.update(base)
            row.update({Col.QUESTION_ID: str(qid), Col.QUESTION: str(question), Col.STATUS: STATUS_ERROR,
                        Col.FINGERPRINT: None if self.config_fingerprint is None
                        else pair_fingerprint(self.config_fingerprint, str(question))})
            rows.append(row)
        return rows

    def _too_long(self, row: dict, question_tokens: int, prompt_tokens: int | None = None,
                  sequence_tokens: int | None = None) -> bool:
        """Mark `row` question_too_long (with its prompt's token count) when the model cannot take it;
        `sequence_tokens` is the longest sequence one attention pass holds (question_isolation.too_long)."""
        why = too_long(question_tokens, self.cfg.max_question_tokens, sequence_tokens, self.cfg.max_new_tokens,
                       self.llm.context_tokens)
        if why is not None:
            row.update({Col.ERROR_REASON: ErrorReason.QUESTION_TOO_LONG.value, Col.ERROR_DETAIL: why,
                        Col.PROMPT_TOKENS: prompt_tokens})
        return why is not None

    @staticmethod
    def _fail(rows: list[dict], which, reason: ErrorReason, exc: BaseException) -> list[dict]:
        for q in which:
            rows[q][Col.ERROR_REASON] = reason.value
            rows[q][Col.ERROR_DETAIL] = f"{type(exc).__name__}: {exc}"[:500]
        return rows


def _str_or_none(value) -> str | None:
    # a batch mixing decoded and failed videos can reach the actor with NaN for a missing string
    return value if isinstance(value, str) else None


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value

