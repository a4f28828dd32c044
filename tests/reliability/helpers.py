"""Shared pieces of the reliability tests: a job on the tiny models, hostile corpora (the repository's
real test videos plus synthetic and damaged files, and the extra corpus's when present), row
accounting, and process helpers for fault injection."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import signal
import socket
import time

import numpy as np

from pipeline.config import JobConfig, parse_job_config
from pipeline.schema import Col
from pipeline.store.output_store import OutputStore
from tests.media import make_audio_only, make_clip
from tests.paths import available, video

NUM_FRAMES = 16  # candidate frames decoded per video
PER_QUESTION = 8  # frames each question sees
OK = "ok"
PROMPTS = [{"question_id": "caption", "question": "Describe the video."},
           {"question_id": "count", "question": "How many people are there?"}]

TINY: dict[str, str] = {}  # filled by the tiny_models fixture (tests/reliability/conftest.py)


def job_dict(output: str, *, videos=None, manifest=None, questions_file=None, storage=None,
             run_id="rel", decode=None, answer=None, output_opts=None, ray=None, planning="auto") -> dict:
    """A job on the tiny models with small frames; every knob that matters here can be overridden."""
    storage = storage or {}
    data = {
        "run_id": run_id,
        "input": {"storage": storage, "planning": planning,
                  **({"videos": videos} if videos else {"manifest": manifest})},
        "questions": {"prompts": PROMPTS, **({"file": questions_file} if questions_file else {})},
        "decode": {"num_frames": NUM_FRAMES, "frame_size": 32, "num_cpus": 0.5, "timeout_s": 120,
                   **(decode or {})},
        "guidance": {"model": TINY["clip"], "pretrained": None, "frames_per_question": PER_QUESTION,
                     "num_cpus": 0.25, "num_gpus": 0},
        "answer": {"model": TINY["llava"], "max_new_tokens": 4, "num_cpus": 0.5, "num_gpus": 0,
                   "moref": {"temporal_units": 4, "references": 2}, **(answer or {})},
        "output": {"path": output, "storage": storage, **(output_opts or {})},
    }
    if ray:
        data["ray"] = ray
    return data


def job(output: str, **kwargs) -> JobConfig:
    return parse_job_config(job_dict(output, **kwargs))


def rows_of(cfg: JobConfig) -> list[dict]:
    return OutputStore(cfg.output).read_answers().to_pylist()


def pairs_of(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["video_id"], r["question_id"]) for r in rows]


def assert_exactly_once(rows: list[dict], expected: set[tuple[str, str]]) -> None:
    counts = collections.Counter(pairs_of(rows))
    dupes = {p: n for p, n in counts.items() if n > 1}
    assert not dupes, f"pairs written more than once: {dupes}"
    missing, extra = expected - set(counts), set(counts) - expected
    assert not missing and not extra, f"missing {sorted(missing)}; unexpected {sorted(extra)}"


def check_rows(rows: list[dict], expected_status: dict[str, str]) -> None:
    """Each video's rows are ok or an error with exactly the expected reason."""
    problems = []
    for r in rows:
        want = expected_status[r["video_id"]]
        if want == OK:
            if r["status"] != "ok" or r["answer"] is None or r[Col.ERROR_REASON] or r[Col.ERROR_DETAIL]:
                problems.append(f"{r['video_id']}/{r['question_id']}: wanted ok, got {r['status']}: "
                                f"{r[Col.ERROR_REASON]}: {r[Col.ERROR_DETAIL]}")
                continue
            n = r["frames_decoded"]
            times = r["frame_times_s"]
            if not (1 <= n <= NUM_FRAMES and len(r["frame_indices"]) == min(n, PER_QUESTION)
                    and all(b > a for a, b in zip(times, times[1:])) and times[0] >= 0):
                problems.append(f"{r['video_id']}: bad frames {n} {r['frame_indices']} {times}")
        else:
            if (r["status"] != "error" or r[Col.ERROR_REASON] != want or not r[Col.ERROR_DETAIL]
                    or r["answer"] is not None):
                problems.append(f"{r['video_id']}/{r['question_id']}: wanted {want}, got {r['status']}: "
                                f"{r[Col.ERROR_REASON]}: {r[Col.ERROR_DETAIL]}")
    assert not problems, "\n".join(problems)


def expected_reasons(rows: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(r[Col.ERROR_REASON] for r in rows if r["status"] == "error"))


# ------------------------------------------------------------------------------- synthetic videos


def make_video(path: pathlib.Path, n: int, size=(64, 48), pix_fmt="yuv420p", rate=25) -> pathlib.Path:
    """n frames of H.264 whose grey level encodes the frame index."""
    return make_clip(path, n, size=size, pix_fmt=pix_fmt, pts_ms=[round(i * 1000 / rate) for i in range(n)])


# Decode limits for the hostile corpus: "too_large" (1600x1300) and "too_long" (101 s), and from the
# extra corpus vfr_screenrec.mp4 (3026x1386) and long_room_139s.mp4 (139 s), exceed them; every other
# video is within them.
HOSTILE_LIMITS = {"max_pixels": 2_000_000, "max_duration_s": 100.0}


