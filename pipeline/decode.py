"""Decode stage: candidate frames of one video, sampled by time, resized to a square.

`decode_video` probes the file, picks target times and returns the frame shown at each target time
as uint8 (T, S, S, 3), upright, with its time, its ordinal and the video's metadata. `DecodeStage`
runs it per row in an isolated child process (see `pipeline.isolation`) with a timeout, retries,
and a second backend, and writes an error row instead of raising.

Rules, and why:
- Sampling is by time, never by frame index: variable-frame-rate files are common. `uniform` puts
  `num_frames` targets at the centres of equal segments of [0, duration); `fps` puts one target
  every 1/fps s from 0, evenly thinned to at most `max_frames`. Times are seconds from the video
  stream's start. A target gets the frame whose presentation interval [pts, next pts) contains it
  (the first frame for targets before it). Several targets landing on one frame yield it once, so
  a video with fewer frames than targets returns every frame it has; >= 1 frame is a success.
- Decode only what sampling needs: the PyAV reader seeks (to the keyframe before the target) when a
  keyframe lies between the current position and the next target, or, when the file has no full
  index, when the target is more than `_SEEK_GAP_S` ahead; otherwise it decodes forward. Only the
  chosen frames are converted to RGB.
- Frame index = ordinal of the frame in the stream. Exact when PyAV decodes from the start, or
  lands after a seek on a keyframe of a fully indexed file (MP4/MOV, AVI: the keyframe's position
  in the index, exact for closed GOPs); decord indexes every frame. Otherwise (a seek in MKV/WebM)
  estimated as round((t - t_first) * fps), kept strictly increasing (approximate for VFR files).
- One probe, done with PyAV, gives the metadata for both backends (decord 0.6.0 exposes neither the
  codec, nor the rotation, nor which stream it reads). Video stream: the one FFmpeg's
  av_find_best_stream picks (default disposition, then most frames seen while probing, then bit
  rate), which is also what decord reads; cover-art pictures are never chosen. Duration: the
  stream's, else the container's, else from the packets' timestamps (no decode).
- Rotation: PyAV returns frames as stored and reports the display matrix; decord rotates itself.
  Both end up upright. `rotation` is the clockwise angle (0/90/180/270) applied to the stored frame
  to display it (the old `rotate` tag, exiftool's "Rotation"); width/height are the display size
  (rotation applied, sample aspect ratio not). Frames are resized to S x S without keeping the
  aspect ratio, as SigLIP/CLIP image processors do.
- AVI stores no presentation timestamps; FFmpeg derives them and, for packed B-frames (XviD/DivX,
  e.g. UCF101), returns them permuted. AVI frame times therefore come from the decode timestamps,
  which are monotonic. Elsewhere a missing or non-increasing pts is repaired as previous + 1/fps.
- Limits are applied before work: the file size before reading, the frame size from the header
  before decoding any frame, the duration right after the probe.
- Backends: `pyav` streams from fsspec file objects; `decord` needs a local path (remote files are
  downloaded to a temporary file, bounded by max_bytes), one thread for VP9/VP8, and a container
  duration. `auto` is PyAV first, then decord: as fast or faster on the test videos (faster for
  sparse sampling of long files) and it opens every one of them; see `AUTO_ORDER`.

Errors are `DecodeError(reason, detail)`, written as "reason: detail"; reasons are the constants
below (`REASONS`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import pathlib
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import av
import fsspec
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline import isolation
from pipeline.config import DecodeConfig
from pipeline.schema import STATUS_ERROR, STATUS_OK, Col

# Error reasons: the machine-friendly prefix of the error column.
NOT_FOUND = "not_found"  # no such file or object
PERMISSION_DENIED = "permission_denied"  # storage refused to read it
READ_FAILED = "read_failed"  # other storage I/O failure
EMPTY_FILE = "empty_file"  # zero bytes
TOO_LARGE = "too_large"  # file bytes or frame pixels beyond the configured limits
TOO_LONG = "too_long"  # duration beyond max_duration_s
NOT_A_VIDEO = "not_a_video"  # bytes no demuxer recognises
UNREADABLE_CONTAINER = "unreadable_container"  # a known container that cannot be parsed (e.g. no moov)
NO_VIDEO_STREAM = "no_video_stream"  # a media file without a video stream (audio only, ...)
TRUNCATED = "truncated"  # the file ends before the data its header describes
DECODE_FAILED = "decode_failed"  # the decoder rejected the data
NO_FRAMES = "no_frames"  # a video stream without a single decodable frame
UNSUPPORTED = "unsupported"  # this backend cannot read this file (the other backend may)
TIMEOUT = "timeout"  # the isolated decode ran past timeout_s
CRASHED = "crashed"  # the isolated decode process died (e.g. SIGSEGV)
INTERNAL_ERROR = "internal_error"  # a bug: an unexpected exception

REASONS = (
    NOT_FOUND, PERMISSION_DENIED, READ_FAILED, EMPTY_FILE, TOO_LARGE, TOO_LONG, NOT_A_VIDEO,
    UNREADABLE_CONTAINER, NO_VIDEO_STREAM, TRUNCATED, DECODE_FAILED, NO_FRAMES, UNSUPPORTED,
    TIMEOUT, CRASHED, INTERNAL_ERROR,
)  # fmt: skip

# Failures that are properties of the input (decided by the storage layer or the shared probe):
# the other backend would fail the same way, so the stage does not try it.
FINAL_REASONS = frozenset(
    {NOT_FOUND, PERMISSION_DENIED, EMPTY_FILE, TOO_LARGE, TOO_LONG, NOT_A_VIDEO,
     UNREADABLE_CONTAINER, NO_VIDEO_STREAM, TRUNCATED}
)  # fmt: skip

BACKENDS = ("pyav", "decord")
# Measured on the test videos (decode_video, 32 uniform frames at 384 px, one thread, 2-core box):
# the two are within about 30% of each other (vllava 0.18 s vs 0.22 s, long_room_139s 0.29 vs 0.37,
# h264_yuv444 77 s 2.0 vs 2.3, vfr_screenrec 3026 px 0.48 vs 0.61; decord ahead on a few clips
# under load); with 8 frames on the 139 s video PyAV's seeking halves the time (0.08 vs 0.15 s).
# PyAV also opens every test file, streams from object storage and cannot take the worker down
# with a segfault as easily, so PyAV first, decord as the fallback.
AUTO_ORDER = ("pyav", "decord")

# read_failed (the storage failed, not the file) is retried after 1, 2, 4, ... s (at most this long)
READ_RETRY_FIRST_WAIT_S = 1.0
READ_RETRY_MAX_WAIT_S = 30.0

_SEEK_GAP_S = 5.0  # without a full index: seek only when the next target is this far ahead
# A frame starting this close after a target still counts as shown at it: targets on a frame
# boundary then pick the same frame in both backends (decord's timestamps are float32).
_TIME_EPS = 1e-4
_MAX_BOX_WALK = 10_000  # ISO-BMFF boxes inspected when diagnosing an unreadable MP4


class DecodeError(Exception):
    """A video that cannot be decoded; `reason` is one of `REASONS`. `info` carries the probe result
    when the failure came after it (too long, truncated, ...)."""

    def __init__(self, reason: str, detail: str, info: VideoInfo | None = None):
        super().__init__(reason, detail, info)
        self.reason = reason
        self.detail = detail
        self.info = info

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class Limits:
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
class DecodedVideo:
    frames: np.ndarray  # uint8 (T, S, S, 3), upright
    times_s: np.ndarray  # float64 (T,), strictly increasing, seconds from the stream start
    indices: np.ndarray  # int64 (T,), frame ordinals
    width: int
    height: int
    fps: float
    duration_s: float
    rotation: int
    codec: str
    backend: str


@dataclass
class _ReadResult:
    frames: np.ndarray
    times_s: np.ndarray
    indices: np.ndarray
    ended_s: float | None  # end of the last frame when the stream ended before the targets did
    errors: int = 0
    last_error: str | None = None
    frames_decoded: int | None = None  # frames the PyAV decoder produced: the work sampling cost


# ---------------------------------------------------------------------------------------- sampling


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


def _pick_frames(starts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Positions of the frames (sorted start times) whose interval contains each target, once each."""
    pos = np.searchsorted(starts, targets + _TIME_EPS, side="right") - 1
    return np.unique(np.clip(pos, 0, len(starts) - 1))


