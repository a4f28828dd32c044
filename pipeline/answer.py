"""The answer stage: a Video-LLM actor that answers every question of one video.

Vision features are computed once per video; questions that picked the same frames and RoI (from
guidance) are answered together, sharing the video prefix's prefill (Free-MoRef or native). Every question yields exactly one answers
row: 'ok' with the answer and statistics, or 'error' with a reason.
"""

from __future__ import annotations

import pathlib

import numpy as np

from pipeline.config import AnswerConfig
from pipeline.schema import ANSWER_COLUMNS, STATUS_ERROR, STATUS_OK, Col, as_list, empty_answer_row


def model_label(model: str) -> str:
    """The model name recorded in outputs: a hub id as given, a local checkpoint by its folder name."""
    path = pathlib.Path(model).expanduser()
    return path.name if path.exists() else model


def _error_reason(prefix: str, exc: BaseException) -> str:
    return f"{prefix}: {type(exc).__name__}: {exc}"[:500]


class AnswerStage:
    """Ray actor body (map_batches over one video per batch); usable without Ray."""

    reads = (
        Col.VIDEO_ID, Col.VIDEO_URI, Col.QUESTION_IDS, Col.QUESTIONS, Col.STATUS, Col.ERROR,
        Col.FRAMES, Col.FRAME_TIMES_S, Col.FRAME_INDICES, Col.SELECTED_POSITIONS, Col.ROI_BOXES,
        Col.DECODE_S, Col.GUIDANCE_S,
    )
    writes = ANSWER_COLUMNS

    def __init__(self, cfg: AnswerConfig, run_id: str):
        from freemoref.config import GenerationOptions, MoRefConfig
        from freemoref.loading import load_video_llm

        self.cfg = cfg
        self.run_id = run_id
        self.resources = {"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus}
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
        self.generation = GenerationOptions(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
            stop_strings=list(cfg.stop_strings),
        )
        self.moref: MoRefConfig | None = cfg.moref if cfg.moref.enabled else None  # validated by the job config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in ANSWER_COLUMNS}
        for i in range(len(batch[Col.VIDEO_ID])):
            for row in self.answer_video({k: v[i] for k, v in batch.items()}):
                for name in ANSWER_COLUMNS:
                    out[name].append(row[name])
        return out

    def answer_video(self, video: dict) -> list[dict]:
        question_ids = [str(q) for q in as_list(video[Col.QUESTION_IDS])]
        questions = [str(q) for q in as_list(video[Col.QUESTIONS])]
        frames = video.get(Col.FRAMES)
        times = np.asarray(video.get(Col.FRAME_TIMES_S, []), dtype=np.float64)
        indices = np.asarray(video.get(Col.FRAME_INDICES, []), dtype=np.int64)
        base = {
            "run_id": self.run_id,
            "video_id": str(video[Col.VIDEO_ID]),
            "video_uri": str(video[Col.VIDEO_URI]),
            "model": self.model_name,
            "frames_decoded": int(len(times)),
            "decode_s": _float_or_none(video.get(Col.DECODE_S)),
            "guidance_s": _float_or_none(video.get(Col.GUIDANCE_S)),
        }
        rows = []
        for qid, question in zip(question_ids, questions):
            row = empty_answer_row()
            row.update(base, question_id=qid, question=question, status=STATUS_ERROR)
            rows.append(row)

        if video.get(Col.STATUS) != STATUS_OK:
            for row in rows:
                row["error"] = str(video.get(Col.ERROR) or "failed before the answer stage")
            return rows
        selected = video.get(Col.SELECTED_POSITIONS)
        per_question = [
            np.arange(len(times)) if selected is None else np.asarray(selected[q], dtype=np.int64)
            for q in range(len(rows))
        ]
        # The vision tower runs once per video, on the frames some question selected only.
        used = np.unique(np.concatenate(per_question)) if per_question else np.arange(0)
        try:
            frame_tokens = self.llm.encode_frames(np.asarray(frames)[used])
        except Exception as exc:  # a model failure for one video must not fail the job
            for row in rows:
                row["error"] = _error_reason("vision_failed", exc)
            return rows

        roi_boxes = video.get(Col.ROI_BOXES)
        rois = [None if roi_boxes is None or len(roi_boxes) == 0 else [float(x) for x in roi_boxes[q]]
                for q in range(len(rows))]
        # Questions with the same frames and RoI share the video prefix's prefill (one group per
        # question unless guidance.selection_scope is "video" or the selections coincide).
        groups: dict[tuple, list[int]] = {}
        for q in range(len(rows)):
            groups.setdefault((tuple(per_question[q].tolist()), None if rois[q] is None else tuple(rois[q])), []).append(q)
        for members in groups.values():
            positions, roi = per_question[members[0]], rois[members[0]]
            try:
                results = self.llm.answer_many(
                    frame_tokens[np.searchsorted(used, positions)],
                    [rows[q]["question"] for q in members],
                    system_prompt=self.cfg.system_prompt,
                    generation=self.generation,
                    moref=self.moref,
                    roi_box=roi,
                    max_batch_tokens=self.cfg.max_batch_tokens,
                )
            except Exception as exc:
                for q in members:
                    rows[q]["error"] = _error_reason("answer_failed", exc)
                continue
            for q, result in zip(members, results):
                rows[q].update(
                    status=STATUS_OK,
                    answer=result.text,
                    frame_indices=indices[positions].tolist(),
                    frame_times_s=times[positions].tolist(),
                    roi_box=roi,
                    references=result.references,
                    temporal_units=result.temporal_units,
                    fusion_layer=result.fusion_layer,
                    visual_tokens_native=result.visual_tokens_native,
                    visual_tokens_used=result.visual_tokens_used,
                    prompt_tokens=result.prompt_tokens,
                    output_tokens=result.output_tokens,
                    attn_flops_ratio=result.attn_flops_ratio,
                    total_flops=result.total_flops,
                    total_flops_native=result.total_flops_native,
                    prefill_s=result.prefill_s,
                    generate_s=result.generate_s,
                    prefix_shared_with=result.shared_with,
                )
        return rows


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value

