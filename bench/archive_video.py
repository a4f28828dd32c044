"""Archive-like test videos: H.264 at a set bit rate and keyframe interval, with moving texture, so
decoding does real work (a flat or gradient picture decodes almost for free).

The picture is two layers of smooth random texture panning in different directions, averaged:
motion compensation cannot predict their sum from one vector per block, so every P-frame carries
residual, as camera footage does. Frames are built straight in YUV 4:2:0 (no RGB conversion) by
cropping precomputed planes, which keeps generation cheap; x264 runs with the ultrafast preset
(CAVLC, no B-frames), so decoding these costs somewhat less than CABAC/B-frame footage of the
same bit rate: a lower bound for real archives.
"""

from __future__ import annotations

import fractions
from pathlib import Path

import numpy as np


def _texture(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth random texture (height, width) uint8: noise on a coarse grid, bilinearly upsampled."""
    coarse = rng.random((height // cell + 2, width // cell + 2)) * 255
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.uint8)


def write_archive_video(path: str | Path, seconds: float, width: int = 1920, height: int = 1080, fps: int = 30,
                        bit_rate: int = 8_000_000, keyframe_s: float = 8.0, seed: int = 0) -> str:
    """One H.264 MP4 of `seconds` at width x height, `fps`, ~`bit_rate` bit/s, a keyframe every
    `keyframe_s` seconds exactly (no scene-cut keyframes). Returns the path."""
    import av

    rng = np.random.default_rng(seed)
    frames = int(round(seconds * fps))
    dx, dy = 3, 2  # pixels per frame each layer pans
    # Layers wrap around: pan within a tile twice the picture, so any offset has a full crop.
    layer_a = np.tile(_texture(rng, height, width, 24), (2, 2))
    layer_b = np.tile(_texture(rng, height, width, 40), (2, 2))
    chroma_u = np.tile(_texture(rng, height // 2, width // 2, 16), (2, 2))
    chroma_v = np.tile(_texture(rng, height // 2, width // 2, 28), (2, 2))
    gop = max(1, int(round(keyframe_s * fps)))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bit_rate
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast", "keyint_min": str(gop), "sc_threshold": "0",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:vbv-maxrate={bit_rate // 1000}"
                                         f":vbv-bufsize={2 * bit_rate // 1000}"}
        frame_time_base = fractions.Fraction(1, fps)
        plane = np.empty((height * 3 // 2, width), np.uint8)
        for i in range(frames):
            ax, ay = (i * dx) % width, (i * dy // 3) % height
            bx, by = (width - (i * dx // 2) % width) % width, (i * dy) % height
            y = (layer_a[ay : ay + height, ax : ax + width].astype(np.uint16)
                 + layer_b[by : by + height, bx : bx + width]) // 2
            plane[:height] = y
            cx, cy = ax // 2, ay // 2
            u = chroma_u[cy : cy + height // 2, cx : cx + width // 2]
            v = chroma_v[cy : cy + height // 2, cx : cx + width // 2]
            # yuv420p as one (H * 3/2, W) array: Y rows, then U and V, each (H/2, W/2), packed two per row
            plane[height : height + height // 4] = u.reshape(height // 4, width)
            plane[height + height // 4 :] = v.reshape(height // 4, width)
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = i
            frame.time_base = frame_time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


def write_archive_video_job(job: tuple) -> str:
    """`write_archive_video(*job)`, for a process pool."""
    return write_archive_video(*job)


def repeat_to_length(segment: str | Path, path: str | Path, seconds: float) -> str:
    """`segment` (starting with a keyframe, closed GOPs) played back to back until `seconds`,
    remuxed without re-encoding: each repetition's packets shifted by the segment's length. Every
    frame of the result still has to be decoded; only writing it is cheap."""
    import av

    with av.open(str(segment)) as src, av.open(str(path), "w") as out:
        video = src.streams.video[0]
        stream = out.add_stream_from_template(video)
        tb = video.time_base
        length = int(round(float(video.duration * tb) / tb)) if video.duration else None
        if not length:
            raise ValueError(f"{segment}: no stream duration to repeat by")
        end = int(seconds / tb)
        for repeat in range(int(seconds * 1.0 / float(length * tb)) + 1):
            src.seek(0, stream=video)
            for packet in src.demux(video):
                if packet.size == 0 or packet.pts is None:
                    continue
                shift = repeat * length
                if packet.pts + shift >= end:
                    break
                packet.pts += shift
                packet.dts = None if packet.dts is None else packet.dts + shift
                packet.stream = stream
                out.mux(packet)
    return str(path)
