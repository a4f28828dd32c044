"""The decode stage: `decode_video` for one video with one backend, and `DecodeStage`, the per-row
policy around it (isolated child process, timeout, retries, fallback backend, error rows).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import av
import numpy as np

from pipeline.config import DecodeBackendChoice, DecodeConfig, StorageConfig
from pipeline.errors import ErrorReason
from pipeline.schema import STATUS_ERROR, STATUS_OK, Col
from pipeline.stages.decode import isolation
from pipeline.stages.decode.backend import Backend, Limits
from pipeline.stages.decode.container import ends_early, raise_if_cut_short
from pipeline.stages.decode.decord_backend import DecordBackend
from pipeline.stages.decode.errors import DecodeError
from pipeline.stages.decode.nvdec_backend import NvdecBackend
from pipeline.stages.decode.pyav_backend import PyAVBackend
from pipeline.stages.decode.sampling import sample_times
from pipeline.stages.decode.source import is_local, open_source, storage_error

BACKENDS = tuple(b for b in get_args(DecodeBackendChoice) if b != "auto")
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


def make_backend(name: str, cfg: DecodeConfig) -> Backend:
    threads = max(1, int(cfg.num_cpus))
    if name == "pyav":
        return PyAVBackend(cfg.frame_size, threads, cfg.seek)
    if name == "decord":
        return DecordBackend(cfg.frame_size, threads, cfg.seek)
    if name == "nvdec":
        return NvdecBackend(cfg.frame_size, cfg.seek)
    raise ValueError(f"unknown decode backend {name!r}; expected one of {BACKENDS}")


def backend_order(backend: str) -> tuple[str, str]:
    """The backend to try first and the fallback (PyAV, for decord and nvdec)."""
    if backend == "auto":
        return AUTO_ORDER
    return (backend, next(b for b in BACKENDS if b != backend))


@dataclass
class DecodedVideo:
    """The sampled frames of one video and its metadata: what `decode_video` returns."""

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
            if ends_early(result, targets, info):
                # Either data is missing, or the container's duration covers a longer audio or
                # subtitle stream: then sample the video's own span (a second pass, rare).
                ended_s = raise_if_cut_short(src, result, info)
                info = dataclasses.replace(info, duration_s=ended_s, duration_source="decoded")
                result = impl.read(src, sample_times(info.duration_s, cfg), info)
    except Exception as exc:  # noqa: BLE001 - classified below
        failure = exc
    io_error = getattr(src, "error", None)
    if io_error is not None:
        # the storage failed under the decoder: whatever FFmpeg concluded (EOF, bad data), the file
        # was not read, so this is a storage error (retried), never a verdict on the file
        raise storage_error(uri, io_error) from None
    if failure is not None:
        if isinstance(failure, DecodeError):
            raise failure
        if isinstance(failure, av.FFmpegError):
            raise DecodeError(ErrorReason.DECODE_FAILED, f"{type(failure).__name__}: {failure}") from None
        if isinstance(failure, (OSError, PermissionError, FileNotFoundError)):
            raise storage_error(uri, failure) from None
        raise failure
    if not len(result.frames):
        if result.errors:
            raise DecodeError(
                ErrorReason.DECODE_FAILED,
                f"no frame decodes ({result.errors} errors, last: {result.last_error})",
                info,
            )
        raise DecodeError(ErrorReason.NO_FRAMES, "no frame at any sampled time", info)
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
        raise DecodeError(ErrorReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}") from None


# the forkserver imports the package (every backend) once, not each isolated child
isolation.add_preload("pipeline.stages.decode")


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

    reads: ClassVar[Mapping[str, str]] = {
        Col.VIDEO_URI: "the file or object to decode (local path or fsspec URL)",
    }
    optional_reads = (Col.STATUS,)  # rows already in error pass through
    keeps_input_columns = True
    writes: ClassVar[Sequence[str]] = (
        Col.FRAMES, Col.FRAME_TIMES_S, Col.FRAME_INDICES, Col.WIDTH, Col.HEIGHT, Col.FPS,
        Col.DURATION_S, Col.ROTATION, Col.CODEC, Col.DECODE_BACKEND, Col.DECODE_S, Col.STATUS,
        Col.ERROR_REASON, Col.ERROR_DETAIL,
    )  # fmt: skip

    def __init__(self, cfg: DecodeConfig, storage_options: dict | None = None, storage: StorageConfig | None = None):
        """`storage_options`: fsspec options for every object URL; or `storage`, whose options
        are chosen per row by the URL's protocol (an archive may mix local paths and stores)."""
        self.cfg = cfg
        self.storage_options = storage_options or None
        self.storage = storage
        if cfg.backend == "nvdec":
            isolation.add_preload("torch")  # imported once by the forkserver; CUDA starts in each child

    def __call__(self, rows: list[dict]) -> list[dict]:
        return [self.decode_row(row) for row in rows]

    def _options_for(self, uri: str) -> dict | None:
        if self.storage is None:
            return self.storage_options
        return self.storage.fsspec_options(uri.split("://", 1)[0] if "://" in uri else "file") or None

    def decode_row(self, row: dict) -> dict:
        out = dict(row)
        if out.get(Col.STATUS) == STATUS_ERROR:
            for key, value in _empty_decode_columns(self.cfg.frame_size).items():
                out.setdefault(key, value)
            return out
        started = time.perf_counter()
        uri = out.get(Col.VIDEO_URI)
        if isinstance(uri, str) and uri:
            result = self.decode(uri, None if is_local(uri) else self._options_for(uri))
        else:
            result = DecodeError(ErrorReason.NOT_FOUND, f"row has no {Col.VIDEO_URI}")
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
                    Col.ERROR_REASON: None,
                    Col.ERROR_DETAIL: None,
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
            out[Col.ERROR_REASON] = result.reason.value
            out[Col.ERROR_DETAIL] = result.detail
        out[Col.DECODE_S] = time.perf_counter() - started
        return out

    def decode(self, uri: str, storage_options: dict | None) -> DecodedVideo | DecodeError:
        """The policy: each backend in order, isolated; crashes and timeouts are retried
        `cfg.retries` times; storage failures (read_failed) `cfg.read_retries` times with
        exponential backoff (the other backend reads from the same storage, so it is not tried);
        reasons the other backend would repeat (`ErrorReason.same_for_every_backend`) stop at once."""
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
                    if exc.reason == ErrorReason.READ_FAILED and read_failures < self.cfg.read_retries:
                        time.sleep(min(READ_RETRY_MAX_WAIT_S, READ_RETRY_FIRST_WAIT_S * 2**read_failures))
                        read_failures += 1
                        continue  # the storage may be back: same backend, not counted as a crash retry
                    break  # deterministic: the same backend would fail again
                except isolation.IsolatedTimeout as exc:
                    failures.append((backend, DecodeError(ErrorReason.TIMEOUT, str(exc))))
                except isolation.IsolatedCrash as exc:
                    failures.append((backend, DecodeError(ErrorReason.CRASHED, str(exc))))
                except Exception as exc:  # noqa: BLE001 - e.g. the child could not be started
                    failures.append(
                        (backend, DecodeError(ErrorReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
                    )
                    break
                attempt += 1
            if failures[-1][1].reason.same_for_every_backend:
                break
        return _summarise(failures)


def _summarise(failures: list[tuple[str, DecodeError]]) -> DecodeError:
    """One error for the row: the first failure that says something about the file ("unsupported"
    only says a backend could not try), with every backend's outcome in the detail."""
    main_backend, main = next(((b, e) for b, e in failures if e.reason != ErrorReason.UNSUPPORTED), failures[0])
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
