"""The nvdec backend's CPU side: the frame table it picks frames from (the container's packets,
demuxed, not decoded) against the frames PyAV decodes, the positions it would ask NVDEC for against
the PyAV backend's choices, and the fallback to PyAV where NVDEC cannot run (no GPU here). Decoding
on the GPU: tests/gpu/test_nvdec.py."""

from __future__ import annotations

import av
import numpy as np
import pytest

from pipeline.config import DecodeConfig
from pipeline.errors import ErrorReason
from pipeline.schema import STATUS_OK, Col
from pipeline.stages.decode import DecodeError, DecodeStage, decode_video
from pipeline.stages.decode.nvdec_backend import NvdecBackend, frame_table
from pipeline.stages.decode.pyav_backend import PyAVBackend
from pipeline.stages.decode.sampling import sample_times
from tests.media import make_clip
from tests.paths import video as real_video

S = 48


def cfg(**overrides) -> DecodeConfig:
    return DecodeConfig(**{"frame_size": S, "num_frames": 8, "num_cpus": 1, **overrides})


def decoded_frames(path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame PyAV decodes: its time from the stream start and whether it is a keyframe."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        frames = [(f.time - start, f.key_frame) for f in container.decode(stream)]
    return np.array([t for t, _ in frames]), np.array([k for _, k in frames], bool)


CLIPS = {
    "bframes.mp4": {"n": 40, "options": {"bf": "3", "crf": "10"}, "gop": 12},
    "vfr.mkv": {"n": 24, "pts_ms": [i * 40 + (i % 3) * 9 for i in range(24)]},
    "vp9.webm": {"n": 20, "codec": "libvpx-vp9", "gop": 5},
    "hevc.mov": {"n": 20, "codec": "libx265", "size": (64, 64)},
    "stream.ts": {"n": 20, "gop": 7},
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvdec_clips")
    return {name: make_clip(root / name, **kw) for name, kw in CLIPS.items()}


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_frame_table_matches_the_decoded_frames(clips, name):
    path = clips[name]
    info = PyAVBackend(S).probe(str(path))
    table = frame_table(str(path), info)
    times, keys = decoded_frames(path)
    np.testing.assert_allclose(table.starts, times, atol=1e-6)
    np.testing.assert_array_equal(table.is_key, keys)
    assert table.end_s > table.starts[-1]


@pytest.mark.parametrize("name", ["kinetics_armwrestling.mp4", "pancake_h264_opus.mkv", "iphone4s_rot90.mov"])
def test_frame_table_of_real_videos(name):
    path = real_video(name)
    table = frame_table(str(path), PyAVBackend(S).probe(str(path)))
    times, keys = decoded_frames(path)
    np.testing.assert_allclose(table.starts, times, atol=1e-6)
    np.testing.assert_array_equal(table.is_key, keys)


@pytest.mark.parametrize("seek", ["exact", "keyframe"])
@pytest.mark.parametrize("name", ["bframes.mp4", "vfr.mkv", "vp9.webm"])
def test_positions_are_the_frames_pyav_returns(clips, name, seek):
    """What nvdec would decode is what the PyAV backend decodes: same frames, same times."""
    path = str(clips[name])
    c = cfg(num_frames=9, seek=seek)
    video = decode_video(path, c, backend="pyav")
    info = PyAVBackend(S).probe(path)
    table = frame_table(path, info)
    pos = NvdecBackend(S, seek).positions(table, sample_times(info.duration_s, c))
    np.testing.assert_allclose(table.starts[pos], video.times_s, atol=1e-6)
    if seek == "exact":
        np.testing.assert_array_equal(pos, video.indices)


def test_nvdec_refuses_what_it_cannot_decode_as_unsupported(clips):
    backend = NvdecBackend(S)
    avi = real_video("mpeg4_mp3.avi")
    with pytest.raises(DecodeError) as raised:
        backend.read(str(avi), np.zeros(1), backend.probe(str(avi)))
    assert raised.value.reason == ErrorReason.UNSUPPORTED and "nvdec does not decode mpeg4" in str(raised.value)
    path = str(clips["bframes.mp4"])
    with pytest.raises(DecodeError) as raised:  # this machine has no CUDA device
        backend.read(path, np.zeros(1), backend.probe(path))
    assert raised.value.reason == ErrorReason.UNSUPPORTED and "no CUDA device" in str(raised.value)


def test_stage_falls_back_to_pyav_without_a_gpu(clips):
    stage = DecodeStage(cfg(backend="nvdec", num_gpus=0.05), None)
    row = stage.decode_row({Col.VIDEO_URI: str(clips["bframes.mp4"])})
    assert row[Col.STATUS] == STATUS_OK, row[Col.ERROR_DETAIL]
    assert row[Col.DECODE_BACKEND] == "pyav" and row[Col.FRAMES].shape == (8, S, S, 3)
