"""One job per output path: a lease in `<output>/_lock.json`.

The lease holds {holder, run_id, host, pid, acquired_at, expires_at}. A job takes it before touching
the output and a heartbeat thread renews it every ttl/3; a second job finds it unexpired and stops
at once, naming the holder. A lease nobody renewed for `output.lock_ttl_s` (a driver killed
without releasing it) is taken over, so a crash never blocks the output for longer than the ttl.

The read-check-write is atomic where the store allows: on S3 (and stores speaking its conditional
writes, moto included) the lease is created with If-None-Match: * and renewed or taken over with
If-Match on the ETag read, so of two jobs racing for it exactly one wins. On a local disk the
exchange runs under an fcntl lock of `_lock.mutex` beside it (one host; NFS locks are not trusted
here). Other stores (GCS, Azure through fsspec) get a plain write followed by a re-read: two jobs
starting within the same second could both believe they hold it; there, start jobs one at a time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger("moref_index")

LOCK_FILE = "_lock.json"


class OutputLockedError(RuntimeError):
    """Another job holds the output's lease."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def _pid_scope() -> str | None:
    """Where a pid means one process: this kernel's boot and pid namespace (None if unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _holder_is_dead(lease: dict) -> bool:
    """The lease was written by a process of this host and pid namespace that no longer exists (a
    killed driver): the next run need not wait for its expiry. A reused pid only makes it wait."""
    scope, pid = lease.get("pid_scope"), lease.get("pid")
    if scope is None or scope != _pid_scope() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class OutputLease:
    """The lease of one output (`OutputStore`); a context manager that renews it while held."""

    def __init__(self, store, ttl_s: float, run_id: str):
        self.store, self.ttl_s, self.run_id = store, ttl_s, run_id
        self.holder = uuid.uuid4().hex
        self.path = store.path(LOCK_FILE)
        protocols = store.fs.protocol if isinstance(store.fs.protocol, (tuple, list)) else (store.fs.protocol,)
        self._s3 = any(p in ("s3", "s3a") for p in protocols)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost while held, if it was

    # ---- the exchange

    def _payload(self) -> bytes:
        now = _now()
        return json.dumps({"holder": self.holder, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "pid_scope": _pid_scope(), "acquired_at": _iso(now),
                           "expires_at": now + self.ttl_s,
                           "expires_at_utc": _iso(now + self.ttl_s)}, indent=2).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """The current lease and its ETag (None, None when there is none)."""
        self.store._invalidate()
        try:
            info = self.store.fs.info(self.path)
            data = self.store.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            lease = json.loads(data)
        except ValueError:
            lease = {"holder": "?", "expires_at": 0}  # unreadable: treat as expired
        return lease, info.get("ETag") or info.get("etag")

    def _exchange(self, renew: bool) -> None:
        """Write our lease if the output is free, expired, or (renew) already ours."""
        if self.store._local:
            self.store.fs.makedirs(self.store.root, exist_ok=True)
            with open(f"{self.path[: -len(LOCK_FILE)]}_lock.mutex", "a") as mutex:
                fcntl.flock(mutex, fcntl.LOCK_EX)
                try:
                    self._check(self._read()[0], renew)
                    tmp = f"{self.path}.{self.holder}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(self._payload())
                    os.replace(tmp, self.path)
                finally:
                    fcntl.flock(mutex, fcntl.LOCK_UN)
            return
        lease, etag = self._read()
        self._check(lease, renew)
        if self._s3:
            condition = {"IfMatch": etag} if lease is not None and etag else {"mode": "create"}
            try:
                self.store.fs.pipe_file(self.path, self._payload(), **condition)
            except Exception as exc:  # noqa: BLE001 - s3fs reports a failed precondition as various types
                now, _ = self._read()
                holder = (now or {}).get("holder")
                if holder != self.holder:
                    raise OutputLockedError(self._message(now)) from exc
        else:
            self.store.fs.pipe_file(self.path, self._payload())
        now, _ = self._read()
        if (now or {}).get("holder") != self.holder:
            raise OutputLockedError(self._message(now))

    def _check(self, lease: dict | None, renew: bool) -> None:
        if lease is None:
            if renew:
                log.warning("the output's lease was gone at renewal; taking it again")
            return
        if lease.get("holder") == self.holder:
            return
        if _holder_is_dead(lease):
            log.warning("taking over the lease of run %s: its process (pid %s) on this host has exited",
                        lease.get("run_id"), lease.get("pid"))
            return
        if float(lease.get("expires_at", 0)) > _now():
            raise OutputLockedError(self._message(lease))
        log.warning("taking over the expired lease of run %s (host %s, pid %s, expired %s)",
                    lease.get("run_id"), lease.get("host"), lease.get("pid"), lease.get("expires_at_utc"))

    def _message(self, lease: dict | None) -> str:
        lease = lease or {}
        return (f"output {self.store.cfg.path} is in use by another job: run {lease.get('run_id')!r} on host "
                f"{lease.get('host')} (pid {lease.get('pid')}), lease until {lease.get('expires_at_utc')}. "
                f"One job per output path; if that job is dead its lease expires after output.lock_ttl_s "
                f"({self.ttl_s:g} s) and the next run takes over (at once from the same host)")

    # ---- holding it

    def acquire(self) -> OutputLease:
        self._exchange(renew=False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="moref-output-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._exchange(renew=True)
            except OutputLockedError as exc:
                self.lost = str(exc)
                log.error("lost the output's lease: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                log.warning("renewing the output's lease failed (%s: %s); retrying", type(exc).__name__, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lease, _ = self._read()
        if (lease or {}).get("holder") == self.holder:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm(self.path)

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
