"""Which times to sample and which frame is shown at each: sampling is by time, never by index."""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import DecodeConfig

# A frame starting this close after a target still counts as shown at it: targets on a frame
# boundary then pick the same frame in both backends (decord's timestamps are float32).
TIME_EPS = 1e-4


def sample_times(duration_s: float, cfg: DecodeConfig) -> np.ndarray:
    """Target times in seconds from the stream start, ascending."""
    if not duration_s > 0:
        return np.zeros(1)
    if cfg.sampling == "uniform":
        n = cfg.num_frames
        return (np.arange(n) + 0.5) * (duration_s / n)
    n = max(1, math.ceil(duration_s * cfg.fps - 1e-9))
    times = np.arange(n) / cfg.fps
    if n > cfg.max_frames:
        times = times[np.round(np.linspace(0, n - 1, cfg.max_frames)).astype(np.int64)]
    return times


def pick_frames(starts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Positions of the frames (sorted start times) whose interval contains each target, once each."""
    pos = np.searchsorted(starts, targets + TIME_EPS, side="right") - 1
    return np.unique(np.clip(pos, 0, len(starts) - 1))


def monotonic_indices(indices: list[int]) -> np.ndarray:
    out = np.asarray(indices, dtype=np.int64)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    return out


def nearest_keyframes(key_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Positions into `key_times` (ascending) of the keyframe nearest each target, once each, in
    time order; a target midway between two keyframes takes the earlier one."""
    if not len(key_times):
        return np.zeros(0, np.int64)
    before = np.clip(np.searchsorted(key_times, targets + TIME_EPS, side="right") - 1, 0, len(key_times) - 1)
    after = np.minimum(before + 1, len(key_times) - 1)
    closer_after = (key_times[after] - targets) < (targets - key_times[before])
    return np.unique(np.where(closer_after, after, before))
