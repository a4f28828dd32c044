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