def build_hostile_corpus(root: pathlib.Path) -> dict[str, tuple[str | None, str]]:
    """Write the corpus under root; returns {video_id: (file path or None if missing, expected)} where
    expected is 'ok' or the error reason. Video ids are chosen to be hostile as file names."""
    root.mkdir(parents=True, exist_ok=True)
    faststart = make_faststart(root / "faststart.mp4").read_bytes()  # 'moov' first
    tail_moov = video("kinetics_armwrestling.mp4").read_bytes()  # 'moov' last
    no_moov = bytearray(tail_moov)
    at = no_moov.find(b"moov")
    no_moov[at : at + 4] = b"xxxx"
    garbage = bytearray(tail_moov)  # every sample's bytes random, the index intact
    lo, hi = tail_moov.find(b"mdat") + 4, at - 4
    garbage[lo:hi] = np.random.default_rng(1).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    damaged = {
        "empty.mp4": (b"", "empty_file"),
        "random_bytes.mp4": (np.random.default_rng(0).bytes(50_000), "not_a_video"),
        "notes.mp4": (b"This is a text file, not a video.\n" * 20, "not_a_video"),
        "cut_in_half.mp4": (faststart[: len(faststart) // 3], "truncated"),
        "no_moov.mp4": (bytes(no_moov), "unreadable_container"),
        "garbage_samples.mp4": (bytes(garbage), "decode_failed"),
    }
    corpus: dict[str, tuple[str | None, str]] = {}
    for name, (data, want) in damaged.items():
        (root / name).write_bytes(data)
        corpus[name] = (str(root / name), want)
    wants = {
        "iphone4s_rot90.mov": OK,  # rotated 90, audio is stream 0
        "webm_noduration_vp9_opus.webm": OK,  # no container duration: decord cannot, PyAV can
        "nasa_multistream.mp4": OK,  # two video streams: FFmpeg's best stream is read
        # the extra corpus's, when present
        "fire_vfr_rot180.mp4": OK,  # variable frame rate, rotated 180
        "h264_yuv444_openfield.mp4": OK,  # 4:4:4, 77 s
        "mjpeg_mouse_12f.avi": OK,  # 12 frames, fewer than the 16 asked for
        "vfr_screenrec.mp4": "too_large",  # 3026x1386 > max_pixels
        "long_room_139s.mp4": "too_long",  # 139 s > max_duration_s
    }
    for name in available(*wants):
        corpus[name] = (str(video(name)), wants[name])
    mjpeg = make_clip(root / "mjpeg.avi", 12, size=(83, 75), codec="mjpeg", pix_fmt="yuvj420p")
    corpus["mjpeg 12 frames.avi"] = (str(mjpeg), OK)  # fewer frames than the 16 asked for
    corpus["too_large.mp4"] = (str(make_clip(root / "large.mp4", 3, size=(1600, 1300))), "too_large")
    corpus["too_long.mp4"] = (str(make_clip(root / "long.mp4", 3, pts_ms=[0, 50_000, 101_000])), "too_long")
    corpus["../../etc/one frame.mp4"] = (str(make_video(root / "one_frame.mp4", 1)), OK)
    corpus["odd 33x17 yuv444.mp4"] = (str(make_video(root / "odd.mp4", 10, size=(33, 17), pix_fmt="yuv444p")), OK)
    corpus["/abs/audio_only.m4a"] = (str(make_audio_only(root / "audio_only.m4a")), "no_video_stream")
    (root / "a_directory.mp4").mkdir(exist_ok=True)
    corpus["a_directory.mp4"] = (str(root / "a_directory.mp4"), "not_a_video")
    corpus["missing.mp4"] = (str(root / "missing.mp4"), "not_found")
    return corpus


def make_faststart(path: pathlib.Path) -> pathlib.Path:
    """An MP4 whose index ('moov') comes before its samples, as streaming encoders write it."""
    return make_clip(path, 50, size=(160, 120), container_options={"movflags": "faststart"})


def write_manifest(path: pathlib.Path, corpus: dict[str, tuple[str | None, str]]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"video_id": vid, "video_uri": uri}) + "\n" for vid, (uri, _) in corpus.items()))
    return path


# -------------------------------------------------------------------------------------- processes


def children_of(pid: int) -> list[int]:
    """All descendants of pid (from /proc)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[ppid].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace").strip()
    except OSError:
        return ""


def my_ray_processes(prefix: str) -> list[int]:
    """Processes of this test session's Ray (descendants of this process) whose title starts with prefix."""
    return [p for p in children_of(os.getpid()) if title(p).startswith(prefix)]


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def process_group(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            # a process may exit (or be out of reach) between listing and asking
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
    return out


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ------------------------------------------------------------------------ a restartable S3 server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def stop_moto(server) -> None:
    server.stop()
    server._server.server_close()  # stop() leaves the socket listening: clients would hang, not fail
