"""CLIP frame and text encoder for the guidance stage (DESIGN.md section 4).

`FrameEncoder` embeds a video's frames (CLS path, projected, L2-normalised) and question texts with
an open_clip model, in batches that span videos; given text embeddings it also scores every patch
against every question for the RoI. Pure torch: no Ray, no selection logic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.schema import as_list
from pipeline.stages.clip_models import ClipBundle


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
        frames = as_frames(frames)
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
        frames = as_frames(frames)
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
        frames = as_frames(frames)
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
        videos = [as_frames(v) for v in videos]
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
                pooled_embeddings = _normalised(pooled)
                offset = 0
                for v, lo, hi in segments:
                    n = hi - lo
                    embeddings[v].append(pooled_embeddings[offset : offset + n])
                    text, video_scores = texts[v], scores[v]
                    if text is not None:
                        # a video with text put with_patches on, and got its scores list above
                        assert patches is not None and video_scores is not None
                        part = F.normalize(patches[offset : offset + n].float(), dim=-1)  # (n, P, D)
                        s = torch.einsum("bpd,qd->qbp", part, text)
                        video_scores.append(s.reshape(len(text), n, gh, gw).cpu().numpy())
                    offset += n
        return [
            FrameEncoding(np.concatenate(embeddings[v]),
                          None if video_scores is None else np.concatenate(video_scores, axis=1))
            for v, video_scores in enumerate(scores)
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


def as_frames(frames: Any) -> np.ndarray:
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


def clip_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": float16 on CUDA (CLIP was trained in fp16; more mantissa than bf16), float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
