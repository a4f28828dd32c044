"""Decode: real test videos against their manifest, synthetic clips whose frames carry their own
index, hostile inputs, S3 through fsspec, and the isolated stage policy.

The real videos are the repository's (tests/paths.py); an extra corpus, when present, adds cases."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import av
import numpy as np
import pytest

from pipeline.config import DecodeConfig
from pipeline.errors import ErrorReason
from pipeline.schema import STATUS_ERROR, STATUS_OK, Col
from pipeline.stages.decode import DecodedVideo, DecodeError, DecodeStage, decode_video
from pipeline.stages.decode.pyav_backend import PyAVBackend
from pipeline.stages.decode.sampling import sample_times
from tests.media import grey_level, make_audio_only, make_clip
from tests.paths import available, manifest, video_or_none
from tests.paths import video as real_video

MANIFEST = manifest()
S = 48  # small frames keep the tests fast; resizing is the same code at any size

# The manifest describes each file's *first* video stream; nasa_multistream.mp4 has two and we
# read the one FFmpeg's av_find_best_stream picks (also decord's): 480x270, 29.97 fps, 390 frames.
STREAM_OVERRIDES = {"nasa_multistream.mp4": {"display": (480, 270), "fps": 29.97, "duration": 13.013, "frames": 390}}
# decord 0.6.0 cannot open a webm without a container duration.
DECORD_CANNOT = {"webm_noduration_vp9_opus.webm"}


def needs_extra(name: str):
    """For the few cases only a file of the extra corpus exercises (the core has synthetic twins)."""
    return pytest.mark.skipif(video_or_none(name) is None, reason=f"{name} is only in the extra video corpus")


def cfg(**overrides) -> DecodeConfig:
    base: dict[str, Any] = {"frame_size": S, "num_frames": 8, "num_cpus": 1}
    base.update(overrides)
    return DecodeConfig(**base)


def expected(name: str) -> dict:
    m = MANIFEST[name]
    w, h = (int(v) for v in m["display_resolution"].split("x"))
    exp = {
        "display": (w, h),
        "fps": m["fps_avg"],
        "duration": m["duration_s"],
        "frames": m["frames"],
        "rotation": (-int(m["rotation_deg"] or 0)) % 360,
        "max_interval_s": m["frame_interval"]["max_ms"] / 1000,
    }
    exp.update(STREAM_OVERRIDES.get(name, {}))
    return exp


def assert_error(exc_info, reason: str) -> None:
    err = exc_info.value
    assert err.reason == reason, str(err)
    assert str(err).startswith(reason + ": ")


# ------------------------------------------------------------------------------ synthetic videos


def read_level(frame: np.ndarray, n: int) -> int:
    """Back from a decoded frame's mean grey to the frame index it encodes."""
    levels = np.array([grey_level(i, n) for i in range(n)])
    return int(np.argmin(np.abs(levels - frame.mean())))


def make_video(path: pathlib.Path, pts_ms: list[int], *, codec="libx264", **kwargs) -> pathlib.Path:
    """`make_clip` at the given times (ms); H.264 with B-frames, so decode order differs from
    presentation order."""
    options = {"crf": "8", "bf": "2"} if codec == "libx264" else None
    return make_clip(path, len(pts_ms), pts_ms=pts_ms, codec=codec, options=options, **kwargs)


