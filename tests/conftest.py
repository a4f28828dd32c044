"""Shared fixtures: a real local S3 server (moto) for code that reads and writes through fsspec."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free local port for the whole session; yields its endpoint URL.

    Dummy credentials go into the environment (botocore refuses to sign without any). Callers pass
    the endpoint in storage options as {"client_kwargs": {"endpoint_url": ...}}, never region_name
    (bucket creation fails against moto with it)."""
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh empty bucket; yields (fs, bucket_name, storage_options) with an s3fs filesystem that
    bypasses the fsspec instance cache."""
    import s3fs

    storage_options = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket, storage_options
    fs.rm(bucket, recursive=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> dict[str, str]:
    """The demo's tiny offline models (tokenizer + LlavaOnevision, open_clip), built once."""
    from jobs.cli import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session; 4 logical CPUs so fractional stages never starve on 2 cores.
    A start that times out (Ray 2.60 gives the raylet a fixed 30 s to register, which a loaded
    2-core machine can miss) is tried once more."""
    import ray

    try:
        ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    except Exception:  # noqa: BLE001 - Ray raises a bare Exception for the startup timeout
        ray.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_onevision_dir(tmp_path_factory):
    """A tiny random LlavaOnevision checkpoint (onevision token layout), built once per session.
    Imported lazily: the CUDA tests run where only torch and transformers exist."""
    from freemoref.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_onevision"), layout="onevision", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_vid_dir(tmp_path_factory):
    """The same, with the llava_vid token layout."""
    from freemoref.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_llava_vid"), layout="llava_vid", seed=0)
