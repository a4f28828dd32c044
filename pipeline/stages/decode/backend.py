"""What the stage asks of a decode backend (`Backend`), and the values that pass between them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.config import DecodeConfig
from pipeline.stages.decode.source import ByteStream


@dataclass(frozen=True)
class Limits:
    """What the probe refuses before any frame is decoded (from DecodeConfig)."""

    max_duration_s: float = math.inf
    max_pixels: int = 2**62

    @classmethod
    def from_config(cls, cfg: DecodeConfig) -> Limits:
        return cls(max_duration_s=cfg.max_duration_s, max_pixels=cfg.max_pixels)


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learned without decoding more than the first frame."""

    stream_index: int
    codec: str
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    coded_width: int
    coded_height: int
    width: int  # display size: coded size with the rotation applied
    height: int
    rotation: int  # clockwise degrees applied to stored frames to show them upright
    fps: float  # average frame rate; 0.0 when unknown
    duration_s: float
    duration_source: str  # "stream" | "container" | "packets" | "decoded"
    start_s: float  # stream start time; reported times are relative to it
    first_frame_s: float  # time of the first frame, relative to start_s
    num_frames: int | None  # from the header, when the container stores it


@dataclass
class ReadResult:
    """What one `read` returned: the frames shown at the target times, and how the stream ended."""

    frames: np.ndarray
    times_s: np.ndarray
    indices: np.ndarray
    ended_s: float | None  # end of the last frame when the stream ended before the targets did
    errors: int = 0
    last_error: str | None = None
    frames_decoded: int | None = None  # frames the PyAV decoder produced: the work sampling cost


class Backend(Protocol):
    """A decoder `decode_video` can drive: probe once, then read the frames at the target times.
    `file` is what `open_source` yields: a local path, or (unless `needs_local_path`) a file object."""

    name: str
    needs_local_path: bool

    def probe(self, file: str | ByteStream, limits: Limits | None = None) -> VideoInfo:
        """The video's metadata; raises DecodeError, also when `limits` are exceeded."""
        ...

    def read(self, file: str | ByteStream, times_s: np.ndarray, info: VideoInfo) -> ReadResult:
        """The frames shown at `times_s` (seconds from the stream start), once each, in time order."""
        ...