def expected_positions(pts_s: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The frame whose interval [pts_i, pts_i+1) holds each target; first frame before it; once each."""
    return np.unique(np.clip(np.searchsorted(pts_s, targets, side="right") - 1, 0, len(pts_s) - 1))


# ------------------------------------------------------------------------------------- sampling


def test_uniform_sampling_takes_segment_centres():
    times = sample_times(10.0, cfg(num_frames=4))
    np.testing.assert_allclose(times, [1.25, 3.75, 6.25, 8.75])


def test_fps_sampling_steps_from_zero_and_thins_evenly():
    np.testing.assert_allclose(sample_times(3.5, cfg(sampling="fps", fps=2.0)), np.arange(7) / 2)
    thinned = sample_times(100.0, cfg(sampling="fps", fps=1.0, max_frames=5))
    np.testing.assert_allclose(thinned, [0, 25, 50, 74, 99])
    assert len(sample_times(0.2, cfg(sampling="fps", fps=1.0))) == 1


# --------------------------------------------------------------------------------- real videos

REAL = sorted(MANIFEST)


@pytest.mark.parametrize("name", REAL)
def test_real_video_pyav_frames_and_metadata(name):
    exp = expected(name)
    c = cfg(num_frames=8)
    video = decode_video(str(real_video(name)), c, backend="pyav")
    _check_real(video, exp, c)


# decord on a subset that covers its containers and codecs, at a few hundred ms each
DECORD_SUBSET = available(
    "kinetics_armwrestling.mp4",
    "pancake_h264_opus.mkv",
    "hevc_foreman_cif.mp4",
    "vp9_bbb_180p.webm",
    "mpeg4_mp3.avi",
    "mjpeg_mouse_12f.avi",
    "nasa_multistream.mp4",
    "long_room_139s.mp4",
    "vfr_screenrec.mp4",
)


@pytest.mark.parametrize("name", DECORD_SUBSET)
def test_real_video_decord_matches_pyav(name):
    exp = expected(name)
    c = cfg(num_frames=8)
    dec = decode_video(str(real_video(name)), c, backend="decord")
    _check_real(dec, exp, c)
    ref = decode_video(str(real_video(name)), c, backend="pyav")
    np.testing.assert_allclose(dec.times_s, ref.times_s, atol=1.01 / exp["fps"])
    assert np.abs(dec.indices - ref.indices).max() <= 1
    assert np.abs(dec.frames.astype(int) - ref.frames.astype(int)).mean() < 4.0


def _check_real(video: DecodedVideo, exp: dict, c: DecodeConfig) -> None:
    n = len(video.times_s)
    assert video.frames.shape == (n, S, S, 3) and video.frames.dtype == np.uint8
    assert video.times_s.dtype == np.float64 and video.indices.dtype == np.int64
    assert len(video.indices) == n
    # metadata vs the manifest
    assert (video.width, video.height) == exp["display"]
    assert video.rotation == exp["rotation"]
    assert video.fps == pytest.approx(exp["fps"], rel=0.01)
    assert video.duration_s == pytest.approx(exp["duration"], abs=max(0.2, 0.02 * exp["duration"]))
    # frames: as many as targets when the video has enough frames spread in time
    if exp["frames"] <= c.num_frames:
        assert n == exp["frames"]
    elif exp["max_interval_s"] <= video.duration_s / c.num_frames:
        assert n == c.num_frames
    else:  # VFR with long-held frames: several targets share a frame
        assert 1 <= n <= c.num_frames
    # times: strictly increasing, inside the video, each within one frame interval of a target
    assert (np.diff(video.times_s) > 0).all()
    assert video.times_s[0] >= 0 and video.times_s[-1] <= video.duration_s
    targets = sample_times(video.duration_s, c)
    gap = np.abs(video.times_s[:, None] - targets[None, :]).min(axis=1)
    assert (gap <= exp["max_interval_s"] + 1e-3).all(), gap
    # indices: strictly increasing ordinals, consistent with the times at the average rate
    assert (np.diff(video.indices) > 0).all()
    assert 0 <= video.indices[0] and video.indices[-1] < exp["frames"]
    if exp["max_interval_s"] < 1.5 / exp["fps"]:  # CFR: index ~ time * fps
        assert np.abs(video.indices - video.times_s * exp["fps"]).max() <= 1.5
    assert video.frames.std() > 0  # not blank


@needs_extra("vfr_screenrec.mp4")
def test_vfr_file_times_follow_presentation_times():
    """vfr_screenrec.mp4 holds its first frame 1.115 s: uniform time sampling must not take one
    frame per index step (which uniform index sampling would)."""
    c = cfg(num_frames=32)
    video = decode_video(str(real_video("vfr_screenrec.mp4")), c, backend="pyav")
    with av.open(str(real_video("vfr_screenrec.mp4"))) as container:
        pts = np.array([f.time for f in container.decode(video=0)])
    pos = expected_positions(pts, sample_times(video.duration_s, c))
    np.testing.assert_allclose(video.times_s, pts[pos], atol=1e-6)
    np.testing.assert_array_equal(video.indices, pos)
    # the first frame is shown for 1.115 s: the targets inside it all get it, once
    assert video.indices[0] == 0 and video.times_s[1] >= 1.115 and len(video.times_s) < 32


@needs_extra("fire_vfr_rot180.mp4")
def test_vfr_phone_clip_times(name="fire_vfr_rot180.mp4"):
    c = cfg(num_frames=25)
    video = decode_video(str(real_video(name)), c, backend="pyav")
    with av.open(str(real_video(name))) as container:
        pts = np.array([f.time for f in container.decode(video=0)])
    pos = expected_positions(pts, sample_times(video.duration_s, c))
    np.testing.assert_allclose(video.times_s, pts[pos], atol=1e-6)


@pytest.mark.parametrize("name", available("iphone4s_rot90.mov", "fire_vfr_rot180.mp4"))
def test_rotation_backends_agree_and_report_display_size(name):
    c = cfg(num_frames=4, frame_size=96)
    a = decode_video(str(real_video(name)), c, backend="pyav")
    b = decode_video(str(real_video(name)), c, backend="decord")
    exp = expected(name)
    for v in (a, b):
        assert (v.width, v.height) == exp["display"] and v.rotation == exp["rotation"]
    np.testing.assert_allclose(a.times_s, b.times_s, atol=1e-3)
    same = np.abs(a.frames.astype(int) - b.frames.astype(int)).mean()
    # an unrotated or wrongly rotated frame differs by tens of grey levels on these clips
    wrong = np.abs(a.frames.astype(int) - np.rot90(b.frames, 2, axes=(1, 2)).astype(int)).mean()
    assert same < 3.0 and wrong > 4 * same, (same, wrong)


def test_probe_has_no_container_duration_fallback():
    info = PyAVBackend(S).probe(str(real_video("webm_noduration_vp9_opus.webm")))
    assert info.duration_source == "packets"
    assert info.duration_s == pytest.approx(4.939, abs=0.01)


def test_decord_refuses_webm_without_duration():
    c = cfg()
    with pytest.raises(DecodeError) as exc_info:
        decode_video(str(real_video("webm_noduration_vp9_opus.webm")), c, backend="decord")
    assert_error(exc_info, ErrorReason.UNSUPPORTED)


def test_sparse_sampling_seeks_instead_of_decoding_everything(tmp_path):
    gop = {"g": "10", "keyint_min": "10", "sc_threshold": "0"}  # a keyframe every second
    path = str(make_clip(tmp_path / "long.mp4", 300, pts_ms=[i * 100 for i in range(300)], options=gop))
    backend = PyAVBackend(S)
    info = backend.probe(path)
    c = cfg(num_frames=8)
    result = backend.read(path, sample_times(info.duration_s, c), info)
    assert len(result.times_s) == 8
    assert result.frames_decoded < 8 * 15  # ~ one GOP per target, not 300
    # ordinals after a seek are estimated from the time at the average rate: exact on CFR
    np.testing.assert_array_equal(result.indices, np.round(result.times_s * 10).astype(int))


def test_fps_sampling_on_a_real_video():
    c = cfg(sampling="fps", fps=0.5, max_frames=100)
    video = decode_video(str(real_video("pancake_h264_opus.mkv")), c, backend="pyav")
    assert len(video.times_s) == 6  # 0, 2, 4, 6, 8, 10 s of 10.38 s
    np.testing.assert_allclose(video.times_s, [0, 2, 4, 6, 8, 10], atol=1 / 30)


# ---------------------------------------------------------------------------- synthetic videos


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize("sampling", [{"num_frames": 7}, {"sampling": "fps", "fps": 3.0}])
def test_synthetic_cfr_returns_the_right_frame(tmp_path, backend, sampling):
    n = 30
    pts = [i * 40 for i in range(n)]
    path = make_video(tmp_path / "cfr.mp4", pts, gop=5)
    c = cfg(**sampling)
    video = decode_video(str(path), c, backend=backend)
    pos = expected_positions(np.array(pts) / 1000, sample_times(video.duration_s, c))
    assert [read_level(f, n) for f in video.frames] == pos.tolist()
    np.testing.assert_array_equal(video.indices, pos)
    np.testing.assert_allclose(video.times_s, np.array(pts)[pos] / 1000, atol=1e-6)
    assert (video.width, video.height, video.fps, video.codec) == (64, 48, 25.0, "h264")


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_synthetic_vfr_returns_the_frame_shown_at_each_time(tmp_path, backend):
    pts = [0, 40, 60, 300, 310, 320, 900, 1000, 1500, 1510, 2000]
    path = make_video(tmp_path / "vfr.mp4", pts)
    c = cfg(num_frames=10)
    video = decode_video(str(path), c, backend=backend)
    pos = expected_positions(np.array(pts) / 1000, sample_times(video.duration_s, c))
    assert [read_level(f, len(pts)) for f in video.frames] == pos.tolist()
    np.testing.assert_allclose(video.times_s, np.array(pts)[pos] / 1000, atol=1e-6)
    np.testing.assert_array_equal(video.indices, pos)


def test_synthetic_long_gop_seek_lands_on_the_right_frame(tmp_path):
    n = 40
    pts = [i * 250 for i in range(n)]  # 4 fps, 10 s, a keyframe every 8 frames
    path = make_video(tmp_path / "gop.mp4", pts, size=(32, 32), gop=8)
    c = cfg(num_frames=3)
    backend = PyAVBackend(S)
    info = backend.probe(str(path))
    targets = sample_times(info.duration_s, c)
    result = backend.read(str(path), targets, info)
    pos = expected_positions(np.array(pts) / 1000, targets)
    assert [read_level(f, n) for f in result.frames] == pos.tolist()
    np.testing.assert_array_equal(result.indices, pos)
    assert result.frames_decoded < n


def nearest_keyframe_positions(key_ms: list[int], targets: np.ndarray) -> list[int]:
    """Written out: for each target the keyframe at the least distance (the earlier on a tie), once each."""
    picked = {min(key_ms, key=lambda k: (abs(k / 1000 - t), k)) for t in targets}
    return sorted(picked)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # the MP4 index, or the packet scan
@pytest.mark.parametrize("sampling", [{"num_frames": 12}, {"sampling": "fps", "fps": 6.0}])
def test_keyframe_seek_returns_the_nearest_keyframes_at_their_true_times(tmp_path, backend, suffix, sampling):
    n, gop = 40, 8  # 1.6 s at 25 fps, a keyframe every 8 frames (0.32 s): a long GOP for 12 targets
    pts = [i * 40 for i in range(n)]
    path = make_video(tmp_path / f"gop{suffix}", pts, gop=gop)
    keys = [i for i in range(n) if i % gop == 0]
    exact = decode_video(str(path), cfg(**sampling), backend=backend)
    video = decode_video(str(path), cfg(seek="keyframe", **sampling), backend=backend)
    targets = sample_times(video.duration_s, cfg(**sampling))
    expected_keys = [pts.index(k) for k in nearest_keyframe_positions([pts[k] for k in keys], targets)]
    assert len(expected_keys) < len(exact.frames)  # fewer frames than exact: one per keyframe at most
    assert [read_level(f, n) for f in video.frames] == expected_keys
    assert set(expected_keys) <= set(keys)
    np.testing.assert_allclose(video.times_s, np.array(pts)[expected_keys] / 1000, atol=1e-6)  # true times
    np.testing.assert_array_equal(video.indices, expected_keys)
    assert (video.width, video.height, video.duration_s) == (exact.width, exact.height, exact.duration_s)


def test_keyframe_seek_decodes_only_keyframes(tmp_path):
    n, gop = 120, 30
    path = make_video(tmp_path / "long_gop.mp4", [i * 40 for i in range(n)], gop=gop)
    backend = PyAVBackend(S, seek="keyframe")
    info = backend.probe(str(path))
    result = backend.read(str(path), sample_times(info.duration_s, cfg(num_frames=32)), info)
    assert result.indices.tolist() == [0, 30, 60, 90]
    # each seek decodes its keyframe (the decoder may hold a frame or two of B-frame delay)
    assert result.frames_decoded is not None and result.frames_decoded <= 4 * 3
    exact = PyAVBackend(S).read(str(path), sample_times(info.duration_s, cfg(num_frames=32)), info)
    assert exact.frames_decoded is not None and exact.frames_decoded > 3 * result.frames_decoded


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize(("rotation", "corner"), [(-90, (0, -1)), (180, (-1, -1)), (90, (-1, 0))])
def test_synthetic_rotation_is_upright_in_both_backends(tmp_path, backend, rotation, corner):
    path = make_video(tmp_path / "rot.mp4", [i * 40 for i in range(6)], rotation=rotation, marker=True)
    video = decode_video(str(path), cfg(num_frames=2), backend=backend)
    assert video.rotation == (-rotation) % 360
    assert (video.width, video.height) == ((48, 64) if rotation % 180 else (64, 48))
    # the stored top-left marker ends where turning the picture clockwise by `rotation` puts it
    frame = video.frames[0].astype(int)
    r, c = (S // 8 if corner[0] == 0 else S - 1 - S // 8), (S // 8 if corner[1] == 0 else S - 1 - S // 8)
    assert frame[r, c, 0] > 200 and frame[r, c, 1] < 80, (frame[r, c], video.rotation)
    assert frame[S // 8, S // 8, 0] < 200 or corner == (0, 0)


def test_mpegts_times_start_at_the_stream_start(tmp_path):
    path = make_video(tmp_path / "clip.ts", [i * 40 for i in range(25)], fmt="mpegts")
    video = decode_video(str(path), cfg(num_frames=5), backend="pyav")
    assert video.times_s[0] == pytest.approx(0.08, abs=1e-6)  # mpegts starts at 1.4 s: reported from 0
    assert video.duration_s == pytest.approx(1.0, abs=0.05)


def test_single_frame_video(tmp_path):
    path = make_video(tmp_path / "one.mp4", [0])
    for backend in ("pyav", "decord"):
        video = decode_video(str(path), cfg(num_frames=8), backend=backend)
        assert video.frames.shape == (1, S, S, 3)
        np.testing.assert_array_equal(video.indices, [0])
        np.testing.assert_allclose(video.times_s, [0.0])


def make_long_audio_mkv(path: pathlib.Path) -> pathlib.Path:
    """1 s of video (25 frames) and 3 s of audio: the container duration is the audio's."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), grey_level(i, 25), np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        for i in range(48):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_video_shorter_than_the_container_is_sampled_over_its_own_span(tmp_path, backend):
    path = make_long_audio_mkv(tmp_path / "long_audio.mkv")
    assert PyAVBackend(S).probe(str(path)).duration_s > 3.0  # the container's (audio) duration
    video = decode_video(str(path), cfg(num_frames=5), backend=backend)
    assert video.duration_s == pytest.approx(1.0, abs=0.01)
    np.testing.assert_array_equal(video.indices, [2, 7, 12, 17, 22])
    assert [read_level(f, 25) for f in video.frames] == [2, 7, 12, 17, 22]


def test_fewer_frames_than_targets_returns_each_frame_once(tmp_path):
    path = make_clip(tmp_path / "mjpeg.avi", 12, size=(83, 75), codec="mjpeg", pix_fmt="yuvj420p")  # odd size
    video = decode_video(str(path), cfg(num_frames=64), backend="pyav")
    np.testing.assert_array_equal(video.indices, np.arange(12))
    assert [read_level(f, 12) for f in video.frames] == list(range(12))
    assert video.codec == "mjpeg" and (video.width, video.height) == (83, 75)


# ---------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def hostile(tmp_path):
    faststart = {"movflags": "faststart"}  # "moov" at the start
    real = make_clip(tmp_path / "faststart.mp4", 50, size=(160, 120), container_options=faststart).read_bytes()
    tail_moov = real_video("kinetics_armwrestling.mp4").read_bytes()  # "moov" at the end
    no_moov = bytearray(tail_moov)
    at = no_moov.find(b"moov")
    no_moov[at : at + 4] = b"xxxx"
    garbage = bytearray(tail_moov)  # every sample's bytes replaced, the index intact
    lo, hi = tail_moov.find(b"mdat") + 4, at - 4  # the mdat payload, up to the moov box
    garbage[lo:hi] = np.random.default_rng(1).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    mkv = (real_video("pancake_h264_opus.mkv")).read_bytes()
    files = {
        "empty.mp4": b"",
        "garbage_samples.mp4": bytes(garbage),
        "cut_half.mkv": mkv[: len(mkv) // 2],
        "random.mp4": np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes(),
        "text.mp4": b"This is a text file, not a video.\n" * 20,
        "cut_faststart.mp4": real[: int(len(real) * 0.3)],
        "cut_moov_at_end.mp4": tail_moov[: int(len(tail_moov) * 0.3)],
        "no_moov.mp4": bytes(no_moov),
        "cut_mkv.mkv": (real_video("pancake_h264_opus.mkv")).read_bytes()[:120],
    }
    files.update({  # text FFmpeg would open as a list of other inputs (a concat list refused as "unsafe")
        "concat_list.mp4": b"ffconcat version 1.0\nfile 'faststart.mp4'\n",
        "playlist.mp4": b"#EXTM3U\n#EXTINF:10,\nhttp://example.invalid/segment0.ts\n",
    })
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    make_audio_only(tmp_path / "audio_only.m4a")
    (tmp_path / "symlink_loop.mp4").symlink_to(tmp_path / "symlink_loop.mp4")
    return tmp_path


HOSTILE_REASONS = [
        ("empty.mp4", ErrorReason.EMPTY_FILE),
        ("random.mp4", ErrorReason.NOT_A_VIDEO),
        ("text.mp4", ErrorReason.NOT_A_VIDEO),
        ("cut_faststart.mp4", ErrorReason.TRUNCATED),
        ("cut_moov_at_end.mp4", ErrorReason.TRUNCATED),
        ("no_moov.mp4", ErrorReason.UNREADABLE_CONTAINER),
        ("cut_mkv.mkv", ErrorReason.UNREADABLE_CONTAINER),
        ("cut_half.mkv", ErrorReason.TRUNCATED),
        ("garbage_samples.mp4", ErrorReason.DECODE_FAILED),
        ("audio_only.m4a", ErrorReason.NO_VIDEO_STREAM),
        ("missing.mp4", ErrorReason.NOT_FOUND),
        ("concat_list.mp4", ErrorReason.NOT_A_VIDEO),
        ("playlist.mp4", ErrorReason.NOT_A_VIDEO),
        ("symlink_loop.mp4", ErrorReason.UNRESOLVABLE_PATH),
]


@pytest.mark.parametrize(("name", "reason"), HOSTILE_REASONS)
@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize("seek", ["exact", "keyframe"])
def test_hostile_input_reason(hostile, name, reason, backend, seek):
    with pytest.raises(DecodeError) as exc_info:
        decode_video(str(hostile / name), cfg(seek=seek), backend=backend)
    assert_error(exc_info, reason)


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(DecodeError) as exc_info:
        decode_video(str(tmp_path), cfg(), backend="pyav")
    assert_error(exc_info, ErrorReason.NOT_A_VIDEO)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_permission_denied(tmp_path):
    path = tmp_path / "locked.mp4"
    path.write_bytes(real_video("kinetics_armwrestling.mp4").read_bytes())
    path.chmod(0)
    with pytest.raises(DecodeError) as exc_info:
        decode_video(str(path), cfg(), backend="pyav")
    assert_error(exc_info, ErrorReason.PERMISSION_DENIED)


@pytest.mark.parametrize(
    ("limits", "reason", "text"),
    [
        ({"max_duration_s": 5.0}, ErrorReason.TOO_LONG, "limit is 5 s"),
        ({"max_bytes": 1000}, ErrorReason.TOO_LARGE, "bytes"),
        ({"max_pixels": 320 * 240}, ErrorReason.TOO_LARGE, "pixels"),
    ],
)
def test_limits_refuse_before_decoding(limits, reason, text):
    with pytest.raises(DecodeError) as exc_info:
        decode_video(str(real_video("kinetics_armwrestling.mp4")), cfg(**limits), backend="pyav")  # 10 s, 340x256
    assert_error(exc_info, reason)
    assert text in str(exc_info.value)


def test_too_long_without_container_duration_stops_the_packet_scan():
    with pytest.raises(DecodeError) as exc_info:
        decode_video(str(real_video("webm_noduration_vp9_opus.webm")), cfg(max_duration_s=2.0), backend="pyav")
    assert_error(exc_info, ErrorReason.TOO_LONG)


# ------------------------------------------------------------------------------------------- S3


def test_decode_from_s3_streams_with_pyav_and_downloads_for_decord(s3_bucket):
    fs, bucket, options = s3_bucket
    fs.put_file(str(real_video("kinetics_armwrestling.mp4")), f"{bucket}/v/clip.mp4")
    uri = f"s3://{bucket}/v/clip.mp4"
    local = decode_video(str(real_video("kinetics_armwrestling.mp4")), cfg(), backend="pyav")
    for backend in ("pyav", "decord"):
        remote = decode_video(uri, cfg(), options, backend=backend)
        np.testing.assert_allclose(remote.times_s, local.times_s)
        assert np.abs(remote.frames.astype(int) - local.frames.astype(int)).mean() < 4.0
    with pytest.raises(DecodeError) as exc_info:
        decode_video(f"s3://{bucket}/v/missing.mp4", cfg(), options, backend="pyav")
    assert_error(exc_info, ErrorReason.NOT_FOUND)
    with pytest.raises(DecodeError) as exc_info:
        decode_video(uri, cfg(max_bytes=1000), options, backend="decord")
    assert_error(exc_info, ErrorReason.TOO_LARGE)


def test_stage_reads_s3_in_the_isolated_child(s3_bucket, tmp_path):
    fs, bucket, options = s3_bucket
    fs.put_file(str(make_clip(tmp_path / "hevc.mp4", 20, codec="libx265")), f"{bucket}/hevc.mp4")
    stage = DecodeStage(cfg(), options)
    ok = stage.decode_row({Col.VIDEO_URI: f"s3://{bucket}/hevc.mp4"})
    assert ok[Col.STATUS] == STATUS_OK, ok[Col.ERROR_DETAIL]
    assert ok[Col.FRAMES].shape == (8, S, S, 3) and ok[Col.CODEC] == "hevc"
    missing = stage.decode_row({Col.VIDEO_URI: f"s3://{bucket}/nope.mp4"})
    assert missing[Col.STATUS] == STATUS_ERROR and missing[Col.ERROR_REASON] == ErrorReason.NOT_FOUND


# ------------------------------------------------------------------------------------ the stage


def test_stage_declares_columns():
    stage = DecodeStage(cfg(num_cpus=0.5), None)
    assert Col.VIDEO_URI in stage.reads
    assert {Col.FRAMES, Col.STATUS, Col.ERROR_REASON, Col.ERROR_DETAIL, Col.DECODE_S}.issubset(stage.writes)


def test_stage_ok_row():
    stage = DecodeStage(cfg(), None)
    row = stage.decode_row({Col.VIDEO_ID: "v1", Col.VIDEO_URI: str(real_video("iphone4s_rot90.mov"))})
    assert row[Col.STATUS] == STATUS_OK and row[Col.ERROR_REASON] is None and row[Col.ERROR_DETAIL] is None
    assert row[Col.VIDEO_ID] == "v1"
    assert row[Col.FRAMES].shape == (8, S, S, 3) and row[Col.FRAMES].dtype == np.uint8
    assert row[Col.FRAME_TIMES_S].dtype == np.float64 and row[Col.FRAME_INDICES].dtype == np.int64
    assert (row[Col.WIDTH], row[Col.HEIGHT], row[Col.ROTATION]) == (320, 568, 90)
    assert row[Col.DECODE_BACKEND] == "pyav" and row[Col.CODEC] == "h264"
    assert row[Col.DECODE_S] > 0
    assert set(DecodeStage.writes).issubset(row)


def test_stage_error_row_keeps_the_schema(hostile):
    stage = DecodeStage(cfg(), None)
    row = stage.decode_row({Col.VIDEO_URI: str(hostile / "text.mp4")})
    assert row[Col.STATUS] == STATUS_ERROR and row[Col.ERROR_REASON] == ErrorReason.NOT_A_VIDEO
    assert type(row[Col.ERROR_REASON]) is str and row[Col.ERROR_DETAIL].startswith("text, not media: ")
    assert row[Col.FRAMES].shape == (0, S, S, 3) and row[Col.FRAMES].dtype == np.uint8
    assert row[Col.FRAME_TIMES_S].shape == (0,) and row[Col.FRAME_INDICES].dtype == np.int64
    assert set(DecodeStage.writes).issubset(row)


def test_stage_error_row_reports_what_the_probe_learned():
    stage = DecodeStage(cfg(max_duration_s=5.0), None)
    row = stage.decode_row({Col.VIDEO_URI: str(real_video("kinetics_armwrestling.mp4"))})
    assert row[Col.ERROR_REASON] == ErrorReason.TOO_LONG and "limit is 5 s" in row[Col.ERROR_DETAIL]
    assert row[Col.DURATION_S] == pytest.approx(10.0) and row[Col.WIDTH] == 340


def test_stage_passes_error_rows_through():
    stage = DecodeStage(cfg(), None)
    row = {Col.VIDEO_URI: str(real_video("mpeg4_mp3.avi")), Col.STATUS: STATUS_ERROR,
           Col.ERROR_REASON: "read_failed", Col.ERROR_DETAIL: "listing: x"}
    out = stage.decode_row(row)
    assert out[Col.STATUS] == STATUS_ERROR
    assert (out[Col.ERROR_REASON], out[Col.ERROR_DETAIL]) == ("read_failed", "listing: x")
    assert out[Col.FRAMES].shape == (0, S, S, 3)


def test_stage_row_without_uri_is_an_error_row():
    row = DecodeStage(cfg(), None).decode_row({Col.VIDEO_ID: "v"})
    assert row[Col.STATUS] == STATUS_ERROR and row[Col.ERROR_REASON] == ErrorReason.NOT_FOUND
    assert Col.VIDEO_URI in row[Col.ERROR_DETAIL]


def test_stage_falls_back_to_the_other_backend():
    stage = DecodeStage(cfg(backend="decord"), None)
    row = stage.decode_row({Col.VIDEO_URI: str(real_video("webm_noduration_vp9_opus.webm"))})
    assert row[Col.STATUS] == STATUS_OK, row[Col.ERROR_DETAIL]
    assert row[Col.DECODE_BACKEND] == "pyav"


def test_stage_timeout_becomes_an_error_row_after_retries_and_fallback():
    stage = DecodeStage(cfg(timeout_s=0.001, retries=1), None)
    row = stage.decode_row({Col.VIDEO_URI: str(real_video("kinetics_armwrestling.mp4"))})
    assert row[Col.STATUS] == STATUS_ERROR
    assert row[Col.ERROR_REASON] == ErrorReason.TIMEOUT
    detail = row[Col.ERROR_DETAIL]
    assert "pyav: timeout: " in detail and "decord: timeout: " in detail and "(x2)" in detail


def test_a_reason_the_other_backend_would_repeat_stops_the_stage_at_once(hostile):
    # not_a_video is decided by the shared probe: decord is not tried after PyAV
    row = DecodeStage(cfg(), None).decode_row({Col.VIDEO_URI: str(hostile / "random.mp4")})
    assert row[Col.ERROR_REASON] == ErrorReason.NOT_A_VIDEO and "decord" not in row[Col.ERROR_DETAIL]
    assert ErrorReason.NOT_A_VIDEO.same_for_every_backend and not ErrorReason.DECODE_FAILED.same_for_every_backend
