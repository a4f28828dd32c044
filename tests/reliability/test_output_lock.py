"""One job per output path: the lease in <output>/_lock.json refuses a second holder while it is
renewed and is taken over once it expired, on a local disk and on S3 (moto, conditional writes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.config import OutputConfig, StorageConfig
from pipeline.store.output_lock import LOCK_FILE, OutputLease, OutputLockedError
from pipeline.store.output_store import OutputStore


def _stores(tmp_path, s3_bucket, which):
    if which == "local":
        return OutputStore(OutputConfig(path=str(tmp_path / "out")))
    fs, bucket, options = s3_bucket
    storage = StorageConfig(endpoint_url=options["client_kwargs"]["endpoint_url"])
    return OutputStore(OutputConfig(path=f"s3://{bucket}/out", storage=storage))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    s3 = request.getfixturevalue("s3_bucket") if request.param == "s3" else None
    return _stores(tmp_path, s3, request.param)


def test_a_second_job_is_refused_while_the_first_holds_the_lease(store):
    with OutputLease(store, ttl_s=6, run_id="first"):
        with pytest.raises(OutputLockedError, match="in use by another job: run 'first'"):
            OutputLease(store, ttl_s=6, run_id="second").acquire()
        time.sleep(7)  # past the ttl: the heartbeat (every 2 s) has kept it alive
        with pytest.raises(OutputLockedError):
            OutputLease(store, ttl_s=6, run_id="second").acquire()
    # released: the next job takes it at once
    with OutputLease(store, ttl_s=6, run_id="third"):
        lease = json.loads(store.fs.cat_file(store.path(LOCK_FILE)))
        assert lease["run_id"] == "third" and {"host", "pid", "expires_at"} <= set(lease)
    store._invalidate()
    assert not store.fs.exists(store.path(LOCK_FILE))


def test_an_expired_lease_of_a_crashed_job_is_taken_over(store):
    crashed = OutputLease(store, ttl_s=5, run_id="crashed")
    crashed._exchange(renew=False)  # taken, then the driver dies: no heartbeat, no release
    with pytest.raises(OutputLockedError):
        OutputLease(store, ttl_s=5, run_id="next").acquire()
    time.sleep(5.5)
    with OutputLease(store, ttl_s=5, run_id="next") as lease:
        assert json.loads(store.fs.cat_file(store.path(LOCK_FILE)))["holder"] == lease.holder
        # the crashed job, were it only paused, finds it lost at its next renewal
        with pytest.raises(OutputLockedError):
            crashed._exchange(renew=True)


def test_the_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(store):
    killed = OutputLease(store, ttl_s=300, run_id="killed")
    killed._exchange(renew=False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process of this host that has exited: the lease as a killed driver left it
    lease = json.loads(store.fs.cat_file(store.path(LOCK_FILE)))
    store.fs.pipe_file(store.path(LOCK_FILE), json.dumps({**lease, "pid": child.pid}).encode())
    with OutputLease(store, ttl_s=300, run_id="next") as taken:
        assert json.loads(store.fs.cat_file(store.path(LOCK_FILE)))["holder"] == taken.holder
    # a lease of a live process elsewhere (another pid namespace or host) still waits for its expiry
    store.fs.pipe_file(store.path(LOCK_FILE), json.dumps({**lease, "pid": child.pid, "pid_scope": "x:1"}).encode())
    with pytest.raises(OutputLockedError):
        OutputLease(store, ttl_s=300, run_id="next").acquire()


def test_of_two_jobs_racing_for_a_free_output_exactly_one_wins(store):
    import concurrent.futures

    leases = [OutputLease(store, ttl_s=30, run_id=f"job{i}") for i in range(4)]

    def take(lease):
        try:
            lease._exchange(renew=False)
            return lease.run_id
        except OutputLockedError:
            return None

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        winners = [w for w in pool.map(take, leases) if w]
    assert len(winners) == 1
    assert json.loads(store.fs.cat_file(store.path(LOCK_FILE)))["run_id"] == winners[0]
