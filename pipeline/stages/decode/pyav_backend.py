"""The PyAV (FFmpeg) backend: streams from file objects, seeks when a keyframe lies before the next
target, decodes forward otherwise, and converts only the chosen frames to RGB. With `seek:
keyframe` it decodes only the keyframes nearest the targets (`_read_keyframes`).

Its probe is also decord's (see `DecordBackend.probe`). Frame ordinals are exact when decoding from
the start or from an indexed keyframe, else estimated from the time (see the package docstring).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.errors import ErrorReason
from pipeline.stages.decode.backend import Limits, ReadResult, VideoInfo
from pipeline.stages.decode.container import check_index_within_file, open_container
from pipeline.stages.decode.errors import DecodeError
from pipeline.stages.decode.sampling import TIME_EPS, monotonic_indices, nearest_keyframes
from pipeline.stages.decode.source import ByteStream, file_size

_SEEK_GAP_S = 5.0  # without a full index: seek only when the next target is this far ahead


def _pick_video_stream(container) -> av.VideoStream:
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        if not container.streams:
            raise DecodeError(ErrorReason.NOT_A_VIDEO, f"{container.format.name} container holds no streams")
        raise DecodeError(ErrorReason.NO_VIDEO_STREAM, f"no video stream (streams: {', '.join(kinds)})")
    try:
        best = container.streams.best("video")
    except Exception:  # noqa: BLE001 - av_find_best_stream failing is not fatal: take the first
        best = None
    return best if best in videos else videos[0]


def _rotation_cw(display_rotation: float | int | None) -> int:
    """FFmpeg's display-matrix angle is counter-clockwise; report the clockwise quarter turns."""
    if not display_rotation:
        return 0
    return int(round(-float(display_rotation) / 90.0)) % 4 * 90


