"""Storage failures are told apart from bad files and retried: a read that fails half-way through a
video is `read_failed` (never `truncated` or `decode_failed`, whatever FFmpeg made of it), and an
output write waits out a storage restart."""

from __future__ import annotations

import logging
import threading
import time

import fsspec
import pyarrow as pa
import pytest
from botocore.exceptions import EndpointConnectionError
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import DecodeConfig, OutputConfig
from pipeline.errors import ErrorReason
from pipeline.schema import STATUS_ERROR, Col
from pipeline.stages.decode import DecodeError, DecodeStage, decode_video
from pipeline.store.output_store import OutputStore
from tests.paths import video
from tests.reliability.helpers import free_port, start_moto, stop_moto


class _FailingFile:
    """A file that raises what botocore raises when the endpoint goes away, after `budget` bytes."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def read(self, n=-1):
        if self.f.tell() >= self.budget:
            raise EndpointConnectionError(endpoint_url="http://storage.invalid")
        return self.f.read(n if n >= 0 else self.budget - self.f.tell())

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class FlakyFS(LocalFileSystem):
    """Local files whose reads fail part-way: a stand-in for an object store that drops out."""

    protocol = "flaky"
    fraction = 0.5

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode=mode)
        return _FailingFile(f, int(self.size(path) * self.fraction))

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "", 1))


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_storage_failure_during_a_read_is_read_failed(fraction, backend, monkeypatch):
    monkeypatch.setattr(FlakyFS, "fraction", fraction)
    uri = f"flaky://{video('kinetics_armwrestling.mp4')}"  # 'moov' at the end: read last
    with pytest.raises(DecodeError) as info:
        decode_video(uri, DecodeConfig(num_frames=8, frame_size=32), {}, backend=backend)
    assert info.value.reason == ErrorReason.READ_FAILED, str(info.value)
    assert "EndpointConnectionError" in str(info.value)


def test_read_failed_is_retried_then_reported(monkeypatch):
    import pipeline.stages.decode.stage as decode_stage

    monkeypatch.setattr(decode_stage, "READ_RETRY_FIRST_WAIT_S", 0.01)
    # in this process: the isolated child would not know the test's 'flaky' protocol
    monkeypatch.setattr(decode_stage.isolation, "run_isolated", lambda fn, *args, timeout_s, **kw: fn(*args, **kw))
    stage = DecodeStage(DecodeConfig(num_frames=8, frame_size=32, read_retries=2), {})
    row = stage.decode_row({Col.VIDEO_URI: f"flaky://{video('kinetics_armwrestling.mp4')}"})
    # three attempts with the first backend; the second backend reads the same storage: not tried
    assert row[Col.STATUS] == STATUS_ERROR and row[Col.ERROR_REASON] == ErrorReason.READ_FAILED
    assert "(x3)" in row[Col.ERROR_DETAIL] and "decord" not in row[Col.ERROR_DETAIL]


def test_output_write_waits_out_a_storage_restart(s3_server, tmp_path, monkeypatch):
    # botocore alone retries a refused connection for about 8 s: make it give up at once, so the
    # outage outlasts it as a longer one would outlast its default retries
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_moto(port)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("moref_index")
    logger.addHandler(handler)
    try:
        storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        store = OutputStore(OutputConfig(path="s3://write-restart/out", storage=storage))
        store.fs.mkdir("write-restart")
        stop_moto(server)
        restarted = []
        timer = threading.Timer(2.5, lambda: restarted.append(start_moto(port)))
        timer.start()
        started = time.monotonic()
        path = store.write_table(pa.table({"x": [1, 2, 3]}), "answers", "v-1.parquet")
        waited = time.monotonic() - started
        timer.join()
        server = restarted[0]
        assert waited > 2.0
        assert store.fs.cat(path)[:4] == b"PAR1" and store.list_files("answers") == [path]
        assert any("writing" in m and "retry 1 of" in m for m in seen), seen
    finally:
        logger.removeHandler(handler)
        stop_moto(server)
