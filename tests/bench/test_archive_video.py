"""bench/archive_video.py: the archive-like videos the GPU benchmark decodes (size, rate, keyframe
interval, moving picture) and their repetition to long lengths by remuxing."""

import sys

import av
import numpy as np

from tests.paths import REPO

sys.path.insert(0, str(REPO / "bench"))

from archive_video import repeat_to_length, write_archive_video  # noqa: E402


def _keyframes_and_frames(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        keys = [float(p.pts * s.time_base) for p in c.demux(s) if p.size and p.is_keyframe]
        c.seek(0)
        frames = [(float(f.pts * s.time_base), f.to_ndarray(format="gray")) for f in c.decode(s)]
        return keys, frames, (s.width, s.height, float(s.average_rate))


def test_archive_video_has_its_shape_rate_keyframes_and_moving_texture(tmp_path):
    path = write_archive_video(tmp_path / "a.mp4", 3, 320, 192, fps=10, bit_rate=1_000_000, keyframe_s=1.0)
    keys, frames, shape = _keyframes_and_frames(path)
    assert shape == (320, 192, 10.0) and len(frames) == 30
    assert keys == [0.0, 1.0, 2.0]  # exactly every keyframe_s, no scene-cut keyframes
    mbit = (tmp_path / "a.mp4").stat().st_size * 8 / 3 / 1e6
    assert 0.5 < mbit < 2.0
    first, later = frames[0][1].astype(int), frames[5][1].astype(int)
    assert first.std() > 10  # texture, not a flat picture
    assert np.abs(first - later).mean() > 5  # and it moves


def test_repeat_to_length_plays_the_segment_back_to_back(tmp_path):
    segment = write_archive_video(tmp_path / "s.mp4", 2, 160, 96, fps=8, bit_rate=300_000, keyframe_s=1.0)
    long = repeat_to_length(segment, tmp_path / "long.mp4", 5)
    keys, frames, _ = _keyframes_and_frames(long)
    times = [t for t, _ in frames]
    assert len(frames) == 40 and np.allclose(np.diff(times), 1 / 8)
    assert keys == [0.0, 1.0, 2.0, 3.0, 4.0]
    _, seg_frames, _ = _keyframes_and_frames(segment)
    assert np.array_equal(frames[16][1], seg_frames[0][1])  # the segment again from 2 s
