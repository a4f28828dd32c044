"""Frame selection and RoI for the guidance stage (DESIGN.md section 4): pure numpy.

Per question, K positions into the T candidate frames (`uniform`, `prompt` or `mix`, sorted by time)
from the CLIP question-frame scores, and an RoI box from the question's patch scores.
"""

from __future__ import annotations

import math
from typing import get_args

import numpy as np

from pipeline.config import DEFAULT_PROMPT_FRACTION, FrameSelection

SELECTION_METHODS = get_args(FrameSelection)
PAPER_ROI_RATIO = 0.8  # Free Video-LLM's final setting


def frame_scores(frame_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity (Q, T) of each question with each frame (inputs L2-normalised)."""
    return np.asarray(text_embeddings, np.float32) @ np.asarray(frame_embeddings, np.float32).T


def uniform_positions(num_frames: int, k: int) -> np.ndarray:
    """min(k, T) positions evenly spread over T: the centre of each of K equal segments."""
    k = min(k, num_frames)
    if k <= 0:
        return np.zeros(0, np.int64)
    return np.floor((np.arange(k) + 0.5) * num_frames / k).astype(np.int64)


def prompt_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """The top-k frames by score (ties to the earlier frame), re-sorted by time."""
    scores = np.asarray(scores)
    k = min(k, len(scores))
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def mix_positions(scores: np.ndarray, k: int, prompt_fraction: float = DEFAULT_PROMPT_FRACTION) -> np.ndarray:
    """round(prompt_fraction * K) frames by prompt, the rest spread uniformly over the frames
    not already picked (so no duplicates), all sorted by time."""
    if not 0.0 <= prompt_fraction <= 1.0:
        raise ValueError(f"prompt_fraction must be in [0, 1], got {prompt_fraction}")
    scores = np.asarray(scores)
    k = min(k, len(scores))
    picked = prompt_positions(scores, int(round(prompt_fraction * k)))
    rest = np.setdiff1d(np.arange(len(scores)), picked)
    fill = rest[uniform_positions(len(rest), k - len(picked))]
    return np.sort(np.concatenate([picked, fill])).astype(np.int64)


def select_frames(
    method: str,
    k: int,
    num_frames: int,
    num_questions: int,
    scores: np.ndarray | None = None,
    prompt_fraction: float = DEFAULT_PROMPT_FRACTION,
) -> np.ndarray:
    """Positions (Q, min(k, T)) int64 for each question. `scores` (Q, T) is required by
    `prompt` and `mix` (see `frame_scores`); `uniform` is the same for every question."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown frame selection {method!r}; expected one of {SELECTION_METHODS}")
    k = min(k, num_frames)
    if method == "uniform" or k == 0 or num_questions == 0:  # no questions: nothing to score
        return np.tile(uniform_positions(num_frames, k), (num_questions, 1)).reshape(num_questions, k)
    if scores is None or np.shape(scores) != (num_questions, num_frames):
        expected = (num_questions, num_frames)
        got = () if scores is None else np.shape(scores)  # what np.shape(None) gives
        raise ValueError(f"{method} selection needs scores of shape {expected}, got {got}")
    pick = prompt_positions if method == "prompt" else lambda s, n: mix_positions(s, n, prompt_fraction)
    out = np.zeros((num_questions, k), np.int64)
    for q in range(num_questions):
        out[q] = pick(scores[q], k)
    return out


# --------------------------------------------------------------------------------------------
# RoI


def roi_box(patch_scores: np.ndarray, ratio: float = PAPER_ROI_RATIO) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) in [0, 1] around the patches that match the prompt best.

    K = round(ratio * patches) top-scoring patches; the centre is the mean of their grid
    coordinates (patch centres); the box covers `ratio` of the grid's area with the grid's
    aspect, and is shifted, not shrunk, to stay inside the frame.
    """
    scores = np.asarray(patch_scores, np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"patch_scores must be a non-empty (gh, gw) grid, got shape {scores.shape}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    gh, gw = scores.shape
    k = max(1, int(round(ratio * scores.size)))
    top = np.argsort(-scores.ravel(), kind="stable")[:k]
    rows, cols = np.divmod(top, gw)
    cx, cy = (cols.mean() + 0.5) / gw, (rows.mean() + 0.5) / gh
    side = math.sqrt(ratio)  # fraction of each dimension: area = ratio, aspect = the grid's
    x0 = min(max(cx - side / 2, 0.0), 1.0 - side)
    y0 = min(max(cy - side / 2, 0.0), 1.0 - side)
    return float(x0), float(y0), float(x0 + side), float(y0 + side)


def question_roi_boxes(patch_scores: np.ndarray, positions: np.ndarray, ratio: float) -> np.ndarray:
    """One box per question (Q, 4) float32 from its patch scores (Q, T, gh, gw) averaged over
    the frames selected for it (positions (Q, K)); a question with no frames gets the centred box."""
    q_count = len(positions)
    boxes = np.zeros((q_count, 4), np.float32)
    for q in range(q_count):
        sel = positions[q]
        grid = patch_scores[q, sel].mean(axis=0) if len(sel) else np.zeros(patch_scores.shape[2:])
        boxes[q] = roi_box(grid, ratio)
    return boxes