def _upright(img: np.ndarray, rotation_cw: int) -> np.ndarray:
    # np.rot90 turns counter-clockwise for k > 0
    return np.rot90(img, k=-(rotation_cw // 90)) if rotation_cw else img


class _Frame:
    __slots__ = ("t", "duration", "frame", "ordinal")

    def __init__(self, t: float, duration: float, frame: av.VideoFrame, ordinal: int | None):
        self.t, self.duration, self.frame, self.ordinal = t, duration, frame, ordinal


@dataclass(frozen=True)
class _KeyframeIndex:
    """Keyframes of a fully indexed stream (MP4/MOV, AVI): presentation times (approximate, see
    `_keyframe_index`) and positions in decode order, which are their frame ordinals when GOPs are
    closed (nothing decoded after a keyframe is shown before it)."""

    times: np.ndarray
    ordinals: np.ndarray

    def last_at_or_before(self, t: float) -> int:
        return int(np.searchsorted(self.times, t + TIME_EPS, side="right")) - 1


class _PyAVCursor:
    """Decoded frames of one stream in presentation order, with repaired times and ordinals."""

    def __init__(self, container, stream, info: VideoInfo, keyframes: _KeyframeIndex | None):
        self.container, self.stream, self.info, self.keyframes = container, stream, info, keyframes
        self.tb = stream.time_base
        self.use_dts = container.format.name == "avi"  # see the module docstring
        self.step = 1.0 / info.fps if info.fps > 0 else 1.0 / 30
        self.errors = 0
        self.last_error: str | None = None
        self.eof = False
        self.decoded = 0
        self.exact = True  # ordinals are exact: decoding from the start, or from a known keyframe
        self._anchor = False  # just seeked: place the next frame in the keyframe index
        self._ordinal = -1
        self._prev_t: float | None = None
        self._it = self._decoded()

    def _decoded(self) -> Iterator[av.VideoFrame]:
        try:
            for packet in self.container.demux(self.stream):
                try:
                    frames = packet.decode()
                except av.error.EOFError:
                    return
                except av.FFmpegError as exc:  # one bad packet: skip it, the next keyframe recovers
                    self.errors += 1
                    self.last_error = str(exc)
                    continue
                yield from frames
        except av.FFmpegError as exc:  # the demuxer gave up: damaged or cut data
            self.errors += 1
            self.last_error = str(exc)

    def _time(self, frame: av.VideoFrame) -> float | None:
        first, second = (frame.dts, frame.pts) if self.use_dts else (frame.pts, frame.dts)
        ts = first if first is not None else second
        return None if ts is None else float(ts * self.tb) - self.info.start_s

    def next(self) -> _Frame | None:
        frame = next(self._it, None)
        if frame is None:
            self.eof = True
            return None
        t = self._time(frame)
        if self._prev_t is not None and (t is None or t <= self._prev_t):
            t = self._prev_t + self.step
        elif t is None:
            t = self.info.first_frame_s if self.exact else 0.0
        if self._anchor:
            self._anchor = False
            self._place(frame, t)
        self._prev_t = t
        self._ordinal += 1
        self.decoded += 1
        duration = float(frame.duration * self.tb) if frame.duration else self.step
        return _Frame(t, duration, frame, self._ordinal if self.exact else None)

    def _place(self, frame: av.VideoFrame, t: float) -> None:
        """After a seek: if we landed on an indexed keyframe, ordinals are exact again."""
        self.exact = False
        if self.keyframes is None or not frame.key_frame:
            return
        k = int(np.argmin(np.abs(self.keyframes.times - t)))
        if abs(self.keyframes.times[k] - t) < 0.5 * self.step:
            self._ordinal = int(self.keyframes.ordinals[k]) - 1
            self.exact = True

    def seek(self, t: float) -> None:
        offset = int(math.floor((t + self.info.start_s) / self.tb))
        self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
        self._it = self._decoded()
        self._prev_t = None
        self._anchor = True
        self.exact = False
        self.eof = False


class PyAVBackend:
    """FFmpeg through PyAV: streams from file objects, seeks, converts only the chosen frames."""

    name = "pyav"
    needs_local_path = False

    def __init__(self, frame_size: int, threads: int = 1, seek: str = "exact"):
        self.frame_size = frame_size
        self.threads = max(1, threads)
        self.seek = seek  # DecodeConfig.seek: "exact" or "keyframe"

    def probe(self, file: str | ByteStream, limits: Limits | None = None) -> VideoInfo:
        limits = limits or Limits()
        with open_container(file) as container:
            stream = _pick_video_stream(container)
            cc = stream.codec_context
            w, h = int(cc.width or 0), int(cc.height or 0)
            if w <= 0 or h <= 0:
                raise DecodeError(ErrorReason.UNREADABLE_CONTAINER, "video stream declares no frame size")
            if w * h > limits.max_pixels:
                raise DecodeError(
                    ErrorReason.TOO_LARGE, f"frame is {w}x{h} = {w * h} pixels, limit is {limits.max_pixels}"
                )
            tb = stream.time_base
            start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
            fps = _first_positive(stream.average_rate, stream.guessed_rate)
            num_frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
            if stream.duration and stream.duration > 0:
                duration, source = float(stream.duration * tb), "stream"
            elif container.duration and container.duration > 0:
                duration, source = container.duration / av.time_base, "container"
            else:
                duration, source = None, "packets"
            check_index_within_file(stream, file_size(file))

            # The display matrix is only exposed on decoded frames: decode the first one (the frame
            # size is checked above, the duration below). Packets are tracked on the way so a file
            # without any duration can be measured by reading on.
            scan = _PacketScan(tb, start, limits.max_duration_s)
            stream.codec_context.thread_count = 1
            first_frame, errors, last_error = None, 0, None
            for packet in scan.packets(container, stream):
                try:
                    decoded = packet.decode()
                except av.FFmpegError as exc:
                    errors, last_error = errors + 1, str(exc)
                    if errors >= 50:
                        break
                    continue
                if decoded:
                    first_frame = decoded[0]
                    break
            if first_frame is None:
                if errors:
                    raise DecodeError(
                        ErrorReason.DECODE_FAILED, f"no frame decodes ({errors} errors, last: {last_error})"
                    )
                raise DecodeError(ErrorReason.NO_FRAMES, "the video stream holds no decodable frame")
            rotation = _rotation_cw(first_frame.rotation)
            first_ts = first_frame.dts if container.format.name == "avi" else first_frame.pts
            first_s = float(first_ts * tb) - start if first_ts is not None else 0.0
            if duration is None:
                collections.deque(scan.packets(container, stream), maxlen=0)  # scan to the end for its timestamps
                if scan.end_s is None:
                    raise DecodeError(ErrorReason.NO_FRAMES, "no timestamps in the video stream")
                duration = scan.end_s
            if not fps and num_frames and duration:
                fps = num_frames / duration
            swap = rotation in (90, 270)
            info = VideoInfo(
                stream_index=stream.index,
                codec=cc.name,
                container=container.format.name,
                coded_width=w,
                coded_height=h,
                width=h if swap else w,
                height=w if swap else h,
                rotation=rotation,
                fps=float(fps or 0.0),
                duration_s=float(duration),
                duration_source=source,
                start_s=start,
                first_frame_s=max(0.0, first_s),
                num_frames=num_frames,
            )
            if info.duration_s > limits.max_duration_s:
                raise DecodeError(
                    ErrorReason.TOO_LONG,
                    f"duration {info.duration_s:.1f} s, limit is {limits.max_duration_s:g} s",
                    info,
                )
            return info

    def read(self, file: str | ByteStream, times_s: np.ndarray, info: VideoInfo) -> ReadResult:
        s = self.frame_size
        with open_container(file) as container:
            stream = container.streams[info.stream_index]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = self.threads
            keyframes = _keyframe_index(stream, info)
            if self.seek == "keyframe":
                return self._read_keyframes(container, stream, info, keyframes, times_s)
            cur = _PyAVCursor(container, stream, info, keyframes)
            scaler = VideoReformatter()  # keeps its swscale context across frames (4x faster)
            images: list[np.ndarray] = []
            times: list[float] = []
            ordinals: list[int] = []
            below: _Frame | None = None  # last frame starting at or before the target
            above: _Frame | None = None  # first frame starting after it (read ahead)
            last: _Frame | None = None
            for target in np.sort(np.asarray(times_s, dtype=np.float64)):
                at = above or below
                if self._should_seek(at.t if at else None, target, keyframes, info):
                    below, above = None, self._seek(cur, target, info)
                while True:
                    if above is None:
                        if cur.eof or (above := cur.next()) is None:
                            break
                    if above.t > target + TIME_EPS:
                        break
                    below, above = above, None
                chosen = below if below is not None else above
                if chosen is None:
                    break
                if chosen is not last:
                    self._keep(chosen, scaler, info, cur, images, times, ordinals)
                    last = chosen
            ended = None
            if cur.eof and last is not None:
                tail = below or last
                ended = tail.t + tail.duration
            frames = np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)
            return ReadResult(
                frames=np.ascontiguousarray(frames),
                times_s=np.asarray(times, np.float64),
                indices=monotonic_indices(ordinals),
                ended_s=ended,
                errors=cur.errors,
                last_error=cur.last_error,
                frames_decoded=cur.decoded,
            )

    def _keep(self, chosen: _Frame, scaler, info: VideoInfo, cur: _PyAVCursor, images: list, times: list,
              ordinals: list) -> None:
        """Convert a chosen frame to upright RGB at the frame size and record its time and ordinal."""
        s = self.frame_size
        rgb = scaler.reformat(chosen.frame, width=s, height=s, format="rgb24", interpolation="BILINEAR", threads=1)
        images.append(_upright(rgb.to_ndarray(), info.rotation))
        times.append(chosen.t)
        ordinals.append(chosen.ordinal if chosen.ordinal is not None
                        else int(round((chosen.t - info.first_frame_s) * (info.fps or 1.0 / cur.step))))

    def _read_keyframes(self, container, stream, info: VideoInfo, keyframes: _KeyframeIndex | None,
                        times_s: np.ndarray) -> ReadResult:
        """`seek: keyframe`: the keyframe nearest each target, once each, decoded right after a seek
        to it (no frame between keyframes is decoded). Keyframe times come from the container's
        index, else from a scan of the packets (demuxed, not decoded), which also gives where the
        stream's data ends, so a cut file ends early here as it does in exact mode. Recorded times
        are the decoded keyframes' own."""
        scan_end: float | None = None
        if keyframes is None:
            keyframes, scan_end = _scan_keyframes(container, stream, info)
        targets = np.sort(np.asarray(times_s, dtype=np.float64))
        cur = _PyAVCursor(container, stream, info, keyframes)
        scaler = VideoReformatter()
        images: list[np.ndarray] = []
        times: list[float] = []
        ordinals: list[int] = []
        last: _Frame | None = None
        half = 0.5 * cur.step
        for k in keyframes.times[nearest_keyframes(keyframes.times, targets)]:
            if last is not None and last.t >= k - half:
                continue  # landed on this keyframe already (index times are approximate)
            cur.seek(k + half)  # backward: the keyframe at k, not the one before it
            # The first key frame after the seek that is not one already kept (a demuxer may land
            # on an earlier keyframe: then decode forward to the next).
            frame = cur.next()
            while frame is not None and (not frame.frame.key_frame or (last is not None and frame.t <= last.t)):
                frame = cur.next()
            if frame is None:
                break
            self._keep(frame, scaler, info, cur, images, times, ordinals)
            last = frame
        ended = None
        if cur.eof and last is not None:
            ended = last.t + last.duration
        elif scan_end is not None and len(targets) and scan_end < targets[-1]:
            ended = scan_end
        s = self.frame_size
        frames = np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)
        return ReadResult(frames=np.ascontiguousarray(frames), times_s=np.asarray(times, np.float64),
                          indices=monotonic_indices(ordinals), ended_s=ended, errors=cur.errors,
                          last_error=cur.last_error, frames_decoded=cur.decoded)

    @staticmethod
    def _should_seek(pos: float | None, target: float, keyframes, info: VideoInfo) -> bool:
        pos = info.first_frame_s if pos is None else pos
        if target - pos <= 0:
            return False
        if keyframes is not None:
            # worth it only if a keyframe lies between here and the target
            i = keyframes.last_at_or_before(target)
            return i >= 0 and keyframes.times[i] > pos
        return target - pos > _SEEK_GAP_S

    @staticmethod
    def _seek(cur: _PyAVCursor, target: float, info: VideoInfo) -> _Frame | None:
        """Seek to the keyframe at or before `target` and return the first frame there. Demuxers
        can land past the target (open GOPs, coarse indexes): back off until the first frame is not
        later, ending at the stream start."""
        frame = None
        for back in (0.0, 1.0, 4.0, 16.0, 64.0, math.inf):
            at = max(target - back, info.first_frame_s)
            cur.seek(at)
            frame = cur.next()
            if frame is not None and (frame.t <= target + TIME_EPS or at <= info.first_frame_s):
                return frame
        return frame


