"""run_isolated: results, exceptions, real crashes and real hangs in a forkserver child."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pipeline.stages.decode.isolation import IsolatedCrash, IsolatedTimeout, run_isolated


# Child-side functions must be importable by name (they are pickled by reference).
def _frames(n: int, size: int, *, fill: int = 7) -> dict:
    return {"frames": np.full((n, size, size, 3), fill, np.uint8), "pid": os.getpid()}


def _segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


def _exit_code(code: int) -> None:
    os._exit(code)


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def _raise() -> None:
    raise KeyError("missing thing")


class _Unpicklable(Exception):
    def __init__(self, message, handle):
        super().__init__(message)
        self.handle = handle

    def __reduce__(self):
        raise TypeError("cannot pickle")


def _raise_unpicklable() -> None:
    raise _Unpicklable("bad", object())


def _env(name: str) -> str | None:
    return os.environ.get(name)


def test_returns_numpy_frames_from_another_process():
    out = run_isolated(_frames, 4, 32, fill=9, timeout_s=60)
    assert out["pid"] != os.getpid()
    frames = out["frames"]
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert (frames == 9).all()
    frames[0, 0, 0, 0] = 1  # arrives writable, like a locally made array


def test_large_result_travels_intact():
    out = run_isolated(_frames, 64, 384, fill=200, timeout_s=60)  # 28 MB
    assert out["frames"].shape == (64, 384, 384, 3)
    assert int(out["frames"].sum()) == 64 * 384 * 384 * 3 * 200


def test_per_call_overhead_is_small():
    run_isolated(_frames, 1, 8, timeout_s=60)  # the forkserver is up
    started = time.perf_counter()
    for _ in range(5):
        run_isolated(_frames, 1, 8, timeout_s=60)
    per_call = (time.perf_counter() - started) / 5
    assert per_call < 0.5, per_call  # typically ~20 ms; generous for a loaded 2-core machine


def test_segfault_becomes_isolated_crash_naming_the_signal():
    with pytest.raises(IsolatedCrash, match="SIGSEGV"):
        run_isolated(_segfault, timeout_s=60)


def test_signal_kill_and_exit_code_are_crashes():
    with pytest.raises(IsolatedCrash, match="SIGABRT"):
        run_isolated(_kill_self, signal.SIGABRT, timeout_s=60)
    with pytest.raises(IsolatedCrash, match="code 3"):
        run_isolated(_exit_code, 3, timeout_s=60)


def test_hang_becomes_timeout_and_the_child_is_killed():
    started = time.perf_counter()
    with pytest.raises(IsolatedTimeout):
        run_isolated(_sleep, 30, timeout_s=0.5)
    assert time.perf_counter() - started < 10
    # the machinery is still usable afterwards
    assert run_isolated(_sleep, 0, timeout_s=60) == "woke"


def test_exception_in_child_is_raised_in_parent_with_child_traceback():
    with pytest.raises(KeyError, match="missing thing") as info:
        run_isolated(_raise, timeout_s=60)
    assert any("_raise" in note for note in info.value.__notes__)


def test_unpicklable_exception_arrives_as_text():
    with pytest.raises(RuntimeError, match="_Unpicklable: bad"):
        run_isolated(_raise_unpicklable, timeout_s=60)


def test_child_sees_the_callers_current_environment(monkeypatch):
    run_isolated(_env, "HOME", timeout_s=60)  # the forkserver exists before the variable does
    monkeypatch.setenv("MOREF_ISOLATION_PROBE", "set-late")
    assert run_isolated(_env, "MOREF_ISOLATION_PROBE", timeout_s=60) == "set-late"


def test_main_script_imports_are_paid_once_not_per_call(tmp_path):
    """Children re-run the parent's main script; what it imports must come preloaded (under Ray
    the main script is the worker's, which imports ray)."""
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(1.0)\n")
    (tmp_path / "main.py").write_text(
        textwrap.dedent(
            """
            import os, time
            import slow_import
            from pipeline.stages.decode.isolation import run_isolated

            if __name__ == "__main__":
                run_isolated(os.getpid, timeout_s=60)
                started = time.perf_counter()
                for _ in range(3):
                    run_isolated(os.getpid, timeout_s=60)
                print((time.perf_counter() - started) / 3)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(tmp_path / "main.py")], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 0.5  # not >= 1 s: slow_import is not re-imported
