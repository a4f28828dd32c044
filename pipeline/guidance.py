"""Guidance stage: CLIP frame embeddings, per-question frame selection and RoI (docs/DESIGN.md section 4).

Per video, every candidate frame is embedded once (CLS path, projected, L2-normalised) and the
embeddings are reused by all of the video's questions; they also feed the `frames` table for text
search over the archive. Per question the stage picks K frame positions (`uniform`, `prompt` or
`mix`) and, when asked, an RoI box from patch-to-question similarity.

The pieces are plain functions and classes: `FrameEncoder` is pure torch, the selection and RoI
functions are numpy, and `GuidanceStage` is the body of the Ray actor, testable without Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from freemoref.loading import resolve_device
from pipeline.clip_models import ClipBundle, load_clip
from pipeline.config import GuidanceConfig
from pipeline.schema import STATUS_ERROR, STATUS_OK, Col, as_list, frames_schema

logger = logging.getLogger(__name__)

SELECTION_METHODS = ("uniform", "prompt", "mix")
DEFAULT_PROMPT_FRACTION = 0.5  # mix: share of the K frames chosen by the prompt
PAPER_ROI_RATIO = 0.8  # Free Video-LLM's final setting


# --------------------------------------------------------------------------------------------
# Encoding


@dataclasses.dataclass(frozen=True)
class FrameEncoding:
    """One pass of the image tower over a video's frames."""

    embeddings: np.ndarray  # float32 (T, D), L2-normalised, CLS path projected
    patch_scores: np.ndarray | None  # float32 (Q, T, gh, gw): cosine of each patch with each text


