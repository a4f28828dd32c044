"""Run a function in a child process that is allowed to die.

Decoding untrusted media can crash the interpreter (decord segfaults on some corrupt files) or hang.
`run_isolated` runs one call in a fresh child process and turns a crash or a hang into an exception
the caller can record, so the worker (a threaded Ray process) survives.

Children come from a `forkserver`, never `fork`: forking a threaded parent can deadlock the child on
a lock held by another thread. The forkserver is started once per parent process with the heavy
modules (numpy, av, decord) already imported, so each call pays for a fork of that small server
(milliseconds), not for a fresh interpreter and its imports.

The child runs with the caller's current environment variables (the forkserver's own are those
of the moment it started). Results come back through a pipe as pickle protocol 5 with out-of-band
buffers: numpy arrays are written straight from their memory by the child and read into one
writable buffer by the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

DEFAULT_PRELOAD = ("numpy", "av", "decord")

_lock = threading.Lock()
_ctx = None
_preload: list[str] = list(DEFAULT_PRELOAD)


class IsolatedCrash(RuntimeError):
    """The child died before returning (signal or exit); the message names the signal or code."""


class IsolatedTimeout(TimeoutError):
    """The child ran past its time limit and was killed."""


class IsolatedError(RuntimeError):
    """The function raised an exception that could not be sent back as itself."""


def add_preload(*modules: str) -> None:
    """Ask the forkserver to import these modules once, so children start with them loaded.
    Takes effect only if called before the first `run_isolated` of this process."""
    with _lock:
        for name in modules:
            if name not in _preload:
                _preload.append(name)
        if _ctx is not None:
            _ctx.set_forkserver_preload(_preload_list())


def _main_script_imports() -> list[str]:
    """Modules the parent's main script imported. Every forkserver child re-runs that script as
    `__mp_main__` (CPython 3.11 never preloads it into the server, whatever the preload list says),
    so the server imports them once and the re-run finds them cached: under Ray the main script is
    the worker script, which imports ray (about 0.5 s per child otherwise)."""
    main = sys.modules.get("__main__")
    if main is None:
        return []
    names = set()
    for value in list(vars(main).values()):
        try:
            name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        except Exception:  # noqa: BLE001 - odd objects in a user's main script: skip them
            continue
        if isinstance(name, str) and name in sys.modules and name not in ("__main__", "__mp_main__"):
            names.add(name)
    return sorted(names)


def _preload_list() -> list[str]:
    return list(_preload) + [m for m in _main_script_imports() if m not in _preload]


def _context():
    global _ctx
    with _lock:
        if _ctx is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_preload_list())
            _ctx = ctx
        return _ctx


def _send(conn, obj) -> None:
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [buf.raw() for buf in buffers]
    conn.send_bytes(pickle.dumps((header, [len(r) for r in raws]), protocol=5))
    for raw in raws:
        conn.send_bytes(raw)


def _recv(conn):
    header, sizes = pickle.loads(conn.recv_bytes())
    buffers = []
    for size in sizes:
        buf = bytearray(size)  # writable, so unpickled numpy arrays are writable too
        if size:
            conn.recv_bytes_into(buf)
        else:
            conn.recv_bytes()
        buffers.append(buf)
    return pickle.loads(header, buffers=buffers)


def _child_main(conn, env, fn, args, kwargs) -> None:
    # The parent decides when to give up; a Ctrl-C in the terminal goes to the parent only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The forkserver's environment is the parent's at the time the server started; run with the
    # caller's current one (credentials, endpoints set later).
    os.environ.clear()
    os.environ.update(env)
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc, protocol=5)
            result = ("raised", (exc, tb))
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled travels as text
            result = ("raised", (IsolatedError(f"{type(exc).__name__}: {exc}"), tb))
    _send(conn, result)
    conn.close()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "child vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"child killed by {name}"
    return f"child exited with code {exitcode}"


def run_isolated(fn: Callable[..., Any], *args, timeout_s: float, **kwargs) -> Any:
    """Call `fn(*args, **kwargs)` in a child process and return its result.

    `fn`, its arguments and its result must be picklable (`fn` a module-level function).
    An exception raised by `fn` is raised here again (with the child's traceback as a note).
    Raises `IsolatedCrash` when the child dies (e.g. SIGSEGV) and `IsolatedTimeout` when it does not
    answer within `timeout_s` seconds (it is then killed).
    """
    ctx = _context()
    recv_conn, send_conn = ctx.Pipe(duplex=False)
    env = dict(os.environ)
    proc = ctx.Process(target=_child_main, args=(send_conn, env, fn, args, kwargs), daemon=True)
    deadline = time.monotonic() + timeout_s
    try:
        proc.start()
    except BaseException:
        recv_conn.close()
        send_conn.close()
        raise
    try:
        send_conn.close()  # our copy; EOF on recv_conn then means the child is gone
        if not recv_conn.poll(max(0.0, deadline - time.monotonic())):
            raise IsolatedTimeout(f"no result after {timeout_s:g} s; child killed")
        try:
            status, payload = _recv(recv_conn)
        except (EOFError, OSError, pickle.UnpicklingError):
            proc.join(5.0)
            raise IsolatedCrash(_describe_exit(proc.exitcode)) from None
        proc.join(5.0)  # it has sent everything and is exiting
    finally:
        recv_conn.close()
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        proc.close()
    if status == "ok":
        return payload
    exc, tb = payload
    exc.add_note(f"raised in isolated child process:\n{tb}")
    raise exc
