"""What a container holds and whether it is whole: opening with PyAV, naming why FFmpeg cannot open
a file (no known signature, or a known container that is damaged: an MP4 box walk tells a cut file
from a missing index), and telling a video cut short from one shorter than its container.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import av
import numpy as np

from pipeline.errors import ErrorReason
from pipeline.stages.decode.backend import ReadResult, VideoInfo
from pipeline.stages.decode.errors import DecodeError
from pipeline.stages.decode.source import ByteStream, file_size

_MAX_BOX_WALK = 10_000  # ISO-BMFF boxes inspected when diagnosing an unreadable MP4
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


def _read_at(file: str | ByteStream, offset: int, n: int) -> bytes:
    if isinstance(file, str):
        with open(file, "rb") as f:
            f.seek(offset)
            return f.read(n)
    file.seek(offset)
    return file.read(n)


def _diagnose_unopenable(file: str | ByteStream, exc: Exception) -> DecodeError:
    """FFmpeg says only "invalid data": tell a non-video from a damaged known container."""
    try:
        head = _read_at(file, 0, 512)
    except OSError as read_exc:
        return DecodeError(ErrorReason.READ_FAILED, f"{type(read_exc).__name__}: {read_exc}")
    kind = _sniff_container(head)
    if kind is None:
        return DecodeError(ErrorReason.NOT_A_VIDEO, f"no known container signature ({exc})")
    if kind == "mp4":
        return _diagnose_mp4(file)
    return DecodeError(ErrorReason.UNREADABLE_CONTAINER, f"{kind} container cannot be parsed ({exc})")


def _diagnose_mp4(file: str | ByteStream) -> DecodeError:
    size = file_size(file)
    if size is None:
        return DecodeError(ErrorReason.UNREADABLE_CONTAINER, "mp4 container cannot be parsed")
    pos = 0
    seen: list[bytes] = []  # box types
    while pos + 8 <= size and len(seen) < _MAX_BOX_WALK:
        box_size, box_type = struct.unpack(">I4s", _read_at(file, pos, 8))
        if box_size == 1:
            (box_size,) = struct.unpack(">Q", _read_at(file, pos + 8, 8))
        elif box_size == 0:  # "to the end of the file"
            box_size = size - pos
        if box_size < 8:
            return DecodeError(ErrorReason.UNREADABLE_CONTAINER, f"mp4: corrupt box header at byte {pos}")
        if pos + box_size > size:
            name = box_type.decode("latin-1")
            return DecodeError(
                ErrorReason.TRUNCATED, f"mp4 '{name}' box at byte {pos} needs {box_size} bytes; file ends at {size}"
            )
        seen.append(box_type)
        pos += box_size
    if b"moov" not in seen:
        return DecodeError(ErrorReason.UNREADABLE_CONTAINER, "mp4 has no 'moov' box (its index is missing or damaged)")
    return DecodeError(ErrorReason.UNREADABLE_CONTAINER, "mp4 boxes are intact but FFmpeg cannot parse them")


# Text that FFmpeg would open as a list of other inputs: its concat demuxer, HLS and other playlists.
_TEXT_LISTS = (b"ffconcat", b"#EXTM3U", b"[playlist]", b"<?xml", b"file ")
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def _text_not_media(head: bytes) -> str | None:
    """What a file of text is (it is never a video, whatever its name), or None for binary data.
    Checked before FFmpeg opens it: a concat list or playlist would make FFmpeg open the files it
    names (refused as unsafe: a misleading permission error), or fetch URLs."""
    if not head or _sniff_container(head) is not None:
        return None
    start = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if start.startswith(_TEXT_LISTS):
        return "a playlist or FFmpeg concat list (text naming other files)"
    sample = head[:512]
    if all(b in _TEXT_BYTES for b in sample):
        return "text, not media"
    return None


@contextlib.contextmanager
def open_container(file: str | ByteStream) -> Iterator[av.container.InputContainer]:
    if not isinstance(file, str):
        file.seek(0)
    what = _text_not_media(_read_at(file, 0, 512))
    if what is not None:
        raise DecodeError(ErrorReason.NOT_A_VIDEO, f"{what}: {file if isinstance(file, str) else 'the object'}")
    if not isinstance(file, str):
        file.seek(0)
    try:
        container = av.open(file, metadata_errors="ignore")
    except FileNotFoundError:
        raise DecodeError(ErrorReason.NOT_FOUND, f"no such file: {file}") from None
    except PermissionError:
        raise DecodeError(ErrorReason.PERMISSION_DENIED, f"cannot read {file}") from None
    except av.FFmpegError as exc:
        raise _diagnose_unopenable(file, exc) from None
    try:
        yield container
    finally:
        container.close()


def check_index_within_file(stream, size: int | None) -> None:
    """MP4/MOV/AVI index every sample with its byte offset: a sample beyond the end of the file
    means the file was cut short, which we can say before decoding anything."""
    if size is None:
        return
    entries = stream.index_entries
    if not entries:
        return
    end = max((e.pos + e.size for e in entries if e.pos >= 0), default=0)
    if end > size:
        raise DecodeError(ErrorReason.TRUNCATED, f"the index needs {end} bytes; the file has {size}")


def _media_end_s(file: str | ByteStream, video_end_s: float, info: VideoInfo) -> float:
    """Where the last packet of any stream ends, reading only from the video's end on. Tells a
    video legitimately shorter than the container (audio runs on) from data lost after it."""
    end = video_end_s
    with open_container(file) as container:
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


def ends_early(result: ReadResult, targets: np.ndarray, info: VideoInfo) -> bool:
    """The video stream stopped well before the last target (which is inside the duration)."""
    return (
        result.ended_s is not None
        and len(result.times_s) > 0
        and targets[-1] > result.ended_s + _tail_tolerance(info)
    )


def raise_if_cut_short(src: str | ByteStream, result: ReadResult, info: VideoInfo) -> float:
    """The video stream ended early (`ends_early`): say whether data is missing (decode_failed,
    truncated); when the container's duration is a longer audio or subtitle stream's, return where
    the video stream ends (s)."""
    ended_s = result.ended_s
    assert ended_s is not None  # ends_early is true only for a stream that ended
    if result.errors:
        raise DecodeError(
            ErrorReason.DECODE_FAILED,
            f"decoding stops at {ended_s:.2f} s of {info.duration_s:.2f} s after "
            f"{result.errors} errors (last: {result.last_error})",
            info,
        )
    # A stream's own duration is the video's; a container's may be another stream's: trust it only
    # if some stream's packets really reach it.
    if info.duration_source != "container" or _media_end_s(src, ended_s, info) + _tail_tolerance(
        info
    ) < info.duration_s:
        raise DecodeError(
            ErrorReason.TRUNCATED, f"video ends at {ended_s:.2f} s of {info.duration_s:.2f} s", info
        )
    return ended_s