class FrameEncoder:
    """Embeds uint8 RGB frames (T, H, W, 3) and question texts with a CLIP model, in batches.

    Square frames (what decode produces) are preprocessed as tensors on the model's device:
    resize to the CLIP input size with open_clip's interpolation (antialiased, rounded to uint8
    like PIL) and normalise with the model's mean/std. This matches open_clip's PIL preprocess
    to within one or two uint8 levels, without a PIL round trip per frame. Other shapes go
    through open_clip's own preprocess frame by frame.
    """

    def __init__(self, bundle: ClipBundle, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.batch_size = batch_size
        self.device = bundle.device
        self.dtype = next(bundle.model.visual.parameters()).dtype
        pp = bundle.preprocess_cfg
        self._interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        self._mean = torch.tensor(pp["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pp["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.context_length = int(getattr(bundle.tokenizer, "context_length", 77) or 77)

    @property
    def embed_dim(self) -> int:
        return self.bundle.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of the image tower; patch P = row * gw + col."""
        visual = self._vit()
        return int(visual.grid_size[0]), int(visual.grid_size[1])

    # ---- images

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> model input (B, 3, h, w) on the model's device and dtype."""
        frames = _as_frames(frames)
        h, w = self.bundle.image_size
        if frames.shape[1] != frames.shape[2] or h != w:
            from PIL import Image

            batch = torch.stack([self.bundle.preprocess(Image.fromarray(f)) for f in frames])
            return batch.to(self.device, self.dtype)
        # Ship uint8 to the device (4x less than float), resize there. Ray hands over read-only
        # arrays, which torch refuses to wrap without a copy.
        x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).to(self.device).permute(0, 3, 1, 2)
        if x.shape[-1] != w:
            x = _resize_uint8(x, (h, w), self._interpolation)
        x = (x.float() / 255.0 - self._mean) / self._std
        return x.to(self.dtype)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Image embeddings (T, D) float32, L2-normalised (CLS token, ln_post, proj)."""
        frames = _as_frames(frames)
        out = [np.zeros((0, self.embed_dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                x = self.preprocess(frames[start : start + self.batch_size])
                out.append(_normalised(self.bundle.model.encode_image(x)))
        return np.concatenate(out)

    def encode_patches(self, frames: np.ndarray) -> np.ndarray:
        """Patch embeddings (T, P, D) float32 in the joint space, L2-normalised per patch.

        open_clip returns patch tokens after ln_post and before `proj`; they are projected
        here with `visual.proj` so they compare with text embeddings like the CLS embedding.
        """
        frames = _as_frames(frames)
        gh, gw = self.grid_size
        out = [np.zeros((0, gh * gw, self.embed_dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                _, patches = self._forward_with_patches(self.preprocess(frames[start : start + self.batch_size]))
                out.append(_normalised(patches))
        return np.concatenate(out)

    def encode_video(self, frames: np.ndarray, text_embeddings: np.ndarray | None = None) -> FrameEncoding:
        """One pass over the frames: their embeddings and, given text embeddings (Q, D), the
        patch-text cosine maps (Q, T, gh, gw). Patch embeddings never leave the device, which
        keeps memory at O(Q * T * P) instead of O(T * P * D)."""
        return self.encode_videos([frames], [text_embeddings])[0]

    def encode_videos(self, videos: Sequence[np.ndarray],
                      text_embeddings: Sequence[np.ndarray | None]) -> list[FrameEncoding]:
        """`encode_video` for several videos at once: the image tower runs over all their frames in
        batches of `batch_size` that span videos, so a GPU sees full batches however short each
        video is. Video i's patch scores are computed when text_embeddings[i] is given."""
        videos = [_as_frames(v) for v in videos]
        if len(text_embeddings) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(text_embeddings)} text embedding sets")
        texts = [None if t is None else torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(self.device)
                 for t in text_embeddings]
        embeddings: list[list[np.ndarray]] = [[np.zeros((0, self.embed_dim), np.float32)] for _ in videos]
        scores: list[list[np.ndarray] | None] = [None] * len(videos)
        if any(t is not None for t in texts):
            gh, gw = self.grid_size
            scores = [None if t is None else [np.zeros((len(t), 0, gh, gw), np.float32)] for t in texts]
        with torch.inference_mode():
            for segments in _frame_batches(videos, self.batch_size):
                x = self.preprocess(np.concatenate([videos[v][lo:hi] for v, lo, hi in segments]))
                with_patches = any(texts[v] is not None for v, _, _ in segments)
                if with_patches:
                    pooled, patches = self._forward_with_patches(x)
                else:
                    pooled, patches = self.bundle.model.encode_image(x), None
                pooled_np = _normalised(pooled)
                offset = 0
                for v, lo, hi in segments:
                    n = hi - lo
                    embeddings[v].append(pooled_np[offset : offset + n])
                    if texts[v] is not None and patches is not None:  # patches come with every text
                        part = F.normalize(patches[offset : offset + n].float(), dim=-1)  # (n, P, D)
                        s = torch.einsum("bpd,qd->qbp", part, texts[v])
                        scores[v].append(s.reshape(len(texts[v]), n, gh, gw).cpu().numpy())
                    offset += n
        return [
            FrameEncoding(np.concatenate(emb), None if sc is None else np.concatenate(sc, axis=1))
            for emb, sc in zip(embeddings, scores)
        ]

    def _vit(self):
        from open_clip.transformer import VisionTransformer

        visual = self.bundle.model.visual
        # Patch tokens mean "ln_post(tokens) @ proj" only for open_clip's own ViT with token
        # pooling; attention-pooled and timm towers define their tokens differently.
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.final_ln_after_pool:
            raise ValueError(
                f"patch embeddings need an open_clip ViT tower with token pooling, got {type(visual).__name__}"
            )
        return visual

    def _forward_with_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self._vit()
        out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC")
        patches = out["image_intermediates"][-1]  # (B, P, width) after ln_post, CLS removed
        if visual.proj is not None:
            patches = patches @ visual.proj
        return out["image_features"], patches

    # ---- text

    def encode_text(self, questions: Sequence[str]) -> np.ndarray:
        """Text embeddings (Q, D) float32, L2-normalised. The raw question is the prompt;
        the tokenizer truncates it to the text encoder's context (EOT kept last)."""
        texts = [_bounded_words(str(q), 4 * self.context_length) for q in as_list(questions)]
        out = [np.zeros((0, self.embed_dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.bundle.tokenizer(texts[start : start + self.batch_size])
                out.append(_normalised(self.bundle.model.encode_text(tokens.to(self.device))))
        return np.concatenate(out)


def _frame_batches(videos: Sequence[np.ndarray], batch_size: int):
    """Batches of at most `batch_size` frames over the videos in order, as (video, lo, hi)
    segments; a batch never mixes frame sizes (they are stacked into one tensor)."""
    segments: list[tuple[int, int, int]] = []
    filled, shape = 0, None
    for v, frames in enumerate(videos):
        lo = 0
        while lo < len(frames):
            if segments and (filled == batch_size or frames.shape[1:] != shape):
                yield segments
                segments, filled = [], 0
            shape = frames.shape[1:]
            hi = min(len(frames), lo + batch_size - filled)
            segments.append((v, lo, hi))
            filled += hi - lo
            lo = hi
    if segments:
        yield segments


def _resize_uint8(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of a uint8 batch with PIL's rounding: torchvision resizes in float,
    rounds and clamps back to uint8, as open_clip's PIL path does before ToTensor."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    return TF.resize(x, list(size), interpolation=mode, antialias=True)


def _normalised(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def _as_frames(frames: Any) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


def _bounded_words(text: str, max_words: int) -> str:
    # Every word gives at least one token, so words past `max_words` (> context length) can
    # never reach the encoder; dropping them first bounds tokenizer work on huge prompts.
    words = text.split()
    return " ".join(words[:max_words]) if len(words) > max_words else text


# --------------------------------------------------------------------------------------------
# Frame selection: positions into the T candidate frames, sorted by time


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
        got = None if scores is None else np.shape(scores)
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


# --------------------------------------------------------------------------------------------
# The stage


def clip_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": float16 on CUDA (CLIP was trained in fp16; more mantissa than bf16), float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class GuidanceStage:
    """Ray actor body: one row per video in, the same row with guidance columns out.

    Rows whose status is not 'ok' pass through with empty outputs of the right type, so every
    row of the dataset has the same columns; a failure inside guidance turns the row into an
    error row ('guidance_failed: ...') instead of failing the job.
    """

    reads: tuple[str, ...] = (Col.VIDEO_ID, Col.STATUS, Col.FRAMES, Col.QUESTIONS)
    writes: tuple[str, ...] = (
        Col.FRAME_EMBEDDINGS,
        Col.CLIP_MODEL,
        Col.SELECTED_POSITIONS,
        Col.GUIDANCE_S,
        Col.STATUS,
        Col.ERROR,
    )

    def __init__(self, cfg: GuidanceConfig):
        if cfg.selection not in SELECTION_METHODS:
            raise ValueError(f"unknown frame selection {cfg.selection!r}; expected one of {SELECTION_METHODS}")
        prompt_fraction, roi_ratio = cfg.prompt_fraction, cfg.roi_ratio
        self.cfg = cfg
        self.num_gpus = cfg.num_gpus
        self.num_cpus = cfg.num_cpus
        self.prompt_fraction = prompt_fraction
        self.roi_ratio = roi_ratio
        if roi_ratio is not None:
            self.writes = self.writes + (Col.ROI_BOXES,)
        self.device = resolve_device(cfg.device)
        self.dtype = clip_dtype(cfg.dtype, self.device)
        self.bundle = load_clip(cfg.model, cfg.pretrained, self.device, dtype=self.dtype)
        self.encoder = FrameEncoder(self.bundle, cfg.batch_size)
        self.model_name = self.bundle.name

    @staticmethod
    def resources(cfg: GuidanceConfig) -> dict[str, float]:
        """Per-actor resources for Ray (`num_cpus`, `num_gpus`), known before the actor starts."""
        return {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.guide_rows([row])[0]

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
                outs[i][Col.ERROR] = f"guidance_failed: {type(exc).__name__}: {exc}"
                continue
            outs[i][Col.GUIDANCE_S] = time.perf_counter() - start
        return outs

    def _guide(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        videos = [_as_frames(row[Col.FRAMES]) for row in rows]
        questions = [[str(q) for q in as_list(row.get(Col.QUESTIONS))] for row in rows]
        uses_text = self.cfg.selection != "uniform" or self.roi_ratio is not None
        need_text = [uses_text and len(qs) > 0 and len(f) > 0 for f, qs in zip(videos, questions)]
        # Every question of every video through the text tower at once, then split back.
        asked = [q for qs, need in zip(questions, need_text) if need for q in qs]
        all_text = self.encoder.encode_text(asked) if asked else None
        texts, used = [], 0
        for qs, need in zip(questions, need_text):
            texts.append(all_text[used : used + len(qs)] if need and all_text is not None else None)
            used += len(qs) if need else 0
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


# --------------------------------------------------------------------------------------------
# The frames table


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
