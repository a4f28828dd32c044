"""The NVDEC backend: the GPU's hardware video decoder through NVIDIA's PyNvVideoCodec (the `nvdec`
extra), on the GPU Ray gave the decode task (`decode.num_gpus`).

Which frames: the container's packets, demuxed with PyAV and not decoded, give every frame's
presentation time and which are keyframes (`frame_table`); the frames shown at the targets are then
picked exactly as the CPU backends pick them (`pick_frames`, or `nearest_keyframes` for `seek:
keyframe`). NVDEC decodes just those, by their position in presentation order (it seeks to the
keyframe before each and decodes forward), converts them to RGB, and torch scales them to the frame
size and turns them upright on the GPU; only the small frames cross to the host.

Whatever NVDEC cannot take (a codec outside `NVDEC_CODECS`, no visible GPU, PyNvVideoCodec not
installed, a frame count that disagrees with the packets, a decoder error) is `unsupported`: the
stage falls back to PyAV, whose verdict on the file is the one recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ErrorReason
from pipeline.stages.decode.backend import Limits, ReadResult, VideoInfo
from pipeline.stages.decode.container import open_container
from pipeline.stages.decode.errors import DecodeError
from pipeline.stages.decode.pyav_backend import PyAVBackend
from pipeline.stages.decode.sampling import nearest_keyframes, pick_frames
from pipeline.stages.decode.source import ByteStream

# FFmpeg codec names NVDEC decodes on every GPU this project targets (Ampere and later); h264, hevc
# and vp9 checked against PyAV on an H100 (tests/gpu/test_nvdec.py), av1 not (no AV1 encoder here).
# MPEG-4 part 2 is left to the CPU: in AVI its header frame count is wrong, and PyNvVideoCodec
# indexes by that count.
NVDEC_CODECS = frozenset({"h264", "hevc", "vp9", "av1"})
# Frames scaled per torch call: a 1080p frame in float32 is 25 MB, so 32 at once is 0.8 GB.
SCALE_CHUNK = 32


@dataclass(frozen=True)
class FrameTable:
    """Every frame of the stream in presentation order, from its packets."""

    starts: np.ndarray  # float64, seconds from the stream start, strictly increasing
    is_key: np.ndarray  # bool
    end_s: float  # the last frame's start + its duration: where the stream's data ends


def frame_table(file: str | ByteStream, info: VideoInfo) -> FrameTable:
    """The frames' times and keyframe flags from a demux-only pass over the video stream. AVI frame
    times are its decode timestamps (as in the PyAV backend). Raises DecodeError(unsupported) when
    the packets cannot give one distinct time per frame."""
    with open_container(file) as container:
        stream = container.streams[info.stream_index]
        tb = float(stream.time_base)
        use_dts = container.format.name == "avi"
        stamps, durations, keys = [], [], []
        for packet in container.demux(stream):
            if not packet.size:
                continue  # the demuxer's flush packet
            ts = packet.dts if use_dts else packet.pts
            if ts is None:
                raise DecodeError(ErrorReason.UNSUPPORTED, "nvdec: a packet has no timestamp")
            stamps.append(ts)
            durations.append(packet.duration or 0)
            keys.append(packet.is_keyframe)
    if not stamps:
        raise DecodeError(ErrorReason.UNSUPPORTED, "nvdec: the video stream has no packets")
    order = np.argsort(np.asarray(stamps, np.int64), kind="stable")  # packet order -> presentation order
    starts = np.asarray(stamps, np.float64)[order] * tb - info.start_s
    if len(starts) > 1 and not (np.diff(starts) > 0).all():
        raise DecodeError(ErrorReason.UNSUPPORTED, "nvdec: two packets share a presentation time")
    shown_s = durations[order[-1]] * tb or (1.0 / info.fps if info.fps else 0.0)
    return FrameTable(starts=starts, is_key=np.asarray(keys, bool)[order], end_s=float(starts[-1] + shown_s))


def _nvdec():
    try:
        import PyNvVideoCodec
    except Exception as exc:  # noqa: BLE001 - ImportError, or the driver check's RuntimeError
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DecodeError(ErrorReason.UNSUPPORTED,
                          f"nvdec: PyNvVideoCodec cannot be used here (pip install 'moref-index[nvdec]'): "
                          f"{first_line}") from None
    return PyNvVideoCodec


class NvdecBackend:
    """NVDEC through PyNvVideoCodec 2.2: local paths, frames picked from the packets' times."""

    name = "nvdec"
    needs_local_path = True  # PyNvVideoCodec's own demuxer opens the file by path

    def __init__(self, frame_size: int, seek: str = "exact"):
        self.frame_size = frame_size
        self.seek = seek  # DecodeConfig.seek: "exact" or "keyframe"

    def probe(self, file: str | ByteStream, limits: Limits | None = None) -> VideoInfo:
        # one PyAV probe gives every backend the same metadata, rotation and limits
        return PyAVBackend(self.frame_size).probe(file, limits)

    def read(self, file: str | ByteStream, times_s: np.ndarray, info: VideoInfo) -> ReadResult:
        if not isinstance(file, str):
            raise DecodeError(ErrorReason.UNSUPPORTED, "nvdec needs a local file path")
        if info.codec not in NVDEC_CODECS:
            raise DecodeError(ErrorReason.UNSUPPORTED, f"nvdec does not decode {info.codec}")
        import torch

        if not torch.cuda.is_available():
            raise DecodeError(ErrorReason.UNSUPPORTED,
                              "nvdec: no CUDA device is visible (decode.num_gpus gives decode tasks a GPU)")
        nvc = _nvdec()
        table = frame_table(file, info)
        pos = self.positions(table, times_s)
        try:
            # GPU 0 of those visible: Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
            decoder = nvc.SimpleDecoder(file, gpu_id=0, use_device_memory=True,
                                        output_color_type=nvc.OutputColorType.RGB)
            if len(decoder) != len(table.starts):
                raise DecodeError(ErrorReason.UNSUPPORTED,
                                  f"nvdec counts {len(decoder)} frames, the container's packets {len(table.starts)}")
            frames = self._scaled(decoder, pos, info)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - PyNvVideoCodec raises its own exception types
            msg = " ".join(str(exc).split())[:300]
            raise DecodeError(ErrorReason.UNSUPPORTED, f"nvdec: {type(exc).__name__}: {msg}") from None
        return ReadResult(frames=frames, times_s=table.starts[pos], indices=pos.astype(np.int64),
                          ended_s=table.end_s)

    def positions(self, table: FrameTable, times_s: np.ndarray) -> np.ndarray:
        """Presentation-order positions of the frames to decode: the frame shown at each target, or
        with `seek: keyframe` the keyframe nearest it; once each, ascending."""
        targets = np.sort(np.asarray(times_s, np.float64))
        if self.seek == "keyframe":
            keys = np.flatnonzero(table.is_key)
            return keys[nearest_keyframes(table.starts[keys], targets)]
        return pick_frames(table.starts, targets)

    def _scaled(self, decoder, pos: np.ndarray, info: VideoInfo) -> np.ndarray:
        """The frames at `pos`, decoded on the GPU, as upright uint8 (T, S, S, 3) on the host."""
        import torch

        s = self.frame_size
        turns = -(info.rotation // 90)  # torch.rot90 turns counter-clockwise for k > 0
        out = np.empty((len(pos), s, s, 3), np.uint8)
        for start in range(0, len(pos), SCALE_CHUNK):
            chunk = pos[start : start + SCALE_CHUNK].tolist()
            decoded = decoder.get_batch_frames_by_index(chunk)
            if len(decoded) != len(chunk):
                raise DecodeError(ErrorReason.UNSUPPORTED, f"nvdec returned {len(decoded)} of {len(chunk)} frames")
            rgb = torch.stack([torch.from_dlpack(frame) for frame in decoded])  # (n, H, W, 3), stored size
            if rgb.dtype != torch.uint8 or rgb.shape[-1] != 3:  # e.g. a high-bit-depth stream's wider samples
                raise DecodeError(ErrorReason.UNSUPPORTED, f"nvdec returned {rgb.dtype} frames of shape "
                                                           f"{tuple(rgb.shape[1:])}, not 8-bit RGB")
            if tuple(rgb.shape[1:3]) != (info.coded_height, info.coded_width):
                # another stream than the probe's (files with several video streams), or padded sizes
                raise DecodeError(ErrorReason.UNSUPPORTED, f"nvdec returned {rgb.shape[2]}x{rgb.shape[1]} frames, "
                                                           f"the stream is {info.coded_width}x{info.coded_height}")
            # bilinear with antialiasing: like swscale's bilinear, it averages over the source
            # footprint when shrinking, where plain bilinear would alias 1080p texture
            small = torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2).float(), size=(s, s), mode="bilinear",
                                                    antialias=True, align_corners=False)
            small = small.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            if turns:
                small = torch.rot90(small, k=turns, dims=(1, 2))
            out[start : start + len(chunk)] = small.cpu().numpy()
        return out