def _first_positive(*rates) -> float | None:
    for rate in rates:
        if rate is not None and rate > 0:
            return float(rate)
    return None


class _PacketScan:
    """Tracks the end time of every packet it passes on (for files without a duration)."""

    def __init__(self, tb, start: float, max_duration_s: float):
        self.tb, self.start, self.max_duration_s = tb, start, max_duration_s
        self.end_s: float | None = None

    def packets(self, container, stream):
        try:
            for packet in container.demux(stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None:
                    end = float((ts + (packet.duration or 0)) * self.tb) - self.start
                    if self.end_s is None or end > self.end_s:
                        self.end_s = end
                        if end > self.max_duration_s:
                            raise DecodeError(
                                ErrorReason.TOO_LONG, f"duration over {self.max_duration_s:g} s (from packet times)"
                            )
                yield packet
        except av.FFmpegError:  # damaged tail: the packets so far still count
            return


def _scan_keyframes(container, stream, info: VideoInfo) -> tuple[_KeyframeIndex, float | None]:
    """The keyframes of a stream without a full index, from its packets (demuxed, not decoded):
    presentation times and decode-order positions (their ordinals for closed GOPs), and where the
    last packet ends. Leaves the container at the end: the reader seeks."""
    tb = stream.time_base
    scan = _PacketScan(tb, info.start_s, math.inf)
    times, ordinals = [], []
    for position, packet in enumerate(p for p in scan.packets(container, stream) if p.size):
        ts = packet.pts if packet.pts is not None else packet.dts
        if packet.is_keyframe and ts is not None:
            times.append(float(ts * tb) - info.start_s)
            ordinals.append(position)
    order = np.argsort(times, kind="stable")
    return (_KeyframeIndex(times=np.asarray(times, np.float64)[order], ordinals=np.asarray(ordinals, np.int64)[order]),
            scan.end_s)


def _keyframe_index(stream, info: VideoInfo) -> _KeyframeIndex | None:
    """The keyframes when the container indexes every frame (MP4/MOV, AVI), else None. Index times
    are decode timestamps; MP4 shifts them by a constant composition offset, which the first entry
    against the first frame's time gives back."""
    entries = stream.index_entries
    if not entries or info.num_frames is None or len(entries) < info.num_frames:
        return None
    tb = float(stream.time_base)
    stamps = np.fromiter((e.timestamp for e in entries), dtype=np.float64, count=len(entries))
    is_key = np.fromiter((e.is_keyframe for e in entries), dtype=bool, count=len(entries))
    order = np.argsort(stamps, kind="stable")  # decode order
    stamps, is_key = stamps[order], is_key[order]
    times = stamps * tb - info.start_s
    offset = max(0.0, info.first_frame_s - times[0])
    ordinals = np.flatnonzero(is_key)
    return _KeyframeIndex(times=times[ordinals] + offset, ordinals=ordinals)