def _monotonic_indices(indices: list[int]) -> np.ndarray:
    out = np.asarray(indices, dtype=np.int64)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    return out


# ------------------------------------------------------------------------------------------ source


def _is_local(uri: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol in (None, "file", "local")


class StorageFile:
    """A remote file object that remembers the first error its storage raised on a read or seek.

    PyAV re-raises an exception from its I/O callbacks only sometimes; otherwise FFmpeg sees an error
    or an early end of file, and a storage outage would pass for a damaged or truncated video.
    `decode_video` checks `error` after every attempt and reports `read_failed` instead."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: BaseException | None = None

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            if self.error is None:
                self.error = exc
            raise

    def read(self, n: int = -1) -> bytes:
        return self._io(self._f.read, n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._io(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _storage_error(uri: str, exc: BaseException) -> DecodeError:
    """A storage failure as an error: missing, refused, or (anything else: connection refused or
    reset, timeouts, 5xx, which botocore raises as non-OSError types) read_failed, retried later."""
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return DecodeError(NOT_FOUND, f"no such object: {uri}")
    if isinstance(exc, PermissionError):
        return DecodeError(PERMISSION_DENIED, f"{uri}: {exc}")
    msg = " ".join(str(exc).split())[:300]
    return DecodeError(READ_FAILED, f"{uri}: {type(exc).__name__}: {msg}")


@contextlib.contextmanager
def open_source(
    uri: str, storage_options: dict | None, max_bytes: int, local_path: bool
) -> Iterator[str | BinaryIO]:
    """Yield something a backend can open: an absolute local path, or (remote, `local_path` False)
    a seekable fsspec file object wrapped in `StorageFile`; with `local_path` True a remote file is
    copied to a temporary file first. The size limit and emptiness are checked before anything is
    read. Storage failures become DecodeErrors (`_storage_error`)."""
    if _is_local(uri):
        path = os.path.abspath(fsspec.core.strip_protocol(uri) if "://" in uri else uri)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DecodeError(NOT_FOUND, f"no such file: {path}") from None
        except PermissionError:
            raise DecodeError(PERMISSION_DENIED, f"cannot stat {path}") from None
        except OSError as exc:
            raise DecodeError(READ_FAILED, f"{type(exc).__name__}: {exc}") from None
        if not os.path.isfile(path):
            raise DecodeError(NOT_A_VIDEO, f"not a regular file: {path}")
        _check_size(st.st_size, max_bytes)
        if not os.access(path, os.R_OK):
            raise DecodeError(PERMISSION_DENIED, f"cannot read {path}")
        yield path  # absolute, so FFmpeg never reads a "name:" prefix as a protocol
        return

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        size = fs.size(path)
    except Exception as exc:  # noqa: BLE001 - every storage failure becomes a precise reason
        raise _storage_error(uri, exc) from None
    if size is None:
        raise DecodeError(READ_FAILED, f"{uri}: storage reports no size")
    _check_size(size, max_bytes)
    if local_path:
        suffix = pathlib.PurePosixPath(path).suffix
        with tempfile.TemporaryDirectory(prefix="moref-decode-") as tmp:
            local = os.path.join(tmp, "video" + suffix)
            try:
                with fs.open(path, "rb") as src, open(local, "wb") as dst:
                    # bounded: never write more than the size limit, whatever the stream delivers
                    _copy_bounded(src, dst, max_bytes)
            except Exception as exc:  # noqa: BLE001 - every storage failure becomes a precise reason
                raise _storage_error(uri, exc) from None
            yield local
    else:
        try:
            f = fs.open(path, "rb", cache_type="readahead", block_size=1 << 20)
        except Exception as exc:  # noqa: BLE001 - every storage failure becomes a precise reason
            raise _storage_error(uri, exc) from None
        with f:
            yield cast(BinaryIO, StorageFile(f))  # file-like: the read/seek/tell/size that PyAV and decord use


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise DecodeError(EMPTY_FILE, "file has 0 bytes")
    if size > max_bytes:
        raise DecodeError(TOO_LARGE, f"file has {size} bytes, limit is {max_bytes}")


def _copy_bounded(src: BinaryIO, dst: BinaryIO, max_bytes: int) -> None:
    copied = 0
    while chunk := src.read(8 << 20):
        copied += len(chunk)
        if copied > max_bytes:
            raise DecodeError(TOO_LARGE, f"object grew past the limit of {max_bytes} bytes while reading")
        dst.write(chunk)


def _file_size(file: str | BinaryIO) -> int | None:
    if isinstance(file, str):
        return os.path.getsize(file)
    try:
        return file.size if hasattr(file, "size") else None
    except Exception:  # noqa: BLE001 - size is only used for a truncation check
        return None


# --------------------------------------------------------------------------------- diagnosing files

_ISO_TOP_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"uuid", b"styp")


def _sniff_container(head: bytes) -> str | None:
    """Name the container from its first bytes, or None when no known signature is there."""
    if len(head) >= 8 and head[4:8] in _ISO_TOP_BOXES:
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    return None


def _read_at(file: str | BinaryIO, offset: int, n: int) -> bytes:
    if isinstance(file, str):
        with open(file, "rb") as f:
            f.seek(offset)
            return f.read(n)
    file.seek(offset)
    return file.read(n)


def _diagnose_unopenable(file: str | BinaryIO, exc: Exception) -> DecodeError:
    """FFmpeg says only "invalid data": tell a non-video from a damaged known container."""
    try:
        head = _read_at(file, 0, 512)
    except OSError as read_exc:
        return DecodeError(READ_FAILED, f"{type(read_exc).__name__}: {read_exc}")
    kind = _sniff_container(head)
    if kind is None:
        return DecodeError(NOT_A_VIDEO, f"no known container signature ({exc})")
    if kind == "mp4":
        return _diagnose_mp4(file)
    return DecodeError(UNREADABLE_CONTAINER, f"{kind} container cannot be parsed ({exc})")


def _diagnose_mp4(file: str | BinaryIO) -> DecodeError:
    size = _file_size(file)
    if size is None:
        return DecodeError(UNREADABLE_CONTAINER, "mp4 container cannot be parsed")
    pos, seen = 0, list[bytes]()
    while pos + 8 <= size and len(seen) < _MAX_BOX_WALK:
        box_size, box_type = struct.unpack(">I4s", _read_at(file, pos, 8))
        if box_size == 1:
            (box_size,) = struct.unpack(">Q", _read_at(file, pos + 8, 8))
        elif box_size == 0:  # "to the end of the file"
            box_size = size - pos
        if box_size < 8:
            return DecodeError(UNREADABLE_CONTAINER, f"mp4: corrupt box header at byte {pos}")
        if pos + box_size > size:
            name = box_type.decode("latin-1")
            return DecodeError(
                TRUNCATED, f"mp4 '{name}' box at byte {pos} needs {box_size} bytes; file ends at {size}"
            )
        seen.append(box_type)
        pos += box_size
    if b"moov" not in seen:
        return DecodeError(UNREADABLE_CONTAINER, "mp4 has no 'moov' box (its index is missing or damaged)")
    return DecodeError(UNREADABLE_CONTAINER, "mp4 boxes are intact but FFmpeg cannot parse them")


# ------------------------------------------------------------------------------------------- PyAV


@contextlib.contextmanager
def _open_container(file: str | BinaryIO) -> Iterator[av.container.InputContainer]:
    if not isinstance(file, str):
        file.seek(0)
    try:
        container = av.open(file, metadata_errors="ignore")
    except FileNotFoundError:
        raise DecodeError(NOT_FOUND, f"no such file: {file}") from None
    except PermissionError:
        raise DecodeError(PERMISSION_DENIED, f"cannot read {file}") from None
    except av.FFmpegError as exc:
        raise _diagnose_unopenable(file, exc) from None
    try:
        yield container
    finally:
        container.close()


def _pick_video_stream(container) -> av.VideoStream:
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        if not container.streams:
            raise DecodeError(NOT_A_VIDEO, f"{container.format.name} container holds no streams")
        raise DecodeError(NO_VIDEO_STREAM, f"no video stream (streams: {', '.join(kinds)})")
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
        return int(np.searchsorted(self.times, t + _TIME_EPS, side="right")) - 1


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

    def __init__(self, frame_size: int, threads: int = 1):
        self.frame_size = frame_size
        self.threads = max(1, threads)

    def probe(self, file: str | BinaryIO, limits: Limits | None = None) -> VideoInfo:
        limits = limits or Limits()
        with _open_container(file) as container:
            stream = _pick_video_stream(container)
            cc = stream.codec_context
            w, h = int(cc.width or 0), int(cc.height or 0)
            if w <= 0 or h <= 0:
                raise DecodeError(UNREADABLE_CONTAINER, "video stream declares no frame size")
            if w * h > limits.max_pixels:
                raise DecodeError(TOO_LARGE, f"frame is {w}x{h} = {w * h} pixels, limit is {limits.max_pixels}")
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
            _check_index_within_file(stream, _file_size(file))

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
                    raise DecodeError(DECODE_FAILED, f"no frame decodes ({errors} errors, last: {last_error})")
                raise DecodeError(NO_FRAMES, "the video stream holds no decodable frame")
            rotation = _rotation_cw(first_frame.rotation)
            first_ts = first_frame.dts if container.format.name == "avi" else first_frame.pts
            first_s = float(first_ts * tb) - start if first_ts is not None else 0.0
            if duration is None:
                collections.deque(scan.packets(container, stream), maxlen=0)  # scan to the end for its timestamps
                if scan.end_s is None:
                    raise DecodeError(NO_FRAMES, "no timestamps in the video stream")
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
                    TOO_LONG, f"duration {info.duration_s:.1f} s, limit is {limits.max_duration_s:g} s", info
                )
            return info

    def read(self, file: str | BinaryIO, times_s: np.ndarray, info: VideoInfo) -> _ReadResult:
        s = self.frame_size
        with _open_container(file) as container:
            stream = container.streams[info.stream_index]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = self.threads
            keyframes = _keyframe_index(stream, info)
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
                    if above.t > target + _TIME_EPS:
                        break
                    below, above = above, None
                chosen = below if below is not None else above
                if chosen is None:
                    break
                if chosen is not last:
                    rgb = scaler.reformat(
                        chosen.frame, width=s, height=s, format="rgb24", interpolation="BILINEAR", threads=1
                    )
                    images.append(_upright(rgb.to_ndarray(), info.rotation))
                    times.append(chosen.t)
                    ordinals.append(
                        chosen.ordinal
                        if chosen.ordinal is not None
                        else int(round((chosen.t - info.first_frame_s) * (info.fps or 1.0 / cur.step)))
                    )
                    last = chosen
            ended = None
            if cur.eof and last is not None:
                tail = below or last
                ended = tail.t + tail.duration
            frames = np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)
            return _ReadResult(
                frames=np.ascontiguousarray(frames),
                times_s=np.asarray(times, np.float64),
                indices=_monotonic_indices(ordinals),
                ended_s=ended,
                errors=cur.errors,
                last_error=cur.last_error,
                frames_decoded=cur.decoded,
            )

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
            if frame is not None and (frame.t <= target + _TIME_EPS or at <= info.first_frame_s):
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
                                TOO_LONG, f"duration over {self.max_duration_s:g} s (from packet times)"
                            )
                yield packet
        except av.FFmpegError:  # damaged tail: the packets so far still count
            return


def _check_index_within_file(stream, size: int | None) -> None:
    """MP4/MOV/AVI index every sample with its byte offset: a sample beyond the end of the file
    means the file was cut short, which we can say before decoding anything."""
    if size is None:
        return
    entries = stream.index_entries
    if not entries:
        return
    end = max((e.pos + e.size for e in entries if e.pos >= 0), default=0)
    if end > size:
        raise DecodeError(TRUNCATED, f"the index needs {end} bytes; the file has {size}")


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


# ------------------------------------------------------------------------------------------ decord


class DecordBackend:
    """decord 0.6.0: local paths only, rotates frames itself, scales inside its FFmpeg filter graph."""

    name = "decord"
    needs_local_path = True  # given a file object it reads the whole file into memory

    def __init__(self, frame_size: int, threads: int = 1):
        self.frame_size = frame_size
        self.threads = max(1, threads)

    def probe(self, file: str | BinaryIO, limits: Limits | None = None) -> VideoInfo:
        # decord exposes no codec, rotation or stream choice: one PyAV probe serves both backends
        return PyAVBackend(self.frame_size).probe(file, limits)

    def read(self, file: str | BinaryIO, times_s: np.ndarray, info: VideoInfo) -> _ReadResult:
        import decord

        if not isinstance(file, str):
            raise DecodeError(UNSUPPORTED, "decord needs a local file path")
        if info.duration_source == "packets":
            raise DecodeError(UNSUPPORTED, "decord cannot open files without a container duration")
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
                    UNSUPPORTED, f"decord reads another video stream ({fps:.3f} fps; probe: {info.fps:.3f})"
                )
            starts, ends = self._timestamps(vr, n, fps, info)
            pos = _pick_frames(starts, np.sort(np.asarray(times_s, np.float64)))
            frames = vr.get_batch(pos.tolist()).asnumpy()
        except DecodeError:
            raise
        except (decord.DECORDError, RuntimeError, AssertionError, IndexError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise DecodeError(DECODE_FAILED, f"decord: {type(exc).__name__}: {msg}") from None
        if frames.shape[1:] != (side, side, 3):
            raise DecodeError(DECODE_FAILED, f"decord returned frames of shape {frames.shape}")
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
        return _ReadResult(
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


# --------------------------------------------------------------------------------------- decoding


def make_backend(name: str, cfg: DecodeConfig) -> PyAVBackend | DecordBackend:
    threads = max(1, int(cfg.num_cpus))
    if name == "pyav":
        return PyAVBackend(cfg.frame_size, threads)
    if name == "decord":
        return DecordBackend(cfg.frame_size, threads)
    raise ValueError(f"unknown decode backend {name!r}; expected one of {BACKENDS}")


def backend_order(backend: str) -> tuple[str, str]:
    """The backend to try first and the fallback."""
    if backend == "auto":
        return AUTO_ORDER
    return (backend, next(b for b in BACKENDS if b != backend))


def _media_end_s(file: str | BinaryIO, video_end_s: float, info: VideoInfo) -> float:
    """Where the last packet of any stream ends, reading only from the video's end on. Tells a
    video legitimately shorter than the container (audio runs on) from data lost after it."""
    end = video_end_s
    with _open_container(file) as container:
        with contextlib.suppress(av.FFmpegError):
            container.seek(int(max(0.0, video_end_s - 1.0 + info.start_s) * av.time_base), backward=True)
        try:
            for packet in container.demux():
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None:
                    stream_end = float((ts + (packet.duration or 0)) * packet.time_base) - info.start_s
                    end = max(end, stream_end)
        except av.FFmpegError:
            return end  # a damaged tail ends the scan; the last good timestamp stands
    return end


def _tail_tolerance(info: VideoInfo) -> float:
    frame = 1.0 / info.fps if info.fps > 0 else 0.1
    return max(0.5, 3 * frame, 0.02 * info.duration_s)


def _ends_early(result: _ReadResult, targets: np.ndarray, info: VideoInfo) -> bool:
    """The video stream stopped well before the last target (which is inside the duration)."""
    return (
        result.ended_s is not None
        and len(result.times_s) > 0
        and targets[-1] > result.ended_s + _tail_tolerance(info)
    )


def _raise_if_cut_short(src: str | BinaryIO, result: _ReadResult, info: VideoInfo) -> None:
    assert result.ended_s is not None  # called only when _ends_early, which needs it
    if result.errors:
        raise DecodeError(
            DECODE_FAILED,
            f"decoding stops at {result.ended_s:.2f} s of {info.duration_s:.2f} s after "
            f"{result.errors} errors (last: {result.last_error})",
            info,
        )
    # A stream's own duration is the video's; a container's may be another stream's: trust it only
    # if some stream's packets really reach it.
    if info.duration_source != "container" or _media_end_s(src, result.ended_s, info) + _tail_tolerance(
        info
    ) < info.duration_s:
        raise DecodeError(TRUNCATED, f"video ends at {result.ended_s:.2f} s of {info.duration_s:.2f} s", info)


def decode_video(
    uri: str, cfg: DecodeConfig, storage_options: dict | None = None, backend: str | None = None
) -> DecodedVideo:
    """Decode the sampled frames of one video in this process with one backend (`backend`, else
    cfg.backend; `auto` = the first of AUTO_ORDER). Raises `DecodeError`."""
    name = backend or cfg.backend
    if name == "auto":
        name = AUTO_ORDER[0]
    impl = make_backend(name, cfg)
    src = None
    failure: BaseException | None = None
    try:
        with open_source(uri, storage_options, cfg.max_bytes, local_path=impl.needs_local_path) as src:
            info = impl.probe(src, Limits.from_config(cfg))
            targets = sample_times(info.duration_s, cfg)
            result = impl.read(src, targets, info)
            if _ends_early(result, targets, info) and result.ended_s is not None:  # (_ends_early checks it)
                # Either data is missing, or the container's duration covers a longer audio or
                # subtitle stream: then sample the video's own span (a second pass, rare).
                _raise_if_cut_short(src, result, info)
                info = dataclasses.replace(info, duration_s=result.ended_s, duration_source="decoded")
                result = impl.read(src, sample_times(info.duration_s, cfg), info)
    except Exception as exc:  # noqa: BLE001 - classified below
        failure = exc
    io_error = getattr(src, "error", None)
    if io_error is not None:
        # the storage failed under the decoder: whatever FFmpeg concluded (EOF, bad data), the file
        # was not read, so this is a storage error (retried), never a verdict on the file
        raise _storage_error(uri, io_error) from None
    if failure is not None:
        if isinstance(failure, DecodeError):
            raise failure
        if isinstance(failure, av.FFmpegError):
            raise DecodeError(DECODE_FAILED, f"{type(failure).__name__}: {failure}") from None
        if isinstance(failure, (OSError, PermissionError, FileNotFoundError)):
            raise _storage_error(uri, failure) from None
        raise failure
    if not len(result.frames):
        if result.errors:
            raise DecodeError(
                DECODE_FAILED, f"no frame decodes ({result.errors} errors, last: {result.last_error})", info
            )
        raise DecodeError(NO_FRAMES, "no frame at any sampled time", info)
    return DecodedVideo(
        frames=result.frames,
        times_s=result.times_s,
        indices=result.indices,
        width=info.width,
        height=info.height,
        fps=info.fps,
        duration_s=info.duration_s,
        rotation=info.rotation,
        codec=info.codec,
        backend=name,
    )


def _decode_in_child(uri: str, cfg: DecodeConfig, storage_options: dict | None, backend: str) -> DecodedVideo:
    """Entry point of the isolated process: every failure leaves as a DecodeError."""
    try:
        return decode_video(uri, cfg, storage_options, backend)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must still become an error row
        raise DecodeError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}") from None


isolation.add_preload("pipeline.decode")


# ------------------------------------------------------------------------------------------- stage


def _empty_decode_columns(frame_size: int) -> dict[str, Any]:
    return {
        Col.FRAMES: np.zeros((0, frame_size, frame_size, 3), np.uint8),
        Col.FRAME_TIMES_S: np.zeros(0, np.float64),
        Col.FRAME_INDICES: np.zeros(0, np.int64),
        Col.WIDTH: None,
        Col.HEIGHT: None,
        Col.FPS: None,
        Col.DURATION_S: None,
        Col.ROTATION: None,
        Col.CODEC: None,
        Col.DECODE_BACKEND: None,
        Col.DECODE_S: None,
    }


class DecodeStage:
    """Per-row decode: isolated, with a timeout, retries after a crash or timeout, then the other
    backend, then an error row. Rows already in error pass through with their status and error
    untouched (missing decode columns are added empty, so every row has the same columns)."""

    reads = (Col.VIDEO_URI, Col.STATUS)
    writes = (
        Col.FRAMES, Col.FRAME_TIMES_S, Col.FRAME_INDICES, Col.WIDTH, Col.HEIGHT, Col.FPS,
        Col.DURATION_S, Col.ROTATION, Col.CODEC, Col.DECODE_BACKEND, Col.DECODE_S, Col.STATUS,
        Col.ERROR,
    )  # fmt: skip

    def __init__(self, cfg: DecodeConfig, storage_options: dict | None = None):
        self.cfg = cfg
        self.storage_options = storage_options or None
        self.num_cpus = cfg.num_cpus
        self.resources = {"num_cpus": cfg.num_cpus}

    def __call__(self, row: dict) -> dict:
        out = dict(row)
        if out.get(Col.STATUS) == STATUS_ERROR:
            for key, value in _empty_decode_columns(self.cfg.frame_size).items():
                out.setdefault(key, value)
            return out
        started = time.perf_counter()
        uri = out.get(Col.VIDEO_URI)
        if isinstance(uri, str) and uri:
            result = self.decode(uri, None if _is_local(uri) else self.storage_options)
        else:
            result = DecodeError(NOT_FOUND, f"row has no {Col.VIDEO_URI}")
        out.update(_empty_decode_columns(self.cfg.frame_size))
        if isinstance(result, DecodedVideo):
            out.update(
                {
                    Col.FRAMES: result.frames,
                    Col.FRAME_TIMES_S: result.times_s,
                    Col.FRAME_INDICES: result.indices,
                    Col.WIDTH: result.width,
                    Col.HEIGHT: result.height,
                    Col.FPS: result.fps,
                    Col.DURATION_S: result.duration_s,
                    Col.ROTATION: result.rotation,
                    Col.CODEC: result.codec,
                    Col.DECODE_BACKEND: result.backend,
                    Col.STATUS: STATUS_OK,
                    Col.ERROR: None,
                }
            )
        else:
            if result.info is not None:  # what the probe learned is still worth reporting
                info = result.info
                out.update(
                    {
                        Col.WIDTH: info.width,
                        Col.HEIGHT: info.height,
                        Col.FPS: info.fps,
                        Col.DURATION_S: info.duration_s,
                        Col.ROTATION: info.rotation,
                        Col.CODEC: info.codec,
                    }
                )
            out[Col.STATUS] = STATUS_ERROR
            out[Col.ERROR] = str(result)
        out[Col.DECODE_S] = time.perf_counter() - started
        return out

    def decode(self, uri: str, storage_options: dict | None) -> DecodedVideo | DecodeError:
        """The policy: each backend in order, isolated; crashes and timeouts are retried
        `cfg.retries` times; storage failures (read_failed) `cfg.read_retries` times with
        exponential backoff (the other backend reads from the same storage, so it is not tried);
        input problems (FINAL_REASONS) stop at once."""
        failures: list[tuple[str, DecodeError]] = []
        read_failures = 0
        for backend in backend_order(self.cfg.backend):
            attempt = 0
            while attempt <= self.cfg.retries:
                try:
                    return isolation.run_isolated(
                        _decode_in_child, uri, self.cfg, storage_options, backend, timeout_s=self.cfg.timeout_s
                    )
                except DecodeError as exc:
                    failures.append((backend, exc))
                    if exc.reason == READ_FAILED and read_failures < self.cfg.read_retries:
                        time.sleep(min(READ_RETRY_MAX_WAIT_S, READ_RETRY_FIRST_WAIT_S * 2**read_failures))
                        read_failures += 1
                        continue  # the storage may be back: same backend, not counted as a crash retry
                    break  # deterministic: the same backend would fail again
                except isolation.IsolatedTimeout as exc:
                    failures.append((backend, DecodeError(TIMEOUT, str(exc))))
                except isolation.IsolatedCrash as exc:
                    failures.append((backend, DecodeError(CRASHED, str(exc))))
                except Exception as exc:  # noqa: BLE001 - e.g. the child could not be started
                    failures.append((backend, DecodeError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")))
                    break
                attempt += 1
            if failures[-1][1].reason in FINAL_REASONS or failures[-1][1].reason == READ_FAILED:
                break
        return _summarise(failures)


def _summarise(failures: list[tuple[str, DecodeError]]) -> DecodeError:
    """One error for the row: the first failure that says something about the file ("unsupported"
    only says a backend could not try), with every backend's outcome in the detail."""
    main_backend, main = next(((b, e) for b, e in failures if e.reason != UNSUPPORTED), failures[0])
    seen: dict[str, list[str]] = {}
    for backend, exc in failures:
        seen.setdefault(backend, []).append(str(exc))
    parts = []
    for backend, errors in seen.items():
        text = errors[-1] if len(set(errors)) == 1 else "; ".join(errors)
        parts.append(f"{backend}: {text}" + (f" (x{len(errors)})" if len(errors) > 1 else ""))
    detail = main.detail if len(failures) == 1 else f"{main.detail} [{main_backend}] | " + " | ".join(parts)
    info = next((e.info for _, e in failures if e.info is not None), None)
    return DecodeError(main.reason, detail, info)
