"""The decord backend, the fallback: local paths only; decord rotates and scales frames itself."""

from __future__ import annotations

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.errors import ErrorReason
from pipeline.stages.decode.backend import Limits, ReadResult, VideoInfo
from pipeline.stages.decode.errors import DecodeError
from pipeline.stages.decode.pyav_backend import PyAVBackend
from pipeline.stages.decode.sampling import nearest_keyframes, pick_frames
from pipeline.stages.decode.source import ByteStream


class DecordBackend:
    """decord 0.6.0: local paths only, rotates frames itself, scales inside its FFmpeg filter graph."""

    name = "decord"
    needs_local_path = True  # given a file object it reads the whole file into memory

    def __init__(self, frame_size: int, threads: int = 1, seek: str = "exact"):
        self.frame_size = frame_size
        self.threads = max(1, threads)
        self.seek = seek  # DecodeConfig.seek: "exact" or "keyframe"

    def probe(self, file: str | ByteStream, limits: Limits | None = None) -> VideoInfo:
        # decord exposes no codec, rotation or stream choice: one PyAV probe serves both backends
        return PyAVBackend(self.frame_size).probe(file, limits)

    def read(self, file: str | ByteStream, times_s: np.ndarray, info: VideoInfo) -> ReadResult:
        import decord

        if not isinstance(file, str):
            raise DecodeError(ErrorReason.UNSUPPORTED, "decord needs a local file path")
        if info.duration_source == "packets":
            raise DecodeError(ErrorReason.UNSUPPORTED, "decord cannot open files without a container duration")
        s = self.frame_size
        # decord fails on some VP9/VP8 files unless single-threaded
        threads = 1 if info.codec in ("vp9", "vp8", "libvpx-vp9") else self.threads
        try:
            # decord 0.6.0 returns mis-sized buffers for some output widths (8, 12, 16, 24, 48, 72, ...
            # seen); multiples of 32 are safe: scale to one, then to the frame size if it differs.
            side = -(-s // 32) * 32
            vr = decord.VideoReader(file, ctx=decord.cpu(0), width=side, height=side, num_threads=threads)
            n = len(vr)
            fps = float(vr.get_avg_fps())
            if info.fps and abs(fps - info.fps) > 0.01 * info.fps + 0.01:
                raise DecodeError(
                    ErrorReason.UNSUPPORTED, f"decord reads another video stream ({fps:.3f} fps; probe: {info.fps:.3f})"
                )
            starts, ends = self._timestamps(vr, n, fps, info)
            targets = np.sort(np.asarray(times_s, np.float64))
            if self.seek == "keyframe":  # the keyframes nearest the targets, from decord's own index
                keys = np.asarray(vr.get_key_indices(), np.int64)
                pos = keys[nearest_keyframes(starts[keys], targets)]
            else:
                pos = pick_frames(starts, targets)
            frames = vr.get_batch(pos.tolist()).asnumpy()
        except DecodeError:
            raise
        except (decord.DECORDError, RuntimeError, AssertionError, IndexError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise DecodeError(ErrorReason.DECODE_FAILED, f"decord: {type(exc).__name__}: {msg}") from None
        if frames.shape[1:] != (side, side, 3):
            raise DecodeError(ErrorReason.DECODE_FAILED, f"decord returned frames of shape {frames.shape}")
        if side != s:
            scaler = VideoReformatter()
            frames = np.stack(
                [
                    scaler.reformat(
                        av.VideoFrame.from_ndarray(f, format="rgb24"),
                        width=s,
                        height=s,
                        interpolation="BILINEAR",
                        threads=1,
                    ).to_ndarray()
                    for f in frames
                ]
            )
        return ReadResult(
            frames=np.ascontiguousarray(frames, dtype=np.uint8),
            times_s=starts[pos].astype(np.float64),
            indices=pos.astype(np.int64),
            ended_s=float(ends[-1]),
        )

    @staticmethod
    def _timestamps(vr, n: int, fps: float, info: VideoInfo) -> tuple[np.ndarray, np.ndarray]:
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
        starts, ends = ts[:, 0], ts[:, 1]
        ok = np.isfinite(ts).all() and (np.abs(ts) < 1e7).all() and (np.diff(starts) > 0).all()
        if not ok:
            # decord returns garbage for e.g. packed B-frame AVIs: fall back to a constant rate
            rate = fps or info.fps or 30.0
            starts = info.first_frame_s + np.arange(n) / rate
            ends = starts + 1.0 / rate
        return starts, ends
