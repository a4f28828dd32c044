"""Synthetic media the tests write with PyAV."""

import fractions
import pathlib

import av
import numpy as np


def make_audio_only(path: pathlib.Path) -> pathlib.Path:
    """An AAC file with no video stream (20 frames of a quiet tone)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(20):
            samples = (np.sin(np.arange(1024) / 10.0) * 0.1).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            frame.time_base = fractions.Fraction(1, 16000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def grey_level(i: int, n: int) -> int:
    """The grey level that encodes frame i of n (at least 5 levels apart for n <= 40)."""
    return 16 + round(i * 208 / max(1, n - 1))


def make_clip(
    path: pathlib.Path,
    n: int,
    *,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    pts_ms: list[int] | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    fmt: str | None = None,
    gop: int | None = None,
    rotation: int | None = None,
    marker: bool = False,
) -> pathlib.Path:
    """n flat frames whose grey level encodes the frame index (`grey_level`), at 25 fps or at `pts_ms`.

    `codec`/`pix_fmt` pick the stream (libx264, libx265, mjpeg...), `options` the encoder's;
    `container_options` the muxer's (e.g. {"movflags": "faststart"} to put an MP4's index before
    its samples), `fmt` the container when the suffix does not say. `gop`: a keyframe every `gop`
    frames exactly; `rotation`: display-matrix rotation metadata; `marker`: the stored top-left
    third is red (to check orientation)."""
    times = pts_ms if pts_ms is not None else [i * 40 for i in range(n)]
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}  # x265 prints its banner otherwise
        stream.options = {**stream.options, **(options or {})}
        if gop:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {**stream.options, "keyint_min": str(gop), "sc_threshold": "0"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, pts in enumerate(times):
            img = np.full((size[1], size[0], 3), grey_level(i, len(times)), np.uint8)
            if marker:
                img[: size[1] // 3, : size[0] // 3] = (255, 0, 0)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
